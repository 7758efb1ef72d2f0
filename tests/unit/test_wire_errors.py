"""Errors on the wire: each error <-> a status code plus google.rpc rich details, and back, exactly."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import (
    BridgeError,
    BridgeUnavailableError,
    DSPexError,
    LimitExceededError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.remote import BridgeCalls
from dspex_dspy.wire_errors import (
    DOMAIN,
    MAX_DETAIL_VALUE_CHARS,
    MAX_TRAILER_STATUS_BYTES,
    REASONS,
    error_from_rpc,
    error_from_status,
    error_info,
    pack_status,
    reported_failure,
    rpc_status_for,
    status_for,
    status_proto,
    unpack_status,
)

pytestmark = pytest.mark.unit

FIELDS = (
    "variable",
    "rule",
    "value",
    "detail",
    "identifier",
    "name",
    "expected",
    "actual",
    "session_id",
    "limit",
    "maximum",
    "optimizer_id",
    "message",
)


class RpcFailure(grpc.RpcError):
    """A failed call as a blocking stub raises it: ``code()``, ``details()``, ``trailing_metadata()``."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._trailing = trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def failed_call(exc: DSPexError) -> RpcFailure:
    """The failure a stub raises when the server ends the call with ``exc``'s rich status."""
    status = rpc_status_for(exc)
    return RpcFailure(status.code, status.details, tuple(status.trailing_metadata))


def same_error(rebuilt: DSPexError, original: DSPexError) -> None:
    assert type(rebuilt) is type(original)
    assert str(rebuilt) == str(original)
    assert rebuilt.args == original.args
    for attr in FIELDS:
        if hasattr(original, attr):
            want, got = getattr(original, attr), getattr(rebuilt, attr)
            if isinstance(want, float) and math.isnan(want):
                assert isinstance(got, float) and math.isnan(got), attr
            else:
                assert got == want, attr


