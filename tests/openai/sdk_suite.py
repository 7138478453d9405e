"""The OpenAI-compatible surface, through the official `openai` Python SDK only.

Starts `ultra all` on free ports with a database, queue prefix and Redis prefix of its
own (tests/support/ultra_process.py, as the contract suite does), creates an admin user
and an API key with `ultra admin`, then talks to `/openai/v1` through
`openai.OpenAI(base_url=…, api_key=…)` and nothing else: the model list and one model,
a chat completion (and its `x-ultra-job-id` header), a streamed one with usage, the
virtual model `ultra/critique`, the errors (404, 400, 401) and `Idempotency-Key`.
Every check runs even when an earlier one failed; one line each. Stops what it started
by pid, drops its database and deletes its queues and Redis keys; exits non-zero on any
failure.

    ULTRA_BIN=target/debug/ultra bash tests/openai/run.sh

Against a server already running (nothing is started or cleaned up): set
ULTRA_OPENAI_SUITE_URL (e.g. http://127.0.0.1:8080) and ULTRA_OPENAI_SUITE_KEY (an
Ultra API key, in a tier that allows two models per job); the built-in mock catalog
is assumed.
"""

import hashlib
import json
import os
import secrets
import string
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

import openai
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "support"))
from ultra_process import Ultra, run_id, stop_on_sigterm  # noqa: E402  (tests/support, shared with tests/contract)

RUN = run_id()
# `ultra_contract_…` and `k<8 hex>.` so that .ci/run clears what an interrupted run leaves.
DATABASE = f"ultra_contract_openai_{RUN}"
TIMEOUT_SECS = 60.0

# The built-in catalog (common/src/catalog.rs) and patterns (common/src/patterns.rs):
# `ultra all` without a catalog file serves exactly these, plus one `ultra/<pattern>` each.
CATALOG = ["mock/alpha", "mock/beta", "mock/gamma"]
PATTERNS = ["direct", "gut", "confidence", "critique", "fact_check", "perspective", "scenario"]

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
STREAMED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three"}]
UNSUPPORTED_TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}},
]


def say(message: str) -> None:
    print(f"[openai-sdk] {message}", file=sys.stderr, flush=True)


class Failed(Exception):
    """A check's expectation, not met."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


def client_for(base: str, key: str) -> OpenAI:
    # No retries: every failure shows at once, and a retry cannot hide one. No proxy
    # from the environment for a server on this machine.
    local = urlsplit(base).hostname in ("127.0.0.1", "localhost", "::1")
    return OpenAI(
        base_url=f"{base}/openai/v1", api_key=key, timeout=TIMEOUT_SECS, max_retries=0,
        http_client=openai.DefaultHttpxClient(trust_env=not local, timeout=TIMEOUT_SECS),
    )


def expect_error(kind: type, call: Callable[[], object], what: str) -> "openai.APIStatusError":
    """The `kind` of openai.APIStatusError that `call` raises."""
    try:
        result = call()
    except kind as err:
        return err
    except openai.APIStatusError as err:
        raise Failed(f"{what}: expected {kind.__name__}, got {type(err).__name__} {err.status_code}: "
                     f"{err.response.text[:500]}") from None
    raise Failed(f"{what}: expected {kind.__name__}, got a success: {result!r:.300}")


def error_object(err: "openai.APIStatusError", what: str) -> dict:
    """The `{"error": {"message", "type", …}}` body OpenAI's errors have, checked."""
    try:
        wire = err.response.json()
    except ValueError:
        raise Failed(f"{what}: the {err.status_code} body is not JSON: {err.response.text[:300]!r}") from None
    error = wire.get("error") if isinstance(wire, dict) else None
    expect(isinstance(error, dict), f"{what}: the body has no `error` object: {wire!r:.300}")
    expect(isinstance(error.get("message"), str) and error["message"], f"{what}: `error.message` missing: {error!r}")
    expect(isinstance(error.get("type"), str) and error["type"], f"{what}: `error.type` missing: {error!r}")
    return error


