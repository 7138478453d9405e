"""Ultra's webhooks, verified by the Standard Webhooks reference library only.

Starts `ultra all` on free ports with a database, queue prefix and Redis prefix of its
own (tests/support/ultra_process.py), private receivers allowed and a short retry
schedule, and checks:

- the README's receiver, run as written: a job's end arrives once and verifies;
- a job's delivery to the suite's own receiver: once, verified by
  `standardwebhooks.Webhook.verify`, carrying the job's id and status;
- a receiver answering 500 twice, then 200: three attempts, one `webhook-id`;
- a tampered body and a stale timestamp: the library refuses both;
- a rotated secret: the library verifies with the previous secret and the new one.

Every check runs even when an earlier one failed; one line each. Stops what it started
by pid (the server, the README's receiver, its own receiver's thread), drops its
database and deletes its queues and Redis keys; exits non-zero on any failure.

    ULTRA_BIN=target/debug/ultra bash tests/webhooks/run.sh
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "support"))
from checks import Failed, expect, run_checks, wait_until  # noqa: E402  (tests/support)
from ultra_process import Ultra, free_port, run_id, stop_on_sigterm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
RUN = run_id()
# `ultra_contract_…` and `k<8 hex>.` so that .ci/run clears what an interrupted run leaves.
DATABASE = f"ultra_contract_webhooks_{RUN}"
PATIENCE = 30.0
SCHEDULE = "300ms,300ms,300ms"


def say(message: str) -> None:
    print(f"[webhooks] {message}", file=sys.stderr, flush=True)


class Api:
    """The REST api, as a user with `key` calls it (standard library only)."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.key = key

    def call(self, method: str, path: str, body: Optional[dict] = None) -> tuple:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=PATIENCE) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            return err.code, json.loads(text) if text else None

    def ok(self, method: str, path: str, body: Optional[dict] = None, status: int = 200) -> dict:
        got, answer = self.call(method, path, body)
        expect(got == status, f"{method} {path}: {got} {answer!r:.400}, expected {status}")
        return answer

    def register(self, url: str, events: Optional[list] = None) -> dict:
        body = {"url": url} if events is None else {"url": url, "events": events}
        endpoint = self.ok("POST", "/v1/webhooks", body, status=201)
        expect(str(endpoint.get("secret", "")).startswith("whsec_"), f"no whsec_ secret: {endpoint!r}")
        return endpoint

    def finished_job(self) -> str:
        job = self.ok("POST", "/v1/analyze", {"prompt": "Why is the sky blue?", "models": ["mock/alpha"]}, 202)

        def ended():
            status = self.ok("GET", f"/v1/jobs/{job['id']}")["status"]
            return status in ("succeeded", "failed", "cancelled") and status

        expect(wait_until(f"job {job['id']} to end", ended) == "succeeded", f"job {job['id']} did not succeed")
        return job["id"]


def pinged(ultra: Ultra, receiver: "Receiver", name: str, path: str) -> tuple:
    """A user of its own with an endpoint at the receiver's `path`, sent a test ping:
    (the user's Api, the endpoint as registered)."""
    api = Api(ultra.base, ultra.create_admin_key(f"{name}@example.com", name))
    endpoint = api.register(f"{receiver.url}{path}")
    api.ok("POST", f"/v1/webhooks/{endpoint['id']}/test", status=202)
    return api, endpoint


class Recorded:
    def __init__(self, path: str, headers: dict, body: bytes) -> None:
        self.path = path
        self.headers = headers
        self.body = body
        self.at = time.monotonic()


