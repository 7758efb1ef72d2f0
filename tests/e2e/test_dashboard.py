"""End-to-end tests of the dashboard in a real headless Chromium.

Everything is real: a ``dspex-bridge serve`` subprocess, the dashboard on uvicorn, worker
subprocesses that write and watch through their own gRPC clients, and Debian's Chromium driven by
Playwright (no browser download: ``executable_path=/usr/bin/chromium``). Screenshots of the main
views are saved to a temporary folder whose path the tests print.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from dspex_dspy import Context, Variables
from dspex_dspy.admin import list_sessions, report_calls
from dspex_dspy.dashboard import DashboardServer
from dspex_dspy.errors import VariableLockedError
from dspex_dspy.remote import RemoteStore, open_channel
from dspex_dspy.tokens import mint_token

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
WORKER = Path(__file__).resolve().parents[1] / "integration" / "workers" / "worker.py"
SHOTS = Path(tempfile.mkdtemp(prefix="dspex-dashboard-shots-"))
# A hang guard, not a latency bound: every `expect` and every page action waits on its condition
# for up to this long (CI is a slow, loaded machine). How fast live updates arrive is printed only.
HANG_GUARD_MS = 60_000
HANG_GUARD_S = HANG_GUARD_MS / 1000


@pytest.fixture(scope="module", autouse=True)
def _patient_expect() -> Iterator[None]:
    expect.set_options(timeout=HANG_GUARD_MS)
    yield
    expect.set_options(timeout=None)  # back to Playwright's default for anything after this module


def _patient(context: BrowserContext) -> BrowserContext:
    context.set_default_timeout(HANG_GUARD_MS)
    context.set_default_navigation_timeout(HANG_GUARD_MS)
    return context


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()
    print(f"\ndashboard screenshots: {SHOTS}")


@pytest.fixture(scope="module")
def bridge(spawn_bridge: Callable[..., Any]) -> Iterator[Any]:
    process = spawn_bridge()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def dashboard(bridge: Any) -> Iterator[DashboardServer]:
    server = DashboardServer(bridge.address, port=0).start(timeout=HANG_GUARD_S)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = _patient(browser.new_context(viewport={"width": 1280, "height": 800}))
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def session(bridge: Any) -> Iterator[Context]:
    ctx = Context(backend="bridged", bridge=bridge.address)
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(ctx, "max_tokens", "integer", 256, constraints={"min": 1, "max": 4096})
    Variables.defvariable(ctx, "style", "choice", "concise", constraints={"choices": ["concise", "verbose"]})
    yield ctx
    ctx.stop()


def _worker(bridge: Any, session_id: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args, "--address", bridge.address, "--session", session_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _row(page: Page, name: str) -> Any:
    return page.locator(f'tr[data-variable="{name}"]')


def _watchers(address: str, session_id: str) -> int:
    """Watch streams the bridge has registered on the session (the dashboard's live feed is one)."""
    channel = open_channel(address)
    try:
        (summary,) = [s for s in list_sessions(channel, pattern=session_id, timeout=HANG_GUARD_S) if s.id == session_id]
    finally:
        channel.close()
    return summary.watchers


def _open_session(page: Page, dashboard: DashboardServer, session: Context) -> None:
    """Open a session's view and wait until its live feed is registered at the bridge.

    The page shows "live" once the event stream answers, which can be before the dashboard's watch
    of the session reaches the bridge; a write in between would not be pushed. Waiting for the
    bridge to count one more watcher of the session makes every later write reach the page.
    """
    assert session.bridge_address is not None
    before = _watchers(session.bridge_address, session.id)
    page.goto(dashboard.url)
    link = page.locator(f'#session-list a[data-session="{session.id}"]')
    expect(link).to_be_visible()
    link.click()
    expect(_row(page, "temperature")).to_be_visible()
    expect(page.locator("#live")).to_have_text("live")
    deadline = time.monotonic() + HANG_GUARD_S
    while _watchers(session.bridge_address, session.id) <= before:
        assert time.monotonic() < deadline, f"the page's watch of {session.id} never reached the bridge"
        time.sleep(0.02)


def test_the_page_lists_a_session_and_its_variables(page: Page, dashboard: DashboardServer, session: Context) -> None:
    page.goto(dashboard.url)
    expect(page.locator(f'#session-list a[data-session="{session.id}"]')).to_contain_text("3 variables")
    page.fill("#session-search", session.id[-8:])
    expect(page.locator("#session-list a")).to_have_count(1)
    page.fill("#session-search", "no-such-session-anywhere")
    expect(page.locator("#session-list")).to_contain_text("No session matches.")
    page.fill("#session-search", "")
    _open_session(page, dashboard, session)
    row = _row(page, "temperature")
    expect(row.locator("[data-role=value]")).to_have_text("0.7")
    expect(row).to_contain_text("min: 0")
    expect(row).to_contain_text("max: 2")
    expect(row.locator("[data-role=version]")).to_have_text("1")
    expect(_row(page, "style")).to_contain_text("choices: concise | verbose")
    page.screenshot(path=str(SHOTS / "session.png"), full_page=True)
    # `make dashboard-screenshot` refreshes the picture the docs show from this view.
    target = os.environ.get("DSPEX_DASHBOARD_SCREENSHOT")
    if target:
        shutil.copyfile(SHOTS / "session.png", target)


def test_a_write_from_a_worker_process_appears_live_without_a_reload(
    page: Page, dashboard: DashboardServer, bridge: Any, session: Context
) -> None:
    _open_session(page, dashboard, session)
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    worker = _worker(bridge, session.id, "write", "temperature=1.5")
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"temperature": 2}
    acknowledged = time.monotonic()
    row = _row(page, "temperature")
    expect(row.locator("[data-role=value]")).to_have_text("1.5")
    print(f"worker write seen on the page after {1000 * (time.monotonic() - acknowledged):.0f} ms")
    expect(row.locator("[data-role=version]")).to_have_text("2")
    expect(row.locator("[data-role=changed-by]")).to_have_text("worker")
    assert navigations == [], f"the page reloaded: {navigations}"


