"""The servicer behind a blocking ``grpc.server``: the request door, :class:`BridgeGuard`, the
``BridgeAdmin`` listing and the metrics interceptor still serve it.

The bridge runs on ``grpc.aio``; these pieces remain for embedding the servicer in a blocking
server, and share every decision with their asyncio counterparts.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.admin import add_admin_service, list_sessions
from dspex_dspy.auth import AUDIT_LOGGER, BridgeGuard
from dspex_dspy.errors import AuthenticationError
from dspex_dspy.guard import guarded_handler
from dspex_dspy.metrics import BridgeMetrics
from dspex_dspy.server import BridgeServicer
from dspex_dspy.store import SessionStore
from dspex_dspy.tokens import mint_token
from dspex_dspy.wire import value_to_any

pytestmark = pytest.mark.integration

SECRET = secrets.token_bytes(32)
DEADLINE = 30.0


METRICS = BridgeMetrics()


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    store = SessionStore()
    servicer = BridgeServicer(store, heartbeat_interval=0.5)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[METRICS.blocking_interceptor(), BridgeGuard(SECRET)],
    )
    server.add_generic_rpc_handlers((guarded_handler(servicer),))
    add_admin_service(server, store)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    servicer.begin_shutdown()
    server.stop(0)
    store.close()


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.BridgeServiceStub:
    return pb_grpc.BridgeServiceStub(channel)


def _bearer(perms: str, sessions: str | list[str] = "*") -> tuple[tuple[str, str], ...]:
    token = mint_token(SECRET, sub="blocking", sessions=sessions, perms=perms, ttl=600)
    return (("authorization", f"Bearer {token}"),)


def _count(name: str, **labels: str) -> float:
    return METRICS.registry.get_sample_value(name, labels) or 0.0


def test_a_blocking_server_lists_each_token_its_sessions_and_feeds_the_metrics(
    channel: grpc.Channel, stub: pb_grpc.BridgeServiceStub
) -> None:
    admin = _bearer("read,write,watch,admin")
    for sid in ("a", "b"):
        stub.InitializeSession(pb.InitializeSessionRequest(session_id=sid), metadata=admin, timeout=DEADLINE)
    assert sorted(s.id for s in list_sessions(channel, metadata=admin)) == ["a", "b"]
    # Any valid token may list, and sees only the sessions it names.
    assert [s.id for s in list_sessions(channel, metadata=_bearer("read", ["a"]))] == ["a"]
    with pytest.raises(AuthenticationError):
        list_sessions(channel)

    written = _count("dspex_writes_total", method="RegisterVariable")
    refused = _count("dspex_rpc_duration_seconds_count", method="SetVariable", code="PERMISSION_DENIED")
    stub.RegisterVariable(
        pb.RegisterVariableRequest(session_id="a", name="x", type="integer", initial_value=value_to_any("integer", 1)),
        metadata=admin,
        timeout=DEADLINE,
    )
    with pytest.raises(grpc.RpcError):
        stub.SetVariable(
            pb.SetVariableRequest(session_id="a", variable_identifier="x", value=value_to_any("integer", 2)),
            metadata=_bearer("read"),
            timeout=DEADLINE,
        )
    assert _count("dspex_writes_total", method="RegisterVariable") == written + 1
    assert _count("dspex_rpc_duration_seconds_count", method="SetVariable", code="PERMISSION_DENIED") == refused + 1
    sent = _count("dspex_watch_messages_total", update_type="initial_value")
    call = stub.WatchVariables(
        pb.WatchVariablesRequest(session_id="a", include_initial_values=True), metadata=admin, timeout=DEADLINE
    )
    assert next(call).variable.version == 1
    call.cancel()
    assert _count("dspex_watch_messages_total", update_type="initial_value") == sent + 1


def test_a_blocking_server_checks_tokens_audits_writes_and_streams_watches(
    stub: pb_grpc.BridgeServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.InitializeSession(pb.InitializeSessionRequest(session_id="s"), timeout=DEADLINE)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    writer = _bearer("read,write,watch")
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        stub.InitializeSession(pb.InitializeSessionRequest(session_id="s"), metadata=writer, timeout=DEADLINE)
        stub.RegisterVariable(
            pb.RegisterVariableRequest(
                session_id="s", name="x", type="integer", initial_value=value_to_any("integer", 1)
            ),
            metadata=writer,
            timeout=DEADLINE,
        )
    assert any('"rpc": "RegisterVariable"' in r.getMessage() and '"OK"' in r.getMessage() for r in caplog.records)
    with pytest.raises(grpc.RpcError) as denied:
        stub.SetVariable(
            pb.SetVariableRequest(session_id="s", variable_identifier="x", value=value_to_any("integer", 2)),
            metadata=_bearer("read"),
            timeout=DEADLINE,
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as bad:
        stub.GetVariable(pb.GetVariableRequest(session_id="s" * 5000), metadata=writer, timeout=DEADLINE)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    call = stub.WatchVariables(
        pb.WatchVariablesRequest(session_id="s", include_initial_values=True), metadata=writer, timeout=DEADLINE
    )
    assert next(call).variable.version == 1
    stub.SetVariable(
        pb.SetVariableRequest(session_id="s", variable_identifier="x", value=value_to_any("integer", 2)),
        metadata=writer,
        timeout=DEADLINE,
    )
    update = next(call)
    while update.update_type == "heartbeat":
        update = next(call)
    assert update.variable.version == 2
    call.cancel()
