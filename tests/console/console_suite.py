"""The web console in a real browser: Debian's chromium, driven by Playwright.

Starts `ultra all` on free ports with a database, queue prefix and Redis prefix of its
own (tests/support/ultra_process.py) and mock models that stream their answers token
by token (one of them prefixes its answers with markup), then, in chromium
(`executable_path`, never a downloaded browser):

- registers through the console, and signs in with a password: the refresh token is
  an HttpOnly, SameSite=Strict cookie the page cannot read; access tokens live 3 s,
  and calls made at once after one expired share one refresh;
- submits a three-model `critique` job and sees three columns fill with streamed text,
  then the meta stage and a synthesis, each step's text equal to what the API stores;
- reloads mid-stream and sees the job resume with nothing lost or doubled;
- cancels a job, finds it in the history by status, and replays a job from there;
- shows markup in a prompt and in a model's answer as text (no element, no script);
- a second user cannot open the first user's job by its URL;
- the admin view, and a narrow screen;
- signs out: the session is revoked and the cookie cleared.

Screenshots of the main views go to docs/screenshots/ (shown in the README). Every
check runs even when an earlier one failed; one line each. Stops the browser and the
server by pid, drops the database, deletes the queues and Redis keys; exits non-zero
on any failure.

    ULTRA_BIN=target/debug/ultra bash tests/console/run.sh
"""

import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "support"))
from checks import Failed, expect, run_checks, wait_until  # noqa: E402  (tests/support)
from ultra_process import Ultra, run_id, stop_on_sigterm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
RUN = run_id()
# `ultra_contract_…` and `k<8 hex>.` so that .ci/run clears what an interrupted run leaves.
DATABASE = f"ultra_contract_console_{RUN}"
CHROMIUM = os.environ.get("ULTRA_CHROMIUM", "/usr/bin/chromium")
# Chromium as root, headless, with nothing reaching for the network on its own.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PATIENCE_MS = 60_000
# Short-lived access tokens: every check also exercises their refresh through the cookie.
ACCESS_TOKEN_TTL_SECS = 3
PASSWORD = "correct horse battery staple"
MARKUP = '<img src=x onerror="window.__xss=1"><script>window.__xss=1</script>'

# Mock models that stream a token every 50 ms, so a page sees text arrive; one of them
# starts every answer with markup.
MODELS = f"""
[providers.mock]
kind = "mock"
mock_latency_ms = 100
mock_tokens_per_second = 20

[providers.markup]
kind = "mock"
mock_latency_ms = 0
mock_prefix = '{MARKUP}'

[[models]]
id = "mock/alpha"
provider = "mock"
upstream = "alpha"

[[models]]
id = "mock/beta"
provider = "mock"
upstream = "beta"

[[models]]
id = "mock/gamma"
provider = "mock"
upstream = "gamma"

[[models]]
id = "mock/markup"
provider = "markup"
upstream = "markup"
"""


def say(message: str) -> None:
    print(f"[console] {message}", file=sys.stderr, flush=True)


