"""The Stage 2 plan in pytest form: local workflow, automatic switching, migration, register_program
rules, error handling, concurrency, the two real-world workflows and performance characteristics.

Remote scenarios talk over real gRPC to ``dspex-bridge serve`` subprocesses. Nothing here is timed:
the performance scenarios check what makes one path faster than another (the round trips the
bridge serves, counted by its own ``/metrics``); ``benchmarks/run.py`` measures the speeds.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dspex_dspy import Context, Variables
from dspex_dspy.errors import (
    BatchUpdateError,
    BridgeUnavailableError,
    DSPexError,
    ValidationError,
    VersionConflictError,
)
from dspex_dspy.remote import RemoteStore
from dspex_dspy.server import EmbeddedBridge
from dspex_dspy.state import BridgedState, LocalState

pytestmark = pytest.mark.integration

HANG_GUARD_S = 60.0

PYTHON_PROGRAM = {
    "type": "dspy",
    "adapter": "PythonAdapter",
    "modules": [{"type": "dspy", "class": "ChainOfThought"}],
    "requires_python": True,
}


@pytest.fixture
def contexts() -> Iterator[Callable[..., Context]]:
    """Make contexts that are stopped (and their sessions cleaned up) after the test."""
    made: list[Context] = []

    def make(*args: Any, **kwargs: Any) -> Context:
        ctx = Context(*args, **kwargs)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.stop()


@pytest.fixture
def ctx(contexts: Callable[..., Context]) -> Context:
    return contexts()


@pytest.fixture
def seeded(ctx: Context) -> Context:
    """The seed's switching setup: three variables defined while local."""
    Variables.defvariable(ctx, "pre_switch", "string", "local_value")
    Variables.defvariable(ctx, "counter", "integer", 42)
    Variables.defvariable(ctx, "config", "string", "test", metadata={"source": "test"})
    return ctx


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ pure local workflow


