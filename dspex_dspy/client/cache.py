"""The worker's cache of a session's variables and the watch subscriptions it feeds (no I/O here).

:class:`VariableCache` is thread-safe and performs no I/O: the feed (:mod:`.feed`) hands it the
stream's messages and the listings it asked for, the clients' writes tell it what they wrote, and
reads ask :meth:`VariableCache.lookup`, which answers only while the cache is synced, fresh for
that name and its stream not silent for too long (see :mod:`dspex_dspy.client`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Final

from dspex_dspy.client.events import WatchEvent, WatchTracker
from dspex_dspy.client.policy import Silence, watch_is_over
from dspex_dspy.errors import DSPexError, ValidationError
from dspex_dspy.records import UpdateType, VariableUpdate
from dspex_dspy.types import Variable, VariableSpec, compile_spec

__all__ = ["WORKER", "Batch", "CacheState", "Subscription", "VariableCache"]

WORKER: Final = "worker"


class CacheState(str, Enum):
    """What a worker's cache is doing, as ``ctx.cache_state`` reports it.

    - ``synced``: the cache serves reads;
    - ``syncing``: its stream is connecting or listing (reads go to the server meanwhile);
    - ``down``: its stream broke or went silent; reads go to the server while it reconnects;
    - ``disabled``: made with ``cache=False``, or the client is closed.
    """

    SYNCED = "synced"
    SYNCING = "syncing"
    DOWN = "down"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


@dataclass
class Batch:
    """What a cache-fed watch takes at once: updates, then a listing (a resync), then later updates."""

    before: list[VariableUpdate]
    listing: list[Variable] | None
    after: list[VariableUpdate]
    fatal: DSPexError | None

    def events(self, tracker: WatchTracker) -> list[WatchEvent]:
        events = [event for update in self.before if (event := tracker.on_update(update)) is not None]
        if self.listing is not None:
            events += tracker.on_listing(self.listing)
        events += [event for update in self.after if (event := tracker.on_update(update)) is not None]
        return events


class Subscription:
    """One ``watch_variables`` fed by the cache's stream: what it has not taken yet, and its connection state.

    Guarded by the cache's lock. Updates are coalesced per variable id (a slow reader's backlog is
    bounded by the number of variables); a newer listing supersedes an older one, whose updates
    then count as older than it.
    """

    def __init__(self, identifiers: Sequence[str]) -> None:
        self.wanted = frozenset(identifiers) or None
        self.before: dict[str, VariableUpdate] = {}
        self.listing: list[Variable] | None = None
        self.after: dict[str, VariableUpdate] = {}
        self.connected = False
        self.ever_connected = False
        self.fatal: DSPexError | None = None
        self.down_since: float | None = None
        self.last_error: DSPexError | None = None
        self.stopped = False

    def wants(self, var: Variable) -> bool:
        return self.wanted is None or var.name in self.wanted or var.id in self.wanted

    @staticmethod
    def _queue(pending: dict[str, VariableUpdate], update: VariableUpdate) -> None:
        pending.pop(update.variable_id, None)
        pending[update.variable_id] = update

    def push_update(self, update: VariableUpdate) -> None:
        if self.fatal is None and not self.stopped:
            self._queue(self.after if self.listing is not None else self.before, update)

    def push_listing(self, variables: list[Variable]) -> None:
        if self.fatal is not None or self.stopped:
            return
        if self.listing is not None:
            for update in self.after.values():
                self._queue(self.before, update)
            self.after = {}
        self.listing = variables
        self.connected = self.ever_connected = True
        self.down_since = self.last_error = None

    def push_down(self, error: DSPexError, now: float, *, judge: bool = True) -> None:
        """The cache's stream broke with ``error`` (``judge``: decide whether that ends the watch)."""
        if self.fatal is not None or self.stopped:
            return
        if judge and watch_is_over(error, live=self.connected, ever_connected=self.ever_connected):
            self.fatal = error
            return
        self.connected = False
        self.last_error = error
        if self.down_since is None:
            self.down_since = now

    def ready(self) -> bool:
        return bool(self.before or self.listing is not None or self.after or self.fatal or self.stopped)

    def take(self) -> Batch | None:
        if not (self.before or self.listing is not None or self.after or self.fatal):
            return None
        batch = Batch(list(self.before.values()), self.listing, list(self.after.values()), self.fatal)
        self.before, self.listing, self.after = {}, None, {}
        return batch

    def patience(self, reconnect_timeout: float | None, now: float) -> float | None:
        """Seconds left to wait for a reconnect (None: no limit); <= 0 once it is overdue."""
        if self.down_since is None or reconnect_timeout is None:
            return None
        return self.down_since + reconnect_timeout - now


