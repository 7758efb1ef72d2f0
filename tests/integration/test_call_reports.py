"""Recent module calls over the wire: ``ReportCalls`` / ``RecentCalls`` on real bridges (the
asyncio server and a blocking one), who may call them, their errors, and real worker processes
reporting the provenance of their ``VariableAwarePredict`` calls (bridge nodes on a real Redis)."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from support.spawned import run_spawned

from dspex_dspy import Context, Variables
from dspex_dspy.admin import add_admin_service, recent_calls, report_calls
from dspex_dspy.auth import BridgeGuard
from dspex_dspy.client import SessionContext
from dspex_dspy.dashboard import DashboardServer
from dspex_dspy.errors import (
    AuthenticationError,
    PermissionDeniedError,
    SessionNotFoundError,
    ValidationError,
)
from dspex_dspy.remote import open_channel
from dspex_dspy.server import BridgeServer, create_server
from dspex_dspy.store import SessionStore
from dspex_dspy.store.calls import MAX_CALL_BYTES
from dspex_dspy.tokens import mint_token

pytestmark = pytest.mark.integration

SECRET = secrets.token_bytes(32)
SID = "calls_main"
OTHER_SID = "calls_other"


def _token(perms: str, sessions: Any = (SID,)) -> str:
    return mint_token(
        SECRET, sub="tester", sessions=sessions if sessions == "*" else list(sessions), perms=perms, ttl=600
    )


def _call(version: int) -> dict[str, Any]:
    return {"module": "Predict", "at": 1700000000.25, "bindings": {"t": {"variable": "t", "version": version}}}


@pytest.fixture()
def auth_bridge() -> Iterator[BridgeServer]:
    server, _ = create_server(auth_secret=SECRET)
    server.start()
    server.store.create_session(SID)
    server.store.create_session(OTHER_SID)
    yield server
    server.stop(0)


def test_reported_calls_come_back_newest_first_with_their_types(auth_bridge: BridgeServer) -> None:
    channel = open_channel(auth_bridge.address, token=_token("read,write"))
    try:
        assert report_calls(channel, SID, [_call(1), _call(2)]) == 2
        got = recent_calls(channel, SID)
        assert got == [_call(2), _call(1)]
        assert isinstance(got[0]["bindings"]["t"]["version"], int)
        assert recent_calls(channel, SID, limit=1) == [_call(2)]
    finally:
        channel.close()
    assert auth_bridge.store.recent_calls(SID) == [_call(2), _call(1)]


def test_bad_reports_and_unknown_sessions_map_to_their_errors(auth_bridge: BridgeServer) -> None:
    channel = open_channel(auth_bridge.address, token=_token("read,write", "*"))
    try:
        with pytest.raises(ValidationError, match="call 0 is"):
            report_calls(channel, SID, [{"x": "a" * MAX_CALL_BYTES}])
        with pytest.raises(ValidationError, match="limit must be a positive integer"):
            recent_calls(channel, SID, limit=0)
        with pytest.raises(SessionNotFoundError):
            report_calls(channel, "missing", [_call(1)])
        with pytest.raises(SessionNotFoundError):
            recent_calls(channel, "missing")
    finally:
        channel.close()
    assert auth_bridge.store.recent_calls(SID) == []


def test_reporting_needs_write_and_reading_needs_read_on_that_session(auth_bridge: BridgeServer) -> None:
    auth_bridge.store.report_calls(SID, [_call(1)])
    auth_bridge.store.report_calls(OTHER_SID, [_call(9)])

    def with_token(token: str | None) -> grpc.Channel:
        return open_channel(auth_bridge.address, token=token)

    read_only = with_token(_token("read"))
    other = with_token(_token("read,write", [OTHER_SID]))
    anonymous = with_token(None)
    try:
        with pytest.raises(PermissionDeniedError, match="'write'"):
            report_calls(read_only, SID, [_call(2)])
        assert recent_calls(read_only, SID) == [_call(1)]  # read is enough to read
        with pytest.raises(PermissionDeniedError, match="does not open session"):
            recent_calls(other, SID)
        with pytest.raises(PermissionDeniedError, match="does not open session"):
            report_calls(other, SID, [_call(3)])
        assert recent_calls(other, OTHER_SID) == [_call(9)]
        with pytest.raises(AuthenticationError):
            recent_calls(anonymous, SID)
    finally:
        for channel in (read_only, other, anonymous):
            channel.close()
    assert auth_bridge.store.recent_calls(SID) == [_call(1)]


def test_a_blocking_server_serves_the_calls_behind_its_guard() -> None:
    store = SessionStore()
    store.create_session(SID)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[BridgeGuard(SECRET)])
    add_admin_service(server, store)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        writer = (("authorization", f"Bearer {_token('read,write')}"),)
        reader = (("authorization", f"Bearer {_token('read')}"),)
        assert report_calls(channel, SID, [_call(4)], metadata=writer) == 1
        assert recent_calls(channel, SID, metadata=reader) == [_call(4)]
        with pytest.raises(PermissionDeniedError):
            report_calls(channel, SID, [_call(5)], metadata=reader)
        with pytest.raises(SessionNotFoundError):
            recent_calls(channel, "missing", metadata=(("authorization", f"Bearer {_token('read', '*')}"),))
    finally:
        channel.close()
        server.stop(0)
        store.close()


# --------------------------------------------------------------------------------------------
# Workers that report their calls
# --------------------------------------------------------------------------------------------

WORKER = Path(__file__).parent / "workers" / "reporting.py"
DEADLINE_S = 60.0


def _run_worker(address: str, session: str, calls: int, *, env_on: bool, option: bool = False) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "DSPEX_REPORT_CALLS"}
    if env_on:
        env["DSPEX_REPORT_CALLS"] = "1"
    args = [sys.executable, str(WORKER), "--address", address, "--session", session, "--calls", str(calls)]
    done = subprocess.run(
        [*args, "--option"] if option else args, env=env, capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _orchestrate(ctx: Context) -> None:
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"max": 2.0})
    Variables.defvariable(ctx, "system_prompt", "string", "Be terse.", metadata={"secret": "true"})
    Variables.set(ctx, "temperature", 0.4)  # version 2
    ctx.ensure_bridged()


def test_a_reporting_worker_on_one_node_shows_its_calls_through_another(
    spawn_bridge: Callable[..., Any], redis_url: str
) -> None:
    a = spawn_bridge("--storage", redis_url)
    b = spawn_bridge("--storage", redis_url)
    with Context(bridge=a.address) as ctx:
        _orchestrate(ctx)
        seen = _run_worker(b.address, ctx.id, 2, env_on=True)
        assert [line["versions"] for line in seen] == [{"temperature": 2, "instructions": 1}] * 2
        assert seen[0]["temperature"] == 0.4  # the bound value reached the real LM request
        channel = open_channel(a.address)
        try:
            calls = recent_calls(channel, ctx.id)
        finally:
            channel.close()
    assert len(calls) == 2
    newest = calls[0]
    assert newest["module"] == "VariableAwarePredict"
    assert calls[1]["at"] <= newest["at"]
    assert newest["bindings"]["temperature"] == {"variable": "temperature", "version": 2, "value": 0.4}
    assert newest["bindings"]["instructions"] == {"variable": "system_prompt", "version": 1, "value": "<secret>"}
    assert "Be terse." not in json.dumps(calls)


def test_a_worker_reports_nothing_unless_asked_and_the_option_turns_it_on(remote_bridge: Any) -> None:
    with Context(bridge=remote_bridge.address) as ctx:
        _orchestrate(ctx)
        channel = open_channel(remote_bridge.address)
        try:
            assert len(_run_worker(remote_bridge.address, ctx.id, 1, env_on=False)) == 1
            assert recent_calls(channel, ctx.id) == []
            assert len(_run_worker(remote_bridge.address, ctx.id, 1, env_on=False, option=True)) == 1
            (call,) = recent_calls(channel, ctx.id)
        finally:
            channel.close()
    assert call["bindings"]["temperature"]["version"] == 2


def test_reporting_never_blocks_or_fails_a_call_when_the_bridge_is_gone(spawn_bridge: Callable[..., Any]) -> None:
    bridge = spawn_bridge()
    with Context(bridge=bridge.address) as ctx:
        _orchestrate(ctx)
        with SessionContext.connect(bridge.address, ctx.id, report_calls=True, cache=False) as worker:
            assert worker.reporting_calls
            bridge.kill()
            for _ in range(5):
                worker.report_call({"module": "M", "at": 1.0, "bindings": {}})  # returns; nothing raised


def test_the_dashboard_api_serves_a_sessions_calls_through_the_pages_token(auth_bridge: BridgeServer) -> None:
    auth_bridge.store.report_calls(SID, [_call(1)])
    with DashboardServer(auth_bridge.address, port=0) as dashboard:

        def get(path: str, token: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.get(dashboard.url.rstrip("/") + path, headers=headers, timeout=30)

        ok = get(f"/api/sessions/{SID}/calls", _token("read"))
        assert ok.status_code == 200, ok.text
        assert ok.json()["calls"] == [_call(1)]
        assert get(f"/api/sessions/{SID}/calls?limit=1", _token("read")).json()["calls"] == [_call(1)]
        refused = get(f"/api/sessions/{SID}/calls", _token("read", [OTHER_SID]))
        assert refused.status_code == 403
        assert refused.json()["error"]["kind"] == "PermissionDeniedError"
        assert get(f"/api/sessions/{SID}/calls?limit=zero", _token("read")).status_code == 400
        assert get("/api/sessions/missing/calls", _token("read", "*")).status_code == 404


# --------------------------------------------------------------------------------------------
# Reporting across fork
# --------------------------------------------------------------------------------------------

FORKED: dict[str, Any] = {}


def _report_in_child(i: int) -> int:
    ctx: SessionContext = FORKED["ctx"]
    ctx.report_call({"module": "Child", "at": float(i), "bindings": {}})
    ctx.close()  # sends what is queued
    return i


def _fork_and_report(address: str, session: str) -> None:
    """The parent reports while fork pools start; every child reports through its own channel."""
    fork = multiprocessing.get_context("fork")
    client = SessionContext.connect(address, session, report_calls=True)
    FORKED["ctx"] = client
    try:
        for round_ in range(3):
            for n in range(10):  # the reporter thread is sending while the pool forks
                client.report_call({"module": "Parent", "at": float(round_ * 100 + n), "bindings": {}})
            with fork.Pool(2, maxtasksperchild=1) as pool:  # one task per forked child
                assert sorted(pool.map_async(_report_in_child, range(4)).get(timeout=DEADLINE_S)) == [0, 1, 2, 3]
    finally:
        FORKED.clear()
        client.close()


def test_a_reporting_client_survives_forks_and_its_children_report_too(remote_bridge: Any) -> None:
    with Context(bridge=remote_bridge.address) as ctx:
        _orchestrate(ctx)
        run_spawned(_fork_and_report, (remote_bridge.address, ctx.id), deadline_s=4 * DEADLINE_S)
        channel = open_channel(remote_bridge.address)
        try:
            calls = recent_calls(channel, ctx.id)
        finally:
            channel.close()
    modules = [c["module"] for c in calls]
    # Nothing was lost: every record of the parent (paused for each fork) and of each child.
    assert (modules.count("Parent"), modules.count("Child")) == (30, 12)