def is_uuid(value: object) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def check_completion(completion, what: str) -> str:
    """A non-streamed chat completion as OpenAI's clients read it; its content."""
    expect(completion.object == "chat.completion", f"{what}: object is {completion.object!r}")
    expect(is_uuid(completion.id), f"{what}: id {completion.id!r} is not a job's UUID")
    expect(isinstance(completion.created, int), f"{what}: created is {completion.created!r}")
    expect(len(completion.choices) == 1, f"{what}: {len(completion.choices)} choices")
    choice = completion.choices[0]
    expect(choice.index == 0, f"{what}: choices[0].index is {choice.index!r}")
    expect(choice.message.role == "assistant", f"{what}: role is {choice.message.role!r}")
    content = choice.message.content
    expect(isinstance(content, str) and content.strip(), f"{what}: content is {content!r}")
    expect(choice.finish_reason == "stop", f"{what}: finish_reason is {choice.finish_reason!r}")
    check_usage(completion.usage, what)
    return content


def check_usage(usage, what: str) -> None:
    expect(usage is not None, f"{what}: no usage")
    expect(isinstance(usage.prompt_tokens, int) and usage.prompt_tokens > 0,
           f"{what}: usage.prompt_tokens is {usage.prompt_tokens!r}")
    expect(isinstance(usage.completion_tokens, int) and usage.completion_tokens > 0,
           f"{what}: usage.completion_tokens is {usage.completion_tokens!r}")
    expect(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
           f"{what}: usage.total_tokens {usage.total_tokens!r} is not "
           f"{usage.prompt_tokens} + {usage.completion_tokens}")


# The checks: each takes the client and returns its one-line summary.


def models_list(client: OpenAI) -> str:
    page = client.models.list()
    expect(getattr(page, "object", None) == "list", f"the list's object is {getattr(page, 'object', None)!r}")
    models = list(page)
    ids = [m.id for m in models]
    expect(len(ids) == len(set(ids)), f"duplicate ids: {sorted(ids)}")
    for m in models:
        expect(m.object == "model", f"{m.id}: object is {m.object!r}")
        expect(isinstance(m.owned_by, str) and m.owned_by, f"{m.id}: owned_by is {m.owned_by!r}")
        expect(isinstance(m.created, int), f"{m.id}: created is {m.created!r}")
    wanted = CATALOG + [f"ultra/{p}" for p in PATTERNS]
    missing = [w for w in wanted if w not in ids]
    expect(not missing, f"missing {missing} from {ids}")
    return f"{len(ids)} models, {', '.join(CATALOG)} and ultra/<pattern> for all {len(PATTERNS)} patterns"


def models_retrieve(client: OpenAI) -> str:
    # openai>=2.30 sends the id percent-encoded (/models/mock%2Falpha); older ones, as is.
    model = client.models.retrieve("mock/alpha")
    expect(model.id == "mock/alpha", f"id is {model.id!r}")
    expect(model.object == "model", f"object is {model.object!r}")
    expect(isinstance(model.owned_by, str) and model.owned_by, f"owned_by is {model.owned_by!r}")
    return "mock/alpha retrieved (a slash in the id)"


def chat(client: OpenAI) -> str:
    completion = client.chat.completions.create(model="mock/alpha", messages=MESSAGES)
    content = check_completion(completion, "chat")
    raw = client.chat.completions.with_raw_response.create(model="mock/alpha", messages=MESSAGES)
    expect(raw.status_code == 200, f"raw: status {raw.status_code}")
    again = raw.parse()
    check_completion(again, "chat (raw)")
    header = raw.headers.get("x-ultra-job-id")
    expect(header == again.id, f"x-ultra-job-id is {header!r}, the id {again.id!r}")
    expect(again.id != completion.id, f"two requests without a key share the id {again.id}")
    expect(again.choices[0].message.content == content,
           f"the same model and messages answered {again.choices[0].message.content!r}, then {content!r}")
    u = completion.usage
    return (f"job {completion.id}: {len(content)} characters, finish_reason stop, usage {u.prompt_tokens}+"
            f"{u.completion_tokens}={u.total_tokens}; x-ultra-job-id matches")


