"""The OpenAPI document is a promise, and a client generated from it is its test.

Starts `ultra all` on a free port with a database, queue prefix and Redis prefix of
its own; generates a Python client from the served /openapi.json with
openapi-python-client, failing on any warning the generator prints; then, through
the generated code only, submits a job, polls it to `succeeded` and reads the page of
jobs it is on; then runs schemathesis with every check over every operation but the
event streams. Stops what it started by pid and drops its database.
"""

import importlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "support"))
from ultra_process import Ultra, run_id, stop_on_sigterm  # noqa: E402  (tests/support, shared with tests/openai)

ULTRA = os.environ["ULTRA_BIN"]
VENV_BIN = Path(sys.executable).parent
RUN = run_id()
DATABASE = f"ultra_contract_{RUN}"


def say(message: str) -> None:
    print(f"[contract] {message}", file=sys.stderr, flush=True)


def main(ultra: Ultra) -> None:
    base = ultra.base
    work = ultra.work
    key = ultra.create_admin_key(f"contract-{RUN}@example.com", "contract")
    try:
        ultra.start()
        document = urllib.request.urlopen(f"{base}/openapi.json", timeout=10).read()
        (work / "openapi.json").write_bytes(document)
        generate(work)
        use_generated_client(work, base, key)
        fuzz(work, base, key)
    except BaseException:
        say(f"the server's log:\n{ultra.log_tail()}")
        raise
    finally:
        ultra.stop()


def generate(work: Path) -> None:
    # No post hooks: they would run ruff, a formatter, which the client does not need.
    (work / "generator.yml").write_text("post_hooks: []\n")
    done = subprocess.run(
        [str(VENV_BIN / "openapi-python-client"), "generate", "--path", "openapi.json", "--meta", "none",
         "--config", "generator.yml", "--output-path", "ultra_client"],
        cwd=work, capture_output=True, text=True,
    )
    output = done.stdout + done.stderr
    problems = [line for line in output.splitlines() if any(w in line for w in ("Warning", "WARNING", "Unable", "Cannot", "Error"))]
    if done.returncode != 0 or problems:
        raise SystemExit(f"openapi-python-client could not use the document:\n{output}")
    say("client generated with no warnings")


def use_generated_client(work: Path, base: str, key: str) -> None:
    sys.path.insert(0, str(work))
    client_module = importlib.import_module("ultra_client")
    analyze = importlib.import_module("ultra_client.api.jobs.analyze")
    get_job = importlib.import_module("ultra_client.api.jobs.get_job")
    list_jobs = importlib.import_module("ultra_client.api.jobs.list_jobs")
    models = importlib.import_module("ultra_client.models")

    client = client_module.AuthenticatedClient(base_url=base, token=key)
    request = models.AnalyzeRequest.from_dict(
        {"prompt": "Why is the sky blue?", "models": ["mock/alpha", "mock/beta"], "pattern": "critique"}
    )
    accepted = analyze.sync(client=client, body=request)
    assert isinstance(accepted, models.AnalyzeAccepted), f"submit: {accepted!r}"
    job = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = get_job.sync(client=client, id=accepted.id)
        assert isinstance(job, models.JobView), f"poll: {job!r}"
        if str(job.status) in ("succeeded", "failed", "cancelled") or getattr(job.status, "value", "") in (
            "succeeded", "failed", "cancelled"
        ):
            break
        time.sleep(0.2)
    status = getattr(job.status, "value", job.status)
    assert status == "succeeded", f"the job ended {status}: {job.to_dict()}"
    steps = job.steps
    assert len(steps) == 5, f"critique on two models is five steps: {[s.to_dict() for s in steps]}"
    assert all(getattr(s.status, "value", s.status) == "succeeded" for s in steps)
    output = job.to_dict()["result"]["output"]
    assert isinstance(output, str) and output, job.to_dict()
    page = list_jobs.sync(client=client, limit=10)
    assert isinstance(page, models.JobPage), f"list: {page!r}"
    assert [j.id for j in page.jobs] == [accepted.id], page.to_dict()
    say(f"submitted, polled to succeeded and listed job {accepted.id} through the generated client")


def fuzz(work: Path, base: str, key: str) -> None:
    """schemathesis, every check, over every operation but the event streams, as an
    admin in a tier without practical limits. Any failure fails the suite."""
    env = dict(os.environ, SCHEMATHESIS_HOOKS="hooks", PYTHONPATH=str(Path(__file__).parent))
    done = subprocess.run(
        cwd=work,  # its cache stays out of the checkout
        args=[str(VENV_BIN / "schemathesis"), "--config-file", str(Path(__file__).parent / "schemathesis.toml"),
         "run", f"{base}/openapi.json", "--checks", "all",
         "--header", f"Authorization: Bearer {key}", "--exclude-path-regex", "/events$",
         "--max-examples", os.environ.get("ULTRA_CONTRACT_EXAMPLES", "50"), "--seed", "1",
         "--no-color", "--output-truncate", "false"],
        env=env, capture_output=True, text=True,
    )
    summary = [line for line in done.stdout.splitlines() if "generated" in line or "passed" in line]
    if done.returncode != 0:
        raise SystemExit(f"schemathesis found failures:\n{done.stdout[-20000:]}\n{done.stderr[-2000:]}")
    say("schemathesis --checks all: " + (summary[-1].strip() if summary else "passed"))


if __name__ == "__main__":
    stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="ultra-contract-") as work:
        ultra = Ultra(ULTRA, Path(work), run=RUN, database=DATABASE, tier="contract")
        try:
            main(ultra)
        finally:
            ultra.forget()
    print("contract: a client generated from /openapi.json by openapi-python-client submitted a job, polled it to "
          "succeeded and listed it; schemathesis --checks all found no failure")
