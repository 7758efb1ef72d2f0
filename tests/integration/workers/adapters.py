"""One blocking interface over SessionContext and AsyncSessionContext, so one test body runs on both.

:class:`SyncClient` calls a :class:`SessionContext` directly. :class:`AsyncClient` runs an
:class:`AsyncSessionContext` on its own event loop in a background thread and waits for each
coroutine; that loop is the one the context binds to. Watches are drained into a queue by a
thread (sync) or a task (async), so tests wait for events with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import pytest

from dspex_dspy.client import AsyncSessionContext, AsyncVariableWatch, SessionContext, VariableWatch, WatchEvent
from dspex_dspy.errors import BridgeUnavailableError
from dspex_dspy.types import Variable

T = TypeVar("T")
DEADLINE_S = 30.0
_END = object()


class EventQueue:
    """Events of one watch, as they arrive; an exception that ended the watch is raised on read."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self.ended = threading.Event()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def finish(self, error: BaseException | None = None) -> None:
        self._queue.put(error if error is not None else _END)
        self.ended.set()

    def next(self, timeout: float = DEADLINE_S) -> WatchEvent:
        """The next event; raises queue.Empty after ``timeout`` s, StopIteration if the watch ended."""
        item = self._queue.get(timeout=timeout)
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def until(self, predicate: Any, timeout: float = DEADLINE_S) -> list[WatchEvent]:
        """Every event up to and including the first one for which ``predicate(event)`` holds."""
        seen: list[WatchEvent] = []
        while True:
            event = self.next(timeout)
            seen.append(event)
            if predicate(event):
                return seen

    def gather(self, done: Any, timeout: float = DEADLINE_S) -> list[WatchEvent]:
        """Events until ``done(events so far)`` holds."""
        seen: list[WatchEvent] = []
        while not done(seen):
            seen.append(self.next(timeout))
        return seen


class SyncClient:
    """The blocking client, as is."""

    kind = "sync"

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx

    @classmethod
    def connect(cls, address: str | None, session_id: str, **options: Any) -> SyncClient:
        return cls(SessionContext.connect(address, session_id, **options))

    def close(self) -> None:
        self.ctx.close()

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def get(self, name: str) -> Any:
        return self.ctx.get_variable(name)

    def item(self, name: str) -> Any:
        return self.ctx[name]

    def get_versioned(self, name: str) -> tuple[Any, int]:
        return self.ctx.get_versioned(name)

    def has(self, name: str) -> bool:
        return self.ctx.has_variable(name)

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        return self.ctx.get_variables(names)

    def list(self, pattern: str | None = None) -> list[Variable]:
        return self.ctx.list_variables(pattern)

    def register(self, name: str, type_: str, value: Any, **kwargs: Any) -> str:
        return self.ctx.register_variable(name, type_, value, **kwargs)

    def set(self, name: str, value: Any, **kwargs: Any) -> int:
        return self.ctx.set_variable(name, value, **kwargs)

    def update(self, name: str, value: Any, **kwargs: Any) -> int:
        with pytest.warns(DeprecationWarning, match="use set_variable"):
            return self.ctx.update_variable(name, value, **kwargs)

    def set_many(self, updates: Mapping[str, Any], **kwargs: Any) -> dict[str, int]:
        return self.ctx.set_variables(updates, **kwargs)

    def delete(self, name: str) -> None:
        self.ctx.delete_variable(name)

    def cached(self, name: str) -> tuple[Any, int] | None:
        return self.ctx.cached(name)

    def wait_synced(self, timeout: float = DEADLINE_S) -> bool:
        return self.ctx.wait_synced(timeout)

    def wait_cached(self, name: str, version: int, timeout: float = DEADLINE_S) -> bool:
        return self.ctx.wait_cached(name, version, timeout)

    def watch(self, names: Iterable[str] | None = None, include_initial: bool = True) -> tuple[EventQueue, Any]:
        """Start a watch drained by a thread; returns ``(events, stop)``."""
        watch: VariableWatch = self.ctx.watch_variables(names, include_initial)
        events = EventQueue()

        def drain() -> None:
            try:
                for event in watch:
                    events.put(event)
            except BaseException as exc:
                events.finish(exc)
            else:
                events.finish()

        thread = threading.Thread(target=drain, name="watch-drain", daemon=True)
        thread.start()

        def stop() -> None:
            watch.close()
            thread.join(DEADLINE_S)

        return events, stop


