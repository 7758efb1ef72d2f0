"""The Variables API: define, read, write, watch and roll back variables, on either side of a bridge.

Functions take the context first, as in DSPex (``Variables.get(ctx, "temperature")``). ``ctx`` is
an orchestrator :class:`~dspex_dspy.Context` (local or bridged, and across a switch) or a worker's
:class:`~dspex_dspy.SessionContext`: the same call means the same thing on both. A worker's
:class:`~dspex_dspy.AsyncSessionContext` takes the ``a``-prefixed coroutines
(``await Variables.aget(actx, "temperature")``), which also accept the other two.

Metadata: a variable's own metadata is given when it is defined (``defvariable(..., metadata=)``).
The metadata given with one write (``set(..., metadata=)``) describes that write: it is kept in
the write's history entry, sent to watchers, and shown on top of the variable's own metadata by
:func:`Variables.get_variable` for the version that write made only; the next write replaces it,
so it never sticks to later versions.

Watches coalesce: a slow watcher sees the latest value of each variable, not every write; the
complete change log of a variable is :func:`Variables.history`.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union, overload

from dspex_dspy.context import Context
from dspex_dspy.display import History, VariableList
from dspex_dspy.errors import DSPexError, ValidationError, VariableNotFoundError, VersionConflictError
from dspex_dspy.leases import DEFAULT_LEASE_SECONDS, FORCE_METADATA_KEY, OptimizationLease
from dspex_dspy.ops import CallbackWatch, ContextWatch, EventStream, WatchEvent
from dspex_dspy.records import HistoryEntry
from dspex_dspy.types import Variable, is_secret

if TYPE_CHECKING:
    from dspex_dspy.client import AsyncSessionContext, SessionContext
    from dspex_dspy.state import StateProvider

__all__ = ["UPDATE_BACKOFF_BASE", "UPDATE_BACKOFF_CAP", "AnyContext", "Variables", "backoff_delays"]

_MISSING: Any = object()

#: First and largest pause between two attempts of :meth:`Variables.update` (seconds).
UPDATE_BACKOFF_BASE = 0.001
UPDATE_BACKOFF_CAP = 0.1


def backoff_delays(
    attempts: int, base: float = UPDATE_BACKOFF_BASE, cap: float = UPDATE_BACKOFF_CAP
) -> Iterator[float]:
    """The upper bounds of the pauses between ``attempts`` tries: doubling from ``base``, at most ``cap``.

    Example:
        >>> [round(d, 3) for d in backoff_delays(5, 0.01, 0.05)]
        [0.01, 0.02, 0.04, 0.05]
    """
    delay = base
    for _ in builtins.range(attempts - 1):
        yield min(delay, cap)
        delay *= 2


#: What the synchronous functions accept: an orchestrator Context or a worker SessionContext.
AnyContext = Union[Context, "SessionContext"]


def _is_async_worker(ctx: Any) -> bool:
    return hasattr(ctx, "session_id") and inspect.iscoroutinefunction(getattr(ctx, "get_versioned", None))


def _is_worker(ctx: Any) -> bool:
    return hasattr(ctx, "session_id") and callable(getattr(ctx, "set_variable", None))


def _live(ctx: Context) -> Any:
    provider = ctx._provider
    if provider.kind == "stopped":
        raise DSPexError(f"context {ctx.id} is stopped")
    return provider


class _Worker:
    """A worker client seen through the provider methods the Variables functions use."""

    kind = "worker"

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def get(self, name: str) -> Any:
        return self.ctx.get_variable(name)

    def get_versioned(self, name: str) -> tuple[Any, int]:
        result: tuple[Any, int] = self.ctx.get_versioned(name)
        return result

    def get_variable(self, name: str) -> Variable:
        var: Variable = self.ctx.get_variable_record(name)
        return var

    def set(self, name: str, value: Any, *, metadata: Any = None, expected_version: int | None = None) -> int:
        version: int = self.ctx.set_variable(name, value, metadata=metadata, expected_version=expected_version)
        return version

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        values: dict[str, Any] = self.ctx.get_variables(names)
        return values

    def update_many(
        self, updates: Mapping[str, Any], *, atomic: bool = True, metadata: Mapping[str, Any] | None = None
    ) -> dict[str, int]:
        versions: dict[str, int] = self.ctx.set_variables(updates, atomic=atomic, metadata=metadata)
        return versions

    def list(self) -> builtins.list[Variable]:
        variables: builtins.list[Variable] = self.ctx.list_variables()
        return variables

    def delete(self, name: str) -> None:
        self.ctx.delete_variable(name)

    def exists(self, name: str) -> bool:
        return bool(self.ctx.has_variable(name))

    def history(self, name: str, limit: int = 0) -> builtins.list[HistoryEntry]:
        entries: builtins.list[HistoryEntry] = self.ctx.history(name, limit)
        return entries

    def rollback(self, name: str, version: int) -> int:
        new_version: int = self.ctx.rollback(name, version)
        return new_version


def _target(ctx: Any) -> StateProvider | _Worker:
    """The provider behind ``ctx`` (a Context's current backend, or a worker client adapter)."""
    if isinstance(ctx, Context):
        return ctx._provider
    if _is_async_worker(ctx):
        raise TypeError(
            f"{type(ctx).__name__} is asynchronous: use the a-prefixed coroutines "
            "(e.g. await Variables.aget(ctx, name))"
        )
    if _is_worker(ctx):
        return _Worker(ctx)
    raise TypeError(f"Variables functions take a Context or a SessionContext, got {type(ctx).__name__}")


_END: Any = object()


class _ThreadedEvents(AsyncIterator[WatchEvent]):
    """A blocking watch iterator read from a worker thread, for ``async for``."""

    def __init__(self, events: Any) -> None:
        self._events = events

    def __aiter__(self) -> _ThreadedEvents:
        return self

    async def __anext__(self) -> WatchEvent:
        event = await asyncio.to_thread(next, self._events, _END)
        if event is _END:
            raise StopAsyncIteration
        result: WatchEvent = event
        return result

    async def aclose(self) -> None:
        self._events.close()


class Variables:
    """Operations on the variables of a :class:`~dspex_dspy.Context` or a worker client (all static).

    Example:
        >>> from dspex_dspy import Context, Variables
        >>> ctx = Context()
        >>> _ = Variables.defvariable(ctx, "tokens", "integer", 256, constraints={"min": 1, "max": 4096})
        >>> Variables.update(ctx, "tokens", lambda n: n * 2)
        2
        >>> Variables.get(ctx, "tokens")
        512
    """

    @staticmethod
    def defvariable(
        ctx: AnyContext,
        name: str,
        type: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Define a variable and return its id.

        Args:
            ctx: the context.
            name: unique within the context.
            type: ``float``, ``integer``, ``string``, ``boolean``, ``choice``, ``module``,
                ``embedding`` or ``tensor``.
            value: the initial value (validated and normalised).
            constraints: e.g. ``{"min": 0.0, "max": 2.0}``, ``{"enum": [...]}``, ``{"pattern": "..."}``.
            description: free text.
            metadata: ``str -> str`` annotations.

        Raises:
            ValidationError: bad name, type, constraints or value.
            VariableExistsError: the name is taken.
        """
        target = _target(ctx)
        if isinstance(target, _Worker):
            var_id: str = target.ctx.register_variable(
                name, type, value, constraints=constraints, description=description, metadata=metadata
            )
            return var_id
        var = target.register(
            name, type, value, constraints=constraints, description=description or "", metadata=metadata
        )
        return str(var.id)

    @staticmethod
    def get(ctx: AnyContext, name: str, default: Any = _MISSING) -> Any:
        """The variable's current value, or ``default`` if it does not exist.

        Raises:
            VariableNotFoundError: no such variable and no default given.
        """
        try:
            return ctx.get_variable(name) if isinstance(ctx, Context) else _target(ctx).get(name)
        except VariableNotFoundError:
            if default is _MISSING:
                raise
            return default

    @staticmethod
    def get_variable(ctx: AnyContext, name: str) -> Variable:
        """The whole :class:`~dspex_dspy.types.Variable` record (value, version, metadata ...).

        On a worker this is ``SessionContext.get_variable_record`` (the worker's ``get_variable``
        is the snakepit method returning the value).
        """
        if isinstance(ctx, Context):
            return ctx.get_variable_record(name)
        return _target(ctx).get_variable(name)

    @staticmethod
    def set(
        ctx: AnyContext,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        force: bool = False,
    ) -> int:
        """Write a value and return the new version.

        Args:
            metadata: ``str -> str`` describing this write (who, why): kept in its history entry,
                sent to watchers and shown on this version only (it never sticks to later ones).
            expected_version: when non-zero, write only if this is the current version
                (compare-and-swap); otherwise raise :class:`VersionConflictError`.
            force: write even though an optimizer's lease holds the variable; the write records
                ``forced_over: <optimizer id>`` in its metadata (shown on the version it made).

        Raises:
            ValidationError: the value breaks the type or a constraint (nothing changes).
            VersionConflictError: ``expected_version`` is stale (nothing changes).
            VariableLockedError: another optimizer's lease holds the variable (nothing changes).
        """
        if isinstance(ctx, Context):
            return ctx._provider.set(name, value, metadata=metadata, expected_version=expected_version, force=force)
        if force:
            metadata = {**(metadata or {}), FORCE_METADATA_KEY: "true"}
        return _target(ctx).set(name, value, metadata=metadata, expected_version=expected_version)

    @staticmethod
    def update(ctx: AnyContext, name: str, fn: Callable[[Any], Any], *, max_attempts: int = 64) -> int:
        """Atomically replace the value with ``fn(value)``; return the new version.

        A compare-and-swap loop: concurrent writers (in any process) never lose an update. After a
        conflict it pauses a random time up to a bound that doubles from 1 ms to at most 100 ms
        (:func:`backoff_delays`), so contending writers spread out. ``fn`` may run more than once,
        so it must not have side effects. On a worker this is ``SessionContext.update``.

        Raises:
            VersionConflictError: every one of ``max_attempts`` tries lost to another writer;
                ``expected``/``actual`` are the versions of the last try.
            ValidationError: ``max_attempts`` is not a positive integer, or ``fn``'s result is rejected.
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValidationError(name, "max_attempts", max_attempts, "max_attempts must be a positive integer")
        if not isinstance(ctx, Context):
            target = _target(ctx)
            assert isinstance(target, _Worker)
            version: int = target.ctx.update(name, fn, max_attempts=max_attempts)
            return version
        pauses = backoff_delays(max_attempts)
        provider = ctx.provider
        while True:
            value, current = ctx.get_versioned(name)
            try:
                return provider.set(name, fn(value), expected_version=current)
            except VersionConflictError as exc:
                conflict = exc
            pause = next(pauses, None)
            if pause is None:
                break
            time.sleep(random.uniform(0, pause))
            provider = ctx.provider
        error = VersionConflictError(name, conflict.expected, conflict.actual)
        error.message = (
            f"{name}: update gave up after {max_attempts} attempts, each lost to a concurrent write "
            f"(last: expected version {conflict.expected} but the current version was {conflict.actual})"
        )
        error.args = (error.message,)
        raise error

    @staticmethod
    def get_many(ctx: AnyContext, names: Iterable[str]) -> dict[str, Any]:
        """Values of several variables, by name.

        Raises:
            VariableNotFoundError: naming every missing variable.
        """
        if isinstance(ctx, Context):
            return ctx.get_variables(names)
        return _target(ctx).get_many(names)

    @staticmethod
    def update_many(
        ctx: AnyContext,
        updates: Mapping[str, Any],
        *,
        atomic: bool = True,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> dict[str, int]:
        """Write several variables; return their new versions.

        ``atomic=True`` (default) validates every value first and applies all or none.
        ``atomic=False`` applies what it can. ``metadata`` is merged into every variable written
        (an optimizer names itself with ``optimizer_id`` to write through its own lease);
        ``force`` writes through other optimizers' leases.

        Raises:
            BatchUpdateError: some writes were rejected; ``.errors`` says which and why and
                ``.new_versions`` lists the writes applied (none when atomic).
        """
        if isinstance(ctx, Context):
            return ctx._provider.update_many(updates, atomic=atomic, metadata=metadata, force=force)
        if force:
            metadata = {**(metadata or {}), FORCE_METADATA_KEY: "true"}
        return _target(ctx).update_many(updates, atomic=atomic, metadata=metadata)

    @staticmethod
    def start_optimization(
        ctx: Context,
        names: Sequence[str],
        optimizer_id: str,
        *,
        ttl: float = DEFAULT_LEASE_SECONDS,
    ) -> OptimizationLease:
        """Take an optimization lease on ``names`` for ``optimizer_id``; call again to renew it.

        While the lease holds (``ttl`` seconds after its last start or renewal), writes to those
        variables are refused with :class:`~dspex_dspy.errors.VariableLockedError` unless they
        carry ``metadata={"optimizer_id": optimizer_id}`` or are forced, and no other optimizer
        can take any of them. Reads and watches are not affected; ``Variable.optimization_status``
        shows the lease.

        Example:
            >>> lease = Variables.start_optimization(ctx, ["temperature"], "tuner-1", ttl=30)  # doctest: +SKIP
            >>> Variables.stop_optimization(ctx, lease)                                        # doctest: +SKIP

        Raises:
            VariableLockedError: another optimizer holds one of the variables (nothing changes).
            VariableNotFoundError: a variable does not exist.
            ValidationError: a bad optimizer id, ttl or list of names.
        """
        return ctx._provider.start_optimization(list(names), optimizer_id, ttl=ttl)

    @staticmethod
    def renew_optimization(ctx: Context, lease: OptimizationLease) -> OptimizationLease:
        """Extend a lease by its ttl (a heartbeat); the same as starting it again."""
        return ctx._provider.start_optimization(list(lease.variables), lease.optimizer_id, ttl=lease.ttl)

    @staticmethod
    def stop_optimization(ctx: Context, lease: OptimizationLease | str, *, force: bool = False) -> None:
        """End a lease: pass the lease (or its id), or a variable name with ``force=True``.

        Stopping a lease that already ended does nothing.

        Raises:
            VariableLockedError: a variable is named without ``force`` while a lease holds it.
        """
        target = lease.id if isinstance(lease, OptimizationLease) else lease
        ctx._provider.stop_optimization(target, force=force)

    @staticmethod
    def list(ctx: AnyContext) -> VariableList:
        """Every variable, in creation order (a list that shows itself as a table in Jupyter)."""
        return VariableList(_target(ctx).list())

    @staticmethod
    def delete(ctx: AnyContext, name: str) -> None:
        """Remove a variable. Raises :class:`VariableNotFoundError` if it does not exist."""
        _target(ctx).delete(name)

    @staticmethod
    def exists(ctx: AnyContext, name: str) -> bool:
        """Whether the context has a variable of that name."""
        if isinstance(ctx, Context):
            return ctx.has_variable(name)
        return _target(ctx).exists(name)

    # ------------------------------------------------------------------ history, rollback, watch

    @staticmethod
    def history(ctx: AnyContext, name: str, *, limit: int = 0) -> History:
        """The variable's remembered writes, newest first: the change log of a variable.

        Each :class:`~dspex_dspy.store.HistoryEntry` has ``version``, ``value``, ``timestamp``,
        ``changed_by`` and the ``metadata`` given with that write. Every backend remembers the
        last 100 writes per variable by default (a bridge: ``StoreLimits.history_limit``).

        Args:
            limit: when > 0, only the newest ``limit`` entries.

        Raises:
            VariableNotFoundError: no such variable.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
        # The record first: a value written while the variable was secret never shows afterwards.
        secret = is_secret(Variables.get_variable(ctx, name).metadata)
        return History(_target(ctx).history(name, limit), name, secret=secret)

    @staticmethod
    def rollback(ctx: AnyContext, name: str, version: int) -> int:
        """Write the value the variable had at a remembered ``version`` as a new version; return it.

        A rollback is a write: the version grows, watchers see it, and its history entry carries
        ``{"rolled_back_to": "<version>"}``.

        Raises:
            ValidationError: ``version`` is not in the remembered history (nothing changes).
            VariableNotFoundError: no such variable.
        """
        return _target(ctx).rollback(name, version)

    @overload
    @staticmethod
    def watch(
        ctx: AnyContext,
        names: Iterable[str] | None = None,
        *,
        callback: None = None,
        include_initial: bool = True,
    ) -> EventStream: ...

    @overload
    @staticmethod
    def watch(
        ctx: AnyContext,
        names: Iterable[str] | None = None,
        *,
        callback: Callable[[WatchEvent], Any],
        include_initial: bool = True,
    ) -> CallbackWatch: ...

    @staticmethod
    def watch(
        ctx: AnyContext,
        names: Iterable[str] | None = None,
        *,
        callback: Callable[[WatchEvent], Any] | None = None,
        include_initial: bool = True,
    ) -> EventStream | CallbackWatch:
        """Watch some variables (None or empty: every variable, including new ones).

        Without ``callback``: an iterator of :class:`~dspex_dspy.ops.WatchEvent` (stop it with
        ``close()`` or a ``with`` block). With ``callback``: a :class:`~dspex_dspy.ops.CallbackWatch`
        whose thread calls ``callback(event)`` for each event until ``close()``.

        Watches **coalesce**: a slow watcher receives the latest value of each variable, not every
        write (per variable the versions strictly increase, and the last event is the latest
        value). Use :meth:`history` for the complete change log. A Context's watch follows it
        across a switch from local to bridged.

        Raises:
            VariableNotFoundError: a named variable does not exist.
        """
        wanted = builtins.list(names or ())
        if isinstance(ctx, Context):
            context = ctx
            events: Any = ContextWatch(lambda: _live(context), wanted, include_initial)
        else:
            target = _target(ctx)
            assert isinstance(target, _Worker)
            events = target.ctx.watch_variables(wanted, include_initial)
        if callback is None:
            result: EventStream = events
            return result
        return CallbackWatch(events, callback)

    # ------------------------------------------------------------------ asyncio

    @staticmethod
    async def adefvariable(
        ctx: AnyContext | AsyncSessionContext,
        name: str,
        type: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """:meth:`defvariable` for an AsyncSessionContext (other contexts run the blocking call)."""
        if not _is_async_worker(ctx):
            return Variables.defvariable(
                ctx,  # type: ignore[arg-type]
                name,
                type,
                value,
                constraints=constraints,
                description=description,
                metadata=metadata,
            )
        worker: Any = ctx
        var_id: str = await worker.register_variable(
            name, type, value, constraints=constraints, description=description, metadata=metadata
        )
        return var_id

    @staticmethod
    async def aget(ctx: AnyContext | AsyncSessionContext, name: str, default: Any = _MISSING) -> Any:
        """:meth:`get` for an AsyncSessionContext (other contexts run the blocking call)."""
        if not _is_async_worker(ctx):
            return Variables.get(ctx, name, default)  # type: ignore[arg-type]
        worker: Any = ctx
        try:
            return await worker.get_variable(name)
        except VariableNotFoundError:
            if default is _MISSING:
                raise
            return default

    @staticmethod
    async def aget_variable(ctx: AnyContext | AsyncSessionContext, name: str) -> Variable:
        """:meth:`get_variable` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.get_variable(ctx, name)  # type: ignore[arg-type]
        worker: Any = ctx
        var: Variable = await worker.get_variable_record(name)
        return var

    @staticmethod
    async def aset(
        ctx: AnyContext | AsyncSessionContext,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> int:
        """:meth:`set` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.set(ctx, name, value, metadata=metadata, expected_version=expected_version)  # type: ignore[arg-type]
        worker: Any = ctx
        version: int = await worker.set_variable(name, value, metadata=metadata, expected_version=expected_version)
        return version

    @staticmethod
    async def aupdate(
        ctx: AnyContext | AsyncSessionContext, name: str, fn: Callable[[Any], Any], *, max_attempts: int = 64
    ) -> int:
        """:meth:`update` (atomic read-modify-write) for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.update(ctx, name, fn, max_attempts=max_attempts)  # type: ignore[arg-type]
        worker: Any = ctx
        version: int = await worker.update(name, fn, max_attempts=max_attempts)
        return version

    @staticmethod
    async def aget_many(ctx: AnyContext | AsyncSessionContext, names: Iterable[str]) -> dict[str, Any]:
        """:meth:`get_many` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.get_many(ctx, names)  # type: ignore[arg-type]
        worker: Any = ctx
        values: dict[str, Any] = await worker.get_variables(names)
        return values

    @staticmethod
    async def aupdate_many(
        ctx: AnyContext | AsyncSessionContext, updates: Mapping[str, Any], *, atomic: bool = True
    ) -> dict[str, int]:
        """:meth:`update_many` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.update_many(ctx, updates, atomic=atomic)  # type: ignore[arg-type]
        worker: Any = ctx
        versions: dict[str, int] = await worker.set_variables(updates, atomic=atomic)
        return versions

    @staticmethod
    async def alist(ctx: AnyContext | AsyncSessionContext) -> VariableList:
        """:meth:`list` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.list(ctx)  # type: ignore[arg-type]
        worker: Any = ctx
        return VariableList(await worker.list_variables())

    @staticmethod
    async def adelete(ctx: AnyContext | AsyncSessionContext, name: str) -> None:
        """:meth:`delete` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            Variables.delete(ctx, name)  # type: ignore[arg-type]
            return
        worker: Any = ctx
        await worker.delete_variable(name)

    @staticmethod
    async def aexists(ctx: AnyContext | AsyncSessionContext, name: str) -> bool:
        """:meth:`exists` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.exists(ctx, name)  # type: ignore[arg-type]
        worker: Any = ctx
        return bool(await worker.has_variable(name))

    @staticmethod
    async def ahistory(ctx: AnyContext | AsyncSessionContext, name: str, *, limit: int = 0) -> History:
        """:meth:`history` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.history(ctx, name, limit=limit)  # type: ignore[arg-type]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
        worker: Any = ctx
        record = await worker.get_variable_record(name)
        return History(await worker.history(name, limit), name, secret=is_secret(record.metadata))

    @staticmethod
    async def arollback(ctx: AnyContext | AsyncSessionContext, name: str, version: int) -> int:
        """:meth:`rollback` for an AsyncSessionContext."""
        if not _is_async_worker(ctx):
            return Variables.rollback(ctx, name, version)  # type: ignore[arg-type]
        worker: Any = ctx
        new_version: int = await worker.rollback(name, version)
        return new_version

    @staticmethod
    def awatch(
        ctx: AnyContext | AsyncSessionContext,
        names: Iterable[str] | None = None,
        *,
        callback: Callable[[WatchEvent], Any] | None = None,
        include_initial: bool = True,
    ) -> Any:
        """:meth:`watch` for ``async for``: an async iterator, or with ``callback`` a running task.

        On an AsyncSessionContext this is its own watch; a Context's or SessionContext's blocking
        watch is read from a worker thread. With ``callback`` (a plain or a coroutine function)
        it returns an :class:`~dspex_dspy.ops.AsyncCallbackWatch`, so call it inside the running
        loop. Watches coalesce; see :meth:`watch`.
        """
        from dspex_dspy.ops import AsyncCallbackWatch

        if _is_async_worker(ctx):
            worker: Any = ctx
            return worker.watch(names, callback=callback, include_initial=include_initial)
        events = _ThreadedEvents(Variables.watch(ctx, names, include_initial=include_initial))  # type: ignore[arg-type]
        if callback is None:
            return events
        return AsyncCallbackWatch(events, callback)
