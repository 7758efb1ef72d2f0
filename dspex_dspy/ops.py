"""Operations shared by the orchestrator API (Context, Variables) and the worker clients.

What lives here is the same on both sides: the :class:`WatchEvent` record a watch yields, the
conversion of a store update into one, :class:`ContextWatch` (a watch over a
:class:`~dspex_dspy.Context`'s own variables that follows the context across a backend switch),
:class:`CallbackWatch` (the callback form of any watch: a thread hands each event to a function),
and :func:`cas_update` (an atomic read-modify-write as a compare-and-swap loop with backoff).

Watches **coalesce**: a watcher holds at most one pending change per variable, so a slow consumer
sees the latest value of each variable, not every intermediate one. Per variable the versions it
yields strictly increase, and the last event of a variable is its latest value. The complete
change log of a variable is its **history** (``Variables.history``), not its watch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dspex_dspy.display import SECRET, event_record
from dspex_dspy.errors import DSPexError, VersionConflictError
from dspex_dspy.records import UpdateType, VariableUpdate
from dspex_dspy.types import BATCH_METADATA_KEY, OptimizationStatus, is_secret

__all__ = [
    "AsyncCallbackWatch",
    "CallbackWatch",
    "ContextWatch",
    "EventStream",
    "WatchEvent",
    "acas_update",
    "jittered_pauses",
    "cas_update",
    "event_from_update",
]

logger = logging.getLogger(__name__)

#: First and largest pause between two attempts of a compare-and-swap loop, in seconds.
CAS_BACKOFF_INITIAL = 0.0005
CAS_BACKOFF_MAX = 0.05
DEFAULT_CAS_ATTEMPTS = 64


@dataclass(frozen=True)
class WatchEvent:
    """One change of one variable, as a watch yields it.

    Attributes:
        name: the variable's name.
        value: its value after the change (for ``deleted``: its last value).
        version: its version after the change (for ``deleted``: its last version).
        update_type: ``initial_value``, ``value_change`` or ``deleted``.
        source: who made the change (``orchestrator`` / ``worker``).
        timestamp: wall-clock seconds since the epoch.
        variable_id: the variable's id.
        metadata: the metadata given with this one write (not the variable's own metadata).
        optimization_status: the optimization lease holding the variable at that version, or None.
        secret: the variable is secret: its value is kept here for the program, but the event's
            repr and records show ``<secret>``.
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
    secret: bool = False

    def __repr__(self) -> str:
        value = SECRET if self.secret else repr(self.value)
        return (
            f"WatchEvent(name={self.name!r}, value={value}, version={self.version}, "
            f"update_type={self.update_type!r}, source={self.source!r})"
        )

    def to_record(self) -> dict[str, Any]:
        """The event as a plain dict (JSON-ready; the time as ISO-8601 UTC), as ``watch --json`` prints it."""
        return event_record(self, secret=self.secret)


def event_from_update(update: VariableUpdate) -> WatchEvent | None:
    """The :class:`WatchEvent` of a store update; None for a heartbeat."""
    var = update.variable
    if var is None or update.update_type == UpdateType.HEARTBEAT:
        return None
    return WatchEvent(
        name=var.name,
        value=var.value,
        version=var.version,
        update_type=update.update_type,
        source=update.source or var.source,
        timestamp=update.timestamp or var.updated_at,
        variable_id=update.variable_id or var.id,
        metadata={k: v for k, v in update.metadata.items() if k != BATCH_METADATA_KEY},
        optimization_status=var.optimization_status,
        secret=is_secret(var.metadata),
    )


class EventStream(Iterator[WatchEvent], Protocol):
    """What a watch without a callback returns: an iterator of events that can be closed.

    Use it in a ``with`` block, or call :meth:`close` (from any thread) to end the iteration.
    """

    def close(self) -> None:
        """Stop the watch; iteration ends."""
        ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


class _UpdateSource(Protocol):
    """A store watch (or its remote twin): blocking ``next_update`` and ``close``."""

    def next_update(self, timeout: float | None = None) -> VariableUpdate | None: ...

    def close(self) -> None: ...

    @property
    def closed(self) -> bool: ...


class _WatchingProvider(Protocol):
    def watch(self, names: Iterable[str] | None = None, *, include_initial: bool = True) -> _UpdateSource: ...


class ContextWatch(Iterator[WatchEvent]):
    """Changes of a context's variables, across a switch from local to bridged (see the module doc).

    Args:
        provider: returns the context's current provider (raises a DSPexError once it stopped).
        names: the variables to watch; empty watches every variable, including new ones.
        include_initial: first yield each watched variable's current value.
    """

    def __init__(
        self, provider: Callable[[], _WatchingProvider], names: Iterable[str], include_initial: bool = True
    ) -> None:
        self._current = provider
        self._names = list(names)
        self._seen: dict[str, int] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._source = provider()
        self._watch = self._source.watch(self._names, include_initial=include_initial)

    def __iter__(self) -> ContextWatch:
        return self

    def __next__(self) -> WatchEvent:
        while True:
            if self._closed:
                raise StopIteration
            update = self._watch.next_update()
            if update is None:
                if self._closed or not self._reopen():
                    self._closed = True
                    error = getattr(self._watch, "error", None)
                    if error is not None:
                        raise error
                    raise StopIteration
                continue
            event = event_from_update(update)
            if event is None:
                continue
            last = self._seen.get(event.name, 0)
            if event.update_type == UpdateType.DELETED:
                self._seen.pop(event.name, None)
                return event
            if event.version <= last:
                continue
            self._seen[event.name] = event.version
            return event

    def _reopen(self) -> bool:
        """After the watch ended: follow the context to its new provider, if it switched."""
        try:
            current = self._current()
        except DSPexError:
            return False
        with self._lock:
            if self._closed or current is self._source:
                return False
            self._source = current
            self._watch = current.watch(self._names, include_initial=True)
        return True

    def close(self) -> None:
        """Stop the watch (from any thread); iteration ends. Idempotent."""
        with self._lock:
            self._closed = True
            watch = self._watch
        watch.close()

    def __enter__(self) -> ContextWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Closable(Protocol):
    def close(self) -> None: ...


class CallbackWatch:
    """The callback form of a watch: a daemon thread passes every event to ``callback``.

    ``callback`` runs in that thread, one event at a time; an exception it raises is logged and
    the watch goes on. An error ending the watch itself is kept in :attr:`error`. Stop it with
    :meth:`close` (or a ``with`` block).

    Args:
        events: the watch iterator (it must have ``close()``).
        callback: called with each :class:`WatchEvent`.
        name: the thread's name.
    """

    def __init__(self, events: Iterator[WatchEvent], callback: Callable[[WatchEvent], Any], name: str = "") -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        self._events = events
        self._callback = callback
        self.error: BaseException | None = None
        self.delivered = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name or "dspex-watch-callback", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._events:
                try:
                    self._callback(event)
                except Exception:
                    logger.exception("a watch callback failed on %s v%d", event.name, event.version)
                self.delivered += 1
        except Exception as exc:
            self.error = exc
        finally:
            self._done.set()

    @property
    def running(self) -> bool:
        """Whether the watch is still delivering events."""
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the watch ended (closed, or its stream failed); False on timeout."""
        return self._done.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the watch and wait (up to ``timeout`` s) for the callback thread. Idempotent."""
        closable: Any = self._events
        closable.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> CallbackWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCallbackWatch:
    """The callback form of an async watch: a task of the running loop passes events to ``callback``.

    ``callback`` may be a plain function or a coroutine function (awaited, one event at a time).
    An exception it raises is logged and the watch goes on; an error ending the watch is kept in
    :attr:`error`. Stop it with ``await watch.aclose()`` (or ``async with``).
    """

    def __init__(self, events: AsyncIterator[WatchEvent], callback: Callable[[WatchEvent], Any]) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        self._events = events
        self._callback = callback
        self.error: BaseException | None = None
        self.delivered = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dspex-watch-callback")

    async def _run(self) -> None:
        try:
            async for event in self._events:
                try:
                    result = self._callback(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    logger.exception("a watch callback failed on %s v%d", event.name, event.version)
                self.delivered += 1
        except Exception as exc:
            self.error = exc

    @property
    def running(self) -> bool:
        """Whether the watch is still delivering events."""
        return not self._task.done()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the watch ended; False on timeout."""
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        return bool(done)

    async def aclose(self) -> None:
        """Stop the watch and its task. Idempotent."""
        closable: Any = self._events
        await closable.aclose()
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> AsyncCallbackWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def jittered_pauses(initial: float = CAS_BACKOFF_INITIAL, maximum: float = CAS_BACKOFF_MAX) -> Iterator[float]:
    """Jittered exponential pauses for retry loops: ``initial`` doubling up to ``maximum``."""
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(maximum, delay * 2)


def cas_update(
    name: str,
    read: Callable[[int], tuple[Any, int]],
    write: Callable[[Any, int], int],
    fn: Callable[[Any], Any],
    *,
    max_attempts: int = DEFAULT_CAS_ATTEMPTS,
) -> int:
    """Replace a value with ``fn(value)`` atomically: read, compute, write if unchanged, else retry.

    Args:
        name: the variable (for the error message).
        read: ``read(attempt) -> (value, version)``; ``attempt`` counts from 0 (a client may read
            its cache first and the server after a conflict).
        write: ``write(value, expected_version) -> new version``; raises VersionConflictError when
            the version moved.
        fn: the change; it may run more than once, so it must have no side effects.
        max_attempts: give up after this many conflicts.

    Raises:
        VersionConflictError: every attempt lost the race (naming the last versions seen).
        ValueError: ``max_attempts`` is not positive.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    delays = jittered_pauses()
    last: VersionConflictError | None = None
    for attempt in range(max_attempts):
        value, version = read(attempt)
        try:
            return write(fn(value), version)
        except VersionConflictError as exc:
            last = exc
            if attempt + 1 < max_attempts:
                time.sleep(next(delays))
    assert last is not None
    raise VersionConflictError(name, last.expected, last.actual) from last


async def acas_update(
    name: str,
    read: Callable[[int], Awaitable[tuple[Any, int]]],
    write: Callable[[Any, int], Awaitable[int]],
    fn: Callable[[Any], Any],
    *,
    max_attempts: int = DEFAULT_CAS_ATTEMPTS,
) -> int:
    """The asyncio twin of :func:`cas_update` (``read`` and ``write`` are coroutine functions)."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    delays = jittered_pauses()
    last: VersionConflictError | None = None
    for attempt in range(max_attempts):
        value, version = await read(attempt)
        try:
            return await write(fn(value), version)
        except VersionConflictError as exc:
            last = exc
            if attempt + 1 < max_attempts:
                await asyncio.sleep(next(delays))
    assert last is not None
    raise VersionConflictError(name, last.expected, last.actual) from last
