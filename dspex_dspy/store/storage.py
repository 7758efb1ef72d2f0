"""The storage seam under a :class:`~dspex_dspy.store.SessionStore`, at the level of operations.

The store owns every rule (validation, limits, names, watch fan-out); a storage engine owns the
records and makes each operation atomic: create/get/touch/delete a session with a TTL; read one,
many or all variables of a session; insert variables; apply a write or an atomic batch of writes
with per-variable version checks (compare-and-swap), returning the new versions; delete a
variable; a bounded per-variable history; and a per-session **change log** with a monotonically
increasing position, readable from a position and bounded (a reader that fell behind the
compacted part is told to resync, never handed a silent gap); and a bounded list of the session's
recent module calls (JSON text). A rollback is an ordinary write.

Engines never hand out mutable records: every answer is a frozen :class:`~dspex_dspy.types.Variable`
or record, so a remote engine (:mod:`dspex_dspy.store.redis_storage`) can implement the same
:class:`Storage` protocol as :class:`MemoryStorage`.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, Protocol

from dspex_dspy.errors import (
    LimitExceededError,
    SessionExistsError,
    SessionNotFoundError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.leases import OptimizationLease
from dspex_dspy.limits import StoreLimits, value_size
from dspex_dspy.records import HistoryEntry, SessionInfo, UpdateType, VariableUpdate
from dspex_dspy.types import Variable

__all__ = [
    "DEFAULT_CHANGELOG_LIMIT",
    "ChangeBatch",
    "HistoryEntry",
    "MemoryStorage",
    "NewVariable",
    "Storage",
    "StorageListener",
    "Write",
]

DEFAULT_CHANGELOG_LIMIT = 10_000
"""Changes a session's change log keeps; a reader further behind is told to resync."""

MAX_VERSION = 2**31 - 1
"""The highest version a variable can reach: versions travel as ``int32`` on the wire."""


def text_bytes(text: str) -> int:
    """UTF-8 size of ``text`` (its length when that is all ASCII, which is the common case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def map_bytes(mapping: Mapping[str, str]) -> int:
    """Bytes of a ``str -> str`` map (keys and values)."""
    total = 0
    for key, value in mapping.items():  # a loop, not a generator: this runs per variable of an import
        total += text_bytes(key) + text_bytes(value)
    return total


def owned_constraints(constraints: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of constraints that shares nothing with them (their values are numbers, strings and
    flat lists: the lists are copied too)."""
    return {key: list(value) if isinstance(value, list) else value for key, value in constraints.items()}


def constraints_bytes(constraints: Mapping[str, Any]) -> int:
    """Bytes of constraints, as their JSON."""
    if not constraints:
        return 0
    return text_bytes(json.dumps(dict(constraints), default=str, separators=(",", ":")))


def fixed_bytes(name: str, description: str, metadata: Mapping[str, str], constraints: Mapping[str, Any]) -> int:
    """Bytes a variable holds besides its history (the name is kept twice; the id is var_<name>_<n>)."""
    return (
        3 * text_bytes(name) + 32 + text_bytes(description or "") + map_bytes(metadata) + constraints_bytes(constraints)
    )


def entry_bytes(type_: str, entry: HistoryEntry) -> int:
    """Bytes of one remembered write: its value and its metadata."""
    return value_size(type_, entry.value) + map_bytes(entry.metadata)


@dataclass(frozen=True)
class NewVariable:
    """A variable to insert: its definition and first state.

    ``created_at`` 0 means "now": the engine stamps it strictly after the session's newest
    variable, so creation times order creation.
    """

    name: str
    type: str
    value: Any
    constraints: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    version: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0
    source: str = "orchestrator"


LeaseCheck = Literal["", "admit", "force", "refuse"]
"""How an engine that keeps the optimization leases checks a write (see :class:`Write`)."""


@dataclass(frozen=True)
class Write:
    """One write of a variable's value, already validated and normalised by the store.

    Attributes:
        variable_id: the variable written.
        value: the new (normalised) value.
        expected_version: when set, the write applies only at that current version (CAS).
        metadata: metadata merged into the variable's and recorded with the write.
        source: who writes.
        timestamp: wall-clock seconds of the write.
        variable: the variable as the store read it before the write, if it did (an engine may
            use its definition rather than read it again; the version check stays the engine's).
        announce: metadata told to watchers with the update but not stored (an atomic batch's
            marker, so a worker's cache applies the batch together).
        lease_check: for an engine that keeps the optimization leases itself (``shares_leases``):
            ``""`` none, ``"admit"`` (refused when another optimizer's lease holds the variable),
            ``"force"`` (admitted, recording ``forced_over``) or ``"refuse"`` (refused when any
            lease holds it: a rollback).
        holder: the writer's optimizer id (the lease holder's own writes pass).
    """

    variable_id: str
    value: Any
    expected_version: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    source: str = "orchestrator"
    timestamp: float = 0.0
    variable: Variable | None = None
    announce: Mapping[str, str] = field(default_factory=dict)
    lease_check: LeaseCheck = ""
    holder: str = ""


