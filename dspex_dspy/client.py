"""Worker-side access to a session: SessionContext (blocking) and AsyncSessionContext (grpc.aio).

A Python worker (DSPy code, a notebook) reads and writes the orchestrator's variables through the
bridge with one of these clients. Reads are served from a local cache kept current by a background
``WatchVariables`` stream — no fixed TTL — and the worker always reads its own writes. Every call
has a deadline and raises the :mod:`dspex_dspy.errors` exception the server reported.

How the cache stays correct:

- **Synced.** The feed opens ``WatchVariables`` (all variables, initial values included). The
  server registers the watcher before it sends anything, so the first message of any kind proves
  that no later write can be missed. The feed then lists the variables (``ListVariables``) and
  that listing *replaces* the cache: from then on the cache is "synced" and serves reads. Messages
  already queued from before the listing are older and are ignored. (Waiting for "the end of the
  initial snapshot" instead would be wrong: the server coalesces pending updates per variable, so
  snapshot and change messages interleave.) An empty session sends nothing until its first
  variable or heartbeat, and until then reads simply go to the server.
- **Never backwards.** Per variable id, an update replaces the cached record only if its version
  is higher; updates for a deleted id, or for another id than the cached one under that name (a
  stale incarnation), are dropped.
- **Read-your-writes.** A write's answer updates the cache at once. If the cache is not synced at
  that moment, the write leaves a *floor* (name, version): reads of that name bypass the cache
  until it holds that version; a resync drops the floors of writes that finished before its
  listing was taken (the listing includes them).
- **Always a state the server was in.** The server keeps one pending update per variable and
  replaces it in place when the variable is written again, so an update can overtake earlier
  writes of other variables (pending ``[done=False, temperature]`` becomes ``[done=True,
  temperature]``). The feed applies an update at once only when it is provably in write order
  (the variable's next version after the last one this stream delivered, a creation, an initial
  value, or a deletion at the last version seen); any other update that would change the cache
  is applied together with a fresh listing (``ListVariables``, taken after the update arrived),
  which holds that update and every write before it. Only the worker's own newer writes are kept
  over the listing.
- **Down = bypassed.** As soon as the stream breaks the cache stops serving; reads go to the server
  until a reconnect (backoff 0.05 s doubling to 2 s) has resynced. ``cache=False`` turns the cache
  off.

``watch_variables`` yields :class:`WatchEvent` records. With the cache on, it is served from the
cache's own stream: each update is handed to the watches only after the cache applied it (or
already held a later state), so a watch is never ahead of the cache — **read-after-watch**: after
``watch_variables`` yields an event, cached reads return that version or newer for that variable
and reflect every write the server applied before it. A watch then opens no stream of its own.
With ``cache=False`` each watch opens its own ``WatchVariables`` stream, as before.

Either way a watch survives broken streams and server restarts: after each (re)connect the
variables are listed, so the last event per variable is its latest state (and a variable that
vanished while the stream was down is reported ``deleted``). Repeats are filtered per variable
**name**: an update is yielded only if its version is higher than the last one yielded for that
name, or if it belongs to a new incarnation of the name — after a ``deleted``, or with another
``created_at`` (ids are not stable across a server restart, a creation time is; a state
re-imported with its versions and creation times is the same incarnation, so nothing is
repeated). A slow reader gets coalesced updates (always ending on the latest), never an unbounded
backlog. Heartbeats are never yielded.

Copies and pickles: ``copy.deepcopy`` (as DSPy optimizers deep-copy modules) returns the same
client, so copies share the live session; pickling stores the address, session id and options and
reconnects on unpickling.

Event loops: grpc.aio objects belong to the event loop that created them. An
:class:`AsyncSessionContext` creates its channel and its cache task lazily, inside the running loop
of its first call, and refuses use from another loop while that one is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeVar

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import (
    BatchUpdateError,
    BridgeUnavailableError,
    DSPexError,
    SessionNotFoundError,
    ValidationError,
    VariableNotFoundError,
)
from dspex_dspy.leases import DEFAULT_LEASE_SECONDS, OptimizationLease
from dspex_dspy.remote import (
    CHANNEL_OPTIONS,
    DEFAULT_CALL_TIMEOUT,
    BridgeCall,
    BridgeCalls,
    RemoteStore,
    open_channel,
    registered_variable,
)
from dspex_dspy.store import BatchResult, UpdateType, VariableUpdate
from dspex_dspy.tls import ChannelSecurity, Pem, resolve_security, secure_aio_channel
from dspex_dspy.types import OptimizationStatus, Variable, VariableSpec, compile_spec, normalize_metadata
from dspex_dspy.wire import error_from_rpc, proto_to_update

__all__ = [
    "ADDRESS_ENV",
    "AsyncSessionContext",
    "AsyncVariableWatch",
    "SessionContext",
    "VariableWatch",
    "WatchEvent",
]

logger = logging.getLogger(__name__)

ADDRESS_ENV: Final = "DSPEX_BRIDGE_ADDRESS"
"""The environment variable naming the bridge address when ``connect`` is given none."""

WORKER: Final = "worker"
DEFAULT_RECONNECT_TIMEOUT: Final = 30.0
_BACKOFF_INITIAL: Final = 0.05
_BACKOFF_MAX: Final = 2.0
# Two records of one name are the same incarnation if created within this many seconds of each
# other: creation times survive a round trip through the wire only to about a microsecond.
_SAME_CREATION: Final = 1e-3

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Records and pure helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchEvent:
    """One change of one variable, as :meth:`SessionContext.watch_variables` yields it.

    Attributes:
        name: the variable's name.
        value: its value after the change (for ``deleted``: its last value).
        version: its version after the change (for ``deleted``: its last version).
        update_type: ``initial_value``, ``value_change`` or ``deleted``.
        source: who made the change (``orchestrator`` / ``worker``).
        timestamp: wall-clock seconds since the epoch.
        variable_id: the variable's id on the server.
        metadata: the metadata given with the write.
        optimization_status: the optimization lease holding the variable at that version, or None.
    """

    name: str
    value: Any
    version: int
    update_type: str
    source: str
    timestamp: float
    variable_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    optimization_status: OptimizationStatus | None = None


def _detached(value: Any) -> Any:
    """A copy of a mutable value (embedding list, tensor dict) so callers cannot change the cache."""
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return {"shape": list(value["shape"]), "data": list(value["data"])}
    return value


def _resolve_address(address: str | None) -> str:
    resolved = address or os.environ.get(ADDRESS_ENV, "")
    if not resolved:
        raise BridgeUnavailableError(
            f"no bridge address: pass address='host:port' or set the {ADDRESS_ENV} environment variable"
        )
    return resolved


def _check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise ValidationError("", "session_id", session_id, "a session id (a non-empty string) is required")
    return session_id


class _Backoff:
    """Reconnect delays: 0.05 s doubling up to 2 s, with a little jitter so workers do not stampede."""

    def __init__(self) -> None:
        self._next = _BACKOFF_INITIAL

    def reset(self) -> None:
        self._next = _BACKOFF_INITIAL

    def next(self) -> float:
        delay = min(_BACKOFF_MAX, self._next * (1.0 + 0.2 * random.random()))
        self._next = min(_BACKOFF_MAX, self._next * 2)
        return delay


@dataclass
class _Seen:
    created_at: float
    version: int
    value: Any
    variable_id: str
    deleted: bool = False


class _WatchTracker:
    """Turns the messages and listings of successive watch connections into events without repeats.

    Per variable name it remembers the last event yielded: creation time, version, deleted or not.
    An update is yielded only if it is new — a higher version of the same incarnation, or a new
    incarnation (after a ``deleted``, or with another ``created_at``). After each (re)connect a
    listing brings every variable to its latest version and reports, as ``deleted``, those that
    disappeared while the stream was down. Heartbeats are dropped.

    With ``include_initial=False`` the first connection's snapshot and listing only set the
    baseline; later changes are yielded.
    """

    def __init__(self, identifiers: Sequence[str], include_initial: bool) -> None:
        self._wanted = frozenset(identifiers) or None
        self._seen: dict[str, _Seen] = {}
        self._baseline = not include_initial

    def _is_new(self, var: Variable) -> bool:
        seen = self._seen.get(var.name)
        return (
            seen is None
            or seen.deleted
            or abs(seen.created_at - var.created_at) > _SAME_CREATION
            or var.version > seen.version
        )

    def _remember(self, var: Variable, *, deleted: bool = False) -> None:
        self._seen[var.name] = _Seen(var.created_at, var.version, var.value, var.id, deleted)

    def on_update(self, update: VariableUpdate) -> WatchEvent | None:
        """The event for one streamed update, or None if it is a heartbeat, a repeat or an old version."""
        var = update.variable
        if var is None or update.update_type == UpdateType.HEARTBEAT:
            return None
        if update.update_type == UpdateType.DELETED:
            seen = self._seen.get(var.name)
            if seen is not None and seen.deleted and abs(seen.created_at - var.created_at) <= _SAME_CREATION:
                return None
            self._remember(var, deleted=True)
        else:
            if not self._is_new(var):
                return None
            self._remember(var)
            if self._baseline and update.update_type == UpdateType.INITIAL_VALUE:
                return None
        return WatchEvent(
            var.name,
            _detached(var.value),
            var.version,
            update.update_type,
            update.source,
            update.timestamp,
            var.id,
            dict(update.metadata),
            var.optimization_status,
        )

    def on_listing(self, variables: Iterable[Variable]) -> list[WatchEvent]:
        """Events that bring every watched variable to the listed state (taken after the stream opened)."""
        events: list[WatchEvent] = []
        listed: set[str] = set()
        for var in variables:
            if self._wanted is not None and var.name not in self._wanted and var.id not in self._wanted:
                continue
            listed.add(var.name)
            if not self._is_new(var):
                continue
            # A variable seen before (same incarnation) caught up by the listing has changed.
            seen = self._seen.get(var.name)
            changed = seen is not None and not seen.deleted and abs(seen.created_at - var.created_at) <= _SAME_CREATION
            self._remember(var)
            if not self._baseline:
                events.append(
                    WatchEvent(
                        var.name,
                        _detached(var.value),
                        var.version,
                        UpdateType.VALUE_CHANGE if changed else UpdateType.INITIAL_VALUE,
                        var.source,
                        var.updated_at,
                        var.id,
                        {},
                        var.optimization_status,
                    )
                )
        now = time.time()
        for name, seen in self._seen.items():
            if seen.deleted or name in listed:
                continue
            seen.deleted = True
            if not self._baseline:
                events.append(
                    WatchEvent(name, _detached(seen.value), seen.version, UpdateType.DELETED, "", now, seen.variable_id)
                )
        self._baseline = False
        return events


class _StreamOrder:
    """Tells, message by message, whether one watch stream delivered an update in write order.

    The server keeps at most one pending update per variable, and a newer write *replaces* a
    pending one in its place in line. So an update can overtake writes of other variables made
    before it: pending ``[done=False, temperature]`` becomes ``[done=True, temperature]``, and
    ``done=True`` arrives before the earlier temperature. An update is certainly in order when no
    replacement can have happened: the variable's next version after the last message of this
    stream (or its first version, or an initial value, or a deletion at the last version seen),
    since then it was queued when it was written, behind every earlier write.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def in_order(self, update: VariableUpdate) -> bool:
        var = update.variable
        if var is None or update.update_type == UpdateType.HEARTBEAT:
            return True
        if update.update_type == UpdateType.DELETED:
            return self._last.pop(var.id, None) == var.version
        last = self._last.get(var.id)
        self._last[var.id] = var.version
        if update.update_type == UpdateType.INITIAL_VALUE:
            return True
        return var.version == (1 if last is None else last + 1)