class VariableCache:
    """The worker's copy of a session's variables, fed by a watch stream (see the module docstring).

    Thread-safe. ``lookup`` answers only when the cache is synced and fresh for that name; None
    means "ask the server". The cache also feeds the client's ``watch_variables`` subscriptions:
    each update is handed to them only after it is applied, and an update that may have overtaken
    earlier writes (see :class:`StreamOrder`) is applied only together with a listing taken after
    it arrived (:meth:`catch_up`). So what the cache holds is always a state the server was in,
    and a watch is never ahead of it.
    """

    def __init__(self, silence_timeout: float | None = None) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.silence = Silence(silence_timeout)
        self._vars: dict[str, Variable] = {}
        self._specs: dict[str, VariableSpec] = {}
        self._provisional: set[str] = set()
        self._registered_here: set[str] = set()
        self._deleted_ids: set[str] = set()
        self._floors: dict[str, tuple[int, int]] = {}
        self._touched: dict[str, int] = {}
        self._subs: list[Subscription] = []
        self._failure: DSPexError | None = None
        self._synced = False
        self._seq = 0
        self._changes = 0
        self.on_change: Callable[[], None] | None = None

    @property
    def synced(self) -> bool:
        """Whether the cache serves reads now: synced, and its stream not silent too long."""
        return self._synced and not self.silence.dead()

    @property
    def state(self) -> CacheState:
        """``synced``, ``syncing`` (connecting, no failure yet) or ``down``."""
        if self.synced:
            return CacheState.SYNCED
        if self._failure is not None or self._synced:  # broken, or silent too long
            return CacheState.DOWN
        return CacheState.SYNCING

    def heard(self) -> None:
        """The stream delivered a message (heartbeats included): it is alive."""
        self.silence.heard()

    def after_fork(self) -> None:
        """In a forked child: new locks (a parent thread may have held these), nothing served or fed."""
        self._cond = threading.Condition(threading.Lock())
        self._subs = []
        self._synced = False
        self._failure = None

    def _changed(self) -> None:
        self._changes += 1
        self._cond.notify_all()
        if self.on_change is not None:
            self.on_change()

    def lookup(self, name: str) -> Variable | None:
        with self._cond:
            return self._lookup(name)

    def lookup_record(self, name: str) -> Variable | None:
        """Like :meth:`lookup`, but None for the worker's own write not yet confirmed by the stream.

        Such a record has the right value and version, but the server decides its metadata.
        """
        with self._cond:
            return None if name in self._provisional else self._lookup(name)

    def _lookup(self, name: str) -> Variable | None:
        if not self._synced:  # (a silent stream is marked down by its driver at the deadline)
            return None
        var = self._vars.get(name)
        if var is None:
            return None
        floor = self._floors.get(name)
        if floor is not None:
            if var.version < floor[0]:
                return None
            del self._floors[name]
        return var

    def lookup_many(self, names: Sequence[str]) -> dict[str, Variable] | None:
        """Every name's record from one state of the cache, or None if any is not served."""
        with self._cond:
            found = {}
            for name in names:
                var = self._lookup(name)
                if var is None:
                    return None
                found[name] = var
            return found

    def type_of(self, name: str) -> str | None:
        """The cached type of ``name`` even when not synced (only used to encode writes)."""
        var = self._vars.get(name)
        return var.type if var is not None else None

    def wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``predicate()`` holds (checked without the lock, so it may read the cache)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = self._changes
            if predicate():
                return True
            with self._cond:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return predicate()
                if self._changes == seen:
                    self._cond.wait(left)

    # ------------------------------------------------------------------ watch subscriptions

    def subscribe(self, sub: Subscription) -> None:
        """Start feeding ``sub``: at once with the cached state if synced, else from the next resync."""
        with self._cond:
            self._live().append(sub)
            if self._synced:
                # Own registrations carry a local creation time until the stream confirms them.
                sub.push_listing([var for name, var in self._vars.items() if name not in self._registered_here])
            elif self._failure is not None:
                sub.push_down(self._failure, time.monotonic(), judge=False)

    def release(self, sub: Subscription) -> None:
        """Stop feeding ``sub`` and wake its reader (who may wait in another thread). Idempotent."""
        with self._cond:
            sub.stopped = True
            self._live()
            self._changed()

    def _live(self) -> list[Subscription]:
        """The subscriptions still fed, dropping stopped ones.

        A watch's generator stops its subscription without taking the lock (it may be finalized by
        the garbage collector in any thread, even one that holds the lock), so stopped ones are
        dropped here, lazily.
        """
        if any(sub.stopped for sub in self._subs):
            self._subs = [sub for sub in self._subs if not sub.stopped]
        return self._subs

    def take(self, sub: Subscription) -> Batch | None:
        with self._cond:
            return sub.take()

    def patience(
        self, sub: Subscription, reconnect_timeout: float | None
    ) -> tuple[float | None, DSPexError | None, float | None]:
        """``(seconds left to reconnect or None, the last error, since when the stream is down)`` of ``sub``."""
        with self._cond:
            return sub.patience(reconnect_timeout, time.monotonic()), sub.last_error, sub.down_since

    def _publish(self, update: VariableUpdate, var: Variable) -> bool:
        """Hand ``update`` to the subscriptions that want ``var``; whether any did."""
        wanted = False
        for sub in self._live():
            if sub.wants(var):
                sub.push_update(update)
                wanted = True
        return wanted

    # ------------------------------------------------------------------ fed by the stream

    def mark_down(self, error: DSPexError | None = None) -> None:
        """The stream broke (``error``) or the client closes (None): stop serving reads."""
        with self._cond:
            self._synced = False
            if error is not None:
                self._failure = error
                now = time.monotonic()
                for sub in self._live():
                    sub.push_down(error, now)
            self._changed()

    def resync_started(self) -> int:
        with self._cond:
            return self._seq

    def resync(self, variables: Iterable[Variable], seq: int) -> None:
        listed = list(variables)
        with self._cond:
            self._vars = {var.name: var for var in listed}
            self._specs.clear()
            self._provisional.clear()
            self._registered_here.clear()
            self._deleted_ids.clear()
            self._floors = {name: floor for name, floor in self._floors.items() if floor[1] > seq}
            self._touched = {name: mark for name, mark in self._touched.items() if mark > seq}
            self._failure = None
            self._synced = True
            for sub in self._live():
                sub.push_listing(listed)
            self._changed()

    def catch_up(self, variables: Iterable[Variable], seq: int, triggers: Sequence[VariableUpdate]) -> None:
        """Replace the cache by a listing taken after ``triggers`` (updates :meth:`apply_all` held back) arrived.

        The listing holds the triggers and every write before them, and is newer than anything the
        stream delivered before it. Only the worker's own writes since ``seq`` (the listing may
        predate them) keep their cached state where it is newer.
        """
        listed = list(variables)
        with self._cond:
            if not self._synced:
                return  # the stream broke meanwhile: the next resync lists again
            touched = {name for name, mark in self._touched.items() if mark > seq}
            fresh = {var.name: var for var in listed}
            for name in touched:
                entry, server = self._vars.get(name), fresh.get(name)
                if server is None:
                    if entry is not None:
                        fresh[name] = entry  # registered here after the listing
                elif entry is None:
                    if server.id in self._deleted_ids:
                        del fresh[name]  # deleted here after the listing
                elif entry.id == server.id:
                    if entry.version >= server.version:
                        fresh[name] = entry  # written here after the listing
                elif name in self._registered_here:
                    fresh[name] = entry
            for name, entry in self._vars.items():
                kept = fresh.get(name)
                if kept is None or kept.id != entry.id:
                    self._deleted_ids.add(entry.id)
            kept_own = {name for name in self._provisional if fresh.get(name) is self._vars.get(name)}
            self._vars = fresh
            self._provisional = kept_own
            self._registered_here &= kept_own
            self._touched = {name: self._touched[name] for name in touched}
            for trigger in triggers:
                if trigger.variable is not None:
                    self._publish(trigger, trigger.variable)
            self._changed()

    def apply(self, update: VariableUpdate, in_order: bool = True) -> bool:
        """Apply one streamed update and hand it to the subscriptions that want it.

        Returns True, doing nothing, when the update would change the cache (or, a deletion, be
        reported) but may have overtaken earlier writes (``in_order`` False): the caller then lists
        the variables and calls :meth:`catch_up`. An update older than the cache changes nothing
        and is still handed on (the cache already holds a later state of the whole session), so
        watches see every update of the stream, with its source and metadata.
        """
        return self.apply_all([(update, in_order)])

    def apply_all(self, updates: Sequence[tuple[VariableUpdate, bool]]) -> bool:
        """Apply the updates of one atomic batch together: a reader sees all of them or none.

        Each pair is an update and whether it arrived in write order. Returns True, applying
        nothing, when any of them must wait for a listing (see :meth:`apply`); the caller then
        calls :meth:`catch_up` with all of them.
        """
        with self._cond:
            if not self._synced:
                return False
            if any(self._held_back(update, in_order) for update, in_order in updates):
                return True
            changed = False
            for update, _ in updates:
                changed = self._apply_locked(update) or changed
            if changed:
                self._changed()
            return False

    def _held_back(self, update: VariableUpdate, in_order: bool) -> bool:
        """Whether ``update`` would change the cache (or be reported) but may have overtaken earlier writes."""
        var = update.variable
        if in_order or var is None or update.update_type == UpdateType.HEARTBEAT:
            return False
        entry = self._vars.get(var.name)
        if entry is not None and entry.id != var.id:
            return False
        if update.update_type == UpdateType.DELETED:
            return entry is not None or any(sub.wants(var) for sub in self._live())
        if var.id in self._deleted_ids:
            return False
        own = var.name in self._provisional
        changes = entry is None or var.version > entry.version or (var.version == entry.version and own)
        return changes or (own and any(sub.wants(var) for sub in self._live()))

    def _apply_locked(self, update: VariableUpdate) -> bool:
        """Apply one update known not to be held back (under the lock); True if anyone must be woken."""
        var = update.variable
        if var is None or update.update_type == UpdateType.HEARTBEAT:
            return False
        entry = self._vars.get(var.name)
        if entry is not None and entry.id != var.id:
            # A message of an older incarnation of that name, queued before it was replaced.
            if update.update_type == UpdateType.DELETED:
                self._deleted_ids.add(var.id)
            return False
        if update.update_type == UpdateType.DELETED:
            changes = entry is not None
            if not changes and not any(sub.wants(var) for sub in self._live()):
                self._deleted_ids.add(var.id)
                return False
            self._deleted_ids.add(var.id)
            if entry is not None:
                del self._vars[var.name]
                self._provisional.discard(var.name)
                self._registered_here.discard(var.name)
                self._floors.pop(var.name, None)
        else:
            if var.id in self._deleted_ids:
                return False
            own = var.name in self._provisional  # the worker's own write: ahead of the stream
            changes = entry is None or var.version > entry.version or (var.version == entry.version and own)
            if changes:
                self._vars[var.name] = var
                self._provisional.discard(var.name)
                self._registered_here.discard(var.name)
        return self._publish(update, var) or changes

    # ------------------------------------------------------------------ the worker's own writes

    def _own(self, name: str) -> None:
        self._seq += 1
        self._touched[name] = self._seq

    def own_register(self, var: Variable) -> None:
        with self._cond:
            self._own(var.name)
            entry = self._vars.get(var.name)
            if self._synced and (entry is None or entry.id != var.id):  # else the stream brought it first
                self._vars[var.name] = var
                self._provisional.add(var.name)
                self._registered_here.add(var.name)
                self._floors.pop(var.name, None)
                self._changed()

    def own_write(self, name: str, version: int, value: Any, metadata: Mapping[str, str]) -> None:
        with self._cond:
            self._own(name)
            entry = self._vars.get(name) if self._synced else None
            if entry is not None and entry.version < version:
                spec = self._specs.get(entry.id)
                try:
                    if spec is None:
                        spec = self._specs[entry.id] = compile_spec(entry.name, entry.type, entry.constraints)
                    normalised = spec.validate(value)
                except ValidationError:
                    pass  # the cached definition is stale: wait for the stream (floor below)
                else:
                    self._vars[name] = replace(
                        entry,
                        value=normalised,
                        version=version,
                        updated_at=time.time(),
                        source=WORKER,
                        metadata={**entry.metadata, **metadata},
                    )
                    self._provisional.add(name)
                    self._floors.pop(name, None)
                    self._changed()
                    return
            if entry is None or entry.version < version:
                current = self._floors.get(name)
                if current is None or current[0] < version:
                    self._floors[name] = (version, self._seq)

    def own_delete(self, name: str) -> None:
        with self._cond:
            self._own(name)
            entry = self._vars.pop(name, None)
            self._floors.pop(name, None)
            self._provisional.discard(name)
            self._registered_here.discard(name)
            if entry is not None:
                self._deleted_ids.add(entry.id)
                self._changed()
