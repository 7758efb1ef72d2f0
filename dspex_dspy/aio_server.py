"""The bridge on ``grpc.aio``: no open stream holds a thread, and store calls never block the loop.

:class:`AsyncBridgeServicer` serves the RPCs of a :class:`~dspex_dspy.server.BridgeServicer` on an
asyncio event loop. Unary calls run the servicer's (synchronous) handler in a bounded thread pool,
so a slow store call never blocks the loop. ``WatchVariables`` is an async generator that sleeps
on an :class:`asyncio.Event` the store's :class:`~dspex_dspy.store.Watch` sets through
``loop.call_soon_threadsafe`` when an update arrives: an open watch costs a coroutine and its
coalescing queue, never a thread, so one node holds thousands of streams and unary calls are
never starved by them. :class:`EventLoopThread` is the loop a
:class:`~dspex_dspy.server.BridgeServer` runs on, so synchronous callers keep a blocking API.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Final, TypeVar

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import BridgeUnavailableError, SessionNotFoundError
from dspex_dspy.guard import abort_with, failure_status
from dspex_dspy.store import Watch
from dspex_dspy.wire import timestamp, update_to_proto
from dspex_dspy.wire_errors import rpc_status_for

if TYPE_CHECKING:
    from dspex_dspy.server import BridgeServicer

__all__ = ["EVENT_LOOP_ENV", "AsyncBridgeServicer", "EventLoopThread", "new_event_loop"]

_T = TypeVar("_T")
_SHUTTING_DOWN: Final = "the bridge server is shutting down"
_END: Final = object()


EVENT_LOOP_ENV: Final = "DSPEX_EVENT_LOOP"
"""Set to ``asyncio`` to run the bridge on the standard library's loop even where uvloop is installed."""


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for a bridge node: uvloop's where it is installed, else the standard one.

    uvloop (a dependency on Linux and macOS) runs ``grpc.aio`` and the Redis connection with about
    a tenth less CPU per call; ``DSPEX_EVENT_LOOP=asyncio`` opts out.

    Raises:
        ValueError: ``DSPEX_EVENT_LOOP`` names neither ``uvloop`` nor ``asyncio``.
    """
    wanted = os.environ.get(EVENT_LOOP_ENV, "").strip().lower()
    if wanted not in ("", "uvloop", "asyncio"):
        raise ValueError(f"{EVENT_LOOP_ENV} must be 'uvloop' or 'asyncio', not {wanted!r}")
    if wanted != "asyncio":
        try:
            import uvloop
        except ImportError:
            if wanted == "uvloop":
                raise ValueError(f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed: pip install uvloop") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class EventLoopThread:
    """An asyncio event loop running forever on a daemon thread, for blocking callers.

    Args:
        name: the thread's name.
    """

    def __init__(self, name: str = "dspex-bridge-loop") -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coro`` on the loop and wait for its result (or ``timeout`` seconds)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def alive(self) -> bool:
        """Whether the loop's thread still runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the loop and wait for its thread (idempotent)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