@dataclass(frozen=True)
class ChangeBatch:
    """What :meth:`Storage.read_changes` returns.

    Attributes:
        position: the position to read after next time.
        updates: the changes after the position asked for, oldest first.
        resync: True when the log no longer holds every change after the position asked for
            (compacted): the reader must re-read all variables, then continue from ``position``.
    """

    position: int
    updates: tuple[VariableUpdate, ...] = ()
    resync: bool = False


class StorageListener(Protocol):
    """Told by an engine about changes made through it, in the order it applied them."""

    def changed(self, session_id: str, updates: Sequence[VariableUpdate]) -> None:
        """Variables of a session changed (created, written or deleted)."""

    def ended(self, session_id: str) -> None:
        """A session was deleted or expired."""


LOOP_MAX_VALUE_BYTES: Final = 64 * 1024
"""Largest value (encoded bytes, about) an event loop decodes, validates or encodes itself; a larger
one is handled in a thread, so one big embedding never stalls every other call and stream."""


class SharedLeases(Protocol):
    """An engine several nodes share that keeps optimization leases itself (``shares_leases``), so a
    lease taken through one node holds on every node (its write scripts check them)."""

    def start_lease(
        self, session_id: str, variables: Mapping[str, str], optimizer_id: str, ttl: float
    ) -> OptimizationLease:
        """Take or renew ``optimizer_id``'s lease on ``variables`` (id -> name) for ``ttl`` seconds."""

    def stop_lease(self, session_id: str, lease_id: str) -> None:
        """End a lease by its id (ending one that already ended does nothing)."""

    def stop_variable_lease(self, session_id: str, variable_id: str, name: str, *, force: bool) -> None:
        """End the lease holding a variable (``force`` needed)."""


class Storage(Protocol):
    """The operations a storage engine offers a :class:`~dspex_dspy.store.SessionStore`.

    Errors: an unknown (or expired) session raises :class:`SessionNotFoundError`; a write to a
    variable that is gone raises :class:`VariableNotFoundError`; a failed version check raises
    :class:`VersionConflictError`; an operation that raises changes nothing.

    Optional: an engine that can serve from an event loop without blocking it (Redis through one
    multiplexed connection per loop; memory, whose locks are short) offers
    ``nonblocking`` (True), ``async read_variables_async(session_id, identifiers)`` and
    ``async apply_writes_async(session_id, writes, *, history_limit)``: the same operations as
    :meth:`read_variables` and :meth:`apply_writes` (for writes that carry their definitions); the
    read answers None when its values are too large for the loop (:data:`LOOP_MAX_VALUE_BYTES`).
    A ``grpc.aio`` bridge node then serves reads and single writes on its loop, with no thread
    hand-off (:attr:`SessionStore.nonblocking <dspex_dspy.store.SessionStore.nonblocking>`).
    """

    #: True when other processes may change the records (the store then follows the change log).
    shared: bool

    def add_listener(self, listener: StorageListener) -> None:
        """Register a listener for changes made through this engine."""

    def create_session(
        self, session_id: str, metadata: Mapping[str, str], ttl: float, created_at: float, max_sessions: int
    ) -> SessionInfo:
        """Create a session (replacing an expired one of that id). Raises SessionExistsError."""

    def get_session(self, session_id: str, *, touch: bool = True) -> SessionInfo | None:
        """Describe a live session (refreshing its TTL when ``touch``), or None."""

    def touch_session(self, session_id: str) -> bool:
        """Refresh a session's TTL; False if it does not exist."""

    def delete_session(self, session_id: str) -> int | None:
        """Delete a session; return how many variables it held, or None if it did not exist."""

    def session_ids(self) -> list[str]:
        """The ids of the live sessions."""

    def sweep(self) -> list[str]:
        """Remove expired sessions that the engine does not expire by itself; return their ids."""

    def read_variables(self, session_id: str, identifiers: Sequence[str]) -> dict[str, Variable]:
        """Variables by id or name (id first), keyed by identifier as given; unknown ones are left out."""

    def list_variables(self, session_id: str) -> list[Variable]:
        """Every variable of the session, in creation order."""

    def insert_variables(
        self, session_id: str, variables: Sequence[NewVariable], *, now: float, max_variables: int, history_limit: int
    ) -> list[Variable]:
        """Insert variables, all or none (VariableExistsError for a taken name, LimitExceededError past the count)."""

    def apply_writes(self, session_id: str, writes: Sequence[Write], *, history_limit: int) -> list[Variable]:
        """Check every version, then apply every write, atomically; return the variables written, in order."""

    def delete_variable(
        self, session_id: str, variable_id: str, *, source: str, timestamp: float, history_limit: int = 0
    ) -> Variable:
        """Delete a variable (and its history, kept to ``history_limit`` entries); return its last state."""

    def history(self, session_id: str, variable_id: str, *, limit: int = 0) -> list[HistoryEntry]:
        """The variable's remembered writes, oldest first (the newest ``limit`` when > 0)."""

    def position(self, session_id: str) -> int:
        """The position of the session's latest change (0 before any)."""

    def read_changes(self, session_id: str, after: int, timeout: float) -> ChangeBatch:
        """The changes after position ``after``, waiting up to ``timeout`` seconds for one."""

    def report_calls(self, session_id: str, calls: Sequence[str], *, keep: int) -> int:
        """Append call records (JSON text, oldest first), keeping the newest ``keep``; return how many were added."""

    def recent_calls(self, session_id: str, limit: int) -> list[str]:
        """The session's newest call records (JSON text), newest first, at most ``limit``."""

    def close(self) -> None:
        """Release the engine's resources."""