class AsyncClient:
    """The asyncio client, driven from a background event loop."""

    kind = "async"

    def __init__(self, ctx: AsyncSessionContext, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.ctx = ctx
        self.loop = loop
        self._thread = thread

    @staticmethod
    def start_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="async-client-loop", daemon=True)
        thread.start()
        return loop, thread

    @classmethod
    def connect(cls, address: str | None, session_id: str, **options: Any) -> AsyncClient:
        loop, thread = cls.start_loop()
        try:
            ctx = asyncio.run_coroutine_threadsafe(
                AsyncSessionContext.connect(address, session_id, **options), loop
            ).result(DEADLINE_S)
        except BaseException:
            cls._stop_loop(loop, thread)
            raise
        return cls(ctx, loop, thread)

    @classmethod
    def adopt(cls, ctx: AsyncSessionContext) -> AsyncClient:
        """Drive an existing (not yet bound) context on a new loop."""
        loop, thread = cls.start_loop()
        return cls(ctx, loop, thread)

    @staticmethod
    def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(DEADLINE_S)
        loop.close()

    def close(self) -> None:
        if not self.loop.is_closed():
            self.run(self.ctx.close)
            self._stop_loop(self.loop, self._thread)

    def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE_S)

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return await fn(*args, **kwargs)

        return self._await(call())

    def get(self, name: str) -> Any:
        return self._await(self.ctx.get_variable(name))

    def item(self, name: str) -> Any:
        async def read() -> Any:
            return await self.ctx[name]

        return self._await(read())

    def get_versioned(self, name: str) -> tuple[Any, int]:
        return self._await(self.ctx.get_versioned(name))

    def has(self, name: str) -> bool:
        return self._await(self.ctx.has_variable(name))

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        return self._await(self.ctx.get_variables(names))

    def list(self, pattern: str | None = None) -> list[Variable]:
        return self._await(self.ctx.list_variables(pattern))

    def register(self, name: str, type_: str, value: Any, **kwargs: Any) -> str:
        return self._await(self.ctx.register_variable(name, type_, value, **kwargs))

    def set(self, name: str, value: Any, **kwargs: Any) -> int:
        return self._await(self.ctx.set_variable(name, value, **kwargs))

    def update(self, name: str, value: Any, **kwargs: Any) -> int:
        with pytest.warns(DeprecationWarning, match="use set_variable"):
            return self._await(self.ctx.update_variable(name, value, **kwargs))

    def set_many(self, updates: Mapping[str, Any], **kwargs: Any) -> dict[str, int]:
        return self._await(self.ctx.set_variables(updates, **kwargs))

    def delete(self, name: str) -> None:
        self._await(self.ctx.delete_variable(name))

    def cached(self, name: str) -> tuple[Any, int] | None:
        return self.ctx.cached(name)

    def wait_synced(self, timeout: float = DEADLINE_S) -> bool:
        return self._await(self.ctx.wait_synced(timeout))

    def wait_cached(self, name: str, version: int, timeout: float = DEADLINE_S) -> bool:
        return self._await(self.ctx.wait_cached(name, version, timeout))

    def watch(self, names: Iterable[str] | None = None, include_initial: bool = True) -> tuple[EventQueue, Any]:
        """Start a watch drained by a task on the client's loop; returns ``(events, stop)``."""
        watch: AsyncVariableWatch = self.ctx.watch_variables(names, include_initial)
        events = EventQueue()

        async def drain() -> None:
            try:
                async for event in watch:
                    events.put(event)
            except BaseException as exc:
                events.finish(exc)
            else:
                events.finish()

        task = asyncio.run_coroutine_threadsafe(drain(), self.loop)

        def stop() -> None:
            if not self.loop.is_closed():
                self._await(watch.aclose())
                task.result(DEADLINE_S)

        return events, stop


CLIENTS: dict[str, Any] = {"sync": SyncClient, "async": AsyncClient}


def reads(client: Any, name: str) -> Any:
    """The value ``client`` reads for ``name``, or None while the bridge is unavailable."""
    try:
        return client.get(name)
    except BridgeUnavailableError:
        return None


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE_S) -> bool:
    """Wait until ``condition()`` holds, checking every 10 ms; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True
