"""Reads and writes a Redis-backed ``grpc.aio`` node serves on its event loop (no thread hand-off).

A node whose store is nonblocking (``RedisStorage`` opened from a URL) answers ``GetVariable``,
``GetVariables``, and ``SetVariable`` for a variable it already knows, from the loop itself,
through an asyncio Redis client; everything else, and every write that must be judged afresh,
still runs the blocking handler in the pool. These tests serve a real store on a real
redis-server through real gRPC servers, count which path each call took, and check that both
paths answer alike: the same records, versions, history and watch events, and the same errors
for the same bad calls, with nothing written by a refused write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import (
    BridgeUnavailableError,
    DSPexError,
    SessionNotFoundError,
    ValidationError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.remote import RemoteStore
from dspex_dspy.server import BridgeServer, create_server
from dspex_dspy.store import SessionStore
from dspex_dspy.store.redis_storage import RedisStorage, _keys
from dspex_dspy.store.storage import LOOP_MAX_VALUE_BYTES, MemoryStorage, NewVariable, Write
from dspex_dspy.wire import any_to_value
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


LOOP_THREAD = "dspex-bridge-loop"


class Paths:
    """Counts the writes and reads each path of a storage did, and the threads the loop's ran on."""

    def __init__(self, storage: Any) -> None:
        self.loop_writes = 0
        self.pool_writes = 0
        self.loop_reads = 0
        self.pool_reads = 0
        self.loop_threads: set[str] = set()
        blocking, on_loop = storage.apply_writes, storage.apply_writes_async
        read, read_on_loop = storage.read_variables, storage.read_variables_async

        # The memory engine's loop path runs its blocking one inside: only calls off the loop count.
        def off_loop() -> bool:
            return threading.current_thread().name != LOOP_THREAD

        def read_variables(*args: Any, **kwargs: Any) -> Any:
            self.pool_reads += off_loop()
            return read(*args, **kwargs)

        async def read_variables_async(*args: Any, **kwargs: Any) -> Any:
            self.loop_reads += 1
            self.loop_threads.add(threading.current_thread().name)
            return await read_on_loop(*args, **kwargs)

        storage.read_variables = read_variables  # type: ignore[method-assign]
        storage.read_variables_async = read_variables_async  # type: ignore[method-assign]

        def apply_writes(*args: Any, **kwargs: Any) -> Any:
            self.pool_writes += off_loop()
            return blocking(*args, **kwargs)

        async def apply_writes_async(*args: Any, **kwargs: Any) -> Any:
            self.loop_writes += 1
            self.loop_threads.add(threading.current_thread().name)
            return await on_loop(*args, **kwargs)

        storage.apply_writes = apply_writes  # type: ignore[method-assign]
        storage.apply_writes_async = apply_writes_async  # type: ignore[method-assign]