# --------------------------------------------------------------------------------------------
# MemoryStorage
# --------------------------------------------------------------------------------------------


class _Session:
    """One session of a :class:`MemoryStorage` (guarded by its own lock)."""

    def __init__(self, session_id: str, metadata: dict[str, str], ttl: float, created_at: float, now: float) -> None:
        self.id = session_id
        self.metadata = metadata
        self.ttl = ttl
        self.created_at = created_at
        self.last_access = now
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.variables: dict[str, Variable] = {}
        self.names: dict[str, str] = {}
        self.histories: dict[str, deque[HistoryEntry]] = {}
        # Each variable's own metadata (from its definition); a write's metadata shows on the
        # version that write made only, on top of this.
        self.own_metadata: dict[str, dict[str, str]] = {}
        self.unordered = False
        self.position = 0
        self.ended = False
        self.log: deque[tuple[int, VariableUpdate, int]] = deque()  # (position, update, value bytes)
        self.log_bytes = 0
        # Bytes counted against the limits: the session's total, and per variable its fixed part
        # and its remembered writes.
        self.bytes_used = 0
        self.fixed: dict[str, int] = {}
        self.history_bytes: dict[str, int] = {}
        # Recent module calls reported by workers (JSON text, oldest first); bounded by the store.
        self.calls: deque[str] = deque()


def _entry(var: Variable, metadata: Mapping[str, str]) -> HistoryEntry:
    return HistoryEntry(var.version, var.value, var.updated_at, var.source, dict(metadata))