@dataclass
class _Batch:
    """What a cache-fed watch takes at once: updates, then a listing (a resync), then later updates."""

    before: list[VariableUpdate]
    listing: list[Variable] | None
    after: list[VariableUpdate]
    fatal: DSPexError | None

    def events(self, tracker: _WatchTracker) -> list[WatchEvent]:
        events = [event for update in self.before if (event := tracker.on_update(update)) is not None]
        if self.listing is not None:
            events += tracker.on_listing(self.listing)
        events += [event for update in self.after if (event := tracker.on_update(update)) is not None]
        return events


class _Subscription:
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
        if judge and _watch_is_over(error, live=self.connected, ever_connected=self.ever_connected):
            self.fatal = error
            return
        self.connected = False
        self.last_error = error
        if self.down_since is None:
            self.down_since = now

    def ready(self) -> bool:
        return bool(self.before or self.listing is not None or self.after or self.fatal or self.stopped)

    def take(self) -> _Batch | None:
        if not (self.before or self.listing is not None or self.after or self.fatal):
            return None
        batch = _Batch(list(self.before.values()), self.listing, list(self.after.values()), self.fatal)
        self.before, self.listing, self.after = {}, None, {}
        return batch

    def patience(self, reconnect_timeout: float | None, now: float) -> float | None:
        """Seconds left to wait for a reconnect (None: no limit); <= 0 once it is overdue."""
        if self.down_since is None or reconnect_timeout is None:
            return None
        return self.down_since + reconnect_timeout - now


class _VariableCache:
    """The worker's copy of a session's variables, fed by a watch stream (see the module docstring).

    Thread-safe. ``lookup`` answers only when the cache is synced and fresh for that name; None
    means "ask the server". The cache also feeds the client's ``watch_variables`` subscriptions:
    each update is handed to them only after it is applied, and an update that may have overtaken
    earlier writes (see :class:`_StreamOrder`) is applied only together with a listing taken after
    it arrived (:meth:`catch_up`). So what the cache holds is always a state the server was in,
    and a watch is never ahead of it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._vars: dict[str, Variable] = {}
        self._specs: dict[str, VariableSpec] = {}
        self._provisional: set[str] = set()
        self._registered_here: set[str] = set()
        self._deleted_ids: set[str] = set()
        self._floors: dict[str, tuple[int, int]] = {}
        self._touched: dict[str, int] = {}
        self._subs: list[_Subscription] = []
        self._failure: DSPexError | None = None
        self._synced = False
        self._seq = 0
        self.on_change: Callable[[], None] | None = None

    @property
    def synced(self) -> bool:
        return self._synced

    def _changed(self) -> None:
        self._cond.notify_all()
        if self.on_change is not None:
            self.on_change()

    def lookup(self, name: str) -> Variable | None:
        with self._cond:
            return self._lookup(name)

    def _lookup(self, name: str) -> Variable | None:
        if not self._synced:
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
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # ------------------------------------------------------------------ watch subscriptions

    def subscribe(self, sub: _Subscription) -> None:
        """Start feeding ``sub``: at once with the cached state if synced, else from the next resync."""
        with self._cond:
            self._live().append(sub)
            if self._synced:
                # Own registrations carry a local creation time until the stream confirms them.
                sub.push_listing([var for name, var in self._vars.items() if name not in self._registered_here])
            elif self._failure is not None:
                sub.push_down(self._failure, time.monotonic(), judge=False)

    def release(self, sub: _Subscription) -> None:
        """Stop feeding ``sub`` and wake its reader (who may wait in another thread). Idempotent."""
        with self._cond:
            sub.stopped = True
            self._live()
            self._changed()

    def _live(self) -> list[_Subscription]:
        """The subscriptions still fed, dropping stopped ones.

        A watch's generator stops its subscription without taking the lock (it may be finalized by
        the garbage collector in any thread, even one that holds the lock), so stopped ones are
        dropped here, lazily.
        """
        if any(sub.stopped for sub in self._subs):
            self._subs = [sub for sub in self._subs if not sub.stopped]
        return self._subs

    def take(self, sub: _Subscription) -> _Batch | None:
        with self._cond:
            return sub.take()

    def patience(
        self, sub: _Subscription, reconnect_timeout: float | None
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

    def catch_up(self, variables: Iterable[Variable], seq: int, trigger: VariableUpdate) -> None:
        """Replace the cache by a listing taken after ``trigger`` (an update :meth:`apply` held back) arrived.

        The listing holds ``trigger`` and every write before it, and is newer than anything the
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
        var = update.variable
        if var is None or update.update_type == UpdateType.HEARTBEAT:
            return False
        with self._cond:
            if not self._synced:
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
                if not in_order:
                    return True
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
                if not in_order and (changes or (own and any(sub.wants(var) for sub in self._live()))):
                    return True
                if changes:
                    self._vars[var.name] = var
                    self._provisional.discard(var.name)
                    self._registered_here.discard(var.name)
            if self._publish(update, var) or changes:
                self._changed()
            return False

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