class TestLocalWorkflow:
    def test_supports_all_variable_operations_locally(self, ctx: Context) -> None:
        Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
        Variables.defvariable(ctx, "tokens", "integer", 256, constraints={"min": 1, "max": 4096})
        Variables.defvariable(ctx, "model", "string", "local", constraints={"enum": ["local", "fast", "accurate"]})
        Variables.defvariable(ctx, "enabled", "boolean", True)

        assert Variables.get(ctx, "temperature") == 0.7
        assert Variables.set(ctx, "temperature", 0.9) == 2
        assert Variables.get(ctx, "temperature") == 0.9

        Variables.update(ctx, "tokens", lambda n: n * 2)
        assert Variables.get(ctx, "tokens") == 512

        values = Variables.get_many(ctx, ["temperature", "tokens", "model"])
        assert values == {"temperature": 0.9, "tokens": 512, "model": "local"}

        versions = Variables.update_many(ctx, {"temperature": 0.5, "tokens": 1024, "model": "fast"})
        assert versions == {"temperature": 3, "tokens": 3, "model": 2}
        assert Variables.get_many(ctx, ["temperature", "tokens", "model", "enabled"]) == {
            "temperature": 0.5,
            "tokens": 1024,
            "model": "fast",
            "enabled": True,
        }

        assert len(Variables.list(ctx)) == 4
        assert ctx.get_backend().type == "local"
        assert ctx.get_backend().module is LocalState
        assert ctx.get_backend().switches == 0
        assert ctx.bridge_address is None

    def test_enforces_constraints_locally(self, ctx: Context) -> None:
        Variables.defvariable(ctx, "bounded", "float", 0.5, constraints={"min": 0.0, "max": 1.0})
        assert Variables.set(ctx, "bounded", 0.8) == 2
        with pytest.raises(ValidationError):
            Variables.set(ctx, "bounded", -0.1)
        with pytest.raises(ValidationError):
            Variables.set(ctx, "bounded", 1.5)
        assert Variables.get(ctx, "bounded") == 0.8
        assert Variables.get_variable(ctx, "bounded").version == 2
        assert ctx.get_backend().type == "local"

    def test_context_manager_stops(self) -> None:
        with Context() as ctx:
            Variables.defvariable(ctx, "x", "integer", 1)
            assert ctx.id.startswith("ctx_")
        with pytest.raises(DSPexError):
            Variables.get(ctx, "x")
        with pytest.raises(DSPexError):
            ctx.ensure_bridged()

    @pytest.mark.parametrize(
        "kwargs",
        [{"backend": "remote"}, {"session_id": ""}, {"session_id": 5}, {"bridge": "no-port"}, {"bridge": 5}],
        ids=["backend", "empty-id", "id-type", "address", "address-type"],
    )
    def test_context_arguments_are_checked(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(ValidationError):
            Context(**kwargs)

    def test_ids_are_unguessable_and_unique(self, contexts: Callable[..., Context]) -> None:
        ids = {contexts().id for _ in range(50)}
        assert len(ids) == 50
        assert all(len(i) >= len("ctx_") + 16 for i in ids)
        assert contexts("my-session").id == "my-session"


# ------------------------------------------------------------------ automatic switching


class TestSwitching:
    def test_switches_on_ensure_bridged(self, seeded: Context) -> None:
        ctx = seeded
        backend = ctx.get_backend()
        assert (backend.type, backend.switches) == ("local", 0)
        assert not ctx.is_bridged
        before = Variables.get_many(ctx, ["pre_switch", "counter", "config"])

        ctx.ensure_bridged()

        backend = ctx.get_backend()
        assert backend.type == "bridged"
        assert backend.switches == 1
        assert backend.module is BridgedState
        assert ctx.is_bridged
        assert "bridged" in repr(ctx)
        assert len(backend.history) == 1
        assert (backend.history[0].from_backend, backend.history[0].to_backend) == ("local", "bridged")
        assert backend.history[0].variables == 3
        assert ctx.bridge_address == EmbeddedBridge.get().address
        assert Variables.get_many(ctx, ["pre_switch", "counter", "config"]) == before
        assert Variables.set(ctx, "counter", 100) == 2
        assert Variables.get(ctx, "counter") == 100

    def test_switches_when_python_program_registered(self, seeded: Context) -> None:
        seeded.register_program("python_prog", PYTHON_PROGRAM)
        backend = seeded.get_backend()
        assert backend.type == "bridged"
        assert backend.switches == 1
        assert "python_prog" in backend.history[0].reason
        assert Variables.get(seeded, "pre_switch") == "local_value"
        assert seeded.programs == {"python_prog": PYTHON_PROGRAM}

    def test_preserves_all_variable_metadata(self, seeded: Context) -> None:
        Variables.set(seeded, "counter", 43)
        before = {v.name: v for v in Variables.list(seeded)}
        seeded.ensure_bridged()
        after = {v.name: v for v in Variables.list(seeded)}
        assert list(after) == list(before)
        for name, old in before.items():
            new = after[name]
            assert (new.type, new.value, dict(new.constraints), new.description, new.version) == (
                old.type,
                old.value,
                dict(old.constraints),
                old.description,
                old.version,
            )
            for key, value in old.metadata.items():
                assert new.metadata[key] == value
            assert new.metadata["migrated_from"] == "local"
            datetime.fromisoformat(new.metadata["migrated_at"])
        assert after["config"].metadata["source"] == "test"

    def test_switch_is_idempotent(self, seeded: Context) -> None:
        seeded.ensure_bridged()
        address = seeded.bridge_address
        seeded.ensure_bridged()
        seeded.register_program("again", PYTHON_PROGRAM)
        seeded.ensure_bridged()
        assert seeded.get_backend().switches == 1
        assert seeded.bridge_address == address
        assert Variables.get(seeded, "counter") == 42
        assert Variables.get_variable(seeded, "counter").version == 1

    def test_a_reference_held_across_the_switch_forwards_to_the_bridge(self, seeded: Context) -> None:
        # A thread that fetched the local provider just before the switch must not write into a
        # state that was already copied: every call on the retired state reaches the bridge.
        stale = seeded._provider
        assert isinstance(stale, LocalState)
        seeded.ensure_bridged()
        assert stale.get("counter") == 42
        assert stale.get_versioned("counter") == (42, 1)
        assert stale.get_variable("counter").metadata["migrated_from"] == "local"
        assert stale.set("counter", 43) == 2
        assert stale.update_many({"pre_switch": "changed"}) == {"pre_switch": 2}
        stale.register("late", "integer", 1)
        assert stale.exists("late")
        assert stale.get_many(["counter", "late"]) == {"counter": 43, "late": 1}
        stale.delete("late")
        assert [v.name for v in stale.list()] == ["pre_switch", "counter", "config"]
        assert Variables.get_many(seeded, ["counter", "pre_switch"]) == {"counter": 43, "pre_switch": "changed"}
        assert not Variables.exists(seeded, "late")
        with pytest.raises(ValidationError):
            stale.set("counter", "text")
        assert Variables.get(seeded, "counter") == 43

    def test_bridged_at_creation(self, contexts: Callable[..., Context]) -> None:
        ctx = contexts(backend="bridged")
        assert ctx.get_backend().type == "bridged"
        Variables.defvariable(ctx, "x", "integer", 1)
        assert Variables.get(ctx, "x") == 1

    def test_a_bridged_context_is_visible_in_the_store(self, seeded: Context) -> None:
        seeded.ensure_bridged()
        store = EmbeddedBridge.get().store
        assert store.get_variable(seeded.id, "counter").value == 42
        store.set_variable(seeded.id, "counter", 7, source="worker")
        assert Variables.get(seeded, "counter") == 7

    def test_switches_to_a_remote_bridge(self, contexts: Callable[..., Context], remote_bridge: Any) -> None:
        ctx = contexts(bridge=remote_bridge.address)
        Variables.defvariable(ctx, "pre_switch", "string", "local_value")
        Variables.defvariable(ctx, "counter", "integer", 42, constraints={"min": 0, "max": 1000})
        Variables.defvariable(ctx, "config", "string", "test", metadata={"source": "test"})
        Variables.set(ctx, "counter", 43)
        before = {v.name: v for v in Variables.list(ctx)}
        ctx.ensure_bridged()
        assert ctx.get_backend().type == "bridged"
        assert ctx.get_backend().switches == 1
        assert ctx.bridge_address == remote_bridge.address
        after = {v.name: v for v in Variables.list(ctx)}
        assert list(after) == list(before)
        for name, old in before.items():
            new = after[name]
            assert (new.type, new.value, dict(new.constraints), new.version) == (
                old.type,
                old.value,
                dict(old.constraints),
                old.version,
            )
            assert new.metadata["migrated_from"] == "local"
            assert "migrated_at" in new.metadata
        assert after["config"].metadata["source"] == "test"
        with RemoteStore.connect(remote_bridge.address) as probe:
            assert probe.get_variable(ctx.id, "counter").value == 43
        with pytest.raises(ValidationError):
            Variables.set(ctx, "counter", 1001)
        assert Variables.set(ctx, "counter", 100) == 3
        ctx.stop()
        with RemoteStore.connect(remote_bridge.address) as probe:
            assert not probe.has_session(ctx.id)

    def test_stop_cleans_up_the_session(self, contexts: Callable[..., Context]) -> None:
        ctx = contexts()
        Variables.defvariable(ctx, "x", "integer", 1)
        ctx.ensure_bridged()
        store = EmbeddedBridge.get().store
        assert store.has_session(ctx.id)
        ctx.stop()
        assert not store.has_session(ctx.id)


# ------------------------------------------------------------------ migration


class TestMigration:
    def test_handles_empty_state(self, ctx: Context) -> None:
        ctx.ensure_bridged()
        assert ctx.get_backend().type == "bridged"
        assert Variables.list(ctx) == []
        Variables.defvariable(ctx, "post_switch", "string", "works")
        assert Variables.get(ctx, "post_switch") == "works"

    def test_handles_large_state(self, ctx: Context) -> None:
        for i in range(1, 101):
            Variables.defvariable(
                ctx, f"var_{i}", "integer", i, constraints={"min": 0, "max": 1000}, metadata={"index": i}
            )
        ctx.ensure_bridged()
        assert ctx.get_backend().history[0].variables == 100
        assert (Variables.get(ctx, "var_1"), Variables.get(ctx, "var_50"), Variables.get(ctx, "var_100")) == (
            1,
            50,
            100,
        )
        listed = Variables.list(ctx)
        assert [v.name for v in listed] == [f"var_{i}" for i in range(1, 101)]
        for i, var in enumerate(listed, start=1):
            assert var.value == i
            assert dict(var.constraints) == {"min": 0, "max": 1000}
            assert var.metadata["index"] == str(i)
            assert var.metadata["migrated_from"] == "local"
        with pytest.raises(ValidationError):
            Variables.set(ctx, "var_7", 1001)
        assert Variables.get(ctx, "var_7") == 7

    def test_complex_constraints_still_enforced(self, ctx: Context) -> None:
        Variables.defvariable(ctx, "ranged", "float", 0.5, constraints={"min": 0.0, "max": 1.0})
        Variables.defvariable(ctx, "pattern", "string", "ABC123", constraints={"pattern": "^[A-Z]+[0-9]+$"})
        Variables.defvariable(ctx, "choice", "string", "red", constraints={"enum": ["red", "green", "blue"]})
        ctx.ensure_bridged()
        with pytest.raises(ValidationError):
            Variables.set(ctx, "ranged", 2.0)
        with pytest.raises(ValidationError):
            Variables.set(ctx, "pattern", "invalid")
        with pytest.raises(ValidationError):
            Variables.set(ctx, "choice", "yellow")
        assert Variables.get_many(ctx, ["ranged", "pattern", "choice"]) == {
            "ranged": 0.5,
            "pattern": "ABC123",
            "choice": "red",
        }
        Variables.set(ctx, "ranged", 0.7)
        Variables.set(ctx, "pattern", "XYZ789")
        Variables.set(ctx, "choice", "blue")
        assert Variables.get_many(ctx, ["ranged", "pattern", "choice"]) == {
            "ranged": 0.7,
            "pattern": "XYZ789",
            "choice": "blue",
        }

    def test_every_type_migrates(self, ctx: Context) -> None:
        values = {
            "f": ("float", 0.25, {"min": 0.0}),
            "i": ("integer", 7, {"max": 10}),
            "s": ("string", "héllo", {"max_length": 10}),
            "b": ("boolean", False, None),
            "c": ("choice", "b", {"choices": ["a", "b"]}),
            "m": ("module", "Predict", {"allowed_modules": ["Predict"]}),
            "e": ("embedding", [0.1, 0.2], {"dimensions": 2}),
            "t": ("tensor", {"shape": [1, 2], "data": [1.0, 2.0]}, {"shape": [1, 2]}),
        }
        for name, (type_, value, constraints) in values.items():
            Variables.defvariable(ctx, name, type_, value, constraints=constraints, description=type_)
        before = Variables.list(ctx)
        ctx.ensure_bridged()
        after = Variables.list(ctx)
        assert [(v.name, v.type, v.value, dict(v.constraints), v.description) for v in after] == [
            (v.name, v.type, v.value, dict(v.constraints), v.description) for v in before
        ]


class TestLocalImport:
    def test_a_local_state_imports_an_export_whole(self, seeded: Context) -> None:
        Variables.set(seeded, "counter", 43)
        exported = seeded._provider.export_state()
        target = LocalState("target")
        target.import_state(exported)
        assert [(v.name, v.value, v.version, dict(v.metadata)) for v in target.list()] == [
            (v.name, v.value, v.version, dict(v.metadata)) for v in exported
        ]
        assert target.set("counter", 44) == 3

    def test_a_local_import_is_all_or_nothing(self) -> None:
        target = LocalState("target")
        target.register("existing", "integer", 1)
        fresh = LocalState("source")
        fresh.register("a", "integer", 1)
        fresh.register("existing", "integer", 2)
        with pytest.raises(DSPexError):
            target.import_state(fresh.export_state())
        assert [v.name for v in target.list()] == ["existing"]
        assert target.get("existing") == 1


class TestTypeValidationAcrossBackends:
    def test_identical_in_local_and_bridged(self, ctx: Context) -> None:
        Variables.defvariable(ctx, "typed", "integer", 42)
        with pytest.raises(ValidationError) as local_error:
            Variables.set(ctx, "typed", "not an integer")
        ctx.ensure_bridged()
        with pytest.raises(ValidationError):
            Variables.set(ctx, "typed", "still not an integer")
        with pytest.raises(ValidationError) as bridged_error:
            Variables.set(ctx, "typed", "not an integer")
        assert str(bridged_error.value) == str(local_error.value)
        assert (bridged_error.value.variable, bridged_error.value.rule) == ("typed", "type")
        assert Variables.get(ctx, "typed") == 42
        assert Variables.get_variable(ctx, "typed").version == 1


# ------------------------------------------------------------------ register_program rules


SWITCHING_SPECS = {
    "requires_python": {"requires_python": True},
    "type-dspy": {"type": "dspy"},
    "type-python": {"type": "python", "module": "TextAnalyzer"},
    "type-case": {"type": "DSPy"},
    "adapter": {"adapter": "PythonAdapter"},
    "module-type-dspy": {"modules": [{"type": "native"}, {"type": "dspy"}]},
    "module-type-python": {"modules": [{"type": "python"}]},
    "module-class-dspy": {"modules": [{"class": "dspy.ChainOfThought"}]},
    "seed-spec": PYTHON_PROGRAM,
}

LOCAL_SPECS = {
    "empty": {},
    "native": {"type": "native", "adapter": "ElixirAdapter"},
    "requires_python-false": {"requires_python": False, "type": "elixir"},
    "plain-modules": {"modules": [{"type": "native", "class": "Tokenizer"}, "not a mapping"]},
}


@pytest.mark.parametrize("spec", list(SWITCHING_SPECS.values()), ids=list(SWITCHING_SPECS))
def test_register_program_switches_for_python(ctx: Context, spec: dict[str, Any]) -> None:
    Variables.defvariable(ctx, "x", "integer", 1)
    ctx.register_program("prog", spec)
    assert ctx.get_backend().type == "bridged"
    assert ctx.get_backend().switches == 1
    assert Variables.get(ctx, "x") == 1
    assert "prog" in ctx.programs


@pytest.mark.parametrize("spec", list(LOCAL_SPECS.values()), ids=list(LOCAL_SPECS))
def test_register_program_stays_local_otherwise(ctx: Context, spec: dict[str, Any]) -> None:
    ctx.register_program("prog", spec)
    assert ctx.get_backend().type == "local"
    assert ctx.get_backend().switches == 0
    assert ctx.programs == {"prog": spec}


@pytest.mark.parametrize(("program_id", "spec"), [("", {}), (None, {}), ("p", "dspy"), ("p", None)])
def test_register_program_rejects_bad_input(ctx: Context, program_id: Any, spec: Any) -> None:
    with pytest.raises(ValidationError):
        ctx.register_program(program_id, spec)
    assert ctx.programs == {}
    assert ctx.get_backend().type == "local"


# ------------------------------------------------------------------ error handling


class TestErrorHandling:
    def test_bridge_unreachable(self, contexts: Callable[..., Context]) -> None:
        ctx = contexts(bridge=f"127.0.0.1:{closed_port()}")
        Variables.defvariable(ctx, "kept", "integer", 7, constraints={"max": 10})
        Variables.set(ctx, "kept", 8)
        with pytest.raises(BridgeUnavailableError):
            ctx.ensure_bridged()
        backend = ctx.get_backend()
        assert (backend.type, backend.switches) == ("local", 0)
        assert ctx.bridge_address is None
        assert Variables.get(ctx, "kept") == 8
        assert Variables.get_variable(ctx, "kept").version == 2
        Variables.defvariable(ctx, "survivor", "string", "still works")
        assert Variables.get(ctx, "survivor") == "still works"
        with pytest.raises(BridgeUnavailableError):
            ctx.register_program("needs_python", PYTHON_PROGRAM)
        assert ctx.programs == {}
        assert ctx.get_backend().type == "local"

    def test_embedded_store_stopped(self, seeded: Context) -> None:
        try:
            EmbeddedBridge.get().store.close()
            with pytest.raises(BridgeUnavailableError):
                seeded.ensure_bridged()
            assert seeded.get_backend().type == "local"
            assert seeded.get_backend().switches == 0
            assert Variables.get_many(seeded, ["pre_switch", "counter", "config"]) == {
                "pre_switch": "local_value",
                "counter": 42,
                "config": "test",
            }
            Variables.defvariable(seeded, "survivor", "string", "still works")
            assert Variables.get(seeded, "survivor") == "still works"
            assert Variables.set(seeded, "counter", 43) == 2
        finally:
            EmbeddedBridge.shutdown()
        seeded.ensure_bridged()
        assert Variables.get(seeded, "survivor") == "still works"

    @pytest.mark.timeout(300)
    def test_server_killed_mid_migration_loses_nothing(
        self, contexts: Callable[..., Context], spawn_bridge: Callable[..., Any]
    ) -> None:
        bridge = spawn_bridge()
        ctx = contexts(bridge=bridge.address)
        count = 10_000
        for i in range(count):
            Variables.defvariable(ctx, f"v{i}", "integer", i)
        started = threading.Event()

        def killer() -> None:
            # Kill as soon as the server holds part of the session: that is, mid-migration.
            started.wait()
            with RemoteStore.connect(bridge.address) as probe:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        held = probe.get_session(ctx.id).variable_count
                    except DSPexError:
                        continue
                    if held > 0:
                        break
            bridge.kill()

        thread = threading.Thread(target=killer)
        thread.start()
        error: Exception | None = None
        try:
            started.set()
            ctx.ensure_bridged()
        except DSPexError as exc:
            error = exc
        finally:
            thread.join()
            bridge.stop()
        if error is None:
            # The switch won the race: it completed before the kill landed.
            assert ctx.get_backend().switches == 1
            return
        assert isinstance(error, BridgeUnavailableError), repr(error)
        assert ctx.get_backend().type == "local"
        assert ctx.get_backend().switches == 0
        names = [f"v{i}" for i in range(count)]
        assert Variables.get_many(ctx, names) == {name: i for i, name in enumerate(names)}
        assert len(Variables.list(ctx)) == count
        assert Variables.set(ctx, "v0", -1) == 2


# ------------------------------------------------------------------ concurrency


def hammer(ctx: Context, threads: int = 8, increments: int = 1000) -> None:
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(increments):
                Variables.update(ctx, "counter", lambda n: n + 1)
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []


class TestConcurrency:
    @pytest.mark.parametrize("bridged", [False, True], ids=["local", "embedded"])
    def test_concurrent_updates_lose_nothing(self, ctx: Context, bridged: bool) -> None:
        Variables.defvariable(ctx, "counter", "integer", 0)
        if bridged:
            ctx.ensure_bridged()
        hammer(ctx)
        assert Variables.get(ctx, "counter") == 8000
        assert Variables.get_variable(ctx, "counter").version == 8001

    @pytest.mark.parametrize("bridged", [False, True], ids=["local", "embedded"])
    def test_stale_cas_changes_nothing(self, ctx: Context, bridged: bool) -> None:
        Variables.defvariable(ctx, "counter", "integer", 0)
        if bridged:
            ctx.ensure_bridged()
        _, version = Variables.get(ctx, "counter"), Variables.get_variable(ctx, "counter").version
        Variables.set(ctx, "counter", 5)
        with pytest.raises(VersionConflictError):
            Variables.set(ctx, "counter", 999, expected_version=version)
        assert Variables.get(ctx, "counter") == 5
        assert Variables.get_variable(ctx, "counter").version == version + 1

    def test_updates_racing_a_switch_lose_nothing(self, ctx: Context) -> None:
        Variables.defvariable(ctx, "counter", "integer", 0)
        barrier = threading.Barrier(5)
        switcher = threading.Thread(target=lambda: (barrier.wait(), ctx.ensure_bridged()))
        switcher.start()
        workers: list[threading.Thread] = []
        failures: list[BaseException] = []

        def work() -> None:
            try:
                barrier.wait()
                for _ in range(500):
                    Variables.update(ctx, "counter", lambda n: n + 1)
            except BaseException as exc:
                failures.append(exc)

        for _ in range(4):
            workers.append(threading.Thread(target=work))
            workers[-1].start()
        for t in [switcher, *workers]:
            t.join()
        assert failures == []
        assert ctx.get_backend().type == "bridged"
        assert Variables.get(ctx, "counter") == 2000

    @pytest.mark.parametrize("where", ["embedded", "remote"])
    def test_writes_racing_a_switch_are_never_lost(
        self, contexts: Callable[..., Context], where: str, request: pytest.FixtureRequest
    ) -> None:
        address = request.getfixturevalue("remote_bridge").address if where == "remote" else None
        ctx = contexts(bridge=address)
        writers, writes = 4, 300 if where == "remote" else 1000
        for w in range(writers):
            Variables.defvariable(ctx, f"w{w}", "integer", -1)
        barrier = threading.Barrier(writers + 1)
        last_written: dict[str, int] = {}
        failures: list[BaseException] = []

        def write(w: int) -> None:
            try:
                barrier.wait()
                for i in range(writes):
                    Variables.set(ctx, f"w{w}", i)
                    last_written[f"w{w}"] = i
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        barrier.wait()
        ctx.ensure_bridged()
        for t in threads:
            t.join()
        assert failures == []
        assert ctx.get_backend().type == "bridged"
        for w in range(writers):
            var = Variables.get_variable(ctx, f"w{w}")
            assert var.value == last_written[f"w{w}"] == writes - 1
            assert var.version == writes + 1


# ------------------------------------------------------------------ real-world workflows


class TestRealWorldWorkflows:
    def test_llm_configuration_workflow(self, ctx: Context) -> None:
        Variables.defvariable(
            ctx,
            "model",
            "string",
            "gpt-3.5-turbo",
            constraints={"enum": ["gpt-3.5-turbo", "gpt-4", "claude-3"]},
            description="LLM model selection",
        )
        Variables.defvariable(
            ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0}, description="Generation randomness"
        )
        Variables.defvariable(
            ctx,
            "max_tokens",
            "integer",
            256,
            constraints={"min": 1, "max": 4096},
            description="Maximum response length",
        )
        Variables.defvariable(
            ctx, "top_p", "float", 1.0, constraints={"min": 0.0, "max": 1.0}, description="Nucleus sampling"
        )
        for update in (
            {"temperature": 0.5, "max_tokens": 512},
            {"model": "gpt-4", "temperature": 0.8},
            {"max_tokens": 1024, "top_p": 0.95},
        ):
            assert set(Variables.update_many(ctx, update)) == set(update)
        with pytest.raises(BatchUpdateError):
            Variables.update_many(ctx, {"temperature": 3.0, "model": "gpt-5"})

        final = {"model": "gpt-4", "temperature": 0.8, "max_tokens": 1024, "top_p": 0.95}
        assert Variables.get_many(ctx, ["model", "temperature", "max_tokens", "top_p"]) == final
        assert ctx.get_backend().type == "local"

        ctx.register_program("llm_program", {"type": "dspy", "requires_python": True})

        assert ctx.get_backend().type == "bridged"
        assert Variables.get_many(ctx, ["model", "temperature"]) == {"model": "gpt-4", "temperature": 0.8}
        assert Variables.get_many(ctx, list(final)) == final
        assert Variables.get_variable(ctx, "temperature").description == "Generation randomness"
        with pytest.raises(ValidationError):
            Variables.set(ctx, "model", "gpt-5")

    def test_multi_stage_pipeline_with_mixed_components(self, ctx: Context) -> None:
        Variables.defvariable(ctx, "input_text", "string", "Process this text")
        Variables.defvariable(ctx, "preprocessing_done", "boolean", False)

        text = Variables.get(ctx, "input_text")
        Variables.set(ctx, "input_text", text.upper())
        Variables.set(ctx, "preprocessing_done", True)
        assert ctx.get_backend().type == "local"

        ctx.register_program("nlp_analyzer", {"type": "python", "requires_python": True, "module": "TextAnalyzer"})
        assert ctx.get_backend().type == "bridged"

        assert Variables.get(ctx, "input_text") == "PROCESS THIS TEXT"
        assert Variables.get(ctx, "preprocessing_done") is True

        Variables.defvariable(ctx, "analysis_complete", "boolean", True)
        Variables.defvariable(ctx, "results", "string", "Analysis results here")
        assert [v.name for v in Variables.list(ctx)] == [
            "input_text",
            "preprocessing_done",
            "analysis_complete",
            "results",
        ]


