"""RemoteStore: the SessionStore methods, spoken over gRPC to a running bridge server.

An orchestrator whose context is bridged to a standalone server (``Context(bridge="host:port")``)
reads and writes its session through a :class:`RemoteStore`. It has the signatures and raises the
exceptions of :class:`~dspex_dspy.store.SessionStore`, so :class:`~dspex_dspy.state.BridgedState`
behaves the same whether its store is in this process or behind a bridge. Every call carries a
deadline, and a failed call is turned back into the error the server raised
(:func:`~dspex_dspy.wire.error_from_rpc`).

The requests themselves are described by :class:`BridgeCall` values built by :class:`BridgeCalls`:
what to send, to which RPC, and how to read the answer, with no I/O. :class:`RemoteStore` runs them
on a blocking stub, and the worker clients (:mod:`dspex_dspy.client`) run the same descriptions on a
blocking or a ``grpc.aio`` stub, so the wire details live in one place.

Who wrote: the server records RPC writers as ``"worker"`` unless the call's gRPC metadata (or the
request's ``metadata`` map) names ``source`` ``"orchestrator"``. A RemoteStore write sends its
``source`` argument (``"orchestrator"`` by default, as for a SessionStore) as gRPC metadata.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Generic, TypeVar

import grpc
from google.protobuf import any_pb2

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import (
    BridgeUnavailableError,
    DSPexError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
)
from dspex_dspy.store import BatchResult, HistoryEntry, SessionInfo, UpdateType, Watch
from dspex_dspy.types import (
    TYPE_URL_PREFIX,
    Variable,
    compile_spec,
    encode_constraints,
    normalize_metadata,
    validate_name,
)
from dspex_dspy.wire import (
    any_to_value,
    error_from_rpc,
    from_timestamp,
    proto_to_update,
    proto_to_variable,
    timestamp,
    value_to_any,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_CALL_TIMEOUT",
    "IMPORT_WINDOW",
    "registered_variable",
    "BridgeCall",
    "BridgeCalls",
    "RemoteStore",
    "error_from_text",
    "infer_type",
    "open_channel",
]

logger = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT: Final = 10.0
"""Seconds a unary call may take before it fails with :class:`BridgeUnavailableError`."""

IMPORT_WINDOW: Final = 256
"""How many ``RegisterVariable`` calls :meth:`RemoteStore.import_variables` keeps in flight."""

CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
"""Options of the channels this package opens: after a server restart a channel retries its
connection within 2 s (gRPC's defaults start at 1 s and grow to 2 minutes)."""

_T = TypeVar("_T")
_Metadata = tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------------------------
# Values and errors on the client side
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


def _write_any(name: str, value: Any, type_hint: str | None) -> any_pb2.Any:
    """Encode a value being written to ``name``, for the server to judge.

    The value travels as the variable's known type when it fits that type, else as its natural
    type, else (a value no type accepts, such as a malformed tensor) as its raw JSON under the
    known or natural type, so the server rejects it with the same error as any other bad value.
    Only a value that is not JSON at all cannot be sent.

    Raises:
        ValidationError: the value cannot be encoded as JSON.
    """
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()  # a numpy scalar
    inferred = infer_type(value)
    for type_ in dict.fromkeys(t for t in (type_hint, inferred) if t):
        try:
            return value_to_any(type_, compile_spec(name, type_).validate(value))
        except ValidationError:
            continue  # a stale hint, or a malformed value: try the next way
    try:
        payload = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            name, "type", value, f"a {type(value).__name__} is not a value of any variable type and cannot be sent"
        ) from exc
    return any_pb2.Any(type_url=TYPE_URL_PREFIX + (type_hint or inferred or "string"), value=payload)


