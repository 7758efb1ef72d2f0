"""Who gets in, and what they may do: TLS, signed session tokens, per-session access, limits, audit.

Real bridge servers on loopback ports, real gRPC channels (raw stubs, RemoteStore and the worker
clients), TLS material signed at test time. Every refused call is followed by a read showing that
nothing changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from dspex_dspy import Context, Variables
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.admin import list_sessions
from dspex_dspy.auth import AUDIT_LOGGER, RateLimiter
from dspex_dspy.client import AsyncSessionContext, SessionContext
from dspex_dspy.errors import (
    AuthenticationError,
    BridgeUnavailableError,
    DSPexError,
    PermissionDeniedError,
    RateLimitError,
    ValidationError,
)
from dspex_dspy.remote import RemoteStore, open_channel
from dspex_dspy.server import BridgeServer, create_server
from dspex_dspy.store import SessionStore
from dspex_dspy.tls import ServerTLS
from dspex_dspy.tokens import mint_token
from dspex_dspy.wire import value_to_any
from tests.support.tls_material import TlsMaterial, make_material

pytestmark = pytest.mark.integration

SECRET = secrets.token_bytes(32)
OTHER_SECRET = secrets.token_bytes(32)
SID = "sess_main"
OTHER_SID = "sess_other"
NEW_SID = "sess_new"
DEADLINE = 30.0  # generous bound on waits; never an assertion on speed


def _token(
    perms: str, *, sessions: Any = (SID,), ttl: float = 86_400.0, sub: str = "tester", secret: bytes = SECRET
) -> str:
    return mint_token(secret, sub=sub, sessions=list(sessions) if sessions != "*" else "*", perms=perms, ttl=ttl)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


ADMIN = _token("read,write,watch,optimize,admin", sessions="*", sub="admin")


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture()
def auth_bridge() -> Iterator[BridgeServer]:
    """A loopback bridge that takes tokens (no TLS), with one session holding x = 1.0."""
    server, _ = create_server(auth_secret=SECRET, heartbeat_interval=0.2)
    server.start()
    server.store.create_session(SID)
    server.store.create_session(OTHER_SID)
    server.store.register_variable(SID, "x", "float", 1.0, source="setup")
    yield server
    server.stop(0)


@pytest.fixture()
def tls_bridge(material: TlsMaterial) -> Iterator[BridgeServer]:
    """A bridge with TLS and tokens, with one session holding x = 1.0."""
    server, _ = create_server(
        tls=ServerTLS.load(material.server.cert_path, material.server.key_path), auth_secret=SECRET
    )
    server.start()
    server.store.create_session(SID)
    server.store.register_variable(SID, "x", "float", 1.0)
    yield server
    server.stop(0)


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


def test_the_right_ca_connects_every_client(tls_bridge: BridgeServer, material: TlsMaterial) -> None:
    token = _token("read,watch")
    with RemoteStore.connect(tls_bridge.address, root_certificates=material.ca.path, token=token) as remote:
        assert remote.get_variable(SID, "x").value == 1.0
    with SessionContext.connect(tls_bridge.address, SID, root_certificates=material.ca.cert, token=token) as worker:
        assert worker.get_variable("x") == 1.0

    async def run() -> tuple[float, float]:
        ctx = await AsyncSessionContext.connect(
            tls_bridge.address, SID, root_certificates=str(material.ca.path), token=token
        )
        try:
            value = float(await ctx.get_variable("x"))
            async for event in ctx.watch_variables(["x"], include_initial=True):
                return value, float(event.value)
            raise AssertionError("the watch ended without an event")
        finally:
            await ctx.close()

    assert asyncio.run(run()) == (1.0, 1.0)


def test_the_environment_names_the_ca_and_the_token(
    tls_bridge: BridgeServer, material: TlsMaterial, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSPEX_BRIDGE_CA", str(material.ca.path))
    monkeypatch.setenv("DSPEX_BRIDGE_TOKEN", _token("read,watch"))
    with SessionContext.connect(tls_bridge.address, SID, cache=False) as worker:
        assert worker.get_variable("x") == 1.0


def test_a_wrong_ca_fails_with_a_clear_error(tls_bridge: BridgeServer, material: TlsMaterial) -> None:
    with pytest.raises(BridgeUnavailableError, match=r"(?i)handshake|certificate"):
        open_channel(tls_bridge.address, timeout=2.0, root_certificates=material.other_ca.cert, token=ADMIN)
    with pytest.raises(BridgeUnavailableError, match=r"(?i)handshake|certificate"):
        SessionContext.connect(tls_bridge.address, SID, timeout=2.0, root_certificates=material.other_ca.path)


def test_a_plaintext_client_of_a_tls_bridge_fails_with_a_hint(tls_bridge: BridgeServer) -> None:
    with pytest.raises(BridgeUnavailableError, match="root_certificates"):
        RemoteStore.connect(tls_bridge.address, timeout=2.0)


def test_mutual_tls_refuses_a_client_without_a_certificate(material: TlsMaterial) -> None:
    tls = ServerTLS.load(material.server.cert, material.server.key, material.ca.cert)
    server, _ = create_server(tls=tls)
    with server:
        server.store.create_session(SID)
        with pytest.raises(BridgeUnavailableError):
            RemoteStore.connect(server.address, timeout=2.0, root_certificates=material.ca.cert)
        with RemoteStore.connect(
            server.address,
            root_certificates=material.ca.cert,
            certificate_chain=material.client.cert_path,
            private_key=material.client.key_path,
        ) as remote:
            assert remote.has_session(SID)


def test_a_token_is_never_sent_in_clear_off_loopback() -> None:
    with pytest.raises(BridgeUnavailableError, match="in clear"):
        open_channel("192.0.2.1:50051", timeout=0.5, token=ADMIN)


# --------------------------------------------------------------------------------------------
# Tokens, RPC by RPC
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    name: str
    request: Callable[[], Any]
    needs: str | None  # the permission this test expects the RPC to need
    streaming: bool = False


RPCS = [
    Rpc("Ping", lambda: pb.PingRequest(message="hi"), None),
    Rpc("InitializeSession", lambda: pb.InitializeSessionRequest(session_id=NEW_SID), "write"),
    Rpc("CleanupSession", lambda: pb.CleanupSessionRequest(session_id=SID), "write"),
    Rpc("GetSession", lambda: pb.GetSessionRequest(session_id=SID), "read"),
    Rpc("Heartbeat", lambda: pb.HeartbeatRequest(session_id=SID), "read"),
    Rpc("GetVariable", lambda: pb.GetVariableRequest(session_id=SID, variable_identifier="x"), "read"),
    Rpc("GetVariables", lambda: pb.BatchGetVariablesRequest(session_id=SID, variable_identifiers=["x"]), "read"),
    Rpc("ListVariables", lambda: pb.ListVariablesRequest(session_id=SID), "read"),
    Rpc("GetVariableHistory", lambda: pb.GetVariableHistoryRequest(session_id=SID, variable_identifier="x"), "read"),
    Rpc("GetExposedElixirTools", lambda: pb.GetExposedElixirToolsRequest(session_id=SID), "read"),
    Rpc(
        "RegisterVariable",
        lambda: pb.RegisterVariableRequest(
            session_id=SID, name="y", type="float", initial_value=value_to_any("float", 2.0)
        ),
        "write",
    ),
    Rpc(
        "SetVariable",
        lambda: pb.SetVariableRequest(session_id=SID, variable_identifier="x", value=value_to_any("float", 5.0)),
        "write",
    ),
    Rpc(
        "SetVariables",
        lambda: pb.BatchSetVariablesRequest(session_id=SID, updates={"x": value_to_any("float", 6.0)}, atomic=True),
        "write",
    ),
    Rpc("DeleteVariable", lambda: pb.DeleteVariableRequest(session_id=SID, variable_identifier="x"), "write"),
    Rpc(
        "RollbackVariable",
        lambda: pb.RollbackVariableRequest(session_id=SID, variable_identifier="x", target_version=1),
        "write",
    ),
    Rpc("AddDependency", lambda: pb.AddDependencyRequest(session_id=SID, from_variable="x", to_variable="x"), "write"),
    Rpc("ExecuteTool", lambda: pb.ExecuteToolRequest(session_id=SID, tool_name="t"), "write"),
    Rpc("RegisterTools", lambda: pb.RegisterToolsRequest(session_id=SID), "write"),
    Rpc("ExecuteElixirTool", lambda: pb.ExecuteElixirToolRequest(session_id=SID, tool_name="t"), "write"),
    Rpc("ExecuteStreamingTool", lambda: pb.ExecuteToolRequest(session_id=SID, tool_name="t"), "write", True),
    Rpc(
        "WatchVariables",
        lambda: pb.WatchVariablesRequest(session_id=SID, include_initial_values=True),
        "watch",
        True,
    ),
    Rpc(
        "StartOptimization",
        lambda: pb.StartOptimizationRequest(session_id=SID, variable_identifier="x", optimizer_id="tuner-1"),
        "optimize",
    ),
    Rpc(
        "StopOptimization",
        lambda: pb.StopOptimizationRequest(session_id=SID, variable_identifier="x", force=True),
        "optimize",
    ),
]

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _credential(kind: str) -> tuple[tuple[str, str], ...]:
    if kind == "no token":
        return ()
    if kind == "garbage token":
        return (("authorization", "Bearer not.a.jwt"),)
    if kind == "wrong secret":
        return _bearer(_token("read,write,watch,optimize", secret=OTHER_SECRET))
    if kind == "expired token":
        return _bearer(
            mint_token(SECRET, sub="late", sessions=[SID], perms="read,write,watch", ttl=1, now=time.time() - 60)
        )
    if kind == "other session":
        return _bearer(_token("read,write,watch,optimize", sessions=[OTHER_SID]))
    if kind == "read-only token":
        return _bearer(_token("read"))
    if kind == "watch-only token":
        return _bearer(_token("watch"))
    raise AssertionError(kind)


def _expected(kind: str, rpc: Rpc) -> grpc.StatusCode | None:
    if kind in ("no token", "garbage token", "wrong secret", "expired token"):
        return UNAUTH
    if rpc.needs is None:
        return None
    if kind == "other session":
        return DENIED
    held = {"read-only token": "read", "watch-only token": "watch"}[kind]
    return None if rpc.needs == held else DENIED


KINDS = [
    "no token",
    "garbage token",
    "wrong secret",
    "expired token",
    "other session",
    "read-only token",
    "watch-only token",
]
CASES = [(kind, rpc) for kind in KINDS for rpc in RPCS if _expected(kind, rpc) is not None]


def _invoke(stub: Any, rpc: Rpc, metadata: tuple[tuple[str, str], ...]) -> None:
    method = getattr(stub, rpc.name)
    if rpc.streaming:
        next(iter(method(rpc.request(), metadata=metadata, timeout=DEADLINE)))
    else:
        method(rpc.request(), metadata=metadata, timeout=DEADLINE)


def _snapshot(store: SessionStore) -> tuple[Any, ...]:
    variables = [(v.name, v.value, v.version) for v in store.list_variables(SID)]
    history = [(h.version, h.value, h.changed_by) for h in store.get_history(SID, "x")]
    return (store.has_session(SID), store.has_session(NEW_SID), variables, history)


@pytest.mark.parametrize(("kind", "rpc"), CASES, ids=[f"{r.name}-{k.replace(' ', '_')}" for k, r in CASES])
def test_a_refused_call_gets_its_status_and_changes_nothing(auth_bridge: BridgeServer, kind: str, rpc: Rpc) -> None:
    before = _snapshot(auth_bridge.store)
    sent = _credential(kind)
    with grpc.insecure_channel(auth_bridge.address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            _invoke(stub, rpc, sent)
    assert info.value.code() == _expected(kind, rpc), info.value.details()
    details = info.value.details()
    assert details and all(value.split()[-1] not in details for _, value in sent)
    # The remote reading through RemoteStore with an admin token sees the same state as before.
    with RemoteStore.connect(auth_bridge.address, token=ADMIN) as remote:
        assert [(v.name, v.value, v.version) for v in remote.list_variables(SID)] == before[2]
    assert _snapshot(auth_bridge.store) == before


@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
def test_a_token_with_the_right_permission_passes(auth_bridge: BridgeServer, rpc: Rpc) -> None:
    token = _token(rpc.needs or "read", sessions=[SID, NEW_SID])
    with grpc.insecure_channel(auth_bridge.address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        try:
            _invoke(stub, rpc, _bearer(token))
        except grpc.RpcError as err:
            # Served RPCs succeed; the ones the bridge does not implement get past the guard to say so.
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err.details()


def test_the_messages_say_what_was_missing(auth_bridge: BridgeServer) -> None:
    with grpc.insecure_channel(auth_bridge.address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        request = pb.SetVariableRequest(session_id=SID, variable_identifier="x", value=value_to_any("float", 3.0))
        cases = {
            "no token": "bearer token",
            "expired token": "expired",
            "wrong secret": "signature",
            "garbage token": "malformed",
            "read-only token": "'write' permission",
            "other session": f"does not open session '{SID}'",
        }
        for kind, expected in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.SetVariable(request, metadata=_credential(kind), timeout=DEADLINE)
            assert expected in info.value.details(), (kind, info.value.details())


def test_admin_lists_and_cleans_up_sessions_it_does_not_name(auth_bridge: BridgeServer) -> None:
    admin = _token("admin", sessions=["unrelated"], sub="ops")
    with RemoteStore.connect(auth_bridge.address, token=admin) as remote:
        assert remote.get_session(OTHER_SID).id == OTHER_SID
        remote.cleanup_session(OTHER_SID)
        # admin alone opens no variables.
        with pytest.raises(PermissionDeniedError):
            remote.get_variable(SID, "x")
    assert not auth_bridge.store.has_session(OTHER_SID)


def test_session_listing_shows_a_token_only_the_sessions_it_may_see(auth_bridge: BridgeServer) -> None:
    def listed(token: str | None) -> list[str]:
        channel = open_channel(auth_bridge.address, token=token)
        try:
            return sorted(s.id for s in list_sessions(channel))
        finally:
            channel.close()

    assert listed(ADMIN) == sorted([SID, OTHER_SID])
    assert listed(_token("read", sessions=[SID])) == [SID]
    assert listed(_token("admin", sessions=["unrelated"])) == sorted([SID, OTHER_SID])
    with pytest.raises(AuthenticationError):
        listed(None)


def test_the_writer_is_the_token_subject_not_what_the_request_claims(auth_bridge: BridgeServer) -> None:
    token = _token("read,write", sub="worker-7")
    with grpc.insecure_channel(auth_bridge.address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        stub.SetVariable(
            pb.SetVariableRequest(
                session_id=SID,
                variable_identifier="x",
                value=value_to_any("float", 4.0),
                metadata={"source": "orchestrator"},
            ),
            metadata=(*_bearer(token), ("source", "orchestrator")),
            timeout=DEADLINE,
        )
    with RemoteStore.connect(auth_bridge.address, token=ADMIN) as remote:
        latest = remote.get_history(SID, "x")[0]
        remote.rollback_variable(SID, "x", 1)
        rolled = remote.get_history(SID, "x")[0]
    assert (latest.version, latest.changed_by) == (2, "worker-7")
    assert (rolled.version, rolled.changed_by) == (3, "admin")


def test_a_watch_ends_unauthenticated_when_its_token_expires(auth_bridge: BridgeServer) -> None:
    # A short token keeps the test short, but a loaded machine may not open the watch before it
    # expires: then (and only then, as the clock shows) the watch is tried again with a token twice
    # as long, until one opens in time. Whether the test passes never depends on how fast that is.
    ttl = 2
    while True:
        issued = float(math.floor(time.time()))
        token = mint_token(SECRET, sub="tester", sessions=[SID], perms="watch", ttl=ttl, now=issued)
        expires = issued + ttl
        with grpc.insecure_channel(auth_bridge.address) as channel:
            stub = pb_grpc.BridgeServiceStub(channel)
            stream = stub.WatchVariables(
                pb.WatchVariablesRequest(session_id=SID, include_initial_values=True),
                metadata=_bearer(token),
                timeout=ttl + DEADLINE,
            )
            try:
                first = next(stream)
            except grpc.RpcError as refused:
                # Refused before its first message: only because the token had expired by then.
                assert refused.code() == UNAUTH and "expired" in (refused.details() or ""), refused
                assert time.time() >= expires, "a watch was refused before its token expired"
                assert ttl < DEADLINE, "no watch opened before its token expired"
                ttl *= 2
                continue
            assert first.update_type == "initial_value"
            with pytest.raises(grpc.RpcError) as info:
                for _ in stream:
                    pass
        break
    assert info.value.code() == UNAUTH
    assert "expired" in info.value.details()
    assert time.time() >= expires, "the watch ended before its token expired"


# --------------------------------------------------------------------------------------------
# Orchestrator and workers
# --------------------------------------------------------------------------------------------


def test_a_read_watch_worker_reads_through_its_cache_and_watches_but_cannot_write(
    tls_bridge: BridgeServer, material: TlsMaterial
) -> None:
    with Context(bridge=tls_bridge.address, root_certificates=material.ca.path, auth_secret=SECRET) as ctx:
        Variables.defvariable(ctx, "temperature", "float", 0.7)
        ctx.ensure_bridged()
        token = ctx.worker_token(perms=("read", "watch"), ttl=600)
        with SessionContext.connect(
            ctx.bridge_address, ctx.id, root_certificates=material.ca.path, token=token
        ) as worker:
            _wait_for(lambda: worker.cache_synced, "the worker cache to sync")
            assert worker.get_variable("temperature") == 0.7
            assert worker.cached("temperature") == (0.7, 1)
            watch = worker.watch_variables(["temperature"], include_initial=True)
            assert next(watch).value == 0.7
            Variables.set(ctx, "temperature", 0.9)
            event = next(watch)
            assert (event.name, event.value, event.version) == ("temperature", 0.9, 2)
            watch.close()
            with pytest.raises(PermissionDeniedError) as info:
                worker.set_variable("temperature", 1.5)
            assert isinstance(info.value, PermissionError) and isinstance(info.value, DSPexError)
            assert Variables.get(ctx, "temperature") == 0.9
            history = tls_bridge.store.get_history(ctx.id, "temperature")
            assert [(h.version, h.changed_by) for h in history][:1] == [(2, "orchestrator")]


def test_worker_tokens_are_narrow_and_only_from_an_owning_context(auth_bridge: BridgeServer) -> None:
    with Context(bridge=auth_bridge.address, auth_secret=SECRET) as ctx:
        with pytest.raises(DSPexError, match="bridge session it created"):
            ctx.worker_token()
        ctx.ensure_bridged()
        with pytest.raises(ValidationError, match="admin"):
            ctx.worker_token(perms=("read", "admin"))
        token = ctx.worker_token(perms=("read",), ttl=60)
        with RemoteStore.connect(auth_bridge.address, token=token) as remote:
            assert remote.has_session(ctx.id)
            with pytest.raises(PermissionDeniedError):
                remote.get_variable(SID, "x")
    with Context(bridge=auth_bridge.address) as ctx, pytest.raises(AuthenticationError):
        ctx.ensure_bridged()


def test_two_nodes_with_one_secret_accept_each_others_tokens() -> None:
    store = SessionStore()
    node_a, _ = create_server(store, auth_secret=SECRET)
    node_b, _ = create_server(store, auth_secret=SECRET)
    stranger, _ = create_server(store, auth_secret=OTHER_SECRET)
    with node_a, node_b, stranger:
        store.create_session(SID)
        store.register_variable(SID, "x", "float", 1.0)
        token = _token("read,write,watch", sub="worker-2")
        with (
            SessionContext.connect(node_b.address, SID, token=token) as watcher,
            RemoteStore.connect(node_a.address, token=token) as writer,
        ):
            _wait_for(lambda: watcher.cache_synced, "the watcher cache to sync")
            watch = watcher.watch_variables(["x"], include_initial=True)
            assert next(watch).value == 1.0
            writer.set_variable(SID, "x", 2.0)
            assert next(watch).value == 2.0
            watch.close()
        with RemoteStore.connect(stranger.address, token=token) as remote, pytest.raises(AuthenticationError):
            remote.get_variable(SID, "x")
    store.close()


def test_a_snakepit_client_without_metadata_works_on_a_loopback_bridge_without_auth() -> None:
    server, _ = create_server()
    with server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        assert stub.InitializeSession(pb.InitializeSessionRequest(session_id="snk"), timeout=DEADLINE).success
        stub.RegisterVariable(
            pb.RegisterVariableRequest(
                session_id="snk", name="t", type="float", initial_value=value_to_any("float", 0.5)
            ),
            timeout=DEADLINE,
        )
        reply = stub.SetVariable(
            pb.SetVariableRequest(session_id="snk", variable_identifier="t", value=value_to_any("float", 0.6)),
            timeout=DEADLINE,
        )
        assert reply.new_version == 2
        got = stub.GetVariable(pb.GetVariableRequest(session_id="snk", variable_identifier="t"), timeout=DEADLINE)
        assert got.variable.version == 2


# --------------------------------------------------------------------------------------------
# Limits, audit, secrets
# --------------------------------------------------------------------------------------------


def test_the_rate_limit_answers_resource_exhausted_with_a_retry_hint() -> None:
    server, _ = create_server(auth_secret=SECRET, rate_limit=RateLimiter(rate=0.01, burst=3))
    with server:
        server.store.create_session(SID)
        server.store.register_variable(SID, "x", "float", 1.0)
        with RemoteStore.connect(server.address, token=_token("read,write", sub="greedy")) as greedy:
            for _ in range(3):
                greedy.get_variable(SID, "x")
            with pytest.raises(RateLimitError) as info:
                greedy.set_variable(SID, "x", 9.0)
            assert info.value.retry_after > 0 and info.value.principal == "greedy"
        # Another principal has its own bucket.
        with RemoteStore.connect(server.address, token=_token("read", sub="patient")) as patient:
            assert patient.get_variable(SID, "x").value == 1.0
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.BridgeServiceStub(channel)
            call = stub.GetVariable.with_call
            with pytest.raises(grpc.RpcError) as raw:
                call(
                    pb.GetVariableRequest(session_id=SID, variable_identifier="x"),
                    metadata=_bearer(_token("read", sub="greedy")),
                    timeout=DEADLINE,
                )
            assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(raw.value.trailing_metadata())["retry-after"]


def _audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT_LOGGER]


def test_writes_deletes_rollbacks_and_refusals_leave_one_audit_line_each(
    auth_bridge: BridgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    token = _token("read,write", sub="auditor")
    with RemoteStore.connect(auth_bridge.address, token=token) as remote:
        remote.set_variable(SID, "x", 2.0)
        remote.rollback_variable(SID, "x", 1)
        remote.register_variable(SID, "y", "float", 0.1)
        remote.delete_variable(SID, "y")
    with grpc.insecure_channel(auth_bridge.address) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.BridgeServiceStub(channel).RegisterVariable(
            pb.RegisterVariableRequest(
                session_id=SID,
                name="z",
                type="float",
                initial_value=value_to_any("float", 0.1),
                constraints_json='{"max": 0}',
            ),
            metadata=_bearer(token),
            timeout=DEADLINE,
        )
    with (
        RemoteStore.connect(auth_bridge.address, token=_token("read", sub="reader")) as reader,
        pytest.raises(PermissionDeniedError),
    ):
        reader.set_variable(SID, "x", 3.0)
    lines = _audit_lines(caplog)
    summary = [
        (ln["rpc"], ln["principal"], ln["session"], ln["variable"], ln["version"], ln["outcome"]) for ln in lines
    ]
    assert summary == [
        ("SetVariable", "auditor", SID, "x", 2, "OK"),
        ("RollbackVariable", "auditor", SID, "x", 3, "OK"),
        ("RegisterVariable", "auditor", SID, "y", 1, "OK"),
        ("DeleteVariable", "auditor", SID, "y", None, "OK"),
        ("RegisterVariable", "auditor", SID, "z", None, "INVALID_ARGUMENT"),
        ("SetVariable", "reader", SID, "x", None, "PERMISSION_DENIED"),
    ]
    assert all(token not in json.dumps(ln) for ln in lines)


def test_a_bridge_without_tokens_audits_writes_exactly_while_the_audit_logger_is_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Without tokens or a rate limit the guard has nothing to check: it steps aside for writes
    # while the audit logger is off, and audits them again from the next call once it is on.
    server, _ = create_server()
    server.start()
    try:
        server.store.create_session(SID)
        server.store.register_variable(SID, "x", "float", 1.0)
        with RemoteStore.connect(server.address) as remote:
            caplog.set_level(logging.WARNING, logger=AUDIT_LOGGER)
            remote.set_variable(SID, "x", 2.0)
            assert _audit_lines(caplog) == []
            caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
            remote.set_variable(SID, "x", 3.0)
            remote.rollback_variable(SID, "x", 2)
            caplog.set_level(logging.WARNING, logger=AUDIT_LOGGER)
            remote.set_variable(SID, "x", 4.0)
            assert remote.get_variable(SID, "x").version == 5
        summary = [
            (ln["rpc"], ln["principal"], ln["variable"], ln["version"], ln["outcome"]) for ln in _audit_lines(caplog)
        ]
        assert summary == [
            ("SetVariable", "anonymous", "x", 3, "OK"),
            ("RollbackVariable", "anonymous", "x", 4, "OK"),
        ]
    finally:
        server.stop(0)


def test_secret_values_never_show(auth_bridge: BridgeServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hidden = "hunter2-do-not-print"
    with RemoteStore.connect(auth_bridge.address, token=_token("read,write", sub="ops")) as remote:
        remote.register_variable(
            SID, "api_key", "string", hidden, constraints={"max_length": 40}, metadata={"secret": "true"}
        )
        variable = remote.get_variable(SID, "api_key")
        assert hidden not in repr(variable) and "<secret>" in repr(variable)
        too_long = hidden * 3
        with pytest.raises(ValidationError) as info:
            remote.set_variable(SID, "api_key", too_long)
        assert hidden not in str(info.value) and info.value.rule == "max_length"
        # The same rejection straight from the server (no client-side check first).
        with grpc.insecure_channel(auth_bridge.address) as channel:
            stub = pb_grpc.BridgeServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raw:
                stub.SetVariable(
                    pb.SetVariableRequest(
                        session_id=SID, variable_identifier="api_key", value=value_to_any("string", too_long)
                    ),
                    metadata=_bearer(_token("write", sub="ops")),
                    timeout=DEADLINE,
                )
            assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert hidden not in raw.value.details()
        assert remote.get_variable(SID, "api_key").value == hidden
    assert hidden not in caplog.text


def test_a_local_context_hides_secret_values_too() -> None:
    with Context() as ctx:
        Variables.defvariable(
            ctx, "token", "string", "s3cr3t-value", constraints={"pattern": "s3cr3t-.*"}, metadata={"secret": "true"}
        )
        with pytest.raises(ValidationError) as info:
            Variables.set(ctx, "token", "leaked-value")
        assert "leaked-value" not in str(info.value)
        assert "s3cr3t-value" not in repr(Variables.list(ctx))


def test_binding_beyond_loopback_needs_tls_and_tokens(material: TlsMaterial, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(PermissionDeniedError, match="TLS and tokens"):
        create_server(host="0.0.0.0")
    with pytest.raises(PermissionDeniedError, match="tokens"):
        create_server(host="0.0.0.0", tls=ServerTLS(material.server.cert, material.server.key))
    caplog.set_level(logging.WARNING)
    server, _ = create_server(host="0.0.0.0", insecure=True)
    server.stop(0)
    assert "INSECURE" in caplog.text
    secured, _ = create_server(
        host="0.0.0.0", tls=ServerTLS(material.server.cert, material.server.key), auth_secret=SECRET
    )
    secured.stop(0)


def test_a_pickled_worker_keeps_its_tls_and_token(tls_bridge: BridgeServer, material: TlsMaterial) -> None:
    import pickle

    token = _token("read,watch", sub="pickled")
    with SessionContext.connect(tls_bridge.address, SID, root_certificates=material.ca.cert, token=token) as worker:
        copy = pickle.loads(pickle.dumps(worker))
        try:
            assert copy.get_variable("x") == 1.0
            assert token not in repr(copy.security)
        finally:
            copy.close()
