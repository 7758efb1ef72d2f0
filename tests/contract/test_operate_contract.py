"""History, rollback, watch and atomic update through ``Variables``, the same on every side.

Each test runs on five targets: a local Context, a Context bridged to the embedded bridge, a
Context bridged to a ``dspex-bridge serve`` subprocess, a blocking worker (``SessionContext``) and
an asyncio worker (``AsyncSessionContext``, through the ``a``-prefixed coroutines, on its own event
loop). Write metadata belongs to the write (its history entry), never to the variable.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from dspex_dspy import AsyncSessionContext, Context, SessionContext, Variables
from dspex_dspy.errors import ValidationError, VariableNotFoundError, VersionConflictError
from dspex_dspy.limits import Limits
from dspex_dspy.ops import WatchEvent
from dspex_dspy.state import LocalState

pytestmark = pytest.mark.integration

TARGETS = ("local", "embedded", "remote", "sync-worker", "async-worker")
DEADLINE = 30.0


class Loop:
    """An event loop in a background thread; ``run(coro)`` waits for the coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


class Api:
    """One target seen through Variables: blocking calls, or the a-coroutines on a loop."""

    def __init__(self, target: Any, loop: Loop | None, orchestrator: Context) -> None:
        self.target = target
        self.loop = loop
        self.orchestrator = orchestrator

    def __call__(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self.loop is None:
            return getattr(Variables, op)(self.target, *args, **kwargs)
        return self.loop.run(getattr(Variables, "a" + op)(self.target, *args, **kwargs))

    def watch(self, names: list[str], *, callback: bool = False) -> tuple[queue.Queue[Any], Callable[[], None]]:
        """Start a watch that puts each event in a queue; return (queue, stop)."""
        events: queue.Queue[Any] = queue.Queue()
        if self.loop is None:
            if callback:
                handle = Variables.watch(self.target, names, callback=events.put)
                return events, handle.close  # type: ignore[union-attr]
            watch = Variables.watch(self.target, names)

            def drain() -> None:
                try:
                    for event in watch:
                        events.put(event)
                except Exception as exc:
                    events.put(exc)

            threading.Thread(target=drain, daemon=True).start()
            return events, watch.close  # type: ignore[attr-defined]
        loop = self.loop
        if callback:

            async def start() -> Any:
                return Variables.awatch(self.target, names, callback=events.put)

            handle = loop.run(start())
            return events, lambda: loop.run(handle.aclose())
        watch = Variables.awatch(self.target, names)

        async def drain_async() -> None:
            try:
                async for event in watch:
                    events.put(event)
            except Exception as exc:
                events.put(exc)

        future = asyncio.run_coroutine_threadsafe(drain_async(), loop.loop)

        def stop() -> None:
            loop.run(watch.aclose())
            future.cancel()

        return events, stop


@pytest.fixture(params=TARGETS)
def api(request: pytest.FixtureRequest) -> Iterator[Api]:
    kind = str(request.param)
    address = request.getfixturevalue("remote_bridge").address if kind in ("remote", "async-worker") else None
    ctx = Context(bridge=address)
    cleanup: list[Callable[[], None]] = []
    try:
        if kind == "local":
            yield Api(ctx, None, ctx)
            return
        ctx.ensure_bridged()
        if kind in ("embedded", "remote"):
            yield Api(ctx, None, ctx)
        elif kind == "sync-worker":
            worker = SessionContext.connect(ctx.bridge_address, ctx.id)
            cleanup.append(worker.close)
            yield Api(worker, None, ctx)
        else:
            loop = Loop()
            cleanup.append(loop.stop)
            aworker = loop.run(AsyncSessionContext.connect(ctx.bridge_address, ctx.id))
            cleanup.append(lambda: loop.run(aworker.close()))
            yield Api(aworker, loop, ctx)
    finally:
        for step in reversed(cleanup):
            step()
        ctx.stop()


def next_event(events: queue.Queue[Any], predicate: Callable[[WatchEvent], bool]) -> list[WatchEvent]:
    """Events up to and including the first for which ``predicate`` holds (bounded wait)."""
    seen: list[WatchEvent] = []
    while True:
        item = events.get(timeout=DEADLINE)
        if isinstance(item, BaseException):
            raise item
        seen.append(item)
        if predicate(item):
            return seen


# ------------------------------------------------------------------ history


def test_history_is_newest_first_with_each_writes_metadata(api: Api) -> None:
    api("defvariable", "t", "float", 0.5, constraints={"min": 0.0, "max": 2.0})
    api("set", "t", 0.7, metadata={"reason": "warmer"})
    api("set", "t", 0.9)
    history = api("history", "t")
    assert [(e.version, e.value) for e in history] == [(3, 0.9), (2, 0.7), (1, 0.5)]
    assert history[0].metadata == {}
    assert history[1].metadata == {"reason": "warmer"}
    assert all(e.timestamp > 0 and e.changed_by for e in history)
    assert [e.version for e in api("history", "t", limit=2)] == [3, 2]


def test_history_of_an_unknown_variable_raises(api: Api) -> None:
    with pytest.raises(VariableNotFoundError):
        api("history", "ghost")


def test_write_metadata_belongs_to_the_write(api: Api) -> None:
    api("defvariable", "m", "integer", 0, metadata={"owner": "team-a"})
    api("set", "m", 1, metadata={"reason": "tune", "owner": "someone-else"})
    api("set", "m", 2)
    meta = api("get_variable", "m").metadata
    assert meta["owner"] == "team-a"
    assert "reason" not in meta
    newest, tuned = api("history", "m", limit=2)
    assert newest.metadata == {}
    assert tuned.metadata == {"reason": "tune", "owner": "someone-else"}
    # The orchestrator's own view agrees with the worker's.
    assert "reason" not in Variables.get_variable(api.orchestrator, "m").metadata


# ------------------------------------------------------------------ rollback


def test_rollback_is_a_new_version_with_the_old_value(api: Api) -> None:
    api("defvariable", "model", "string", "small")
    api("set", "model", "large")
    api("set", "model", "huge")
    assert api("rollback", "model", 1) == 4
    assert api("get", "model") == "small"
    assert api("get_variable", "model").version == 4
    newest = api("history", "model", limit=1)[0]
    assert (newest.version, newest.value, newest.metadata) == (4, "small", {"rolled_back_to": "1"})
    assert Variables.get(api.orchestrator, "model") == "small"


def test_rollback_to_an_unknown_version_changes_nothing(api: Api) -> None:
    api("defvariable", "n", "integer", 1)
    api("set", "n", 2)
    for target in (0, 7):
        with pytest.raises(ValidationError, match="not in the remembered history"):
            api("rollback", "n", target)
    assert (api("get", "n"), api("get_variable", "n").version) == (2, 2)
    with pytest.raises(VariableNotFoundError):
        api("rollback", "ghost", 1)


# ------------------------------------------------------------------ atomic update


def test_update_is_atomic_under_concurrent_writers(api: Api) -> None:
    api("defvariable", "counter", "integer", 0)
    rounds, writers = 10, 4
    if api.loop is not None:
        loop = api.loop

        async def bump_many() -> None:
            async def bump() -> None:
                for _ in range(rounds):
                    await Variables.aupdate(api.target, "counter", lambda n: n + 1)

            await asyncio.gather(*(bump() for _ in range(writers)))

        loop.run(bump_many())
        # A concurrent writer on the orchestrator side, too.
        Variables.update(api.orchestrator, "counter", lambda n: n + 1)
    else:
        errors: list[BaseException] = []

        def bump() -> None:
            try:
                for _ in range(rounds):
                    api("update", "counter", lambda n: n + 1)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=bump) for _ in range(writers)]
        threads.append(threading.Thread(target=lambda: Variables.update(api.orchestrator, "counter", lambda n: n + 1)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert not errors
    total = rounds * writers + 1
    assert Variables.get(api.orchestrator, "counter") == total
    assert Variables.get_variable(api.orchestrator, "counter").version == total + 1


def test_update_returns_the_new_version_and_rejects_bad_values(api: Api) -> None:
    api("defvariable", "k", "integer", 5, constraints={"max": 10})
    assert api("update", "k", lambda n: n * 2) == 2
    assert api("get", "k") == 10
    with pytest.raises(ValidationError):
        api("update", "k", lambda n: n + 1)
    assert api("get", "k") == 10


# ------------------------------------------------------------------ watch


@pytest.mark.parametrize("form", ["iterator", "callback"])
def test_watch_yields_initial_then_every_latest_value(api: Api, form: str) -> None:
    api("defvariable", "w", "integer", 0)
    api("defvariable", "other", "integer", 0)
    events, stop = api.watch(["w"], callback=form == "callback")
    try:
        first = next_event(events, lambda e: True)[0]
        assert (first.name, first.value, first.version, first.update_type) == ("w", 0, 1, "initial_value")
        for i in range(1, 21):
            api("set", "w", i, metadata={"step": str(i)})
        api("set", "other", 1)
        seen = next_event(events, lambda e: e.version == 21)
        versions = [e.version for e in seen]
        assert versions == sorted(set(versions)), "versions strictly increase, no repeats"
        assert {e.name for e in seen} == {"w"}
        last = seen[-1]
        assert (last.value, last.update_type, last.metadata) == (20, "value_change", {"step": "20"})
    finally:
        stop()


def test_watch_of_an_unknown_variable_raises(api: Api) -> None:
    with pytest.raises(VariableNotFoundError):
        events, stop = api.watch(["ghost"])
        try:
            next_event(events, lambda e: True)
        finally:
            stop()


def test_the_orchestrator_watches_its_own_context_across_sides(api: Api) -> None:
    """A write made on the target reaches a watch opened on the orchestrator's Context."""
    api("defvariable", "x", "float", 0.0)
    watch = Variables.watch(api.orchestrator, ["x"], include_initial=False)
    events: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=lambda: [events.put(e) for e in watch], daemon=True).start()
    try:
        api("set", "x", 1.5, metadata={"by": "target"})
        event = next_event(events, lambda e: e.version == 2)[-1]
        assert (event.value, event.metadata) == (1.5, {"by": "target"})
    finally:
        watch.close()  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the orchestrator only


def test_a_context_watch_follows_the_switch_to_the_bridge() -> None:
    with Context() as ctx:
        Variables.defvariable(ctx, "x", "integer", 0)
        events: queue.Queue[Any] = queue.Queue()
        with Variables.watch(ctx, ["x"], callback=events.put):
            assert next_event(events, lambda e: True)[0].version == 1
            Variables.set(ctx, "x", 1)
            assert next_event(events, lambda e: e.version == 2)[-1].value == 1
            ctx.ensure_bridged()
            Variables.set(ctx, "x", 2)
            after = next_event(events, lambda e: e.version == 3)
            assert [e.version for e in after] == [3]
            assert after[-1].value == 2


def test_local_history_is_bounded_like_a_session() -> None:
    state = LocalState("c", limits=Limits(history_limit=3))
    state.register("x", "integer", 0)
    for i in range(1, 6):
        state.set("x", i)
    assert [e.version for e in state.history("x")] == [6, 5, 4]
    with pytest.raises(ValidationError, match="versions 4, 5, 6"):
        state.rollback("x", 2)
    assert state.rollback("x", 4) == 7
    assert state.get("x") == 3


def test_variables_refuse_what_is_not_a_context() -> None:
    with pytest.raises(TypeError, match="Context or a SessionContext"):
        Variables.get(object(), "x")  # type: ignore[arg-type]


def test_history_limit_must_be_non_negative() -> None:
    with Context() as ctx:
        Variables.defvariable(ctx, "x", "integer", 0)
        with pytest.raises(ValueError, match="limit"):
            Variables.history(ctx, "x", limit=-1)


def test_update_gives_up_with_the_real_versions() -> None:
    with Context() as ctx:
        Variables.defvariable(ctx, "x", "integer", 0)

        def racing(n: int) -> int:
            Variables.set(ctx, "x", n + 100)  # someone else writes between our read and our write
            return n + 1

        with pytest.raises(VersionConflictError) as info:
            Variables.update(ctx, "x", racing, max_attempts=3)
        assert info.value.expected > 0 and info.value.actual > info.value.expected


def test_worker_aliases_warn_and_still_set(remote_bridge: Any) -> None:
    with Context(bridge=remote_bridge.address, backend="bridged") as ctx:
        Variables.defvariable(ctx, "x", "integer", 0)
        with SessionContext.connect(ctx.bridge_address, ctx.id) as worker:
            with pytest.warns(DeprecationWarning, match="use set_variable"):
                assert worker.update_variable("x", 5) == 2
            with pytest.warns(DeprecationWarning, match="use set_variables"):
                assert worker.update_variables({"x": 6}) == {"x": 3}
            assert worker.set_variables({"x": 7}) == {"x": 4}
            assert Variables.get(worker, "x") == 7
