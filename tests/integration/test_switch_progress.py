"""A switch to a bridge never holds readers, and no write made during it is lost.

The bridge is a real server over a real ``SessionStore`` subclass whose import pauses on a
``threading.Event`` at the first variable, so the test can act while the import is in progress.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.server import create_server
from dspex_dspy.state import LocalState
from dspex_dspy.store import SessionStore
from dspex_dspy.types import Variable

pytestmark = pytest.mark.integration

WAIT_S = 60.0  # generous: a condition is awaited, never a duration


class PausingStore(SessionStore):
    """A store that runs ``on_import(attempt)`` before the first variable of each import."""

    def __init__(self, on_import: Callable[[int], None]) -> None:
        super().__init__()
        self.on_import = on_import
        self.attempts = 0
        self._guard = threading.Lock()

    def import_variables(
        self, session_id: str, variables: Sequence[Variable], *, atomic: bool = True
    ) -> list[Variable]:
        self._starting(variables)
        return super().import_variables(session_id, variables, atomic=atomic)

    def import_variable_ids(self, session_id: str, variables: Sequence[Variable]) -> list[str]:
        self._starting(variables)  # what the bridge's ImportVariables calls
        return super().import_variable_ids(session_id, variables)

    def _starting(self, variables: Sequence[Variable]) -> None:
        with self._guard:
            first = any(v.name == "v0" for v in variables)
            if first:
                self.attempts += 1
                attempt = self.attempts
        if first:
            self.on_import(attempt)


@pytest.fixture
def bridge_for() -> Iterator[Callable[[PausingStore], str]]:
    servers: list[Any] = []

    def start(store: PausingStore) -> str:
        server, port = create_server(store, "127.0.0.1", 0)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def _switch_in_background(ctx: Context) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ctx.ensure_bridged()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_reads_complete_while_a_3000_variable_import_is_in_progress(bridge_for: Any) -> None:
    started, release = threading.Event(), threading.Event()

    def pause(attempt: int) -> None:
        started.set()
        release.wait(WAIT_S)

    store = PausingStore(pause)
    with Context(bridge=bridge_for(store)) as ctx:
        for i in range(3000):
            Variables.defvariable(ctx, f"v{i}", "integer", i)
        switch, errors = _switch_in_background(ctx)
        try:
            assert started.wait(WAIT_S), "the import never started"
            read: dict[str, Any] = {}
            reader = threading.Thread(
                target=lambda: read.update(
                    first=Variables.get(ctx, "v0"),
                    last=Variables.get(ctx, "v2999"),
                    many=ctx.get_versioned_many(["v1", "v2"]),
                ),
                daemon=True,
            )
            reader.start()
            reader.join(WAIT_S)
            in_progress = not release.is_set() and switch.is_alive()
            assert not reader.is_alive(), "a reader waited for the import"
            assert in_progress
            assert read == {"first": 0, "last": 2999, "many": {"v1": (1, 1), "v2": (2, 1)}}
            assert ctx.get_backend().type == "local"
        finally:
            release.set()
            switch.join(WAIT_S)
        assert not errors
        assert ctx.get_backend().type == "bridged"
        assert Variables.get(ctx, "v2999") == 2999
        assert store.attempts == 1


def test_a_write_during_the_import_is_carried_over(bridge_for: Any) -> None:
    started, release = threading.Event(), threading.Event()

    def pause(attempt: int) -> None:
        if attempt == 1:
            started.set()
            release.wait(WAIT_S)

    store = PausingStore(pause)
    with Context(bridge=bridge_for(store)) as ctx:
        for i in range(50):
            Variables.defvariable(ctx, f"v{i}", "integer", i)
        switch, errors = _switch_in_background(ctx)
        try:
            assert started.wait(WAIT_S)
            assert Variables.set(ctx, "v7", 700) == 2
            Variables.defvariable(ctx, "late", "string", "made during the switch")
            Variables.delete(ctx, "v9")
        finally:
            release.set()
            switch.join(WAIT_S)
        assert not errors
        assert ctx.get_backend().type == "bridged"
        assert store.attempts == 2
        var = Variables.get_variable(ctx, "v7")
        assert (var.value, var.version) == (700, 2)
        assert Variables.get(ctx, "late") == "made during the switch"
        assert not Variables.exists(ctx, "v9")
        names = [v.name for v in store.list_variables(ctx.id)]
        assert len(names) == 50 and names.count("v7") == 1


def test_writers_that_never_stop_are_fenced_on_the_last_try(bridge_for: Any) -> None:
    ctx_box: list[Context] = []
    writers: list[threading.Thread] = []

    def write_during(attempt: int) -> None:
        ctx = ctx_box[0]
        writer = threading.Thread(target=Variables.update, args=(ctx, "hits", lambda n: n + 1), daemon=True)
        writer.start()
        writers.append(writer)
        writer.join(5.0)  # returns at once unless writers are fenced (the last try)

    store = PausingStore(write_during)
    with Context(bridge=bridge_for(store)) as ctx:
        ctx_box.append(ctx)
        Variables.defvariable(ctx, "v0", "integer", 0)
        Variables.defvariable(ctx, "hits", "integer", 0)
        ctx.ensure_bridged()
        for writer in writers:
            writer.join(WAIT_S)
        assert store.attempts == 4
        assert Variables.get(ctx, "hits") == 4
        assert Variables.get_variable(ctx, "hits").version == 5


def test_a_fence_holds_writers_and_never_readers() -> None:
    state = LocalState("c")
    state.register("x", "integer", 1)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (state.set("x", 2), done.set()), daemon=True)
    with state.fenced():
        writer.start()
        assert state.get("x") == 1
        assert state.get_versioned_many(["x"]) == {"x": (1, 1)}
        writer.join(0.2)
        assert writer.is_alive() and not done.is_set()
    assert done.wait(WAIT_S)
    assert state.get_versioned("x") == (2, 2)


def test_a_switch_runs_no_collector_pass_over_the_records_it_copies(bridge_for: Any) -> None:
    """The records a switch copies all stay alive to its end: the cyclic collector is paused while it
    copies them (client and bridge here share one process), and on again afterwards."""
    import gc

    passes: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    with Context(bridge=bridge_for(PausingStore(lambda attempt: None))) as ctx:
        for i in range(3000):
            Variables.defvariable(ctx, f"v{i}", "integer", i, metadata={"index": str(i)})
        assert gc.isenabled()
        gc.callbacks.append(count)
        try:
            ctx.ensure_bridged()
        finally:
            gc.callbacks.remove(count)
        assert gc.isenabled()
        # Unpaused, this switch runs about 130 passes (about 10 of them over the older generations);
        # paused, only the few of the steps around the copy (opening the session, the watch).
        assert len(passes) < 20, passes
        assert Variables.get(ctx, "v2999") == 2999


def test_the_bridge_imports_with_the_collector_paused(bridge_for: Any) -> None:
    """``ImportVariables`` builds every record before it stores them: the bridge pauses the collector
    for it (here the client's own import is not paused: only the bridge's can be seen)."""
    import gc

    from dspex_dspy.remote import RemoteStore

    states: list[bool] = []
    store = PausingStore(lambda attempt: states.append(gc.isenabled()))
    remote = RemoteStore.connect(bridge_for(store))
    try:
        remote.create_session("s")
        made = remote.import_variables("s", [Variable("", f"v{i}", "integer", i) for i in range(10)])
    finally:
        remote.close()
    assert states == [False]
    assert gc.isenabled()
    assert [v.name for v in made] == [f"v{i}" for i in range(10)]
    assert [v.id for v in store.list_variables("s")] == [v.id for v in made]