ERRORS: list[tuple[DSPexError, grpc.StatusCode, str]] = [
    (
        ValidationError("temperature", "max", 2.5, "2.5 is above the maximum 2.0"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    ),
    (VariableNotFoundError("ghost", "s1"), grpc.StatusCode.NOT_FOUND, "VARIABLE_NOT_FOUND"),
    (VariableNotFoundError("ghost"), grpc.StatusCode.NOT_FOUND, "VARIABLE_NOT_FOUND"),
    (SessionNotFoundError("s1"), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"),
    (VariableExistsError("temperature", "s1"), grpc.StatusCode.ALREADY_EXISTS, "VARIABLE_EXISTS"),
    (SessionExistsError("s1"), grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS"),
    (VersionConflictError("temperature", 3, 5), grpc.StatusCode.ABORTED, "VERSION_CONFLICT"),
    (LimitExceededError("variables per session", 11, 10), grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"),
    (VariableLockedError("temperature", "tuner-1"), grpc.StatusCode.FAILED_PRECONDITION, "VARIABLE_LOCKED"),
    (BridgeUnavailableError("store closed"), grpc.StatusCode.UNAVAILABLE, "BRIDGE_UNAVAILABLE"),
]
IDS = [f"{type(e).__name__}-{i}" for i, (e, _, _) in enumerate(ERRORS)]


@pytest.mark.parametrize(("exc", "code", "reason"), ERRORS, ids=IDS)
def test_status_code_and_message_are_what_a_snakepit_peer_expects(
    exc: DSPexError, code: grpc.StatusCode, reason: str
) -> None:
    assert status_for(exc) == code
    status = rpc_status_for(exc)
    assert status.code == code
    assert status.details == str(exc)


def test_anything_else_is_internal() -> None:
    assert status_for(ZeroDivisionError()) == grpc.StatusCode.INTERNAL
    assert status_for(DSPexError("odd")) == grpc.StatusCode.INTERNAL
    assert error_info(DSPexError("odd")).reason == "INTERNAL"


@pytest.mark.parametrize(("exc", "code", "reason"), ERRORS, ids=IDS)
def test_error_info_names_the_kind_in_the_bridge_domain(exc: DSPexError, code: grpc.StatusCode, reason: str) -> None:
    info = error_info(exc)
    assert (info.reason, info.domain) == (reason, DOMAIN)
    assert REASONS[type(exc)] == reason
    status = status_proto(exc)
    assert status.code == code.value[0]
    unpacked = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(unpacked)
    assert unpacked == info


def test_error_info_metadata_carries_the_fields() -> None:
    conflict = dict(error_info(VersionConflictError("t", 3, 5)).metadata)
    assert conflict == {"variable": "t", "expected_version": "3", "current_version": "5"}
    missing = dict(error_info(VariableNotFoundError("ghost", "s1")).metadata)
    assert missing == {"variable": "ghost", "session_id": "s1"}
    rejected = dict(error_info(ValidationError("t", "max", [2.5, "x"], "too big")).metadata)
    assert rejected == {"variable": "t", "rule": "max", "detail": "too big", "value": '[2.5,"x"]'}


def test_a_validation_error_also_has_a_bad_request_field_violation() -> None:
    status = status_proto(ValidationError("temperature", "max", 2.5, "2.5 is above the maximum 2.0"))
    bad_request = error_details_pb2.BadRequest()
    assert [d.Unpack(bad_request) for d in status.details] == [False, True]
    (violation,) = bad_request.field_violations
    assert violation.field == "temperature"
    assert violation.description == "2.5 is above the maximum 2.0 (rule max)"


@pytest.mark.parametrize(("exc", "code", "reason"), ERRORS, ids=IDS)
def test_a_failed_call_rebuilds_exactly_the_servers_error(exc: DSPexError, code: grpc.StatusCode, reason: str) -> None:
    # The call's own identifier and session are deliberately different: the details win.
    same_error(error_from_rpc(failed_call(exc), identifier="other", session_id="s9"), exc)


@pytest.mark.parametrize(
    "value",
    [2.5, 7, "not found", "already exists", True, [1.0, [2.0]], {"shape": [3], "data": [1.0]}, math.nan, -math.inf],
    ids=repr,
)
def test_a_rejected_value_survives_the_round_trip(value: Any) -> None:
    exc = ValidationError("v", "type", value, "bad value")
    same_error(error_from_rpc(failed_call(exc)), exc)
    same_error(unpack_status(pack_status(exc)), exc)


@pytest.mark.parametrize(
    ("value", "why"),
    [("x" * MAX_DETAIL_VALUE_CHARS, "characters of JSON"), (b"\x00raw", "bytes is not JSON"), (object(), "not JSON")],
    ids=["too-large", "bytes", "object"],
)
def test_a_value_that_cannot_travel_is_left_out_and_says_why(value: Any, why: str) -> None:
    exc = ValidationError("v", "type", value, "bad value")
    assert why in error_info(exc).metadata["value_omitted"]
    rebuilt = error_from_rpc(failed_call(exc))
    assert isinstance(rebuilt, ValidationError)
    assert (rebuilt.variable, rebuilt.rule, rebuilt.value, str(rebuilt)) == ("v", "type", None, str(exc))


def test_trailers_stay_small_enough_for_grpc() -> None:
    # A value that fits in the details on its own, but not next to a long detail: the value goes first.
    long_detail = ValidationError("v", "type", "x" * 1000, "d" * 400)
    assert status_proto(long_detail).ByteSize() > MAX_TRAILER_STATUS_BYTES
    trailer = dict(rpc_status_for(long_detail).trailing_metadata)
    sent = status_pb2.Status.FromString(trailer["grpc-status-details-bin"])
    assert sent.ByteSize() <= MAX_TRAILER_STATUS_BYTES
    info = error_details_pb2.ErrorInfo()
    assert sent.details[0].Unpack(info) and "value_omitted" in info.metadata
    # An identifier of thousands of characters: no details at all, the code and message as always.
    huge = VariableNotFoundError("x" * 3000, "s1")
    status = rpc_status_for(huge)
    assert (status.code, status.details, tuple(status.trailing_metadata)) == (
        grpc.StatusCode.NOT_FOUND,
        str(huge),
        (),
    )
    same_error(error_from_rpc(RpcFailure(status.code, status.details), identifier="x" * 3000, session_id="s1"), huge)


def test_text_that_cannot_be_utf8_still_gets_its_status() -> None:
    status = rpc_status_for(VariableNotFoundError("x\ud800"))
    assert (status.code, status.details, tuple(status.trailing_metadata)) == (
        grpc.StatusCode.NOT_FOUND,
        "Variable not found: x\\ud800",
        (),
    )


def test_grpc_aio_failures_are_read_the_same_way() -> None:
    exc = VersionConflictError("temperature", 3, 5)
    status = rpc_status_for(exc)
    err = grpc.aio.AioRpcError(
        status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details
    )
    same_error(error_from_rpc(err), exc)


def test_text_is_never_read_for_the_kind() -> None:
    # A rejected value whose text says "not found" stays a validation error.
    exc = ValidationError("status", "type", "not found", "'not found' is not an integer (type integer)")
    rebuilt = error_from_rpc(failed_call(exc))
    assert type(rebuilt) is ValidationError
    # Without details, the status code decides, whatever the text says.
    plain = error_from_rpc(RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)), identifier="status")
    assert type(plain) is ValidationError
    entry = pb.BatchSetVariablesResponse(success=False, errors={"status": str(exc)})
    result = BridgeCalls.set_variables("s1", {"status": "not found"}, source="worker").parse(entry)
    assert type(result.errors["status"]) is BridgeError
    assert str(result.errors["status"]) == str(exc)


def test_batch_entries_are_rebuilt_from_their_details() -> None:
    exc = ValidationError("status", "type", "not found", "'not found' is not an integer (type integer)")
    response = pb.BatchSetVariablesResponse(
        success=False, errors={"status": str(exc)}, new_versions={"b": 2}, error_details={"status": pack_status(exc)}
    )
    result = BridgeCalls.set_variables("s1", {"status": "not found", "b": 1}, source="worker").parse(response)
    same_error(result.errors["status"], exc)
    assert result.new_versions == {"b": 2}


@pytest.mark.parametrize(
    "response",
    [pb.SetVariableResponse(success=False), pb.SetVariableResponse(success=False, error_message="")],
    ids=["unset", "empty"],
)
def test_a_failure_flag_without_a_message_is_an_error(response: pb.SetVariableResponse) -> None:
    call = BridgeCalls.set_variable("s1", "t", 0.5, source="worker")
    with pytest.raises(BridgeError, match="SetVariable failed and the bridge gave no reason"):
        call.parse(response)


def test_a_batch_failure_flag_that_names_no_entry_is_an_error() -> None:
    call = BridgeCalls.set_variables("s1", {"t": 0.5}, source="worker")
    with pytest.raises(BridgeError, match="SetVariables failed and the bridge gave no reason"):
        call.parse(pb.BatchSetVariablesResponse(success=False))
    assert call.parse(pb.BatchSetVariablesResponse(success=True, new_versions={"t": 2})).new_versions == {"t": 2}


def test_a_failure_flag_with_a_message_keeps_the_peers_text() -> None:
    call = BridgeCalls.delete_variable("s1", "t", source="worker")
    with pytest.raises(BridgeError) as info:
        call.parse(pb.DeleteVariableResponse(success=False, error_message="Variable not found: t"))
    assert str(info.value) == "Variable not found: t"
    assert reported_failure("X", "").message == "X failed and the bridge gave no reason"


@pytest.mark.parametrize(
    ("code", "details", "cls", "check"),
    [
        (grpc.StatusCode.NOT_FOUND, "variable x is missing", VariableNotFoundError, ("identifier", "temperature")),
        (grpc.StatusCode.NOT_FOUND, "Session not found: s2", SessionNotFoundError, ("session_id", "s2")),
        (grpc.StatusCode.INVALID_ARGUMENT, "value is bad", ValidationError, ("variable", "temperature")),
        (grpc.StatusCode.ABORTED, "version mismatch", VersionConflictError, ("expected", -1)),
        (grpc.StatusCode.ALREADY_EXISTS, "duplicate", VariableExistsError, ("name", "temperature")),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max", LimitExceededError, ("maximum", -1)),
        (grpc.StatusCode.FAILED_PRECONDITION, "optimizing", VariableLockedError, ("name", "temperature")),
    ],
)
def test_a_peer_without_details_gets_the_class_of_its_code(
    code: grpc.StatusCode, details: str, cls: type[DSPexError], check: tuple[str, Any]
) -> None:
    rebuilt = error_from_rpc(RpcFailure(code, details), identifier="temperature", session_id="s1")
    assert type(rebuilt) is cls
    assert str(rebuilt) == details
    assert rebuilt.args == (details,)
    assert getattr(rebuilt, check[0]) == check[1]


def test_session_calls_without_details_are_about_the_session() -> None:
    assert type(error_from_rpc(RpcFailure(grpc.StatusCode.NOT_FOUND, "gone"), session_id="s1")) is SessionNotFoundError
    exists = error_from_rpc(RpcFailure(grpc.StatusCode.ALREADY_EXISTS, "taken"), session_id="s1")
    assert isinstance(exists, SessionExistsError) and exists.session_id == "s1"


def test_details_that_contradict_the_call_are_ignored() -> None:
    status = rpc_status_for(VariableNotFoundError("ghost", "s1"))
    err = RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "bad value", tuple(status.trailing_metadata))
    rebuilt = error_from_rpc(err, identifier="t")
    assert type(rebuilt) is ValidationError
    assert str(rebuilt) == "bad value"


def test_details_of_another_domain_are_not_ours() -> None:
    foreign = any_pb2.Any()
    foreign.Pack(error_details_pb2.ErrorInfo(reason="VARIABLE_NOT_FOUND", domain="example.com"))
    status = status_pb2.Status(code=grpc.StatusCode.ABORTED.value[0], message="busy", details=[foreign])
    rebuilt = error_from_status(status, identifier="t")
    assert type(rebuilt) is VersionConflictError
    assert str(rebuilt) == "busy"


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED]
)
def test_connection_failures_are_bridge_unavailable(code: grpc.StatusCode) -> None:
    rebuilt = error_from_rpc(RpcFailure(code, "failed to connect to all addresses"))
    assert isinstance(rebuilt, BridgeUnavailableError)
    assert isinstance(rebuilt, ConnectionError)
    assert "failed to connect to all addresses" in str(rebuilt)


def test_other_codes_are_bridge_errors_with_the_code_and_reason() -> None:
    plain = error_from_rpc(RpcFailure(grpc.StatusCode.UNIMPLEMENTED, "ExecuteTool is not implemented"))
    assert type(plain) is BridgeError
    assert str(plain) == "UNIMPLEMENTED: ExecuteTool is not implemented"
    assert (plain.code, plain.reason) == ("UNIMPLEMENTED", "")
    status = rpc_status_for(code=grpc.StatusCode.UNIMPLEMENTED, message="ExecuteTool is not implemented")
    rich = error_from_rpc(RpcFailure(status.code, status.details, tuple(status.trailing_metadata)))
    assert type(rich) is BridgeError
    assert (str(rich), rich.code, rich.reason) == ("ExecuteTool is not implemented", "UNIMPLEMENTED", "UNIMPLEMENTED")


def test_a_detail_that_is_not_a_status_is_reported_as_such() -> None:
    odd = any_pb2.Any()
    odd.Pack(error_details_pb2.ErrorInfo(reason="X", domain=DOMAIN))
    rebuilt = unpack_status(odd, identifier="t")
    assert type(rebuilt) is BridgeError
    assert "google.rpc.ErrorInfo" in str(rebuilt)
