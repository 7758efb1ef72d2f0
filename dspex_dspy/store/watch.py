"""Watchers: how a store tells interested parties that variables changed.

A :class:`Watch` holds at most one pending update per variable. A new update for a variable that
still has one pending replaces it (keeping its place in line), so a slow consumer receives
coalesced updates — always ending on the latest value — and a watcher's memory is bounded by the
number of variables it watches, never by the number of writes. Per variable, the versions it
delivers strictly increase: an update at a version the watch already took in (from a write seen
both directly and through a change log, or a snapshot older than a change) is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from dspex_dspy.records import UpdateType, VariableUpdate

__all__ = ["UpdateType", "VariableUpdate", "Watch"]


class Watch:
    """A registered watcher: a coalescing queue of :class:`VariableUpdate` filled by the store.

    Use :meth:`next_update` to wait for the next update, or iterate (blocking) until closed.
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

    def wants(self, variable_id: str) -> bool:
        """Whether this watcher follows that variable."""
        return self.variable_ids is None or variable_id in self.variable_ids

    def offer(self, update: VariableUpdate) -> None:
        """Queue an update, replacing a pending one of the same variable (called by the store).

        A replacing update takes the place of the newest write, not of the one it replaces, so
        the queue stays in the order of the writes it holds: the updates of one atomic batch stay
        together, after every write that came before them.
        """
        with self._cond:
            if self._closed:
                return
            if update.variable is not None:
                deleted = update.update_type == UpdateType.DELETED
                last = self._offered.get(update.variable_id)
                version = update.variable.version
                if last is not None and (version < last[0] or (version == last[0] and (last[1] or not deleted))):
                    return
                self._offered[update.variable_id] = (version, deleted)
            if self._pending.pop(update.variable_id, None) is not None:
                self.coalesced += 1
            self._pending[update.variable_id] = update
            self._cond.notify()

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
            self._closed = True
            self._cond.notify_all()

    def __iter__(self) -> Iterator[VariableUpdate]:
        while True:
            update = self.next_update()
            if update is None:
                if self._closed:
                    return
                continue
            yield update