def streaming(client: OpenAI) -> str:
    expected = check_completion(client.chat.completions.create(model="mock/alpha", messages=STREAMED), "non-streamed")
    with client.chat.completions.create(
        model="mock/alpha", messages=STREAMED, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    expect(chunks, "no chunks")
    for c in chunks:
        expect(c.object == "chat.completion.chunk", f"a chunk's object is {c.object!r}")
    ids = {c.id for c in chunks}
    expect(len(ids) == 1 and is_uuid(next(iter(ids))), f"the chunks' ids are {sorted(ids)}, not one job's UUID")
    with_choices = [c for c in chunks if c.choices]
    expect(with_choices, "no chunk has choices")
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    expect(text == expected, f"the deltas add up to {text!r}, the non-streamed answer is {expected!r}")
    finish = with_choices[-1].choices[0].finish_reason
    expect(finish == "stop", f"the last chunk with choices has finish_reason {finish!r}")
    last = chunks[-1]
    expect(last.choices == [] and last.usage is not None,
           f"with stream_options.include_usage the last chunk has usage and no choices; it has choices "
           f"{last.choices!r:.200} and usage {last.usage!r}")
    check_usage(last.usage, "the last chunk")
    expect(last.usage.total_tokens > 0, f"the last chunk's usage is {last.usage!r}")
    return (f"{len(chunks)} chunks of job {next(iter(ids))}: the deltas equal the non-streamed answer, "
            f"finish_reason stop, usage total {last.usage.total_tokens}")


def critique(client: OpenAI) -> str:
    completion = client.chat.completions.create(
        model="ultra/critique", messages=MESSAGES, extra_body={"ultra": {"models": ["mock/alpha", "mock/beta"]}}
    )
    content = check_completion(completion, "ultra/critique")
    return f"job {completion.id}: {len(content)} characters from mock/alpha and mock/beta"


def unknown_model(client: OpenAI) -> str:
    err = expect_error(
        openai.NotFoundError,
        lambda: client.chat.completions.create(model="mock/does-not-exist", messages=MESSAGES),
        "model mock/does-not-exist",
    )
    expect(err.status_code == 404, f"status {err.status_code}")
    error = error_object(err, "404")
    return f"NotFoundError 404, error.type {error['type']!r}: {error['message']!r:.80}"


def unsupported_field(client: OpenAI) -> str:
    err = expect_error(
        openai.BadRequestError,
        lambda: client.chat.completions.create(model="mock/alpha", messages=MESSAGES, tools=UNSUPPORTED_TOOLS),
        "tools",
    )
    expect(err.status_code == 400, f"status {err.status_code}")
    error = error_object(err, "400")
    named = "tools" in str(err.param or "") or "tools" in error["message"]
    expect(named, f"neither param ({err.param!r}) nor message ({error['message']!r}) names `tools`")
    return f"BadRequestError 400, param {err.param!r}: {error['message']!r:.80}"


def bad_key(client: OpenAI) -> str:
    base = str(client.base_url).rstrip("/").removesuffix("/openai/v1")
    keys = {"a malformed key": "sk-not-an-ultra-key", "an unknown well-formed key": unknown_key()}
    for label, key in keys.items():
        with client_for(base, key) as stranger:
            calls = {
                "models.list": stranger.models.list,
                "chat.completions.create": lambda: stranger.chat.completions.create(model="mock/alpha",
                                                                                    messages=MESSAGES),
            }
            for name, call in calls.items():
                err = expect_error(openai.AuthenticationError, call, f"{name} with {label}")
                expect(err.status_code == 401, f"{name} with {label}: status {err.status_code}")
    return "AuthenticationError 401 for a malformed and an unknown key, on models.list and chat.completions.create"


def idempotency(client: OpenAI) -> str:
    headers = {"Idempotency-Key": f"k-{secrets.token_hex(8)}"}
    first = client.chat.completions.create(model="mock/alpha", messages=MESSAGES, extra_headers=headers)
    second = client.chat.completions.create(model="mock/alpha", messages=MESSAGES, extra_headers=headers)
    check_completion(first, "the first")
    check_completion(second, "the second")
    expect(first.id == second.id, f"the same Idempotency-Key gave jobs {first.id} and {second.id}")
    expect(first.choices[0].message.content == second.choices[0].message.content, "the same job, two answers")
    return f"the same Idempotency-Key and body twice: one job, {first.id}"


def batch_lines(count: int, prefix: str) -> bytes:
    lines = [
        json.dumps({
            "custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "mock/alpha", "messages": [{"role": "user", "content": f"Question {i}"}]},
        })
        for i in range(count)
    ]
    return ("\n".join(lines) + "\n").encode()


def wait_for_batch(client: OpenAI, batch_id: str, ends: tuple[str, ...]):
    deadline = time.monotonic() + 120
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ends:
            return batch
        expect(time.monotonic() < deadline, f"batch {batch_id} still {batch.status} after 120 s")
        time.sleep(0.2)


def batch(client: OpenAI) -> str:
    count = 12
    uploaded = client.files.create(file=("questions.jsonl", batch_lines(count, "q")), purpose="batch")
    expect(uploaded.object == "file" and uploaded.purpose == "batch", f"upload: {uploaded!r:.300}")
    expect(client.files.retrieve(uploaded.id).bytes == uploaded.bytes, "files.retrieve disagrees with the upload")
    expect(any(f.id == uploaded.id for f in client.files.list()), "files.list does not list the upload")
    created = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"suite": "openai-sdk"},
    )
    done = wait_for_batch(client, created.id, ("completed", "failed", "cancelled", "expired"))
    expect(done.status == "completed", f"batch ended {done.status}: {done.errors!r:.500}")
    counts = done.request_counts
    expect((counts.total, counts.completed, counts.failed) == (count, count, 0), f"request_counts {counts!r}")
    expect(done.error_file_id is None, f"an error file for a batch without errors: {done.error_file_id}")
    output = client.files.content(done.output_file_id).text
    answered = {}
    for raw in output.splitlines():
        record = json.loads(raw)
        expect(record["response"]["status_code"] == 200, f"a line failed: {raw[:300]}")
        body = record["response"]["body"]
        answered[record["custom_id"]] = body["choices"][0]["message"]["content"]
    expect(sorted(answered) == sorted(f"q-{i}" for i in range(count)), f"custom ids back: {sorted(answered)}")
    expect(all(text.startswith("[mock/alpha]") for text in answered.values()), "an answer is not the model's")
    expect(any(b.id == created.id for b in client.batches.list(limit=10)), "batches.list does not list the batch")
    client.files.delete(uploaded.id)
    return f"batch {created.id}: {count} lines, each back once by custom_id in the output file"