class AsyncBridgeServicer:
    """The RPCs of ``servicer`` as coroutines and async generators, for a ``grpc.aio`` server.

    Every ``BridgeService`` method of ``servicer`` becomes an attribute of the same name (register
    with :func:`~dspex_dspy.guard.guarded_async_handler`).

    Args:
        servicer: the synchronous servicer whose handlers and store are served.
        executor: the bounded pool that runs store calls.
    """

    def __init__(self, servicer: BridgeServicer, executor: Executor) -> None:
        self.servicer = servicer
        self.executor = executor
        for method in pb.DESCRIPTOR.services_by_name["BridgeService"].methods:
            if method.name == "WatchVariables":
                continue
            make = self._stream if method.server_streaming else self._unary
            setattr(self, method.name, make(method.name))
        # Ping touches no store: answered on the loop, it costs what a plain server's does.
        self._ping_handler = self._blocking("Ping")
        setattr(self, "Ping", self._on_loop("Ping", self._ping, self._unary("Ping")))  # noqa: B010
        if servicer.store.nonblocking:
            # Served on the loop itself: no thread hand-off, nothing blocked while Redis answers.
            for rpc, on_loop in (
                ("GetVariable", servicer.get_variable_async),
                ("GetVariables", servicer.get_variables_async),
                ("SetVariable", servicer.set_variable_async),
            ):
                setattr(self, rpc, self._on_loop(rpc, on_loop, self._unary(rpc)))

    def _blocking(self, rpc: str) -> Callable[..., Any]:
        # The handler without its blocking-server wrapper (which ends calls the blocking way).
        method = getattr(type(self.servicer), rpc)
        return getattr(method, "__wrapped__", method)  # type: ignore[no-any-return]

    def _in_pool(self, function: Callable[..., _T], *args: Any) -> Awaitable[_T]:
        """Run ``function`` in the pool, in a copy of this call's context (its principal)."""
        context = contextvars.copy_context()
        return asyncio.get_running_loop().run_in_executor(self.executor, context.run, function, *args)

    async def _refuse_if_stopping(self, context: Any) -> None:
        if self.servicer.shutting_down:
            await abort_with(context, rpc_status_for(BridgeUnavailableError(_SHUTTING_DOWN)))

    def _unary(self, rpc: str) -> Callable[[Any, Any], Awaitable[Any]]:
        handler = self._blocking(rpc)

        async def call(request: Any, context: Any) -> Any:
            await self._refuse_if_stopping(context)
            try:
                return await self._in_pool(handler, self.servicer, request, context)
            except Exception as exc:
                # The status only: the exception's frames (and the request in them) are let go.
                status = failure_status(rpc, exc)
            await abort_with(context, status)

        return call

    async def _ping(self, request: pb.PingRequest, context: Any) -> pb.PingResponse:
        return self._ping_handler(self.servicer, request, context)  # type: ignore[no-any-return]

    def _on_loop(
        self,
        rpc: str,
        on_loop: Callable[[Any, Any], Awaitable[Any]],
        in_pool: Callable[[Any, Any], Awaitable[Any]],
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        """``rpc`` served by the coroutine ``on_loop``; when it answers None (it could not do the call
        without blocking, and did nothing), by the blocking handler in the pool."""

        async def call(request: Any, context: Any) -> Any:
            await self._refuse_if_stopping(context)
            try:
                response = await on_loop(request, context)
            except Exception as exc:
                status = failure_status(rpc, exc)
            else:
                return response if response is not None else await in_pool(request, context)
            await abort_with(context, status)

        return call

    def _stream(self, rpc: str) -> Callable[[Any, Any], AsyncIterator[Any]]:
        handler = self._blocking(rpc)

        async def call(request: Any, context: Any) -> AsyncIterator[Any]:
            await self._refuse_if_stopping(context)
            try:
                items = handler(self.servicer, request, context)
                while (item := await self._in_pool(next, items, _END)) is not _END:
                    yield item
                return
            except Exception as exc:
                status = failure_status(rpc, exc)
            await abort_with(context, status)

        return call

    async def WatchVariables(self, request: pb.WatchVariablesRequest, context: Any) -> AsyncIterator[pb.VariableUpdate]:
        """Stream variable updates as the blocking servicer does, with no thread held while idle."""
        await self._refuse_if_stopping(context)
        try:
            async for update in self._watch(request, context):
                yield update
            return
        except Exception as exc:
            status = failure_status("WatchVariables", exc)
        await abort_with(context, status)

    async def _watch(self, request: pb.WatchVariablesRequest, context: Any) -> AsyncIterator[pb.VariableUpdate]:
        """The snapshot (if asked), then changes, deletions and heartbeats, until the stream ends.

        The watcher is registered with the store before the snapshot is taken, so no write falls
        between them. The stream ends when the client cancels (the task is cancelled), the server
        shuts down, the token expires (``UNAUTHENTICATED``) or the session goes away
        (``NOT_FOUND``).
        """
        servicer = self.servicer
        store = servicer.store
        session_id = request.session_id
        identifiers = list(request.variable_identifiers)
        principal = servicer.principal_of(context)

        def open_watch() -> Watch:
            return store.watch(session_id, identifiers, include_initial=request.include_initial_values)

        # Opened in the pool: a client that cancels meanwhile must not leave the watch (and its
        # slots) registered, so the opening finishes shielded and is closed if nobody took it.
        opening = asyncio.ensure_future(self._in_pool(servicer.open_watch, open_watch, session_id, principal))
        try:
            watch = await asyncio.shield(opening)
        except asyncio.CancelledError:

            def close_unclaimed(done: asyncio.Future[Watch]) -> None:
                if not done.cancelled() and done.exception() is None:
                    servicer.close_watch(done.result(), session_id, principal)

            opening.add_done_callback(close_unclaimed)
            raise
        try:
            loop = asyncio.get_running_loop()
            woken = asyncio.Event()

            def wake() -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(woken.set)

            watch.set_waker(wake)
            last_sent = time.monotonic()
            while not servicer.shutting_down:
                woken.clear()
                # Everything pending at once: the updates of an atomic batch are offered together,
                # so they are sent together, never split by a later write coalescing into them.
                updates = watch.take_all()
                if updates:
                    for update in updates:
                        yield update_to_proto(update)
                    last_sent = time.monotonic()
                    continue
                if watch.closed:
                    break
                wait = servicer.watch_wait(last_sent)
                if wait <= 0:
                    # An open watch is a session in use: keep it from expiring under its watchers.
                    await self._in_pool(store.heartbeat, session_id)
                    yield pb.VariableUpdate(update_type="heartbeat", timestamp=timestamp(time.time()))
                    last_sent = time.monotonic()
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), wait)
            if not servicer.shutting_down:
                # The store closed the watch: the session ended, or the store itself closed.
                if not await self._in_pool(store.has_session, session_id):
                    raise SessionNotFoundError(session_id)
                raise BridgeUnavailableError("the session store was closed")
        finally:
            watch.set_waker(None)
            servicer.close_watch(watch, session_id, principal)
