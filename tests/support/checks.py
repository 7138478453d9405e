"""What the Python suites' checks share: a failed expectation, waiting for one, and
running a list of checks so that each runs (and says one line) whatever the others did.
Standard library only."""

import time
import traceback
from typing import Callable, Iterable


class Failed(Exception):
    """A check's expectation, not met."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


def wait_until(what: str, ready: Callable[[], object], timeout: float = 30.0, every: float = 0.05):
    """`ready()`'s first truthy value, or Failed after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out waiting for {what}")
        time.sleep(every)


def run_checks(checks: Iterable[Callable], subject, say: Callable[[str], None],
               evidence: Callable[[str], str] = lambda name: "") -> int:
    """Runs each `check(subject)`, saying `ok` with its line or `FAIL` with why (and
    `evidence(name)`, such as a screenshot's path); the number that failed."""
    failures = 0
    for check in checks:
        try:
            say(f"ok   {check.__name__}: {check(subject)}")
        except Failed as err:
            failures += 1
            say(f"FAIL {check.__name__}: {err}{evidence(check.__name__)}")
        except Exception:  # noqa: BLE001  (a crash is a failure too, with its trace)
            failures += 1
            say(f"FAIL {check.__name__}: {traceback.format_exc()}{evidence(check.__name__)}")
    return failures
