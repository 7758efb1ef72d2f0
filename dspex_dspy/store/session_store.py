"""The SessionStore: sessions with a sliding TTL, and their typed, versioned, watchable variables.

This is the shared state behind a bridge. It knows nothing of gRPC or DSPy: the server maps RPCs
onto it, and an orchestrator whose bridge is embedded calls it directly, in process. Every method
is thread-safe; every rejected operation raises and changes nothing.

Rules kept here, for every caller:

- variable ids are ``var_<name>_<n>`` (``n`` unique and increasing); an identifier is looked up
  as an id first, then as a name;
- versions start at 1 and grow by 1 per accepted write (a rollback is a write); a non-zero
  ``expected_version`` makes a write a compare-and-swap;
- a variable's own metadata is set when it is defined (or imported); the metadata given with one
  write belongs to that write: it is kept in the write's history entry, sent to watchers, and
  shown on top of the variable's own metadata for the version that write made only (the next
  write replaces it; it never sticks to later versions);
- each write records who wrote (``source``) and when, and each variable keeps a bounded history
  of its writes;
- an optimization lease (:mod:`dspex_dspy.leases`) refuses other writers, unless forced, until
  its optimizer stops it or it expires (on an engine shared by several nodes, the engine holds them);
- a session expires when it has not been used for its TTL; a sweep removes expired sessions;
- watchers are registered (and, on a shared engine, the session's change log followed) before
  their initial snapshot is read, so no write can fall between the snapshot and the stream.

Records live in a storage engine (:mod:`dspex_dspy.store.storage`): in process by default, or in
Redis, where several bridge nodes serve the same sessions. The store holds no lock while it
validates or copies values; engines lock per session (or run a script atomically).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

from dspex_dspy.errors import (
    BridgeUnavailableError,
    DSPexError,
    LimitExceededError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.leases import (
    HOLDER_METADATA_KEY,
    LEASE_ID_PREFIX,
    LeaseTable,
    OptimizationLease,
    pop_force,
    validate_lease_request,
)
from dspex_dspy.limits import StoreLimits, check_value_size
from dspex_dspy.records import BatchResult, HistoryEntry, SessionInfo, UpdateType, VariableUpdate
from dspex_dspy.store.calls import MAX_CALLS_KEPT, decode_calls, encode_calls
from dspex_dspy.store.glob import compile_glob
from dspex_dspy.store.storage import (
    MAX_VERSION,
    LeaseCheck,
    MemoryStorage,
    NewVariable,
    SharedLeases,
    Storage,
    Write,
    constraints_bytes,
    map_bytes,
    owned_constraints,
    text_bytes,
)
from dspex_dspy.store.watch import Watch
from dspex_dspy.types import (
    BATCH_METADATA_KEY,
    OptimizationStatus,
    Variable,
    VariableSpec,
    compile_spec,
    is_secret,
    normalize_metadata,
    validate_name,
)

__all__ = ["BatchResult", "SessionInfo", "SessionStore", "StoreLimits"]

logger = logging.getLogger(__name__)

DEFAULT_TTL = 3600.0
MAX_SESSION_ID_LENGTH = 256
MIN_TIME = -62_135_596_800.0
MAX_TIME = 253_402_300_799.0
"""Timestamps a store keeps lie in years 1..9999 (what ``google.protobuf.Timestamp`` can carry)."""


def _monotonic() -> float:
    # Looked up at call time, so tests can stand in for this module's ``time``.
    return time.monotonic()


def _lease_checked(write: Write, meta: Mapping[str, str], check: LeaseCheck) -> Write:
    """``write`` with the lease check an engine that keeps the leases runs (none when ``check`` is empty)."""
    if not check:
        return write
    return replace(write, lease_check=check, holder=str(meta.get(HOLDER_METADATA_KEY, "")))


def _detached(var: Variable, status: OptimizationStatus | None = None) -> Variable:
    """A copy of a variable whose mutable parts (embedding list, tensor dict, maps, constraint lists)
    the caller may change, reporting the optimization lease that holds it (if any)."""
    value = var.value
    if isinstance(value, list):
        value = list(value)
    elif isinstance(value, dict):
        value = {"shape": list(value["shape"]), "data": list(value["data"])}
    # Every field named (not dataclasses.replace, twice as slow): this runs for every record served.
    return Variable(
        id=var.id,
        name=var.name,
        type=var.type,
        value=value,
        constraints=owned_constraints(var.constraints),
        description=var.description,
        metadata=dict(var.metadata),
        version=var.version,
        created_at=var.created_at,
        updated_at=var.updated_at,
        source=var.source,
        optimization_status=status,
    )


_lease_clock = time.monotonic  # the real clock, whatever tests do to this module's ``time``


_ROLLBACK_ATTEMPTS = 16
_FOLLOW_WAIT_S = 1.0


class SessionStore:
    """Sessions and their variables, shared by the orchestrator, the bridge server and workers.

    Args:
        default_ttl: seconds a session lives without being used (sliding).
        limits: the limits to enforce.
        storage: where records live (:class:`MemoryStorage` by default; a
            :class:`~dspex_dspy.store.redis_storage.RedisStorage` for several nodes and durability).
        clock: wall clock used for timestamps (seconds since the epoch).

    Example:
        >>> store = SessionStore()
        >>> _ = store.create_session("s1")
        >>> store.register_variable("s1", "temperature", "float", 0.7, constraints={"max": 2.0}).version
        1
        >>> store.set_variable("s1", "temperature", 0.9).version
        2
    """

    def __init__(
        self,
        *,
        default_ttl: float = DEFAULT_TTL,
        limits: StoreLimits | None = None,
        storage: Storage | None = None,
        clock: Any = time.time,
    ) -> None:
        if default_ttl <= 0:
            raise ValueError(f"default_ttl must be positive, got {default_ttl}")
        self.default_ttl = float(default_ttl)
        self.limits = limits or StoreLimits()
        self._storage: Storage = (
            storage if storage is not None else MemoryStorage(monotonic=_monotonic, limits=self.limits)
        )
        self._clock = clock
        self._lock = threading.Lock()  # guards the watcher table (never held while calling storage)
        self._watchers: dict[str, list[Watch]] = {}
        self._watcher_count = 0
        self._followers: dict[str, threading.Thread] = {}
        self._specs: dict[tuple[str, str, float], VariableSpec] = {}
        self._known: dict[tuple[str, str], Variable] = {}  # (session, identifier) -> a read of it
        # Leases: the table is changed under _lease_lock, which a write holds from its admission to
        # its application while any lease exists; readers use the lock-free copy in _lease_view
        # (variable id -> (status, deadline)), replaced whole after every change of the table.
        self._leases = LeaseTable()
        self._lease_lock = threading.Lock()
        self._lease_view: dict[str, tuple[OptimizationStatus, float]] = {}
        # An engine shared by several nodes keeps the leases itself and checks them in its writes.
        self._shared_leases: SharedLeases | None = (
            cast("SharedLeases", self._storage) if getattr(self._storage, "shares_leases", False) else None
        )
        self._nonblocking = bool(
            getattr(self._storage, "nonblocking", False)
            and hasattr(self._storage, "read_variables_async")
            and hasattr(self._storage, "apply_writes_async")
        )
        self._closed = False
        self._sweeper: threading.Thread | None = None
        self._stop_sweeper = threading.Event()
        self._storage.add_listener(self)

    @property
    def storage(self) -> Storage:
        """The storage engine under this store."""
        return self._storage

    # ------------------------------------------------------------------ sessions

    def create_session(
        self, session_id: str, metadata: Mapping[str, Any] | None = None, *, ttl: float | None = None
    ) -> SessionInfo:
        """Create a session. Raises :class:`SessionExistsError` if the id is taken."""
        if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_SESSION_ID_LENGTH:
            raise ValidationError(
                "",
                "session_id",
                session_id,
                f"a session id must be a non-empty string of at most {MAX_SESSION_ID_LENGTH} characters",
            )
        meta = normalize_metadata("", metadata)
        meta_bytes = map_bytes(meta)
        if meta_bytes > self.limits.max_session_metadata_bytes:
            raise LimitExceededError("session metadata bytes", meta_bytes, self.limits.max_session_metadata_bytes)
        if ttl is not None and ttl <= 0:
            raise ValidationError("", "ttl", ttl, f"ttl must be positive, got {ttl}")
        self._check_open()
        info = self._storage.create_session(
            session_id,
            meta,
            float(ttl) if ttl is not None else self.default_ttl,
            self._clock(),
            self.limits.max_sessions,
        )
        logger.info(
            "session %s created (ttl %gs)",
            session_id,
            info.ttl,
            extra={"event": "session_created", "session_id": session_id, "ttl": info.ttl},
        )
        return info

    def get_session(self, session_id: str) -> SessionInfo:
        """Describe a session (and refresh its TTL)."""
        self._check_open()
        info = self._storage.get_session(session_id)
        if info is None:
            raise SessionNotFoundError(session_id)
        return info

    def has_session(self, session_id: str) -> bool:
        """Whether the session exists and has not expired (does not refresh its TTL)."""
        self._check_open()
        return self._storage.get_session(session_id, touch=False) is not None

    def heartbeat(self, session_id: str) -> bool:
        """Refresh a session's TTL; return False if it does not exist (or expired)."""
        self._check_open()
        return self._storage.touch_session(session_id)

    def cleanup_session(self, session_id: str) -> int:
        """Remove a session, close its watchers, and return how many variables it held."""
        self._check_open()
        count = self._storage.delete_session(session_id)
        if count is None:
            raise SessionNotFoundError(session_id)
        self.ended(session_id)
        logger.info(
            "session %s cleaned up (%d variables)",
            session_id,
            count,
            extra={"event": "session_cleanup", "session_id": session_id, "variables": count},
        )
        return count

    def session_ids(self) -> list[str]:
        """The ids of the live sessions."""
        self._check_open()
        return self._storage.session_ids()

    def list_sessions(self) -> list[SessionInfo]:
        """Every live session, oldest first (does not refresh any TTL)."""
        self._check_open()
        infos = [self._storage.get_session(sid, touch=False) for sid in self._storage.session_ids()]
        return sorted((info for info in infos if info is not None), key=lambda info: info.created_at)

    def variable_total(self) -> int:
        """Variables over every live session (for metrics)."""
        return sum(info.variable_count for info in self.list_sessions())

    def sweep(self) -> list[str]:
        """Remove every expired session now; return their ids."""
        expired = self._storage.sweep()
        for session_id in expired:
            self.ended(session_id)
            logger.info(
                "session %s expired (idle longer than its ttl)",
                session_id,
                extra={"event": "session_expired", "session_id": session_id},
            )
        return expired

    def start_sweeper(self, interval: float = 60.0) -> None:
        """Sweep expired sessions every ``interval`` seconds in a daemon thread until :meth:`close`."""
        if self._sweeper is not None:
            return

        def run() -> None:
            while not self._stop_sweeper.wait(interval):
                try:
                    self.sweep()
                except DSPexError as exc:
                    logger.warning("session sweep failed: %s", exc)

        self._sweeper = threading.Thread(target=run, name="dspex-session-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Stop the sweeper and end every watch. The store refuses new sessions afterwards."""
        self._stop_sweeper.set()
        with self._lock:
            self._closed = True
            for watchers in self._watchers.values():
                for watch in watchers:
                    watch.close()
            self._watchers.clear()
            self._watcher_count = 0

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
        """Define a variable. Raises :class:`VariableExistsError` for a duplicate name."""
        validate_name(name)
        spec = compile_spec(name, type_, constraints, secret=is_secret(metadata))
        normalised = spec.validate(value)
        meta = normalize_metadata(name, metadata)
        self._check_size(name, type_, normalised)
        self._check_fields(name, description, meta, spec.constraints)
        self._check_open()
        new = NewVariable(
            name, spec.type, normalised, dict(spec.constraints), description or "", meta, 1, 0.0, 0.0, source
        )
        (var,) = self._storage.insert_variables(
            session_id,
            [new],
            now=self._clock(),
            max_variables=self.limits.max_variables_per_session,
            history_limit=self.limits.history_limit,
        )
        return self._view(var)

    def import_variables(
        self, session_id: str, variables: Sequence[Variable], *, atomic: bool = True
    ) -> list[Variable]:
        """Import whole variables (value, version, timestamps, metadata), all or nothing.

        Used to migrate a context's state into a session: every variable is validated first and
        a single failure imports none of them. ``atomic`` is accepted for the signature a remote
        store shares; here every import is one atomic step either way.
        """
        return [self._view(v) for v in self._import(session_id, variables)]

    def import_variable_ids(self, session_id: str, variables: Sequence[Variable]) -> list[str]:
        """:meth:`import_variables`, answering only the new variables' ids, in order (what a bridge's
        ``ImportVariables`` answers: no records are copied out for it)."""
        return [v.id for v in self._import(session_id, variables)]

    def _import(self, session_id: str, variables: Sequence[Variable]) -> list[Variable]:
        """The import both of the above run; the engine's records of what it made."""
        prepared: list[NewVariable] = []
        seen: set[str] = set()
        now = self._clock()
        for var in variables:
            validate_name(var.name)
            if var.name in seen:
                raise VariableExistsError(var.name, session_id)
            seen.add(var.name)
            spec = compile_spec(var.name, var.type, var.constraints, secret=is_secret(var.metadata))
            normalised = spec.validate(var.value)
            self._check_size(var.name, var.type, normalised)
            if isinstance(var.version, bool) or not isinstance(var.version, int) or not 1 <= var.version <= MAX_VERSION:
                raise ValidationError(
                    var.name, "version", var.version, f"a version must be an integer from 1 to {MAX_VERSION}"
                )
            for field_name in ("created_at", "updated_at"):
                when = getattr(var, field_name)
                if not isinstance(when, (int, float)) or not math.isfinite(when) or not MIN_TIME <= when <= MAX_TIME:
                    raise ValidationError(
                        var.name, field_name, when, f"{field_name} must be a time between years 1 and 9999"
                    )
            meta = normalize_metadata(var.name, var.metadata)
            self._check_fields(var.name, var.description, meta, spec.constraints)
            prepared.append(
                NewVariable(
                    var.name,
                    spec.type,
                    normalised,
                    dict(spec.constraints),
                    var.description or "",
                    meta,
                    var.version,
                    var.created_at or now,
                    var.updated_at or now,
                    var.source,
                )
            )
        self._check_open()
        return self._storage.insert_variables(
            session_id,
            prepared,
            now=now,
            max_variables=self.limits.max_variables_per_session,
            history_limit=self.limits.history_limit,
        )

    def get_variable(self, session_id: str, identifier: str) -> Variable:
        """Return a variable by id or name."""
        return self._view(self._lookup(session_id, identifier))

    def get_variables(self, session_id: str, identifiers: Iterable[str]) -> tuple[dict[str, Variable], list[str]]:
        """Return ``(found keyed by identifier as given, missing identifiers)``."""
        idents = list(identifiers)
        self._check_open()
        found = self._storage.read_variables(session_id, idents)
        missing = [i for i in idents if i not in found]
        return {i: self._view(v) for i, v in found.items()}, missing

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
        """Write a variable; return it at its new version.

        ``force`` writes through another optimizer's lease (see :mod:`dspex_dspy.leases`).

        Raises:
            ValidationError: the value breaks the variable's type or constraints.
            VersionConflictError: ``expected_version`` (non-zero) is not the current version.
            VariableLockedError: an optimization lease holds the variable and the write is not forced.
        """
        meta = normalize_metadata(identifier, metadata) if metadata else {}
        force = pop_force(meta) or force
        # The definition known from an earlier read saves a round trip to a remote engine: ids are
        # never reused, so a write to a known id is a write to that very variable, and the engine
        # checks the version and that the id still exists. A stale entry is read afresh once.
        known = self._known.get((session_id, identifier))
        if known is not None:
            try:
                normalised = self._valid(session_id, known, value)
                return self._view(self._write_one(session_id, known, normalised, expected_version, meta, source, force))
            except (ValidationError, VariableNotFoundError, LimitExceededError):
                self._known.pop((session_id, identifier), None)
        var = self._lookup(session_id, identifier)
        normalised = self._valid(session_id, var, value)
        if expected_version and expected_version != var.version:
            raise VersionConflictError(var.name, expected_version, var.version)
        written = self._write_one(session_id, var, normalised, expected_version, meta, source, force)
        self._remember(session_id, identifier, var)
        return self._view(written)

    def _write_one(
        self,
        session_id: str,
        var: Variable,
        value: Any,
        expected_version: int | None,
        meta: dict[str, str],
        source: str,
        force: bool,
    ) -> Variable:
        """One write, admitted by the leases first (the admission and the write are one step)."""
        write = self._engine_write(var, value, expected_version, meta, source, force)
        if write is not None:
            return self._write(session_id, [write], {var.id: var.name})[0]
        with self._lease_lock:
            if all(_lease_clock() >= deadline for _, deadline in self._lease_view.values()):
                self._refresh_lease_view()  # every lease expired: later writes take the fast path
            forced = self._leases.admit(var.id, var.name, meta, force=force)
            if forced:
                meta = {**meta, **forced}
            write = Write(var.id, value, expected_version or None, meta, source, self._clock(), var)
            return self._write(session_id, [write], {var.id: var.name})[0]

    def _engine_write(
        self, var: Variable, value: Any, expected_version: int | None, meta: dict[str, str], source: str, force: bool
    ) -> Write | None:
        """The write of one valid value, ready for the engine; None while leases kept here must admit it first.

        Raises:
            LimitExceededError: the version or the merged metadata would pass its limit.
        """
        if var.version >= MAX_VERSION:
            raise LimitExceededError(f"{var.name}: version", var.version + 1, MAX_VERSION)
        if meta:
            merged = map_bytes({**var.metadata, **meta})
            if merged > self.limits.max_variable_metadata_bytes:
                raise LimitExceededError(f"{var.name}: metadata bytes", merged, self.limits.max_variable_metadata_bytes)
        if self._shared_leases is None and self._lease_view:
            return None
        if self._shared_leases is None:
            return Write(var.id, value, expected_version or None, meta, source, self._clock(), var)
        return Write(
            var.id,
            value,
            expected_version or None,
            meta,
            source,
            self._clock(),
            var,
            lease_check="force" if force else "admit",
            holder=str(meta.get(HOLDER_METADATA_KEY, "")),
        )

    @property
    def nonblocking(self) -> bool:
        """Whether the engine serves :meth:`get_variable_async`, :meth:`get_variables_async` and
        :meth:`set_variable_async` on an event loop without blocking it (memory, and Redis opened
        from a URL)."""
        return self._nonblocking

    async def get_variable_async(self, session_id: str, identifier: str) -> Variable | None:
        """:meth:`get_variable` on the running event loop; needs :attr:`nonblocking`.

        None when the value is too large for the loop: call :meth:`get_variable` in a thread.

        Raises:
            VariableNotFoundError, SessionNotFoundError, ValidationError: as :meth:`get_variable`.
        """
        self._check_identifier(identifier)
        self._check_open()
        found = await self._storage.read_variables_async(session_id, [identifier])  # type: ignore[attr-defined]
        if found is None:
            return None
        var = found.get(identifier)
        if var is None:
            raise VariableNotFoundError(identifier, session_id)
        return self._view(var)

    async def get_variables_async(
        self, session_id: str, identifiers: Iterable[str]
    ) -> tuple[dict[str, Variable], list[str]] | None:
        """:meth:`get_variables` on the running event loop; needs :attr:`nonblocking`.

        None when the values are too large for the loop: call :meth:`get_variables` in a thread.
        """
        idents = list(identifiers)
        self._check_open()
        found = await self._storage.read_variables_async(session_id, idents)  # type: ignore[attr-defined]
        if found is None:
            return None
        missing = [i for i in idents if i not in found]
        return {i: self._view(v) for i, v in found.items()}, missing

    async def set_variable_async(
        self,
        session_id: str,
        identifier: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        source: str = "orchestrator",
    ) -> Variable | None:
        """:meth:`set_variable` on the running event loop, when it can be done without blocking.

        That is when the engine writes without blocking (:attr:`nonblocking`), the
        variable's definition is known from an earlier read or write, and no lease kept in this
        process must admit the write. Otherwise, and whenever the value or the definition must be
        judged afresh, it writes nothing and returns None: call :meth:`set_variable`, which applies
        every rule and raises what it breaks.

        Raises:
            VersionConflictError, VariableLockedError, SessionNotFoundError,
            BridgeUnavailableError: as :meth:`set_variable` (the engine refused the write).
        """
        known = self._known.get((session_id, identifier))
        if known is None or self._closed or not self._nonblocking:
            return None
        apply_async = self._storage.apply_writes_async  # type: ignore[attr-defined]
        try:
            meta = normalize_metadata(identifier, metadata) if metadata else {}
            force = pop_force(meta)
            normalised = self._valid(session_id, known, value)
            write = self._engine_write(known, normalised, expected_version, meta, source, force)
        except (ValidationError, LimitExceededError):
            return None  # judged again on the current definition, by set_variable
        if write is None:
            return None
        try:
            written = await apply_async(session_id, [write], history_limit=self.limits.history_limit)
        except VariableNotFoundError:
            self._known.pop((session_id, identifier), None)
            return None  # a stale definition: nothing was written
        self._log_writes(session_id, written)
        return self._view(written[0])

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
        """Write several variables. ``atomic``: validate all, then apply all or none.

        A variable held by another optimizer's lease is rejected with ``VariableLockedError``
        unless ``force``.
        """
        meta = normalize_metadata("", metadata) if metadata else {}
        force = pop_force(meta) or force
        self._check_open()
        idents = list(updates)
        bad = [i for i in idents if not isinstance(i, str) or not i]
        found = self._storage.read_variables(session_id, [i for i in idents if i not in bad])
        checked: list[tuple[str, Variable, Any]] = []
        errors: dict[str, DSPexError] = {}
        for ident, value in updates.items():
            try:
                var = found.get(ident)
                if var is None:
                    if ident in bad:
                        raise ValidationError(
                            "", "identifier", ident, "a variable identifier must be a non-empty string"
                        )
                    raise VariableNotFoundError(ident, session_id)
                normalised = self._valid(session_id, var, value)
            except DSPexError as exc:
                errors[ident] = exc
                continue
            checked.append((ident, var, normalised))
        if atomic and errors:
            return BatchResult({}, errors)
        if not self._lease_view or self._shared_leases is not None:
            return self._apply_batch(session_id, checked, errors, meta, {}, atomic, source, force)
        with self._lease_lock:
            metas: dict[str, dict[str, str]] = {}
            admitted = []
            for ident, var, normalised in checked:
                try:
                    forced = self._leases.admit(var.id, var.name, meta, force=force)
                except DSPexError as exc:
                    errors[ident] = exc
                    continue
                if forced:
                    metas[ident] = {**meta, **forced}
                admitted.append((ident, var, normalised))
            if atomic and errors:
                return BatchResult({}, errors)
            return self._apply_batch(session_id, admitted, errors, meta, metas, atomic, source, force)

    def _apply_batch(
        self,
        session_id: str,
        checked: list[tuple[str, Variable, Any]],
        errors: dict[str, DSPexError],
        meta: dict[str, str],
        metas: Mapping[str, dict[str, str]],
        atomic: bool,
        source: str,
        force: bool = False,
    ) -> BatchResult:
        now = self._clock()
        names = {var.id: var.name for _, var, _ in checked}
        check: LeaseCheck = ("force" if force else "admit") if self._shared_leases is not None else ""
        if atomic:
            # Watchers learn which updates are one batch, so a worker's cache applies them together.
            announce = {BATCH_METADATA_KEY: f"{uuid.uuid4().hex[:16]}/{len(checked)}"} if len(checked) > 1 else {}
            writes = [
                _lease_checked(
                    Write(var.id, value, None, metas.get(ident, meta), source, now, var, announce), meta, check
                )
                for ident, var, value in checked
            ]
            try:
                written = self._write(session_id, writes, names) if writes else []
            except (SessionNotFoundError, BridgeUnavailableError):
                raise
            except VariableLockedError as exc:  # an engine's lease check: the variables it refused
                refused = {locked.name: locked for locked in (exc, *exc.others)}
                return BatchResult({}, {ident: refused[var.name] for ident, var, _ in checked if var.name in refused})
            except DSPexError as exc:  # e.g. the batch as a whole passes a byte limit: nothing applied
                return BatchResult({}, {ident: exc for ident, _, _ in checked})
            return BatchResult({ident: w.version for (ident, _, _), w in zip(checked, written, strict=True)}, errors)
        versions: dict[str, int] = {}
        for ident, var, value in checked:
            write = _lease_checked(Write(var.id, value, None, metas.get(ident, meta), source, now, var), meta, check)
            try:
                (w,) = self._write(session_id, [write], names)
            except (SessionNotFoundError, BridgeUnavailableError):
                raise
            except DSPexError as exc:
                errors[ident] = exc
                continue
            versions[ident] = w.version
        return BatchResult(versions, errors)

    def list_variables(self, session_id: str, pattern: str | None = None) -> list[Variable]:
        """Variables in creation order; ``pattern`` is a ``*`` glob matched against the whole name."""
        self._check_open()
        records = self._storage.list_variables(session_id)
        if pattern and pattern != "*":
            matcher = compile_glob(pattern)
            records = [r for r in records if matcher.match(r.name) is not None]
        return [self._view(r) for r in records]

    def delete_variable(self, session_id: str, identifier: str, *, source: str = "orchestrator") -> None:
        """Delete a variable; watchers receive a ``deleted`` update."""
        var = self._lookup(session_id, identifier)
        if self._lease_view and self._shared_leases is None:
            with self._lease_lock:
                self._leases.refuse_if_held(var.id, var.name, "deleting it")
                self._leases.forget([var.id])
                self._refresh_lease_view()
        try:
            self._storage.delete_variable(
                session_id, var.id, source=source, timestamp=self._clock(), history_limit=self.limits.history_limit
            )
        except VariableNotFoundError:
            raise VariableNotFoundError(identifier, session_id) from None

    def get_history(self, session_id: str, identifier: str, limit: int = 0) -> list[HistoryEntry]:
        """The variable's remembered writes, newest first; ``limit`` > 0 keeps that many."""
        var = self._lookup(session_id, identifier)
        entries = list(reversed(self._storage.history(session_id, var.id, limit=self.limits.history_limit)))
        return entries[:limit] if limit > 0 else entries

    def rollback_variable(
        self, session_id: str, identifier: str, target_version: int, *, source: str = "orchestrator"
    ) -> Variable:
        """Write the value the variable had at ``target_version`` as a new version (a compare-and-swap)."""
        for _ in range(_ROLLBACK_ATTEMPTS):
            var = self._lookup(session_id, identifier)
            if self._lease_view and self._shared_leases is None:
                with self._lease_lock:
                    self._leases.refuse_if_held(var.id, var.name, "rolling it back")
            history = self._storage.history(session_id, var.id, limit=self.limits.history_limit)
            entry = next((e for e in history if e.version == target_version), None)
            if entry is None:
                known = ", ".join(str(e.version) for e in history)
                raise ValidationError(
                    var.name,
                    "target_version",
                    target_version,
                    f"version {target_version} is not in the remembered history (versions {known})",
                )
            value = self._spec(session_id, var).validate(entry.value)
            write = Write(
                var.id, value, var.version, {"rolled_back_to": str(target_version)}, source, self._clock(), var
            )
            if self._shared_leases is not None:
                write = replace(write, lease_check="refuse")
            try:
                (written,) = self._write(session_id, [write], {var.id: var.name})
            except VersionConflictError:
                continue  # written meanwhile: read again and roll back over the newer state
            return self._view(written)
        raise VersionConflictError(identifier, 0, 0)

    # ------------------------------------------------------------------ optimization leases

    def start_optimization(
        self,
        session_id: str,
        identifiers: Sequence[str],
        optimizer_id: str,
        *,
        ttl: float,
    ) -> OptimizationLease:
        """Take (or renew) ``optimizer_id``'s lease on some variables; see :mod:`dspex_dspy.leases`.

        On an engine shared by several nodes (Redis) the engine holds the leases, so every node
        enforces them; otherwise this store does.

        Raises:
            VariableNotFoundError: a variable does not exist.
            VariableLockedError: another optimizer holds one of them (nothing changes).
            ValidationError: a bad optimizer id, ttl or variable list.
        """
        ttl = validate_lease_request(optimizer_id, ttl, identifiers)
        records = [self._lookup(session_id, ident) for ident in identifiers]
        if self._shared_leases is not None:
            lease: OptimizationLease = self._shared_leases.start_lease(
                session_id, {r.id: r.name for r in records}, optimizer_id, ttl
            )
            return lease
        with self._lease_lock:
            lease = self._leases.start(session_id, {r.id: r.name for r in records}, optimizer_id, ttl)
            self._refresh_lease_view()
            return lease

    def stop_optimization(self, session_id: str, identifier: str, *, force: bool = False) -> None:
        """End a lease, named by its id (the holder) or by a variable it holds (``force`` needed).

        Stopping a lease that already ended (stopped or expired) does nothing.

        Raises:
            VariableLockedError: a variable is named without ``force`` while a lease holds it.
            VariableNotFoundError: neither a lease id nor a variable of the session.
        """
        if isinstance(identifier, str) and identifier.startswith(LEASE_ID_PREFIX):
            if self._shared_leases is not None:
                self._shared_leases.stop_lease(session_id, identifier)
                return
            if self._storage.get_session(session_id) is None:
                raise SessionNotFoundError(session_id)
            with self._lease_lock:
                lease = self._leases.lease_by_id(identifier, session_id)
                if lease is not None:
                    self._leases.stop(lease)
                self._refresh_lease_view()
            return
        record = self._lookup(session_id, identifier)
        if self._shared_leases is not None:
            self._shared_leases.stop_variable_lease(session_id, record.id, record.name, force=force)
            return
        with self._lease_lock:
            self._leases.stop_variable(record.id, record.name, force=force)
            self._refresh_lease_view()

    def _refresh_lease_view(self) -> None:
        """Rebuild the lock-free copy of the leases (lease lock held)."""
        self._lease_view = self._leases.held()

    def _status(self, variable_id: str) -> OptimizationStatus | None:
        entry = self._lease_view.get(variable_id)
        if entry is None or _lease_clock() >= entry[1]:
            return None
        return entry[0]

    def _view(self, var: Variable) -> Variable:
        """What callers get: a detached copy with the lease status of the moment."""
        if self._shared_leases is not None:
            return _detached(var, var.optimization_status)  # the engine read it with the variable
        return _detached(var, self._status(var.id) if self._lease_view else None)

    # ------------------------------------------------------------------ watching

    def watch(
        self, session_id: str, identifiers: Iterable[str] | None = None, *, include_initial: bool = True
    ) -> Watch:
        """Register a watcher for some variables (None or empty = every variable, now and later).

        The watcher is registered (and, on a shared engine, the session's change log followed from
        its current position) before the initial snapshot is read, so it misses no write; a write
        seen both ways is delivered once (a watch drops versions it already took in). Close it with
        :meth:`unwatch` (or ``watch.close()``).
        """
        idents = list(identifiers or [])
        self._check_open()
        if idents:
            found = self._storage.read_variables(session_id, idents)
            for ident in idents:
                if not isinstance(ident, str) or not ident:
                    raise ValidationError("", "identifier", ident, "a variable identifier must be a non-empty string")
                if ident not in found:
                    raise VariableNotFoundError(ident, session_id)
            ids: frozenset[str] | None = frozenset(v.id for v in found.values())
        else:
            ids = None
        position = self._storage.position(session_id) if self._storage.shared else 0
        with self._lock:
            self._check_open()
            if self._watcher_count >= self.limits.max_watchers:
                self._prune_watchers()
                if self._watcher_count >= self.limits.max_watchers:
                    raise LimitExceededError("watchers", self._watcher_count + 1, self.limits.max_watchers)
            watch = Watch(session_id, ids)
            self._watchers.setdefault(session_id, []).append(watch)
            self._watcher_count += 1
            if self._storage.shared and session_id not in self._followers:
                follower = threading.Thread(
                    target=self._follow,
                    args=(session_id, position),
                    name=f"dspex-follow-{session_id[:24]}",
                    daemon=True,
                )
                self._followers[session_id] = follower
                follower.start()
        try:
            if include_initial:
                if idents:
                    snapshot = list(self._storage.read_variables(session_id, idents).values())
                else:
                    snapshot = self._storage.list_variables(session_id)
                now = self._clock()
                for var in snapshot:
                    if watch.wants(var.id):
                        watch.offer(VariableUpdate(var.id, var, UpdateType.INITIAL_VALUE, var.source, {}, now))
            elif not self._storage.touch_session(session_id):
                raise SessionNotFoundError(session_id)
        except BaseException:
            self.unwatch(watch)
            raise
        return watch

    def unwatch(self, watch: Watch) -> None:
        """Close a watcher and forget it."""
        watch.close()
        with self._lock:
            watchers = self._watchers.get(watch.session_id)
            if watchers and watch in watchers:
                watchers.remove(watch)
                self._watcher_count -= 1
                if not watchers:
                    del self._watchers[watch.session_id]

    @property
    def watcher_count(self) -> int:
        """Watchers registered now."""
        with self._lock:
            self._prune_watchers()
            return self._watcher_count

    def session_watchers(self, session_id: str) -> int:
        """Open watchers of one session on this node (a shared engine's other nodes hold their own)."""
        with self._lock:
            self._prune_watchers()
            return len(self._watchers.get(session_id, ()))

    # ------------------------------------------------------------------ storage listener

    def changed(self, session_id: str, updates: Sequence[VariableUpdate]) -> None:
        """Fan changes out to the session's watchers (called by the engine, in the order applied)."""
        watchers = self._watchers.get(session_id)
        if not watchers:
            return
        if self._lease_view and self._shared_leases is None:
            updates = [
                replace(u, variable=replace(u.variable, optimization_status=self._status(u.variable_id)))
                if u.variable is not None
                else u
                for u in updates
            ]
        for watch in list(watchers):
            # Offered together: a watcher takes the updates of one atomic batch whole or not at all.
            watch.offer_all([update for update in updates if watch.wants(update.variable_id)])

    def ended(self, session_id: str) -> None:
        """Close the watchers of a session that ended."""
        with self._lock:
            watchers = self._watchers.pop(session_id, [])
            self._watcher_count -= len(watchers)
        for watch in watchers:
            watch.close()

    def _follow(self, session_id: str, position: int) -> None:
        """Follow a session's change log for this node's watchers (shared engines), until none is left."""
        try:
            first = self._storage.get_session(session_id, touch=False)
        except DSPexError:
            first = None  # the engine is unreachable (or closing): the loop below retries or ends
        incarnation = first.created_at if first is not None else None
        while True:
            with self._lock:
                alive = [w for w in self._watchers.get(session_id, []) if not w.closed]
                if self._closed or not alive:
                    self._followers.pop(session_id, None)
                    return
            try:
                batch = self._storage.read_changes(session_id, position, _FOLLOW_WAIT_S)
                if batch.resync:
                    now = self._clock()
                    listing = self._storage.list_variables(session_id)
                    updates: Sequence[VariableUpdate] = [
                        VariableUpdate(v.id, v, UpdateType.VALUE_CHANGE, v.source, {}, now) for v in listing
                    ]
                else:
                    updates = batch.updates
                    if not updates:
                        info = self._storage.get_session(session_id, touch=False)
                        if info is not None and incarnation is None:
                            incarnation = info.created_at
                        if info is None or info.created_at != incarnation:
                            raise SessionNotFoundError(session_id)  # gone, or deleted and made anew
                position = batch.position
                self.changed(session_id, updates)
            except SessionNotFoundError:
                self.ended(session_id)
            except DSPexError as exc:
                if self._closed:
                    return
                # The engine is unreachable: keep the position and resume from it when it is back.
                logger.warning("following the changes of session %s failed (retrying): %s", session_id, exc)
                self._stop_sweeper.wait(_FOLLOW_WAIT_S)
            except Exception:
                if self._closed:
                    return
                logger.exception("following the changes of session %s failed unexpectedly (retrying)", session_id)
                self._stop_sweeper.wait(_FOLLOW_WAIT_S)

    # ------------------------------------------------------------------ recent module calls

    def report_calls(self, session_id: str, calls: Sequence[Mapping[str, Any]]) -> int:
        """Keep call records a worker reports (their provenance); the session keeps the newest 50.

        Refreshes the session's TTL, like any write. See :mod:`dspex_dspy.store.calls`.

        Raises:
            ValidationError: a bad report (nothing is kept).
            SessionNotFoundError: the session does not exist.
        """
        encoded = encode_calls(calls)
        self._check_open()
        return self._storage.report_calls(session_id, encoded, keep=MAX_CALLS_KEPT)

    def recent_calls(self, session_id: str, limit: int = MAX_CALLS_KEPT) -> list[dict[str, Any]]:
        """The session's newest call records, newest first: at most ``limit`` (a positive integer).

        Raises:
            ValidationError: a bad ``limit``.
            SessionNotFoundError: the session does not exist.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError("", "limit", limit, f"limit must be a positive integer, got {limit!r}")
        self._check_open()
        return decode_calls(self._storage.recent_calls(session_id, min(limit, MAX_CALLS_KEPT)))

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise BridgeUnavailableError("the session store is closed")

    @staticmethod
    def _check_identifier(identifier: str) -> None:
        if not isinstance(identifier, str) or not identifier:
            raise ValidationError("", "identifier", identifier, "a variable identifier must be a non-empty string")

    def _lookup(self, session_id: str, identifier: str) -> Variable:
        self._check_identifier(identifier)
        self._check_open()
        var = self._storage.read_variables(session_id, [identifier]).get(identifier)
        if var is None:
            raise VariableNotFoundError(identifier, session_id)
        return var

    def _spec(self, session_id: str, var: Variable) -> VariableSpec:
        """The compiled spec of a variable (cached per incarnation: a spec never changes)."""
        key = (session_id, var.id, var.created_at)
        spec = self._specs.get(key)
        if spec is None or spec.name != var.name:
            spec = compile_spec(var.name, var.type, var.constraints, secret=is_secret(var.metadata))
            if len(self._specs) >= 100_000:
                self._specs.clear()
            self._specs[key] = spec
        return spec

    def _remember(self, session_id: str, identifier: str, var: Variable) -> None:
        if len(self._known) >= 100_000:
            self._known.clear()
        self._known[(session_id, identifier)] = var

    def _write(self, session_id: str, writes: Sequence[Write], names: Mapping[str, str]) -> list[Variable]:
        """Apply writes; a variable gone meanwhile is reported under its name."""
        self._check_open()
        try:
            written = self._storage.apply_writes(session_id, writes, history_limit=self.limits.history_limit)
        except VariableNotFoundError as exc:
            raise VariableNotFoundError(names.get(exc.identifier, exc.identifier), session_id) from None
        self._log_writes(session_id, written)
        return written

    @staticmethod
    def _log_writes(session_id: str, written: Sequence[Variable]) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            for var in written:
                logger.debug(
                    "write %s/%s v%d by %s",
                    session_id,
                    var.name,
                    var.version,
                    var.source,
                    extra={
                        "event": "variable_write",
                        "session_id": session_id,
                        "variable": var.name,
                        "version": var.version,
                        "source": var.source,
                    },
                )

    def _prune_watchers(self) -> None:
        for session_id, watchers in list(self._watchers.items()):
            alive = [w for w in watchers if not w.closed]
            self._watcher_count -= len(watchers) - len(alive)
            if alive:
                self._watchers[session_id] = alive
            else:
                del self._watchers[session_id]

    def _check_fields(
        self, name: str, description: str, metadata: Mapping[str, str], constraints: Mapping[str, Any]
    ) -> None:
        """Refuse a description, metadata or constraints larger than their limits."""
        limits = self.limits
        for what, size, maximum in (
            ("description bytes", text_bytes(description or ""), limits.max_description_bytes),
            ("metadata bytes", map_bytes(metadata), limits.max_variable_metadata_bytes),
            ("constraints bytes", constraints_bytes(constraints), limits.max_constraints_bytes),
        ):
            if size > maximum:
                raise LimitExceededError(f"{name}: {what}", size, maximum)

    def _valid(self, session_id: str, var: Variable, value: Any) -> Any:
        """``value`` normalised by the variable's spec, within the value size limit (raises otherwise)."""
        normalised = self._spec(session_id, var).validate(value)
        self._check_size(var.name, var.type, normalised)
        return normalised

    def _check_size(self, name: str, type_: str, value: Any) -> None:
        check_value_size(self.limits, name, type_, value)