def test_an_out_of_range_edit_shows_the_rule_and_changes_nothing(
    page: Page, dashboard: DashboardServer, bridge: Any, session: Context
) -> None:
    _open_session(page, dashboard, session)
    row = _row(page, "temperature")
    row.locator("[data-role=value-input]").fill("5.0")
    row.locator("[data-role=save]").click()
    error = row.locator("[data-role=field-error]")
    expect(error).to_contain_text("above the maximum 2.0")
    expect(error).to_contain_text("rule max")
    page.screenshot(path=str(SHOTS / "validation-error.png"), full_page=True)
    row.locator("[data-role=value-input]").fill("warm")
    row.locator("[data-role=save]").click()
    expect(error).to_contain_text("rule type")
    with RemoteStore.connect(bridge.address) as store:
        stored = store.get_variable(session.id, "temperature")
    assert (stored.value, stored.version) == (0.7, 1)
    expect(row.locator("[data-role=version]")).to_have_text("1")


def test_an_edit_in_range_reaches_a_watching_worker_process(
    page: Page, dashboard: DashboardServer, bridge: Any, session: Context
) -> None:
    watcher = _worker(bridge, session.id, "watch", "max_tokens", "--until", "1024")
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "ready"
        page.goto(dashboard.url)
        expect(page.locator(f'#session-list a[data-session="{session.id}"]')).to_contain_text("1 watching")
        _open_session(page, dashboard, session)
        row = _row(page, "max_tokens")
        row.locator("[data-role=value-input]").fill("1024")
        row.locator("[data-role=save]").click()
        expect(row.locator("[data-role=version]")).to_have_text("2")
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    observed = json.loads(out.strip().splitlines()[-1])
    assert observed[0] == [1, 256]
    assert observed[-1] == [2, 1024]
    newest = Variables.history(session, "max_tokens", limit=1)[0]
    assert (newest.version, newest.value, newest.metadata.get("via")) == (2, 1024, "dashboard")