class _Streams:
    """The open streaming calls of one client, so that ``close()`` can cancel them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early (and returning True) if the client closes."""
        return self._closed.wait(timeout)

    def add(self, call: Any) -> None:
        with self._lock:
            if not self._closed.is_set():
                self._open.add(call)
                return
        call.cancel()

    def discard(self, call: Any) -> None:
        with self._lock:
            self._open.discard(call)

    def cancel_all(self) -> None:
        with self._lock:
            self._closed.set()
            calls, self._open = list(self._open), set()
        for call in calls:
            call.cancel()


def _watch_error(exc: BaseException, identifiers: Sequence[str], session_id: str) -> DSPexError:
    if isinstance(exc, DSPexError):
        return exc
    if isinstance(exc, grpc.RpcError):
        return error_from_rpc(exc, identifier=", ".join(identifiers), session_id=session_id)
    return BridgeUnavailableError(f"the watch stream failed: {exc}")


def _watch_is_over(error: DSPexError, *, live: bool, ever_connected: bool) -> bool:
    """Whether a watch should raise ``error`` instead of reconnecting.

    A session or variable that is not found ends the watch when it happened on a live connection
    (the session was cleaned up) or before any connection succeeded (a wrong id); while
    reconnecting it may just not be re-created yet, so the watch keeps trying. Errors other than
    "not found" and "unavailable" (a bad identifier, too many watchers) always end it.
    """
    if isinstance(error, (SessionNotFoundError, VariableNotFoundError)):
        return live or not ever_connected
    return not isinstance(error, BridgeUnavailableError)


def _unlisted(identifiers: Sequence[str], listing: Iterable[Variable]) -> list[str]:
    """The identifiers that name no variable of ``listing`` (by name or id)."""
    known = {key for var in listing for key in (var.name, var.id)}
    return [ident for ident in dict.fromkeys(identifiers) if ident not in known]


def _woken(sub: _Subscription, since: float | None, stopped: Callable[[], bool]) -> Callable[[], bool]:
    """When a cache-fed watch waiting with ``sub.down_since == since`` should look again."""
    return lambda: sub.ready() or stopped() or sub.down_since != since


def _reconnect_failed(error: DSPexError | None, ctx: _ClientCore) -> DSPexError:
    return error or BridgeUnavailableError(
        f"the watch of session {ctx.session_id} could not reconnect within {ctx.reconnect_timeout:g} s"
    )


