"""The RPC descriptions: what each bridge operation sends, to which RPC, and how to read the answer.

:class:`BridgeCalls` builds one :class:`BridgeCall` per operation, with no I/O: the request
message, the RPC's name, and a parser that turns the response into the result (raising the error a
response reports). :class:`~dspex_dspy.remote.store.RemoteStore` runs them on a blocking stub and
the worker clients (:mod:`dspex_dspy.client`) run the same descriptions on a blocking or a
``grpc.aio`` stub, so the wire details live in one place. A failed call is turned back into the
server's exception by :func:`~dspex_dspy.wire_errors.error_from_rpc`, from the rich error details.

Values being written are encoded as the variable's type when the caller knows it
(:func:`encode_write`); only when it does not is the type inferred from the Python value
(:func:`infer_type`), and the server normalises it with the variable's real type.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import BridgeError, DSPexError, ValidationError
from dspex_dspy.leases import OptimizationLease, lease_request_options, validate_lease_request
from dspex_dspy.records import BatchResult, HistoryEntry, SessionInfo
from dspex_dspy.types import (
    TYPE_URL_PREFIX,
    Variable,
    VariableSpec,
    compile_spec,
    encode_constraints,
    is_secret,
    normalize_metadata,
    validate_name,
)
from dspex_dspy.wire import (
    any_to_value,
    from_timestamp,
    proto_to_variable,
    proto_to_versioned,
    timestamp,
    value_to_any,
)
from dspex_dspy.wire_errors import error_from_rpc, reported_failure, unpack_status

__all__ = ["BridgeCall", "BridgeCalls", "encode_write", "infer_type", "registered_variable"]

_T = TypeVar("_T")
_Metadata = tuple[tuple[str, str], ...]
_UNCLAIMED = "worker"  # the writer a bridge records for a write that names none


# --------------------------------------------------------------------------------------------
# Values being written
# --------------------------------------------------------------------------------------------


def infer_type(value: Any) -> str | None:
    """The variable type a plain Python value naturally travels as, or None if it has none.

    Used to encode a write when the variable's own type is not known to the client: the server
    decodes the JSON and normalises it with the variable's real type and constraints.

    Example:
        >>> infer_type(0.5), infer_type(3), infer_type([1.0, 2.0]), infer_type({"shape": [1], "data": [1.0]})
        ('float', 'integer', 'embedding', 'tensor')
    """
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "tensor"
    if hasattr(value, "tolist") and hasattr(value, "shape"):
        return "tensor" if len(value.shape) != 1 else "embedding"
    if isinstance(value, (list, tuple)):
        return "tensor" if any(isinstance(item, (list, tuple)) for item in value) else "embedding"
    return None


@functools.lru_cache(maxsize=1024)
def _plain_spec(name: str, type_: str) -> VariableSpec:
    """The spec of ``type_`` with no constraints (a spec is immutable: compiled once per name and type)."""
    return compile_spec(name, type_)


def encode_write(name: str, value: Any, type_hint: str | None) -> any_pb2.Any:
    """Encode a value being written to ``name``, for the server to judge.

    With the variable's type known (``type_hint``), a value that fits it travels normalised as
    that type. Only when the type is not known, or the value does not fit it (the server may know a
    newer definition, and it reports the rejection with the variable's real rule), is the value
    sent as its own natural type (:func:`infer_type`), or else as its raw JSON, so the server
    rejects it with the same error as any other bad value. Only a value that is not JSON at all
    cannot be sent.

    Raises:
        ValidationError: the value cannot be encoded as JSON.
    """
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()  # a numpy scalar
    if type_hint is not None:
        try:
            return value_to_any(type_hint, _plain_spec(name, type_hint).validate(value))
        except ValidationError:
            pass  # the server judges it against the variable's current definition
    natural = infer_type(value)
    if natural is not None and natural != type_hint:
        try:
            return value_to_any(natural, _plain_spec(name, natural).validate(value))
        except ValidationError:
            pass  # a malformed value (a ragged tensor): its raw JSON, below
    try:
        payload = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            name, "type", value, f"a {type(value).__name__} is not a value of any variable type and cannot be sent"
        ) from exc
    return any_pb2.Any(type_url=TYPE_URL_PREFIX + (type_hint or natural or "string"), value=payload)


# --------------------------------------------------------------------------------------------
# Call descriptions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeCall(Generic[_T]):
    """One unary RPC, described without performing it.

    Attributes:
        rpc: the method name on a ``BridgeServiceStub`` (``"GetVariable"``).
        request: the request message.
        parse: turns the response message into the result (and raises for a reported failure).
        identifier: the variable the call is about, for error messages.
        session_id: the session the call is about, for error messages.
        source: the writer to record, sent as gRPC metadata ``source``; None for reads. A
            ``"worker"`` write sends none: a write that claims no writer is a worker's.
    """

    rpc: str
    request: Message
    parse: Callable[[Any], _T]
    identifier: str = ""
    session_id: str = ""
    source: str | None = None

    @property
    def metadata(self) -> _Metadata | None:
        """The gRPC call metadata to send (None for none: a worker's write need not say so)."""
        return (("source", self.source),) if self.source and self.source != _UNCLAIMED else None

    def error(self, err: grpc.RpcError) -> DSPexError:
        """The error a failed run of this call stands for."""
        return error_from_rpc(err, identifier=self.identifier, session_id=self.session_id)


class _Reported(Protocol):
    """A response that reports its own failure (a peer may answer ``success=false`` instead of aborting)."""

    @property
    def success(self) -> bool: ...

    @property
    def error_message(self) -> str: ...


_R = TypeVar("_R", bound=_Reported)


def _checked(rpc: str, response: _R) -> _R:
    """Return ``response``, or raise the failure it reports; ``success=false`` without text is one too."""
    if not response.success:
        raise reported_failure(rpc, response.error_message)
    return response


def _entry_error(response: pb.BatchSetVariablesResponse, ident: str, session_id: str) -> DSPexError:
    """The error of one rejected batch entry: rebuilt from its status, or the peer's bare text."""
    if ident in response.error_details:
        return unpack_status(response.error_details[ident], identifier=ident, session_id=session_id)
    return BridgeError(response.errors[ident] or f"{ident}: the write was rejected and the bridge gave no reason")


def _session_info(response: pb.GetSessionResponse) -> SessionInfo:
    # The contract does not report a session's TTL; this bridge's extension fields do (0 = a peer
    # that does not), else it is NaN (unknown) on this side.
    return SessionInfo(
        id=response.session_id,
        metadata=dict(response.metadata),
        created_at=from_timestamp(response.created_at),
        ttl=response.ttl_seconds or math.nan,
        variable_count=response.variable_count,
        expires_in=response.expires_in_seconds if response.ttl_seconds else math.nan,
    )


def _history(response: pb.GetVariableHistoryResponse) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            version=entry.version,
            value=any_to_value(entry.value),
            timestamp=from_timestamp(entry.timestamp),
            changed_by=entry.changed_by,
            metadata=dict(entry.metadata),
        )
        for entry in response.entries
    ]


