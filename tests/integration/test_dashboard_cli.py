"""The dashboard from the command line: ``dspex-bridge dashboard`` and ``serve --dashboard-port``.

Real processes only: a ``dspex-bridge serve`` subprocess, a ``dspex-bridge dashboard`` subprocess,
and plain HTTP requests to the page and its JSON API.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dspex_dspy import Context, Variables

pytestmark = pytest.mark.integration

DASHBOARD_LINE = re.compile(r"dashboard on (http://\S+/)")
DEADLINE = 60.0  # generous bound on waits; never an assertion on speed


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=DEADLINE) as reply:
        return reply.headers.get("content-type", ""), reply.read().decode()


def _dashboard_url(lines: list[str], proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for line in list(lines):
            match = DASHBOARD_LINE.search(line)
            if match:
                return match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError("no dashboard URL was printed; output:\n" + "".join(lines))


@pytest.fixture
def session(spawn_bridge: Callable[..., Any]) -> Iterator[tuple[Any, Context]]:
    bridge = spawn_bridge("--dashboard-port", "0")
    ctx = Context(backend="bridged", bridge=bridge.address)
    Variables.defvariable(ctx, "temperature", "float", 0.5, constraints={"min": 0.0, "max": 2.0})
    yield bridge, ctx
    ctx.stop()


def test_serve_serves_the_dashboard_beside_the_bridge(session: tuple[Any, Context]) -> None:
    bridge, ctx = session
    url = _dashboard_url(bridge.output, bridge.proc)
    assert url.startswith("http://127.0.0.1:")
    kind, page = _get(url)
    assert kind.startswith("text/html") and "<html" in page.lower()
    _, body = _get(url + "api/sessions")
    assert ctx.id in [row["id"] for row in json.loads(body)["sessions"]]
    _, body = _get(url + f"api/sessions/{ctx.id}")
    variables = {row["name"]: row for row in json.loads(body)["variables"]}
    assert variables["temperature"]["value"] == 0.5


def test_the_dashboard_command_shows_a_running_bridge(session: tuple[Any, Context], tmp_path: Any) -> None:
    bridge, ctx = session
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dspex_dspy", "dashboard", "--bridge", bridge.address, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        lines.append(proc.stdout.readline())
        url = _dashboard_url(lines, proc)
        assert bridge.address in lines[0]
        _, body = _get(url + "api/sessions")
        assert ctx.id in [row["id"] for row in json.loads(body)["sessions"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


def test_an_unreadable_ca_is_named_and_nothing_starts(tmp_path: Any) -> None:
    missing = tmp_path / "missing-ca.pem"
    done = subprocess.run(
        [sys.executable, "-m", "dspex_dspy", "dashboard", "--port", "0", "--ca", str(missing)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 1
    assert str(missing) in done.stderr and "dashboard on" not in done.stdout
