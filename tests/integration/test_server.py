"""The bridge server end to end: a real server on a free port, a real channel and the generated stub.

Every status code of the wire contract, every implemented RPC, watch streams (snapshot, changes,
deletions, heartbeats), TTL expiry and graceful shutdown. Waits are polling loops bounded by a
generous deadline; nothing asserts on elapsed time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import (
    LimitExceededError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.server import SERVICE_NAME, BridgeServer, EmbeddedBridge, ServerLimits, create_server
from dspex_dspy.store import MemoryStorage, SessionStore, StoreLimits
from dspex_dspy.types import TYPE_URL_PREFIX
from dspex_dspy.wire import (
    any_to_value,
    error_from_rpc,
    from_timestamp,
    proto_to_variable,
    timestamp,
    value_to_any,
    value_to_binary,
)

pytestmark = pytest.mark.integration

DEADLINE = 20.0  # generous bound for anything that should happen "soon"; never an assertion on speed
SID = "s1"
END = object()


@dataclass
class Bridge:
    """A started server, its store, and a client stub on a real channel."""

    server: BridgeServer
    store: SessionStore
    channel: grpc.Channel
    stub: Any

    def register(self, name: str, type_: str, value: Any, constraints: str = "", session_id: str = SID) -> str:
        reply = self.stub.RegisterVariable(
            pb.RegisterVariableRequest(
                session_id=session_id,
                name=name,
                type=type_,
                initial_value=value_to_any(type_, value),
                constraints_json=constraints,
            ),
            timeout=DEADLINE,
        )
        return str(reply.variable_id)

    def set(self, ident: str, type_: str, value: Any, **fields: Any) -> int:
        request = pb.SetVariableRequest(
            session_id=SID, variable_identifier=ident, value=value_to_any(type_, value), **fields
        )
        return int(self.stub.SetVariable(request, timeout=DEADLINE).new_version)

    def get(self, ident: str, session_id: str = SID) -> Any:
        request = pb.GetVariableRequest(session_id=session_id, variable_identifier=ident)
        return proto_to_variable(self.stub.GetVariable(request, timeout=DEADLINE).variable)

    def watch(self, identifiers: list[str] | None = None, *, initial: bool = True) -> Stream:
        request = pb.WatchVariablesRequest(
            session_id=SID, variable_identifiers=identifiers or [], include_initial_values=initial
        )
        return Stream(self.stub.WatchVariables(request))

    def still_serves(self) -> None:
        assert self.stub.Ping(pb.PingRequest(message="ok?"), timeout=DEADLINE).message == "pong: ok?"


class Stream:
    """A watch stream read by a background thread, so every read in a test is bounded by a timeout."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._items: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for message in self.call:
                self._items.put(message)
            self._items.put(END)
        except grpc.RpcError as err:
            self._items.put(err)

    def next(self, *, heartbeats: bool = False) -> Any:
        """The next update (skipping heartbeats unless asked), ``END``, or the ``RpcError`` that ended it."""
        while True:
            item = self._items.get(timeout=DEADLINE)
            if heartbeats or not (isinstance(item, pb.VariableUpdate) and item.update_type == "heartbeat"):
                return item

    def update(self) -> pb.VariableUpdate:
        item = self.next()
        assert isinstance(item, pb.VariableUpdate), f"expected an update, got {item!r}"
        return item

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive()