def test_a_rollback_restores_an_old_value_as_a_new_version(
    page: Page, dashboard: DashboardServer, bridge: Any, session: Context
) -> None:
    Variables.set(session, "temperature", 1.1)
    Variables.set(session, "temperature", 1.9)
    _open_session(page, dashboard, session)
    _row(page, "temperature").get_by_role("link", name="History").click()
    history = page.locator("#history tbody tr")
    expect(history).to_have_count(3)
    expect(page.locator("#chart path.step")).to_have_count(1)
    page.screenshot(path=str(SHOTS / "history.png"), full_page=True)
    page.get_by_role("button", name="Roll back to v1").click()
    expect(history).to_have_count(4)
    expect(page.locator('#history tr[data-version="4"]')).to_contain_text("0.7")
    assert Variables.get_variable(session, "temperature").version == 4
    assert Variables.get(session, "temperature") == 0.7


def test_the_page_is_usable_on_a_narrow_window_and_by_keyboard(
    browser: Browser, dashboard: DashboardServer, bridge: Any, session: Context
) -> None:
    context = _patient(browser.new_context(viewport={"width": 420, "height": 800}, color_scheme="dark"))
    page = context.new_page()
    try:
        page.goto(dashboard.url)
        expect(page.locator(f'#session-list a[data-session="{session.id}"]')).to_be_visible()
        search = page.locator("#session-search")
        search.focus()
        page.keyboard.press("Tab")
        focused = page.evaluate("document.activeElement && document.activeElement.dataset.session")
        assert focused, "Tab from the search box should reach a session link"
        page.keyboard.press("Enter")
        expect(page.locator("#session-view")).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 420, f"the page overflows a narrow window: {width}px wide"
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background != "rgb(255, 255, 255)", "dark mode should not paint a white page"
        page.screenshot(path=str(SHOTS / "narrow-dark.png"), full_page=True)
    finally:
        context.close()


def test_an_optimization_lease_shows_and_can_be_force_stopped(
    page: Page, dashboard: DashboardServer, bridge: Any, session: Context
) -> None:
    Variables.start_optimization(session, ["temperature"], "tuner-e2e", ttl=600)
    with pytest.raises(VariableLockedError):
        Variables.set(session, "temperature", 1.0)
    _open_session(page, dashboard, session)
    lease = _row(page, "temperature").locator("[data-role=lease]")
    expect(lease).to_contain_text("held by tuner-e2e")
    page.screenshot(path=str(SHOTS / "lease.png"), full_page=True)
    lease.get_by_role("button", name="Stop lease").click()
    expect(lease).to_have_text("—")
    assert Variables.get_variable(session, "temperature").optimization_status is None
    assert Variables.set(session, "temperature", 1.0) == 2


SECRET = "e2e-dashboard-secret-" + "x" * 32


