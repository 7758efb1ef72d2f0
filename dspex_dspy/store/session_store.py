"""The SessionStore: sessions with a sliding TTL, and their typed, versioned, watchable variables.

This is the shared state behind a bridge. It knows nothing of gRPC or DSPy: the server maps RPCs
onto it, and an orchestrator whose bridge is embedded calls it directly, in process. Every method
is thread-safe; every rejected operation raises and changes nothing.

Rules kept here, for every caller:

- variable ids are ``var_<name>_<n>`` (``n`` unique and increasing); an identifier is looked up
  as an id first, then as a name;
- versions start at 1 and grow by 1 per accepted write (a rollback is a write); a non-zero
  ``expected_version`` makes a write a compare-and-swap;
- a write merges metadata and records who wrote (``source``) and when;
- each variable keeps a bounded history of its writes;
- an optimization lease (:mod:`dspex_dspy.leases`) refuses other writers, unless forced, until
  its optimizer stops it or it expires;
- a session expires when it has not been used for its TTL; a sweep removes expired sessions;
- watchers are registered before their initial snapshot is taken, under the same lock as writes,
  so no write can fall between the snapshot and the stream.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex_dspy.errors import (
    BridgeUnavailableError,
    DSPexError,
    LimitExceededError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.leases import LEASE_ID_PREFIX, LeaseTable, OptimizationLease, pop_force, validate_lease_request
from dspex_dspy.limits import StoreLimits, check_count, check_value_size, value_size
from dspex_dspy.store.glob import compile_glob
from dspex_dspy.store.storage import HistoryEntry, MemoryStorage, SessionRecord, Storage, VariableRecord
from dspex_dspy.store.watch import UpdateType, VariableUpdate, Watch
from dspex_dspy.types import Variable, compile_spec, is_secret, normalize_metadata, validate_name

__all__ = ["BatchResult", "SessionInfo", "SessionStore", "StoreLimits"]

logger = logging.getLogger(__name__)

DEFAULT_TTL = 3600.0
MAX_SESSION_ID_LENGTH = 256
MAX_VERSION = 2**31 - 1
"""The highest version a variable can reach: versions travel as ``int32`` on the wire."""
MIN_TIME = -62_135_596_800.0
MAX_TIME = 253_402_300_799.0
"""Timestamps a store keeps lie in years 1..9999 (what ``google.protobuf.Timestamp`` can carry)."""


@dataclass(frozen=True)
class _WritePlan:
    """What one write costs: bytes added overall, to the fixed part, and history entries dropped."""

    delta: int
    fixed_delta: int
    drop: int
    history_bytes: int


@dataclass(frozen=True)
class SessionInfo:
    """What :meth:`SessionStore.get_session` reports about a session."""

    id: str
    metadata: Mapping[str, str]
    created_at: float
    ttl: float
    variable_count: int
    expires_in: float


@dataclass(frozen=True)
class BatchResult:
    """The outcome of :meth:`SessionStore.set_variables`.

    Attributes:
        new_versions: identifier -> new version, for each write applied.
        errors: identifier -> the error that rejected it. With ``atomic=True`` any error means
            nothing was applied and ``new_versions`` is empty.
    """

    new_versions: dict[str, int] = field(default_factory=dict)
    errors: dict[str, DSPexError] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """True when every write was applied."""
        return not self.errors


def _text_bytes(text: str) -> int:
    """UTF-8 size of ``text`` (its length when that is all ASCII, which is the common case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _map_bytes(mapping: Mapping[str, str]) -> int:
    return sum(_text_bytes(k) + _text_bytes(v) for k, v in mapping.items())


def _constraints_bytes(constraints: Mapping[str, Any]) -> int:
    if not constraints:
        return 0
    return _text_bytes(json.dumps(dict(constraints), default=str, separators=(",", ":")))


class SessionStore:
    """Sessions and their variables, shared by the orchestrator, the bridge server and workers.

    Args:
        default_ttl: seconds a session lives without being used (sliding).
        limits: the limits to enforce.
        storage: where records live (:class:`MemoryStorage` by default).
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
        self._storage: Storage = storage if storage is not None else MemoryStorage()
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._watchers: dict[str, list[Watch]] = {}
        self._watcher_count = 0
        self._bytes_total = 0
        self._closed = False
        self._sweeper: threading.Thread | None = None
        self._stop_sweeper = threading.Event()
        self._leases = LeaseTable()

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
        meta_bytes = _map_bytes(meta)
        if meta_bytes > self.limits.max_session_metadata_bytes:
            raise LimitExceededError("session metadata bytes", meta_bytes, self.limits.max_session_metadata_bytes)
        if ttl is not None and ttl <= 0:
            raise ValidationError("", "ttl", ttl, f"ttl must be positive, got {ttl}")
        with self._lock:
            self._check_open()
            existing = self._storage.get_session(session_id)
            if existing is not None and not self._expired(existing):
                raise SessionExistsError(session_id)
            if existing is not None:
                self._drop_session(existing)
            if self._storage.session_count() >= self.limits.max_sessions:
                raise LimitExceededError("sessions", self._storage.session_count() + 1, self.limits.max_sessions)
            now = self._clock()
            record = SessionRecord(
                id=session_id,
                metadata=meta,
                created_at=now,
                ttl=float(ttl) if ttl is not None else self.default_ttl,
                last_access=time.monotonic(),
            )
            self._charge(record, _text_bytes(session_id) + meta_bytes)
            record.bytes_used = _text_bytes(session_id) + meta_bytes
            self._bytes_total += record.bytes_used
            self._storage.put_session(record)
            return self._info(record)

    def get_session(self, session_id: str) -> SessionInfo:
        """Describe a session (and refresh its TTL)."""
        with self._lock:
            return self._info(self._session(session_id))

    def has_session(self, session_id: str) -> bool:
        """Whether the session exists and has not expired (does not refresh its TTL)."""
        with self._lock:
            record = self._storage.get_session(session_id)
            return record is not None and not self._expired(record)

    def heartbeat(self, session_id: str) -> bool:
        """Refresh a session's TTL; return False if it does not exist (or expired)."""
        with self._lock:
            try:
                self._session(session_id)
            except SessionNotFoundError:
                return False
            return True

    def cleanup_session(self, session_id: str) -> int:
        """Remove a session, close its watchers, and return how many variables it held."""
        with self._lock:
            record = self._storage.get_session(session_id)
            if record is None:
                raise SessionNotFoundError(session_id)
            return self._drop_session(record)

    def session_ids(self) -> list[str]:
        """The ids of the live sessions."""
        with self._lock:
            return [s.id for s in self._storage.sessions() if not self._expired(s)]

    def sweep(self) -> list[str]:
        """Remove every expired session now; return their ids."""
        with self._lock:
            expired = [s for s in self._storage.sessions() if self._expired(s)]
            for record in expired:
                self._drop_session(record)
        if expired:
            logger.info("expired %d session(s): %s", len(expired), ", ".join(s.id for s in expired))
        return [s.id for s in expired]

    def start_sweeper(self, interval: float = 60.0) -> None:
        """Sweep expired sessions every ``interval`` seconds in a daemon thread until :meth:`close`."""
        if self._sweeper is not None:
            return

        def run() -> None:
            while not self._stop_sweeper.wait(interval):
                self.sweep()

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
        with self._lock:
            session = self._session(session_id)
            if name in session.names:
                raise VariableExistsError(name, session_id)
            self._check_count(session, 1)
            now = self._creation_time(session)
            record = self._new_record(spec, normalised, description, meta, 1, now, now, source)
            self._charge(session, record.fixed_bytes + record.history_bytes)
            self._insert(session, record)
            snapshot = self._snapshot(record)
            self._notify(session_id, record.id, snapshot, UpdateType.VALUE_CHANGE, source, meta, now)
            return snapshot

    def import_variables(self, session_id: str, variables: Sequence[Variable]) -> list[Variable]:
        """Import whole variables (value, version, timestamps, metadata), all or nothing.

        Used to migrate a context's state into a session: every variable is validated first and
        a single failure imports none of them.
        """
        prepared: list[tuple[Any, Any, Variable, dict[str, str]]] = []
        seen: set[str] = set()
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
            prepared.append((spec, normalised, var, meta))
        with self._lock:
            session = self._session(session_id)
            for _, _, var, _ in prepared:
                if var.name in session.names:
                    raise VariableExistsError(var.name, session_id)
            self._check_count(session, len(prepared))
            now = self._clock()
            adding = sum(
                self._fixed_bytes(var.name, var.description, meta, spec.constraints)
                + value_size(spec.type, normalised)
                + _map_bytes(meta)
                for spec, normalised, var, meta in prepared
            )
            self._charge(session, adding)
            out = []
            for spec, normalised, var, meta in prepared:
                record = self._new_record(
                    spec,
                    normalised,
                    var.description,
                    meta,
                    var.version,
                    var.created_at or now,
                    var.updated_at or now,
                    var.source,
                )
                last = next(reversed(session.variables.values()), None)
                if last is not None and last.created_at > record.created_at:
                    session.unordered = True
                self._insert(session, record)
                snapshot = self._snapshot(record)
                self._notify(session_id, record.id, snapshot, UpdateType.VALUE_CHANGE, var.source, meta, now)
                out.append(snapshot)
            return out

    def get_variable(self, session_id: str, identifier: str) -> Variable:
        """Return a variable by id or name."""
        with self._lock:
            session = self._session(session_id)
            return self._snapshot(self._lookup(session, identifier))

    def get_variables(self, session_id: str, identifiers: Iterable[str]) -> tuple[dict[str, Variable], list[str]]:
        """Return ``(found keyed by identifier as given, missing identifiers)``."""
        found: dict[str, Variable] = {}
        missing: list[str] = []
        with self._lock:
            session = self._session(session_id)
            for ident in identifiers:
                record = self._find(session, ident)
                if record is None:
                    missing.append(ident)
                else:
                    found[ident] = self._snapshot(record)
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
        """Write a variable; return it at its new version.

        ``force`` writes through another optimizer's lease (see :mod:`dspex_dspy.leases`).

        Raises:
            ValidationError: the value breaks the variable's type or constraints.
            VersionConflictError: ``expected_version`` (non-zero) is not the current version.
            VariableLockedError: an optimization lease holds the variable and the write is not forced.
        """
        meta = normalize_metadata(identifier, metadata) if metadata else None
        force = pop_force(meta) or force
        with self._lock:
            session = self._session(session_id)
            record = self._lookup(session, identifier)
            normalised = record.spec.validate(value)
            self._check_size(record.name, record.spec.type, normalised)
            if expected_version and expected_version != record.version:
                raise VersionConflictError(record.name, expected_version, record.version)
            if self._leases:
                forced = self._leases.admit(record.id, record.name, meta, force=force)
                if forced:
                    meta = {**(meta or {}), **forced}
            return self._apply(session, record, normalised, meta, source)

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
        meta = normalize_metadata("", metadata) if metadata else None
        force = pop_force(meta) or force
        forced_meta: dict[str, dict[str, str]] = {}
        with self._lock:
            session = self._session(session_id)
            checked: list[tuple[str, VariableRecord, Any]] = []
            errors: dict[str, DSPexError] = {}
            for ident, value in updates.items():
                try:
                    record = self._lookup(session, ident)
                    normalised = record.spec.validate(value)
                    self._check_size(record.name, record.spec.type, normalised)
                    if self._leases:
                        forced = self._leases.admit(record.id, record.name, meta, force=force)
                        if forced:
                            forced_meta[ident] = {**(meta or {}), **forced}
                except DSPexError as exc:
                    errors[ident] = exc
                    continue
                checked.append((ident, record, normalised))
            if atomic and errors:
                return BatchResult({}, errors)
            versions: dict[str, int] = {}
            if atomic:
                try:
                    self._charge(
                        session,
                        sum(self._plan(r, v, forced_meta.get(ident, meta)).delta for ident, r, v in checked),
                    )
                except DSPexError as exc:
                    return BatchResult({}, {ident: exc for ident, _, _ in checked})
                for ident, record, normalised in checked:
                    written = self._apply(
                        session, record, normalised, forced_meta.get(ident, meta), source, charge=False
                    )
                    versions[ident] = written.version
                return BatchResult(versions, errors)
            for ident, record, normalised in checked:
                try:
                    versions[ident] = self._apply(
                        session, record, normalised, forced_meta.get(ident, meta), source
                    ).version
                except DSPexError as exc:
                    errors[ident] = exc
            return BatchResult(versions, errors)

    def list_variables(self, session_id: str, pattern: str | None = None) -> list[Variable]:
        """Variables in creation order; ``pattern`` is a ``*`` glob matched against the whole name."""
        with self._lock:
            session = self._session(session_id)
            if session.unordered:
                # Imports sent concurrently (a pipelined migration) may arrive out of order.
                session.variables = dict(sorted(session.variables.items(), key=lambda item: item[1].created_at))
                session.unordered = False
            records = list(session.variables.values())
        if pattern and pattern != "*":
            matcher = compile_glob(pattern)
            records = [r for r in records if matcher.match(r.name) is not None]
        return [self._snapshot(r) for r in records]

    def delete_variable(self, session_id: str, identifier: str, *, source: str = "orchestrator") -> None:
        """Delete a variable; watchers receive a ``deleted`` update."""
        with self._lock:
            session = self._session(session_id)
            record = self._lookup(session, identifier)
            if self._leases:
                self._leases.refuse_if_held(record.id, record.name, "deleting it")
                self._leases.forget([record.id])
            del session.variables[record.id]
            del session.names[record.name]
            freed = record.fixed_bytes + record.history_bytes
            session.bytes_used -= freed
            self._bytes_total -= freed
            self._notify(session_id, record.id, self._snapshot(record), UpdateType.DELETED, source, {}, self._clock())

    def get_history(self, session_id: str, identifier: str, limit: int = 0) -> list[HistoryEntry]:
        """The variable's remembered writes, newest first; ``limit`` > 0 keeps that many."""
        with self._lock:
            record = self._lookup(self._session(session_id), identifier)
            entries = list(reversed(record.history))
        return entries[:limit] if limit > 0 else entries

    def rollback_variable(
        self, session_id: str, identifier: str, target_version: int, *, source: str = "orchestrator"
    ) -> Variable:
        """Write the value the variable had at ``target_version`` as a new version."""
        with self._lock:
            session = self._session(session_id)
            record = self._lookup(session, identifier)
            if self._leases:
                self._leases.refuse_if_held(record.id, record.name, "rolling it back")
            entry = next((e for e in record.history if e.version == target_version), None)
            if entry is None:
                known = ", ".join(str(e.version) for e in record.history)
                raise ValidationError(
                    record.name,
                    "target_version",
                    target_version,
                    f"version {target_version} is not in the remembered history (versions {known})",
                )
            value = record.spec.validate(entry.value)
            meta = {"rolled_back_to": str(target_version)}
            return self._apply(session, record, value, meta, source)

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

        Raises:
            VariableNotFoundError: a variable does not exist.
            VariableLockedError: another optimizer holds one of them (nothing changes).
            ValidationError: a bad optimizer id, ttl or variable list.
        """
        ttl = validate_lease_request(optimizer_id, ttl, identifiers)
        with self._lock:
            session = self._session(session_id)
            records = [self._lookup(session, ident) for ident in identifiers]
            return self._leases.start(session_id, {r.id: r.name for r in records}, optimizer_id, ttl)

    def stop_optimization(self, session_id: str, identifier: str, *, force: bool = False) -> None:
        """End a lease, named by its id (the holder) or by a variable it holds (``force`` needed).

        Stopping a lease that already ended (stopped or expired) does nothing.

        Raises:
            VariableLockedError: a variable is named without ``force`` while a lease holds it.
            VariableNotFoundError: neither a lease id nor a variable of the session.
        """
        with self._lock:
            session = self._session(session_id)
            if isinstance(identifier, str) and identifier.startswith(LEASE_ID_PREFIX):
                lease = self._leases.lease_by_id(identifier, session_id)
                if lease is not None:
                    self._leases.stop(lease)
                return
            record = self._lookup(session, identifier)
            self._leases.stop_variable(record.id, record.name, force=force)

    # ------------------------------------------------------------------ watching

    def watch(
        self, session_id: str, identifiers: Iterable[str] | None = None, *, include_initial: bool = True
    ) -> Watch:
        """Register a watcher for some variables (None or empty = every variable, now and later).

        The watcher is registered before the initial snapshot is queued, under the write lock, so
        it misses no write. Close it with :meth:`unwatch` (or ``watch.close()``).
        """
        idents = list(identifiers or [])
        with self._lock:
            session = self._session(session_id)
            if self._watcher_count >= self.limits.max_watchers:
                self._prune_watchers()
                if self._watcher_count >= self.limits.max_watchers:
                    raise LimitExceededError("watchers", self._watcher_count + 1, self.limits.max_watchers)
            records = [self._lookup(session, i) for i in idents] if idents else None
            ids = frozenset(r.id for r in records) if records is not None else None
            watch = Watch(session_id, ids)
            self._watchers.setdefault(session_id, []).append(watch)
            self._watcher_count += 1
            if include_initial:
                now = self._clock()
                for record in records if records is not None else list(session.variables.values()):
                    watch.offer(
                        VariableUpdate(
                            record.id, self._snapshot(record), UpdateType.INITIAL_VALUE, record.source, {}, now
                        )
                    )
            return watch

    def unwatch(self, watch: Watch) -> None:
        """Close a watcher and forget it."""
        watch.close()
        with self._lock:
            watchers = self._watchers.get(watch.session_id)
            if watchers and watch in watchers:
                watchers.remove(watch)
                self._watcher_count -= 1

    @property
    def watcher_count(self) -> int:
        """Watchers registered now."""
        with self._lock:
            self._prune_watchers()
            return self._watcher_count

    # ------------------------------------------------------------------ internals (lock held)

    def _check_open(self) -> None:
        if self._closed:
            raise BridgeUnavailableError("the session store is closed")

    def _expired(self, record: SessionRecord) -> bool:
        return time.monotonic() - record.last_access > record.ttl

    def _session(self, session_id: str) -> SessionRecord:
        if self._closed:
            raise BridgeUnavailableError("the session store is closed")
        record = self._storage.get_session(session_id)
        if record is None:
            raise SessionNotFoundError(session_id)
        now = time.monotonic()
        if now - record.last_access > record.ttl:
            self._drop_session(record)
            raise SessionNotFoundError(session_id)
        record.last_access = now
        return record

    def _drop_session(self, record: SessionRecord) -> int:
        self._storage.delete_session(record.id)
        self._bytes_total -= record.bytes_used
        if self._leases:
            self._leases.forget(list(record.variables))
        for watch in self._watchers.pop(record.id, []):
            watch.close()
            self._watcher_count -= 1
        return len(record.variables)

    def _prune_watchers(self) -> None:
        for session_id, watchers in list(self._watchers.items()):
            alive = [w for w in watchers if not w.closed]
            self._watcher_count -= len(watchers) - len(alive)
            if alive:
                self._watchers[session_id] = alive
            else:
                del self._watchers[session_id]

    def _info(self, record: SessionRecord) -> SessionInfo:
        remaining = record.ttl - (time.monotonic() - record.last_access)
        return SessionInfo(
            record.id, dict(record.metadata), record.created_at, record.ttl, len(record.variables), remaining
        )

    @staticmethod
    def _find(session: SessionRecord, identifier: str) -> VariableRecord | None:
        record = session.variables.get(identifier)
        if record is None:
            var_id = session.names.get(identifier)
            record = session.variables.get(var_id) if var_id is not None else None
        return record

    def _lookup(self, session: SessionRecord, identifier: str) -> VariableRecord:
        if not isinstance(identifier, str) or not identifier:
            raise ValidationError("", "identifier", identifier, "a variable identifier must be a non-empty string")
        record = self._find(session, identifier)
        if record is None:
            raise VariableNotFoundError(identifier, session.id)
        return record

    def _check_count(self, session: SessionRecord, adding: int) -> None:
        check_count(self.limits, len(session.variables), adding)

    def _check_size(self, name: str, type_: str, value: Any) -> None:
        check_value_size(self.limits, name, type_, value)

    def _new_record(
        self,
        spec: Any,
        value: Any,
        description: str,
        metadata: dict[str, str],
        version: int,
        created_at: float,
        updated_at: float,
        source: str,
    ) -> VariableRecord:
        record = VariableRecord(
            id=f"var_{spec.name}_{next(self._ids)}",
            name=spec.name,
            spec=spec,
            value=value,
            description=description or "",
            metadata=metadata,
            version=version,
            created_at=created_at,
            updated_at=updated_at,
            source=source,
            history=deque(maxlen=self.limits.history_limit),
        )
        record.history.append(HistoryEntry(version, value, updated_at, source, dict(metadata)))
        record.fixed_bytes = self._fixed_bytes(spec.name, record.description, metadata, spec.constraints)
        record.history_bytes = self._entry_bytes(spec.type, record.history[-1])
        return record

    @staticmethod
    def _fixed_bytes(name: str, description: str, metadata: Mapping[str, str], constraints: Mapping[str, Any]) -> int:
        # The name is stored twice (the record and the name index) and the id is var_<name>_<n>.
        return (
            3 * _text_bytes(name)
            + 32
            + _text_bytes(description or "")
            + _map_bytes(metadata)
            + _constraints_bytes(constraints)
        )

    @staticmethod
    def _entry_bytes(type_: str, entry: HistoryEntry) -> int:
        return value_size(type_, entry.value) + _map_bytes(entry.metadata)

    def _check_fields(
        self, name: str, description: str, metadata: Mapping[str, str], constraints: Mapping[str, Any]
    ) -> None:
        """Refuse a description, metadata or constraints larger than their limits."""
        limits = self.limits
        for what, size, maximum in (
            ("description bytes", _text_bytes(description or ""), limits.max_description_bytes),
            ("metadata bytes", _map_bytes(metadata), limits.max_variable_metadata_bytes),
            ("constraints bytes", _constraints_bytes(constraints), limits.max_constraints_bytes),
        ):
            if size > maximum:
                raise LimitExceededError(f"{name}: {what}", size, maximum)

    def _charge(self, session: SessionRecord, adding: int) -> None:
        """Refuse ``adding`` more bytes past the session's or the store's limit (nothing is counted)."""
        if adding <= 0:
            return
        if session.bytes_used + adding > self.limits.max_session_bytes:
            raise LimitExceededError(
                "bytes held by the session", session.bytes_used + adding, self.limits.max_session_bytes
            )
        if self._bytes_total + adding > self.limits.max_total_bytes:
            raise LimitExceededError("bytes held by the store", self._bytes_total + adding, self.limits.max_total_bytes)

    def _creation_time(self, session: SessionRecord) -> float:
        """Now, but strictly after the session's newest variable, so creation times order creation."""
        now = self._clock()
        last = next(reversed(session.variables.values()), None)
        if last is not None and now <= last.created_at:
            now = last.created_at + 1e-6
        return float(now)

    def _insert(self, session: SessionRecord, record: VariableRecord) -> None:
        session.variables[record.id] = record
        session.names[record.name] = record.id
        added = record.fixed_bytes + record.history_bytes
        session.bytes_used += added
        self._bytes_total += added

    def _plan(self, record: VariableRecord, value: Any, metadata: dict[str, str] | None) -> _WritePlan:
        """What a write would cost; raises when it would break a limit that no trimming can meet."""
        if record.version >= MAX_VERSION:
            raise LimitExceededError(f"{record.name}: version", record.version + 1, MAX_VERSION)
        fixed_delta = 0
        if metadata:
            merged = {**record.metadata, **metadata}
            merged_bytes = _map_bytes(merged)
            if merged_bytes > self.limits.max_variable_metadata_bytes:
                raise LimitExceededError(
                    f"{record.name}: metadata bytes", merged_bytes, self.limits.max_variable_metadata_bytes
                )
            fixed_delta = merged_bytes - _map_bytes(record.metadata)
        entry_bytes = value_size(record.spec.type, value) + _map_bytes(metadata or {})
        history = record.history
        kept = len(history) + 1
        history_bytes = record.history_bytes + entry_bytes
        drop = 0
        while kept > 1 and (kept > self.limits.history_limit or history_bytes > self.limits.max_history_bytes):
            history_bytes -= self._entry_bytes(record.spec.type, history[drop])
            drop += 1
            kept -= 1
        delta = fixed_delta + history_bytes - record.history_bytes
        return _WritePlan(delta, fixed_delta, drop, history_bytes)

    def _apply(
        self,
        session: SessionRecord,
        record: VariableRecord,
        value: Any,
        metadata: dict[str, str] | None,
        source: str,
        *,
        charge: bool = True,
    ) -> Variable:
        plan = self._plan(record, value, metadata)
        if charge:
            self._charge(session, plan.delta)
        now = self._clock()
        record.value = value
        record.version += 1
        record.updated_at = now
        record.source = source
        if metadata:
            record.metadata = {**record.metadata, **metadata}
        for _ in range(plan.drop):
            record.history.popleft()
        record.history.append(HistoryEntry(record.version, value, now, source, dict(metadata or {})))
        record.fixed_bytes += plan.fixed_delta
        record.history_bytes = plan.history_bytes
        session.bytes_used += plan.delta
        self._bytes_total += plan.delta
        snapshot = self._snapshot(record)
        self._notify(session.id, record.id, snapshot, UpdateType.VALUE_CHANGE, source, metadata or {}, now)
        return snapshot

    def _notify(
        self,
        session_id: str,
        variable_id: str,
        snapshot: Variable,
        update_type: str,
        source: str,
        metadata: Mapping[str, str],
        now: float,
    ) -> None:
        watchers = self._watchers.get(session_id)
        if not watchers:
            return
        update = VariableUpdate(variable_id, snapshot, update_type, source, dict(metadata), now)
        for watch in watchers:
            if watch.wants(variable_id):
                watch.offer(update)

    def _snapshot(self, record: VariableRecord) -> Variable:
        value = record.value
        if isinstance(value, list):
            value = list(value)
        elif isinstance(value, dict):
            value = {"shape": list(value["shape"]), "data": list(value["data"])}
        return Variable(
            id=record.id,
            name=record.name,
            type=record.spec.type,
            value=value,
            constraints=dict(record.spec.constraints),
            description=record.description,
            metadata=dict(record.metadata),
            version=record.version,
            created_at=record.created_at,
            updated_at=record.updated_at,
            source=record.source,
            optimization_status=self._leases.status(record.id) if self._leases else None,
        )
