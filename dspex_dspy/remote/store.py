"""RemoteStore: the SessionStore methods, spoken over gRPC to a running bridge server.

An orchestrator whose context is bridged to a standalone server (``Context(bridge="host:port")``)
reads and writes its session through a :class:`RemoteStore`. It has the signatures and raises the
exceptions of :class:`~dspex_dspy.store.SessionStore`, so :class:`~dspex_dspy.state.BridgedState`
behaves the same whether its store is in this process or behind a bridge. Every call carries a
deadline; it is one of the :class:`~dspex_dspy.remote.calls.BridgeCall` descriptions, and a
failed call raises the very exception the server raised (rebuilt from the rich error details by
:func:`~dspex_dspy.wire_errors.error_from_rpc`).

Who wrote: the server records RPC writers as ``"worker"`` unless the call's gRPC metadata (or the
request's ``metadata`` map) names ``source`` ``"orchestrator"``. A RemoteStore write sends its
``source`` argument (``"orchestrator"`` by default, as for a SessionStore) as gRPC metadata.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final, TypeVar, cast

import grpc

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
from dspex_dspy.leases import FORCE_METADATA_KEY, OptimizationLease
from dspex_dspy.records import BatchResult, HistoryEntry, SessionInfo, UpdateType, Watch
from dspex_dspy.remote.calls import BridgeCall, BridgeCalls, registered_variable
from dspex_dspy.remote.channel import DEFAULT_CALL_TIMEOUT, open_channel
from dspex_dspy.tls import Pem
from dspex_dspy.types import Variable, VariableSpec, compile_spec, is_secret, normalize_metadata, validate_name
from dspex_dspy.wire import proto_to_update
from dspex_dspy.wire_errors import error_from_rpc

__all__ = ["IMPORT_WINDOW", "UNDO_TIMEOUT", "RemoteStore"]

logger = logging.getLogger(__name__)

_BATCH_IMPORT_BYTES: Final = 8 * 1024 * 1024
"""Largest import sent as one ``ImportVariables`` call (bigger ones register one by one)."""

IMPORT_WINDOW: Final = 256
"""How many ``RegisterVariable`` calls :meth:`RemoteStore.import_variables` keeps in flight."""

PIPELINED_IMPORT_CHUNK: Final = 1000
"""Variables per ``ImportVariables`` call of a non-atomic import (see :meth:`RemoteStore.import_variables`)."""

UNDO_TIMEOUT: Final = 2.0
"""Seconds the clean-up of a failed import may take (the connection is often what failed)."""

_T = TypeVar("_T")

_Part = tuple[int, int, "grpc.Future[pb.ImportVariablesResponse]"]
"""A part of a pipelined import that was sent: its variables' ``[start, end)`` and its call."""


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
        stub: pb_grpc.BridgeServiceStub,
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
        self._batch_import: bool | None = None  # False once the bridge said it has no ImportVariables
        self._deadlines = threading.local()

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        timeout: float = 5.0,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        root_certificates: Pem | None = None,
        token: str | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
    ) -> RemoteStore:
        """Open a channel to ``address`` (see :func:`~dspex_dspy.remote.open_channel`) and wait until it is ready.

        Args:
            address: ``"host:port"`` of a bridge server.
            timeout: seconds to wait for the connection.
            call_timeout: the deadline of each later call.
            root_certificates: PEM roots to trust (bytes, text or a path): the channel uses TLS.
            token: a bearer token sent on every call.
            certificate_chain: a client certificate (PEM), for bridges that require mutual TLS.
            private_key: the key of that client certificate (PEM).

        Raises:
            BridgeUnavailableError: no server answered within ``timeout``.
        """
        channel = open_channel(
            address,
            timeout=timeout,
            root_certificates=root_certificates,
            token=token,
            certificate_chain=certificate_chain,
            private_key=private_key,
        )
        return cls(pb_grpc.BridgeServiceStub(channel), channel=channel, address=address, call_timeout=call_timeout)

    # ------------------------------------------------------------------ running calls

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Bound every call this thread makes inside the block by one deadline ``seconds`` from now.

        A call's timeout becomes the smaller of :attr:`call_timeout` and the time left; once the
        deadline has passed, calls fail at once with :class:`BridgeUnavailableError`. Used to give
        a whole migration one bounded time, however many calls it makes.
        """
        previous = getattr(self._deadlines, "at", None)
        at = time.monotonic() + seconds
        self._deadlines.at = at if previous is None else min(previous, at)
        try:
            yield
        finally:
            self._deadlines.at = previous

    def _timeout(self) -> float:
        """The timeout of the next call: :attr:`call_timeout`, cut to the thread's deadline."""
        timeout = self.call_timeout
        at = getattr(self._deadlines, "at", None)
        if at is not None:
            left = at - time.monotonic()
            if left <= 0:
                raise BridgeUnavailableError(
                    f"the bridge at {self.address or '?'} did not answer within the operation's deadline"
                )
            timeout = min(timeout, left)
        return timeout

    def _lost_session(self, exc: DSPexError, session_id: str) -> DSPexError:
        """Say how to recover when the bridge no longer has a session this client used."""
        if isinstance(exc, SessionNotFoundError) and self._knows_session(session_id):
            hint = (
                f" (the bridge at {self.address or '?'} no longer has this session: it was restarted or the "
                "session expired; call ensure_bridged() on the context to re-create it from the values "
                "this client last saw)"
            )
            if hint not in exc.message:
                exc.message += hint
                exc.args = (exc.message,)
        return exc

    def _knows_session(self, session_id: str) -> bool:
        with self._known_lock:
            return any(key[0] == session_id for key in self._known)

    def known_variables(self, session_id: str) -> list[Variable]:
        """The last state this client saw of each variable of a session, in creation order.

        What a context re-creates its session from when the bridge lost it (see
        :meth:`dspex_dspy.Context.ensure_bridged`).
        """
        with self._known_lock:
            seen = {var.name: var for (sid, _), var in self._known.items() if sid == session_id}
        return sorted(seen.values(), key=lambda var: (var.created_at, var.name))

    def call(self, bridge_call: BridgeCall[_T]) -> _T:
        """Run one described call with this store's deadline; raise the server's error on failure."""
        if self._closed:
            raise BridgeUnavailableError(f"the connection to the bridge at {self.address or '?'} is closed")
        method = getattr(self.stub, bridge_call.rpc)
        try:
            response = method(bridge_call.request, timeout=self._timeout(), metadata=bridge_call.metadata)
        except grpc.RpcError as err:
            session_id = getattr(bridge_call.request, "session_id", "")
            raise self._lost_session(bridge_call.error(err), session_id) from err
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

    def import_variables(
        self, session_id: str, variables: Sequence[Variable], *, atomic: bool = True
    ) -> list[Variable]:
        """Import whole variables (value, version, created_at, description, metadata), all or nothing.

        Every variable is checked here first; then they travel in one ``ImportVariables`` call
        (an extension RPC, applied all or none by the bridge). A bridge without it answers
        ``UNIMPLEMENTED``, and the ``RegisterVariable`` calls are pipelined instead,
        :data:`IMPORT_WINDOW` in flight at a time; if any of them fails, the variables already made
        are deleted again and the first failure (in input order) is raised.

        ``atomic=False`` trades the single call for speed: an import of more than
        :data:`PIPELINED_IMPORT_CHUNK` variables travels in several ``ImportVariables`` calls, each
        sent as soon as its variables are checked, so the bridge applies one part while the next is
        prepared here. A failure (a bad variable, a refused part, a lost connection) still deletes
        whatever was made and raises the first failure in input order, but until then another
        client may see part of the import: meant for a session nobody else uses yet, such as the one
        a context's switch has just created.

        The wire contract carries no ``updated_at`` for a registration, so an imported variable's
        ``updated_at`` becomes the server's time of import.
        """
        pipelined = not atomic and self._batch_import is not False and len(variables) > PIPELINED_IMPORT_CHUNK
        calls: list[BridgeCall[str]] = []
        checked: list[tuple[VariableSpec, Any, dict[str, str], float]] = []
        sent: list[_Part] = []
        part_start = part_bytes = 0
        seen: set[str] = set()
        now = time.time()
        try:
            for var in variables:
                if var.name in seen:
                    raise VariableExistsError(var.name, session_id)
                seen.add(var.name)
                validate_name(var.name)
                if isinstance(var.version, bool) or not isinstance(var.version, int) or var.version < 1:
                    raise ValidationError(var.name, "version", var.version, "a version must be an integer >= 1")
                spec = compile_spec(var.name, var.type, var.constraints, secret=is_secret(var.metadata))
                # Checked once here: the request carries these, and so does the record returned.
                value = spec.validate(var.value)
                metadata = normalize_metadata(var.name, var.metadata)
                created_at = var.created_at or now
                checked.append((spec, value, metadata, created_at))
                calls.append(
                    BridgeCalls.register_variable(
                        session_id,
                        var.name,
                        var.type,
                        value,
                        constraints=var.constraints,
                        description=var.description,
                        metadata=metadata,
                        source=var.source,
                        initial_version=var.version,
                        created_at=created_at,
                        checked=spec,
                    )
                )
                if pipelined:
                    # A part ends at PIPELINED_IMPORT_CHUNK variables, or before the one that would take
                    # it past _BATCH_IMPORT_BYTES (a variable that big alone travels alone).
                    size = calls[-1].request.ByteSize()
                    if part_bytes + size > _BATCH_IMPORT_BYTES and len(calls) - 1 > part_start:
                        sent.append(self._send_part(session_id, calls, part_start, len(calls) - 1))
                        part_start, part_bytes = len(calls) - 1, 0
                    part_bytes += size
                    if len(calls) - part_start == PIPELINED_IMPORT_CHUNK:
                        sent.append(self._send_part(session_id, calls, part_start, len(calls)))
                        part_start, part_bytes = len(calls), 0
            if pipelined and len(calls) > part_start:
                sent.append(self._send_part(session_id, calls, part_start, len(calls)))
        except BaseException as exc:
            if sent:  # what the parts already sent made goes again; the check's failure is raised
                made, _ = self._gather_parts(session_id, sent)
                answered = not isinstance(exc, BridgeUnavailableError)
                self._undo_import(session_id, [var_id for _, var_id in made], bridge_answered=answered)
            raise
        if sent:
            made, unimplemented = self._gather_parts(session_id, sent)
            if unimplemented:  # nothing was made: an older bridge, registered one by one
                made = self._import_one_by_one(session_id, calls)
        else:
            if self._closed:
                raise BridgeUnavailableError(f"the connection to the bridge at {self.address or '?'} is closed")
            ids = self._import_batch(session_id, calls) if calls else []
            made = list(enumerate(ids)) if ids is not None else self._import_one_by_one(session_id, calls)
        now = time.time()
        out = []
        for (_, var_id), var, (spec, value, metadata, created_at) in zip(sorted(made), variables, checked, strict=True):
            imported = Variable(
                id=var_id,
                name=var.name,
                type=spec.type,
                value=value,
                constraints=dict(spec.constraints),
                description=var.description,
                metadata=metadata,
                version=var.version,
                created_at=created_at,
                updated_at=now,
                source=var.source,
                optimization_status=var.optimization_status,
            )
            out.append(self._learn(session_id, imported))
        return out

    def _send_part(self, session_id: str, calls: list[BridgeCall[str]], start: int, end: int) -> _Part:
        """Send ``calls[start:end]`` as one ``ImportVariables`` call, not waiting for its answer."""
        if self._closed:
            raise BridgeUnavailableError(f"the connection to the bridge at {self.address or '?'} is closed")
        part = calls[start:end]
        entries = [cast(pb.RegisterVariableRequest, c.request) for c in part]
        request = pb.ImportVariablesRequest(session_id=session_id, variables=entries)
        try:
            future = self.stub.ImportVariables.future(request, timeout=self._timeout(), metadata=part[0].metadata)
        except ValueError as err:  # grpc raises this for a call on a closed channel
            raise BridgeUnavailableError(f"the connection to the bridge is closed: {err}") from err
        return start, end, future

    def _gather_parts(self, session_id: str, sent: list[_Part]) -> tuple[list[tuple[int, str]], bool]:
        """Wait for every part sent: ``(made, unimplemented)``, ``made`` as ``(index, id)`` pairs.

        A part that failed undoes every part that succeeded and raises the first failure (in
        input order). ``unimplemented``: the bridge has no ``ImportVariables`` (nothing was made).
        """
        made: list[tuple[int, str]] = []
        failure: DSPexError | None = None
        unimplemented = False
        for start, end, future in sent:
            try:
                response = future.result()
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    unimplemented = True
                elif failure is None:
                    failure = error_from_rpc(err, session_id=session_id)
                continue
            expected = end - start
            if len(response.variable_ids) != expected and failure is None:
                failure = BridgeUnavailableError(
                    f"the bridge answered {len(response.variable_ids)} ids for an import of {expected} variables"
                )
            made.extend(enumerate(response.variable_ids, start))
        if unimplemented and not made and failure is None:
            self._batch_import = False  # an older bridge: register one by one from now on
            return [], True
        if failure is None and unimplemented:
            failure = BridgeUnavailableError("the bridge refused part of an import as unimplemented")
        if failure is not None:
            answered = not isinstance(failure, BridgeUnavailableError)
            self._undo_import(session_id, [var_id for _, var_id in made], bridge_answered=answered)
            raise failure
        return made, False

    def _import_batch(self, session_id: str, calls: list[BridgeCall[str]]) -> list[str] | None:
        """One ``ImportVariables`` call; None when the bridge does not have that extension RPC."""
        if self._batch_import is False or sum(c.request.ByteSize() for c in calls) > _BATCH_IMPORT_BYTES:
            return None
        made, unimplemented = self._gather_parts(session_id, [self._send_part(session_id, calls, 0, len(calls))])
        return None if unimplemented else [var_id for _, var_id in made]

    def _import_one_by_one(self, session_id: str, calls: list[BridgeCall[str]]) -> list[tuple[int, str]]:
        """Pipelined ``RegisterVariable`` calls (bridges without ``ImportVariables``); undone on failure."""
        made: list[tuple[int, str]] = []
        failure: tuple[int, DSPexError] | None = None
        for start in range(0, len(calls), IMPORT_WINDOW):
            window = list(enumerate(calls[start : start + IMPORT_WINDOW], start))
            try:
                timeout = self._timeout()
            except BridgeUnavailableError as exc:
                failure = (start, exc)
                break
            pending = [
                (i, c, getattr(self.stub, c.rpc).future(c.request, timeout=timeout, metadata=c.metadata))
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
        return made

    def _undo_import(self, session_id: str, variable_ids: list[str], *, bridge_answered: bool = False) -> None:
        """Delete the variables a failed import made (pipelined); failures are logged, not raised.

        The clean-up gets its own short deadline (:data:`UNDO_TIMEOUT`): when the connection is what
        failed it cannot succeed, and the caller must learn of the failure in bounded time.
        ``bridge_answered``: the import failed on something else (the bridge refused a part, or a
        variable was bad), so the connection works: each window of deletes gets a whole
        :attr:`call_timeout` instead.
        """
        budget = UNDO_TIMEOUT
        if bridge_answered:
            budget = max(budget, self.call_timeout * -(-len(variable_ids) // IMPORT_WINDOW))
        undo_by = time.monotonic() + budget
        for start in range(0, len(variable_ids), IMPORT_WINDOW):
            left = undo_by - time.monotonic()
            if left <= 0:
                logger.warning("could not undo the import of %d variable(s) in time", len(variable_ids) - start)
                return
            calls = [
                BridgeCalls.delete_variable(session_id, var_id, source="orchestrator")
                for var_id in variable_ids[start : start + IMPORT_WINDOW]
            ]
            futures = [
                self.stub.DeleteVariable.future(c.request, timeout=min(left, self.call_timeout), metadata=c.metadata)
                for c in calls
            ]
            failed: list[str] = []
            last_error: DSPexError | None = None
            for c, future in zip(calls, futures, strict=True):
                try:
                    future.result()
                except grpc.RpcError as err:
                    failed.append(c.identifier)
                    last_error = c.error(err)
            if failed:
                logger.warning(
                    "could not undo the import of %d variable(s) (%s%s): %s",
                    len(failed),
                    ", ".join(failed[:5]),
                    ", ..." if len(failed) > 5 else "",
                    last_error,
                )

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
        force: bool = False,
    ) -> Variable:
        """Write a variable; return it at its new version (``force``: through a lease).

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
            metadata=_forcing(metadata) if force else metadata,
            expected_version=expected_version,
            source=source,
        )
        version = self.call(call)
        if known is not None:
            try:
                normalised = compile_spec(
                    known.name, known.type, known.constraints, secret=is_secret(known.metadata)
                ).validate(value)
            except ValidationError:
                known = None  # what this client knew is stale: the variable was redefined
        if known is None:
            known = self.call(BridgeCalls.get_variable(session_id, identifier))
            if known.version == version:
                return self._learn(session_id, known)
            normalised = compile_spec(
                known.name, known.type, known.constraints, secret=is_secret(known.metadata)
            ).validate(value)
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
        force: bool = False,
    ) -> BatchResult:
        """Write several variables. ``atomic``: validate all, then apply all or none."""
        hints = {ident: t for ident in updates if (t := self._known_type(session_id, ident)) is not None}
        meta = _forcing(metadata) if force else metadata
        call = BridgeCalls.set_variables(
            session_id, updates, type_hints=hints, metadata=meta, atomic=atomic, source=source
        )
        return self.call(call)

    def start_optimization(
        self, session_id: str, identifiers: Sequence[str], optimizer_id: str, *, ttl: float
    ) -> OptimizationLease:
        """Take (or renew) an optimizer's lease on some variables; see :mod:`dspex_dspy.leases`."""
        return self.call(BridgeCalls.start_optimization(session_id, identifiers, optimizer_id, ttl=ttl))

    def stop_optimization(self, session_id: str, identifier: str, *, force: bool = False) -> None:
        """End a lease by its id, or by force the lease holding a variable (an ended lease: no-op)."""
        self.call(BridgeCalls.stop_optimization(session_id, identifier, force=force))

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


def _forcing(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Write metadata that asks the server to write through a lease."""
    return {**(metadata or {}), FORCE_METADATA_KEY: "true"}
