"""Records shared by the store, the server and the clients: updates, history entries, batch outcomes.

These plain, immutable records describe what happened to variables and sessions. They live
outside :mod:`dspex_dspy.store` so that client code (workers, remote stores) can use them without
importing the store; :mod:`dspex_dspy.store` re-exports them under their old names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex_dspy.errors import DSPexError
from dspex_dspy.types import Variable

__all__ = ["BatchResult", "HistoryEntry", "SessionInfo", "UpdateType", "VariableUpdate", "Watch"]


class UpdateType:
    """The ``update_type`` strings of the wire contract."""

    INITIAL_VALUE = "initial_value"
    VALUE_CHANGE = "value_change"
    DELETED = "deleted"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class VariableUpdate:
    """One change of one variable, as a watcher sees it.

    Attributes:
        variable_id: the variable's id (empty for a heartbeat).
        variable: the variable after the change (for ``deleted``: its last state).
        update_type: ``initial_value``, ``value_change``, ``deleted`` or ``heartbeat``.
        source: who made the change (``orchestrator`` / ``worker``).
        metadata: metadata given with the write.
        timestamp: wall-clock seconds since the epoch.
    """

    variable_id: str
    variable: Variable | None
    update_type: str
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    timestamp: float = 0.0

    @property
    def name(self) -> str:
        """The variable's name (empty for a heartbeat)."""
        return self.variable.name if self.variable is not None else ""


@dataclass(frozen=True)
class HistoryEntry:
    """One accepted write of a variable: the value it set and who set it."""

    version: int
    value: Any
    timestamp: float
    changed_by: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionInfo:
    """What a store reports about a session."""

    id: str
    metadata: Mapping[str, str]
    created_at: float
    ttl: float
    variable_count: int
    expires_in: float


@dataclass(frozen=True)
class BatchResult:
    """The outcome of a batch write.

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


class Watch:
    """A registered watcher: a coalescing queue of :class:`VariableUpdate` filled by the store.

    Use :meth:`next_update` to wait for the next update, or iterate (blocking) until closed. A
    reader that must not block (an event loop) sets a waker with :meth:`set_waker` and takes
    updates with :meth:`take_all` when woken.
    """

    def __init__(self, session_id: str, variable_ids: frozenset[str] | None) -> None:
        self.session_id = session_id
        self.variable_ids = variable_ids
        self.coalesced = 0
        self._pending: dict[str, VariableUpdate] = {}
        # variable id -> (highest version offered, whether that offer was a deletion)
        self._offered: dict[str, tuple[int, bool]] = {}
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._waker: Callable[[], None] | None = None

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Call ``waker`` (it must not block) whenever an update arrives on an empty queue or the watch closes.

        It is called at once if an update is already pending or the watch is already closed, so a
        reader that sets it, then drains the queue whenever woken, misses nothing.
        """
        with self._cond:
            self._waker = waker
            due = bool(self._pending) or self._closed
        if waker is not None and due:
            waker()

    def wants(self, variable_id: str) -> bool:
        """Whether this watcher follows that variable."""
        return self.variable_ids is None or variable_id in self.variable_ids

    def offer(self, update: VariableUpdate) -> None:
        """Queue an update, replacing a pending one of the same variable (called by the store).

        A replacing update takes the place of the newest write, not of the one it replaces, so
        the queue stays in the order of the writes it holds: the updates of one atomic batch stay
        together, after every write that came before them.
        """
        self.offer_all((update,))

    def offer_all(self, updates: Sequence[VariableUpdate]) -> None:
        """Queue several updates at once (one atomic batch): :meth:`take_all` sees all of them or none."""
        if not updates:
            return
        with self._cond:
            if self._closed:
                return
            waker = self._waker if not self._pending else None
            for update in updates:
                if update.variable is not None:
                    deleted = update.update_type == UpdateType.DELETED
                    last = self._offered.get(update.variable_id)
                    version = update.variable.version
                    if last is not None and (version < last[0] or (version == last[0] and (last[1] or not deleted))):
                        continue
                    self._offered[update.variable_id] = (version, deleted)
                if self._pending.pop(update.variable_id, None) is not None:
                    self.coalesced += 1
                self._pending[update.variable_id] = update
            self._cond.notify()
        if waker is not None:
            waker()

    def take_all(self) -> list[VariableUpdate]:
        """Take every pending update, oldest first, without waiting (an empty list when none)."""
        with self._cond:
            taken = list(self._pending.values())
            self._pending.clear()
        return taken

    def next_update(self, timeout: float | None = None) -> VariableUpdate | None:
        """Return the oldest pending update; wait up to ``timeout`` seconds (None = forever).

        Returns None on timeout or once the watch is closed and drained (check :attr:`closed`).
        """
        with self._cond:
            if not self._pending and not self._closed:
                self._cond.wait_for(lambda: bool(self._pending) or self._closed, timeout)
            if not self._pending:
                return None
            key = next(iter(self._pending))
            return self._pending.pop(key)

    @property
    def closed(self) -> bool:
        """True once the watch was closed (by its owner, the session ending or the store closing)."""
        return self._closed

    @property
    def pending(self) -> int:
        """How many updates are waiting to be taken."""
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        """Stop receiving updates and wake any waiting reader. Idempotent."""
        with self._cond:
            waker = self._waker if not self._closed else None
            self._closed = True
            self._cond.notify_all()
        if waker is not None:
            waker()

    def __iter__(self) -> Iterator[VariableUpdate]:
        while True:
            update = self.next_update()
            if update is None:
                if self._closed:
                    return
                continue
            yield update