def _get_variable(session_id: str, identifier: str, parse: Callable[[pb.GetVariableResponse], _T]) -> BridgeCall[_T]:
    request = pb.GetVariableRequest(session_id=session_id, variable_identifier=identifier)
    return BridgeCall("GetVariable", request, parse, identifier=identifier, session_id=session_id)


class BridgeCalls:
    """Builders of the :class:`BridgeCall` for each operation a client performs (no I/O here).

    Example:
        >>> call = BridgeCalls.get_variable("s1", "temperature")
        >>> call.rpc, call.request.variable_identifier
        ('GetVariable', 'temperature')
    """

    @staticmethod
    def ping(message: str = "") -> BridgeCall[str]:
        """``Ping``: the server's answer text."""
        return BridgeCall("Ping", pb.PingRequest(message=message), lambda r: str(r.message))

    @staticmethod
    def initialize_session(session_id: str, metadata: Mapping[str, Any] | None = None) -> BridgeCall[None]:
        """``InitializeSession``: create a session."""
        request = pb.InitializeSessionRequest(session_id=session_id, metadata=normalize_metadata("", metadata))

        def parse(response: pb.InitializeSessionResponse) -> None:
            _checked("InitializeSession", response)

        return BridgeCall("InitializeSession", request, parse, session_id=session_id)

    @staticmethod
    def get_session(session_id: str) -> BridgeCall[SessionInfo]:
        """``GetSession``: describe a session."""
        return BridgeCall(
            "GetSession", pb.GetSessionRequest(session_id=session_id), _session_info, session_id=session_id
        )

    @staticmethod
    def heartbeat(session_id: str) -> BridgeCall[bool]:
        """``Heartbeat``: whether the session is still valid (its TTL is refreshed)."""
        request = pb.HeartbeatRequest(session_id=session_id, client_time=timestamp(time.time()))
        return BridgeCall("Heartbeat", request, lambda r: bool(r.session_valid), session_id=session_id)

    @staticmethod
    def cleanup_session(session_id: str, *, force: bool = False) -> BridgeCall[int]:
        """``CleanupSession``: how many variables the session held."""
        request = pb.CleanupSessionRequest(session_id=session_id, force=force)
        return BridgeCall("CleanupSession", request, lambda r: int(r.resources_cleaned), session_id=session_id)

    @staticmethod
    def register_variable(
        session_id: str,
        name: str,
        type_: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        source: str,
        initial_version: int = 0,
        created_at: float = 0.0,
        checked: VariableSpec | None = None,
    ) -> BridgeCall[str]:
        """``RegisterVariable``: the new variable's id.

        ``initial_version`` and ``created_at`` (when non-zero) import a variable with them kept.
        The value is checked against the type and constraints here first, so a bad one fails
        without a round trip, with the same error the server would report. ``checked``: the
        variable's compiled spec, from a caller that has already checked the name, validated
        ``value`` against that spec and normalised ``metadata`` (all three are sent as given; a
        bulk import checks each variable once this way).
        """
        if checked is None:
            validate_name(name)
            spec = compile_spec(name, type_, constraints, secret=is_secret(metadata))
            value = spec.validate(value)
            metadata = normalize_metadata(name, metadata)
        else:
            spec = checked
        request = pb.RegisterVariableRequest(
            session_id=session_id,
            name=name,
            type=spec.type,
            constraints_json=encode_constraints(spec.constraints) if spec.constraints else "",
            metadata=metadata,
            description=description or "",
            initial_version=initial_version,
        )
        request.initial_value.CopyFrom(value_to_any(spec.type, value))
        if created_at:
            request.created_at.CopyFrom(timestamp(created_at))

        def parse(response: pb.RegisterVariableResponse) -> str:
            return _checked("RegisterVariable", response).variable_id

        return BridgeCall("RegisterVariable", request, parse, identifier=name, session_id=session_id, source=source)

    @staticmethod
    def get_versioned(session_id: str, identifier: str) -> BridgeCall[tuple[Any, int]]:
        """``GetVariable``: ``(value, version)`` only (the rest of the record is not decoded)."""
        return _get_variable(session_id, identifier, lambda r: proto_to_versioned(r.variable))

    @staticmethod
    def get_variable(session_id: str, identifier: str) -> BridgeCall[Variable]:
        """``GetVariable``: the variable."""
        return _get_variable(session_id, identifier, lambda r: proto_to_variable(r.variable))

    @staticmethod
    def get_variables(session_id: str, identifiers: Sequence[str]) -> BridgeCall[tuple[dict[str, Variable], list[str]]]:
        """``GetVariables``: ``(found keyed by identifier in request order, missing identifiers)``."""
        request = pb.BatchGetVariablesRequest(
            session_id=session_id, variable_identifiers=list(identifiers), include_metadata=True
        )

        def parse(response: pb.BatchGetVariablesResponse) -> tuple[dict[str, Variable], list[str]]:
            found = {
                ident: proto_to_variable(response.variables[ident])
                for ident in dict.fromkeys(identifiers)
                if ident in response.variables
            }
            return found, list(response.missing_variables)

        return BridgeCall("GetVariables", request, parse, identifier=", ".join(identifiers), session_id=session_id)

    @staticmethod
    def set_variable(
        session_id: str,
        identifier: str,
        value: Any,
        *,
        type_hint: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        source: str,
    ) -> BridgeCall[int]:
        """``SetVariable``: the new version.

        ``type_hint`` is the variable's type when the caller knows it (the value is then encoded as
        that type); otherwise the value travels as its natural type and the server normalises it.
        """
        if isinstance(expected_version, bool) or not isinstance(expected_version, (int, type(None))):
            raise ValidationError(identifier, "expected_version", expected_version, "expected_version must be an int")
        request = pb.SetVariableRequest(
            session_id=session_id,
            variable_identifier=identifier,
            metadata=normalize_metadata(identifier, metadata),
            expected_version=expected_version or 0,
        )
        request.value.CopyFrom(encode_write(identifier, value, type_hint))

        def parse(response: pb.SetVariableResponse) -> int:
            return _checked("SetVariable", response).new_version

        return BridgeCall("SetVariable", request, parse, identifier=identifier, session_id=session_id, source=source)

    @staticmethod
    def set_variables(
        session_id: str,
        updates: Mapping[str, Any],
        *,
        type_hints: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        atomic: bool = True,
        source: str,
    ) -> BridgeCall[BatchResult]:
        """``SetVariables``: a :class:`~dspex_dspy.store.BatchResult` whose errors are DSPexErrors.

        A value that cannot be sent at all is reported as that entry's error, like any rejected
        value; in an atomic batch it means nothing is sent (and so nothing is applied).
        """
        hints = type_hints or {}
        request = pb.BatchSetVariablesRequest(
            session_id=session_id, metadata=normalize_metadata("", metadata), atomic=atomic
        )
        unsendable: dict[str, DSPexError] = {}
        encoded: dict[str, any_pb2.Any] = {}
        for ident, value in updates.items():
            try:
                encoded[ident] = encode_write(ident, value, hints.get(ident))
            except ValidationError as exc:
                unsendable[ident] = exc
        if not (atomic and unsendable):
            for ident, any_msg in encoded.items():
                request.updates[ident].CopyFrom(any_msg)

        def parse(response: pb.BatchSetVariablesResponse) -> BatchResult:
            reported = {ident: _entry_error(response, ident, session_id) for ident in response.errors}
            errors = {
                ident: reported.get(ident) or unsendable[ident]
                for ident in updates
                if ident in reported or ident in unsendable
            }
            if not response.success and not errors:
                raise reported_failure("SetVariables", "")  # a failure flag that names no entry
            versions = {ident: response.new_versions[ident] for ident in updates if ident in response.new_versions}
            return BatchResult(versions, errors)

        return BridgeCall("SetVariables", request, parse, session_id=session_id, source=source)

    @staticmethod
    def start_optimization(
        session_id: str, identifiers: Sequence[str], optimizer_id: str, *, ttl: float
    ) -> BridgeCall[OptimizationLease]:
        """``StartOptimization`` on several variables: the lease (its expiry as seen from here).

        The contract's request names one variable; the whole list and the ttl travel in
        ``optimizer_config`` (``variables``: a JSON list, ``lease_seconds``).
        """
        ttl = validate_lease_request(optimizer_id, ttl, identifiers)
        names = list(identifiers)
        request = pb.StartOptimizationRequest(
            session_id=session_id,
            variable_identifier=names[0],
            optimizer_id=optimizer_id,
            optimizer_config=lease_request_options(names, ttl),
        )

        def parse(response: pb.StartOptimizationResponse) -> OptimizationLease:
            _checked("StartOptimization", response)
            return OptimizationLease(response.optimization_id, optimizer_id, tuple(names), ttl, time.time() + ttl)

        return BridgeCall("StartOptimization", request, parse, identifier=", ".join(names), session_id=session_id)

    @staticmethod
    def stop_optimization(session_id: str, identifier: str, *, force: bool = False) -> BridgeCall[None]:
        """``StopOptimization`` of a lease (by its id) or, forced, of the lease holding a variable."""
        request = pb.StopOptimizationRequest(session_id=session_id, variable_identifier=identifier, force=force)

        def parse(response: pb.StopOptimizationResponse) -> None:
            return None

        return BridgeCall("StopOptimization", request, parse, identifier=identifier, session_id=session_id)

    @staticmethod
    def list_variables(session_id: str, pattern: str | None = None) -> BridgeCall[list[Variable]]:
        """``ListVariables``: the variables in creation order, optionally filtered by a ``*`` glob."""
        request = pb.ListVariablesRequest(session_id=session_id, pattern=pattern or "")
        return BridgeCall(
            "ListVariables",
            request,
            lambda r: [proto_to_variable(v) for v in r.variables],
            session_id=session_id,
        )

    @staticmethod
    def delete_variable(session_id: str, identifier: str, *, source: str) -> BridgeCall[None]:
        """``DeleteVariable``."""
        request = pb.DeleteVariableRequest(session_id=session_id, variable_identifier=identifier)

        def parse(response: pb.DeleteVariableResponse) -> None:
            _checked("DeleteVariable", response)

        return BridgeCall("DeleteVariable", request, parse, identifier=identifier, session_id=session_id, source=source)

    @staticmethod
    def get_history(session_id: str, identifier: str, limit: int = 0) -> BridgeCall[list[HistoryEntry]]:
        """``GetVariableHistory``: the remembered writes, newest first."""
        request = pb.GetVariableHistoryRequest(session_id=session_id, variable_identifier=identifier, limit=limit)
        return BridgeCall("GetVariableHistory", request, _history, identifier=identifier, session_id=session_id)

    @staticmethod
    def rollback_variable(
        session_id: str, identifier: str, target_version: int, *, source: str
    ) -> BridgeCall[Variable]:
        """``RollbackVariable``: the variable at its new version."""
        request = pb.RollbackVariableRequest(
            session_id=session_id, variable_identifier=identifier, target_version=target_version
        )

        def parse(response: pb.RollbackVariableResponse) -> Variable:
            return proto_to_variable(_checked("RollbackVariable", response).variable)

        return BridgeCall(
            "RollbackVariable", request, parse, identifier=identifier, session_id=session_id, source=source
        )


def registered_variable(
    var_id: str,
    name: str,
    type_: str,
    value: Any,
    constraints: Mapping[str, Any] | None,
    description: str | None,
    metadata: Mapping[str, Any] | None,
    source: str,
) -> Variable:
    """The record of a variable the server just registered under ``var_id`` (version 1, client clock)."""
    spec = compile_spec(name, type_, constraints, secret=is_secret(metadata))
    now = time.time()
    return Variable(
        id=var_id,
        name=name,
        type=spec.type,
        value=spec.validate(value),
        constraints=dict(spec.constraints),
        description=description or "",
        metadata=normalize_metadata(name, metadata),
        version=1,
        created_at=now,
        updated_at=now,
        source=source,
    )