# ------------------------------------------------------------------ performance characteristics (round trips)


class MeteredBridge:
    """A ``dspex-bridge serve`` subprocess with ``--metrics-port``: counts the RPCs it served, by method.

    The counts come from the bridge's own ``/metrics`` (``dspex_rpc_duration_seconds_count``),
    recorded before each response leaves: once a call has returned, it is counted.
    """

    METRICS = re.compile(r"dspex-bridge metrics on (\S+)")

    def __init__(self, process: Any) -> None:
        self.process = process
        self.address: str = process.address
        end = time.monotonic() + HANG_GUARD_S
        while (url := self._url()) is None:
            assert time.monotonic() < end, "the bridge never printed its metrics URL:\n" + "".join(process.output)
            time.sleep(0.02)
        self.url = url

    def _url(self) -> str | None:
        for line in list(self.process.output):
            if match := self.METRICS.search(line):
                return match.group(1)
        return None

    def rpcs(self, *methods: str) -> dict[str, int]:
        """How many calls of each method the bridge has served (whatever their outcome)."""
        with urllib.request.urlopen(self.url, timeout=HANG_GUARD_S) as response:
            text = response.read().decode()
        counts = dict.fromkeys(methods, 0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                method = sample.labels.get("method")
                if sample.name == "dspex_rpc_duration_seconds_count" and method in counts:
                    counts[method] += int(sample.value)
        return counts


@pytest.fixture(scope="module")
def metered_bridge(spawn_bridge: Callable[..., Any]) -> Iterator[MeteredBridge]:
    process = spawn_bridge("--metrics-port", "0")
    yield MeteredBridge(process)
    process.stop()


READS = ("GetVariable", "GetVariables")


class TestPerformanceCharacteristics:
    """The seed's performance scenarios, checked by what makes one path faster, never by a clock.

    A local get is a read of this process's memory and a remote get is a round trip to the bridge;
    a batch get of ten is one round trip where ten single gets are ten. These tests count the round
    trips the bridge serves; how long each path takes (LocalState get, remote get, batch of ten
    against ten singles) is measured by the benchmarks (``benchmarks/run.py``), never asserted in
    the test suite.
    """

    def test_local_get_is_much_faster_than_a_remote_get(
        self, contexts: Callable[..., Context], metered_bridge: MeteredBridge
    ) -> None:
        """A local get never leaves the process (no RPC at all); a remote get is one RPC, uncached."""
        ctx = contexts(bridge=metered_bridge.address)  # a bridge is configured, but not used yet
        for i in range(1, 21):
            Variables.defvariable(ctx, f"perf_{i}", "float", i * 0.1)

        before = metered_bridge.rpcs(*READS)
        for _ in range(100):
            assert Variables.get(ctx, "perf_10") == 1.0
        assert ctx.get_backend().type == "local"
        assert metered_bridge.rpcs(*READS) == before, "a local get went to the bridge"

        ctx.ensure_bridged()
        before = metered_bridge.rpcs(*READS)
        for _ in range(100):
            assert Variables.get(ctx, "perf_10") == 1.0
        after = metered_bridge.rpcs(*READS)
        assert {m: after[m] - before[m] for m in READS} == {"GetVariable": 100, "GetVariables": 0}

    def test_batch_get_beats_single_gets_over_the_bridge(
        self, contexts: Callable[..., Context], metered_bridge: MeteredBridge
    ) -> None:
        """A batch get of ten variables is one RPC; ten single gets are ten."""
        ctx = contexts(bridge=metered_bridge.address)
        ctx.ensure_bridged()
        names = [f"perf_{i}" for i in range(1, 11)]
        for i, name in enumerate(names, start=1):
            Variables.defvariable(ctx, name, "float", i * 0.1)
        expected = {name: i * 0.1 for i, name in enumerate(names, start=1)}

        before = metered_bridge.rpcs(*READS)
        assert Variables.get_many(ctx, names) == expected
        after = metered_bridge.rpcs(*READS)
        assert {m: after[m] - before[m] for m in READS} == {"GetVariable": 0, "GetVariables": 1}

        before = after
        assert {name: Variables.get(ctx, name) for name in names} == expected
        after = metered_bridge.rpcs(*READS)
        assert {m: after[m] - before[m] for m in READS} == {"GetVariable": 10, "GetVariables": 0}
