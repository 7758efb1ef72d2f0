"""The cache feed and the watches as machines: messages and listings in, actions and events out.

Nothing here performs I/O, starts a thread or awaits: the blocking and the asyncio drivers
(:mod:`.sync`, :mod:`.aio`) open the streams, run the calls these machines ask for and hand back
what arrived, so the logic of the cache feed, of a watch with its own stream and of a watch fed by
the cache is written once for both.

- :class:`CacheFeed`: ``opened()``, then ``on_message(message)`` for each streamed message, which
  returns a call to run (a listing) or None; its result goes to ``on_listing``. When the stream
  ends, ``on_end(exc)`` marks the cache down and returns the delay before the next connection.
- :class:`StreamWatch`: the same shape for a watch of its own (``cache=False``), returning events.
- :class:`CachedWatch`: what a watch fed by the cache does next (:meth:`CachedWatch.step`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.client.cache import Subscription, VariableCache
from dspex_dspy.client.events import StreamOrder, WatchEvent, WatchTracker
from dspex_dspy.client.policy import Reconnect, unlisted, watch_error
from dspex_dspy.errors import BridgeUnavailableError, DSPexError, VariableNotFoundError
from dspex_dspy.records import UpdateType, VariableUpdate
from dspex_dspy.remote import BridgeCall, BridgeCalls
from dspex_dspy.types import Variable, batch_marker
from dspex_dspy.wire import proto_to_update

__all__ = ["CacheFeed", "CachedWatch", "Listing", "StreamWatch", "WatchStep"]

logger = logging.getLogger("dspex_dspy.client")

Listing = tuple[list[Variable], list[str]]
"""A listing asked for by a machine: ``(variables, watched identifiers the server does not have)``."""


def _listing_call(session_id: str, identifiers: Sequence[str]) -> BridgeCall[Listing]:
    """List every variable (no identifiers), or get the named ones in one ``GetVariables``."""
    if identifiers:
        call = BridgeCalls.get_variables(session_id, identifiers)

        def by_name(response: Any) -> Listing:
            found, missing = call.parse(response)
            return list(found.values()), missing

        return BridgeCall(call.rpc, call.request, by_name, call.identifier, call.session_id)
    every = BridgeCalls.list_variables(session_id)
    return BridgeCall(every.rpc, every.request, lambda r: (every.parse(r), []), session_id=session_id)


def watch_request(session_id: str) -> pb.WatchVariablesRequest:
    """Every variable of the session, initial values included (name watches filter on this side)."""
    return pb.WatchVariablesRequest(session_id=session_id, include_initial_values=True)


class BatchAssembly:
    """Holds the updates of an atomic batch until all of them arrived, so the cache applies them together.

    A batch's updates carry :data:`~dspex_dspy.types.BATCH_METADATA_KEY` (``"<id>/<count>"``) and
    reach a watcher one after another. A watcher that fell behind gets coalesced updates, so a
    batch may arrive incomplete (a later write replaced one of its updates): what was held is then
    released together with the next complete batch, the next plain update or the next heartbeat,
    whichever comes first, so the cache only ever moves between states the server was in.
    """

    def __init__(self) -> None:
        self._id = ""
        self._count = 0
        self._held: list[tuple[VariableUpdate, bool]] = []

    def add(self, update: VariableUpdate, in_order: bool) -> list[tuple[VariableUpdate, bool]]:
        """Take one streamed update; return the updates to apply now (in stream order), maybe none."""
        marker = batch_marker(update.metadata) if update.update_type == UpdateType.VALUE_CHANGE else None
        self._held.append((update, in_order))
        if marker is not None:
            batch_id, size = marker
            if batch_id != self._id:
                self._id, self._count = batch_id, 0
            self._count += 1
            if self._count < size:
                return []
        released, self._held = self._held, []
        self._id, self._count = "", 0
        return released


class CacheFeed:
    """The cache's feed across connections: resync after each (re)connect, catch up on reordering.

    The first message of a stream proves the server registered the watcher (no later write can be
    missed): the feed then asks for a listing that *replaces* the cache. An update that
    :class:`~.cache.VariableCache.apply` holds back (it may have overtaken earlier writes) asks for
    a listing taken after it arrived (``catch_up``). A broken or silent stream marks the cache
    down, logged once at WARNING per outage, and the driver waits the returned delay.

    Args:
        cache: the cache to feed.
        session_id: the session watched.
    """

    def __init__(self, cache: VariableCache, session_id: str) -> None:
        self.cache = cache
        self.session_id = session_id
        self.request = watch_request(session_id)
        self._reconnect = Reconnect(session_id, (), None)
        self._order = StreamOrder()
        self._first = True
        self._seq = 0
        self._trigger: list[VariableUpdate] | None = None
        self._batch = BatchAssembly()
        self._outage = False

    def opened(self) -> None:
        """A new stream was opened."""
        self._order = StreamOrder()
        self._batch = BatchAssembly()
        self._first = True
        self.cache.heard()

    def silence_left(self) -> float | None:
        """Seconds the stream may stay silent before it counts as dead (None: for ever)."""
        return self.cache.silence.left()

    def on_message(self, message: Any) -> BridgeCall[Listing] | None:
        """One streamed message; returns the listing to run (and hand to :meth:`on_listing`), or None."""
        self.cache.heard()
        update = proto_to_update(message)
        in_order = self._order.in_order(update)
        if self._first:
            self._first, self._trigger = False, None
        else:
            ready = self._batch.add(update, in_order)
            if not ready or not self.cache.apply_all(ready):
                return None
            self._trigger = [held for held, _ in ready]
        self._seq = self.cache.resync_started()
        return _listing_call(self.session_id, ())

    def on_listing(self, listing: Listing) -> None:
        """The listing asked for by :meth:`on_message` arrived."""
        if self._trigger is None:
            self.cache.resync(listing[0], self._seq)
            self._reconnect.connected()
            if self._outage:
                logger.info("the cache of session %s is synced again", self.session_id)
                self._outage = False
        else:
            self.cache.catch_up(listing[0], self._seq, self._trigger)

    def on_end(self, exc: BaseException | None, *, closed: bool) -> float:
        """The stream ended (``exc``: why, None for a plain end): the delay before reconnecting."""
        if closed:
            self.cache.mark_down()
            return 0.0
        if self.cache.silence.dead():
            error: DSPexError = BridgeUnavailableError(
                f"the cache watch of session {self.session_id} was silent for more than "
                f"{self.cache.silence.limit:g} s (no heartbeat): the connection is taken as dead"
            )
        elif exc is None:
            error = BridgeUnavailableError(f"the cache watch of session {self.session_id} ended")
        else:
            error = watch_error(exc, (), self.session_id)
            if not isinstance(exc, (grpc.RpcError, DSPexError)):
                logger.error("cache watch of session %s failed; it reconnects", self.session_id, exc_info=exc)
        self.cache.mark_down(error)
        if not self._outage:
            self._outage = True
            logger.warning(
                "the cache of session %s is down (%s); reads go to the server until it resyncs",
                self.session_id,
                error,
                extra={"event": "cache_degraded", "session_id": self.session_id},
            )
        else:
            logger.debug("cache watch of session %s broke again: %s", self.session_id, error)
        return self._reconnect.failed(None, live=False)


class StreamWatch:
    """A watch with a stream of its own (the client has no cache), across reconnects.

    The stream carries every variable of the session and the watch keeps the ones it names (by
    name or id): a name deleted and created again is followed (the server binds a named watch to
    the variables' ids). After each connection's first message the watch lists the watched
    variables, so the last event of each is its latest state. A watched name the server does not
    have fails at once (:class:`VariableNotFoundError`).

    Args:
        session_id: the session watched.
        identifiers: the watched names or ids (empty: all).
        include_initial: first yield each variable's current value.
        reconnect_timeout: seconds a broken watch may take to reconnect (None: for ever).
    """

    def __init__(
        self, session_id: str, identifiers: Sequence[str], include_initial: bool, reconnect_timeout: float | None
    ) -> None:
        self.session_id = session_id
        self.identifiers = list(identifiers)
        self.request = watch_request(session_id)
        self._tracker = WatchTracker(identifiers, include_initial)
        self._reconnect = Reconnect(session_id, identifiers, reconnect_timeout)
        self._live = False

    def opened(self) -> BridgeCall[Listing] | None:
        """A new stream is about to open; on the first connection of a named watch, the name check to run.

        Hand the check's result to :meth:`checked` (it raises for a name the server lacks).
        """
        self._live = False
        if self.identifiers and not self._reconnect.ever_connected:
            return _listing_call(self.session_id, self.identifiers)
        return None

    def checked(self, listing: Listing) -> None:
        """The result of the name check of :meth:`opened`."""
        if listing[1]:
            raise VariableNotFoundError(", ".join(listing[1]), self.session_id)

    def on_message(self, message: Any) -> tuple[list[WatchEvent], BridgeCall[Listing] | None]:
        """One streamed message: the events to yield, then the listing to run (first message only)."""
        event = self._tracker.on_update(proto_to_update(message))
        events = [event] if event is not None else []
        if self._live:
            return events, None
        self._live = True
        return events, _listing_call(self.session_id, self.identifiers)

    def on_listing(self, listing: Listing) -> list[WatchEvent]:
        """The listing asked for arrived: the events that bring the watch to it."""
        variables, missing = listing
        if missing and not self._reconnect.ever_connected:
            raise VariableNotFoundError(", ".join(missing), self.session_id)
        self._reconnect.connected()
        return self._tracker.on_listing(variables)

    def on_end(self, exc: BaseException | None) -> float:
        """The stream ended: the delay before reconnecting, or raise the error that ends the watch."""
        return self._reconnect.failed(exc, live=self._live)


@dataclass
class WatchStep:
    """What a watch fed by the cache does next: wait for news, or check names and yield events.

    Attributes:
        wait: seconds to wait for news (None: no limit) when ``woken`` is set.
        woken: when set, wait until ``woken(stopped)()`` holds, then take the next step.
        check: a call whose :data:`Listing` names the watched identifiers the server lacks (run it
            before yielding, and hand the result to :meth:`CachedWatch.checked`).
        events: events to yield.
    """

    wait: float | None = None
    woken: Callable[[Callable[[], bool]], Callable[[], bool]] | None = None
    check: BridgeCall[Listing] | None = None
    events: list[WatchEvent] = field(default_factory=list)


class CachedWatch:
    """A watch fed by the cache's own stream: events handed over only after the cache applied them.

    Unknown names fail at once: checked with the server while the cache is not synced yet (an
    empty session syncs only at its first heartbeat), else against the first listing.

    Args:
        cache: the client's cache.
        session_id: the session watched.
        identifiers: the watched names or ids (empty: all).
        include_initial: first yield each variable's current value.
        reconnect_timeout: seconds a broken watch may take to reconnect (None: for ever).
    """

    def __init__(
        self,
        cache: VariableCache,
        session_id: str,
        identifiers: Sequence[str],
        include_initial: bool,
        reconnect_timeout: float | None,
    ) -> None:
        self.cache = cache
        self.session_id = session_id
        self.identifiers = list(identifiers)
        self.reconnect_timeout = reconnect_timeout
        self.sub = Subscription(identifiers)
        self._tracker = WatchTracker(identifiers, include_initial)
        self._checked = not identifiers
        self._fatal: DSPexError | None = None

    def start(self) -> BridgeCall[Listing] | None:
        """Subscribe; returns the name check to run first, if any (see :meth:`checked`)."""
        check = None
        if not self._checked and not self.cache.synced:
            check, self._checked = self._check_call([]), True
        self.cache.subscribe(self.sub)
        return check

    def _check_call(self, listing: list[Variable]) -> BridgeCall[Listing] | None:
        unknown = unlisted(self.identifiers, listing)
        return _listing_call(self.session_id, unknown) if unknown else None

    def checked(self, listing: Listing | None) -> None:
        """The result of a check (None: the server could not be asked; the next listing checks again)."""
        if listing is None:
            self._checked = False
        elif listing[1]:
            raise VariableNotFoundError(", ".join(listing[1]), self.session_id)

    def step(self) -> WatchStep:
        """What to do next.

        Raises:
            DSPexError: the error that ended the watch (after its last events were taken), or the
                last error once reconnecting took longer than allowed.
        """
        if self._fatal is not None:
            raise self._fatal
        cache, sub = self.cache, self.sub
        batch = cache.take(sub)
        if batch is None:
            left, error, since = cache.patience(sub, self.reconnect_timeout)
            if left is not None and left <= 0:
                raise error or BridgeUnavailableError(
                    f"the watch of session {self.session_id} could not reconnect within {self.reconnect_timeout:g} s"
                )

            def woken(stopped: Callable[[], bool]) -> Callable[[], bool]:
                return lambda: sub.ready() or stopped() or sub.down_since != since

            return WatchStep(wait=left, woken=woken)
        check = None
        if batch.listing is not None and not self._checked:
            self._checked = True
            check = self._check_call(batch.listing)
        self._fatal = batch.fatal
        return WatchStep(check=check, events=batch.events(self._tracker))

    def stop(self) -> None:
        """The watch ended (no lock: it may run from the garbage collector; see ``VariableCache._live``)."""
        self.sub.stopped = True