def rpc_error(call: Callable[[], Any]) -> Any:
    """Run ``call`` and return the ``grpc.RpcError`` it must raise."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(params=["aio", "blocking"])
def make_bridge(request: pytest.FixtureRequest) -> Iterator[Callable[..., Bridge]]:
    """Bridges of one kind: every test here runs on the grpc.aio server and on the blocking one."""
    made: list[Bridge] = []
    asyncio = request.param == "aio"

    def make(
        *,
        store: SessionStore | None = None,
        limits: ServerLimits | None = None,
        heartbeat_interval: float = 10.0,
        session: bool = True,
    ) -> Bridge:
        served = store if store is not None else SessionStore()
        server, port = create_server(served, limits=limits, heartbeat_interval=heartbeat_interval, asyncio=asyncio)
        assert port == server.port > 0
        assert server.asyncio is asyncio
        server.start()
        channel = grpc.insecure_channel(server.address)
        bridge = Bridge(server, served, channel, pb_grpc.BridgeServiceStub(channel))
        made.append(bridge)
        if session:
            bridge.stub.InitializeSession(pb.InitializeSessionRequest(session_id=SID), timeout=DEADLINE)
        return bridge

    yield make
    for bridge in made:
        bridge.channel.close()
        bridge.server.stop(0)
        bridge.store.close()


@pytest.fixture
def bridge(make_bridge: Callable[..., Bridge]) -> Bridge:
    return make_bridge()


@pytest.fixture
def tuned(bridge: Bridge) -> Bridge:
    """A bridge whose session holds ``temperature`` (float in [0, 2], 0.7, version 1)."""
    bridge.register("temperature", "float", 0.7, '{"min": 0, "max": 2}')
    return bridge


def assert_untouched(bridge: Bridge) -> None:
    var = bridge.get("temperature")
    assert (var.value, var.version) == (0.7, 1)


# ------------------------------------------------------------------------------------ basics


def test_ping_and_health_report_serving(bridge: Bridge) -> None:
    reply = bridge.stub.Ping(pb.PingRequest(message="hello"), timeout=DEADLINE)
    assert reply.message == "pong: hello"
    assert abs(from_timestamp(reply.server_time) - time.time()) < 3600
    health = health_pb2_grpc.HealthStub(bridge.channel)
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    assert bridge.server.address == f"127.0.0.1:{bridge.server.port}"


def test_session_lifecycle(bridge: Bridge) -> None:
    stub = bridge.stub
    stub.InitializeSession(pb.InitializeSessionRequest(session_id="s2", metadata={"who": "me"}), timeout=DEADLINE)
    bridge.register("x", "integer", 1, session_id="s2")
    info = stub.GetSession(pb.GetSessionRequest(session_id="s2"), timeout=DEADLINE)
    assert (info.session_id, dict(info.metadata), info.variable_count) == ("s2", {"who": "me"}, 1)
    assert abs(from_timestamp(info.created_at) - time.time()) < 3600
    assert stub.Heartbeat(pb.HeartbeatRequest(session_id="s2"), timeout=DEADLINE).session_valid

    cleaned = stub.CleanupSession(pb.CleanupSessionRequest(session_id="s2"), timeout=DEADLINE)
    assert (cleaned.success, cleaned.resources_cleaned) == (True, 1)
    err = rpc_error(lambda: stub.GetSession(pb.GetSessionRequest(session_id="s2"), timeout=DEADLINE))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "Session not found: s2")
    assert not stub.Heartbeat(pb.HeartbeatRequest(session_id="s2"), timeout=DEADLINE).session_valid
    err = rpc_error(lambda: stub.CleanupSession(pb.CleanupSessionRequest(session_id="s2"), timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    forced = stub.CleanupSession(pb.CleanupSessionRequest(session_id="s2", force=True), timeout=DEADLINE)
    assert (forced.success, forced.resources_cleaned) == (True, 0)


def test_duplicate_session_is_already_exists(bridge: Bridge) -> None:
    err = rpc_error(
        lambda: bridge.stub.InitializeSession(pb.InitializeSessionRequest(session_id=SID), timeout=DEADLINE)
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert isinstance(error_from_rpc(err, session_id=SID), SessionExistsError)
    bridge.still_serves()


def test_get_exposed_elixir_tools_is_an_empty_list(bridge: Bridge) -> None:
    reply = bridge.stub.GetExposedElixirTools(pb.GetExposedElixirToolsRequest(session_id=SID), timeout=DEADLINE)
    assert list(reply.tools) == []


# ------------------------------------------------------------------------------ INVALID_ARGUMENT


def _set_any(any_msg: any_pb2.Any) -> Callable[[Bridge], Any]:
    return lambda b: b.stub.SetVariable(
        pb.SetVariableRequest(session_id=SID, variable_identifier="temperature", value=any_msg), timeout=DEADLINE
    )


def _register(
    type_: str = "float", constraints: str = "", name: str = "fresh", **extra: Any
) -> Callable[[Bridge], Any]:
    value = extra.pop("value", any_pb2.Any(type_url=TYPE_URL_PREFIX + "float", value=b"0.5"))
    return lambda b: b.stub.RegisterVariable(
        pb.RegisterVariableRequest(
            session_id=SID, name=name, type=type_, initial_value=value, constraints_json=constraints, **extra
        ),
        timeout=DEADLINE,
    )


def _import(type_: str = "float", constraints: str = "", **extra: Any) -> Callable[[Bridge], Any]:
    """An ``ImportVariables`` of one good variable and one described by the arguments (imported last)."""
    value = extra.pop("value", any_pb2.Any(type_url=TYPE_URL_PREFIX + "float", value=b"0.5"))
    good = pb.RegisterVariableRequest(
        session_id=SID, name="good", type="float", initial_value=value_to_any("float", 0.1), initial_version=1
    )
    bad = pb.RegisterVariableRequest(
        session_id=SID, name="fresh", type=type_, initial_value=value, constraints_json=constraints, initial_version=1
    )
    return lambda b: b.stub.ImportVariables(
        pb.ImportVariablesRequest(session_id=SID, variables=[good, bad]), timeout=DEADLINE
    )


DEEP = b"[" * 5000 + b"1" + b"]" * 5000
BAD_REQUESTS: dict[str, tuple[Callable[[Bridge], Any], tuple[str, ...]]] = {
    "constraint-violation": (_set_any(value_to_any("float", 2.5)), ("temperature", "max", "2.5")),
    "wrong-value-type": (_set_any(value_to_any("string", "hot")), ("temperature", "type", "'hot'")),
    "foreign-type-url": (_set_any(any_pb2.Any(type_url="type.googleapis.com/other.float", value=b"1")), ("type_url",)),
    "unknown-type-url": (_set_any(any_pb2.Any(type_url=TYPE_URL_PREFIX + "complex", value=b"1")), ("complex",)),
    "bad-json": (_set_any(any_pb2.Any(type_url=TYPE_URL_PREFIX + "float", value=b"{0.5")), ("not valid JSON",)),
    "null-json": (_set_any(any_pb2.Any(type_url=TYPE_URL_PREFIX + "float", value=b"null")), ("empty",)),
    "no-value": (_set_any(any_pb2.Any()), ("no value",)),
    "deep-nesting": (_set_any(any_pb2.Any(type_url=TYPE_URL_PREFIX + "tensor", value=DEEP)), ("nested too deeply",)),
    "deep-tensor-data": (
        _set_any(
            any_pb2.Any(
                type_url=TYPE_URL_PREFIX + "tensor", value=b'{"shape":[1],"data":' + b"[" * 600 + b"]" * 600 + b"}"
            )
        ),
        ("nested too deeply",),
    ),
    "unknown-variable-type": (_register(type_="complex"), ("fresh", "unknown variable type", "complex")),
    "constraints-not-json": (_register(constraints="{min: 0"), ("constraints_json", "not valid JSON")),
    "constraints-not-object": (_register(constraints="[1, 2]"), ("JSON object",)),
    "unknown-constraint": (_register(constraints='{"maximum": 1}'), ("fresh", "unknown constraint maximum")),
    "min-above-max": (_register(constraints='{"min": 3, "max": 1}'), ("fresh", "greater than max")),
    "bad-pattern": (
        _register(type_="string", constraints='{"pattern": "("}', value=value_to_any("string", "a")),
        ("pattern",),
    ),
    "choice-without-choices": (_register(type_="choice", value=value_to_any("string", "a")), ("choices",)),
    "bad-name": (_register(name="1 bad name"), ("not a valid name",)),
    # An import reports a bad type or constraint before the value (and imports nothing).
    "import-unknown-variable-type": (
        _import(type_="complex", value=any_pb2.Any(type_url=TYPE_URL_PREFIX + "complex", value=b"1")),
        ("fresh", "unknown variable type", "complex"),
    ),
    "import-unknown-constraint": (
        _import(constraints='{"maximum": 1}', value=any_pb2.Any(type_url=TYPE_URL_PREFIX + "float", value=b"{")),
        ("fresh", "unknown constraint maximum"),
    ),
    "import-constraint-violation": (_import(constraints='{"max": 0.2}'), ("fresh", "above the maximum")),
    "register-without-value": (_register(value=any_pb2.Any()), ("fresh", "no value")),
    "negative-initial-version": (_register(initial_version=-3), ("fresh", "version")),
    "empty-identifier": (
        lambda b: b.stub.GetVariable(pb.GetVariableRequest(session_id=SID, variable_identifier=""), timeout=DEADLINE),
        ("identifier",),
    ),
    "empty-session-id": (
        lambda b: b.stub.InitializeSession(pb.InitializeSessionRequest(session_id=""), timeout=DEADLINE),
        ("session id",),
    ),
    "rollback-to-unknown-version": (
        lambda b: b.stub.RollbackVariable(
            pb.RollbackVariableRequest(session_id=SID, variable_identifier="temperature", target_version=9),
            timeout=DEADLINE,
        ),
        ("temperature", "version 9"),
    ),
    "binary-of-wrong-length": (
        lambda b: b.stub.RegisterVariable(
            pb.RegisterVariableRequest(
                session_id=SID,
                name="emb",
                type="embedding",
                initial_value=value_to_binary("embedding", [1.0, 2.0])[0],
                initial_binary_value=b"\x00" * 15,
            ),
            timeout=DEADLINE,
        ),
        ("emb", "bytes"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(tuned: Bridge, case: str) -> None:
    call, needles = BAD_REQUESTS[case]
    err = rpc_error(lambda: call(tuned))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    for needle in needles:
        assert needle in err.details()
    assert isinstance(error_from_rpc(err), ValidationError)
    tuned.still_serves()
    assert_untouched(tuned)
    assert [v.name for v in tuned.store.list_variables(SID)] == ["temperature"]


def test_constraint_violation_names_variable_rule_and_value(tuned: Bridge) -> None:
    err = rpc_error(lambda: tuned.set("temperature", "float", 2.5))
    assert err.details() == "temperature: 2.5 is above the maximum 2 (rule max)"
    rebuilt = error_from_rpc(err, identifier="temperature", session_id=SID)
    assert isinstance(rebuilt, ValidationError)
    assert (rebuilt.variable, rebuilt.rule, str(rebuilt)) == ("temperature", "max", err.details())


@pytest.mark.parametrize("type_", ["float", "integer", "string", "boolean", "choice", "module", "embedding", "tensor"])
def test_garbage_values_are_never_internal(bridge: Bridge, type_: str) -> None:
    constraints = {"choice": '{"choices": ["a"]}', "tensor": '{"shape": [2]}', "embedding": '{"dimensions": 2}'}
    initial = {"choice": "a", "embedding": [1.0, 2.0], "tensor": {"shape": [2], "data": [1.0, 2.0]}}
    defaults: dict[str, Any] = {"float": 1.0, "integer": 1, "string": "s", "boolean": True, "module": "M"}
    bridge.register("v", type_, initial.get(type_, defaults.get(type_)), constraints.get(type_, ""))
    payloads = [
        b"",
        b"null",
        b"{}",
        b"[]",
        b'"x"',
        b"1e999",
        b"-1",
        b"true",
        b'{"shape":[2]}',
        b'{"shape":[-1],"data":[]}',
        b'{"shape":[2],"data":[1,"y"]}',
        b'{"shape":"2","data":[1,2]}',
        b"[1,[2]]",
        b'["NaN","nan"]',
        b"\xc3\x28",
        b"9" * 5000,
        DEEP,
    ]
    for type_url in (TYPE_URL_PREFIX + type_, TYPE_URL_PREFIX + "float", TYPE_URL_PREFIX + type_ + ".binary"):
        for payload in payloads:
            request = pb.SetVariableRequest(
                session_id=SID, variable_identifier="v", value=any_pb2.Any(type_url=type_url, value=payload)
            )
            try:
                bridge.stub.SetVariable(request, timeout=DEADLINE)
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                    type_url,
                    payload[:40],
                    err.code(),
                    err.details(),
                )
    bridge.still_serves()


# --------------------------------------------------------------------- NOT_FOUND, ALREADY_EXISTS


def test_unknown_session_and_variable_are_not_found(tuned: Bridge) -> None:
    err = rpc_error(lambda: tuned.get("temperature", session_id="nope"))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "Session not found: nope")
    assert isinstance(error_from_rpc(err, session_id="nope"), SessionNotFoundError)

    err = rpc_error(lambda: tuned.get("ghost"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details().startswith("Variable not found: ghost")
    rebuilt = error_from_rpc(err, identifier="ghost", session_id=SID)
    assert isinstance(rebuilt, VariableNotFoundError)
    assert rebuilt.identifier == "ghost"

    for call in (
        lambda: tuned.set("ghost", "float", 1.0),
        lambda: tuned.stub.DeleteVariable(pb.DeleteVariableRequest(session_id=SID, variable_identifier="ghost")),
        lambda: tuned.stub.GetVariableHistory(
            pb.GetVariableHistoryRequest(session_id=SID, variable_identifier="ghost")
        ),
        lambda: tuned.stub.ListVariables(pb.ListVariablesRequest(session_id="nope")),
        lambda: tuned.stub.GetVariables(pb.BatchGetVariablesRequest(session_id="nope", variable_identifiers=["a"])),
    ):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "not found" in err.details()
    tuned.still_serves()
    assert_untouched(tuned)


def test_duplicate_variable_is_already_exists(tuned: Bridge) -> None:
    err = rpc_error(lambda: tuned.register("temperature", "float", 1.0))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "temperature" in err.details()
    rebuilt = error_from_rpc(err, identifier="temperature", session_id=SID)
    assert isinstance(rebuilt, VariableExistsError)
    assert rebuilt.name == "temperature"
    tuned.still_serves()
    assert_untouched(tuned)


# ------------------------------------------------------------------------------------ ABORTED


def test_expected_version_mismatch_is_aborted_and_changes_nothing(tuned: Bridge) -> None:
    err = rpc_error(lambda: tuned.set("temperature", "float", 1.5, expected_version=5))
    assert err.code() == grpc.StatusCode.ABORTED
    rebuilt = error_from_rpc(err, identifier="temperature", session_id=SID)
    assert isinstance(rebuilt, VersionConflictError)
    assert (rebuilt.name, rebuilt.expected, rebuilt.actual) == ("temperature", 5, 1)
    assert_untouched(tuned)
    assert tuned.set("temperature", "float", 1.5, expected_version=1) == 2
    assert tuned.set("temperature", "float", 1.6) == 3
    assert tuned.get("temperature").value == 1.6


# ------------------------------------------------------------------------- RESOURCE_EXHAUSTED


def test_oversized_value_is_resource_exhausted(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(limits=ServerLimits(max_value_bytes=1024))
    bridge.register("text", "string", "short")
    for call in (
        lambda: bridge.register("big", "string", "x" * 2000),
        lambda: bridge.set("text", "string", "x" * 2000),
    ):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        rebuilt = error_from_rpc(err)
        assert isinstance(rebuilt, LimitExceededError)
        assert rebuilt.maximum == 1024
    bridge.still_serves()
    assert bridge.get("text").value == "short"


def test_oversized_value_by_the_store_limit_is_resource_exhausted(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(store=SessionStore(limits=StoreLimits(max_value_bytes=100)))
    err = rpc_error(lambda: bridge.register("big", "string", "y" * 500))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bridge.still_serves()


def test_oversized_message_is_resource_exhausted(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(limits=ServerLimits(max_message_bytes=4096))
    err = rpc_error(lambda: bridge.register("big", "string", "z" * 10_000))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bridge.still_serves()


def test_too_many_variables_is_resource_exhausted(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(store=SessionStore(limits=StoreLimits(max_variables_per_session=2)))
    bridge.register("a", "integer", 1)
    bridge.register("b", "integer", 2)
    err = rpc_error(lambda: bridge.register("c", "integer", 3))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "variables per session" in err.details()
    bridge.still_serves()
    assert [v.name for v in bridge.store.list_variables(SID)] == ["a", "b"]


def test_too_many_sessions_is_resource_exhausted(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(store=SessionStore(limits=StoreLimits(max_sessions=2)))
    stub = bridge.stub
    stub.InitializeSession(pb.InitializeSessionRequest(session_id="s2"), timeout=DEADLINE)
    err = rpc_error(lambda: stub.InitializeSession(pb.InitializeSessionRequest(session_id="s3"), timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "sessions" in err.details()
    bridge.still_serves()
    stub.CleanupSession(pb.CleanupSessionRequest(session_id="s2"), timeout=DEADLINE)
    stub.InitializeSession(pb.InitializeSessionRequest(session_id="s3"), timeout=DEADLINE)


def test_too_many_watchers_is_resource_exhausted(make_bridge: Callable[..., Bridge]) -> None:
    limits = ServerLimits(max_watchers=2, max_watchers_per_session=2, max_watchers_per_principal=2)
    bridge = make_bridge(limits=limits)
    bridge.register("x", "integer", 0)
    first, second = bridge.watch(["x"]), bridge.watch(["x"])
    assert first.update().update_type == "initial_value"
    assert second.update().update_type == "initial_value"
    third = bridge.watch(["x"])
    err = third.next()
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "watch streams" in err.details()
    bridge.still_serves()
    assert bridge.set("x", "integer", 1) == 2

    first.close()
    wait_until(lambda: bridge.server.servicer.active_watches == 1, "the cancelled watch to release its slot")
    fourth = bridge.watch(["x"])
    assert fourth.update().variable.version == 2
    second.close()
    fourth.close()


# --------------------------------------------------------------------------------- UNIMPLEMENTED

UNIMPLEMENTED = [
    ("ExecuteTool", pb.ExecuteToolRequest(session_id=SID, tool_name="t")),
    ("RegisterTools", pb.RegisterToolsRequest(session_id=SID)),
    ("ExecuteElixirTool", pb.ExecuteElixirToolRequest(session_id=SID, tool_name="t")),
    ("AddDependency", pb.AddDependencyRequest(session_id=SID, from_variable="a", to_variable="b")),
]


@pytest.mark.parametrize(("rpc", "request_msg"), UNIMPLEMENTED, ids=[name for name, _ in UNIMPLEMENTED])
def test_tool_rpcs_are_unimplemented_with_a_clear_message(bridge: Bridge, rpc: str, request_msg: Any) -> None:
    err = rpc_error(lambda: getattr(bridge.stub, rpc)(request_msg, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details().startswith(f"{rpc} is not implemented by the dspex-dspy bridge")
    bridge.still_serves()


def test_streaming_tool_is_unimplemented(bridge: Bridge) -> None:
    request = pb.ExecuteToolRequest(session_id=SID, tool_name="t", stream=True)
    err = rpc_error(lambda: list(bridge.stub.ExecuteStreamingTool(request, timeout=DEADLINE)))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ExecuteStreamingTool" in err.details()
    bridge.still_serves()


# ------------------------------------------------------------------------------------- variables


def test_get_variables_maps_identifiers_as_requested(bridge: Bridge) -> None:
    bridge.register("a", "integer", 1)
    b_id = bridge.register("b", "string", "bee")
    reply = bridge.stub.GetVariables(
        pb.BatchGetVariablesRequest(session_id=SID, variable_identifiers=["a", b_id, "ghost", "other"]),
        timeout=DEADLINE,
    )
    assert set(reply.variables) == {"a", b_id}
    assert proto_to_variable(reply.variables["a"]).value == 1
    assert proto_to_variable(reply.variables[b_id]).name == "b"
    assert list(reply.missing_variables) == ["ghost", "other"]


def _batch(bridge: Bridge, updates: dict[str, any_pb2.Any], *, atomic: bool) -> Any:
    return bridge.stub.SetVariables(
        pb.BatchSetVariablesRequest(session_id=SID, updates=updates, atomic=atomic), timeout=DEADLINE
    )


def test_set_variables_atomic_applies_all_or_nothing(bridge: Bridge) -> None:
    bridge.register("a", "float", 0.1, '{"max": 1}')
    bridge.register("b", "integer", 1)
    bad = _batch(bridge, {"a": value_to_any("float", 0.5), "b": value_to_any("string", "x")}, atomic=True)
    assert not bad.success
    assert set(bad.errors) == {"b"}
    assert "b:" in bad.errors["b"]
    assert dict(bad.new_versions) == {}
    assert (bridge.get("a").value, bridge.get("a").version) == (0.1, 1)

    malformed = _batch(bridge, {"a": value_to_any("float", 0.5), "b": any_pb2.Any()}, atomic=True)
    assert (malformed.success, set(malformed.errors)) == (False, {"b"})
    assert bridge.get("a").version == 1

    good = _batch(bridge, {"a": value_to_any("float", 0.5), "b": value_to_any("integer", 7)}, atomic=True)
    assert good.success
    assert dict(good.errors) == {}
    assert dict(good.new_versions) == {"a": 2, "b": 2}
    assert (bridge.get("a").value, bridge.get("b").value) == (0.5, 7)


def test_set_variables_non_atomic_reports_per_identifier(bridge: Bridge) -> None:
    bridge.register("a", "float", 0.1, '{"max": 1}')
    a_id = bridge.register("b", "integer", 1)
    reply = _batch(
        bridge,
        {
            "a": value_to_any("float", 0.5),
            a_id: value_to_any("integer", 9),
            "ghost": value_to_any("integer", 1),
            "b": value_to_any("float", 0.5),
        },
        atomic=False,
    )
    assert not reply.success
    assert set(reply.errors) == {"ghost", "b"}
    assert "Variable not found: ghost" in reply.errors["ghost"]
    assert dict(reply.new_versions) == {"a": 2, a_id: 2}
    assert (bridge.get("a").value, bridge.get("b").value) == (0.5, 9)


def test_set_variables_on_unknown_session_is_not_found(bridge: Bridge) -> None:
    request = pb.BatchSetVariablesRequest(session_id="nope", updates={"a": any_pb2.Any()}, atomic=True)
    err = rpc_error(lambda: bridge.stub.SetVariables(request, timeout=DEADLINE))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "Session not found: nope")


def test_list_variables_globs_whole_names_in_creation_order(bridge: Bridge) -> None:
    for name in ("b_one", "a_two", "b_three", "c"):
        bridge.register(name, "integer", 1)

    def names(pattern: str) -> list[str]:
        reply = bridge.stub.ListVariables(pb.ListVariablesRequest(session_id=SID, pattern=pattern), timeout=DEADLINE)
        return [v.name for v in reply.variables]

    assert names("") == ["b_one", "a_two", "b_three", "c"]
    assert names("*") == ["b_one", "a_two", "b_three", "c"]
    assert names("b_*") == ["b_one", "b_three"]
    assert names("*two") == ["a_two"]
    assert names("b") == []


def test_delete_variable_then_name_is_free_again(bridge: Bridge) -> None:
    bridge.register("gone", "integer", 1)
    reply = bridge.stub.DeleteVariable(pb.DeleteVariableRequest(session_id=SID, variable_identifier="gone"))
    assert reply.success
    assert rpc_error(lambda: bridge.get("gone")).code() == grpc.StatusCode.NOT_FOUND
    bridge.register("gone", "integer", 2)
    assert (bridge.get("gone").value, bridge.get("gone").version) == (2, 1)


def test_history_is_newest_first_and_rollback_is_a_new_version(tuned: Bridge) -> None:
    for value in (0.8, 0.9, 1.0):
        tuned.set("temperature", "float", value)

    def history(limit: int = 0) -> list[tuple[int, Any, str]]:
        reply = tuned.stub.GetVariableHistory(
            pb.GetVariableHistoryRequest(session_id=SID, variable_identifier="temperature", limit=limit),
            timeout=DEADLINE,
        )
        return [(e.version, any_to_value(e.value), e.changed_by) for e in reply.entries]

    assert [(v, x) for v, x, _ in history()] == [(4, 1.0), (3, 0.9), (2, 0.8), (1, 0.7)]
    assert [v for v, _, _ in history(limit=2)] == [4, 3]
    assert {by for _, _, by in history()[:3]} == {"worker"}

    reply = tuned.stub.RollbackVariable(
        pb.RollbackVariableRequest(session_id=SID, variable_identifier="temperature", target_version=2),
        timeout=DEADLINE,
    )
    rolled = proto_to_variable(reply.variable)
    assert (reply.success, rolled.version, rolled.value) == (True, 5, 0.8)
    assert history(limit=1)[0][:2] == (5, 0.8)
    assert tuned.get("temperature").value == 0.8


def test_register_keeps_version_creation_time_and_description(bridge: Bridge) -> None:
    created = 1_700_000_000.5
    reply = bridge.stub.RegisterVariable(
        pb.RegisterVariableRequest(
            session_id=SID,
            name="migrated",
            type="choice",
            initial_value=value_to_any("choice", "b"),
            constraints_json='{"choices": ["a", "b"]}',
            metadata={"migrated_from": "local"},
            description="moved over",
            initial_version=7,
            created_at=timestamp(created),
        ),
        timeout=DEADLINE,
    )
    assert reply.success
    assert reply.variable_id.startswith("var_migrated_")
    var = bridge.get("migrated")
    assert (var.version, var.created_at, var.description, var.value) == (7, created, "moved over", "b")
    assert var.metadata["migrated_from"] == "local"
    assert var.constraints == {"choices": ["a", "b"]}
    assert bridge.set("migrated", "choice", "a") == 8

    bridge.register("plain", "integer", 3)
    assert bridge.get("plain").version == 1


def test_writers_are_workers_unless_they_say_orchestrator(tuned: Bridge) -> None:
    tuned.set("temperature", "float", 1.0)
    assert tuned.get("temperature").source == "worker"
    request = pb.SetVariableRequest(session_id=SID, variable_identifier="temperature", value=value_to_any("float", 1.1))
    tuned.stub.SetVariable(request, timeout=DEADLINE, metadata=(("source", "orchestrator"),))
    assert tuned.get("temperature").source == "orchestrator"
    tuned.set("temperature", "float", 1.2, metadata={"source": "elixir", "note": "n"})
    var = tuned.get("temperature")
    assert var.source == "orchestrator"
    assert var.metadata["note"] == "n"
    history = tuned.stub.GetVariableHistory(
        pb.GetVariableHistoryRequest(session_id=SID, variable_identifier="temperature", limit=1)
    )
    assert dict(history.entries[0].metadata) == {"source": "elixir", "note": "n"}
    raw = tuned.stub.GetVariable(pb.GetVariableRequest(session_id=SID, variable_identifier="temperature"))
    assert raw.variable.source == pb.Variable.ELIXIR


def test_binary_values_are_accepted(bridge: Bridge) -> None:
    any_msg, data = value_to_binary("tensor", {"shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]})
    bridge.stub.RegisterVariable(
        pb.RegisterVariableRequest(
            session_id=SID, name="w", type="tensor", initial_value=any_msg, initial_binary_value=data
        ),
        timeout=DEADLINE,
    )
    assert bridge.get("w").value == {"shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}
    any_msg, data = value_to_binary("tensor", {"shape": [4], "data": [5.0, 6.0, 7.0, 8.0]})
    request = pb.SetVariableRequest(session_id=SID, variable_identifier="w", value=any_msg, binary_value=data)
    assert bridge.stub.SetVariable(request, timeout=DEADLINE).new_version == 2
    assert bridge.get("w").value == {"shape": [4], "data": [5.0, 6.0, 7.0, 8.0]}


# ------------------------------------------------------------------------------------- watching


def test_watch_sends_the_snapshot_then_increasing_versions_ending_at_the_latest(bridge: Bridge) -> None:
    x_id = bridge.register("x", "integer", 0)
    bridge.register("other", "integer", 0)
    stream = bridge.watch(["x"])
    first = stream.update()
    assert (first.update_type, first.variable_id, first.variable.version) == ("initial_value", x_id, 1)

    for value in range(1, 101):
        bridge.set("x", "integer", value)
    bridge.set("other", "integer", 1)

    versions: list[int] = []
    while not versions or versions[-1] < 101:
        update = stream.update()
        assert (update.update_type, update.variable_id) == ("value_change", x_id)
        var = proto_to_variable(update.variable)
        assert var.value == var.version - 1
        versions.append(var.version)
    assert versions == sorted(set(versions))
    assert versions[-1] == 101
    stream.close()


def test_watch_reports_deletion(bridge: Bridge) -> None:
    x_id = bridge.register("x", "integer", 5)
    stream = bridge.watch(["x"], initial=False)
    bridge.stub.DeleteVariable(pb.DeleteVariableRequest(session_id=SID, variable_identifier="x"), timeout=DEADLINE)
    update = stream.update()
    assert (update.update_type, update.variable_id, update.variable.name) == ("deleted", x_id, "x")
    stream.close()


def test_watch_sends_heartbeats_with_an_empty_variable_id(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(heartbeat_interval=0.2)
    stream = bridge.watch()
    item = stream.next(heartbeats=True)
    assert isinstance(item, pb.VariableUpdate)
    assert (item.update_type, item.variable_id, item.HasField("variable")) == ("heartbeat", "", False)
    assert from_timestamp(item.timestamp) > 0
    stream.close()


def test_watch_of_all_variables_sees_later_registrations(bridge: Bridge) -> None:
    bridge.register("early", "integer", 1)
    stream = bridge.watch()
    initial = stream.update()
    assert (initial.update_type, initial.variable.name) == ("initial_value", "early")
    late_id = bridge.register("late", "string", "hi")
    update = stream.update()
    assert (update.update_type, update.variable_id, update.variable.name) == ("value_change", late_id, "late")
    bridge.set("late", "string", "there")
    assert proto_to_variable(stream.update().variable).value == "there"
    stream.close()


def test_watch_of_an_unknown_variable_is_not_found(bridge: Bridge) -> None:
    err = bridge.watch(["ghost"]).next()
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    wait_until(lambda: bridge.server.servicer.active_watches == 0, "the failed watch to release its slot")
    bridge.still_serves()


def test_watch_ends_with_not_found_when_its_session_is_cleaned_up(bridge: Bridge) -> None:
    bridge.register("x", "integer", 1)
    stream = bridge.watch(["x"])
    assert stream.update().update_type == "initial_value"
    bridge.stub.CleanupSession(pb.CleanupSessionRequest(session_id=SID), timeout=DEADLINE)
    err = stream.next()
    assert isinstance(err, grpc.RpcError)
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, f"Session not found: {SID}")
    wait_until(lambda: bridge.store.watcher_count == 0, "the store to forget the watcher")


# ------------------------------------------------------------------------------------------- TTL


class FakeClock:
    """The clock a store measures TTLs on, moved only by the test: a TTL passes when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


