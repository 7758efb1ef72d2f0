"""Operating a bridge from a shell, and watching it run: the operator CLI, /metrics and the logs.

Every CLI subcommand runs as a real ``python -m dspex_dspy`` subprocess against a real
``dspex-bridge serve`` subprocess, in text and in ``--json``, errors included (each with its exit
code). Metrics are scraped over HTTP from the server's ``--metrics-port``; log records are read
from the server's JSON log lines and from the store's records.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dspex_dspy import Context, SessionContext, Variables
from dspex_dspy.commands import EXIT_CODES
from dspex_dspy.store import SessionStore

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.pop("DSPEX_BRIDGE_ADDRESS", None)
    return env


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dspex_dspy ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "dspex_dspy", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=_env(),
        cwd=REPO_ROOT,
    )


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def bridge(spawn_bridge: Callable[..., Any]) -> Iterator[Any]:
    process = spawn_bridge("--metrics-port", "0", "--log-level", "DEBUG", "--log-format", "json")
    yield process
    process.stop()


@pytest.fixture
def session(bridge: Any) -> Iterator[Context]:
    with Context(bridge=bridge.address, backend="bridged") as ctx:
        Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
        Variables.defvariable(ctx, "model", "string", "small", metadata={"owner": "ops"})
        Variables.defvariable(ctx, "verbose", "boolean", False)
        Variables.set(ctx, "temperature", 0.9, metadata={"reason": "warmer"})
        yield ctx


def at(bridge: Any) -> list[str]:
    return ["--bridge", bridge.address]


# ------------------------------------------------------------------ every subcommand, text and JSON


def test_sessions(bridge: Any, session: Context) -> None:
    text = cli("sessions", *at(bridge))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].split() == ["session", "variables", "created", "expires", "in"]
    line = next(line for line in text.stdout.splitlines() if line.startswith(session.id))
    assert line.split()[1] == "3"
    data = json.loads(cli("sessions", *at(bridge), "--json", "--pattern", session.id).stdout)
    assert [(s["id"], s["variables"]) for s in data] == [(session.id, 3)]
    assert data[0]["expires_in"] > 0 and data[0]["created_at"].endswith("+00:00")
    assert json.loads(cli("sessions", *at(bridge), "--json", "--pattern", "no-such-*").stdout) == []


def test_list(bridge: Any, session: Context) -> None:
    text = cli("list", session.id, *at(bridge))
    assert text.returncode == 0, text.stderr
    rows = [line.split() for line in text.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("temperature", "float", "0.9", "2"),
        ("model", "string", '"small"', "1"),
        ("verbose", "boolean", "false", "1"),
    ]
    data = json.loads(cli("list", session.id, *at(bridge), "--json").stdout)
    assert [(v["name"], v["value"], v["version"]) for v in data] == [
        ("temperature", 0.9, 2),
        ("model", "small", 1),
        ("verbose", False, 1),
    ]
    assert data[1]["metadata"]["owner"] == "ops"
    assert data[0]["metadata"]["reason"] == "warmer"  # the metadata of the write that made version 2


def test_get(bridge: Any, session: Context) -> None:
    assert cli("get", session.id, "temperature", *at(bridge)).stdout == "0.9\n"
    assert cli("get", session.id, "model", *at(bridge)).stdout == "small\n"
    data = json.loads(cli("get", session.id, "verbose", *at(bridge), "--json").stdout)
    assert (data["name"], data["type"], data["value"], data["version"]) == ("verbose", "boolean", False, 1)


def test_set(bridge: Any, session: Context) -> None:
    text = cli("set", session.id, "temperature", "1.5", *at(bridge), "--meta", "who=alice")
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == "temperature = 1.5 (version 3)"
    assert Variables.get(session, "temperature") == 1.5
    assert Variables.history(session, "temperature", limit=1)[0].metadata == {"who": "alice"}
    data = json.loads(cli("set", session.id, "verbose", "true", *at(bridge), "--json").stdout)
    assert (data["value"], data["version"]) == (True, 2)
    data = json.loads(cli("set", session.id, "model", "large", *at(bridge), "--json", "--expected-version", "1").stdout)
    assert (data["value"], data["version"]) == ("large", 2)


def test_history(bridge: Any, session: Context) -> None:
    text = cli("history", session.id, "temperature", *at(bridge))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["version", "value", "at", "by", "metadata"]
    assert lines[1].split()[:2] == ["2", "0.9"] and lines[1].endswith("reason=warmer")
    assert lines[2].split()[:2] == ["1", "0.7"]
    data = json.loads(cli("history", session.id, "temperature", *at(bridge), "--json", "--limit", "1").stdout)
    assert [(e["name"], e["version"], e["value"], e["metadata"]) for e in data] == [
        ("temperature", 2, 0.9, {"reason": "warmer"})
    ]


def test_history_of_a_secret_variable_hides_its_values(bridge: Any, session: Context) -> None:
    Variables.defvariable(session, "api_key", "string", "sk-first-0001", metadata={"secret": "true"})
    Variables.set(session, "api_key", "sk-second-0002")
    text = cli("history", session.id, "api_key", *at(bridge))
    assert text.returncode == 0, text.stderr
    assert "sk-" not in text.stdout
    assert [line.split()[:2] for line in text.stdout.splitlines()[1:]] == [["2", "<secret>"], ["1", "<secret>"]]
    data = json.loads(cli("history", session.id, "api_key", *at(bridge), "--json").stdout)
    assert [(e["version"], e["value"]) for e in data] == [(2, "<secret>"), (1, "<secret>")]


def test_rollback(bridge: Any, session: Context) -> None:
    text = cli("rollback", session.id, "temperature", "1", *at(bridge))
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == "temperature = 0.7 (version 3, rolled back to 1)"
    data = json.loads(cli("rollback", session.id, "temperature", "2", *at(bridge), "--json").stdout)
    assert (data["value"], data["version"]) == (0.9, 4)
    assert Variables.history(session, "temperature", limit=1)[0].metadata == {"rolled_back_to": "2"}


def _watch_two(bridge: Any, session: Context, name: str, value: Any, as_json: bool) -> tuple[str, str]:
    """Run ``dspex-bridge watch`` on one variable for 2 events: its initial value, then ``value``."""
    args = ["watch", session.id, name, *at(bridge), "--count", "2"] + (["--json"] if as_json else [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "dspex_dspy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the initial value: the watch is registered from here on
        Variables.set(session, name, value, metadata={"by": "test"})
        second = proc.stdout.readline()
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    return first, second


@pytest.mark.parametrize("as_json", [False, True])
def test_watch(bridge: Any, session: Context, as_json: bool) -> None:
    first, second = _watch_two(bridge, session, "temperature", 1.1, as_json)
    if as_json:
        events = [json.loads(first), json.loads(second)]
        assert [(e["version"], e["value"], e["update_type"]) for e in events] == [
            (2, 0.9, "initial_value"),
            (3, 1.1, "value_change"),
        ]
        assert events[1]["metadata"] == {"by": "test"}
    else:
        assert "temperature v2 = 0.9  (initial_value" in first
        assert "temperature v3 = 1.1  (value_change by orchestrator) [by=test]" in second


@pytest.mark.parametrize("as_json", [False, True])
def test_watching_a_secret_variable_never_prints_its_values(bridge: Any, session: Context, as_json: bool) -> None:
    Variables.defvariable(session, "api_key", "string", "sk-first-0001", metadata={"secret": "true"})
    first, second = _watch_two(bridge, session, "api_key", "sk-second-0002", as_json)
    assert "sk-" not in first + second
    if as_json:
        assert [json.loads(line)["value"] for line in (first, second)] == ["<secret>", "<secret>"]
    else:
        assert "api_key v1 = <secret>" in first and "api_key v2 = <secret>" in second


# ------------------------------------------------------------------ errors and exit codes


@pytest.mark.parametrize("as_json", [False, True])
def test_unknown_session_and_variable_exit_not_found(bridge: Any, session: Context, as_json: bool) -> None:
    extra = ["--json"] if as_json else []
    for args in (
        ["list", "no-such-session"],
        ["get", "no-such-session", "temperature"],
        ["get", session.id, "ghost"],
        ["history", session.id, "ghost"],
        ["watch", "no-such-session"],
    ):
        result = cli(*args, *at(bridge), *extra)
        assert result.returncode == EXIT_CODES["not_found"], (args, result.stdout, result.stderr)
        assert "not found" in result.stderr.lower()
        if as_json:
            error = json.loads(result.stdout)["error"]
            assert error["type"] in ("SessionNotFoundError", "VariableNotFoundError")
            assert error["exit_code"] == EXIT_CODES["not_found"]


@pytest.mark.parametrize("as_json", [False, True])
def test_invalid_values_exit_invalid_and_change_nothing(bridge: Any, session: Context, as_json: bool) -> None:
    extra = ["--json"] if as_json else []
    before = Variables.get_variable(session, "temperature")
    for value, words in (("5", "maximum"), ("warm", "not a valid float")):
        result = cli("set", session.id, "temperature", value, *at(bridge), *extra)
        assert result.returncode == EXIT_CODES["invalid"], result.stderr
        assert words in result.stderr
        if as_json:
            assert json.loads(result.stdout)["error"]["type"] == "ValidationError"
    result = cli("set", session.id, "verbose", "maybe", *at(bridge), *extra)
    assert result.returncode == EXIT_CODES["invalid"]
    result = cli("rollback", session.id, "temperature", "99", *at(bridge), *extra)
    assert result.returncode == EXIT_CODES["invalid"]
    assert "not in the remembered history" in result.stderr
    after = Variables.get_variable(session, "temperature")
    assert (after.value, after.version) == (before.value, before.version)


def test_version_conflict_exits_conflict(bridge: Any, session: Context) -> None:
    result = cli("set", session.id, "temperature", "1.0", *at(bridge), "--expected-version", "1")
    assert result.returncode == EXIT_CODES["conflict"]
    assert "expected version 1" in result.stderr
    assert Variables.get(session, "temperature") == 0.9


def test_unreachable_bridge_exits_unavailable() -> None:
    result = cli("sessions", "--bridge", "127.0.0.1:1", "--timeout", "0.5")
    assert result.returncode == EXIT_CODES["unavailable"]
    assert "127.0.0.1:1" in result.stderr


def test_bad_command_lines_exit_usage() -> None:
    assert cli("get").returncode == EXIT_CODES["usage"]
    assert cli("set", "s", "x").returncode == EXIT_CODES["usage"]
    assert cli("sessions", "--timeout", "0").returncode == EXIT_CODES["usage"]
    help_text = cli("--help")
    assert help_text.returncode == 0
    for command in ("sessions", "list", "get", "set", "history", "rollback", "watch", "serve", "ping"):
        assert command in help_text.stdout


# ------------------------------------------------------------------ metrics and logs


def scrape(bridge: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = wait_until(
        lambda: next((line.split()[-1] for line in bridge.output if "dspex-bridge metrics on" in line), None),
        "the metrics address",
    )
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_operations(bridge: Any) -> None:
    before = scrape(bridge)
    with Context(bridge=bridge.address, backend="bridged") as ctx:
        Variables.defvariable(ctx, "x", "integer", 0, constraints={"max": 10})
        with SessionContext.connect(bridge.address, ctx.id) as worker:
            events = worker.watch_variables(["x"])
            assert next(events).version == 1
            for i in range(1, 4):
                Variables.set(ctx, "x", i)
            with pytest.raises(ValueError):
                Variables.set(ctx, "x", 11)
            wait_until(lambda: next(events).version == 4, "the last write on the watch")
            during = wait_until(
                lambda: (s := scrape(bridge)) and value(s, "dspex_watch_lag_seconds_count") > 0 and s,
                "a watch lag sample",
            )
            events.close()
    ok = value(during, "dspex_rpc_duration_seconds_count", method="SetVariable", code="OK") - value(
        before, "dspex_rpc_duration_seconds_count", method="SetVariable", code="OK"
    )
    assert ok == 3
    assert value(during, "dspex_rpc_duration_seconds_count", method="SetVariable", code="INVALID_ARGUMENT") >= 1
    assert (
        value(during, "dspex_writes_total", method="SetVariable")
        - value(before, "dspex_writes_total", method="SetVariable")
        == 3
    )
    assert value(during, "dspex_writes_total", method="RegisterVariable") >= 1
    assert value(during, "dspex_sessions") >= 1
    assert value(during, "dspex_variables") >= 1
    assert value(during, "dspex_open_watches") >= 1  # the worker cache stream (its watch rides on it)
    assert value(during, "dspex_watch_messages_total", update_type="value_change") >= 1
    after = wait_until(lambda: (s := scrape(bridge)) and value(s, "dspex_open_watches") == 0 and s, "watches closed")
    assert value(after, "dspex_sessions") == value(before, "dspex_sessions")


def test_the_bridge_logs_sessions_and_writes_as_json(bridge: Any) -> None:
    with Context(bridge=bridge.address, backend="bridged") as ctx:
        Variables.defvariable(ctx, "y", "integer", 0)
        Variables.set(ctx, "y", 1)

        def records() -> list[dict[str, Any]]:
            out = []
            for line in list(bridge.output):
                if line.startswith("{"):
                    record = json.loads(line)
                    if record.get("session_id") == ctx.id:
                        out.append(record)
            return out

        wait_until(lambda: any(r.get("event") == "variable_write" for r in records()), "the write's log line")
    found = wait_until(
        lambda: (r := records()) and any(x.get("event") == "session_cleanup" for x in r) and r, "the cleanup log line"
    )
    created = next(r for r in found if r.get("event") == "session_created")
    assert created["level"] == "INFO" and created["logger"] == "dspex_dspy.store.session_store"
    write = next(r for r in found if r.get("event") == "variable_write")
    assert (write["level"], write["variable"], write["version"], write["source"]) == ("DEBUG", "y", 2, "orchestrator")


def test_session_create_and_expire_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    store = SessionStore(default_ttl=0.05)
    try:
        with caplog.at_level(logging.INFO, logger="dspex_dspy.store.session_store"):
            store.create_session("short-lived")
            wait_until(lambda: not store.has_session("short-lived"), "the session to expire")
            assert store.sweep() == ["short-lived"]
        events = [(r.levelname, getattr(r, "event", None), getattr(r, "session_id", None)) for r in caplog.records]
        assert ("INFO", "session_created", "short-lived") in events
        assert ("INFO", "session_expired", "short-lived") in events
    finally:
        store.close()


def test_a_degraded_worker_cache_logs_a_warning(
    spawn_bridge: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    process = spawn_bridge()
    with Context(bridge=process.address, backend="bridged") as ctx:
        ctx._owns_session = False  # the server is killed below; nothing to clean up there
        Variables.defvariable(ctx, "z", "integer", 0)
        worker = SessionContext.connect(process.address, ctx.id)
        try:
            assert worker.wait_synced(DEADLINE)
            with caplog.at_level(logging.WARNING, logger="dspex_dspy.client"):
                process.kill()
                wait_until(
                    lambda: any(getattr(r, "event", None) == "cache_degraded" for r in caplog.records),
                    "the cache_degraded warning",
                )
            assert not worker.cache_synced
        finally:
            worker.close()
            ctx._provider.close()
            ctx._remote = None