@pytest.fixture(params=["memory", "redis"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[SessionStore, Paths, Callable[..., BridgeServer]]]:
    """A store on each engine, the counts of its paths, and a maker of servers serving it."""
    yield from _served(request.param, request)


@pytest.fixture
def served_redis(request: pytest.FixtureRequest) -> Iterator[tuple[SessionStore, Paths, Callable[..., BridgeServer]]]:
    """:func:`served` on Redis only (for what only a shared engine has)."""
    yield from _served("redis", request)


def _served(
    engine: str, request: pytest.FixtureRequest
) -> Iterator[tuple[SessionStore, Paths, Callable[..., BridgeServer]]]:
    storage: Any = RedisStorage(request.getfixturevalue("redis_url")) if engine == "redis" else MemoryStorage()
    store = SessionStore(storage=storage)
    paths = Paths(storage)
    servers: list[BridgeServer] = []

    def serve(asyncio: bool = True) -> BridgeServer:
        server, _ = create_server(store, asyncio=asyncio)
        servers.append(server.start())
        return server

    yield store, paths, serve
    for server in servers:
        server.stop(0)
    store.close()
    if engine == "redis":
        storage.close()


def test_a_known_variable_is_written_from_the_event_loop(served: Any) -> None:
    store, paths, serve = served
    server = serve()
    assert store.nonblocking
    with RemoteStore.connect(server.address) as client:
        client.create_session("s")
        client.register_variable("s", "count", "integer", 0, constraints={"min": 0})
        watch = store.watch("s", ["count"])
        versions = [client.set_variable("s", "count", i).version for i in range(1, 11)]
        assert versions == list(range(2, 12))
        assert client.get_variable("s", "count").value == 10
        # The first write learns the definition (in the pool); every later one is the loop's.
        assert paths.pool_writes == 1
        assert paths.loop_writes == 9
        assert paths.loop_threads == {LOOP_THREAD}
        history = client.get_history("s", "count")  # newest first
        assert [entry.version for entry in history] == list(range(11, 0, -1))
        assert [entry.value for entry in history] == list(range(10, -1, -1))
        seen: list[int] = []
        deadline = time.monotonic() + 30
        while (not seen or seen[-1] < 11) and time.monotonic() < deadline:
            update = watch.next_update(timeout=1.0)
            if update is not None and update.variable is not None:
                seen.append(update.variable.version)
        watch.close()
        assert seen == sorted(seen) and seen[-1] == 11


@pytest.mark.parametrize(
    ("write", "error"),
    [
        ({"value": -5}, ValidationError),
        ({"value": "not a number"}, ValidationError),
        ({"value": 3, "expected_version": 1}, VersionConflictError),
    ],
    ids=["constraint", "type", "stale-version"],
)
def test_a_refused_write_is_refused_alike_on_both_servers_and_writes_nothing(
    served: Any, write: dict[str, Any], error: type[DSPexError]
) -> None:
    _, paths, serve = served
    on_loop, blocking = serve(), serve(asyncio=False)
    messages = []
    with RemoteStore.connect(on_loop.address) as a, RemoteStore.connect(blocking.address) as b:
        a.create_session("s")
        a.register_variable("s", "count", "integer", 0, constraints={"min": 0})
        a.set_variable("s", "count", 1)
        b.set_variable("s", "count", 2)
        before_loop = paths.loop_writes
        for client in (a, b):
            with pytest.raises(error) as raised:
                client.set_variable("s", "count", **write)
            messages.append((type(raised.value), str(raised.value)))
        assert client.get_variable("s", "count").version == 3
        assert len(client.get_history("s", "count")) == 3
    assert messages[0] == messages[1]
    if error is VersionConflictError:
        assert paths.loop_writes == before_loop + 1  # the engine's own check, on the loop


def test_a_leased_variable_refuses_a_write_on_the_loop_and_a_forced_one_passes(served: Any) -> None:
    store, paths, serve = served
    server = serve()
    with RemoteStore.connect(server.address) as client:
        client.create_session("s")
        client.register_variable("s", "temperature", "float", 0.5)
        client.set_variable("s", "temperature", 0.6)
        store.start_optimization("s", ["temperature"], "tuner-1", ttl=60)
        before = paths.loop_writes
        with pytest.raises(VariableLockedError, match="tuner-1"):
            client.set_variable("s", "temperature", 0.7)
        forced = client.set_variable("s", "temperature", 0.8, force=True)
        # Redis checks leases in its write script, on the loop; leases kept in this process must
        # admit a write first, under their lock, in the pool.
        assert paths.loop_writes == before + (2 if isinstance(store.storage, RedisStorage) else 0)
        assert forced.version == 3
        entry = client.get_history("s", "temperature")[0]  # newest first
        assert entry.value == 0.8
        assert entry.metadata.get("forced_over") == "tuner-1"


def test_a_variable_another_node_deleted_and_defined_again_is_written_as_the_new_one(
    served_redis: Any, redis_url: str
) -> None:
    _, paths, serve = served_redis
    server = serve()
    other = SessionStore(storage=RedisStorage(redis_url))  # another node's store on the same Redis
    try:
        with RemoteStore.connect(server.address) as client:
            client.create_session("s")
            client.register_variable("s", "mode", "string", "a")
            client.set_variable("s", "mode", "b")
            client.set_variable("s", "mode", "c")  # now known to the node: written on the loop
            other.delete_variable("s", "mode")
            fresh = other.register_variable("s", "mode", "string", "x", constraints={"max_length": 3})
            # The node's known definition is stale: the loop's write finds the old id gone and
            # writes nothing; the pool reads the new definition and writes it.
            loop_writes, pool_writes = paths.loop_writes, paths.pool_writes
            assert client.set_variable("s", "mode", "d").version == 2
            assert (paths.loop_writes, paths.pool_writes) == (loop_writes + 1, pool_writes + 1)
            got = other.get_variable("s", "mode")
            assert (got.id, got.value, got.version) == (fresh.id, "d", 2)
            assert [entry.value for entry in other.get_history("s", "mode")] == ["d", "x"]
            # The new definition's rule holds from now on, on the loop path as on the pool's.
            with pytest.raises(ValidationError, match=r"max_length|at most"):
                client.set_variable("s", "mode", "toolong")
            with pytest.raises(VariableNotFoundError):
                client.set_variable("s", "gone", 1)
    finally:
        other.close()
        other.storage.close()  # type: ignore[attr-defined]


def test_redis_down_is_unavailable_on_the_loop_path(tmp_path: Any) -> None:
    redis_server = RedisServer(tmp_path)
    storage = RedisStorage(redis_server.url)
    store = SessionStore(storage=storage)
    paths = Paths(storage)
    server, _ = create_server(store)
    server.start()
    try:
        with RemoteStore.connect(server.address) as client:
            client.create_session("s")
            client.register_variable("s", "x", "integer", 0)
            client.set_variable("s", "x", 1)
            client.set_variable("s", "x", 2)
            assert paths.loop_writes == 1
            redis_server.kill()
            with pytest.raises(BridgeUnavailableError, match="cannot be reached"):
                client.set_variable("s", "x", 3)
            assert paths.loop_writes == 2 and paths.pool_writes == 1
    finally:
        server.stop(0)
        store.close()
        storage.close()
        redis_server.stop()


def test_loop_clients_close_with_the_storage_and_a_given_client_keeps_the_pool(redis_url: str) -> None:
    storage = RedisStorage(redis_url)
    store = SessionStore(storage=storage)
    server, _ = create_server(store)
    with server, RemoteStore.connect(server.address) as client:
        client.create_session("s")
        client.register_variable("s", "x", "integer", 0)
        client.set_variable("s", "x", 1)
        client.set_variable("s", "x", 2)
        assert len(storage._loop_clients) == 1
    store.close()
    storage.close()
    assert storage._loop_clients == {}

    given = RedisStorage(client=redis.Redis.from_url(redis_url, decode_responses=True))
    assert not given.nonblocking
    assert not SessionStore(storage=given).nonblocking
    given.close()


def test_a_loop_write_needs_every_definition(redis_url: str) -> None:
    import asyncio

    storage = RedisStorage(redis_url)
    try:
        with pytest.raises(ValueError, match="definition"):
            asyncio.run(storage.apply_writes_async("s", [Write("v_1", 1, None, {}, "worker", 0.0)], history_limit=10))
    finally:
        storage.close()


def test_every_key_of_a_busy_session_keeps_an_expiry(served_redis: Any, redis_url: str) -> None:
    """Reads and writes refresh a session at most once per 1% of its TTL; no key is left without one.

    The write script's rule (``touch_soon``): a session whose expiry was set within the last 1% of
    its TTL (at most 1 s) keeps it, else every key of the session gets the whole TTL again. With a
    TTL of 60 s the burst below mostly lands inside that window, so it checks that the keys a write
    skips still carry an expiry; then every key is aged far past the window with a raw PEXPIRE (no
    waiting), and one write must give the whole session its TTL back.
    """
    ttl_ms = 60_000
    aged_ms = 15_000  # 45 s past the 0.6 s window; far from expiring while the test runs
    store, _, serve = served_redis
    server = serve()
    raw = redis.Redis.from_url(redis_url)

    def session_keys() -> list[str]:
        return [key for key in _keys("s") if raw.exists(key)]

    try:
        with RemoteStore.connect(server.address) as client:
            store.create_session("s", ttl=ttl_ms / 1000)
            client.register_variable("s", "a", "integer", 0)
            for i in range(20):
                client.set_variable("s", "a", i)
                client.get_variable("s", "a")
            client.delete_variable("s", "a")  # the variable hashes empty out
            client.register_variable("s", "b", "integer", 0)  # ... and come back
            for i in range(20):
                client.set_variable("s", "b", i)
            existing = session_keys()
            assert len(existing) >= 8
            expiries = {key: raw.pttl(key) for key in existing}
            assert all(0 < left <= ttl_ms for left in expiries.values()), expiries

            # Past the refresh window, a write refreshes the whole session again.
            for key in existing:
                assert raw.pexpire(key, aged_ms)
            aged = {key: raw.pttl(key) for key in existing}
            assert all(0 < left <= aged_ms for left in aged.values()), aged
            client.set_variable("s", "b", 100)
            after = {key: raw.pttl(key) for key in session_keys()}
            assert set(existing) <= set(after)
            # Refreshed means back to (nearly) the whole TTL, far above the aged expiry; the 30 s
            # margin only absorbs how long this test itself may take on a loaded machine.
            assert all(ttl_ms // 2 < left <= ttl_ms for left in after.values()), (aged, after)
    finally:
        raw.close()


def test_reads_are_served_from_the_loop_and_answer_as_the_blocking_server_does(served: Any) -> None:
    store, paths, serve = served
    on_loop, blocking = serve(), serve(asyncio=False)
    with RemoteStore.connect(on_loop.address) as a, RemoteStore.connect(blocking.address) as b:
        a.create_session("s")
        a.register_variable("s", "temperature", "float", 0.5, metadata={"owner": "ops"}, description="t")
        a.register_variable("s", "model", "string", "fast", constraints={"enum": ["fast", "slow"]})
        a.set_variable("s", "temperature", 0.7, metadata={"note": "warmer"})
        store.start_optimization("s", ["model"], "tuner-1", ttl=60)
        reads = paths.loop_reads
        for ident in ("temperature", "model", a.get_variable("s", "model").id):
            assert a.get_variable("s", ident) == b.get_variable("s", ident)
        assert a.get_variable("s", "model").optimization_status is not None
        found_a, missing_a = a.get_variables("s", ["temperature", "nope", "model"])
        found_b, missing_b = b.get_variables("s", ["temperature", "nope", "model"])
        assert (found_a, missing_a) == (found_b, missing_b)
        assert missing_a == ["nope"] and set(found_a) == {"temperature", "model"}
        assert paths.loop_reads >= reads + 4
        assert paths.loop_threads == {LOOP_THREAD}
        refusals = []
        for call in (
            lambda client: client.get_variable("s", "nope"),
            lambda client: client.get_variable("no-such-session", "temperature"),
            lambda client: client.get_variables("no-such-session", ["temperature"]),
        ):
            for client in (a, b):
                with pytest.raises(DSPexError) as raised:
                    call(client)
                refusals.append((type(raised.value), str(raised.value)))
        assert refusals[0::2] == refusals[1::2]
        assert [kind for kind, _ in refusals[0::2]] == [
            VariableNotFoundError,
            SessionNotFoundError,
            SessionNotFoundError,
        ]


def test_a_large_value_is_written_and_read_in_the_pool_not_on_the_loop(served: Any) -> None:
    """A value past LOOP_MAX_VALUE_BYTES would stall every call and stream while the loop decoded it."""
    _, paths, serve = served
    server = serve()
    big = "x" * (LOOP_MAX_VALUE_BYTES + 1)
    with RemoteStore.connect(server.address) as client:
        client.create_session("s")
        client.register_variable("s", "prompt", "string", "short")
        client.set_variable("s", "prompt", "known now")
        loop_writes, pool_writes, pool_reads = paths.loop_writes, paths.pool_writes, paths.pool_reads
        assert client.set_variable("s", "prompt", big).version == 3
        assert (paths.loop_writes, paths.pool_writes) == (loop_writes, pool_writes + 1)
        assert client.get_variable("s", "prompt").value == big
        found, _ = client.get_variables("s", ["prompt"])
        assert found["prompt"].value == big
        assert paths.pool_reads >= pool_reads + 2  # both reads were done again in the pool
        client.set_variable("s", "prompt", "short again")
        assert paths.loop_writes == loop_writes + 1
        assert client.get_variable("s", "prompt").value == "short again"


def test_a_redis_stall_under_load_queues_loop_calls_instead_of_failing_them(served_redis: Any, redis_url: str) -> None:
    """Calls on the loop take turns on a bounded number of Redis connections, as the pool's threads do."""
    _, paths, serve = served_redis
    server = serve()
    raw = redis.Redis.from_url(redis_url)
    try:
        with RemoteStore.connect(server.address) as client, grpc.insecure_channel(server.address) as channel:
            client.create_session("s")
            client.register_variable("s", "x", "integer", 7)
            stub = pb_grpc.BridgeServiceStub(channel)
            request = pb.GetVariableRequest(session_id="s", variable_identifier="x")
            reads = paths.loop_reads
            raw.execute_command("CLIENT", "PAUSE", "400", "ALL")
            calls = [stub.GetVariable.future(request, timeout=60) for _ in range(300)]
            values = [any_to_value(call.result().variable.value) for call in calls]
            assert values == [7] * 300
            assert paths.loop_reads == reads + 300
    finally:
        raw.close()


def test_the_change_log_carries_each_written_variable_whole_on_both_paths(redis_url: str) -> None:
    """A write sends no definition: the script copies the stored one into the change record, so a
    reader of the log (a watcher on another node) still gets the name, type, constraints,
    description and creation time of every variable written, by the blocking and the loop path."""
    import asyncio

    writer, reader = RedisStorage(redis_url), RedisStorage(redis_url)
    loop = asyncio.new_event_loop()  # kept open until the writer has closed its connection on it
    try:
        writer.create_session("defs", {}, 60.0, 1.0, 100)
        a, b = writer.insert_variables(
            "defs",
            [
                NewVariable("a", "float", 0.5, constraints={"min": 0.0, "max": 2.0}, description='the "a" knob'),
                NewVariable("b", "string", "x", constraints={"choices": ["x", "y"]}, description="b"),
            ],
            now=3.25,
            max_variables=10,
            history_limit=5,
        )
        start = reader.position("defs")
        writer.apply_writes("defs", [Write(a.id, 1.5, variable=a)], history_limit=5)

        async def on_loop() -> None:
            await writer.apply_writes_async(
                "defs", [Write(b.id, "y", variable=b), Write(a.id, 0.25, variable=a)], history_limit=5
            )

        loop.run_until_complete(on_loop())
        changes = reader.read_changes("defs", start, 1.0)
        seen = [u.variable for u in changes.updates]
        assert [(v.name, v.value, v.version) for v in seen if v] == [("a", 1.5, 2), ("b", "y", 2), ("a", 0.25, 3)]
        for var in seen:
            assert var is not None
            made = a if var.name == "a" else b
            assert (var.id, var.type, var.constraints, var.description, var.created_at) == (
                made.id,
                made.type,
                made.constraints,
                made.description,
                made.created_at,
            )
    finally:
        writer.close()
        reader.close()
        loop.close()
