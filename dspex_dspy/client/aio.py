"""The asyncio driver: :class:`AsyncSessionContext`, its cache task and :class:`AsyncVariableWatch`.

The same machines (:mod:`.feed`) and operations (:mod:`.core`) as the blocking client, run with
grpc.aio in the event loop of the context's first call. The cache task survives any exception
(it logs it, marks the cache down and reconnects), and a cache stream silent for longer than
``silence_timeout`` is taken as dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.client.cache import WORKER
from dspex_dspy.client.core import (
    CLIENT_CHANNEL_OPTIONS,
    ClientCore,
    ClientOptions,
    ConnectOptions,
    Op,
    check_session_id,
    connect_options,
    resolve_address,
)
from dspex_dspy.client.events import WatchEvent, deprecated, detached
from dspex_dspy.client.feed import CachedWatch, CacheFeed, Listing, StreamWatch
from dspex_dspy.errors import BridgeUnavailableError, DSPexError
from dspex_dspy.leases import DEFAULT_LEASE_SECONDS, OptimizationLease
from dspex_dspy.ops import AsyncCallbackWatch, acas_update
from dspex_dspy.records import HistoryEntry
from dspex_dspy.remote import BridgeCall, BridgeCalls, channel_args
from dspex_dspy.tls import secure_aio_channel
from dspex_dspy.types import Variable

__all__ = ["AsyncSessionContext", "AsyncVariableWatch"]

_T = TypeVar("_T")
if TYPE_CHECKING:
    from dspex_dspy.client.core import DefineOptions, Meta, Unpack


async def _read(stream: Any, within: float | None = None) -> Any:
    """The next message of an aio stream, or None at its end; TimeoutError after ``within`` seconds."""
    message = await (stream.read() if within is None else asyncio.wait_for(stream.read(), max(within, 0.0)))
    return None if message is grpc.aio.EOF else message  # type: ignore[attr-defined]


class AsyncSessionContext(ClientCore):
    """The asyncio twin of :class:`~dspex_dspy.client.SessionContext` (grpc.aio): the same methods, as coroutines.

    ``watch_variables`` returns an async iterator; ``cached`` stays a plain method (no I/O). The
    consistency guarantees are the same, read-after-watch and dead-connection detection included.

    The channel and the cache task are created lazily inside the running event loop of the first
    call, because grpc.aio objects belong to the loop that created them; using the context from
    another loop while that one is alive raises :class:`~dspex_dspy.errors.DSPexError` (a context
    whose loop has closed binds to the new loop, when it was made from an address). In a forked
    child it binds afresh the same way.

    Args:
        stub: a ``grpc.aio`` ``BridgeServiceStub`` (the snakepit form), or None with ``address``.
        session_id: the session to work in.
        address: ``"host:port"``; required without a stub, and for pickling.
        **options: ``cache``, ``call_timeout``, ``reconnect_timeout``, ``silence_timeout``, as for
            the blocking client (:class:`~dspex_dspy.client.core.ClientOptions`).

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
        address: str | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        if stub is None and address is None:
            raise BridgeUnavailableError("an AsyncSessionContext needs a grpc.aio stub or an address")
        super().__init__(check_session_id(session_id), address=address, **options)
        self.stub = stub
        self._given_stub = stub is not None
        self._channel: grpc.aio.Channel | None = None
        self._retired: list[grpc.aio.Channel] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._feed: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @classmethod
    async def connect(
        cls, address: str | None = None, session_id: str | None = None, **options: Unpack[ConnectOptions]
    ) -> AsyncSessionContext:
        """Connect in the running loop; the arguments and errors are those of ``SessionContext.connect``.

        Raises:
            BridgeUnavailableError: nothing answered within ``timeout`` (or no address).
            SessionNotFoundError: no such session.
        """
        timeout, rest = connect_options(options)
        ctx = cls(None, check_session_id(session_id), address=resolve_address(address), **rest)
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
        if self._loop is loop and not self._forked():
            return
        if self.closed:
            raise BridgeUnavailableError("this AsyncSessionContext is closed")
        if self._forked():
            # grpc.aio does not support fork: a child must not touch what it inherited, nor start
            # grpc.aio again from the parent's state.
            raise DSPexError(
                f"this AsyncSessionContext (session {self.session_id}) was inherited by a forked process, "
                "and grpc.aio cannot be used after fork: start workers with the 'spawn' or 'forkserver' "
                "method, or use a SessionContext (it reconnects in a forked child)"
            )
        if self._loop is not None and not self._loop.is_closed():
            raise DSPexError(
                "this AsyncSessionContext belongs to another event loop (grpc.aio objects cannot move "
                "between loops); create one context per event loop"
            )
        if self._loop is not None and self._given_stub:
            raise DSPexError("the grpc.aio stub of this AsyncSessionContext belongs to an event loop that has closed")
        if not self._given_stub:
            self._open_channel()
        self._loop = loop
        self._changed = asyncio.Event()
        if self._cache is not None:
            self._cache.mark_down()
            self._cache.on_change = self._notify
            self._feed = loop.create_task(self._feed_cache(), name=f"dspex-cache-{self.session_id[:24]}")

    def _open_channel(self) -> None:
        assert self.address is not None
        target, options = channel_args(self.address, CLIENT_CHANNEL_OPTIONS)
        self._channel = secure_aio_channel(target, self.security, options)
        self.stub = pb_grpc.BridgeServiceStub(self._channel)

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
        channels, self._channel, self._retired = [self._channel, *self._retired], None, []
        for channel in channels:
            if channel is not None:
                await channel.close(None)

    def _close_at_exit(self) -> None:
        """Close in the context's loop if it still runs (another thread) or can run; else just stop streaming."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._streams.cancel_all()
        elif loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.close(), loop).result(self.call_timeout)
        else:
            loop.run_until_complete(self.close())

    async def __aenter__(self) -> AsyncSessionContext:
        self._bind()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @classmethod
    def _unpickle(cls, address: str, session_id: str, options: ClientOptions) -> AsyncSessionContext:
        """A new context for the same address, session and options; it connects lazily, in its first loop."""
        return cls(None, session_id, address=address, **options)

    def __repr__(self) -> str:
        return f"AsyncSessionContext(session_id={self.session_id!r}, address={self.address!r}, {self._state_text()})"

    async def _feed_cache(self) -> None:
        """The cache task: the :class:`CacheFeed` machine over aio streams, until closed."""
        cache = self._cache
        assert cache is not None
        feed = CacheFeed(cache, self.session_id)
        while not self.closed:
            stream = self.stub.WatchVariables(feed.request, metadata=(("source", WORKER),))  # never raises here
            self._streams.add(stream)
            feed.opened()
            failure: BaseException | None = None
            try:
                while (message := await _read(stream, feed.silence_left())) is not None:
                    if (listing := feed.on_message(message)) is not None:
                        feed.on_listing(await self._call(listing))
            except asyncio.CancelledError:
                if not self.closed:
                    raise
            except Exception as exc:  # any failure: log (in the machine), mark down, reconnect
                failure = exc
            finally:
                self._streams.discard(stream)
                stream.cancel()
            delay = feed.on_end(failure, closed=self.closed)
            if cache.silence.dead() and not self.closed and not self._given_stub and self._channel is not None:
                # The connection is dead: do not wait for keepalive to notice. Calls in flight on
                # the old channel end by their own deadline; it is closed at the next reopen.
                for retired in self._retired:
                    await retired.close(None)
                self._retired = [self._channel]
                self._open_channel()
            if not self.closed:
                await asyncio.sleep(delay)

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the cache serves reads (or ``timeout`` seconds pass); False if it did not."""
        return await self._wait_cache(self._synced_or_closed, timeout) and self.cache_synced

    async def wait_cached(self, name: str, version: int, timeout: float | None = None) -> bool:
        """Wait until the cache serves ``name`` at ``version`` or later; False on timeout."""
        return await self._wait_cache(self._arrived(name, version), timeout)

    async def _wait_cache(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        self._bind()
        return self._cache is not None and await self._wait(predicate, timeout) and not self.closed

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

    # ------------------------------------------------------------------ running operations

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

    async def _run(self, op: Op[_T]) -> _T:
        self._bind()
        return op.finish(None if op.call is None else await self._call(op.call))

    # ------------------------------------------------------------------ reads (see SessionContext)

    async def get_variable_record(self, name: str) -> Variable:
        """The whole :class:`~dspex_dspy.types.Variable` record of ``name`` (cache first)."""
        return await self._run(self._record_op(name))

    async def get_versioned(self, name: str) -> tuple[Any, int]:
        """``(value, version)`` of a variable: from the cache when synced and fresh, else the server."""
        return await self._run(self._versioned_op(name))

    async def get_versioned_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """``{name: (value, version)}`` from one cache snapshot or one ``GetVariables`` call.

        Raises:
            VariableNotFoundError: naming every variable that does not exist.
        """
        return await self._run(self._versioned_many_op(names))

    async def get_variable(self, name: str) -> Any:
        """The current value of a variable (``await ctx[name]`` does the same)."""
        return (await self._run(self._versioned_op(name)))[0]

    def __getitem__(self, name: str) -> Any:
        """``await ctx[name]``: a coroutine for the variable's value."""
        return self.get_variable(name)

    async def has_variable(self, name: str) -> bool:
        """Whether the session has a variable of that name (or id)."""
        return await self._run(self._has_op(name))

    async def get_variables(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of several variables; raises :class:`VariableNotFoundError` naming the missing ones."""
        return await self._run(self._values_op(names))

    async def list_variables(self, pattern: str | None = None) -> list[Variable]:
        """The session's variables in creation order (from the server); ``pattern`` is a ``*`` glob."""
        return await self._run(self._list_op(pattern))

    # ------------------------------------------------------------------ writes (see SessionContext)

    async def register_variable(self, name: str, type: str, value: Any, **options: Unpack[DefineOptions]) -> str:
        """Define a new variable in the session and return its id (see ``SessionContext.register_variable``)."""
        return await self._run(self._register_op(name, type, value, options))

    async def set_variable(
        self, name: str, value: Any, *, metadata: Meta = None, expected_version: int | None = None
    ) -> int:
        """Write a variable and return its new version (see ``SessionContext.set_variable``)."""
        return await self._run(self._set_op(name, value, metadata, expected_version))

    async def update_variable(
        self, name: str, value: Any, *, metadata: Meta = None, expected_version: int | None = None
    ) -> int:
        """Deprecated alias of :meth:`set_variable` (it *sets*; :meth:`update` is read-modify-write)."""
        deprecated("update_variable", "set_variable")
        return await self._run(self._set_op(name, value, metadata, expected_version))

    async def update_variables(
        self, updates: Mapping[str, Any], *, atomic: bool = True, metadata: Meta = None
    ) -> dict[str, int]:
        """Deprecated alias of :meth:`set_variables` (kept for one release; it warns)."""
        deprecated("update_variables", "set_variables")
        return await self._run(self._batch_op(updates, atomic, metadata))

    async def set_variables(
        self, updates: Mapping[str, Any], *, atomic: bool = True, metadata: Meta = None
    ) -> dict[str, int]:
        """Write several variables; ``{name: new version}`` or :class:`BatchUpdateError`."""
        return await self._run(self._batch_op(updates, atomic, metadata))

    async def delete_variable(self, name: str) -> None:
        """Delete a variable (watchers see ``deleted``)."""
        await self._run(self._delete_op(name))

    async def start_optimization(
        self, names: Sequence[str], optimizer_id: str, *, ttl: float = DEFAULT_LEASE_SECONDS
    ) -> OptimizationLease:
        """Take (or renew) an optimization lease (see ``SessionContext.start_optimization``)."""
        return await self._run(self._start_optimization_op(names, optimizer_id, ttl))

    async def stop_optimization(self, lease: OptimizationLease | str, *, force: bool = False) -> None:
        """End a lease (see ``SessionContext.stop_optimization``)."""
        await self._run(self._stop_optimization_op(lease, force))

    def watch_variables(self, names: Iterable[str] | None = None, include_initial: bool = True) -> AsyncVariableWatch:
        """An async iterator over changes of some variables (None: all); see ``SessionContext.watch_variables``.

        Example:
            >>> async for event in ctx.watch_variables(["temperature"]):  # doctest: +SKIP
            ...     print(event.value)
        """
        return AsyncVariableWatch(self, list(names or ()), include_initial)

    # ------------------------------------------------------------------ history, rollback, update, watch

    async def history(self, name: str, limit: int = 0) -> list[HistoryEntry]:
        """The variable's remembered writes, newest first (see ``SessionContext.history``)."""
        return await self._call(BridgeCalls.get_history(self.session_id, name, limit))

    async def rollback(self, name: str, version: int) -> int:
        """Write a remembered version's value as a new version (see ``SessionContext.rollback``)."""
        var = await self._call(BridgeCalls.rollback_variable(self.session_id, name, version, source=WORKER))
        return self._written(name, var.version, var.value, None)

    async def update(self, name: str, fn: Callable[[Any], Any], *, max_attempts: int = 64) -> int:
        """Atomically replace the value with ``fn(value)`` (see ``SessionContext.update``)."""

        async def read(attempt: int) -> tuple[Any, int]:
            if attempt == 0:
                return await self.get_versioned(name)
            var = await self._call(BridgeCalls.get_variable(self.session_id, name))
            return detached(var.value), var.version

        async def write(value: Any, version: int) -> int:
            return await self.set_variable(name, value, expected_version=version)

        return await acas_update(name, read, write, fn, max_attempts=max_attempts)

    def watch(
        self,
        names: Iterable[str] | None = None,
        *,
        callback: Callable[[WatchEvent], Any] | None = None,
        include_initial: bool = True,
    ) -> AsyncVariableWatch | AsyncCallbackWatch:
        """An async iterator over changes, or with ``callback`` (plain or async) a running task.

        The callback form must be called inside the running event loop. Watches coalesce; the
        change log is :meth:`history`.
        """
        events = self.watch_variables(names, include_initial)
        if callback is None:
            return events
        return AsyncCallbackWatch(events, callback)


class AsyncVariableWatch(AsyncIterator[WatchEvent]):
    """The async iterator :meth:`AsyncSessionContext.watch_variables` returns; see ``VariableWatch``."""

    def __init__(self, ctx: AsyncSessionContext, identifiers: list[str], include_initial: bool) -> None:
        self._ctx = ctx
        self._stopped_flag = False
        self._stream: Any = None
        machine = self._machine = ctx._watch_machine(identifiers, include_initial)
        self._events = self._run_cached(machine) if isinstance(machine, CachedWatch) else self._run_stream(machine)

    def __aiter__(self) -> AsyncVariableWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop the watch (iteration then ends). Idempotent."""
        self._stopped_flag = True
        if self._stream is not None:
            self._stream.cancel()
        if isinstance(self._machine, CachedWatch):
            self._machine.cache.release(self._machine.sub)  # wakes a reader waiting in another task
        with contextlib.suppress(RuntimeError):  # running in another task: the cancelled stream ends it
            await self._events.aclose()

    async def __aenter__(self) -> AsyncVariableWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _stopped(self) -> bool:
        return self._stopped_flag or self._ctx.closed

    async def _checked(self, machine: CachedWatch, call: BridgeCall[Listing] | None) -> None:
        listing: Listing | None = None
        with contextlib.suppress(BridgeUnavailableError):
            listing = await self._ctx._call(call) if call is not None else ([], [])
        machine.checked(listing)

    async def _run_cached(self, machine: CachedWatch) -> AsyncGenerator[WatchEvent, None]:
        """Events from the cache's own stream (the :class:`CachedWatch` machine)."""
        ctx = self._ctx
        if self._stopped():
            return
        ctx._bind()  # starts the cache task in this loop
        await self._checked(machine, machine.start())
        try:
            while not self._stopped():
                step = machine.step()
                if step.woken is None:
                    await self._checked(machine, step.check)
                    for event in step.events:
                        if self._stopped():
                            return
                        yield event
                else:
                    await ctx._wait(step.woken(self._stopped), step.wait)
        finally:
            machine.stop()

    async def _run_stream(self, machine: StreamWatch) -> AsyncGenerator[WatchEvent, None]:
        """Events from a stream of the watch's own (the :class:`StreamWatch` machine)."""
        ctx = self._ctx
        while not self._stopped():
            failure: BaseException | None = None
            try:
                if (check := machine.opened()) is not None:
                    machine.checked(await ctx._call(check))
                ctx._bind()
                self._stream = stream = ctx.stub.WatchVariables(machine.request, metadata=(("source", WORKER),))
                ctx._streams.add(stream)
                while (message := await _read(stream)) is not None:
                    events, listing = machine.on_message(message)
                    if listing is not None:
                        events += machine.on_listing(await ctx._call(listing))
                    for event in events:
                        yield event
            except (grpc.RpcError, DSPexError) as exc:
                failure = exc
            except asyncio.CancelledError:
                if self._stopped():
                    return
                raise
            finally:
                if self._stream is not None:
                    ctx._streams.discard(self._stream)
                    self._stream.cancel()
                    self._stream = None
            if self._stopped():
                return
            await asyncio.sleep(machine.on_end(failure))