def batch_cancel(client: OpenAI) -> str:
    uploaded = client.files.create(file=("many.jsonl", batch_lines(400, "c")), purpose="batch")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = client.batches.cancel(created.id)
    expect(cancelling.status in ("cancelling", "cancelled"), f"cancel answered {cancelling.status}")
    done = wait_for_batch(client, created.id, ("completed", "failed", "cancelled", "expired"))
    expect(done.status == "cancelled", f"the cancelled batch ended {done.status}")
    counts = done.request_counts
    expect(counts.completed + counts.failed == counts.total == 400, f"request_counts {counts!r}")
    expect(counts.completed < 400, f"every line ran although the batch was cancelled: {counts!r}")
    return f"batch {created.id} cancelled: {counts.completed} of 400 lines ran, {counts.failed} never will"


CHECKS: list[tuple[str, Callable[[OpenAI], str]]] = [
    ("models.list", models_list),
    ("models.retrieve", models_retrieve),
    ("chat", chat),
    ("streaming", streaming),
    ("ultra/critique", critique),
    ("errors: unknown model", unknown_model),
    ("errors: unsupported field", unsupported_field),
    ("errors: bad API key", bad_key),
    ("idempotency", idempotency),
    ("batch", batch),
    ("batch cancel", batch_cancel),
]