class _ReportedFailure(grpc.RpcError):
    """A failure the server reported in a response body, dressed as the status it stands for."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def error_from_text(message: str, *, identifier: str = "", session_id: str = "") -> DSPexError:
    """Rebuild the error behind a failure the server reported as text (batch errors, ``error_message``).

    The text is matched to the status code the server would have used for the same failure, and
    then read as :func:`~dspex_dspy.wire.error_from_rpc` reads that status, so the error has the
    same class and fields as when the failure ends a whole call.

    Example:
        >>> type(error_from_text("t: 2.5 is above the maximum 2.0 (rule max)")).__name__
        'ValidationError'
    """
    low = message.lower()
    if "not found" in low:
        code = grpc.StatusCode.NOT_FOUND
    elif "expected version" in low and "current version" in low:
        code = grpc.StatusCode.ABORTED
    elif "already exists" in low:
        code = grpc.StatusCode.ALREADY_EXISTS
    elif "exceeds the limit" in low:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif "(rule " in low:
        code = grpc.StatusCode.INVALID_ARGUMENT
    else:
        return DSPexError(message)
    return error_from_rpc(_ReportedFailure(code, message), identifier=identifier, session_id=session_id)


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
        source: the writer to record, sent as gRPC metadata ``source``; None for reads.
    """

    rpc: str
    request: Any
    parse: Callable[[Any], _T]
    identifier: str = ""
    session_id: str = ""
    source: str | None = None

    @property
    def metadata(self) -> _Metadata | None:
        """The gRPC call metadata to send."""
        return (("source", self.source),) if self.source else None

    def error(self, err: grpc.RpcError) -> DSPexError:
        """The error a failed run of this call stands for."""
        return error_from_rpc(err, identifier=self.identifier, session_id=self.session_id)


def _checked(response: Any, call_identifier: str, session_id: str) -> Any:
    """Raise the error a response reports in ``success``/``error_message`` (bridges that do not abort)."""
    if not response.success and response.error_message:
        raise error_from_text(response.error_message, identifier=call_identifier, session_id=session_id)
    return response


def _session_info(response: Any) -> SessionInfo:
    # The wire contract does not report a session's TTL, so it is NaN (unknown) on this side.
    return SessionInfo(
        id=response.session_id,
        metadata=dict(response.metadata),
        created_at=from_timestamp(response.created_at),
        ttl=math.nan,
        variable_count=response.variable_count,
        expires_in=math.nan,
    )


def _history(response: Any) -> list[HistoryEntry]:
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

        def parse(response: Any) -> None:
            _checked(response, "", session_id)

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
    ) -> BridgeCall[str]:
        """``RegisterVariable``: the new variable's id.

        ``initial_version`` and ``created_at`` (when non-zero) import a variable with them kept.
        The value is checked against the type and constraints here first, so a bad one fails
        without a round trip, with the same error the server would report.
        """
        validate_name(name)
        spec = compile_spec(name, type_, constraints)
        request = pb.RegisterVariableRequest(
            session_id=session_id,
            name=name,
            type=spec.type,
            constraints_json=encode_constraints(spec.constraints) if spec.constraints else "",
            metadata=normalize_metadata(name, metadata),
            description=description or "",
            initial_version=initial_version,
        )
        request.initial_value.CopyFrom(value_to_any(spec.type, spec.validate(value)))
        if created_at:
            request.created_at.CopyFrom(timestamp(created_at))

        def parse(response: Any) -> str:
            return str(_checked(response, name, session_id).variable_id)

        return BridgeCall("RegisterVariable", request, parse, identifier=name, session_id=session_id, source=source)

    @staticmethod
    def get_variable(session_id: str, identifier: str) -> BridgeCall[Variable]:
        """``GetVariable``: the variable."""
        request = pb.GetVariableRequest(session_id=session_id, variable_identifier=identifier)
        return BridgeCall(
            "GetVariable",
            request,
            lambda r: proto_to_variable(r.variable),
            identifier=identifier,
            session_id=session_id,
        )

    @staticmethod
    def get_variables(session_id: str, identifiers: Sequence[str]) -> BridgeCall[tuple[dict[str, Variable], list[str]]]:
        """``GetVariables``: ``(found keyed by identifier in request order, missing identifiers)``."""
        request = pb.BatchGetVariablesRequest(
            session_id=session_id, variable_identifiers=list(identifiers), include_metadata=True
        )

        def parse(response: Any) -> tuple[dict[str, Variable], list[str]]:
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
        request.value.CopyFrom(_write_any(identifier, value, type_hint))

        def parse(response: Any) -> int:
            return int(_checked(response, identifier, session_id).new_version)

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
                encoded[ident] = _write_any(ident, value, hints.get(ident))
            except ValidationError as exc:
                unsendable[ident] = exc
        if not (atomic and unsendable):
            for ident, any_msg in encoded.items():
                request.updates[ident].CopyFrom(any_msg)

        def parse(response: Any) -> BatchResult:
            reported = {
                ident: error_from_text(text, identifier=ident, session_id=session_id)
                for ident, text in response.errors.items()
            }
            errors = {
                ident: reported.get(ident) or unsendable[ident]
                for ident in updates
                if ident in reported or ident in unsendable
            }
            versions = {ident: int(response.new_versions[ident]) for ident in updates if ident in response.new_versions}
            return BatchResult(versions, errors)

        return BridgeCall("SetVariables", request, parse, session_id=session_id, source=source)

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

        def parse(response: Any) -> None:
            _checked(response, identifier, session_id)

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

        def parse(response: Any) -> Variable:
            return proto_to_variable(_checked(response, identifier, session_id).variable)

        return BridgeCall(
            "RollbackVariable", request, parse, identifier=identifier, session_id=session_id, source=source
        )