class Receiver:
    """The suite's own receiver: records every request; `/flaky/<n>` answers 500 to the
    first n requests with a given webhook-id, then 200; any other path 200."""

    def __init__(self) -> None:
        self.records: list = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.records.append(Recorded(self.path, headers, body))
                    seen = sum(1 for r in receiver.records if r.headers.get("webhook-id") == headers.get("webhook-id"))
                match = re.fullmatch(r"/flaky/(\d+)", self.path)
                status = 500 if match and seen <= int(match.group(1)) else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def at(self, path: str) -> list:
        with self.lock:
            return [r for r in self.records if r.path == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verified(secret: str, record: Recorded) -> dict:
    """The library's reading of a delivery; fails the check if it refuses it."""
    try:
        return Webhook(secret).verify(record.body, record.headers)
    except WebhookVerificationError as err:
        raise Failed(f"the library refused a delivery to {record.path}: {err}") from None


def readme_receiver_code() -> str:
    readme = (ROOT / "README.md").read_text()
    marker = readme.index("<!-- webhook-receiver:")
    block = re.search(r"```python\n(.*?)```", readme[marker:], re.S)
    expect(block, "the README's receiver block is missing")
    return block.group(1)


# The checks: each takes the server and the suite's receiver, returns its one line.


def readme_receiver(subject: tuple) -> str:
    ultra, receiver = subject
    api = Api(ultra.base, ultra.create_admin_key("readme@example.com", "readme"))
    port = free_port()
    endpoint = api.register(f"http://127.0.0.1:{port}/hooks", ["job.succeeded", "job.failed"])
    script = ultra.work / "receiver.py"
    script.write_text(readme_receiver_code())
    output = ultra.work / "receiver.out"
    env = dict(os.environ, WEBHOOK_SECRET=endpoint["secret"], PORT=str(port))
    with open(output, "w") as out:
        process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def listening():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                    return True
            except urllib.error.HTTPError:
                return True  # it answers (GET is not handled): it is up
            except OSError:
                expect(process.poll() is None, f"the README's receiver exited: {output.read_text()!r:.500}")
                return False

        wait_until("the README's receiver to listen", listening)
        job = api.finished_job()
        lines = wait_until("the README's receiver to print the job", lambda: [
            line for line in output.read_text().splitlines() if job in line])
        time.sleep(1.0)
        lines = [line for line in output.read_text().splitlines() if job in line]
        expect(len(lines) == 1, f"the job's event arrived {len(lines)} times: {lines}")
        words = lines[0].split()
        expect(words[0].startswith("msg_") and words[1:] == ["job.succeeded", job, "succeeded"],
               f"the receiver printed {lines[0]!r}")
        expect("refused" not in output.read_text(), f"the receiver refused a delivery: {output.read_text()!r:.500}")
        return f"README's receiver, as written: {lines[0]}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def job_delivery(subject: tuple) -> str:
    ultra, receiver = subject
    api = Api(ultra.base, ultra.create_admin_key("job@example.com", "job"))
    endpoint = api.register(f"{receiver.url}/job")
    job = api.finished_job()
    wait_until("the job's delivery", lambda: receiver.at("/job"))
    time.sleep(1.0)
    records = receiver.at("/job")
    expect(len(records) == 1, f"{len(records)} deliveries of one job's end")
    event = verified(endpoint["secret"], records[0])
    expect(event["type"] == "job.succeeded", f"type is {event['type']!r}")
    expect(event["data"]["id"] == job and event["data"]["status"] == "succeeded", f"data is {event['data']!r}")
    return f"job {job}: one delivery, {records[0].headers['webhook-id']}, verified by standardwebhooks"


def flaky_receiver(subject: tuple) -> str:
    ultra, receiver = subject
    api, endpoint = pinged(ultra, receiver, "flaky", "/flaky/2")
    records = wait_until("three attempts", lambda: len(receiver.at("/flaky/2")) >= 3 and receiver.at("/flaky/2"))
    ids = {r.headers.get("webhook-id") for r in records}
    expect(len(ids) == 1, f"the attempts carried {sorted(ids)}")
    for record in records:
        event = verified(endpoint["secret"], record)
        expect(event["type"] == "webhook.test", f"type is {event['type']!r}")

    def ended():
        deliveries = api.ok("GET", f"/v1/webhooks/{endpoint['id']}/deliveries")["deliveries"]
        return deliveries and deliveries[0]["status"] != "pending" and deliveries[0]

    delivery = wait_until("the delivery to end", ended)
    expect((delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("succeeded", 3, 200),
           f"the delivery is {delivery!r}")
    time.sleep(1.0)
    expect(len(receiver.at("/flaky/2")) == 3, f"{len(receiver.at('/flaky/2'))} attempts after a 200")
    return f"500, 500, 200: three attempts, one webhook-id ({next(iter(ids))}), each verified"


def tampered_and_stale(subject: tuple) -> str:
    ultra, receiver = subject
    _, endpoint = pinged(ultra, receiver, "tamper", "/tamper")
    record = wait_until("the ping", lambda: receiver.at("/tamper"))[0]
    verified(endpoint["secret"], record)
    webhook = Webhook(endpoint["secret"])
    refusals = []
    tampered = record.body.replace(b"webhook.test", b"job.succeeded")
    expect(tampered != record.body, "nothing to tamper with")
    stale = dict(record.headers, **{"webhook-timestamp": str(int(time.time()) - 600)})
    for what, body, headers in [("tampered body", tampered, record.headers), ("stale timestamp", record.body, stale)]:
        try:
            webhook.verify(body, headers)
        except WebhookVerificationError as err:
            refusals.append(f"{what}: {err}")
            continue
        raise Failed(f"the library accepted a {what}")
    return "; ".join(refusals)


def rotation(subject: tuple) -> str:
    ultra, receiver = subject
    api = Api(ultra.base, ultra.create_admin_key("rotate@example.com", "rotate"))
    endpoint = api.register(f"{receiver.url}/rotate")
    rotated = api.ok("POST", f"/v1/webhooks/{endpoint['id']}/rotate-secret")
    expect(rotated["secret"] != endpoint["secret"], "rotation kept the secret")
    api.ok("POST", f"/v1/webhooks/{endpoint['id']}/test", status=202)
    record = wait_until("the ping", lambda: receiver.at("/rotate"))[0]
    verified(endpoint["secret"], record)
    verified(rotated["secret"], record)
    return f"both secrets verify until {rotated['previous_secret_expires_at']}"


CHECKS = [readme_receiver, job_delivery, flaky_receiver, tampered_and_stale, rotation]


def main() -> int:
    stop_on_sigterm()
    binary = os.environ.get("ULTRA_BIN", "target/debug/ultra")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="ultra-webhooks-") as work:
        ultra = Ultra(binary, Path(work), run=RUN, database=DATABASE, tier="webhooks",
                      extra_env={"ULTRA_WEBHOOK_ALLOW_PRIVATE": "true", "ULTRA_WEBHOOK_RETRY_SCHEDULE": SCHEDULE})
        receiver = Receiver()
        try:
            ultra.start()
            say(f"ultra all on {ultra.base}; standardwebhooks verifies every delivery")
            failures = run_checks(CHECKS, (ultra, receiver), say)
            if failures:
                say(f"server log (end):\n{ultra.log_tail()}")
        finally:
            receiver.stop()
            ultra.stop()
            ultra.forget()
    say(f"{len(CHECKS) - failures} of {len(CHECKS)} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
