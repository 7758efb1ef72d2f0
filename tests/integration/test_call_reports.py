"""Recent module calls over the wire: ``ReportCalls`` / ``RecentCalls`` on real bridges (the
asyncio server and a blocking one), who may call them, and their errors."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from dspex_dspy.admin import add_admin_service, recent_calls, report_calls
from dspex_dspy.auth import BridgeGuard
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