def unknown_key() -> str:
    """A key in Ultra's format with a valid checksum (common/src/apikey.rs) that no user
    has: refused after the lookup, not by the format check."""
    alphabet = string.digits + string.ascii_uppercase + string.ascii_lowercase
    ident = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    body = f"ultra_{ident}_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    n = int.from_bytes(hashlib.sha256(body.encode()).digest()[:4], "big")
    check = []
    for _ in range(6):
        check.append(alphabet[n % 62])
        n //= 62
    return body + "".join(reversed(check))


def describe(err: BaseException) -> str:
    if isinstance(err, Failed):
        frames = traceback.extract_tb(err.__traceback__)
        caller = frames[-2] if len(frames) > 1 else frames[-1]  # who called expect()
        return f"{err} (sdk_suite.py:{caller.lineno})"
    if isinstance(err, openai.APIStatusError):
        request = f"{err.request.method} {err.request.url}"
        return f"{type(err).__name__} {err.status_code} from {request}: {err.response.text[:500]}"
    if isinstance(err, openai.APIConnectionError):
        return f"{type(err).__name__} on {err.request.method} {err.request.url}: {err.__cause__ or err}"
    return "".join(traceback.format_exception(type(err), err, err.__traceback__)[-4:]).strip()


def run_checks(base: str, key: str) -> list[str]:
    """Every check, in order; the names of those that failed."""
    client = client_for(base, key)
    failed = []
    for name, check in CHECKS:
        try:
            summary = check(client)
        except Exception as err:  # noqa: BLE001 — every check reports, then the next runs
            failed.append(name)
            say(f"FAIL {name}: {describe(err)}")
        else:
            say(f"ok   {name}: {summary}")
    return failed


def against_own_server(binary: str) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="ultra-openai-") as work:
        ultra = Ultra(binary, Path(work), run=RUN, database=DATABASE, tier="openai")
        try:
            key = ultra.create_admin_key(f"openai-{RUN}@example.com", "openai-sdk")
            try:
                ultra.start()
                failed = run_checks(ultra.base, key)
            except BaseException:
                say(f"the server's log:\n{ultra.log_tail()}")
                raise
            else:
                if failed:
                    say(f"the server's log:\n{ultra.log_tail()}")
                return failed
            finally:
                ultra.stop()
        finally:
            ultra.forget()


def main() -> int:
    say(f"openai=={openai.__version__}")
    external: Optional[str] = os.environ.get("ULTRA_OPENAI_SUITE_URL")
    if external:
        key = os.environ.get("ULTRA_OPENAI_SUITE_KEY")
        if not key:
            raise SystemExit("ULTRA_OPENAI_SUITE_URL is set: set ULTRA_OPENAI_SUITE_KEY to an Ultra API key too")
        failed = run_checks(external.rstrip("/"), key)
    else:
        binary = os.environ["ULTRA_BIN"]
        if not os.access(binary, os.X_OK):
            raise SystemExit(f"ULTRA_BIN={binary} is not an executable: build it (cargo build) or set ULTRA_BIN")
        failed = against_own_server(binary)
    if failed:
        print(f"openai-sdk: FAILED {len(failed)} of {len(CHECKS)} checks through the official SDK "
              f"(openai=={openai.__version__}): {', '.join(failed)}")
        return 1
    print("openai-sdk: models, chat, streaming, ultra/critique, errors, idempotency, a batch and a cancelled batch "
          "all passed through the "
          f"official SDK (openai=={openai.__version__})")
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
