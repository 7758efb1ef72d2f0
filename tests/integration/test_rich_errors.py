"""Structured errors end to end: a real bridge server, plain gRPC clients and both worker clients.

A client that knows nothing of this package (a raw generated stub plus grpcio-status) reads each
failure's ``google.rpc.ErrorInfo``; the status code and message stay exactly what a snakepit 0.4
peer reads; and the worker clients raise the very exception the server raised, per batch entry too.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from workers.adapters import CLIENTS

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import (
    BatchUpdateError,
    BridgeError,
    LimitExceededError,
    ValidationError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.guard import MAX_IDENTIFIER_LENGTH
from dspex_dspy.server import BridgeServer, ServerLimits, create_server
from dspex_dspy.store import SessionStore
from dspex_dspy.types import TYPE_URL_PREFIX
from dspex_dspy.wire import value_to_any
from dspex_dspy.wire_errors import DOMAIN, error_from_rpc

pytestmark = pytest.mark.integration

DEADLINE = 20.0


@pytest.fixture(scope="module")
def server() -> Iterator[BridgeServer]:
    bridge, _ = create_server()
    bridge.start()
    yield bridge
    bridge.stop()


@pytest.fixture(scope="module")
def stub(server: BridgeServer) -> Iterator[Any]:
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.BridgeServiceStub(channel)
    channel.close()


@pytest.fixture
def session(server: BridgeServer) -> str:
    session_id = "s_" + secrets.token_hex(6)
    server.store.create_session(session_id)
    server.store.register_variable(session_id, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    server.store.register_variable(session_id, "status", "integer", 0)
    return session_id


def failure(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def error_info(err: grpc.RpcError) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo]:
    """What a plain gRPC client reads: the rich status (grpcio-status) and its ErrorInfo."""
    status = rpc_status.from_call(err)
    assert status is not None, "the failure carries no google.rpc.Status"
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    return status, info


def json_any(type_: str, value: Any) -> any_pb2.Any:
    """A value as raw JSON under a type URL, the way any peer may send it."""
    return any_pb2.Any(type_url=TYPE_URL_PREFIX + type_, value=json.dumps(value).encode())


# ------------------------------------------------------------------ a plain gRPC client


def test_a_plain_client_reads_the_reason_of_a_missing_variable(stub: Any, session: str) -> None:
    err = failure(lambda: stub.GetVariable(pb.GetVariableRequest(session_id=session, variable_identifier="ghost")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == f"Variable not found: ghost in session {session}"
    status, info = error_info(err)
    assert (status.code, status.message) == (grpc.StatusCode.NOT_FOUND.value[0], err.details())
    assert (info.reason, info.domain) == ("VARIABLE_NOT_FOUND", DOMAIN)
    assert dict(info.metadata) == {"variable": "ghost", "session_id": session}


@pytest.mark.parametrize("length", [200, MAX_IDENTIFIER_LENGTH])
def test_a_long_identifier_still_gets_its_status(stub: Any, session: str, length: int) -> None:
    ident = "x" * length
    err = failure(lambda: stub.GetVariable(pb.GetVariableRequest(session_id=session, variable_identifier=ident)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == f"Variable not found: {ident} in session {session}"
    rebuilt = error_from_rpc(err, identifier=ident, session_id=session)
    assert isinstance(rebuilt, VariableNotFoundError)
    assert (rebuilt.identifier, rebuilt.session_id, str(rebuilt)) == (ident, session, err.details())


@pytest.mark.parametrize("length", [MAX_IDENTIFIER_LENGTH + 1, 8000, 20_000])
def test_an_identifier_past_the_bound_is_refused_without_being_echoed(stub: Any, session: str, length: int) -> None:
    ident = "x" * length
    err = failure(lambda: stub.GetVariable(pb.GetVariableRequest(session_id=session, variable_identifier=ident)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"is {length} characters long" in err.details() and len(err.details()) < 300
    rebuilt = error_from_rpc(err, identifier=ident, session_id=session)
    assert isinstance(rebuilt, ValidationError) and rebuilt.rule == "variable_identifier"


def test_a_non_ascii_identifier_keeps_its_details(stub: Any, session: str) -> None:
    ident = "température ✓ 温度"
    err = failure(lambda: stub.GetVariable(pb.GetVariableRequest(session_id=session, variable_identifier=ident)))
    assert err.details() == f"Variable not found: {ident} in session {session}"
    _, info = error_info(err)
    assert info.metadata["variable"] == ident
    rebuilt = error_from_rpc(err)
    assert isinstance(rebuilt, VariableNotFoundError) and rebuilt.identifier == ident


def test_a_plain_client_reads_the_reason_of_a_missing_session(stub: Any) -> None:
    err = failure(lambda: stub.GetSession(pb.GetSessionRequest(session_id="nope")))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "Session not found: nope")
    _, info = error_info(err)
    assert (info.reason, dict(info.metadata)) == ("SESSION_NOT_FOUND", {"session_id": "nope"})


def test_a_plain_client_reads_a_rejected_value_with_its_field_violation(stub: Any, session: str) -> None:
    request = pb.SetVariableRequest(session_id=session, variable_identifier="temperature")
    request.value.CopyFrom(value_to_any("float", 2.5))
    err = failure(lambda: stub.SetVariable(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "temperature: 2.5 is above the maximum 2.0 (rule max)"
    status, info = error_info(err)
    assert info.reason == "VALIDATION_FAILED"
    assert dict(info.metadata) == {
        "variable": "temperature",
        "rule": "max",
        "value": "2.5",
        "detail": "2.5 is above the maximum 2.0",
    }
    bad_request = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad_request) for detail in status.details)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("temperature", "2.5 is above the maximum 2.0 (rule max)")
    ]


def test_a_plain_client_reads_both_versions_of_a_conflict(stub: Any, session: str) -> None:
    request = pb.SetVariableRequest(session_id=session, variable_identifier="status", expected_version=7)
    request.value.CopyFrom(value_to_any("integer", 1))
    err = failure(lambda: stub.SetVariable(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.ABORTED
    assert err.details() == "status: expected version 7 but the current version is 1"
    _, info = error_info(err)
    assert info.reason == "VERSION_CONFLICT"
    assert dict(info.metadata) == {"variable": "status", "expected_version": "7", "current_version": "1"}


def test_a_plain_client_reads_duplicates_and_unimplemented_calls(stub: Any, session: str) -> None:
    err = failure(lambda: stub.InitializeSession(pb.InitializeSessionRequest(session_id=session)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(err)[1].reason == "SESSION_EXISTS"
    err = failure(lambda: stub.ExecuteTool(pb.ExecuteToolRequest(session_id=session, tool_name="x")))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_info(err)[1].reason == "UNIMPLEMENTED"
    rebuilt = error_from_rpc(err)
    assert type(rebuilt) is BridgeError and rebuilt.code == "UNIMPLEMENTED"


def test_a_value_too_deep_to_decode_is_a_validation_failure(stub: Any, session: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    request = pb.SetVariableRequest(session_id=session, variable_identifier="status")
    request.value.type_url = TYPE_URL_PREFIX + "integer"
    request.value.value = deep
    err = failure(lambda: stub.SetVariable(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, info = error_info(err)
    assert (info.reason, info.metadata["rule"]) == ("VALIDATION_FAILED", "encoding")


def test_a_batch_reports_text_for_old_peers_and_a_status_per_entry(stub: Any, session: str) -> None:
    request = pb.BatchSetVariablesRequest(session_id=session, atomic=False)
    request.updates["status"].CopyFrom(json_any("string", "not found"))
    request.updates["temperature"].CopyFrom(value_to_any("float", 1.5))
    request.updates["ghost"].CopyFrom(value_to_any("integer", 1))
    response = stub.SetVariables(request, timeout=DEADLINE)
    assert not response.success
    assert dict(response.new_versions) == {"temperature": 2}
    assert dict(response.errors) == {
        "status": "status: 'not found' is not an integer (type integer) (rule type)",
        "ghost": f"Variable not found: ghost in session {session}",
    }
    seen = {}
    for ident, packed in response.error_details.items():
        status = status_pb2.Status()
        assert packed.Unpack(status)
        assert status.message == response.errors[ident]
        info = error_details_pb2.ErrorInfo()
        assert any(detail.Unpack(info) for detail in status.details)
        seen[ident] = (status.code, info.reason)
    assert seen == {
        "status": (grpc.StatusCode.INVALID_ARGUMENT.value[0], "VALIDATION_FAILED"),
        "ghost": (grpc.StatusCode.NOT_FOUND.value[0], "VARIABLE_NOT_FOUND"),
    }


def test_an_atomic_batch_rejected_at_decoding_has_details_too(stub: Any, session: str) -> None:
    request = pb.BatchSetVariablesRequest(session_id=session, atomic=True)
    request.updates["status"].CopyFrom(value_to_any("integer", 3))
    request.updates["temperature"].type_url = TYPE_URL_PREFIX + "float"
    request.updates["temperature"].value = b"{not json"
    response = stub.SetVariables(request, timeout=DEADLINE)
    assert not response.success and dict(response.new_versions) == {}
    assert set(response.errors) == set(response.error_details) == {"temperature"}


def test_an_aio_client_rebuilds_the_same_error(server: BridgeServer, session: str) -> None:
    async def run() -> BaseException:
        async with grpc.aio.insecure_channel(server.address) as channel:
            aio_stub = pb_grpc.BridgeServiceStub(channel)
            request = pb.SetVariableRequest(session_id=session, variable_identifier="status", expected_version=4)
            request.value.CopyFrom(value_to_any("integer", 1))
            try:
                await aio_stub.SetVariable(request, timeout=DEADLINE)
            except grpc.aio.AioRpcError as err:
                return error_from_rpc(err)
            raise AssertionError("the write was not rejected")

    rebuilt = asyncio.run(run())
    assert isinstance(rebuilt, VersionConflictError)
    assert (rebuilt.name, rebuilt.expected, rebuilt.actual) == ("status", 4, 1)


# ------------------------------------------------------------------ the worker clients


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest, server: BridgeServer, session: str) -> Iterator[Any]:
    made = CLIENTS[request.param].connect(server.address, session, cache=False)
    yield made
    made.close()


def test_worker_clients_raise_the_servers_exception(client: Any) -> None:
    with pytest.raises(ValidationError) as rejected:
        client.set("temperature", 2.5)
    assert (rejected.value.variable, rejected.value.rule, rejected.value.value) == ("temperature", "max", 2.5)
    with pytest.raises(VersionConflictError) as conflict:
        client.set("status", 1, expected_version=9)
    assert (conflict.value.name, conflict.value.expected, conflict.value.actual) == ("status", 9, 1)
    with pytest.raises(VariableNotFoundError) as missing:
        client.get("ghost")
    assert missing.value.identifier == "ghost"


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "partial"])
def test_worker_batches_keep_each_entrys_class_whatever_its_text(client: Any, atomic: bool) -> None:
    with pytest.raises(BatchUpdateError) as info:
        client.set_many({"status": "not found", "ghost": 1, "temperature": 1.0}, atomic=atomic)
    errors = info.value.errors
    assert set(errors) == {"status", "ghost"}
    status = errors["status"]
    assert type(status) is ValidationError
    assert (status.variable, status.rule, status.value) == ("status", "type", "not found")
    assert type(errors["ghost"]) is VariableNotFoundError
    assert info.value.new_versions == ({} if atomic else {"temperature": 2})


# ------------------------------------------------------------------ limits and internal errors


class _BrokenStore(SessionStore):
    """A store with a bug: reading a session fails with an exception no error class describes."""

    def get_session(self, session_id: str) -> Any:
        raise ZeroDivisionError("a bug in the store")


def test_a_limit_carries_what_was_exceeded() -> None:
    bridge, _ = create_server(limits=ServerLimits(max_value_bytes=64))
    with bridge:
        bridge.store.create_session("s1")
        bridge.store.register_variable("s1", "text", "string", "short")
        with grpc.insecure_channel(bridge.address) as channel:
            request = pb.SetVariableRequest(session_id="s1", variable_identifier="text")
            request.value.CopyFrom(value_to_any("string", "x" * 100))
            err = failure(lambda: pb_grpc.BridgeServiceStub(channel).SetVariable(request, timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, info = error_info(err)
    assert (info.reason, dict(info.metadata)) == (
        "LIMIT_EXCEEDED",
        {"limit": "text: value size in bytes", "value": "102", "maximum": "64"},
    )
    rebuilt = error_from_rpc(err)
    assert isinstance(rebuilt, LimitExceededError)
    assert (rebuilt.limit, rebuilt.value, rebuilt.maximum, str(rebuilt)) == (
        "text: value size in bytes",
        102,
        64,
        err.details(),
    )


def test_a_bug_in_the_server_is_internal_and_says_so() -> None:
    bridge, _ = create_server(_BrokenStore())
    with bridge, grpc.insecure_channel(bridge.address) as channel:
        err = failure(lambda: pb_grpc.BridgeServiceStub(channel).GetSession(pb.GetSessionRequest(session_id="s1")))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "GetSession: internal error in the bridge server: ZeroDivisionError: a bug in the store"
    assert error_info(err)[1].reason == "INTERNAL"
    rebuilt = error_from_rpc(err)
    assert type(rebuilt) is BridgeError
    assert (rebuilt.code, rebuilt.reason, str(rebuilt)) == ("INTERNAL", "INTERNAL", err.details())
