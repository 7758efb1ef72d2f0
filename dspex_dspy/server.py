"""The bridge server: ``snakepit.bridge.BridgeService`` over gRPC, backed by a :class:`SessionStore`.

:class:`BridgeServicer` maps every RPC of the wire contract (``PROTOCOL.md``) onto a
:class:`~dspex_dspy.store.SessionStore` and every error onto its status code (bad input is always
``INVALID_ARGUMENT``; ``INTERNAL`` only ever means a bug here), with the error's kind and fields in
the gRPC rich error details (:mod:`dspex_dspy.wire_errors`). :func:`create_server` wraps it in a
:class:`BridgeServer` with the standard gRPC health service, message/value/watcher limits and a
thread pool sized so that long-lived ``WatchVariables`` streams cannot starve unary calls.
:class:`EmbeddedBridge` is the process-wide server an orchestrator starts lazily on loopback, whose
store it also reads in process.

Who wrote a value: with tokens (:mod:`dspex_dspy.auth`) it is the token's ``sub``. Without them the
server cannot know its peer, so every write through it is recorded as ``"worker"`` unless the
request's ``metadata`` map or the call's gRPC metadata has ``source`` set to ``"orchestrator"`` or
``"elixir"``. TLS, tokens, the rate limit and the audit trail are set up by :func:`create_server`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc
import grpc.aio
from google.protobuf import any_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as aio_health  # type: ignore[attr-defined]

from dspex_dspy._gc import collector_paused
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.admin import add_admin_service
from dspex_dspy.aio_server import AsyncBridgeServicer, EventLoopThread
from dspex_dspy.auth import AsyncBridgeGuard, BridgeGuard, RateLimiter, check_exposure, current_principal, seconds_left
from dspex_dspy.errors import (
    AuthenticationError,
    BridgeUnavailableError,
    DSPexError,
    LimitExceededError,
    SessionNotFoundError,
)
from dspex_dspy.guard import (
    Abort,
    WatchSlots,
    failure_status,
    guarded_async_handler,
    guarded_handler,
    peer_principal,
)
from dspex_dspy.leases import LEASE_ID_PREFIX, lease_request_config
from dspex_dspy.store import SessionStore, Watch
from dspex_dspy.store.storage import LOOP_MAX_VALUE_BYTES
from dspex_dspy.tls import ServerTLS
from dspex_dspy.types import VARIABLE_TYPES, Variable, compile_spec, decode_constraints
from dspex_dspy.wire import (
    any_to_value,
    from_timestamp,
    timestamp,
    update_to_proto,
    value_to_any,
    variable_to_proto,
)
from dspex_dspy.wire_errors import pack_status, rpc_status_for

__all__ = ["SERVICE_NAME", "BridgeServer", "BridgeServicer", "EmbeddedBridge", "ServerLimits", "create_server"]

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = "snakepit.bridge.BridgeService"
DEFAULT_HEARTBEAT_INTERVAL: Final = 10.0
_DEFAULT_WORKERS: Final = 16
_ORCHESTRATOR_SOURCES: Final = frozenset({"orchestrator", "elixir"})
_SHUTTING_DOWN: Final = "the bridge server is shutting down"


@dataclass(frozen=True)
class ServerLimits:
    """Limits the server enforces on top of the store's own :class:`~dspex_dspy.store.StoreLimits`.

    Attributes:
        max_message_bytes: largest gRPC message received or sent.
        max_value_bytes: largest encoded value (``Any.value`` plus any binary part) accepted in a
            write; a larger one is ``RESOURCE_EXHAUSTED``.
        max_watchers: concurrent ``WatchVariables`` streams; one more is ``RESOURCE_EXHAUSTED``. An
            open stream holds no thread (the server runs on ``grpc.aio``), only its coalescing
            queue (at most one pending update per watched variable), so thousands are fine.
        max_watchers_per_session: concurrent streams on one session (None = half of
            ``max_watchers``, at least 1).
        max_watchers_per_principal: concurrent streams of one client: the token's subject, else
            a peer address (None = a quarter of ``max_watchers``, at least 1). With these shares
            no single client or session can take every stream.
        max_workers: threads running store calls for unary RPCs (None = 16). Watch streams do not
            use them while they wait, so they can never starve unary calls.
    """

    max_message_bytes: int = 16 * 1024 * 1024
    max_value_bytes: int = 8 * 1024 * 1024
    max_watchers: int = 2048
    max_workers: int | None = None
    max_watchers_per_session: int | None = None
    max_watchers_per_principal: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_value_bytes", "max_watchers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_watchers_per_session", "max_watchers_per_principal"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_workers is not None and self.max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {self.max_workers}")

    @property
    def watchers_per_session(self) -> int:
        """The per-session share of watch streams actually used."""
        if self.max_watchers_per_session is not None:
            return self.max_watchers_per_session
        return max(1, self.max_watchers // 2)

    @property
    def watchers_per_principal(self) -> int:
        """The per-client share of watch streams actually used."""
        if self.max_watchers_per_principal is not None:
            return self.max_watchers_per_principal
        return max(1, self.max_watchers // 4)

    @property
    def workers(self) -> int:
        """The thread-pool size actually used."""
        return self.max_workers if self.max_workers is not None else _DEFAULT_WORKERS


_Abort = Abort


_Unary = Callable[["BridgeServicer", Any, grpc.ServicerContext], Any]
_Stream = Callable[["BridgeServicer", Any, grpc.ServicerContext], Iterator[Any]]


def _fail(context: grpc.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
    """End the call with the status that reports ``exc``, its fields in the rich error details."""
    context.abort_with_status(failure_status(rpc, exc))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def _unary(method: _Unary) -> _Unary:
    """Wrap a unary handler: refuse calls while shutting down, map exceptions to status codes."""
    rpc = method.__name__

    @functools.wraps(method)
    def handler(self: BridgeServicer, request: Any, context: grpc.ServicerContext) -> Any:
        if self.shutting_down:
            context.abort_with_status(rpc_status_for(BridgeUnavailableError(_SHUTTING_DOWN)))
        try:
            return method(self, request, context)
        except Exception as exc:
            failure = exc
        _fail(context, rpc, failure)

    return handler


def _stream(method: _Stream) -> _Stream:
    """Wrap a server-streaming handler like :func:`_unary`."""
    rpc = method.__name__

    @functools.wraps(method)
    def handler(self: BridgeServicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if self.shutting_down:
            context.abort_with_status(rpc_status_for(BridgeUnavailableError(_SHUTTING_DOWN)))
        try:
            yield from method(self, request, context)
            return
        except Exception as exc:
            failure = exc
        _fail(context, rpc, failure)

    return handler


def _batch_response(
    rejected: Mapping[str, DSPexError], new_versions: Mapping[str, int]
) -> pb.BatchSetVariablesResponse:
    """A ``SetVariables`` answer: each rejection as text (``errors``) and as a status (``error_details``)."""
    return pb.BatchSetVariablesResponse(
        success=not rejected,
        errors={ident: str(exc) for ident, exc in rejected.items()},
        new_versions=dict(new_versions),
        error_details={ident: pack_status(exc) for ident, exc in rejected.items()},
    )


def _unimplemented(rpc: str, what: str) -> _Abort:
    return _Abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{rpc} is not implemented by the dspex-dspy bridge: it serves sessions and variables; {what}",
    )


def _check_definition(name: str, type_: str, constraints: dict[str, Any]) -> None:
    """Report a bad type or constraint of a new variable before its value is decoded.

    Without constraints, a known type always compiles, so it is left to the store (which compiles
    it anyway) rather than compiled twice.
    """
    if constraints or type_ not in VARIABLE_TYPES:
        compile_spec(name, type_, constraints)


class BridgeServicer:
    """The ``snakepit.bridge.BridgeService`` implementation over a :class:`SessionStore`.

    Args:
        store: the sessions and variables to serve.
        limits: server-side limits (message size, value size, watch streams).
        heartbeat_interval: seconds of silence after which a watch stream sends a ``heartbeat``.
    """

    def __init__(
        self,
        store: SessionStore,
        *,
        limits: ServerLimits | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval}")
        self.store = store
        self.limits = limits or ServerLimits()
        self.heartbeat_interval = float(heartbeat_interval)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._slots = WatchSlots(
            self.limits.max_watchers, self.limits.watchers_per_session, self.limits.watchers_per_principal
        )
        #: Names the caller of a watch for its fair share (the peer address by default).
        self.principal_of: Callable[[grpc.ServicerContext], str] = peer_principal

    # ------------------------------------------------------------------ lifecycle

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`begin_shutdown` was called: new calls get ``UNAVAILABLE``."""
        return self._stopping.is_set()

    @property
    def active_watches(self) -> int:
        """``WatchVariables`` streams open now."""
        with self._lock:
            return len(self._watches)

    def begin_shutdown(self) -> None:
        """Refuse new calls and end every open watch stream cleanly."""
        self._stopping.set()
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.close()

    # ------------------------------------------------------------------ helpers

    def _writer(self, metadata: Mapping[str, str], context: grpc.ServicerContext) -> str:
        """Who a write comes from: the token's ``sub``; without tokens ``"orchestrator"`` only when it says so, else ``"worker"``."""
        principal = current_principal()
        if principal is not None:
            return principal.sub
        claimed = metadata.get("source", "")
        if not claimed:
            for key, value in context.invocation_metadata() or ():
                if key == "source" and isinstance(value, str):
                    claimed = value
                    break
        return "orchestrator" if claimed.strip().lower() in _ORCHESTRATOR_SOURCES else "worker"

    def _decode(self, any_msg: any_pb2.Any, name: str, binary: bytes = b"") -> Any:
        """Decode a value from the wire, refusing one larger than ``max_value_bytes``."""
        size = len(any_msg.value) + len(binary)
        if size > self.limits.max_value_bytes:
            raise LimitExceededError(
                f"{name}: value size in bytes" if name else "value size in bytes", size, self.limits.max_value_bytes
            )
        return any_to_value(any_msg, name=name, binary=binary)

    def open_watch(self, watch_factory: Callable[[], Watch], session_id: str = "", principal: str = "") -> Watch:
        """Open a watch within ``max_watchers`` and the fair shares; give it back with :meth:`close_watch`."""
        with self._lock:
            if len(self._watches) >= self.limits.max_watchers:
                raise LimitExceededError("watch streams", len(self._watches) + 1, self.limits.max_watchers)
            self._slots.acquire(session_id, principal)
            try:
                watch = watch_factory()
            except BaseException:
                self._slots.release(session_id, principal)
                raise
            self._watches.add(watch)
        return watch

    def close_watch(self, watch: Watch, session_id: str = "", principal: str = "") -> None:
        """Close a watch from :meth:`open_watch` and free its slot."""
        with self._lock:
            if watch not in self._watches:
                return
            self._watches.discard(watch)
            self._slots.release(session_id, principal)
        self.store.unwatch(watch)

    def watch_wait(self, last_sent: float) -> float:
        """Seconds a watch stream may wait for an update: until its next heartbeat or its token's expiry.

        Raises:
            AuthenticationError: the token of the call has expired (the stream ends ``UNAUTHENTICATED``).
        """
        wait = last_sent + self.heartbeat_interval - time.monotonic()
        left = seconds_left()
        if left is not None:
            if left <= 0:
                raise AuthenticationError("WatchVariables: the token of this watch has expired")
            wait = min(wait, left)
        return wait

    @contextmanager
    def _watch_slot(
        self, watch_factory: Callable[[], Watch], session_id: str = "", principal: str = ""
    ) -> Iterator[Watch]:
        watch = self.open_watch(watch_factory, session_id, principal)
        try:
            yield watch
        finally:
            self.close_watch(watch, session_id, principal)

    # ------------------------------------------------------------------ sessions

    @_unary
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        """Answer ``pong`` (echoing the request's message) with the server's wall-clock time."""
        message = f"pong: {request.message}" if request.message else "pong"
        return pb.PingResponse(message=message, server_time=timestamp(time.time()))

    @_unary
    def InitializeSession(
        self, request: pb.InitializeSessionRequest, context: grpc.ServicerContext
    ) -> pb.InitializeSessionResponse:
        """Create a session (``ALREADY_EXISTS`` if the id is taken); ``config`` is accepted and ignored."""
        self.store.create_session(request.session_id, dict(request.metadata))
        return pb.InitializeSessionResponse(success=True)

    @_unary
    def CleanupSession(
        self, request: pb.CleanupSessionRequest, context: grpc.ServicerContext
    ) -> pb.CleanupSessionResponse:
        """Remove a session; an unknown one is ``NOT_FOUND`` unless ``force`` is set."""
        try:
            cleaned = self.store.cleanup_session(request.session_id)
        except SessionNotFoundError:
            if not request.force:
                raise
            cleaned = 0
        return pb.CleanupSessionResponse(success=True, resources_cleaned=cleaned)

    @_unary
    def GetSession(self, request: pb.GetSessionRequest, context: grpc.ServicerContext) -> pb.GetSessionResponse:
        """Describe a session (and refresh its TTL)."""
        info = self.store.get_session(request.session_id)
        return pb.GetSessionResponse(
            session_id=info.id,
            metadata=dict(info.metadata),
            created_at=timestamp(info.created_at),
            variable_count=info.variable_count,
            tool_count=0,
            ttl_seconds=info.ttl,
            expires_in_seconds=max(0.0, info.expires_in),
        )

    @_unary
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        """Refresh a session's TTL; ``session_valid`` is false for an unknown or expired session."""
        valid = self.store.heartbeat(request.session_id)
        return pb.HeartbeatResponse(server_time=timestamp(time.time()), session_valid=valid)

    # ------------------------------------------------------------------ variables

    @_unary
    def RegisterVariable(
        self, request: pb.RegisterVariableRequest, context: grpc.ServicerContext
    ) -> pb.RegisterVariableResponse:
        """Define a variable; a set ``initial_version`` or ``created_at`` imports it with those kept."""
        name = request.name
        constraints = decode_constraints(request.constraints_json, name=name)
        _check_definition(name, request.type, constraints)
        value = self._decode(request.initial_value, name, request.initial_binary_value)
        source = self._writer(request.metadata, context)
        if request.initial_version != 0 or request.HasField("created_at"):
            variable = Variable(
                id="",
                name=name,
                type=request.type,
                value=value,
                constraints=constraints,
                description=request.description,
                metadata=dict(request.metadata),
                version=request.initial_version or 1,
                created_at=from_timestamp(request.created_at) if request.HasField("created_at") else 0.0,
                source=source,
            )
            (registered,) = self.store.import_variables(request.session_id, [variable])
        else:
            registered = self.store.register_variable(
                request.session_id,
                name,
                request.type,
                value,
                constraints=constraints,
                description=request.description,
                metadata=dict(request.metadata),
                source=source,
            )
        return pb.RegisterVariableResponse(success=True, variable_id=registered.id)

    def _imported(self, request: pb.RegisterVariableRequest, source: str) -> Variable:
        """The variable a ``RegisterVariableRequest`` of an import describes."""
        name = request.name
        constraints = decode_constraints(request.constraints_json, name=name)
        _check_definition(name, request.type, constraints)
        return Variable(
            id="",
            name=name,
            type=request.type,
            value=self._decode(request.initial_value, name, request.initial_binary_value),
            constraints=constraints,
            description=request.description,
            metadata=dict(request.metadata),
            version=request.initial_version or 1,
            created_at=from_timestamp(request.created_at) if request.HasField("created_at") else 0.0,
            source=source,
        )

    @_unary
    def ImportVariables(
        self, request: pb.ImportVariablesRequest, context: grpc.ServicerContext
    ) -> pb.ImportVariablesResponse:
        """Import many variables in one call, all or none (an extension RPC; see ``bridge/README.md``)."""
        # An entry names its writer in its own metadata, or else the call does (the same for all).
        writer = self._writer({}, context)
        with collector_paused():  # every record built stays alive to the end of the import
            variables = [
                self._imported(item, self._writer(item.metadata, context) if "source" in item.metadata else writer)
                for item in request.variables
            ]
            ids = self.store.import_variable_ids(request.session_id, variables)
        return pb.ImportVariablesResponse(variable_ids=ids)

    @_unary
    def GetVariable(self, request: pb.GetVariableRequest, context: grpc.ServicerContext) -> pb.GetVariableResponse:
        """Return one variable by id or name."""
        variable = self.store.get_variable(request.session_id, request.variable_identifier)
        return pb.GetVariableResponse(variable=variable_to_proto(variable), from_cache=False)

    async def get_variable_async(self, request: pb.GetVariableRequest, context: Any) -> pb.GetVariableResponse | None:
        """``GetVariable`` on the event loop (a store that is :attr:`~SessionStore.nonblocking`); None
        when the value is too large for the loop (run :meth:`GetVariable` in a thread)."""
        variable = await self.store.get_variable_async(request.session_id, request.variable_identifier)
        if variable is None:
            return None
        return pb.GetVariableResponse(variable=variable_to_proto(variable), from_cache=False)

    @_unary
    def SetVariable(self, request: pb.SetVariableRequest, context: grpc.ServicerContext) -> pb.SetVariableResponse:
        """Write one variable; a non-zero ``expected_version`` that is not current is ``ABORTED``."""
        variable = self.store.set_variable(
            request.session_id, request.variable_identifier, **self._set(request, context)
        )
        return pb.SetVariableResponse(success=True, new_version=variable.version)

    async def set_variable_async(
        self, request: pb.SetVariableRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetVariableResponse | None:
        """``SetVariable`` on the event loop when the store can write without blocking; None when it cannot
        (nothing was written: run :meth:`SetVariable` in a thread), as for a value too large for the loop."""
        if request.ByteSize() > LOOP_MAX_VALUE_BYTES:
            return None
        variable = await self.store.set_variable_async(
            request.session_id, request.variable_identifier, **self._set(request, context)
        )
        return None if variable is None else pb.SetVariableResponse(success=True, new_version=variable.version)

    def _set(self, request: pb.SetVariableRequest, context: Any) -> dict[str, Any]:
        """The store's arguments for the write ``request`` asks for (its value decoded)."""
        return {
            "value": self._decode(request.value, request.variable_identifier, request.binary_value),
            "metadata": dict(request.metadata),
            "expected_version": request.expected_version or None,
            "source": self._writer(request.metadata, context),
        }

    @_unary
    def GetVariables(
        self, request: pb.BatchGetVariablesRequest, context: grpc.ServicerContext
    ) -> pb.BatchGetVariablesResponse:
        """Return the variables found, keyed by identifier as requested, and the missing identifiers."""
        found, missing = self.store.get_variables(request.session_id, list(request.variable_identifiers))
        return _batch_get_response(found, missing)

    async def get_variables_async(
        self, request: pb.BatchGetVariablesRequest, context: Any
    ) -> pb.BatchGetVariablesResponse | None:
        """``GetVariables`` on the event loop (a store that is :attr:`~SessionStore.nonblocking`); None
        when the values are too large for the loop."""
        got = await self.store.get_variables_async(request.session_id, list(request.variable_identifiers))
        return None if got is None else _batch_get_response(*got)

    @_unary
    def SetVariables(
        self, request: pb.BatchSetVariablesRequest, context: grpc.ServicerContext
    ) -> pb.BatchSetVariablesResponse:
        """Write several variables; ``atomic`` applies all or none. Rejections are reported, not raised.

        Each rejection is reported twice: as text in ``errors`` (what a snakepit 0.4 peer reads) and
        as a ``google.rpc.Status`` with the error's fields in ``error_details``.
        """
        rejected: dict[str, DSPexError] = {}
        values: dict[str, Any] = {}
        for ident, any_msg in request.updates.items():
            try:
                values[ident] = self._decode(any_msg, ident, request.binary_updates.get(ident, b""))
            except DSPexError as exc:
                rejected[ident] = exc
        if request.atomic and rejected:
            # The session must still exist for a rejection to mean anything.
            self.store.get_session(request.session_id)
            return _batch_response(rejected, {})
        result = self.store.set_variables(
            request.session_id,
            values,
            metadata=dict(request.metadata),
            atomic=request.atomic,
            source=self._writer(request.metadata, context),
        )
        rejected.update(result.errors)
        return _batch_response(rejected, result.new_versions)

    @_unary
    def ListVariables(
        self, request: pb.ListVariablesRequest, context: grpc.ServicerContext
    ) -> pb.ListVariablesResponse:
        """Variables in creation order, optionally filtered by a ``*`` glob on the whole name."""
        variables = self.store.list_variables(request.session_id, request.pattern or None)
        return pb.ListVariablesResponse(variables=[variable_to_proto(v) for v in variables])

    @_unary
    def DeleteVariable(
        self, request: pb.DeleteVariableRequest, context: grpc.ServicerContext
    ) -> pb.DeleteVariableResponse:
        """Delete a variable; watchers receive a ``deleted`` update."""
        self.store.delete_variable(request.session_id, request.variable_identifier, source=self._writer({}, context))
        return pb.DeleteVariableResponse(success=True)

    @_unary
    def GetVariableHistory(
        self, request: pb.GetVariableHistoryRequest, context: grpc.ServicerContext
    ) -> pb.GetVariableHistoryResponse:
        """A variable's remembered writes, newest first; ``limit`` > 0 keeps that many."""
        variable = self.store.get_variable(request.session_id, request.variable_identifier)
        entries = self.store.get_history(request.session_id, variable.id, request.limit)
        return pb.GetVariableHistoryResponse(
            entries=[
                pb.VariableHistoryEntry(
                    version=entry.version,
                    value=value_to_any(variable.type, entry.value),
                    timestamp=timestamp(entry.timestamp),
                    changed_by=entry.changed_by,
                    metadata=entry.metadata,
                )
                for entry in entries
            ]
        )

    @_unary
    def RollbackVariable(
        self, request: pb.RollbackVariableRequest, context: grpc.ServicerContext
    ) -> pb.RollbackVariableResponse:
        """Write the value a variable had at ``target_version`` as a new version."""
        variable = self.store.rollback_variable(
            request.session_id,
            request.variable_identifier,
            request.target_version,
            source=self._writer({}, context),
        )
        return pb.RollbackVariableResponse(success=True, variable=variable_to_proto(variable))

    @_stream
    def WatchVariables(
        self, request: pb.WatchVariablesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.VariableUpdate]:
        """Stream variable updates: the snapshot (if asked), then changes, deletions and heartbeats.

        The watcher is registered with the store before the snapshot is taken, so no write falls
        between them. The stream ends when the client cancels, the server shuts down, or the
        session goes away (``NOT_FOUND``).
        """
        session_id = request.session_id
        identifiers = list(request.variable_identifiers)

        def open_watch() -> Watch:
            return self.store.watch(session_id, identifiers, include_initial=request.include_initial_values)

        with self._watch_slot(open_watch, session_id, self.principal_of(context)) as watch:
            # Wakes the loop at once when the client goes away.
            context.add_callback(watch.close)
            interval = self.heartbeat_interval
            last_sent = time.monotonic()
            while context.is_active() and not self._stopping.is_set():
                update = watch.next_update(timeout=max(0.0, self.watch_wait(last_sent)))
                if update is not None:
                    yield update_to_proto(update)
                    last_sent = time.monotonic()
                elif watch.closed:
                    break
                elif time.monotonic() - last_sent >= interval:
                    # An open watch is a session in use: keep it from expiring under its watchers.
                    self.store.heartbeat(session_id)
                    yield pb.VariableUpdate(update_type="heartbeat", timestamp=timestamp(time.time()))
                    last_sent = time.monotonic()
            if context.is_active() and not self._stopping.is_set():
                # The store closed the watch: the session ended, or the store itself closed.
                if not self.store.has_session(session_id):
                    raise SessionNotFoundError(session_id)
                raise BridgeUnavailableError("the session store was closed")

    # ------------------------------------------------------------------ tools (not served)

    @_unary
    def GetExposedElixirTools(
        self, request: pb.GetExposedElixirToolsRequest, context: grpc.ServicerContext
    ) -> pb.GetExposedElixirToolsResponse:
        """No orchestrator tools are exposed: an empty list (workers call this when they connect)."""
        return pb.GetExposedElixirToolsResponse()

    @_unary
    def ExecuteTool(self, request: pb.ExecuteToolRequest, context: grpc.ServicerContext) -> pb.ExecuteToolResponse:
        """Not implemented: ``UNIMPLEMENTED``."""
        raise _unimplemented("ExecuteTool", "tool execution is not supported")

    @_stream
    def ExecuteStreamingTool(
        self, request: pb.ExecuteToolRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ToolChunk]:
        """Not implemented: ``UNIMPLEMENTED``."""
        raise _unimplemented("ExecuteStreamingTool", "tool execution is not supported")

    @_unary
    def RegisterTools(
        self, request: pb.RegisterToolsRequest, context: grpc.ServicerContext
    ) -> pb.RegisterToolsResponse:
        """Not implemented: ``UNIMPLEMENTED``."""
        raise _unimplemented("RegisterTools", "tool registration is not supported")

    @_unary
    def ExecuteElixirTool(
        self, request: pb.ExecuteElixirToolRequest, context: grpc.ServicerContext
    ) -> pb.ExecuteElixirToolResponse:
        """Not implemented: ``UNIMPLEMENTED``."""
        raise _unimplemented("ExecuteElixirTool", "no orchestrator tools are exposed")

    @_unary
    def AddDependency(
        self, request: pb.AddDependencyRequest, context: grpc.ServicerContext
    ) -> pb.AddDependencyResponse:
        """Not implemented: ``UNIMPLEMENTED``."""
        raise _unimplemented("AddDependency", "variable dependencies are not supported")

    @_unary
    def StartOptimization(
        self, request: pb.StartOptimizationRequest, context: grpc.ServicerContext
    ) -> pb.StartOptimizationResponse:
        """Take (or renew) an optimization lease; ``optimization_id`` is the lease's id.

        ``optimizer_config`` may carry ``variables`` (a JSON list: the lease covers all of them,
        else just ``variable_identifier``) and ``lease_seconds`` (its ttl). Another optimizer's
        lease on any of them is ``FAILED_PRECONDITION``.
        """
        variables, ttl = lease_request_config(request.variable_identifier, dict(request.optimizer_config))
        lease = self.store.start_optimization(request.session_id, variables, request.optimizer_id, ttl=ttl)
        return pb.StartOptimizationResponse(success=True, optimization_id=lease.id)

    @_unary
    def StopOptimization(
        self, request: pb.StopOptimizationRequest, context: grpc.ServicerContext
    ) -> pb.StopOptimizationResponse:
        """End a lease named by its id, or (``force``) the lease holding the named variable.

        ``final_value`` is the named variable's value (unset when a lease id is named).
        """
        ident = request.variable_identifier
        self.store.stop_optimization(request.session_id, ident, force=request.force)
        response = pb.StopOptimizationResponse(success=True)
        if not ident.startswith(LEASE_ID_PREFIX):
            variable = self.store.get_variable(request.session_id, ident)
            response.final_value.CopyFrom(value_to_any(variable.type, variable.value))
        return response


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


_LOOP_LOCK: Final = threading.Lock()
_LOOP: EventLoopThread | None = None


def _serving_loop() -> EventLoopThread:
    """The event loop every bridge server of this process runs on (started on first use)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or not _LOOP.alive:
            _LOOP = EventLoopThread("dspex-bridge-loop")
        return _LOOP


class BridgeServer:
    """A running (or ready to run) bridge: the gRPC server, its servicer, health service and store.

    Build one with :func:`create_server`. A ``grpc.aio`` server runs on an event loop thread of
    its own, so every method here is a plain blocking call whichever kind of server it wraps.
    Usable as a context manager (starts on enter, stops on exit).

    Attributes:
        store: the served :class:`SessionStore`.
        servicer: the :class:`BridgeServicer`.
        host: the bound host.
        port: the bound port (the real one when created with port 0).
    """

    def __init__(
        self,
        server: grpc.aio.Server | grpc.Server,
        servicer: BridgeServicer,
        health_servicer: Any,
        *,
        host: str,
        port: int,
        owns_store: bool,
        loop: EventLoopThread | None,
        executor: futures.ThreadPoolExecutor,
    ) -> None:
        self._server = server
        self.servicer = servicer
        self._health = health_servicer
        self.store = servicer.store
        self.host = host
        self.port = port
        self._owns_store = owns_store
        self._loop = loop
        self._executor = executor
        self._lock = threading.Lock()
        self._started = False
        self._stopped = threading.Event()
        self._terminated = threading.Event()

    @property
    def address(self) -> str:
        """``"host:port"`` for clients to connect to."""
        return _format_address(self.host, self.port)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._started and not self._stopped.is_set()

    @property
    def asyncio(self) -> bool:
        """Whether this is a ``grpc.aio`` server (False: a blocking, thread-per-call ``grpc.server``)."""
        return self._loop is not None

    def start(self) -> BridgeServer:
        """Start serving (idempotent); returns ``self``."""
        with self._lock:
            if self._stopped.is_set():
                raise BridgeUnavailableError(f"the bridge server at {self.address} was stopped; create a new one")
            if self._started:
                return self
            if self._loop is not None:
                if not self._loop.alive:  # e.g. a server object inherited by a forked child
                    raise BridgeUnavailableError(
                        f"the event loop of the bridge server at {self.address} is gone; create a new one"
                    )
                self._loop.run(self._start())
            else:
                self._server.start()
                for service in ("", SERVICE_NAME):
                    self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self._started = True
            if self._owns_store:
                self.store.start_sweeper()
        if self._loop is not None:
            kind = type(self._loop.loop).__module__.split(".")[0]
            logger.info("bridge server listening on %s (event loop: %s)", self.address, kind)
        else:
            logger.info("bridge server listening on %s", self.address)
        return self

    async def _start(self) -> None:
        await self._server.start()  # type: ignore[misc]
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop gracefully (idempotent).

        New calls get ``UNAVAILABLE`` and health turns ``NOT_SERVING``; open watch streams end
        cleanly; calls in flight get ``grace`` seconds to finish. A store the server created is
        closed too.
        """
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        self.servicer.begin_shutdown()
        try:
            if self._loop is None:
                self._health.enter_graceful_shutdown()
                self._server.stop(grace).wait()  # type: ignore[union-attr]
            elif self._loop.alive:
                self._loop.run(self._stop(grace))
        finally:
            self._executor.shutdown(wait=False)
            if self._owns_store:
                self.store.close()
            self._terminated.set()
        logger.info("bridge server at %s stopped", self.address)

    async def _stop(self, grace: float | None) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)  # type: ignore[misc]

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` passes); True if it stopped."""
        return self._terminated.wait(timeout)

    def __enter__(self) -> BridgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped.is_set() else "created")
        kind = "" if self.asyncio else ", blocking"
        return f"BridgeServer(address={self.address!r}, {state}{kind})"


def _batch_get_response(found: Mapping[str, Variable], missing: Sequence[str]) -> pb.BatchGetVariablesResponse:
    return pb.BatchGetVariablesResponse(
        variables={ident: variable_to_proto(var) for ident, var in found.items()}, missing_variables=missing
    )


def _token_or_peer(context: grpc.ServicerContext) -> str:
    """Who is calling, for fair shares of watch streams: the token's ``sub``, else the peer address."""
    claims = current_principal()
    return claims.sub if claims is not None else peer_principal(context)


def create_server(
    store: SessionStore | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    limits: ServerLimits | None = None,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    tls: ServerTLS | None = None,
    auth_secret: bytes | None = None,
    rate_limit: RateLimiter | None = None,
    insecure: bool = False,
    interceptors: Sequence[Any] = (),
    asyncio: bool = True,
) -> tuple[BridgeServer, int]:
    """Build a bridge server bound to ``host:port`` (port 0 = a free port); call ``start()`` on it.

    Args:
        store: the store to serve; None creates one that the server owns (swept while running,
            closed on stop).
        host: interface to bind; loopback by default.
        port: port to bind; 0 picks a free one.
        limits: server-side limits.
        heartbeat_interval: seconds of silence after which a watch stream sends a heartbeat.
        tls: serve over TLS with this material (mutual TLS when it has a client CA).
        auth_secret: require on every call (health aside) a token signed with this secret.
        rate_limit: a per-principal rate limit.
        insecure: allow a non-loopback ``host`` without both TLS and tokens (a warning is logged).
        interceptors: server interceptors run before the token checks: ``grpc.aio`` ones for an
            asyncio server (e.g. :meth:`dspex_dspy.metrics.BridgeMetrics.interceptor`), blocking
            ones otherwise (:meth:`~dspex_dspy.metrics.BridgeMetrics.blocking_interceptor`).
        asyncio: serve on ``grpc.aio`` (the default): an open watch stream holds no thread, so
            one server holds thousands of them. False serves on a blocking ``grpc.server`` with
            a thread per call (``limits.max_watchers + limits.workers`` threads at most, so
            watches never starve unary calls); a process that forks children while it serves
            a bridge needs this, since gRPC's fork support does not cover ``grpc.aio``.

    Returns:
        ``(server, port)`` with the real bound port.

    Raises:
        BridgeUnavailableError: the address cannot be bound.
        PermissionDeniedError: ``host`` is not loopback, TLS or tokens are missing, and
            ``insecure`` is false.

    Example:
        >>> server, port = create_server()
        >>> with server:
        ...     print(server.address)  # doctest: +SKIP
        127.0.0.1:50123
    """
    check_exposure(host, tls=tls is not None, auth=auth_secret is not None, insecure=insecure)
    limits = limits or ServerLimits()
    owns_store = store is None
    served = store if store is not None else SessionStore()
    servicer = BridgeServicer(served, limits=limits, heartbeat_interval=heartbeat_interval)
    servicer.principal_of = _token_or_peer
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Worker clients ping every 10 s to notice dead connections: permit pings every 5 s, also
        # on connections without calls; ping clients every 20 s (10 s to answer) to free the
        # watch slots of clients that vanished without a reset.
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    target = _format_address(host, port)
    if not asyncio:
        return _blocking_server(
            servicer, served, options, target, tls, auth_secret, rate_limit, interceptors, host, owns_store
        )
    loop = _serving_loop()
    executor = futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="dspex-bridge")

    async def build() -> tuple[grpc.aio.Server, Any, int]:
        server = grpc.aio.server(
            options=options, interceptors=[*interceptors, AsyncBridgeGuard(auth_secret, rate_limit)]
        )
        # Not the generated add_BridgeServiceServicer_to_server: undecodable requests must be answered
        # INVALID_ARGUMENT (gRPC's own deserializer failure is INTERNAL), and fields are range-checked.
        server.add_generic_rpc_handlers((guarded_async_handler(AsyncBridgeServicer(servicer, executor)),))
        add_admin_service(server, served, executor)
        health_servicer = aio_health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        return server, health_servicer, _bind(server, target, tls)

    try:
        server, health_servicer, bound = loop.run(build())
    except BaseException:
        executor.shutdown(wait=False)
        raise
    bridge = BridgeServer(
        server,
        servicer,
        health_servicer,
        host=host,
        port=bound,
        owns_store=owns_store,
        loop=loop,
        executor=executor,
    )
    return bridge, bound


def _bind(server: grpc.aio.Server | grpc.Server, target: str, tls: ServerTLS | None) -> int:
    """Add the listening port; the bound port number."""
    try:
        bound = server.add_secure_port(target, tls.credentials()) if tls else server.add_insecure_port(target)
    except RuntimeError as exc:
        raise BridgeUnavailableError(f"cannot bind the bridge server to {target}: {exc}") from exc
    if not bound:
        raise BridgeUnavailableError(f"cannot bind the bridge server to {target}")
    return bound


def _blocking_server(
    servicer: BridgeServicer,
    served: SessionStore,
    options: list[tuple[str, Any]],
    target: str,
    tls: ServerTLS | None,
    auth_secret: bytes | None,
    rate_limit: RateLimiter | None,
    interceptors: Sequence[Any],
    host: str,
    owns_store: bool,
) -> tuple[BridgeServer, int]:
    """The bridge on a blocking ``grpc.server``: a thread per call, open watch streams included."""
    limits = servicer.limits
    executor = futures.ThreadPoolExecutor(
        max_workers=limits.max_watchers + limits.workers, thread_name_prefix="dspex-bridge"
    )
    server = grpc.server(executor, options=options, interceptors=[*interceptors, BridgeGuard(auth_secret, rate_limit)])
    server.add_generic_rpc_handlers((guarded_handler(servicer),))
    add_admin_service(server, served)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        bound = _bind(server, target, tls)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    bridge = BridgeServer(
        server, servicer, health_servicer, host=host, port=bound, owns_store=owns_store, loop=None, executor=executor
    )
    return bridge, bound


class EmbeddedBridge:
    """The process-wide bridge an orchestrator starts lazily on loopback (port chosen by the OS).

    Example:
        >>> server = EmbeddedBridge.get()  # doctest: +SKIP
        >>> server.store.create_session("s1")  # doctest: +SKIP
    """

    _lock: Final = threading.Lock()
    _server: BridgeServer | None = None
    _atexit_registered = False
    _storage_url = "memory"

    @classmethod
    def configure(cls, storage: str = "memory") -> None:
        """Choose where the embedded bridge keeps sessions: ``"memory"`` or ``"redis://HOST:PORT/DB"``.

        A running embedded bridge is shut down; the next :meth:`get` starts one on that storage.
        """
        if storage != "memory" and not storage.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"storage must be 'memory' or a redis:// URL, got {storage!r}")
        cls.shutdown()
        with cls._lock:
            cls._storage_url = storage

    @classmethod
    def get(cls) -> BridgeServer:
        """Return the running embedded bridge, starting it (and a fresh store) if needed. Thread-safe."""
        with cls._lock:
            if cls._server is not None and cls._server.running:
                return cls._server
            if cls._storage_url == "memory":
                store = SessionStore()
            else:
                from dspex_dspy.store.redis_storage import RedisStorage  # only Redis users need redis-py

                store = SessionStore(storage=RedisStorage(cls._storage_url))
            store.start_sweeper()
            try:
                # Blocking, not grpc.aio: the process that embeds the bridge (a notebook, a script)
                # may fork children (multiprocessing's default on Linux), which gRPC supports only
                # without grpc.aio.
                server, _ = create_server(store, "127.0.0.1", 0, asyncio=False)
                server.start()
            except BaseException:
                store.close()
                raise
            cls._server = server
            if not cls._atexit_registered:
                atexit.register(cls.shutdown)
                cls._atexit_registered = True
            return server

    @classmethod
    def running(cls) -> bool:
        """Whether an embedded bridge is running now (does not start one)."""
        with cls._lock:
            return cls._server is not None and cls._server.running

    @classmethod
    def shutdown(cls, grace: float | None = 1.0) -> None:
        """Stop the embedded bridge and close its store; a later :meth:`get` starts a fresh one."""
        with cls._lock:
            server, cls._server = cls._server, None
        if server is not None:
            server.stop(grace)
            server.store.close()
            server.store.storage.close()