class MemoryStorage:
    """In-process storage: one lock per session, plain dicts in creation order.

    It also counts the bytes each session holds (metadata, names, descriptions, constraints,
    values and remembered writes) against the byte limits of ``limits``: a session or the whole
    storage past its maximum refuses the operation, and history is trimmed to
    ``max_history_bytes`` per variable.

    Args:
        monotonic: the clock TTLs are measured on.
        changelog_limit: changes each session's change log keeps.
        limits: the byte limits to keep (defaults of :class:`~dspex_dspy.limits.StoreLimits`).
    """

    shared = False
    #: Its operations wait on nothing but short per-session locks (values are validated and copied
    #: outside them), so an event loop may run reads and writes itself.
    nonblocking = True

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        changelog_limit: int = DEFAULT_CHANGELOG_LIMIT,
        limits: StoreLimits | None = None,
    ) -> None:
        if changelog_limit < 1:
            raise ValueError(f"changelog_limit must be at least 1, got {changelog_limit}")
        self._limits = limits or StoreLimits()
        self._bytes_total = 0
        self._bytes_lock = threading.Lock()
        self._monotonic = monotonic
        self._changelog_limit = changelog_limit
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()  # guards the session table only
        self._ids = itertools.count(1)
        self._listeners: list[StorageListener] = []

    def add_listener(self, listener: StorageListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ sessions

    def _expired(self, session: _Session) -> bool:
        return self._monotonic() - session.last_access > session.ttl

    def _reserve(self, session: _Session, delta: int) -> None:
        """Count ``delta`` bytes for a session, refusing to pass its or the storage's limit."""
        with self._bytes_lock:
            if delta > 0:
                if session.bytes_used + delta > self._limits.max_session_bytes:
                    raise LimitExceededError(
                        "bytes held by the session", session.bytes_used + delta, self._limits.max_session_bytes
                    )
                if self._bytes_total + delta > self._limits.max_total_bytes:
                    raise LimitExceededError(
                        "bytes held by the store", self._bytes_total + delta, self._limits.max_total_bytes
                    )
            session.bytes_used += delta
            self._bytes_total += delta

    def _end(self, session: _Session) -> None:
        """Forget a session (table lock held) and tell the listeners."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        with session.lock:
            if not session.ended:
                with self._bytes_lock:
                    self._bytes_total -= session.bytes_used
            session.ended = True
            session.changed.notify_all()
        for listener in self._listeners:
            listener.ended(session.id)

    def _live(self, session_id: str, touch: bool = True) -> _Session:
        session = self._sessions.get(session_id)
        if session is None or session.ended:
            raise SessionNotFoundError(session_id)
        now = self._monotonic()
        if now - session.last_access > session.ttl:
            if touch:  # a use finds it expired: it ends now (a mere look leaves it to the sweep)
                with self._lock:
                    self._end(session)
            raise SessionNotFoundError(session_id)
        if touch:
            session.last_access = now
        return session

    def _info(self, session: _Session) -> SessionInfo:
        remaining = session.ttl - (self._monotonic() - session.last_access)
        return SessionInfo(
            session.id, dict(session.metadata), session.created_at, session.ttl, len(session.variables), remaining
        )

    def create_session(
        self, session_id: str, metadata: Mapping[str, str], ttl: float, created_at: float, max_sessions: int
    ) -> SessionInfo:
        with self._lock:
            existing = self._sessions.get(session_id)
            if existing is not None and not self._expired(existing):
                raise SessionExistsError(session_id)
            if existing is not None:
                self._end(existing)
            if len(self._sessions) >= max_sessions:
                raise LimitExceededError("sessions", len(self._sessions) + 1, max_sessions)
            session = _Session(session_id, dict(metadata), ttl, created_at, self._monotonic())
            self._reserve(session, text_bytes(session_id) + map_bytes(metadata))
            self._sessions[session_id] = session
            return self._info(session)

    def get_session(self, session_id: str, *, touch: bool = True) -> SessionInfo | None:
        try:
            return self._info(self._live(session_id, touch))
        except SessionNotFoundError:
            return None

    def touch_session(self, session_id: str) -> bool:
        try:
            self._live(session_id)
        except SessionNotFoundError:
            return False
        return True

    def delete_session(self, session_id: str) -> int | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            self._end(session)
            return len(session.variables)

    def session_ids(self) -> list[str]:
        return [s.id for s in list(self._sessions.values()) if not self._expired(s)]

    def sweep(self) -> list[str]:
        with self._lock:
            expired = [s for s in self._sessions.values() if self._expired(s)]
            for session in expired:
                self._end(session)
        return [s.id for s in expired]

    # ------------------------------------------------------------------ variables

    @staticmethod
    def _find(session: _Session, identifier: str) -> Variable | None:
        var = session.variables.get(identifier)
        if var is None:
            var_id = session.names.get(identifier)
            var = session.variables.get(var_id) if var_id is not None else None
        return var

    def read_variables(self, session_id: str, identifiers: Sequence[str]) -> dict[str, Variable]:
        session = self._live(session_id)
        with session.lock:
            found = {}
            for ident in identifiers:
                var = self._find(session, ident)
                if var is not None:
                    found[ident] = var
            return found

    def list_variables(self, session_id: str) -> list[Variable]:
        session = self._live(session_id)
        with session.lock:
            if session.unordered:
                # Imports sent concurrently (a pipelined migration) may arrive out of order.
                session.variables = dict(sorted(session.variables.items(), key=lambda item: item[1].created_at))
                session.unordered = False
            return list(session.variables.values())

    def _publish(self, session: _Session, updates: list[VariableUpdate]) -> None:
        """Append to the change log and tell the listeners (session lock held)."""
        for update in updates:
            session.position += 1
            size = value_size(update.variable.type, update.variable.value) if update.variable is not None else 0
            session.log.append((session.position, update, size))
            session.log_bytes += size
        # Bounded in entries and in the bytes of the values they hold; a reader behind is told to resync.
        while session.log and (
            len(session.log) > self._changelog_limit or session.log_bytes > self._limits.max_history_bytes
        ):
            session.log_bytes -= session.log.popleft()[2]
        session.changed.notify_all()
        for listener in self._listeners:
            listener.changed(session.id, updates)

    def insert_variables(
        self, session_id: str, variables: Sequence[NewVariable], *, now: float, max_variables: int, history_limit: int
    ) -> list[Variable]:
        session = self._live(session_id)
        with session.lock:
            for new in variables:
                if new.name in session.names:
                    raise VariableExistsError(new.name, session_id)
            total = len(session.variables) + len(variables)
            if total > max_variables:
                raise LimitExceededError("variables per session", total, max_variables)
            sizes = [
                (
                    fixed_bytes(new.name, new.description, new.metadata, new.constraints),
                    value_size(new.type, new.value) + map_bytes(new.metadata),
                )
                for new in variables
            ]
            self._reserve(session, sum(f + h for f, h in sizes))
            out: list[Variable] = []
            updates: list[VariableUpdate] = []
            for new, (fixed, first_entry) in zip(variables, sizes, strict=True):
                last = next(reversed(session.variables.values()), None)
                created = new.created_at
                if not created:
                    created = now if last is None or now > last.created_at else last.created_at + 1e-6
                elif last is not None and last.created_at > created:
                    session.unordered = True
                var = Variable(
                    id=f"var_{new.name}_{next(self._ids)}",
                    name=new.name,
                    type=new.type,
                    value=new.value,
                    constraints=dict(new.constraints),
                    description=new.description,
                    metadata=dict(new.metadata),
                    version=new.version,
                    created_at=created,
                    updated_at=new.updated_at or created,
                    source=new.source,
                )
                session.variables[var.id] = var
                session.names[var.name] = var.id
                session.histories[var.id] = deque([_entry(var, var.metadata)], maxlen=history_limit)
                session.own_metadata[var.id] = dict(var.metadata)
                session.fixed[var.id] = fixed
                session.history_bytes[var.id] = first_entry
                out.append(var)
                updates.append(
                    VariableUpdate(var.id, var, UpdateType.VALUE_CHANGE, var.source, dict(var.metadata), now)
                )
            self._publish(session, updates)
            return out

    async def read_variables_async(self, session_id: str, identifiers: Sequence[str]) -> dict[str, Variable] | None:
        """:meth:`read_variables`, run by the event loop itself (see :attr:`nonblocking`); None when a
        value is larger than :data:`LOOP_MAX_VALUE_BYTES` (copying it is work for a thread)."""
        found = self.read_variables(session_id, identifiers)
        if any(value_size(var.type, var.value) > LOOP_MAX_VALUE_BYTES for var in found.values()):
            return None
        return found

    async def apply_writes_async(
        self, session_id: str, writes: Sequence[Write], *, history_limit: int
    ) -> list[Variable]:
        """:meth:`apply_writes`, run by the event loop itself (see :attr:`nonblocking`)."""
        return self.apply_writes(session_id, writes, history_limit=history_limit)

    def apply_writes(self, session_id: str, writes: Sequence[Write], *, history_limit: int) -> list[Variable]:
        session = self._live(session_id)
        with session.lock:
            versions: dict[str, int] = {}
            metas: dict[str, Mapping[str, str]] = {}
            histories: dict[str, list[HistoryEntry]] = {}
            plans: list[tuple[int, int, int]] = []  # per write: (fixed bytes after, history bytes after, drop)
            fixed_now = dict(session.fixed)
            history_now = dict(session.history_bytes)
            for write in writes:
                var = session.variables.get(write.variable_id)
                if var is None:
                    raise VariableNotFoundError(write.variable_id, session_id)
                current = versions.get(var.id, var.version)
                if write.expected_version and write.expected_version != current:
                    raise VersionConflictError(var.name, write.expected_version, current)
                if current >= MAX_VERSION:
                    raise LimitExceededError(f"{var.name}: version", current + 1, MAX_VERSION)
                versions[var.id] = current + 1
                if write.metadata:
                    # A write's metadata belongs to the write (its history entry), never to the variable.
                    write_bytes = map_bytes(write.metadata)
                    if write_bytes > self._limits.max_variable_metadata_bytes:
                        raise LimitExceededError(
                            f"{var.name}: metadata bytes", write_bytes, self._limits.max_variable_metadata_bytes
                        )
                metas[var.id] = write.metadata
                history = histories.setdefault(var.id, list(session.histories[var.id]))
                history.append(
                    HistoryEntry(current + 1, write.value, write.timestamp, write.source, dict(write.metadata))
                )
                kept = history_now[var.id] + entry_bytes(var.type, history[-1])
                drop = 0
                while len(history) - drop > 1 and (
                    len(history) - drop > history_limit or kept > self._limits.max_history_bytes
                ):
                    kept -= entry_bytes(var.type, history[drop])
                    drop += 1
                del history[:drop]
                history_now[var.id] = kept
                plans.append((fixed_now[var.id], kept, drop))
            delta = sum(fixed_now[i] - session.fixed[i] + history_now[i] - session.history_bytes[i] for i in metas)
            self._reserve(session, delta)
            out: list[Variable] = []
            updates: list[VariableUpdate] = []
            for write in writes:
                old = session.variables[write.variable_id]
                var = replace(
                    old,
                    value=write.value,
                    version=old.version + 1,
                    updated_at=write.timestamp,
                    source=write.source,
                    metadata={**session.own_metadata.get(old.id, {}), **write.metadata},
                )
                session.variables[var.id] = var
                out.append(var)
                updates.append(
                    VariableUpdate(
                        var.id,
                        var,
                        UpdateType.VALUE_CHANGE,
                        write.source,
                        {**write.metadata, **write.announce},
                        write.timestamp,
                    )
                )
            for var_id, history in histories.items():
                session.histories[var_id] = deque(history, maxlen=history_limit)
                session.fixed[var_id] = fixed_now[var_id]
                session.history_bytes[var_id] = history_now[var_id]
            self._publish(session, updates)
            return out

    def delete_variable(
        self, session_id: str, variable_id: str, *, source: str, timestamp: float, history_limit: int = 0
    ) -> Variable:
        session = self._live(session_id)
        with session.lock:
            var = session.variables.pop(variable_id, None)
            if var is None:
                raise VariableNotFoundError(variable_id, session_id)
            del session.names[var.name]
            del session.histories[var.id]
            session.own_metadata.pop(var.id, None)
            freed = session.fixed.pop(var.id, 0) + session.history_bytes.pop(var.id, 0)
            self._reserve(session, -freed)
            self._publish(session, [VariableUpdate(var.id, var, UpdateType.DELETED, source, {}, timestamp)])
            return var

    def history(self, session_id: str, variable_id: str, *, limit: int = 0) -> list[HistoryEntry]:
        session = self._live(session_id)
        with session.lock:
            history = session.histories.get(variable_id)
            if history is None:
                raise VariableNotFoundError(variable_id, session_id)
            entries = list(history)
        return entries[-limit:] if limit > 0 else entries

    # ------------------------------------------------------------------ change log

    def position(self, session_id: str) -> int:
        return self._live(session_id, touch=False).position

    def read_changes(self, session_id: str, after: int, timeout: float) -> ChangeBatch:
        session = self._live(session_id, touch=False)
        with session.lock:
            if session.position <= after and not session.ended:
                session.changed.wait_for(lambda: session.position > after or session.ended, timeout)
            if session.ended:
                raise SessionNotFoundError(session_id)
            if after > session.position:
                return ChangeBatch(session.position, resync=True)  # a position this log never had
            if session.position == after:
                return ChangeBatch(after)
            oldest = session.log[0][0] if session.log else session.position + 1
            if after + 1 < oldest:
                return ChangeBatch(session.position, resync=True)
            updates = tuple(update for pos, update, _ in session.log if pos > after)
            return ChangeBatch(session.position, updates)

    # ------------------------------------------------------------------ recent calls

    def report_calls(self, session_id: str, calls: Sequence[str], *, keep: int) -> int:
        session = self._live(session_id)
        with session.lock:
            if session.ended:
                raise SessionNotFoundError(session_id)
            session.calls.extend(calls)
            while len(session.calls) > keep:
                session.calls.popleft()
        return len(calls)

    def recent_calls(self, session_id: str, limit: int) -> list[str]:
        session = self._live(session_id)
        with session.lock:
            newest = list(session.calls)[::-1]
        return newest[:limit]

    def close(self) -> None:
        """Nothing to release."""