TTL_S = 10.0  # on the fake clock: no test here waits for it in real time


def fake_clock_store(clock: FakeClock) -> SessionStore:
    return SessionStore(default_ttl=TTL_S, storage=MemoryStorage(monotonic=clock.monotonic))


def expires_in(store: SessionStore, session_id: str) -> float | None:
    """Seconds left of the session's TTL, looked at without refreshing it (None: expired or gone)."""
    return next((info.expires_in for info in store.list_sessions() if info.id == session_id), None)


def test_idle_sessions_expire_and_the_sweep_removes_them(make_bridge: Callable[..., Bridge]) -> None:
    clock = FakeClock()
    # No watch heartbeat within the test (it would refresh the session): only the fake clock ages it.
    bridge = make_bridge(store=fake_clock_store(clock), heartbeat_interval=3600.0)
    bridge.register("x", "integer", 1)
    stream = bridge.watch(["x"])
    assert stream.update().update_type == "initial_value"
    clock.advance(0.9 * TTL_S)
    assert bridge.store.has_session(SID)  # not yet idle for its TTL (and the look does not refresh it) ...
    assert bridge.store.sweep() == []
    clock.advance(0.2 * TTL_S)
    assert not bridge.store.has_session(SID)  # ... now it is
    assert bridge.store.sweep() == [SID]
    err = stream.next()
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert bridge.store.session_ids() == []
    err = rpc_error(lambda: bridge.stub.GetSession(pb.GetSessionRequest(session_id=SID), timeout=DEADLINE))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, f"Session not found: {SID}")
    assert not bridge.stub.Heartbeat(pb.HeartbeatRequest(session_id=SID), timeout=DEADLINE).session_valid