def call(base: str, method: str, path: str, token: str = "", body=None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
        return json.loads(text) if text else {}


class Console:
    """What the checks share: the server, the browser, and the first user's session."""

    def __init__(self, ultra: Ultra, browser: Browser) -> None:
        self.ultra = ultra
        self.base = ultra.base
        self.browser = browser
        self.admin_key = ultra.create_admin_key("admin@example.com", "console")
        self.email = f"user-{RUN}@example.com"
        call(self.base, "POST", "/v1/auth/register", body={"email": self.email, "password": PASSWORD})
        ultra.admin("set-tier", "--email", self.email, "--tier", ultra.tier)
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list = []
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.jobs: dict = {}

    def token(self) -> str:
        """An access token of the first user's (for reading what the API stores)."""
        return call(self.base, "POST", "/v1/auth/login", body={"email": self.email, "password": PASSWORD})["access_token"]

    def stored_steps(self, job_id: str) -> dict:
        job = call(self.base, "GET", f"/v1/jobs/{job_id}", self.token())
        return {(s["stage"], s["model"]): s.get("output") or "" for s in job["steps"] if s["status"] == "succeeded"}

    def shown_steps(self, page: Page) -> dict:
        shown = page.eval_on_selector_all(
            "pre.text[data-stage]",
            "els => els.map(e => [e.dataset.stage, e.dataset.model, e.textContent])")
        return {(stage, model): text for stage, model, text in shown if text}

    def ask(self, page: Page, prompt: str, models: list, pattern: str) -> str:
        page.goto(f"{self.base}/#/ask")
        page.locator("#prompt").fill(prompt)
        for box in page.locator('input[name="model"]').all():
            box.set_checked(box.get_attribute("value") in models)
        page.select_option("#pattern", pattern)
        page.get_by_role("button", name="Ask").click()
        page.wait_for_url(re.compile(r".*#/jobs/[0-9a-f-]{36}$"), timeout=PATIENCE_MS)
        return page.url.rsplit("/", 1)[-1]

    def wait_status(self, page: Page, status: str) -> None:
        page.locator(f'h1 [data-status="{status}"]').wait_for(timeout=PATIENCE_MS)

    def evidence(self, name: str) -> str:
        """A screenshot of the main page as a check failed, kept for whoever reads the log."""
        path = Path(tempfile.gettempdir()) / "ultra-console-failures" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.page.screenshot(path=str(path), full_page=True)
        except Exception:  # noqa: BLE001  (evidence is best effort)
            return ""
        return f" (screenshot: {path})"

    def screenshot(self, page: Page, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


# The checks, in order: each returns its one line.


def register_through_the_console(c: Console) -> str:
    context = c.browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{c.base}/")
        email = f"new-{RUN}@example.com"
        page.locator("#email").fill(email)
        page.locator("#password").fill(PASSWORD)
        page.get_by_role("button", name="Register").click()
        page.locator("#who").filter(has_text=email).wait_for(timeout=PATIENCE_MS)
        return f"registered {email} and landed signed in on {page.url.split('#')[-1]}"
    finally:
        context.close()


def sign_in_with_a_password(c: Console) -> str:
    page = c.page
    page.goto(f"{c.base}/")
    c.screenshot(page, "sign-in")
    page.locator("#email").fill(c.email)
    page.locator("#password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#prompt").wait_for(timeout=PATIENCE_MS)
    cookies = {cookie["name"]: cookie for cookie in c.context.cookies()}
    session = cookies.get("ultra_refresh")
    expect(session, f"no session cookie: {list(cookies)}")
    expect(session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/v1/auth",
           f"the cookie is {session}")
    expect("ultra_refresh" not in page.evaluate("document.cookie"), "the page's scripts can read the refresh token")
    c.screenshot(page, "ask")
    return "signed in; ultra_refresh is HttpOnly, SameSite=Strict, Path=/v1/auth, unreadable by the page"


def an_expired_token_is_refreshed_once_for_parallel_calls(c: Console) -> str:
    page = c.page
    time.sleep(ACCESS_TOKEN_TTL_SECS + 1)
    # The Ask page makes two calls at once with the expired token: one refresh serves
    # both (a refresh token presented twice would revoke the login).
    page.goto(f"{c.base}/#/history")
    page.get_by_role("heading", name="History").wait_for(timeout=PATIENCE_MS)
    page.goto(f"{c.base}/#/ask")
    page.locator("#prompt").wait_for(timeout=PATIENCE_MS)
    time.sleep(ACCESS_TOKEN_TTL_SECS + 1)
    page.reload()
    page.locator("#prompt").wait_for(timeout=PATIENCE_MS)
    expect(page.locator("#who").text_content().startswith(c.email), "the session did not survive")
    return f"access tokens live {ACCESS_TOKEN_TTL_SECS} s: parallel calls after expiry and a reload kept the session"


def critique_job_streams_into_three_columns(c: Console) -> str:
    page = c.page
    models = ["mock/alpha", "mock/beta", "mock/gamma"]
    job = c.ask(page, "Why is the sky blue?", models, "critique")
    c.jobs["critique"] = job
    # Streamed: each initial column shows part of its answer before the whole of it.
    seen: dict = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lengths = page.evaluate(
            "() => Object.fromEntries([...document.querySelectorAll('pre.text[data-stage=initial]')]"
            ".map(e => [e.dataset.model, e.textContent.length]))")
        for model, length in lengths.items():
            seen.setdefault(model, set()).add(length)
        badge = page.locator("h1 [data-status]")
        if badge.count() and badge.first.get_attribute("data-status") in ("succeeded", "failed", "cancelled"):
            break
        if len(seen) == 3 and all(len(v) >= 3 for v in seen.values()):
            c.screenshot(page, "watch-streaming")
            break
        time.sleep(0.03)
    c.wait_status(page, "succeeded")
    c.screenshot(page, "watch")
    shown, stored = c.shown_steps(page), c.stored_steps(job)
    expect(len(page.locator("article.column[data-model]").all()) == 3, "not three columns")
    expect({stage for stage, _ in stored} == {"initial", "meta", "synthesis"}, f"stages stored: {sorted(stored)}")
    expect(shown == stored, f"the page shows {shown!r:.600}, the API stores {stored!r:.600}")
    partial = {model: sorted(n for n in lengths if 0 < n < len(stored[("initial", model)]))
               for model, lengths in seen.items()}
    expect(len(partial) == 3 and all(partial.values()), f"a column did not stream (lengths seen: {partial})")
    return (f"job {job}: three columns streamed ({', '.join(f'{m}: {len(v)} partial lengths' for m, v in partial.items())}),"
            f" meta under each, a synthesis; {len(stored)} steps shown exactly as stored")


def reload_mid_stream_resumes(c: Console) -> str:
    page = c.page
    job = c.ask(page, "Explain queues in one paragraph.", ["mock/alpha", "mock/beta", "mock/gamma"], "direct")
    wait_until("text to stream", lambda: page.evaluate(
        "() => [...document.querySelectorAll('pre.text[data-stage=initial]')].some(e => e.textContent.length > 10)"))
    before = c.shown_steps(page)
    page.reload()
    c.wait_status(page, "succeeded")
    shown, stored = c.shown_steps(page), c.stored_steps(job)
    expect(shown == stored, f"after a reload the page shows {shown!r:.600}, the API stores {stored!r:.600}")
    expect(all(stored[key].startswith(text) for key, text in before.items()),
           "the text before the reload was not the start of the answer")
    return f"reloaded with {sum(len(t) for t in before.values())} characters shown; resumed to {len(stored)} complete steps"


def cancel_a_job(c: Console) -> str:
    page = c.page
    job = c.ask(page, "A long question: " + "why " * 40, ["mock/alpha", "mock/beta", "mock/gamma"], "critique")
    c.jobs["cancelled"] = job
    page.get_by_role("button", name="Cancel").click()
    c.wait_status(page, "cancelled")
    expect(not page.get_by_role("button", name="Cancel").is_visible(), "Cancel still offered for an ended job")
    return f"job {job} cancelled from its page"


def history_filters_and_replays(c: Console) -> str:
    page = c.page
    page.goto(f"{c.base}/#/history")
    page.get_by_role("heading", name="History").wait_for()
    page.locator("tbody tr").first.wait_for()
    c.screenshot(page, "history")
    page.select_option("#status-filter", "cancelled")
    wait_until("the filter", lambda: page.locator("tbody tr").count() == 1
               and page.locator("tbody tr [data-status]").first.get_attribute("data-status") == "cancelled")
    page.select_option("#status-filter", "succeeded")
    page.locator(f'a[href="#/jobs/{c.jobs["critique"]}"]').click()
    c.wait_status(page, "succeeded")
    shown, stored = c.shown_steps(page), c.stored_steps(c.jobs["critique"])
    expect(shown == stored, "the replayed job differs from what the API stores")
    return f"history lists the jobs, filters to the cancelled one, and replays job {c.jobs['critique']}"


def markup_shows_as_text(c: Console) -> str:
    page = c.page
    job = c.ask(page, f"Render this: {MARKUP}", ["mock/markup"], "direct")
    c.wait_status(page, "succeeded")
    answer = page.locator('pre.text[data-model="mock/markup"]').first.text_content() or ""
    expect(answer.startswith(MARKUP), f"the answer shows {answer[:120]!r}")
    expect(MARKUP in (page.locator("#job-prompt").text_content() or ""), "the prompt is not shown as written")
    expect(page.evaluate("window.__xss") is None, "markup ran as script")
    expect(page.locator("#main img").count() == 0 and page.locator("#main script").count() == 0,
           "markup became elements")
    return f"job {job}: markup in the prompt and in the answer shown as text; nothing ran"


def another_user_cannot_open_the_job(c: Console) -> str:
    other_key = c.ultra.create_admin_key("other@example.com", "other")
    context = c.browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{c.base}/#/jobs/{c.jobs['critique']}")
        page.locator("#api-key").fill(other_key)
        page.get_by_role("button", name="Use key").click()
        page.locator("#main .error").filter(has_text="not found").wait_for(timeout=PATIENCE_MS)
        expect(page.locator("pre.text").count() == 0, "another user's job was shown")
        return "a second user opening the first user's job URL gets 'job not found', nothing of it"
    finally:
        context.close()


def admin_and_a_narrow_screen(c: Console) -> str:
    context = c.browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        page.goto(f"{c.base}/#/admin")
        page.locator("#api-key").fill(c.admin_key)
        page.get_by_role("button", name="Use key").click()
        page.get_by_role("heading", name="Users").wait_for(timeout=PATIENCE_MS)
        expect(page.locator("td", has_text=c.email).count() == 1, "the users list lacks the first user")
        width = page.evaluate("document.documentElement.scrollWidth")
        expect(width <= 400, f"the page is {width} px wide on a 390 px screen")
        c.screenshot(page, "admin-narrow")
        return f"admin view lists queues, dead letters and users; fits a 390 px screen ({width} px)"
    finally:
        context.close()


def sign_out_revokes(c: Console) -> str:
    page = c.page
    cookie = next(x for x in c.context.cookies() if x["name"] == "ultra_refresh")["value"]
    page.get_by_role("button", name="Sign out").click()
    page.locator("#email").wait_for(timeout=PATIENCE_MS)
    expect(not any(x["name"] == "ultra_refresh" for x in c.context.cookies()), "the cookie was not cleared")
    page.reload()
    page.locator("#email").wait_for(timeout=PATIENCE_MS)
    try:
        call(c.base, "POST", "/v1/auth/refresh", body={"refresh_token": cookie})
    except urllib.error.HTTPError as err:
        expect(err.code == 401, f"the old refresh token got {err.code}")
    else:
        raise Failed("the signed-out refresh token still works")
    return "signed out: cookie cleared, its refresh token revoked (401), a reload shows the sign-in form"


CHECKS = [register_through_the_console, sign_in_with_a_password, an_expired_token_is_refreshed_once_for_parallel_calls,
          critique_job_streams_into_three_columns,
          reload_mid_stream_resumes, cancel_a_job, history_filters_and_replays, markup_shows_as_text,
          another_user_cannot_open_the_job, admin_and_a_narrow_screen, sign_out_revokes]


def main() -> int:
    stop_on_sigterm()
    binary = os.environ.get("ULTRA_BIN", "target/debug/ultra")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="ultra-console-") as work:
        ultra = Ultra(binary, Path(work), run=RUN, database=DATABASE, tier="console", extra_config=MODELS,
                      extra_env={"ULTRA_ACCESS_TOKEN_TTL_SECS": str(ACCESS_TOKEN_TTL_SECS)})
        try:
            ultra.start()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    c = Console(ultra, browser)
                    say(f"ultra all on {ultra.base}; {CHROMIUM} {browser.version}")
                    failures = run_checks(CHECKS, c, say, c.evidence)
                    if c.errors:
                        failures += 1
                        say(f"FAIL the page threw: {c.errors}")
                finally:
                    browser.close()
            if failures:
                say(f"server log (end):\n{ultra.log_tail()}")
        finally:
            ultra.stop()
            ultra.forget()
    say(f"{len(CHECKS) - failures} of {len(CHECKS)} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