# --------------------------------------------------------------------------------------------
# RemoteStore
# --------------------------------------------------------------------------------------------


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
    spec = compile_spec(name, type_, constraints)
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


class RemoteStore:
    """A :class:`~dspex_dspy.store.SessionStore` look-alike that talks to a bridge server over gRPC.

    The methods have the SessionStore's signatures and raise its exceptions; an unreachable server
    or a missed deadline raises :class:`~dspex_dspy.errors.BridgeUnavailableError`. Thread-safe.

    Args:
        stub: a blocking ``BridgeServiceStub``.
        channel: the channel under the stub; closed by :meth:`close` when given.
        address: ``"host:port"`` of the server, for messages and reconnecting.
        call_timeout: the deadline of each unary call, in seconds.

    Example:
        >>> store = RemoteStore.connect("127.0.0.1:50051")  # doctest: +SKIP
        >>> store.create_session("s1")  # doctest: +SKIP
        >>> store.register_variable("s1", "temperature", "float", 0.7).version  # doctest: +SKIP
        1
    """

    def __init__(
        self,
        stub: Any,
        *,
        channel: grpc.Channel | None = None,
        address: str | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        if call_timeout <= 0:
            raise ValueError(f"call_timeout must be positive, got {call_timeout}")
        self.stub = stub
        self.address = address
        self.call_timeout = float(call_timeout)
        self._channel = channel
        self._closed = False
        # What this client last learned about each variable (type, constraints, id, metadata): it
        # encodes writes as the right type and lets set_variable return a record without a 2nd RPC.
        self._known: dict[tuple[str, str], Variable] = {}
        self._known_lock = threading.Lock()

    @classmethod
    def connect(cls, address: str, *, timeout: float = 5.0, call_timeout: float = DEFAULT_CALL_TIMEOUT) -> RemoteStore:
        """Open an insecure channel to ``address`` and wait until it is ready.

        Args:
            address: ``"host:port"`` of a bridge server.
            timeout: seconds to wait for the connection.
            call_timeout: the deadline of each later call.

        Raises:
            BridgeUnavailableError: no server answered within ``timeout``.
        """
        channel = open_channel(address, timeout=timeout)
        return cls(pb_grpc.BridgeServiceStub(channel), channel=channel, address=address, call_timeout=call_timeout)

    # ------------------------------------------------------------------ running calls

    def call(self, bridge_call: BridgeCall[_T]) -> _T:
        """Run one described call with this store's deadline; raise the server's error on failure."""
        if self._closed:
            raise BridgeUnavailableError(f"the connection to the bridge at {self.address or '?'} is closed")
        method = getattr(self.stub, bridge_call.rpc)
        try:
            response = method(bridge_call.request, timeout=self.call_timeout, metadata=bridge_call.metadata)
        except grpc.RpcError as err:
            raise bridge_call.error(err) from err
        except ValueError as err:  # grpc raises this for a call on a closed channel
            raise BridgeUnavailableError(f"the connection to the bridge is closed: {err}") from err
        return bridge_call.parse(response)

    def close(self) -> None:
        """Close the channel (if this store opened it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteStore(address={self.address!r}{', closed' if self._closed else ''})"

    # ------------------------------------------------------------------ what this client knows

    def _learn(self, session_id: str, variable: Variable) -> Variable:
        with self._known_lock:
            self._known[(session_id, variable.name)] = variable
            self._known[(session_id, variable.id)] = variable
        return variable

    def _forget(self, session_id: str, identifier: str) -> None:
        with self._known_lock:
            known = self._known.pop((session_id, identifier), None)
            if known is not None:
                self._known.pop((session_id, known.name), None)
                self._known.pop((session_id, known.id), None)

    def _known_type(self, session_id: str, identifier: str) -> str | None:
        known = self._known.get((session_id, identifier))
        return known.type if known is not None else None

    # ------------------------------------------------------------------ sessions

    def create_session(
        self, session_id: str, metadata: Mapping[str, Any] | None = None, *, ttl: float | None = None
    ) -> SessionInfo:
        """Create a session. Raises :class:`SessionExistsError` if the id is taken.

        ``ttl`` is accepted for the SessionStore signature and ignored: the wire contract has no
        per-session TTL, so the server's default applies.
        """
        self.call(BridgeCalls.initialize_session(session_id, metadata))
        return self.get_session(session_id)

    def get_session(self, session_id: str) -> SessionInfo:
        """Describe a session (and refresh its TTL); ``ttl`` and ``expires_in`` are NaN (not on the wire)."""
        return self.call(BridgeCalls.get_session(session_id))

    def has_session(self, session_id: str) -> bool:
        """Whether the session exists (a ``GetSession`` that is not ``NOT_FOUND``)."""
        try:
            self.call(BridgeCalls.get_session(session_id))
        except SessionNotFoundError:
            return False
        return True

    def heartbeat(self, session_id: str) -> bool:
        """Refresh a session's TTL; False if it does not exist (or expired)."""
        return self.call(BridgeCalls.heartbeat(session_id))

    def cleanup_session(self, session_id: str) -> int:
        """Remove a session and return how many variables it held."""
        cleaned = self.call(BridgeCalls.cleanup_session(session_id))
        with self._known_lock:
            for key in [k for k in self._known if k[0] == session_id]:
                del self._known[key]
        return cleaned

    # ------------------------------------------------------------------ variables

    def register_variable(
        self,
        session_id: str,
        name: str,
        type_: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        source: str = "orchestrator",
    ) -> Variable:
        """Define a variable. Raises :class:`VariableExistsError` for a duplicate name.

        The record returned carries the server's id and version 1; its timestamps are this
        machine's clock (the registration's answer has no timestamps, and reading them back would
        cost a second round trip).
        """
        call = BridgeCalls.register_variable(
            session_id,
            name,
            type_,
            value,
            constraints=constraints,
            description=description,
            metadata=metadata,
            source=source,
        )
        var_id = self.call(call)
        registered = registered_variable(var_id, name, type_, value, constraints, description, metadata, source)
        return self._learn(session_id, registered)

    def import_variables(self, session_id: str, variables: Sequence[Variable]) -> list[Variable]:
        """Import whole variables (value, version, created_at, description, metadata), all or nothing.

        Every variable is checked here first; then the ``RegisterVariable`` calls are pipelined,
        :data:`IMPORT_WINDOW` in flight at a time. If any of them fails, the variables already made
        are deleted again and the first failure (in input order) is raised.

        The wire contract carries no ``updated_at`` for a registration, so an imported variable's
        ``updated_at`` becomes the server's time of import.
        """
        calls: list[BridgeCall[str]] = []
        seen: set[str] = set()
        for var in variables:
            if var.name in seen:
                raise VariableExistsError(var.name, session_id)
            seen.add(var.name)
            if isinstance(var.version, bool) or not isinstance(var.version, int) or var.version < 1:
                raise ValidationError(var.name, "version", var.version, "a version must be an integer >= 1")
            calls.append(
                BridgeCalls.register_variable(
                    session_id,
                    var.name,
                    var.type,
                    var.value,
                    constraints=var.constraints,
                    description=var.description,
                    metadata=var.metadata,
                    source=var.source,
                    initial_version=var.version,
                    created_at=var.created_at or time.time(),
                )
            )
        if self._closed:
            raise BridgeUnavailableError(f"the connection to the bridge at {self.address or '?'} is closed")
        made: list[tuple[int, str]] = []
        failure: tuple[int, DSPexError] | None = None
        for start in range(0, len(calls), IMPORT_WINDOW):
            window = list(enumerate(calls[start : start + IMPORT_WINDOW], start))
            pending = [
                (i, c, getattr(self.stub, c.rpc).future(c.request, timeout=self.call_timeout, metadata=c.metadata))
                for i, c in window
            ]
            for i, c, future in pending:
                try:
                    made.append((i, c.parse(future.result())))
                except grpc.RpcError as err:
                    if failure is None or i < failure[0]:
                        failure = (i, c.error(err))
                except DSPexError as exc:
                    if failure is None or i < failure[0]:
                        failure = (i, exc)
            if failure is not None:
                break
        if failure is not None:
            self._undo_import(session_id, [var_id for _, var_id in made])
            raise failure[1]
        now = time.time()
        out = []
        for (_, var_id), var in zip(sorted(made), variables, strict=True):
            spec = compile_spec(var.name, var.type, var.constraints)
            imported = replace(
                var,
                id=var_id,
                value=spec.validate(var.value),
                constraints=dict(spec.constraints),
                metadata=normalize_metadata(var.name, var.metadata),
                created_at=var.created_at or now,
                updated_at=now,
            )
            out.append(self._learn(session_id, imported))
        return out

    def _undo_import(self, session_id: str, variable_ids: list[str]) -> None:
        """Delete the variables a failed import made (pipelined); failures are logged, not raised."""
        for start in range(0, len(variable_ids), IMPORT_WINDOW):
            calls = [
                BridgeCalls.delete_variable(session_id, var_id, source="orchestrator")
                for var_id in variable_ids[start : start + IMPORT_WINDOW]
            ]
            futures = [
                self.stub.DeleteVariable.future(c.request, timeout=self.call_timeout, metadata=c.metadata)
                for c in calls
            ]
            for c, future in zip(calls, futures, strict=True):
                try:
                    future.result()
                except grpc.RpcError as err:
                    logger.warning("could not undo the import of %s: %s", c.identifier, c.error(err))

    def get_variable(self, session_id: str, identifier: str) -> Variable:
        """Return a variable by id or name."""
        return self._learn(session_id, self.call(BridgeCalls.get_variable(session_id, identifier)))

    def get_variables(self, session_id: str, identifiers: Iterable[str]) -> tuple[dict[str, Variable], list[str]]:
        """Return ``(found keyed by identifier as given, missing identifiers)``."""
        found, missing = self.call(BridgeCalls.get_variables(session_id, list(identifiers)))
        for var in found.values():
            self._learn(session_id, var)
        return found, missing

    def set_variable(
        self,
        session_id: str,
        identifier: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        source: str = "orchestrator",
    ) -> Variable:
        """Write a variable; return it at its new version.

        The record returned is built from what this client knows of the variable plus the write
        (value normalised by the variable's spec, the server's new version); ``updated_at`` is this
        machine's clock. A variable this client has not seen yet is read back once.

        Raises:
            ValidationError: the value breaks the variable's type or constraints.
            VersionConflictError: ``expected_version`` (non-zero) is not the current version.
        """
        known = self._known.get((session_id, identifier))
        call = BridgeCalls.set_variable(
            session_id,
            identifier,
            value,
            type_hint=known.type if known is not None else None,
            metadata=metadata,
            expected_version=expected_version,
            source=source,
        )
        version = self.call(call)
        if known is not None:
            try:
                normalised = compile_spec(known.name, known.type, known.constraints).validate(value)
            except ValidationError:
                known = None  # what this client knew is stale: the variable was redefined
        if known is None:
            known = self.call(BridgeCalls.get_variable(session_id, identifier))
            if known.version == version:
                return self._learn(session_id, known)
            normalised = compile_spec(known.name, known.type, known.constraints).validate(value)
        written = replace(
            known,
            value=normalised,
            version=version,
            updated_at=time.time(),
            source=source,
        )
        return self._learn(session_id, written)

    def set_variables(
        self,
        session_id: str,
        updates: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
        atomic: bool = True,
        source: str = "orchestrator",
    ) -> BatchResult:
        """Write several variables. ``atomic``: validate all, then apply all or none."""
        hints = {ident: t for ident in updates if (t := self._known_type(session_id, ident)) is not None}
        call = BridgeCalls.set_variables(
            session_id, updates, type_hints=hints, metadata=metadata, atomic=atomic, source=source
        )
        return self.call(call)

    def list_variables(self, session_id: str, pattern: str | None = None) -> list[Variable]:
        """Variables in creation order; ``pattern`` is a ``*`` glob matched against the whole name."""
        variables = self.call(BridgeCalls.list_variables(session_id, pattern))
        for var in variables:
            self._learn(session_id, var)
        return variables

    def delete_variable(self, session_id: str, identifier: str, *, source: str = "orchestrator") -> None:
        """Delete a variable; watchers receive a ``deleted`` update."""
        self.call(BridgeCalls.delete_variable(session_id, identifier, source=source))
        self._forget(session_id, identifier)

    def get_history(self, session_id: str, identifier: str, limit: int = 0) -> list[HistoryEntry]:
        """The variable's remembered writes, newest first; ``limit`` > 0 keeps that many."""
        return self.call(BridgeCalls.get_history(session_id, identifier, limit))

    def rollback_variable(
        self, session_id: str, identifier: str, target_version: int, *, source: str = "orchestrator"
    ) -> Variable:
        """Write the value the variable had at ``target_version`` as a new version."""
        call = BridgeCalls.rollback_variable(session_id, identifier, target_version, source=source)
        return self._learn(session_id, self.call(call))

    def watch(
        self, session_id: str, identifiers: Iterable[str] | None = None, *, include_initial: bool = True
    ) -> Watch:
        """Open a ``WatchVariables`` stream; its updates fill a coalescing :class:`Watch`.

        Like :meth:`SessionStore.watch`: an unknown variable or session raises at once, and the
        watcher is registered on the server when this returns (it waits, up to the call deadline,
        for the stream's first message, which the server sends only after registering; an empty,
        idle session sends none, and then it returns after the deadline). A reader thread feeds
        the watch until it is closed or the stream ends; then the watch closes and its ``error``
        attribute holds the error that ended the stream, if any (heartbeats are not passed on).
        """
        idents = list(identifiers or ())
        if idents:
            _, missing = self.get_variables(session_id, idents)
            if missing:
                raise VariableNotFoundError(", ".join(missing), session_id)
        # Initial values are always asked for: the first one proves the watcher is registered.
        # When the caller did not want them they are dropped; a write after registration
        # replaces a pending initial value with a value_change, so none is lost.
        request = pb.WatchVariablesRequest(
            session_id=session_id, variable_identifiers=idents, include_initial_values=True
        )
        stream = self.stub.WatchVariables(request, metadata=(("source", "orchestrator"),))
        watch = _RemoteWatch(session_id, stream, include_initial)
        watch.ready.wait(self.call_timeout)
        if watch.error is not None:
            watch.close()
            raise watch.error
        return watch


class _RemoteWatch(Watch):
    """A :class:`Watch` fed by a ``WatchVariables`` stream in a daemon thread."""

    def __init__(self, session_id: str, stream: Any, include_initial: bool = True) -> None:
        super().__init__(session_id, None)
        self.error: DSPexError | None = None
        self.ready = threading.Event()
        self._include_initial = include_initial
        self._stream = stream
        self._reader = threading.Thread(target=self._read, name=f"dspex-watch-{session_id[:24]}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._stream:
                self.ready.set()
                update = proto_to_update(message)
                if update.update_type == UpdateType.HEARTBEAT:
                    continue
                if update.update_type == UpdateType.INITIAL_VALUE and not self._include_initial:
                    continue
                self.offer(update)
        except grpc.RpcError as err:
            if not self.closed and err.code() != grpc.StatusCode.CANCELLED:
                self.error = error_from_rpc(err, session_id=self.session_id)
        finally:
            super().close()
            self.ready.set()

    def close(self) -> None:
        """Cancel the stream and end the watch. Idempotent."""
        super().close()
        self._stream.cancel()


def open_channel(address: str, *, timeout: float = 5.0) -> grpc.Channel:
    """Open an insecure channel to ``address`` and wait up to ``timeout`` seconds for it to be ready.

    Raises:
        BridgeUnavailableError: the address is malformed or nothing answered in time.
    """
    if not isinstance(address, str) or ":" not in address:
        raise BridgeUnavailableError(f"a bridge address must be 'host:port', got {address!r}")
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise BridgeUnavailableError(f"no bridge server answered at {address} within {timeout:g} s") from None
    return channel
