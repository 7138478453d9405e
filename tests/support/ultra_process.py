"""An `ultra all` of a suite's own, for the Python suites (tests/contract, tests/openai,
tests/webhooks).

`Ultra` starts the binary on free ports with a database, a queue prefix (`k<run>.`)
and a Redis prefix of its own and a tier without practical limits, creates an admin
user and an API key through `ultra admin`, waits until the server answers, and stops
it by pid. `forget` drops the database and deletes the run's queues from the shared
broker and its keys from Redis. Standard library only: the suites' venvs pin everything else.

.ci/run clears what an interrupted run leaves behind as long as the database is named
`ultra_contract_…` and the queue prefix is `k` and eight hex digits, which `run_id`
gives. Redis keys are under `ultra-k<run>:`.
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional


# A helper command that hangs must not hang CI with the server still running.
CALL_TIMEOUT = 120


def stop_on_sigterm() -> None:
    """A CI job that is cancelled sends SIGTERM: exit through the suite's `finally`
    blocks, which stop the server by pid and drop what the run made."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def run_id() -> str:
    """Eight hex digits naming one run's database, queues and Redis keys."""
    return secrets.token_hex(4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unlimited_tier(name: str) -> str:
    """A config file defining tier `name`, with limits no suite reaches."""
    return f"""
[tiers.{name}]
requests_per_minute = 1000000
analyze_per_minute = 1000000
concurrent_jobs = 100000
models_per_job = 10
daily_tokens = 1000000000000
concurrent_streams = 10000
"""


def wait_for(url: str, timeout: float = 60, alive: Optional[Callable[[], bool]] = None) -> None:
    """Until `url` answers 2xx; fails at once if `alive` says the server has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise SystemExit(f"ultra exited before it answered on {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"ultra did not answer on {url}")


def drop_database(name: str) -> None:
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-X", "-q", "-c",
         f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
        check=False, capture_output=True, timeout=CALL_TIMEOUT,
    )


def forget_topology(prefix: str) -> None:
    """Deletes the run's queues from the shared broker (its few exchanges hold nothing;
    rabbitmqctl of RabbitMQ 3.10 cannot delete an exchange)."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True,
                            timeout=CALL_TIMEOUT)
    for name in listed.stdout.split():
        if name.startswith(prefix):
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", name], capture_output=True, timeout=CALL_TIMEOUT)


def forget_redis(prefix: str, url: Optional[str] = None) -> None:
    """Deletes the run's Redis keys (cached API-key lookups live a day otherwise)."""
    cli = ["redis-cli", *(["-u", url] if url else [])]
    try:
        listed = subprocess.run([*cli, "--scan", "--pattern", f"{prefix}*"], capture_output=True, text=True,
                                timeout=CALL_TIMEOUT)
    except OSError:
        return  # no redis-cli: the keys expire on their own
    keys = listed.stdout.split()
    for start in range(0, len(keys), 500):
        subprocess.run([*cli, "del", *keys[start:start + 500]], capture_output=True, timeout=CALL_TIMEOUT)


class Ultra:
    """One `ultra all` and what it owns. Construct, `create_admin_key`, `start`; `stop`
    in a `finally`, and `forget` once the process is gone."""

    def __init__(self, binary: str, work: Path, *, run: str, database: str, tier: str,
                 mock_latency_ms: int = 20, extra_env: Optional[dict] = None, extra_config: str = "") -> None:
        self.binary = binary
        self.work = work
        self.run = run
        self.database = database
        self.tier = tier
        self.queue_prefix = f"k{run}."
        self.redis_prefix = f"ultra-k{run}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "ultra.log"
        config = work / "ultra.toml"
        config.write_text(unlimited_tier(tier) + extra_config)
        self.env = dict(
            os.environ,
            DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{database}",
            ULTRA_QUEUE_PREFIX=self.queue_prefix,
            ULTRA_REDIS_PREFIX=self.redis_prefix,
            ULTRA_CONFIG_FILE=str(config),
            ULTRA_LISTEN=f"127.0.0.1:{self.port}",
            ULTRA_WORKER_LISTEN=f"127.0.0.1:{free_port()}",
            ULTRA_MOCK_LATENCY_MS=str(mock_latency_ms),
            ULTRA_LOG_FORMAT="json",
        )
        self.env.update(extra_env or {})
        self.env.pop("ULTRA_ENV", None)
        self.process: Optional[subprocess.Popen] = None

    def admin(self, *args: str) -> str:
        """`ultra admin …` against the run's database; its standard output."""
        done = subprocess.run([self.binary, "admin", *args], env=self.env, capture_output=True, text=True,
                              timeout=CALL_TIMEOUT)
        if done.returncode != 0:
            raise SystemExit(f"`ultra admin {' '.join(args)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def create_admin_key(self, email: str, key_name: str) -> str:
        """An admin user in the run's tier, and an API key for it (the last line printed)."""
        self.admin("create-user", "--email", email, "--admin")
        self.admin("set-tier", "--email", email, "--tier", self.tier)
        return self.admin("create-api-key", "--email", email, "--name", key_name).strip().splitlines()[-1]

    def start(self) -> None:
        log = open(self.log_path, "w")
        try:
            self.process = subprocess.Popen([self.binary, "all"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()  # the child holds its own descriptor
        wait_for(f"{self.base}/health/live", alive=lambda: self.process.poll() is None)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, from the start of a line."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        if len(text) <= chars:
            return text
        tail = text[-chars:]
        return tail[tail.find("\n") + 1:] if "\n" in tail[:-1] else tail

    def stop(self) -> None:
        """Stops the process it started, by pid: SIGTERM, then SIGKILL after 30 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def forget(self) -> None:
        """Drops the run's database and deletes its queues and Redis keys."""
        drop_database(self.database)
        forget_topology(self.queue_prefix)
        forget_redis(f"{self.redis_prefix}:", self.env.get("REDIS_URL"))
