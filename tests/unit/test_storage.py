"""The storage seam on every engine: atomic CAS batches, bounded history, a resumable bounded change
log, and (Redis) two stores on one Redis behaving as two bridge nodes of the same sessions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from dspex_dspy.errors import BridgeUnavailableError, SessionNotFoundError, VariableNotFoundError, VersionConflictError
from dspex_dspy.records import UpdateType
from dspex_dspy.store import MemoryStorage, SessionStore, StoreLimits
from dspex_dspy.store.redis_storage import RedisStorage, _keys
from dspex_dspy.store.storage import NewVariable, Storage, Write

pytestmark = pytest.mark.unit

DEADLINE_S = 30.0


@pytest.fixture(params=["memory", "redis"])
def make_storage(request: pytest.FixtureRequest) -> Iterator[object]:
    made: list[Storage] = []

    def make(changelog_limit: int = 10_000) -> Storage:
        storage: Storage
        if request.param == "redis":
            storage = RedisStorage(request.getfixturevalue("redis_url"), changelog_limit=changelog_limit)
        else:
            storage = MemoryStorage(changelog_limit=changelog_limit)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


def _session(storage: Storage, sid: str = "s1", *names: str) -> list[str]:
    storage.create_session(sid, {}, 60.0, 1.0, 100)
    made = storage.insert_variables(
        sid,
        [NewVariable(n, "integer", 0) for n in names],
        now=2.0,
        max_variables=1000,
        history_limit=5,
    )
    return [v.id for v in made]


def test_an_atomic_batch_with_one_stale_version_applies_nothing(make_storage) -> None:  # type: ignore[no-untyped-def]
    storage = make_storage()
    a, b = _session(storage, "s1", "a", "b")
    with pytest.raises(VersionConflictError) as info:
        storage.apply_writes("s1", [Write(a, 5, expected_version=1), Write(b, 6, expected_version=7)], history_limit=5)
    assert (info.value.name, info.value.expected, info.value.actual) == ("b", 7, 1)
    found = storage.read_variables("s1", ["a", "b"])
    assert (found["a"].value, found["a"].version, found["b"].value, found["b"].version) == (0, 1, 0, 1)
    written = storage.apply_writes(
        "s1", [Write(a, 5, expected_version=1), Write(b, 6, expected_version=1)], history_limit=5
    )
    assert [(v.name, v.value, v.version) for v in written] == [("a", 5, 2), ("b", 6, 2)]


def test_history_is_bounded_and_versions_count_every_write(make_storage) -> None:  # type: ignore[no-untyped-def]
    storage = make_storage()
    (a,) = _session(storage, "s1", "a")
    for i in range(1, 12):
        storage.apply_writes("s1", [Write(a, i, metadata={"i": str(i)})], history_limit=5)
    history = storage.history("s1", a)
    assert [e.version for e in history] == [8, 9, 10, 11, 12]
    assert [e.value for e in history] == [7, 8, 9, 10, 11]
    assert history[-1].metadata == {"i": "11"}
    assert storage.read_variables("s1", [a])[a].metadata == {"i": "11"}


def test_the_change_log_is_readable_from_any_position(make_storage) -> None:  # type: ignore[no-untyped-def]
    storage = make_storage()
    (a,) = _session(storage, "s1", "a")
    start = storage.position("s1")
    assert start == 1  # the creation
    for i in range(1, 6):
        storage.apply_writes("s1", [Write(a, i)], history_limit=5)
    batch = storage.read_changes("s1", start, 1.0)
    assert batch.position == start + 5 and not batch.resync
    assert [u.variable.version for u in batch.updates if u.variable] == [2, 3, 4, 5, 6]
    again = storage.read_changes("s1", start + 3, 1.0)
    assert [u.variable.value for u in again.updates if u.variable] == [4, 5]
    storage.delete_variable("s1", a, source="worker", timestamp=3.0)
    last = storage.read_changes("s1", again.position, 1.0)
    assert [u.update_type for u in last.updates] == [UpdateType.DELETED]
    assert storage.read_changes("s1", last.position, 0.05).updates == ()


def test_a_reader_behind_the_compacted_log_is_told_to_resync(make_storage) -> None:  # type: ignore[no-untyped-def]
    storage = make_storage(changelog_limit=3)
    (a,) = _session(storage, "s1", "a")
    for i in range(300):
        storage.apply_writes("s1", [Write(a, i)], history_limit=5)
    batch = storage.read_changes("s1", 1, 1.0)
    assert batch.resync
    assert batch.position == storage.position("s1")
    tail = storage.read_changes("s1", batch.position - 1, 1.0)
    assert not tail.resync and [u.variable.value for u in tail.updates if u.variable] == [299]


def test_writes_to_a_missing_session_or_variable_raise(make_storage) -> None:  # type: ignore[no-untyped-def]
    storage = make_storage()
    _session(storage, "s1")
    with pytest.raises(VariableNotFoundError):
        storage.apply_writes("s1", [Write("var_nope_1", 1)], history_limit=5)
    with pytest.raises(SessionNotFoundError):
        storage.apply_writes("nope", [Write("var_nope_1", 1)], history_limit=5)
    assert storage.delete_session("s1") == 0
    assert storage.delete_session("s1") is None


# ------------------------------------------------------------------ two nodes on one Redis


@pytest.fixture
def two_nodes(redis_url: str) -> Iterator[tuple[SessionStore, SessionStore]]:
    a = SessionStore(storage=RedisStorage(redis_url))
    b = SessionStore(storage=RedisStorage(redis_url))
    yield a, b
    for store in (a, b):
        store.close()
        store.storage.close()


def test_a_write_through_one_node_reaches_a_watcher_on_another_in_order(
    two_nodes: tuple[SessionStore, SessionStore],
) -> None:
    a, b = two_nodes
    a.create_session("s1")
    a.register_variable("s1", "x", "integer", 0)
    watch = b.watch("s1")
    first = watch.next_update(timeout=DEADLINE_S)
    assert first is not None and first.update_type == UpdateType.INITIAL_VALUE
    for i in range(1, 51):
        a.set_variable("s1", "x", i)
    seen = []
    while not seen or seen[-1] < 51:
        update = watch.next_update(timeout=DEADLINE_S)
        assert update is not None and update.variable is not None
        seen.append(update.variable.version)
    assert seen == sorted(set(seen))  # strictly increasing: ordered, no duplicate
    assert b.get_variable("s1", "x").value == 50
    a.register_variable("s1", "y", "string", "new")
    update = watch.next_update(timeout=DEADLINE_S)
    assert update is not None and update.name == "y"
    a.cleanup_session("s1")
    while watch.next_update(timeout=DEADLINE_S) is not None:
        pass
    assert watch.closed


def test_cas_increments_through_two_nodes_are_exact(two_nodes: tuple[SessionStore, SessionStore]) -> None:
    a, b = two_nodes
    a.create_session("s1")
    a.register_variable("s1", "n", "integer", 0)

    def bump(store: SessionStore) -> None:
        for _ in range(100):
            while True:
                var = store.get_variable("s1", "n")
                try:
                    store.set_variable("s1", "n", var.value + 1, expected_version=var.version)
                    break
                except VersionConflictError:
                    continue

    threads = [threading.Thread(target=bump, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = b.get_variable("s1", "n")
    assert (final.value, final.version) == (400, 401)


def test_session_ttl_is_redis_expiry(redis_url: str) -> None:
    # A database of its own: a sweeper of another store on the shared server (e.g. a bridge a
    # test left serving) must not sweep this test's expired session before it does.
    url = redis_url.rsplit("/", 1)[0] + "/9"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    ttl_s = 60.0  # long: nothing may expire while the session is being set up
    store = SessionStore(storage=RedisStorage(url), default_ttl=ttl_s, limits=StoreLimits())
    raw = redis.Redis.from_url(url)
    try:
        store.create_session("s1")
        store.register_variable("s1", "x", "integer", 1)
        info = store.get_session("s1")  # refreshes the expiry and reads it back in one script
        assert info.ttl == ttl_s
        assert 0 < info.expires_in <= ttl_s
        # The TTL is Redis's own expiry, on every key of the session.
        keys = [key for key in _keys("s1") if raw.exists(key)]
        assert len(keys) >= 2
        assert all(0 < raw.pttl(key) <= ttl_s * 1000 for key in keys), {key: raw.pttl(key) for key in keys}

        # Let Redis expire it now (as the TTL would, later): no sweep, no store call removes it.
        for key in keys:
            assert raw.pexpire(key, 50)
        end = time.monotonic() + DEADLINE_S
        while store.has_session("s1") and time.monotonic() < end:  # has_session does not refresh
            time.sleep(0.05)
        assert not store.has_session("s1")
        assert store.sweep() == ["s1"]
        store.create_session("s1")  # the id is free again
        assert store.list_variables("s1") == []
    finally:
        raw.close()
        store.close()
        store.storage.close()


def test_watchers_resume_from_their_position_when_redis_comes_back(durable_redis) -> None:  # type: ignore[no-untyped-def]
    redis_server = durable_redis("always")
    a = SessionStore(storage=RedisStorage(redis_server.url))
    b = SessionStore(storage=RedisStorage(redis_server.url))
    try:
        a.create_session("s1")
        a.register_variable("s1", "x", "integer", 0)
        watch = b.watch("s1")
        assert watch.next_update(timeout=DEADLINE_S) is not None  # the initial value
        a.set_variable("s1", "x", 1)
        redis_server.kill()
        redis_server.start()  # from its append-only file, on the same port
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            try:
                a.set_variable("s1", "x", 2)
                break
            except BridgeUnavailableError:
                time.sleep(0.05)
        versions = []
        while not versions or versions[-1] < 3:
            update = watch.next_update(timeout=DEADLINE_S)
            assert update is not None and update.variable is not None
            versions.append(update.variable.version)
        # Only the change log brings b a write made through a; a slow reader may get v2 coalesced
        # into v3, never a repeat or a step back.
        assert versions[-1] == 3 and versions == sorted(set(versions))
        assert b.get_variable("s1", "x").value == 2
    finally:
        for store in (a, b):
            store.close()
            store.storage.close()


def test_a_bulk_insert_larger_than_one_redis_command_keeps_every_variable(make_storage) -> None:  # type: ignore[no-untyped-def]
    """An import of 1,203 variables (each hash written by several HSETs of 500 fields on Redis)
    keeps every name, id, value, version, description, metadata, time and history entry."""
    storage = make_storage()
    storage.create_session("big", {}, 60.0, 1.0, 100)
    count = 1203
    made = storage.insert_variables(
        "big",
        [
            NewVariable(
                f"v{i}", "integer", i * 3, {}, f"d{i}", {"i": str(i)}, 1 + i % 4, 10.0 + i, 20.0 + i, "orchestrator"
            )
            for i in range(count)
        ],
        now=50.0,
        max_variables=5000,
        history_limit=5,
    )
    assert len({v.id for v in made}) == count
    by_name = storage.read_variables("big", [f"v{i}" for i in range(count)])
    by_id = storage.read_variables("big", [v.id for v in made])
    assert len(by_name) == len(by_id) == count
    for i, var in enumerate(made):
        got = by_name[f"v{i}"]
        assert got == by_id[var.id]
        assert (got.id, got.value, got.version, got.description) == (var.id, i * 3, 1 + i % 4, f"d{i}")
        assert (got.metadata, got.created_at, got.updated_at) == ({"i": str(i)}, 10.0 + i, 20.0 + i)
    assert [v.name for v in storage.list_variables("big")] == [f"v{i}" for i in range(count)]
    for i in (0, 499, 500, 1000, count - 1):
        (entry,) = storage.history("big", made[i].id)
        assert (entry.version, entry.value, entry.metadata) == (1 + i % 4, i * 3, {"i": str(i)})