@pytest.fixture(scope="module")
def auth_bridge(spawn_bridge: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    secret_file = tmp_path_factory.mktemp("auth") / "secret"
    secret_file.write_text(SECRET)
    process = spawn_bridge("--auth-secret-file", str(secret_file))
    yield process
    process.stop()


def test_with_auth_a_read_only_token_sees_values_but_cannot_edit(browser: Browser, auth_bridge: Any) -> None:
    ctx = Context(backend="bridged", bridge=auth_bridge.address, auth_secret=SECRET)
    try:
        Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
        reader = mint_token(SECRET, sub="viewer", sessions=[ctx.id], perms="read,watch", ttl=600)
        dashboard = DashboardServer(auth_bridge.address, port=0).start(timeout=HANG_GUARD_S)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(HANG_GUARD_MS)
            page.set_default_navigation_timeout(HANG_GUARD_MS)
            try:
                page.goto(dashboard.url)
                dialog = page.locator("#token-dialog")
                expect(dialog).to_be_visible()
                page.fill("#token-input", reader)
                page.click("#token-save")
                expect(dialog).to_be_hidden()
                expect(page.locator("#who")).to_contain_text("viewer")
                page.goto(f"{dashboard.url}#/s/{ctx.id}")
                row = _row(page, "temperature")
                expect(row.locator("[data-role=value]")).to_have_text("0.7")
                expect(row.locator("[data-role=value-input]")).to_be_disabled()
                expect(row.locator("[data-role=save]")).to_be_disabled()
                page.screenshot(path=str(SHOTS / "read-only.png"), full_page=True)
                # The page greys the control out; the bridge refuses the write all the same.
                refused = page.evaluate(
                    """async ([sid, token]) => {
                        const r = await fetch(`/api/sessions/${sid}/variables/temperature`, {
                            method: "POST",
                            headers: {"Content-Type": "application/json", "Authorization": `Bearer ${token}`},
                            body: JSON.stringify({value: "1.5"}),
                        });
                        return [r.status, (await r.json()).error.kind];
                    }""",
                    [ctx.id, reader],
                )
                assert refused == [403, "PermissionDeniedError"]
                anonymous = page.evaluate("async () => (await fetch('/api/sessions')).status")
                assert anonymous == 401
            finally:
                page.close()
        finally:
            dashboard.stop()
        assert (Variables.get(ctx, "temperature"), Variables.get_variable(ctx, "temperature").version) == (0.7, 1)
    finally:
        ctx.stop()


REPORTING_WORKER = Path(__file__).resolve().parents[1] / "integration" / "workers" / "reporting.py"


def test_the_session_view_shows_the_module_calls_workers_report(
    page: Page, dashboard: DashboardServer, bridge: Any, session: Context
) -> None:
    Variables.defvariable(session, "system_prompt", "string", "Be terse.", metadata={"secret": "true"})
    Variables.set(session, "temperature", 0.4)  # version 2
    env = {**os.environ, "DSPEX_REPORT_CALLS": "1"}
    worker = subprocess.run(
        [sys.executable, str(REPORTING_WORKER), "--address", bridge.address, "--session", session.id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    _open_session(page, dashboard, session)
    calls = page.locator("#calls tr[data-role=call]")
    expect(calls).to_have_count(1)
    expect(calls.first).to_contain_text("VariableAwarePredict")
    expect(calls.first.locator('[data-attribute="temperature"]')).to_have_text("temperature v2 = 0.4")
    expect(calls.first.locator('[data-attribute="instructions"]')).to_have_text("system_prompt v1 = <secret>")
    expect(page.locator("#calls")).not_to_contain_text("Be terse.")
    page.screenshot(path=str(SHOTS / "calls.png"), full_page=True)

    # A report whose text looks like markup shows as text; a live change of the session refreshes the panel.
    hostile = "<img src=x onerror=\"document.body.dataset.owned='1'\">"
    channel = open_channel(bridge.address)
    try:
        record = {
            "module": hostile,
            "at": time.time(),
            "bindings": {"temperature": {"variable": "temperature", "version": 3}},
        }
        assert report_calls(channel, session.id, [record]) == 1
    finally:
        channel.close()
    changed = time.monotonic()
    Variables.set(session, "temperature", 0.5)
    expect(calls).to_have_count(2)
    print(f"calls panel refreshed after {1000 * (time.monotonic() - changed):.0f} ms")
    expect(calls.first.locator("td").nth(1)).to_have_text(hostile)
    expect(calls.first.locator('[data-attribute="temperature"]')).to_have_text("temperature v3")
    assert page.locator("#calls img").count() == 0
    assert page.evaluate("document.body.dataset.owned") is None