def test_heartbeats_keep_a_session_alive(make_bridge: Callable[..., Bridge]) -> None:
    clock = FakeClock()
    bridge = make_bridge(store=fake_clock_store(clock), session=False)
    for sid in ("kept", "idle"):
        bridge.stub.InitializeSession(pb.InitializeSessionRequest(session_id=sid), timeout=DEADLINE)

    def beat() -> bool:
        reply = bridge.stub.Heartbeat(
            pb.HeartbeatRequest(session_id="kept", client_time=timestamp(time.time())), timeout=DEADLINE
        )
        return bool(reply.session_valid)

    # Both sessions start together; "kept" is beaten every 0.4 TTL while "idle" runs out its TTL.
    for _ in range(3):
        clock.advance(0.4 * TTL_S)
        assert beat()
    assert not bridge.store.has_session("idle")
    assert bridge.store.has_session("kept")
    assert beat()
    assert bridge.stub.GetSession(pb.GetSessionRequest(session_id="kept"), timeout=DEADLINE).session_id == "kept"
    assert bridge.store.sweep() == ["idle"]


# -------------------------------------------------------------------------------------- shutdown


def test_shutting_down_refuses_new_calls_with_unavailable(tuned: Bridge) -> None:
    stream = tuned.watch(["temperature"])
    assert stream.update().update_type == "initial_value"
    tuned.server.servicer.begin_shutdown()
    err = rpc_error(lambda: tuned.stub.Ping(pb.PingRequest(), timeout=DEADLINE))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "the bridge server is shutting down")
    err = rpc_error(lambda: tuned.get("temperature"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert stream.next() is END


def test_graceful_stop_ends_open_watch_streams(bridge: Bridge) -> None:
    bridge.register("x", "integer", 1)
    streams = [bridge.watch(["x"]), bridge.watch()]
    for stream in streams:
        assert stream.update().update_type == "initial_value"
    stopper = threading.Thread(target=bridge.server.stop, args=(5.0,))
    stopper.start()
    for stream in streams:
        end = stream.next()
        assert end is END or (
            isinstance(end, grpc.RpcError) and end.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        ), end
    stopper.join(DEADLINE)
    assert not stopper.is_alive()
    assert not bridge.server.running
    assert bridge.server.wait_for_termination(DEADLINE)
    err = rpc_error(lambda: bridge.stub.Ping(pb.PingRequest(), timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_server_created_without_a_store_owns_and_closes_it() -> None:
    server, port = create_server()
    with server:
        assert server.running
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.BridgeServiceStub(channel)
            stub.InitializeSession(pb.InitializeSessionRequest(session_id="own"), timeout=DEADLINE)
        assert server.store.has_session("own")
    assert not server.running
    with pytest.raises(Exception, match="closed"):
        server.store.create_session("after")


def test_limits_validate_the_store_call_pool() -> None:
    with pytest.raises(ValueError, match="max_workers must be at least 1"):
        ServerLimits(max_workers=0)
    # Watch streams hold no thread: a pool smaller than the watch cap is fine.
    assert ServerLimits(max_watchers=8, max_workers=2).workers == 2
    assert ServerLimits().max_watchers >= 1024


def test_open_watches_hold_no_thread_of_the_store_call_pool(make_bridge: Callable[..., Bridge]) -> None:
    bridge = make_bridge(limits=ServerLimits(max_watchers=64, max_workers=1))
    bridge.register("x", "integer", 0)
    watches = [bridge.watch(["x"]) for _ in range(16)]
    for watch in watches:
        assert watch.update().update_type == "initial_value"
    # Sixteen idle streams and a one-thread pool: unary calls still run, and every stream sees the write.
    assert bridge.set("x", "integer", 1) == 2
    for watch in watches:
        assert watch.update().variable.version == 2
        watch.close()
    bridge.still_serves()


# -------------------------------------------------------------------------------------- embedded


def test_embedded_bridge_is_a_lazy_singleton_that_can_be_restarted() -> None:
    first = EmbeddedBridge.get()
    try:
        assert EmbeddedBridge.get() is first
        assert first.host == "127.0.0.1"
        first.store.create_session("embedded")
        with grpc.insecure_channel(first.address) as channel:
            stub = pb_grpc.BridgeServiceStub(channel)
            info = stub.GetSession(pb.GetSessionRequest(session_id="embedded"), timeout=DEADLINE)
            assert info.session_id == "embedded"
        EmbeddedBridge.shutdown()
        assert not first.running
        second = EmbeddedBridge.get()
        assert second is not first
        assert second.running
        assert not second.store.has_session("embedded")
    finally:
        EmbeddedBridge.shutdown()


def test_an_open_watch_keeps_its_session_from_expiring(make_bridge: Callable[..., Bridge]) -> None:
    """Each heartbeat of an open watch refreshes the session's TTL; once the watch closes, it expires."""
    clock = FakeClock()
    bridge = make_bridge(store=fake_clock_store(clock), heartbeat_interval=0.1)
    bridge.register("x", "integer", 1)
    stream = bridge.watch(["x"])
    assert stream.update().update_type == "initial_value"
    # Five times 0.4 TTL: two TTLs pass while the watch is open, yet never 0.4 TTL without a refresh.
    for _ in range(5):
        clock.advance(0.4 * TTL_S)
        # Only the watch's heartbeats touch the session: a full TTL left now is a refresh since the advance.
        wait_until(lambda: expires_in(bridge.store, SID) == TTL_S, "a heartbeat of the open watch to refresh it")
        item = stream.next(heartbeats=True)  # nothing is written: the stream carries heartbeats only
        assert isinstance(item, pb.VariableUpdate) and item.update_type == "heartbeat", item
    assert bridge.store.sweep() == []
    assert bridge.store.has_session(SID)

    stream.close()
    wait_until(lambda: bridge.server.servicer.active_watches == 0, "the server to end the closed watch")
    assert bridge.store.has_session(SID)  # closing its watch does not end the session ...
    clock.advance(1.1 * TTL_S)
    assert not bridge.store.has_session(SID)  # ... but with nothing refreshing it, its TTL runs out
    # Swept now, unless a heartbeat the closed stream had under way already found it expired and ended it.
    bridge.store.sweep()
    assert bridge.store.session_ids() == []