class _ClientCore:
    """What the blocking and the asyncio clients share: identity, options, the cache and its upkeep."""

    def __init__(
        self,
        session_id: str,
        *,
        address: str | None,
        cache: bool,
        call_timeout: float,
        reconnect_timeout: float | None,
    ) -> None:
        if call_timeout <= 0:
            raise ValueError(f"call_timeout must be positive, got {call_timeout}")
        self.session_id = _check_session_id(session_id)
        self.address = address
        self.call_timeout = float(call_timeout)
        self.reconnect_timeout = reconnect_timeout
        self._cache = _VariableCache() if cache else None
        self._streams = _Streams()

    @property
    def cache_enabled(self) -> bool:
        """Whether reads may be served from the watch-fed cache."""
        return self._cache is not None

    @property
    def cache_synced(self) -> bool:
        """Whether the cache is live and serving reads now."""
        return self._cache is not None and self._cache.synced

    @property
    def closed(self) -> bool:
        """True once the client was closed."""
        return self._streams.closed

    def cached(self, name: str) -> tuple[Any, int] | None:
        """``(value, version)`` of ``name`` from the cache alone; None if not cached, not fresh or not synced.

        Never performs I/O (safe from any thread).
        """
        var = self._cache.lookup(name) if self._cache is not None else None
        return (_detached(var.value), var.version) if var is not None else None

    # How the channel is secured (TLS, token); connect() and the asyncio client set it.
    security: ChannelSecurity = ChannelSecurity()

    def _options(self) -> dict[str, Any]:
        secured = {k: v for k, v in vars(self.security).items() if v is not None}
        return {
            "cache": self._cache is not None,
            "call_timeout": self.call_timeout,
            "reconnect_timeout": self.reconnect_timeout,
            **secured,
        }

    def _pickle_address(self) -> str:
        if self.address is None:
            raise TypeError(
                f"cannot pickle a {type(self).__name__} made from a stub without an address: "
                "pass address='host:port' when creating it (or use connect())"
            )
        return self.address

    def _type_hint(self, name: str) -> str | None:
        return self._cache.type_of(name) if self._cache is not None else None

    # ------------------------------------------------------------------ calls and their after-effects

    def _register_call(
        self,
        name: str,
        type_: str,
        value: Any,
        constraints: Mapping[str, Any] | None,
        description: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> BridgeCall[str]:
        return BridgeCalls.register_variable(
            self.session_id,
            name,
            type_,
            value,
            constraints=constraints,
            description=description or "",
            metadata=metadata,
            source=WORKER,
        )

    def _registered(
        self,
        var_id: str,
        name: str,
        type_: str,
        value: Any,
        constraints: Mapping[str, Any] | None,
        description: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> str:
        if self._cache is not None:
            self._cache.own_register(
                registered_variable(var_id, name, type_, value, constraints, description, metadata, WORKER)
            )
        return var_id

    def _set_call(
        self, name: str, value: Any, metadata: Mapping[str, Any] | None, expected_version: int | None
    ) -> BridgeCall[int]:
        return BridgeCalls.set_variable(
            self.session_id,
            name,
            value,
            type_hint=self._type_hint(name),
            metadata=metadata,
            expected_version=expected_version,
            source=WORKER,
        )

    def _written(self, name: str, version: int, value: Any, metadata: Mapping[str, Any] | None) -> int:
        if self._cache is not None:
            self._cache.own_write(name, version, value, normalize_metadata(name, metadata))
        return version

    def _batch_call(
        self, updates: Mapping[str, Any], atomic: bool, metadata: Mapping[str, Any] | None
    ) -> BridgeCall[BatchResult]:
        hints = {name: hint for name in updates if (hint := self._type_hint(name)) is not None}
        return BridgeCalls.set_variables(
            self.session_id, updates, type_hints=hints, metadata=metadata, atomic=atomic, source=WORKER
        )

    def _batch_written(
        self, result: BatchResult, updates: Mapping[str, Any], metadata: Mapping[str, Any] | None
    ) -> dict[str, int]:
        for name, version in result.new_versions.items():
            self._written(name, version, updates[name], metadata)
        if result.errors:
            raise BatchUpdateError(result.errors, result.new_versions)
        return dict(result.new_versions)

    def _deleted(self, name: str) -> None:
        if self._cache is not None:
            self._cache.own_delete(name)

    def _values(self, found: Mapping[str, Variable], missing: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
        if missing:
            raise VariableNotFoundError(", ".join(missing), self.session_id)
        return {name: _detached(found[name].value) for name in names}


# --------------------------------------------------------------------------------------------
# Blocking client
# --------------------------------------------------------------------------------------------


def _feed_cache(remote: RemoteStore, session_id: str, cache: _VariableCache, streams: _Streams) -> None:
    """The cache feed thread: watch every variable, resync after each (re)connect, until closed.

    It holds no reference to its SessionContext, so an abandoned context can still be collected.
    """
    request = pb.WatchVariablesRequest(session_id=session_id, include_initial_values=True)
    backoff = _Backoff()
    while not streams.closed:
        stream: Any = None
        error: DSPexError = BridgeUnavailableError(f"the cache watch of session {session_id} ended")
        try:
            stream = remote.stub.WatchVariables(request, metadata=(("source", WORKER),))
            streams.add(stream)
            order = _StreamOrder()
            # The first message proves the watcher registered: nothing written from now on can be missed.
            order.in_order(proto_to_update(next(stream)))
            seq = cache.resync_started()
            listing = remote.call(BridgeCalls.list_variables(session_id))
            cache.resync(listing, seq)
            backoff.reset()
            for message in stream:
                update = proto_to_update(message)
                if cache.apply(update, order.in_order(update)):
                    seq = cache.resync_started()
                    listing = remote.call(BridgeCalls.list_variables(session_id))
                    cache.catch_up(listing, seq, update)
        except (grpc.RpcError, DSPexError) as exc:
            error = _watch_error(exc, (), session_id)
            if not streams.closed:
                logger.debug("cache watch of session %s broke: %s", session_id, exc)
        except (StopIteration, ValueError) as exc:
            if not streams.closed:
                logger.debug("cache watch of session %s broke: %s", session_id, exc)
        except Exception:
            logger.exception("cache watch of session %s failed", session_id)
        finally:
            cache.mark_down(None if streams.closed else error)
            if stream is not None:
                streams.discard(stream)
                stream.cancel()
        if streams.wait_closed(backoff.next()):
            return


class SessionContext(_ClientCore):
    """A worker's blocking, thread-safe handle on one session of a bridge.

    Two ways to make one: ``SessionContext(stub, session_id)`` with a ``BridgeServiceStub`` you
    built (the snakepit form; the cache watches through the same stub), or
    :meth:`SessionContext.connect` with an address (``DSPEX_BRIDGE_ADDRESS`` by default).

    Consistency with the cache on (the default):

    - read-your-writes: after a write returns, reads return that version or newer;
    - read-after-watch: after :meth:`watch_variables` yields an event, cached reads return that
      version or newer for that variable and reflect every write the server applied before it
      (e.g. watch ``optimization_done``; once it is True, ``get_variable("temperature")`` sees
      the temperature written before it). The watch is fed by the cache's own stream.

    Args:
        stub: a blocking ``snakepit.bridge.BridgeService`` stub.
        session_id: the session to work in.
        cache: serve reads from a watch-fed local cache (see the module docstring).
        call_timeout: the deadline of each unary call, in seconds.
        reconnect_timeout: how long :meth:`watch_variables` keeps trying to reconnect before it
            raises (None: for ever). The cache itself retries until :meth:`close`.
        address: ``"host:port"`` of the server, needed for pickling.
        channel: the channel under ``stub``; closed by :meth:`close` when given.

    Example:
        >>> with SessionContext.connect("127.0.0.1:50051", session_id="ctx_1") as ctx:  # doctest: +SKIP
        ...     ctx["temperature"]
        ...     ctx.set_variable("temperature", 0.9)
        0.7
        2
    """

    def __init__(
        self,
        stub: Any,
        session_id: str,
        *,
        cache: bool = True,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        address: str | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        super().__init__(
            session_id, address=address, cache=cache, call_timeout=call_timeout, reconnect_timeout=reconnect_timeout
        )
        self.stub = stub
        self._remote = RemoteStore(stub, channel=channel, address=address, call_timeout=call_timeout)
        self._feed: threading.Thread | None = None
        if self._cache is not None:
            self._feed = threading.Thread(
                target=_feed_cache,
                args=(self._remote, self.session_id, self._cache, self._streams),
                name=f"dspex-cache-{self.session_id[:24]}",
                daemon=True,
            )
            self._feed.start()

    @classmethod
    def connect(
        cls,
        address: str | None = None,
        session_id: str | None = None,
        *,
        cache: bool = True,
        timeout: float = 5.0,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        root_certificates: Pem | None = None,
        token: str | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
    ) -> SessionContext:
        """Connect to the bridge at ``address`` and check that the session exists.

        Args:
            address: ``"host:port"``; defaults to the ``DSPEX_BRIDGE_ADDRESS`` environment variable.
            session_id: the session to work in (an orchestrator context's ``ctx.id``).
            cache: serve reads from the watch-fed cache.
            timeout: seconds to wait for the connection.
            call_timeout: the deadline of each later call.
            reconnect_timeout: see the class.
            root_certificates: PEM roots to trust (default ``DSPEX_BRIDGE_CA``): the channel uses TLS.
            token: a bearer token for every call (default ``DSPEX_BRIDGE_TOKEN``).
            certificate_chain: a client certificate (PEM), for bridges that require mutual TLS.
            private_key: the key of that client certificate.

        Raises:
            BridgeUnavailableError: no address, or nothing answered within ``timeout``.
            SessionNotFoundError: the bridge has no such session.
        """
        sid = _check_session_id(session_id)
        resolved = _resolve_address(address)
        security = resolve_security(
            root_certificates, token, certificate_chain=certificate_chain, private_key=private_key
        )
        channel = open_channel(resolved, timeout=timeout, **vars(security))
        try:
            RemoteStore(pb_grpc.BridgeServiceStub(channel), call_timeout=call_timeout).get_session(sid)
        except BaseException:
            channel.close()
            raise
        ctx = cls(
            pb_grpc.BridgeServiceStub(channel),
            sid,
            cache=cache,
            call_timeout=call_timeout,
            reconnect_timeout=reconnect_timeout,
            address=resolved,
            channel=channel,
        )
        ctx.security = security
        return ctx

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """End the cache feed and every watch, and close the channel (if this client opened it). Idempotent."""
        if self._streams.closed:
            return
        self._streams.cancel_all()
        if self._cache is not None:
            self._cache.mark_down()
        if self._feed is not None and self._feed is not threading.current_thread():
            self._feed.join(timeout=self.call_timeout)
        self._remote.close()

    def __enter__(self) -> SessionContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        streams = self.__dict__.get("_streams")
        if streams is not None and not streams.closed:
            streams.cancel_all()

    def __copy__(self) -> SessionContext:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> SessionContext:
        return self

    def __reduce__(self) -> tuple[Callable[..., SessionContext], tuple[str, str, dict[str, Any]]]:
        return _reconnect, (self._pickle_address(), self.session_id, self._options())

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("synced" if self.cache_synced else "live")
        return f"SessionContext(session_id={self.session_id!r}, address={self.address!r}, {state})"

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until the cache serves reads (or ``timeout`` seconds pass); False if it did not.

        Always False with ``cache=False``.
        """
        cache = self._cache
        if cache is None:
            return False
        return cache.wait(lambda: cache.synced or self.closed, timeout) and cache.synced

    def wait_cached(self, name: str, version: int, timeout: float | None = None) -> bool:
        """Block until the cache serves ``name`` at ``version`` or later; False on timeout."""
        cache = self._cache
        if cache is None:
            return False

        def arrived() -> bool:
            var = cache._lookup(name)
            return self.closed or (var is not None and var.version >= version)

        return cache.wait(arrived, timeout) and not self.closed

    # ------------------------------------------------------------------ reads

    def _call(self, call: BridgeCall[_T]) -> _T:
        return self._remote.call(call)

    def get_variable_record(self, name: str) -> Variable:
        """The whole :class:`~dspex_dspy.types.Variable` record of ``name`` (cache first)."""
        var = self._cache.lookup(name) if self._cache is not None else None
        if var is None:
            var = self._call(BridgeCalls.get_variable(self.session_id, name))
        return replace(var, value=_detached(var.value)) if isinstance(var.value, (list, dict)) else var

    def get_versioned(self, name: str) -> tuple[Any, int]:
        """``(value, version)`` of a variable: from the cache when it is synced and fresh, else the server.

        Raises:
            VariableNotFoundError: no such variable.
        """
        var = self._cache.lookup(name) if self._cache is not None else None
        if var is None:
            var = self._call(BridgeCalls.get_variable(self.session_id, name))
        return _detached(var.value), var.version

    def get_variable(self, name: str) -> Any:
        """The current value of a variable (``ctx[name]`` does the same).

        Raises:
            VariableNotFoundError: no such variable.
        """
        return self.get_versioned(name)[0]

    def __getitem__(self, name: str) -> Any:
        return self.get_versioned(name)[0]

    def has_variable(self, name: str) -> bool:
        """Whether the session has a variable of that name (or id)."""
        if self._cache is not None and self._cache.lookup(name) is not None:
            return True
        try:
            self._call(BridgeCalls.get_variable(self.session_id, name))
        except VariableNotFoundError:
            return False
        return True

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.has_variable(name)

    def get_variables(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of several variables, in one round trip when the cache cannot answer them all.

        Raises:
            VariableNotFoundError: naming every variable that does not exist.
        """
        wanted = list(dict.fromkeys(names))
        hit = self._cache.lookup_many(wanted) if self._cache is not None else None
        if hit is not None:
            return {name: _detached(var.value) for name, var in hit.items()}
        found, missing = self._call(BridgeCalls.get_variables(self.session_id, wanted))
        return self._values(found, missing, wanted)

    def list_variables(self, pattern: str | None = None) -> list[Variable]:
        """The session's variables in creation order (always from the server); ``pattern`` is a ``*`` glob."""
        return self._call(BridgeCalls.list_variables(self.session_id, pattern))

    # ------------------------------------------------------------------ writes

    def register_variable(
        self,
        name: str,
        type: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Define a new variable in the session and return its id.

        Raises:
            VariableExistsError: the name is taken.
            ValidationError: bad name, type, constraints or value.
        """
        var_id = self._call(self._register_call(name, type, value, constraints, description, metadata))
        return self._registered(var_id, name, type, value, constraints, description, metadata)

    def set_variable(
        self,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Write a variable and return its new version; the cache shows the write at once.

        Args:
            name: the variable's name (or id).
            value: the new value (checked by the server against the type and constraints).
            metadata: ``str -> str`` merged into the variable's metadata.
            expected_version: a non-zero version makes the write a compare-and-swap.

        Raises:
            ValidationError: the value is rejected; nothing changed.
            VersionConflictError: ``expected_version`` is not the current version; nothing changed.
            VariableNotFoundError: no such variable.
        """
        version = self._call(self._set_call(name, value, metadata, expected_version))
        return self._written(name, version, value, metadata)

    def update_variable(
        self,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Alias of :meth:`set_variable` (the snakepit name)."""
        return self.set_variable(name, value, metadata=metadata, expected_version=expected_version)

    def update_variables(
        self, updates: Mapping[str, Any], *, atomic: bool = True, metadata: Mapping[str, Any] | None = None
    ) -> dict[str, int]:
        """Write several variables; return ``{name: new version}``.

        Args:
            updates: name -> new value.
            atomic: all or nothing (default); False applies every write that is valid.
            metadata: merged into each written variable's metadata.

        Raises:
            BatchUpdateError: some writes were rejected; ``.errors`` maps each to its error and
                ``.new_versions`` lists the writes applied (none when atomic).
        """
        result = self._call(self._batch_call(updates, atomic, metadata))
        return self._batch_written(result, updates, metadata)

    def delete_variable(self, name: str) -> None:
        """Delete a variable (watchers see ``deleted``).

        Raises:
            VariableNotFoundError: no such variable.
        """
        self._call(BridgeCalls.delete_variable(self.session_id, name, source=WORKER))
        self._deleted(name)

    def start_optimization(
        self, names: Sequence[str], optimizer_id: str, *, ttl: float = DEFAULT_LEASE_SECONDS
    ) -> OptimizationLease:
        """Take (or renew) an optimization lease on ``names``; see ``Variables.start_optimization``.

        Raises:
            VariableLockedError: another optimizer holds one of the variables (nothing changes).
        """
        return self._call(BridgeCalls.start_optimization(self.session_id, list(names), optimizer_id, ttl=ttl))

    def stop_optimization(self, lease: OptimizationLease | str, *, force: bool = False) -> None:
        """End a lease (the lease or its id), or with ``force=True`` the lease holding a variable."""
        target = lease.id if isinstance(lease, OptimizationLease) else lease
        self._call(BridgeCalls.stop_optimization(self.session_id, target, force=force))

    # ------------------------------------------------------------------ watching

    def watch_variables(self, names: Iterable[str] | None = None, include_initial: bool = True) -> VariableWatch:
        """Iterate over changes of some variables (None: all), across reconnects, without repeats.

        Args:
            names: names or ids to watch; None or empty watches every variable, including new ones.
            include_initial: first yield each variable's current value (``initial_value``).

        Returns:
            A :class:`VariableWatch`: iterate it; stop it with ``close()`` (from any thread),
            by closing this context, or by leaving its ``with`` block.

        With the cache on, the watch is fed by the cache's stream (read-after-watch: once an event
        is yielded, cached reads are at least as new, for every variable). A watched name that is
        deleted is reported ``deleted``; a variable created again under it is a new incarnation.

        Example:
            >>> with ctx.watch_variables(["temperature"]) as watch:  # doctest: +SKIP
            ...     for event in watch:
            ...         print(event.name, event.value, event.version)
        """
        return VariableWatch(self, list(names or ()), include_initial)


def _reconnect(address: str, session_id: str, options: dict[str, Any]) -> SessionContext:
    """Unpickle a :class:`SessionContext`: connect again with the same address, session and options."""
    return SessionContext.connect(address, session_id, **options)


class VariableWatch(Iterator[WatchEvent]):
    """The iterator :meth:`SessionContext.watch_variables` returns (see there).

    Per variable it yields strictly increasing versions and never a repeat, also across broken
    streams and server restarts, and after a resync the last event of each variable is its latest
    value. It raises :class:`VariableNotFoundError` for a watched name the session does not have,
    :class:`SessionNotFoundError` if the session goes away on a live server, and the last error if
    reconnecting takes longer than the context's ``reconnect_timeout``. With the cache on it never
    runs ahead of the cache (see :class:`SessionContext`).
    """

    def __init__(self, ctx: SessionContext, identifiers: list[str], include_initial: bool) -> None:
        self._ctx = ctx
        self._identifiers = identifiers
        self._include_initial = include_initial
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._sub: _Subscription | None = None
        cache = ctx._cache
        self._events = self._run_cached(cache) if cache is not None else self._run_stream()

    def __iter__(self) -> VariableWatch:
        return self

    def __next__(self) -> WatchEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop the watch (thread-safe; iteration then ends). Idempotent."""
        self._stop.set()
        with self._lock:
            stream, sub = self._stream, self._sub
        if stream is not None:
            stream.cancel()
        if sub is not None and self._ctx._cache is not None:
            self._ctx._cache.release(sub)  # wakes a reader waiting in another thread
        with contextlib.suppress(ValueError):  # running in another thread: the cancelled stream ends it
            self._events.close()

    def __enter__(self) -> VariableWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stopped(self) -> bool:
        return self._stop.is_set() or self._ctx.closed

    def _listing(self) -> list[Variable]:
        ctx = self._ctx
        if not self._identifiers:
            return ctx._call(BridgeCalls.list_variables(ctx.session_id))
        found, _ = ctx._call(BridgeCalls.get_variables(ctx.session_id, self._identifiers))
        return list(found.values())

    def _check_known(self, listing: list[Variable]) -> bool:
        """Raise VariableNotFoundError for watched identifiers the server does not know; False if it cannot tell now."""
        unknown = _unlisted(self._identifiers, listing)
        if not unknown:
            return True
        ctx = self._ctx
        try:
            _, missing = ctx._call(BridgeCalls.get_variables(ctx.session_id, unknown))
        except BridgeUnavailableError:
            return False
        if missing:
            raise VariableNotFoundError(", ".join(missing), ctx.session_id)
        return True

    def _run_cached(self, cache: _VariableCache) -> Generator[WatchEvent, None, None]:
        """Events from the cache's own stream, each handed over after the cache applied it."""
        ctx = self._ctx
        tracker = _WatchTracker(self._identifiers, self._include_initial)
        sub = _Subscription(self._identifiers)
        with self._lock:
            if self._stopped():
                return
            self._sub = sub
        # Unknown names fail at once: from the server while the cache is not synced yet (an empty
        # session syncs only at its first heartbeat), else from the first listing.
        checked = not self._identifiers or (not cache.synced and self._check_known([]))
        cache.subscribe(sub)
        try:
            while not self._stopped():
                batch = cache.take(sub)
                if batch is None:
                    left, error, since = cache.patience(sub, ctx.reconnect_timeout)
                    if left is not None and left <= 0:
                        raise _reconnect_failed(error, ctx)
                    cache.wait(_woken(sub, since, self._stopped), left)
                    continue
                if batch.listing is not None and not checked:
                    checked = self._check_known(batch.listing)
                for event in batch.events(tracker):
                    if self._stopped():
                        return
                    yield event
                if batch.fatal is not None:
                    raise batch.fatal
        finally:
            sub.stopped = True  # no lock here (see _VariableCache._live)

    def _run_stream(self) -> Generator[WatchEvent, None, None]:
        """Events from a stream of the watch's own (the client has no cache)."""
        ctx = self._ctx
        tracker = _WatchTracker(self._identifiers, self._include_initial)
        request = pb.WatchVariablesRequest(
            session_id=ctx.session_id, variable_identifiers=self._identifiers, include_initial_values=True
        )
        backoff = _Backoff()
        ever_connected = False
        down_since: float | None = None
        last_error: DSPexError | None = None
        while not self._stopped():
            live = False
            try:
                stream = ctx.stub.WatchVariables(request, metadata=(("source", WORKER),))
            except ValueError as exc:  # the channel was closed under us
                if self._stopped():
                    return
                raise BridgeUnavailableError(f"the connection to the bridge is closed: {exc}") from exc
            with self._lock:
                self._stream = stream
            ctx._streams.add(stream)
            try:
                for message in stream:
                    event = tracker.on_update(proto_to_update(message))
                    if event is not None:
                        yield event
                    if not live:
                        live = True
                        yield from tracker.on_listing(self._listing())
                        ever_connected = True
                        down_since = None
                        backoff.reset()
            except (grpc.RpcError, DSPexError) as exc:
                if self._stopped():
                    return
                last_error = _watch_error(exc, self._identifiers, ctx.session_id)
                if _watch_is_over(last_error, live=live, ever_connected=ever_connected):
                    raise last_error from exc
            finally:
                with self._lock:
                    self._stream = None
                ctx._streams.discard(stream)
                stream.cancel()
            if self._stopped():
                return
            now = time.monotonic()
            down_since = down_since if down_since is not None else now
            if ctx.reconnect_timeout is not None and now - down_since > ctx.reconnect_timeout:
                raise last_error or BridgeUnavailableError(
                    f"the watch of session {ctx.session_id} could not reconnect within {ctx.reconnect_timeout:g} s"
                )
            if self._stop.wait(backoff.next()):
                return


# --------------------------------------------------------------------------------------------
# asyncio client
# --------------------------------------------------------------------------------------------


async def _read(stream: Any) -> Any:
    """The next message of an aio stream, or None at its end."""
    message = await stream.read()
    return None if message is grpc.aio.EOF else message  # type: ignore[attr-defined]


class AsyncSessionContext(_ClientCore):
    """The asyncio twin of :class:`SessionContext` (grpc.aio): the same methods, as coroutines.

    ``watch_variables`` returns an async iterator; ``cached`` stays a plain method (no I/O). The
    consistency guarantees are the same, read-after-watch included: after ``watch_variables``
    yields an event, cached reads return that version or newer for that variable and reflect every
    write the server applied before it.

    The channel and the cache task are created lazily inside the running event loop of the first
    call, because grpc.aio objects belong to the loop that created them; using the context from
    another loop while that one is alive raises :class:`~dspex_dspy.errors.DSPexError` (a context
    whose loop has closed binds to the new loop, when it was made from an address).

    Args:
        stub: a ``grpc.aio`` ``BridgeServiceStub`` (the snakepit form), or None with ``address``.
        session_id: the session to work in.
        cache: serve reads from a watch-fed local cache.
        call_timeout: the deadline of each unary call, in seconds.
        reconnect_timeout: how long :meth:`watch_variables` keeps trying to reconnect (None: for ever).
        address: ``"host:port"``; required without a stub, and for pickling.

    Example:
        >>> ctx = await AsyncSessionContext.connect("127.0.0.1:50051", session_id="ctx_1")  # doctest: +SKIP
        >>> await ctx.get_variable("temperature")  # doctest: +SKIP
        0.7
        >>> await ctx.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        stub: Any = None,
        session_id: str | None = None,
        *,
        cache: bool = True,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        address: str | None = None,
        root_certificates: Pem | None = None,
        token: str | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
    ) -> None:
        if stub is None and address is None:
            raise BridgeUnavailableError("an AsyncSessionContext needs a grpc.aio stub or an address")
        if stub is None:
            self.security = resolve_security(
                root_certificates, token, certificate_chain=certificate_chain, private_key=private_key
            )
        super().__init__(
            _check_session_id(session_id),
            address=address,
            cache=cache,
            call_timeout=call_timeout,
            reconnect_timeout=reconnect_timeout,
        )
        self.stub = stub
        self._given_stub = stub is not None
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._feed: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        address: str | None = None,
        session_id: str | None = None,
        *,
        cache: bool = True,
        timeout: float = 5.0,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        root_certificates: Pem | None = None,
        token: str | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
    ) -> AsyncSessionContext:
        """Connect (in the running loop) to the bridge at ``address`` and check that the session exists.

        Args:
            address: ``"host:port"``; defaults to the ``DSPEX_BRIDGE_ADDRESS`` environment variable.
            session_id: the session to work in.
            cache: serve reads from the watch-fed cache.
            timeout: seconds to wait for the connection.
            call_timeout: the deadline of each later call.
            reconnect_timeout: see the class.
            root_certificates: PEM roots to trust (default ``DSPEX_BRIDGE_CA``): the channel uses TLS.
            token: a bearer token for every call (default ``DSPEX_BRIDGE_TOKEN``).
            certificate_chain: a client certificate (PEM), for bridges that require mutual TLS.
            private_key: the key of that client certificate.

        Raises:
            BridgeUnavailableError: no address, or nothing answered within ``timeout``.
            SessionNotFoundError: the bridge has no such session.
        """
        ctx = cls(
            None,
            _check_session_id(session_id),
            cache=cache,
            call_timeout=call_timeout,
            reconnect_timeout=reconnect_timeout,
            address=_resolve_address(address),
            root_certificates=root_certificates,
            token=token,
            certificate_chain=certificate_chain,
            private_key=private_key,
        )
        try:
            ctx._bind()
            channel = ctx._channel
            if channel is None:  # pragma: no cover - _bind always opens one for an address
                raise BridgeUnavailableError(f"no channel to {ctx.address}")
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout)
            except asyncio.TimeoutError:
                raise BridgeUnavailableError(
                    f"no bridge server answered at {ctx.address} within {timeout:g} s"
                ) from None
            await ctx._call(BridgeCalls.get_session(ctx.session_id))
        except BaseException:
            await ctx.close()
            raise
        return ctx

    # ------------------------------------------------------------------ loop binding and lifecycle

    def _bind(self) -> None:
        """Tie the context to the running loop, creating its channel and cache task on first use."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self.closed:
            raise BridgeUnavailableError("this AsyncSessionContext is closed")
        if self._loop is not None and not self._loop.is_closed():
            raise DSPexError(
                "this AsyncSessionContext belongs to another event loop (grpc.aio objects cannot move "
                "between loops); create one context per event loop"
            )
        if self._loop is not None and self._given_stub:
            raise DSPexError("the grpc.aio stub of this AsyncSessionContext belongs to an event loop that has closed")
        if not self._given_stub:
            assert self.address is not None
            self._channel = secure_aio_channel(self.address, self.security, CHANNEL_OPTIONS)
            self.stub = pb_grpc.BridgeServiceStub(self._channel)
        self._loop = loop
        self._changed = asyncio.Event()
        if self._cache is not None:
            self._cache.mark_down()
            self._cache.on_change = self._notify
            self._feed = loop.create_task(self._feed_cache(), name=f"dspex-cache-{self.session_id[:24]}")

    def _notify(self) -> None:
        # Called by the cache (in this loop's thread) after each change: wake every waiter.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def close(self) -> None:
        """End the cache task and every watch, and close the channel (if this context opened it). Idempotent."""
        if self.closed:
            return
        self._streams.cancel_all()
        if self._cache is not None:
            self._cache.mark_down()
        feed, self._feed = self._feed, None
        if feed is not None and feed is not asyncio.current_task():
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(None)

    async def __aenter__(self) -> AsyncSessionContext:
        self._bind()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __copy__(self) -> AsyncSessionContext:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncSessionContext:
        return self

    def __reduce__(self) -> tuple[Callable[..., AsyncSessionContext], tuple[str, str, dict[str, Any]]]:
        return _reconnect_async, (self._pickle_address(), self.session_id, self._options())

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("synced" if self.cache_synced else "live")
        return f"AsyncSessionContext(session_id={self.session_id!r}, address={self.address!r}, {state})"

    async def _feed_cache(self) -> None:
        """The cache task: watch every variable, resync after each (re)connect, until closed."""
        cache = self._cache
        assert cache is not None
        request = pb.WatchVariablesRequest(session_id=self.session_id, include_initial_values=True)
        backoff = _Backoff()
        while not self.closed:
            stream = self.stub.WatchVariables(request, metadata=(("source", WORKER),))
            self._streams.add(stream)
            error: DSPexError = BridgeUnavailableError(f"the cache watch of session {self.session_id} ended")
            try:
                first = await _read(stream)
                if first is not None:
                    order = _StreamOrder()
                    order.in_order(proto_to_update(first))
                    seq = cache.resync_started()
                    listing = await self._call(BridgeCalls.list_variables(self.session_id))
                    cache.resync(listing, seq)
                    backoff.reset()
                    while (message := await _read(stream)) is not None:
                        update = proto_to_update(message)
                        if cache.apply(update, order.in_order(update)):
                            seq = cache.resync_started()
                            listing = await self._call(BridgeCalls.list_variables(self.session_id))
                            cache.catch_up(listing, seq, update)
            except (grpc.RpcError, DSPexError) as exc:
                error = _watch_error(exc, (), self.session_id)
                logger.debug("cache watch of session %s broke: %s", self.session_id, exc)
            except asyncio.CancelledError:
                if not self.closed:
                    raise
            finally:
                cache.mark_down(None if self.closed else error)
                self._streams.discard(stream)
                stream.cancel()
            if self.closed:
                return
            await asyncio.sleep(backoff.next())

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the cache serves reads (or ``timeout`` seconds pass); False if it did not."""
        self._bind()
        cache = self._cache
        if cache is None:
            return False
        return await self._wait(lambda: cache.synced, timeout)

    async def wait_cached(self, name: str, version: int, timeout: float | None = None) -> bool:
        """Wait until the cache serves ``name`` at ``version`` or later; False on timeout."""
        self._bind()
        cache = self._cache
        if cache is None:
            return False

        def arrived() -> bool:
            var = cache.lookup(name)
            return var is not None and var.version >= version

        return await self._wait(arrived, timeout)

    async def _wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            changed = self._changed
            if predicate():
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return predicate()
        return False

    # ------------------------------------------------------------------ calls

    async def _call(self, call: BridgeCall[_T]) -> _T:
        if self.closed:
            raise BridgeUnavailableError(f"this AsyncSessionContext (session {self.session_id}) is closed")
        self._bind()
        method = getattr(self.stub, call.rpc)
        try:
            response = await method(call.request, timeout=self.call_timeout, metadata=call.metadata)
        except grpc.RpcError as err:
            raise call.error(err) from err
        return call.parse(response)

    async def get_variable_record(self, name: str) -> Variable:
        """The whole :class:`~dspex_dspy.types.Variable` record of ``name`` (cache first)."""
        var = self._cache.lookup(name) if self._cache is not None else None
        if var is None:
            var = await self._call(BridgeCalls.get_variable(self.session_id, name))
        return replace(var, value=_detached(var.value)) if isinstance(var.value, (list, dict)) else var

    async def get_versioned(self, name: str) -> tuple[Any, int]:
        """``(value, version)`` of a variable: from the cache when synced and fresh, else the server."""
        self._bind()
        var = self._cache.lookup(name) if self._cache is not None else None
        if var is None:
            var = await self._call(BridgeCalls.get_variable(self.session_id, name))
        return _detached(var.value), var.version

    async def get_variable(self, name: str) -> Any:
        """The current value of a variable (``await ctx[name]`` does the same)."""
        return (await self.get_versioned(name))[0]

    def __getitem__(self, name: str) -> Any:
        """``await ctx[name]``: a coroutine for the variable's value."""
        return self.get_variable(name)

    async def has_variable(self, name: str) -> bool:
        """Whether the session has a variable of that name (or id)."""
        self._bind()
        if self._cache is not None and self._cache.lookup(name) is not None:
            return True
        try:
            await self._call(BridgeCalls.get_variable(self.session_id, name))
        except VariableNotFoundError:
            return False
        return True

    async def get_variables(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of several variables; raises :class:`VariableNotFoundError` naming the missing ones."""
        self._bind()
        wanted = list(dict.fromkeys(names))
        hit = self._cache.lookup_many(wanted) if self._cache is not None else None
        if hit is not None:
            return {name: _detached(var.value) for name, var in hit.items()}
        found, missing = await self._call(BridgeCalls.get_variables(self.session_id, wanted))
        return self._values(found, missing, wanted)

    async def list_variables(self, pattern: str | None = None) -> list[Variable]:
        """The session's variables in creation order (from the server); ``pattern`` is a ``*`` glob."""
        return await self._call(BridgeCalls.list_variables(self.session_id, pattern))

    async def register_variable(
        self,
        name: str,
        type: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Define a new variable in the session and return its id (see :meth:`SessionContext.register_variable`)."""
        var_id = await self._call(self._register_call(name, type, value, constraints, description, metadata))
        return self._registered(var_id, name, type, value, constraints, description, metadata)

    async def set_variable(
        self,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Write a variable and return its new version (see :meth:`SessionContext.set_variable`)."""
        version = await self._call(self._set_call(name, value, metadata, expected_version))
        return self._written(name, version, value, metadata)

    async def update_variable(
        self,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Alias of :meth:`set_variable` (the snakepit name)."""
        return await self.set_variable(name, value, metadata=metadata, expected_version=expected_version)

    async def update_variables(
        self, updates: Mapping[str, Any], *, atomic: bool = True, metadata: Mapping[str, Any] | None = None
    ) -> dict[str, int]:
        """Write several variables; ``{name: new version}`` or :class:`BatchUpdateError`."""
        result = await self._call(self._batch_call(updates, atomic, metadata))
        return self._batch_written(result, updates, metadata)

    async def delete_variable(self, name: str) -> None:
        """Delete a variable (watchers see ``deleted``)."""
        await self._call(BridgeCalls.delete_variable(self.session_id, name, source=WORKER))
        self._deleted(name)

    def watch_variables(self, names: Iterable[str] | None = None, include_initial: bool = True) -> AsyncVariableWatch:
        """An async iterator over changes of some variables (None: all); see :meth:`SessionContext.watch_variables`.

        Example:
            >>> async for event in ctx.watch_variables(["temperature"]):  # doctest: +SKIP
            ...     print(event.value)
        """
        return AsyncVariableWatch(self, list(names or ()), include_initial)


def _reconnect_async(address: str, session_id: str, options: dict[str, Any]) -> AsyncSessionContext:
    """Unpickle an :class:`AsyncSessionContext`: a new one for the same address, session and options.

    It connects lazily, in the loop of its first call.
    """
    return AsyncSessionContext(None, session_id, address=address, **options)


class AsyncVariableWatch(AsyncIterator[WatchEvent]):
    """The async iterator :meth:`AsyncSessionContext.watch_variables` returns; see :class:`VariableWatch`."""

    def __init__(self, ctx: AsyncSessionContext, identifiers: list[str], include_initial: bool) -> None:
        self._ctx = ctx
        self._identifiers = identifiers
        self._include_initial = include_initial
        self._stopped_flag = False
        self._stream: Any = None
        self._sub: _Subscription | None = None
        cache = ctx._cache
        self._events = self._run_cached(cache) if cache is not None else self._run_stream()

    def __aiter__(self) -> AsyncVariableWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop the watch (iteration then ends). Idempotent."""
        self._stopped_flag = True
        if self._stream is not None:
            self._stream.cancel()
        if self._sub is not None and self._ctx._cache is not None:
            self._ctx._cache.release(self._sub)  # wakes a reader waiting in another task
        with contextlib.suppress(RuntimeError):  # running in another task: the cancelled stream ends it
            await self._events.aclose()

    async def __aenter__(self) -> AsyncVariableWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _stopped(self) -> bool:
        return self._stopped_flag or self._ctx.closed

    async def _listing(self) -> list[Variable]:
        ctx = self._ctx
        if not self._identifiers:
            return await ctx._call(BridgeCalls.list_variables(ctx.session_id))
        found, _ = await ctx._call(BridgeCalls.get_variables(ctx.session_id, self._identifiers))
        return list(found.values())

    async def _check_known(self, listing: list[Variable]) -> bool:
        """Raise VariableNotFoundError for watched identifiers the server does not know; False if it cannot tell now."""
        unknown = _unlisted(self._identifiers, listing)
        if not unknown:
            return True
        ctx = self._ctx
        try:
            _, missing = await ctx._call(BridgeCalls.get_variables(ctx.session_id, unknown))
        except BridgeUnavailableError:
            return False
        if missing:
            raise VariableNotFoundError(", ".join(missing), ctx.session_id)
        return True

    async def _run_cached(self, cache: _VariableCache) -> AsyncGenerator[WatchEvent, None]:
        """Events from the cache's own stream, each handed over after the cache applied it."""
        ctx = self._ctx
        if self._stopped():
            return
        ctx._bind()  # starts the cache task in this loop
        tracker = _WatchTracker(self._identifiers, self._include_initial)
        sub = _Subscription(self._identifiers)
        self._sub = sub
        # Unknown names fail at once (see VariableWatch).
        checked = not self._identifiers or (not cache.synced and await self._check_known([]))
        cache.subscribe(sub)
        try:
            while not self._stopped():
                batch = cache.take(sub)
                if batch is None:
                    left, error, since = cache.patience(sub, ctx.reconnect_timeout)
                    if left is not None and left <= 0:
                        raise _reconnect_failed(error, ctx)
                    await ctx._wait(_woken(sub, since, self._stopped), left)
                    continue
                if batch.listing is not None and not checked:
                    checked = await self._check_known(batch.listing)
                for event in batch.events(tracker):
                    if self._stopped():
                        return
                    yield event
                if batch.fatal is not None:
                    raise batch.fatal
        finally:
            sub.stopped = True  # no lock here (see _VariableCache._live)

    async def _run_stream(self) -> AsyncGenerator[WatchEvent, None]:
        """Events from a stream of the watch's own (the context has no cache)."""
        ctx = self._ctx
        tracker = _WatchTracker(self._identifiers, self._include_initial)
        request = pb.WatchVariablesRequest(
            session_id=ctx.session_id, variable_identifiers=self._identifiers, include_initial_values=True
        )
        backoff = _Backoff()
        ever_connected = False
        down_since: float | None = None
        last_error: DSPexError | None = None
        while not self._stopped():
            ctx._bind()
            live = False
            stream = ctx.stub.WatchVariables(request, metadata=(("source", WORKER),))
            self._stream = stream
            ctx._streams.add(stream)
            try:
                while (message := await _read(stream)) is not None:
                    event = tracker.on_update(proto_to_update(message))
                    if event is not None:
                        yield event
                    if not live:
                        live = True
                        for listed in tracker.on_listing(await self._listing()):
                            yield listed
                        ever_connected = True
                        down_since = None
                        backoff.reset()
            except (grpc.RpcError, DSPexError) as exc:
                if self._stopped():
                    return
                last_error = _watch_error(exc, self._identifiers, ctx.session_id)
                if _watch_is_over(last_error, live=live, ever_connected=ever_connected):
                    raise last_error from exc
            except asyncio.CancelledError:
                if self._stopped():
                    return
                raise
            finally:
                self._stream = None
                ctx._streams.discard(stream)
                stream.cancel()
            if self._stopped():
                return
            now = time.monotonic()
            down_since = down_since if down_since is not None else now
            if ctx.reconnect_timeout is not None and now - down_since > ctx.reconnect_timeout:
                raise last_error or BridgeUnavailableError(
                    f"the watch of session {ctx.session_id} could not reconnect within {ctx.reconnect_timeout:g} s"
                )
            await asyncio.sleep(backoff.next())
