"""The servicer behind a blocking ``grpc.server``: the request door and :class:`BridgeGuard` still serve it.

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
from dspex_dspy.auth import AUDIT_LOGGER, BridgeGuard
from dspex_dspy.guard import guarded_handler
from dspex_dspy.server import BridgeServicer
from dspex_dspy.store import SessionStore
from dspex_dspy.tokens import mint_token
from dspex_dspy.wire import value_to_any

pytestmark = pytest.mark.integration

SECRET = secrets.token_bytes(32)
DEADLINE = 30.0


@pytest.fixture
def stub() -> Iterator[pb_grpc.BridgeServiceStub]:
    store = SessionStore()
    servicer = BridgeServicer(store, heartbeat_interval=0.5)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[BridgeGuard(SECRET)])
    server.add_generic_rpc_handlers((guarded_handler(servicer),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.BridgeServiceStub(channel)
    channel.close()
    servicer.begin_shutdown()
    server.stop(0)
    store.close()


def _bearer(perms: str) -> tuple[tuple[str, str], ...]:
    token = mint_token(SECRET, sub="blocking", sessions="*", perms=perms, ttl=600)
    return (("authorization", f"Bearer {token}"),)


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
