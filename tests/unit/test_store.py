"""SessionStore: sessions and TTL, variables, versions, CAS, history, batches, limits and watchers."""

from __future__ import annotations

import re
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_dspy.errors import (
    BridgeUnavailableError,
    DSPexError,
    LimitExceededError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.store import SessionStore, StoreLimits, UpdateType, VariableUpdate, Watch
from dspex_dspy.store import session_store as session_store_module
from dspex_dspy.store.redis_storage import RedisStorage
from dspex_dspy.types import Variable

pytestmark = pytest.mark.unit

DEADLINE_S = 30.0


def wait_until(predicate: Any, deadline_s: float = DEADLINE_S) -> bool:
    """Poll ``predicate`` until it is true or a generous deadline passes (no timing assertion)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class FakeClock:
    """Stands in for the ``time`` module inside session_store, so TTLs are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # The store's contract runs on every storage engine; tests that fake the clock run in memory
    # (Redis measures TTLs on its own clock: its expiry is tested against a real short TTL).
    if "storage_kind" in metafunc.fixturenames:
        kinds = ["memory"] if "clock" in metafunc.fixturenames else ["memory", "redis"]
        metafunc.parametrize("storage_kind", kinds)


@pytest.fixture
def store(storage_kind: str, request: pytest.FixtureRequest) -> Iterator[SessionStore]:
    if storage_kind == "redis":
        s = SessionStore(storage=RedisStorage(request.getfixturevalue("redis_url")))
    else:
        s = SessionStore()
    yield s
    s.close()
    s.storage.close()


@pytest.fixture
def session(store: SessionStore) -> str:
    store.create_session("s1", {"owner": "tests"})
    return "s1"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(session_store_module, "time", types.SimpleNamespace(monotonic=fake.monotonic, time=fake.time))
    return fake


def drain(watch: Watch) -> list[VariableUpdate]:
    out = []
    while (update := watch.next_update(timeout=0)) is not None:
        out.append(update)
    return out


def state_of(store: SessionStore, session: str, name: str) -> tuple[Any, int, dict[str, str], int]:
    var = store.get_variable(session, name)
    return var.value, var.version, dict(var.metadata), len(store.get_history(session, name))


# ------------------------------------------------------------------ sessions


class TestSessions:
    def test_create_and_describe(self, store: SessionStore) -> None:
        info = store.create_session("s1", {"owner": "tests", "n": 3}, ttl=120)
        assert info.id == "s1"
        assert info.metadata == {"owner": "tests", "n": "3"}
        assert info.ttl == 120
        assert info.variable_count == 0
        assert 0 < info.expires_in <= 120
        store.register_variable("s1", "x", "integer", 1)
        assert store.get_session("s1").variable_count == 1
        assert store.has_session("s1")
        assert store.session_ids() == ["s1"]

    def test_default_ttl(self) -> None:
        s = SessionStore(default_ttl=42)
        try:
            assert s.create_session("s").ttl == 42
        finally:
            s.close()

    def test_duplicate_session(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "x", "integer", 1)
        with pytest.raises(SessionExistsError):
            store.create_session(session)
        assert store.get_variable(session, "x").value == 1

    @pytest.mark.parametrize("session_id", ["", "x" * 257, None, 5])
    def test_bad_session_id(self, store: SessionStore, session_id: Any) -> None:
        with pytest.raises(ValidationError):
            store.create_session(session_id)
        assert store.session_ids() == []

    @pytest.mark.parametrize("ttl", [0, -1])
    def test_bad_ttl(self, store: SessionStore, ttl: float) -> None:
        with pytest.raises(ValidationError):
            store.create_session("s", ttl=ttl)
        assert not store.has_session("s")

    def test_bad_default_ttl(self) -> None:
        with pytest.raises(ValueError):
            SessionStore(default_ttl=0)

    def test_unknown_session(self, store: SessionStore) -> None:
        with pytest.raises(SessionNotFoundError):
            store.get_session("nope")
        with pytest.raises(SessionNotFoundError):
            store.register_variable("nope", "x", "integer", 1)
        with pytest.raises(SessionNotFoundError):
            store.get_variable("nope", "x")
        assert store.heartbeat("nope") is False
        assert store.has_session("nope") is False

    def test_ttl_expiry_in_real_time(self, store: SessionStore) -> None:
        store.create_session("short", ttl=0.2)
        store.create_session("long", ttl=3600)
        assert wait_until(lambda: not store.has_session("short"))
        with pytest.raises(SessionNotFoundError):
            store.get_session("short")
        assert store.session_ids() == ["long"]
        store.create_session("short")  # the id is free again
        assert store.has_session("short")

    def test_ttl_is_sliding(self, store: SessionStore, clock: FakeClock) -> None:
        store.create_session("s", ttl=10)
        for _ in range(5):
            clock.advance(9)
            assert store.heartbeat("s") is True
        clock.advance(9)
        store.register_variable("s", "x", "integer", 1)  # any use refreshes too
        clock.advance(9)
        assert store.get_variable("s", "x").value == 1
        clock.advance(10.5)
        assert store.has_session("s") is False
        assert store.heartbeat("s") is False
        with pytest.raises(SessionNotFoundError):
            store.get_variable("s", "x")

    def test_has_session_does_not_refresh(self, store: SessionStore, clock: FakeClock) -> None:
        store.create_session("s", ttl=10)
        clock.advance(6)
        assert store.has_session("s")
        clock.advance(6)
        assert not store.has_session("s")

    def test_expires_in_reports_the_remaining_ttl(self, store: SessionStore, clock: FakeClock) -> None:
        store.create_session("s", ttl=10)
        assert store.get_session("s").expires_in == pytest.approx(10)

    def test_sweep(self, store: SessionStore, clock: FakeClock) -> None:
        store.create_session("a", ttl=5)
        store.create_session("b", ttl=50)
        watch = store.watch("a")
        assert store.sweep() == []
        clock.advance(6)
        assert store.sweep() == ["a"]
        assert store.sweep() == []
        assert store.session_ids() == ["b"]
        assert watch.closed
        assert store.watcher_count == 0

    def test_sweeper_thread_removes_expired_sessions(self, store: SessionStore, clock: FakeClock) -> None:
        store.create_session("short", ttl=5)
        store.create_session("long", ttl=50)
        short_watch = store.watch("short")
        long_watch = store.watch("long")
        store.start_sweeper(interval=0.02)
        store.start_sweeper(interval=0.02)  # idempotent
        clock.advance(10)
        # Nobody touches the sessions: only the sweeper can close the expired one's watcher.
        assert wait_until(lambda: short_watch.closed)
        assert not long_watch.closed
        assert store.session_ids() == ["long"]

    def test_cleanup(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 1)
        store.register_variable(session, "b", "integer", 2)
        watch = store.watch(session)
        assert store.cleanup_session(session) == 2
        assert watch.closed
        assert not store.has_session(session)
        with pytest.raises(SessionNotFoundError):
            store.cleanup_session(session)

    def test_expired_session_can_be_recreated(self, store: SessionStore, clock: FakeClock) -> None:
        store.create_session("s", ttl=1)
        store.register_variable("s", "x", "integer", 1)
        clock.advance(2)
        store.create_session("s")
        assert store.list_variables("s") == []

    def test_closed_store(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "x", "integer", 1)
        store.close()
        with pytest.raises(BridgeUnavailableError):
            store.create_session("other")
        with pytest.raises(BridgeUnavailableError):
            store.get_variable(session, "x")
        with pytest.raises(BridgeUnavailableError):
            store.set_variable(session, "x", 2)
        store.close()  # idempotent


# ------------------------------------------------------------------ variables


class TestVariables:
    def test_ids_are_var_name_n_and_increase(self, store: SessionStore, session: str) -> None:
        store.create_session("s2")
        ids = [
            store.register_variable(session, "alpha", "integer", 1).id,
            store.register_variable(session, "beta", "integer", 1).id,
            store.register_variable("s2", "alpha", "integer", 1).id,
            store.register_variable(session, "gamma.x", "integer", 1).id,
        ]
        numbers = []
        for var_id, name in zip(ids, ["alpha", "beta", "alpha", "gamma.x"], strict=True):
            match = re.fullmatch(r"var_(.+)_(\d+)", var_id)
            assert match is not None
            assert match.group(1) == name
            numbers.append(int(match.group(2)))
        assert numbers == sorted(numbers)
        assert len(set(numbers)) == len(numbers)
        assert len(set(ids)) == len(ids)

    def test_register_returns_the_variable(self, store: SessionStore, session: str) -> None:
        var = store.register_variable(
            session,
            "temperature",
            "float",
            1,
            constraints={"min": 0.0, "max": 2.0},
            description="randomness",
            metadata={"owner": "tests", "n": 1},
            source="worker",
        )
        assert var.name == "temperature"
        assert var.type == "float"
        assert var.value == 1.0
        assert type(var.value) is float
        assert var.constraints == {"min": 0.0, "max": 2.0}
        assert var.description == "randomness"
        assert var.metadata == {"owner": "tests", "n": "1"}
        assert var.version == 1
        assert var.source == "worker"
        assert var.created_at == var.updated_at > 0

    def test_lookup_by_id_then_name(self, store: SessionStore, session: str) -> None:
        a = store.register_variable(session, "a", "integer", 1)
        assert store.get_variable(session, a.id).name == "a"
        assert store.get_variable(session, "a").id == a.id
        # A variable whose *name* equals another's id: the id wins.
        store.register_variable(session, a.id, "string", "named like an id")
        assert store.get_variable(session, a.id).name == "a"

    def test_missing_variable(self, store: SessionStore, session: str) -> None:
        with pytest.raises(VariableNotFoundError) as info:
            store.get_variable(session, "nope")
        assert "nope" in str(info.value)

    @pytest.mark.parametrize("identifier", ["", None, 5])
    def test_bad_identifier(self, store: SessionStore, session: str, identifier: Any) -> None:
        with pytest.raises(DSPexError):
            store.get_variable(session, identifier)

    def test_duplicate_name(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "x", "integer", 1)
        with pytest.raises(VariableExistsError):
            store.register_variable(session, "x", "string", "other")
        assert store.get_variable(session, "x").value == 1
        assert len(store.list_variables(session)) == 1

    def test_same_name_in_two_sessions(self, store: SessionStore, session: str) -> None:
        store.create_session("s2")
        store.register_variable(session, "x", "integer", 1)
        store.register_variable("s2", "x", "integer", 2)
        assert store.get_variable(session, "x").value == 1
        assert store.get_variable("s2", "x").value == 2

    @pytest.mark.parametrize(
        ("name", "type_", "value", "constraints"),
        [
            ("9bad", "integer", 1, None),
            ("ok", "nope", 1, None),
            ("ok", "integer", "x", None),
            ("ok", "integer", 5, {"max": 1}),
            ("ok", "integer", 1, {"min": 2, "max": 1}),
            ("ok", "string", "x", {"pattern": "("}),
        ],
    )
    def test_bad_register_changes_nothing(
        self, store: SessionStore, session: str, name: str, type_: str, value: Any, constraints: Any
    ) -> None:
        with pytest.raises(ValidationError):
            store.register_variable(session, name, type_, value, constraints=constraints)
        assert store.list_variables(session) == []

    def test_versions_grow_by_one(self, store: SessionStore, session: str) -> None:
        assert store.register_variable(session, "x", "integer", 0).version == 1
        for expected in range(2, 12):
            assert store.set_variable(session, "x", expected).version == expected
        assert store.get_variable(session, "x").version == 11

    def test_set_by_id(self, store: SessionStore, session: str) -> None:
        var = store.register_variable(session, "x", "integer", 0)
        assert store.set_variable(session, var.id, 5).value == 5
        assert store.get_variable(session, "x").value == 5

    def test_cas(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "x", "integer", 0)
        assert store.set_variable(session, "x", 1, expected_version=1).version == 2
        with pytest.raises(VersionConflictError) as info:
            store.set_variable(session, "x", 99, expected_version=1)
        assert (info.value.expected, info.value.actual) == (1, 2)
        var = store.get_variable(session, "x")
        assert (var.value, var.version) == (1, 2)
        assert store.set_variable(session, "x", 3, expected_version=0).version == 3
        assert store.set_variable(session, "x", 4, expected_version=None).version == 4

    def test_write_metadata_belongs_to_the_write_not_the_variable(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "x", "integer", 0, metadata={"a": "1", "b": "2"})
        var = store.set_variable(session, "x", 1, metadata={"b": "two", "c": 3})
        assert var.metadata == {"a": "1", "b": "two", "c": "3"}  # shown on the version it made
        assert store.set_variable(session, "x", 2).metadata == {"a": "1", "b": "2"}  # and on no later one
        newest, first_write = store.get_history(session, "x")[:2]
        assert (newest.version, newest.metadata) == (3, {})
        assert (first_write.version, first_write.metadata) == (2, {"b": "two", "c": "3"})
        assert store.get_variable(session, "x").metadata == {"a": "1", "b": "2"}

    def test_bad_metadata_changes_nothing(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "x", "integer", 0)
        before = state_of(store, session, "x")
        with pytest.raises(ValidationError):
            store.set_variable(session, "x", 1, metadata={"bad": [1]})
        assert state_of(store, session, "x") == before

    def test_source_and_updated_at(self, store: SessionStore, session: str) -> None:
        ticks = iter(range(100, 200))
        timed = SessionStore(clock=lambda: float(next(ticks)))
        try:
            timed.create_session("s")
            var = timed.register_variable("s", "x", "integer", 0)
            assert var.source == "orchestrator"
            later = timed.set_variable("s", "x", 1, source="worker")
            assert later.source == "worker"
            assert later.created_at == var.created_at
            assert later.updated_at > var.updated_at
        finally:
            timed.close()

    def test_history_newest_first(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "x", "integer", 0)
        store.set_variable(session, "x", 10, source="worker", metadata={"why": "test"})
        store.set_variable(session, "x", 20)
        history = store.get_history(session, "x")
        assert [(h.version, h.value) for h in history] == [(3, 20), (2, 10), (1, 0)]
        assert history[1].changed_by == "worker"
        assert history[1].metadata == {"why": "test"}
        assert [h.version for h in store.get_history(session, "x", limit=2)] == [3, 2]

    def test_history_is_bounded(self) -> None:
        s = SessionStore(limits=StoreLimits(history_limit=5))
        try:
            s.create_session("s")
            s.register_variable("s", "x", "integer", 0)
            for i in range(1, 50):
                s.set_variable("s", "x", i)
            history = s.get_history("s", "x")
            assert [h.version for h in history] == [50, 49, 48, 47, 46]
            assert [h.value for h in history] == [49, 48, 47, 46, 45]
        finally:
            s.close()

    def test_rollback_is_a_new_version(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "x", "string", "first")
        store.set_variable(session, "x", "second")
        store.set_variable(session, "x", "third")
        var = store.rollback_variable(session, "x", 1)
        assert (var.value, var.version) == ("first", 4)
        assert var.metadata.get("rolled_back_to") == "1"
        assert store.get_history(session, "x")[0].value == "first"
        assert store.get_history(session, "x")[0].metadata == {"rolled_back_to": "1"}

    def test_rollback_to_an_unknown_version_changes_nothing(self) -> None:
        s = SessionStore(limits=StoreLimits(history_limit=2))
        try:
            s.create_session("s")
            s.register_variable("s", "x", "integer", 0)
            for i in range(1, 5):
                s.set_variable("s", "x", i)
            before = state_of(s, "s", "x")
            for target in (1, 99, 0):
                with pytest.raises(ValidationError):
                    s.rollback_variable("s", "x", target)
            assert state_of(s, "s", "x") == before
        finally:
            s.close()

    def test_atomic_batch(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 0, constraints={"max": 10})
        store.register_variable(session, "b", "integer", 0)
        result = store.set_variables(session, {"a": 5, "b": 6})
        assert result.success
        assert result.new_versions == {"a": 2, "b": 2}
        result = store.set_variables(session, {"a": 11, "b": 7, "missing": 1})
        assert not result.success
        assert result.new_versions == {}
        assert set(result.errors) == {"a", "missing"}
        assert isinstance(result.errors["a"], ValidationError)
        assert isinstance(result.errors["missing"], VariableNotFoundError)
        assert store.get_variable(session, "a").value == 5
        assert (store.get_variable(session, "b").value, store.get_variable(session, "b").version) == (6, 2)

    def test_non_atomic_batch(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 0, constraints={"max": 10})
        store.register_variable(session, "b", "integer", 0)
        result = store.set_variables(session, {"a": 11, "b": 7, "missing": 1}, atomic=False)
        assert not result.success
        assert result.new_versions == {"b": 2}
        assert set(result.errors) == {"a", "missing"}
        assert store.get_variable(session, "a").version == 1
        assert store.get_variable(session, "b").value == 7

    def test_batch_metadata_and_ids(self, store: SessionStore, session: str) -> None:
        a = store.register_variable(session, "a", "integer", 0)
        result = store.set_variables(session, {a.id: 1}, metadata={"batch": "1"})
        assert result.new_versions == {a.id: 2}
        assert store.get_variable(session, "a").metadata["batch"] == "1"
        assert store.get_history(session, "a")[0].metadata == {"batch": "1"}
        store.set_variable(session, "a", 2)
        assert "batch" not in store.get_variable(session, "a").metadata

    def test_get_variables(self, store: SessionStore, session: str) -> None:
        a = store.register_variable(session, "a", "integer", 1)
        store.register_variable(session, "b", "integer", 2)
        found, missing = store.get_variables(session, ["a", a.id, "b", "nope"])
        assert {k: v.value for k, v in found.items()} == {"a": 1, a.id: 1, "b": 2}
        assert missing == ["nope"]

    def test_list_in_creation_order_with_glob(self, store: SessionStore, session: str) -> None:
        for name in ["temp_b", "model", "temp_a", "top_p", "temp_c"]:
            store.register_variable(session, name, "integer", 1)
        assert [v.name for v in store.list_variables(session)] == ["temp_b", "model", "temp_a", "top_p", "temp_c"]
        assert [v.name for v in store.list_variables(session, "*")] == [
            "temp_b",
            "model",
            "temp_a",
            "top_p",
            "temp_c",
        ]
        assert [v.name for v in store.list_variables(session, "temp_*")] == ["temp_b", "temp_a", "temp_c"]
        assert [v.name for v in store.list_variables(session, "t*p*")] == ["temp_b", "temp_a", "top_p", "temp_c"]
        assert [v.name for v in store.list_variables(session, "temp")] == []
        assert store.list_variables(session, "nothing*") == []

    def test_order_survives_updates_and_deletes(self, store: SessionStore, session: str) -> None:
        for name in "abcd":
            store.register_variable(session, name, "integer", 1)
        store.set_variable(session, "a", 2)
        store.delete_variable(session, "b")
        store.register_variable(session, "b", "integer", 3)
        assert [v.name for v in store.list_variables(session)] == ["a", "c", "d", "b"]

    def test_delete(self, store: SessionStore, session: str) -> None:
        first = store.register_variable(session, "x", "integer", 1)
        store.delete_variable(session, "x")
        with pytest.raises(VariableNotFoundError):
            store.get_variable(session, "x")
        with pytest.raises(VariableNotFoundError):
            store.get_variable(session, first.id)
        with pytest.raises(VariableNotFoundError):
            store.delete_variable(session, "x")
        again = store.register_variable(session, "x", "integer", 2)
        assert again.id != first.id
        assert again.version == 1

    def test_delete_by_id(self, store: SessionStore, session: str) -> None:
        var = store.register_variable(session, "x", "integer", 1)
        store.delete_variable(session, var.id)
        assert store.list_variables(session) == []

    def test_snapshots_are_copies(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "e", "embedding", [1.0, 2.0])
        store.register_variable(session, "t", "tensor", {"shape": [2], "data": [1.0, 2.0]})
        e = store.get_variable(session, "e").value
        t = store.get_variable(session, "t").value
        e.append(3.0)
        t["data"][0] = 99.0
        t["shape"].append(1)
        assert store.get_variable(session, "e").value == [1.0, 2.0]
        assert store.get_variable(session, "t").value == {"shape": [2], "data": [1.0, 2.0]}

    def test_import_keeps_versions_and_metadata(self, store: SessionStore, session: str) -> None:
        incoming = [
            Variable(id="old_1", name="a", type="integer", value=5, version=7, metadata={"k": "v"}, created_at=1.0),
            Variable(id="old_2", name="b", type="float", value=1, constraints={"max": 2.0}, version=1),
        ]
        out = store.import_variables(session, incoming)
        assert [(v.name, v.value, v.version) for v in out] == [("a", 5, 7), ("b", 1.0, 1)]
        assert [store.get_variable(session, v.name).id for v in out] == [v.id for v in out]
        assert store.get_variable(session, "a").metadata == {"k": "v"}
        assert store.get_variable(session, "a").created_at == 1.0
        assert store.set_variable(session, "a", 6).version == 8
        with pytest.raises(ValidationError):
            store.set_variable(session, "b", 3.0)

    @pytest.mark.parametrize(
        "bad",
        [
            Variable(id="", name="c", type="integer", value="x"),
            Variable(id="", name="c", type="integer", value=5, constraints={"max": 1}),
            Variable(id="", name="9c", type="integer", value=1),
            Variable(id="", name="c", type="integer", value=1, version=0),
            Variable(id="", name="existing", type="integer", value=1),
            Variable(id="", name="a", type="integer", value=1),
        ],
        ids=["type", "constraint", "name", "version", "clash", "duplicate-in-batch"],
    )
    @pytest.mark.parametrize("entry", ["import_variables", "import_variable_ids"])
    def test_import_is_all_or_nothing(self, store: SessionStore, session: str, bad: Variable, entry: str) -> None:
        store.register_variable(session, "existing", "integer", 1)
        good = Variable(id="", name="a", type="integer", value=1)
        with pytest.raises(DSPexError):
            getattr(store, entry)(session, [good, bad])
        assert [v.name for v in store.list_variables(session)] == ["existing"]

    def test_an_import_for_ids_answers_the_ids_of_what_it_made(self, store: SessionStore, session: str) -> None:
        incoming = [
            Variable(id="old_1", name="a", type="integer", value=5, version=7, metadata={"k": "v"}, created_at=1.0),
            Variable(id="old_2", name="b", type="embedding", value=[1.0, 2.0], version=2),
        ]
        ids = store.import_variable_ids(session, incoming)
        made = store.list_variables(session)
        assert ids == [v.id for v in made]
        assert all(i not in ("old_1", "old_2") for i in ids)
        assert [(v.name, v.value, v.version, dict(v.metadata)) for v in made] == [
            ("a", 5, 7, {"k": "v"}),
            ("b", [1.0, 2.0], 2, {}),
        ]


# ------------------------------------------------------------------ limits and rejected operations


class TestLimits:
    def test_sessions(self) -> None:
        s = SessionStore(limits=StoreLimits(max_sessions=2))
        try:
            s.create_session("a")
            s.create_session("b")
            with pytest.raises(LimitExceededError) as info:
                s.create_session("c")
            assert info.value.maximum == 2
            assert sorted(s.session_ids()) == ["a", "b"]
            s.cleanup_session("a")
            s.create_session("c")
        finally:
            s.close()

    def test_variables_per_session(self) -> None:
        s = SessionStore(limits=StoreLimits(max_variables_per_session=2))
        try:
            s.create_session("s")
            s.register_variable("s", "a", "integer", 1)
            s.register_variable("s", "b", "integer", 1)
            with pytest.raises(LimitExceededError):
                s.register_variable("s", "c", "integer", 1)
            s.create_session("t")
            s.register_variable("t", "a", "integer", 1)
            with pytest.raises(LimitExceededError):
                s.import_variables("t", [Variable("", "x", "integer", 1), Variable("", "y", "integer", 1)])
            assert [v.name for v in s.list_variables("s")] == ["a", "b"]
            assert [v.name for v in s.list_variables("t")] == ["a"]
        finally:
            s.close()

    def test_value_size(self) -> None:
        s = SessionStore(limits=StoreLimits(max_value_bytes=16))
        try:
            s.create_session("s")
            with pytest.raises(LimitExceededError):
                s.register_variable("s", "big", "string", "x" * 17)
            s.register_variable("s", "text", "string", "x" * 16)
            s.register_variable("s", "vec", "embedding", [1.0, 2.0])
            before = state_of(s, "s", "text")
            with pytest.raises(LimitExceededError):
                s.set_variable("s", "text", "y" * 100)
            with pytest.raises(LimitExceededError):
                s.set_variable("s", "vec", [0.0] * 100)
            result = s.set_variables("s", {"text": "z" * 100})
            assert isinstance(result.errors["text"], LimitExceededError)
            assert state_of(s, "s", "text") == before
            assert s.get_variable("s", "vec").value == [1.0, 2.0]
            assert [v.name for v in s.list_variables("s")] == ["text", "vec"]
        finally:
            s.close()

    def test_watchers(self) -> None:
        s = SessionStore(limits=StoreLimits(max_watchers=2))
        try:
            s.create_session("s")
            first = s.watch("s")
            s.watch("s")
            with pytest.raises(LimitExceededError):
                s.watch("s")
            assert s.watcher_count == 2
            s.unwatch(first)
            s.watch("s")
            assert s.watcher_count == 2
        finally:
            s.close()

    def test_closed_watches_free_their_slot(self) -> None:
        s = SessionStore(limits=StoreLimits(max_watchers=1))
        try:
            s.create_session("s")
            s.watch("s").close()
            s.watch("s")
        finally:
            s.close()


REJECTED_OPS = {
    "type": lambda s: s.set_variable("s", "x", "text"),
    "constraint": lambda s: s.set_variable("s", "x", 11),
    "cas": lambda s: s.set_variable("s", "x", 3, expected_version=1),
    "cas-and-invalid": lambda s: s.set_variable("s", "x", 11, expected_version=1),
    "size": lambda s: s.set_variable("s", "name", "n" * 100),
    "metadata": lambda s: s.set_variable("s", "x", 3, metadata={"k": None}),
    "atomic-batch": lambda s: s.set_variables("s", {"x": 3, "name": 5}),
    "rollback": lambda s: s.rollback_variable("s", "x", 42),
    "duplicate": lambda s: s.register_variable("s", "x", "integer", 0),
    "missing": lambda s: s.set_variable("s", "missing", 1),
    "unknown-session": lambda s: s.set_variable("nope", "x", 1),
}


@pytest.mark.parametrize("op", list(REJECTED_OPS.values()), ids=list(REJECTED_OPS))
def test_every_rejected_operation_changes_nothing(op: Any) -> None:
    s = SessionStore(limits=StoreLimits(max_value_bytes=32))
    try:
        s.create_session("s")
        s.register_variable("s", "x", "integer", 0, constraints={"min": 0, "max": 10})
        s.set_variable("s", "x", 2)
        s.register_variable("s", "name", "string", "short")
        watch = s.watch("s", include_initial=False)
        before = [(v.name, v.value, v.version, dict(v.metadata), v.updated_at) for v in s.list_variables("s")]
        histories = [len(s.get_history("s", n)) for n in ("x", "name")]
        result = None
        try:
            result = op(s)
        except DSPexError:
            pass
        else:
            assert result is not None
            assert not result.success, "the operation should have been rejected"
        after = [(v.name, v.value, v.version, dict(v.metadata), v.updated_at) for v in s.list_variables("s")]
        assert after == before
        assert [len(s.get_history("s", n)) for n in ("x", "name")] == histories
        assert watch.pending == 0
    finally:
        s.close()


# ------------------------------------------------------------------ watchers


class TestWatch:
    def test_initial_snapshot(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 1)
        store.set_variable(session, "a", 2)
        store.register_variable(session, "b", "string", "x")
        store.register_variable(session, "c", "boolean", True)
        watch = store.watch(session, ["a", "b"])
        updates = drain(watch)
        assert [(u.name, u.update_type, u.variable.value, u.variable.version) for u in updates] == [
            ("a", UpdateType.INITIAL_VALUE, 2, 2),
            ("b", UpdateType.INITIAL_VALUE, "x", 1),
        ]

    def test_without_initial_values(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 1)
        watch = store.watch(session, ["a"], include_initial=False)
        assert watch.next_update(timeout=0) is None
        store.set_variable(session, "a", 5, source="worker", metadata={"why": "x"})
        update = watch.next_update(timeout=DEADLINE_S)
        assert update is not None
        assert (update.update_type, update.variable.value, update.variable.version) == (UpdateType.VALUE_CHANGE, 5, 2)
        assert update.source == "worker"
        assert update.metadata == {"why": "x"}
        assert update.variable_id == store.get_variable(session, "a").id

    def test_only_watched_variables(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 1)
        store.register_variable(session, "b", "integer", 1)
        watch = store.watch(session, ["a"], include_initial=False)
        store.set_variable(session, "b", 2)
        store.register_variable(session, "c", "integer", 1)
        assert watch.pending == 0
        store.set_variable(session, "a", 2)
        assert [u.name for u in drain(watch)] == ["a"]

    def test_watch_by_id(self, store: SessionStore, session: str) -> None:
        var = store.register_variable(session, "a", "integer", 1)
        watch = store.watch(session, [var.id])
        assert [u.name for u in drain(watch)] == ["a"]

    def test_watch_all_sees_later_variables(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 1)
        watch = store.watch(session)
        assert [u.name for u in drain(watch)] == ["a"]
        store.register_variable(session, "late", "string", "hello")
        store.set_variable(session, "late", "again")
        updates = drain(watch)
        assert [(u.name, u.variable.value, u.variable.version) for u in updates] == [("late", "again", 2)]

    def test_unknown_variable(self, store: SessionStore, session: str) -> None:
        with pytest.raises(VariableNotFoundError):
            store.watch(session, ["nope"])
        assert store.watcher_count == 0
        with pytest.raises(SessionNotFoundError):
            store.watch("nope")

    def test_deleted_update(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 7)
        watch = store.watch(session, ["a"], include_initial=False)
        store.delete_variable(session, "a")
        update = watch.next_update(timeout=DEADLINE_S)
        assert update is not None
        assert update.update_type == UpdateType.DELETED
        assert update.name == "a"
        assert update.variable.value == 7

    def test_coalescing_bounds_memory_and_ends_on_latest(self, store: SessionStore, session: str) -> None:
        names = ["a", "b", "c"]
        for name in names:
            store.register_variable(session, name, "integer", 0)
        watch = store.watch(session)
        for i in range(1, 1001):
            store.set_variable(session, names[i % 3], i)
            assert watch.pending <= len(names)
        assert watch.coalesced > 0
        updates = drain(watch)
        assert len(updates) <= len(names)
        latest = {name: store.get_variable(session, name) for name in names}
        last = {u.name: u.variable for u in updates}
        for name in names:
            assert (last[name].value, last[name].version) == (latest[name].value, latest[name].version)

    def test_versions_strictly_increase_under_a_concurrent_writer(self, store: SessionStore, session: str) -> None:
        names = ["a", "b", "c"]
        for name in names:
            store.register_variable(session, name, "integer", 0)
        watch = store.watch(session)
        writes = 3000

        def writer() -> None:
            for i in range(1, writes + 1):
                store.set_variable(session, names[i % 3], i)

        thread = threading.Thread(target=writer)
        thread.start()
        seen: dict[str, list[int]] = {n: [] for n in names}
        final_versions = {n: writes // 3 + 1 for n in names}
        deadline = time.monotonic() + DEADLINE_S
        while any(not v or v[-1] < final_versions[n] for n, v in seen.items()) and time.monotonic() < deadline:
            update = watch.next_update(timeout=0.5)
            if update is not None:
                seen[update.name].append(update.variable.version)
        thread.join()
        for name, versions in seen.items():
            assert versions == sorted(set(versions)), f"{name}: versions not strictly increasing"
            assert versions[-1] == final_versions[name]
            assert store.get_variable(session, name).version == final_versions[name]

    def test_unwatch(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 1)
        watch = store.watch(session, include_initial=False)
        assert store.watcher_count == 1
        store.unwatch(watch)
        assert watch.closed
        assert store.watcher_count == 0
        store.set_variable(session, "a", 2)
        assert watch.pending == 0
        assert watch.next_update(timeout=0) is None
        store.unwatch(watch)  # idempotent
        assert store.watcher_count == 0

    def test_close_wakes_a_blocked_reader(self, store: SessionStore, session: str) -> None:
        watch = store.watch(session)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(watch.next_update()))
        reader.start()
        watch.close()
        reader.join(DEADLINE_S)
        assert not reader.is_alive()
        assert got == [None]

    def test_pending_updates_are_still_delivered_after_close(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 1)
        watch = store.watch(session)
        watch.close()
        assert [u.name for u in watch] == ["a"]

    def test_store_close_ends_watches(self, session: str, store: SessionStore) -> None:
        store.register_variable(session, "a", "integer", 1)
        watch = store.watch(session, include_initial=False)
        received: list[VariableUpdate] = []
        finished = threading.Event()

        def consume() -> None:
            received.extend(watch)
            finished.set()

        thread = threading.Thread(target=consume)
        thread.start()
        store.close()
        assert finished.wait(DEADLINE_S)
        thread.join(DEADLINE_S)
        assert watch.closed
        assert received == []
        assert store.watcher_count == 0

    def test_iteration_yields_updates_in_order(self, store: SessionStore, session: str) -> None:
        store.register_variable(session, "a", "integer", 0)
        store.register_variable(session, "b", "integer", 0)
        watch = store.watch(session, include_initial=False)
        store.set_variable(session, "b", 1)
        store.set_variable(session, "a", 1)
        store.set_variable(session, "b", 2)  # replaces b's pending update and takes the newest place
        watch.close()
        assert [(u.name, u.variable.value) for u in watch] == [("a", 1), ("b", 2)]

    def test_heartbeat_update_has_no_name(self) -> None:
        assert VariableUpdate("", None, UpdateType.HEARTBEAT).name == ""


def test_a_detached_record_carries_every_field_and_owns_its_mutable_parts() -> None:
    """What the store hands out is the engine's record field for field, with copies to change freely."""
    from dataclasses import fields

    from dspex_dspy.types import OptimizationStatus

    status = OptimizationStatus("opt-1", 5.0)
    record = Variable(
        id="var_e_1",
        name="e",
        type="embedding",
        value=[0.5, 1.5],
        constraints={"dimensions": 2},
        description="an embedding",
        metadata={"k": "v"},
        version=7,
        created_at=1.0,
        updated_at=2.0,
        source="worker",
        optimization_status=status,
    )
    # Every field is set above to something other than its default: a new field must be added here.
    assert {f.name for f in fields(Variable)} == {
        "id", "name", "type", "value", "constraints", "description", "metadata",
        "version", "created_at", "updated_at", "source", "optimization_status",
    }  # fmt: skip
    copy = session_store_module._detached(record, status)
    assert copy == record
    assert copy.value is not record.value and copy.constraints is not record.constraints
    assert copy.metadata is not record.metadata
    assert session_store_module._detached(record).optimization_status is None


def test_a_record_served_owns_its_constraints(store: SessionStore, session: str) -> None:
    """Changing the constraints of a record the store handed out (a list in them too) changes
    neither the variable's definition nor the next record served."""
    store.register_variable(session, "model", "string", "a", constraints={"enum": ["a", "b"], "max_length": 5})
    first = store.get_variable(session, "model")
    first.constraints["enum"].append("c")  # type: ignore[index]
    first.constraints["max_length"] = 1  # type: ignore[index]
    for again in (store.get_variable(session, "model"), store.list_variables(session)[0]):
        assert again.constraints == {"enum": ["a", "b"], "max_length": 5}
