"""The worker clients against a real in-process bridge server: SessionContext and AsyncSessionContext.

Every behavioural test runs twice, once per client, through the adapters of
``workers/adapters.py`` (the same test body for the blocking and the asyncio client). The server
is a real :func:`~dspex_dspy.server.create_server` on a loopback port; other writers are a second
client or the server's store. Waits are bounded by generous deadlines and end on an event.
"""

from __future__ import annotations

import asyncio
import copy
import pickle
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from workers.adapters import CLIENTS, DEADLINE_S, AsyncClient, EventQueue, SyncClient, reads, wait_for

from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.client import ADDRESS_ENV, AsyncSessionContext, SessionContext, WatchEvent
from dspex_dspy.errors import (
    BatchUpdateError,
    BridgeUnavailableError,
    DSPexError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.remote import RemoteStore
from dspex_dspy.server import BridgeServer, create_server
from dspex_dspy.store import SessionStore
from dspex_dspy.types import Variable

pytestmark = pytest.mark.integration

HEARTBEAT_S = 0.2


@pytest.fixture(scope="module")
def server() -> Iterator[BridgeServer]:
    bridge, _ = create_server(heartbeat_interval=HEARTBEAT_S)
    bridge.start()
    yield bridge
    bridge.stop()


@pytest.fixture
def session(server: BridgeServer) -> str:
    """A fresh session holding the seed variables."""
    session_id = "s_" + secrets.token_hex(6)
    store = server.store
    store.create_session(session_id)
    store.register_variable(session_id, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    store.register_variable(session_id, "max_tokens", "integer", 256, constraints={"min": 1})
    store.register_variable(session_id, "model_name", "string", "gpt-4")
    return session_id


@pytest.fixture(params=sorted(CLIENTS))
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Connect clients of the parametrized kind; all are closed at teardown."""
    made: list[Any] = []

    def make(address: str | None, session_id: str, **options: Any) -> Any:
        client = CLIENTS[request.param].connect(address, session_id, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., Any], server: BridgeServer, session: str) -> Any:
    return make_client(server.address, session)


def versions_of(events: list[WatchEvent], name: str) -> list[int]:
    return [e.version for e in events if e.name == name and e.update_type != "deleted"]


# --------------------------------------------------------------------------------------------
# Reads and writes
# --------------------------------------------------------------------------------------------


def test_reads_the_seed_values(client: Any) -> None:
    assert client.get("temperature") == 0.7
    assert client.item("max_tokens") == 256
    assert client.get("model_name") == "gpt-4"
    assert client.get_versioned("temperature") == (0.7, 1)
    assert client.get_many(["temperature", "model_name"]) == {"temperature": 0.7, "model_name": "gpt-4"}


def test_a_write_is_visible_to_the_server_and_recorded_as_a_worker_write(
    client: Any, server: BridgeServer, session: str
) -> None:
    assert client.set("temperature", 0.9, metadata={"reason": "tuning"}) == 2
    assert client.update("max_tokens", 512) == 2
    stored = server.store.get_variable(session, "temperature")
    assert (stored.value, stored.version, stored.source) == (0.9, 2, "worker")
    assert stored.metadata["reason"] == "tuning"
    assert server.store.get_history(session, "temperature")[0].metadata == {"reason": "tuning"}
    assert server.store.get_variable(session, "max_tokens").value == 512


def test_a_value_is_normalised_by_the_variable_type(client: Any, server: BridgeServer, session: str) -> None:
    client.set("temperature", 1)
    assert client.get("temperature") == 1.0
    assert isinstance(server.store.get_variable(session, "temperature").value, float)


def test_register_list_and_delete(client: Any, server: BridgeServer, session: str) -> None:
    var_id = client.register(
        "style", "choice", "terse", constraints={"choices": ["terse", "verbose"]}, description="answer style"
    )
    assert var_id.startswith("var_style_")
    stored = server.store.get_variable(session, "style")
    assert (stored.description, stored.source) == ("answer style", "worker")
    assert [v.name for v in client.list()] == ["temperature", "max_tokens", "model_name", "style"]
    assert [v.name for v in client.list("m*")] == ["max_tokens", "model_name"]
    assert client.has("style")
    client.delete("style")
    assert not client.has("style")
    with pytest.raises(VariableNotFoundError):
        client.get("style")


def test_compare_and_swap(client: Any) -> None:
    assert client.set("max_tokens", 300, expected_version=1) == 2
    with pytest.raises(VersionConflictError) as info:
        client.set("max_tokens", 400, expected_version=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert client.get_versioned("max_tokens") == (300, 2)


@pytest.mark.parametrize(
    ("action", "error", "also"),
    [
        (lambda c: c.get("nope"), VariableNotFoundError, KeyError),
        (lambda c: c.set("nope", 1), VariableNotFoundError, KeyError),
        (lambda c: c.delete("nope"), VariableNotFoundError, KeyError),
        (lambda c: c.set("temperature", 2.5), ValidationError, ValueError),
        (lambda c: c.set("temperature", "hot"), ValidationError, ValueError),
        (lambda c: c.register("temperature", "float", 0.1), VariableExistsError, ValueError),
        (lambda c: c.register("bad name!", "float", 0.1), ValidationError, ValueError),
        (lambda c: c.get_many(["temperature", "nope", "gone"]), VariableNotFoundError, KeyError),
    ],
    ids=["get", "set", "delete", "constraint", "type", "duplicate", "name", "get_many"],
)
def test_errors_map_to_the_package_exceptions(
    client: Any, server: BridgeServer, session: str, action: Any, error: type[DSPexError], also: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        action(client)
    assert isinstance(info.value, also)
    assert server.store.get_variable(session, "temperature").version == 1


def test_errors_name_what_was_wrong(client: Any) -> None:
    with pytest.raises(ValidationError) as info:
        client.set("temperature", 2.5)
    assert (info.value.variable, info.value.rule) == ("temperature", "max")
    assert "2.5" in str(info.value)
    with pytest.raises(VariableNotFoundError) as missing:
        client.get_many(["temperature", "nope", "gone"])
    assert "nope" in str(missing.value) and "gone" in str(missing.value)


def test_connect_to_an_unknown_session_fails_clearly(make_client: Callable[..., Any], server: BridgeServer) -> None:
    with pytest.raises(SessionNotFoundError):
        make_client(server.address, "no_such_session")


def test_connect_takes_the_address_from_the_environment(
    make_client: Callable[..., Any], server: BridgeServer, session: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    with pytest.raises(BridgeUnavailableError, match=ADDRESS_ENV):
        make_client(None, session)
    monkeypatch.setenv(ADDRESS_ENV, server.address)
    assert make_client(None, session).get("model_name") == "gpt-4"


def test_an_unreachable_bridge_is_reported(make_client: Callable[..., Any]) -> None:
    with pytest.raises(BridgeUnavailableError):
        make_client("127.0.0.1:1", "s", timeout=0.5)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def test_batch_write_returns_every_new_version(client: Any) -> None:
    assert client.set_many({"temperature": 0.3, "max_tokens": 128}) == {"temperature": 2, "max_tokens": 2}
    assert client.get_many(["temperature", "max_tokens"]) == {"temperature": 0.3, "max_tokens": 128}


def test_an_atomic_batch_with_a_bad_entry_applies_nothing(client: Any, server: BridgeServer, session: str) -> None:
    with pytest.raises(BatchUpdateError) as info:
        client.set_many({"temperature": 0.3, "max_tokens": 0, "nope": 1})
    errors = info.value.errors
    assert set(errors) == {"max_tokens", "nope"}
    assert isinstance(errors["max_tokens"], ValidationError) and errors["max_tokens"].rule == "min"
    assert isinstance(errors["nope"], VariableNotFoundError)
    assert info.value.new_versions == {}
    assert server.store.get_variable(session, "temperature").version == 1


def test_a_non_atomic_batch_applies_the_good_entries(client: Any, server: BridgeServer, session: str) -> None:
    with pytest.raises(BatchUpdateError) as info:
        client.set_many({"temperature": 0.3, "max_tokens": 0}, atomic=False)
    assert set(info.value.errors) == {"max_tokens"}
    assert info.value.new_versions == {"temperature": 2}
    assert server.store.get_variable(session, "temperature").value == 0.3
    assert client.get_versioned("temperature") == (0.3, 2)


# --------------------------------------------------------------------------------------------
# The watch-fed cache
# --------------------------------------------------------------------------------------------


def test_the_cache_serves_the_session_once_synced(client: Any) -> None:
    assert client.wait_synced(DEADLINE_S)
    assert client.cached("temperature") == (0.7, 1)
    assert client.cached("nope") is None


def test_a_cached_reader_sees_another_writers_value_when_the_update_arrives(
    client: Any, server: BridgeServer, session: str
) -> None:
    assert client.wait_synced(DEADLINE_S)
    with SessionContext.connect(server.address, session, cache=False) as writer:
        version = writer.set_variable("temperature", 1.25)
    assert client.wait_cached("temperature", version, DEADLINE_S)
    assert client.cached("temperature") == (1.25, version)
    assert client.get("temperature") == 1.25


def test_own_writes_are_read_back_at_once(client: Any) -> None:
    assert client.wait_synced(DEADLINE_S)
    version = client.set("temperature", 0.5)
    assert client.cached("temperature") == (0.5, version)
    versions = client.set_many({"temperature": 0.25, "max_tokens": 64})
    assert client.cached("temperature") == (0.25, versions["temperature"])
    assert client.cached("max_tokens") == (64, versions["max_tokens"])
    client.register("fresh", "boolean", True)
    assert client.get("fresh") is True
    client.delete("fresh")
    assert client.cached("fresh") is None
    with pytest.raises(VariableNotFoundError):
        client.get("fresh")


def test_cached_values_are_copies(client: Any) -> None:
    client.register("vec", "embedding", [1.0, 2.0])
    assert client.wait_synced(DEADLINE_S)
    value = client.get("vec")
    value.append(3.0)
    assert client.get("vec") == [1.0, 2.0]


def test_cache_off_still_reads_and_writes(make_client: Callable[..., Any], server: BridgeServer, session: str) -> None:
    client = make_client(server.address, session, cache=False)
    assert client.set("temperature", 0.4) == 2
    assert client.get("temperature") == 0.4
    assert client.cached("temperature") is None
    assert not client.wait_synced(0.1)


def test_the_cache_is_bypassed_while_the_watch_is_down_and_resyncs(make_client: Callable[..., Any]) -> None:
    store = SessionStore()
    store.create_session("s")
    store.register_variable("s", "temperature", "float", 0.7)
    first, port = create_server(store, port=0, heartbeat_interval=HEARTBEAT_S)
    first.start()
    second: BridgeServer | None = None
    try:
        client = make_client(first.address, "s")
        assert client.wait_synced(DEADLINE_S)
        assert client.cached("temperature") == (0.7, 1)

        first.stop(grace=0)
        assert wait_for(lambda: client.cached("temperature") is None)
        store.set_variable("s", "temperature", 1.5)  # changed while the client cannot hear of it
        with pytest.raises(BridgeUnavailableError):
            client.get("temperature")  # not the stale cached 0.7

        second, _ = create_server(store, port=port, heartbeat_interval=HEARTBEAT_S)
        second.start()
        assert wait_for(lambda: reads(client, "temperature") == 1.5)
        assert client.wait_synced(DEADLINE_S)
        assert client.cached("temperature") == (1.5, 2)
    finally:
        first.stop(grace=0)
        if second is not None:
            second.stop(grace=0)
        store.close()


# --------------------------------------------------------------------------------------------
# Watching
# --------------------------------------------------------------------------------------------


def test_watch_yields_initial_values_then_changes_and_deletions(
    client: Any, server: BridgeServer, session: str
) -> None:
    events, stop = client.watch()
    try:
        initial = events.until(lambda e: e.name == "model_name")
        assert {(e.name, e.value, e.version, e.update_type) for e in initial} == {
            ("temperature", 0.7, 1, "initial_value"),
            ("max_tokens", 256, 1, "initial_value"),
            ("model_name", "gpt-4", 1, "initial_value"),
        }
        server.store.set_variable(session, "temperature", 0.8, source="orchestrator")
        change = events.next()
        assert (change.name, change.value, change.version) == ("temperature", 0.8, 2)
        assert (change.update_type, change.source) == ("value_change", "orchestrator")
        server.store.delete_variable(session, "max_tokens")
        gone = events.next()
        assert (gone.name, gone.update_type) == ("max_tokens", "deleted")
    finally:
        stop()


def test_watch_without_initial_values_yields_only_changes(client: Any, server: BridgeServer, session: str) -> None:
    events, stop = client.watch(["temperature"], include_initial=False)
    try:
        first = _first_event_while_writing(server, session, events)
        assert first.update_type == "value_change"
        assert first.version > 1
    finally:
        stop()


def _first_event_while_writing(server: BridgeServer, session: str, events: EventQueue) -> WatchEvent:
    """Write temperature until the watch reports something (the watch may not be registered at once)."""
    for attempt in range(200):
        server.store.set_variable(session, "temperature", 0.01 * (attempt + 1))
        try:
            return events.next(timeout=0.25)
        except queue.Empty:
            continue
    raise AssertionError("the watch never reported a change")


def test_watch_never_yields_heartbeats_or_repeats(client: Any, server: BridgeServer, session: str) -> None:
    events, stop = client.watch(["max_tokens"])
    try:
        assert events.next().update_type == "initial_value"
        for value in range(2, 40):
            server.store.set_variable(session, "max_tokens", value)
        seen = events.until(lambda e: e.value == 39)
        assert all(e.name == "max_tokens" and e.update_type == "value_change" for e in seen)
        versions = versions_of(seen, "max_tokens")
        assert versions == sorted(set(versions))
        assert versions[-1] == server.store.get_variable(session, "max_tokens").version
    finally:
        stop()


def test_watch_of_an_unknown_variable_fails(client: Any) -> None:
    events, stop = client.watch(["nope"])
    try:
        with pytest.raises(VariableNotFoundError):
            events.next()
    finally:
        stop()


def test_closing_the_client_ends_its_watches(
    make_client: Callable[..., Any], server: BridgeServer, session: str
) -> None:
    client = make_client(server.address, session)
    events, stop = client.watch()
    events.until(lambda e: e.name == "model_name")
    client.close()
    assert events.ended.wait(DEADLINE_S)
    with pytest.raises(StopIteration):
        events.until(lambda e: False)
    stop()


def test_watches_and_cache_recover_from_a_server_restart_without_repeats(make_client: Callable[..., Any]) -> None:
    store = SessionStore()
    store.create_session("s")
    store.register_variable("s", "counter", "integer", 0)
    store.register_variable("s", "doomed", "boolean", True)
    first, port = create_server(store, port=0, heartbeat_interval=HEARTBEAT_S)
    first.start()
    second: BridgeServer | None = None
    try:
        client = make_client(first.address, "s")
        events, stop = client.watch()
        seen = events.gather(lambda got: {e.name for e in got} == {"counter", "doomed"})
        for value in range(1, 11):
            store.set_variable("s", "counter", value)
        seen += events.until(lambda e: e.value == 10)

        first.stop(grace=0)
        for value in range(11, 21):
            store.set_variable("s", "counter", value)
        store.register_variable("s", "born_while_down", "string", "hello")
        store.delete_variable("s", "doomed")
        second, _ = create_server(store, port=port, heartbeat_interval=HEARTBEAT_S)
        second.start()
        seen += events.until(lambda e: e.name == "counter" and e.value == 20)
        for value in range(21, 31):
            store.set_variable("s", "counter", value)
        seen += events.gather(
            lambda got: (
                any(e.name == "born_while_down" for e in got + seen)
                and any(e.name == "doomed" and e.update_type == "deleted" for e in got + seen)
                and any(e.name == "counter" and e.value == 30 for e in got)
            )
        )
        stop()

        counter = versions_of(seen, "counter")
        assert counter == sorted(set(counter)), counter
        assert counter[-1] == store.get_variable("s", "counter").version
        assert [e.value for e in seen if e.name == "born_while_down"] == ["hello"], seen
        assert [e.update_type for e in seen if e.name == "doomed"] == ["initial_value", "deleted"], seen
        assert client.wait_synced(DEADLINE_S)
        assert client.wait_cached("counter", store.get_variable("s", "counter").version)
        assert client.cached("counter") == (30, 31)
        assert client.cached("doomed") is None
        assert client.cached("born_while_down") == ("hello", 1)
    finally:
        first.stop(grace=0)
        if second is not None:
            second.stop(grace=0)
        store.close()


# --------------------------------------------------------------------------------------------
# Copies, pickles and the snakepit form
# --------------------------------------------------------------------------------------------


def test_deepcopy_shares_the_live_client(client: Any) -> None:
    assert copy.deepcopy(client.ctx) is client.ctx
    assert copy.copy(client.ctx) is client.ctx
    holder = {"ctx": client.ctx, "n": [1]}
    assert copy.deepcopy(holder)["ctx"] is client.ctx


def test_pickle_round_trip_reconnects(client: Any, server: BridgeServer, session: str) -> None:
    client.set("temperature", 1.1)
    clone = pickle.loads(pickle.dumps(client.ctx))
    assert clone is not client.ctx
    assert (clone.session_id, clone.address) == (session, server.address)
    driven = SyncClient(clone) if isinstance(clone, SessionContext) else AsyncClient.adopt(clone)
    try:
        assert driven.get("temperature") == 1.1
        assert driven.set("temperature", 1.2) == 3
        assert server.store.get_variable(session, "temperature").value == 1.2
        assert client.wait_cached("temperature", 3)
        assert client.get("temperature") == 1.2
    finally:
        driven.close()


def test_a_client_made_from_a_stub_cannot_be_pickled_but_works(server: BridgeServer, session: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        ctx = SessionContext(pb_grpc.BridgeServiceStub(channel), session)
        try:
            assert ctx["model_name"] == "gpt-4"
            assert ctx.set_variable("max_tokens", 1024) == 2
            assert ctx.wait_cached("max_tokens", 2, DEADLINE_S)
            assert ctx.cached("max_tokens") == (1024, 2)
            with pytest.raises(TypeError, match="address"):
                pickle.dumps(ctx)
        finally:
            ctx.close()


def test_the_async_snakepit_form_takes_an_aio_stub(server: BridgeServer, session: str) -> None:
    async def main() -> tuple[Any, int]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            ctx = AsyncSessionContext(pb_grpc.BridgeServiceStub(channel), session)
            async with ctx:
                assert await ctx.wait_synced(DEADLINE_S)
                return await ctx.get_versioned("temperature")

    assert asyncio.run(main()) == (0.7, 1)


def test_an_async_context_refuses_a_second_live_loop(server: BridgeServer, session: str) -> None:
    client = AsyncClient.connect(server.address, session)
    try:

        async def other_loop() -> Any:
            return await client.ctx.get_variable("temperature")

        with pytest.raises(DSPexError, match="event loop"):
            asyncio.run(other_loop())
        assert client.get("temperature") == 0.7
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# RemoteStore (the orchestrator's gRPC store)
# --------------------------------------------------------------------------------------------


def test_remote_store_records_orchestrator_writes(server: BridgeServer, session: str) -> None:
    with RemoteStore.connect(server.address) as remote:
        assert remote.has_session(session) and not remote.has_session("nope")
        registered = remote.register_variable(session, "k", "integer", 1, metadata={"owner": "me"})
        assert (registered.version, registered.source) == (1, "orchestrator")
        written = remote.set_variable(session, "k", 2.0)
        assert (written.value, written.version, written.id) == (2, 2, registered.id)
        stored = server.store.get_variable(session, "k")
        assert (stored.value, stored.version, stored.source) == (2, 2, "orchestrator")
        assert [e.version for e in remote.get_history(session, "k")] == [2, 1]
        assert remote.rollback_variable(session, "k", 1).value == 1


def test_remote_import_is_all_or_nothing(server: BridgeServer, session: str) -> None:
    many = [Variable(id="", name=f"v{i}", type="integer", value=i, version=5, created_at=1000.0) for i in range(600)]
    with RemoteStore.connect(server.address) as remote:
        with pytest.raises(VariableExistsError):
            remote.import_variables(session, [*many, Variable(id="", name="temperature", type="float", value=0.1)])
        assert [v.name for v in server.store.list_variables(session)] == ["temperature", "max_tokens", "model_name"]
        imported = remote.import_variables(session, many)
    assert len(imported) == 600
    stored = server.store.get_variable(session, "v599")
    assert (stored.value, stored.version, stored.created_at) == (599, 5, 1000.0)


# --------------------------------------------------------------------------------------------
# Read-after-watch: a watch event is never ahead of the cache
# --------------------------------------------------------------------------------------------

RAW_ROUNDS = 20
RAW_WRITES = 50


def _orchestrate_rounds(server: BridgeServer, session: str, expected: dict[str, float], acked: threading.Event) -> None:
    """Per round: reset ``done``, write ``temperature`` many times, then ``done=True``; wait for the worker.

    Resetting ``done`` just before lets the server coalesce ``done=True`` into a still pending
    ``done=False``, ahead of the temperature writes: the cache must still not fall behind.
    """
    store = server.store
    step = 0
    for round_ in range(RAW_ROUNDS):
        store.set_variable(session, "done", False, source="orchestrator")
        for _ in range(RAW_WRITES):
            step += 1
            value = round(step * 0.001, 6)
            store.set_variable(session, "temperature", value, source="orchestrator")
        expected["temperature"] = value
        store.set_variable(session, "done", True, metadata={"round": str(round_)}, source="orchestrator")
        if not acked.wait(DEADLINE_S):
            return  # the worker failed; its own assertion reports why
        acked.clear()


def test_a_cached_read_after_a_watch_event_sees_every_earlier_write(
    client: Any, server: BridgeServer, session: str
) -> None:
    """The orchestrator writes temperature, then done; a worker watching only done reads temperature from the cache.

    With the watch on its own stream, the cache (another stream) could still be behind when the
    watch reported done=True, and the read returned an older temperature.
    """
    server.store.register_variable(session, "done", "boolean", False)
    assert client.wait_synced(DEADLINE_S)
    expected: dict[str, float] = {}
    acked = threading.Event()
    observed: list[tuple[int, float, float]] = []  # (done version, read temperature, last written)
    rounds: list[str] = []  # the metadata of each done=True event (the watch keeps every write's metadata)
    orchestrator = threading.Thread(
        target=_orchestrate_rounds, args=(server, session, expected, acked), name="orchestrator", daemon=True
    )

    def check(event: WatchEvent, temperature: float) -> bool:
        observed.append((event.version, temperature, expected["temperature"]))
        rounds.append(event.metadata.get("round", "?"))
        acked.set()
        return len(observed) == RAW_ROUNDS

    if client.kind == "sync":
        ctx = client.ctx
        with ctx.watch_variables(["done"]) as watch:
            orchestrator.start()
            for event in watch:
                if event.value is True and check(event, ctx.get_variable("temperature")):
                    break
    else:

        async def worker() -> None:
            ctx = client.ctx
            async with ctx.watch_variables(["done"]) as watch:
                orchestrator.start()
                async for event in watch:
                    if event.value is True and check(event, await ctx.get_variable("temperature")):
                        break

        client.run(worker)
    orchestrator.join(DEADLINE_S)
    assert not orchestrator.is_alive()
    stale = [(version, read, written) for version, read, written in observed if read != written]
    assert not stale, f"{len(stale)} of {len(observed)} reads after done=True were stale: {stale[:5]}"
    assert len(observed) == RAW_ROUNDS
    assert rounds == [str(r) for r in range(RAW_ROUNDS)]


def test_a_watch_event_is_never_ahead_of_cached_reads(client: Any, server: BridgeServer, session: str) -> None:
    """Every event of a watch of several variables: each cached read is at that event's version or newer."""
    assert client.wait_synced(DEADLINE_S)
    names = ["temperature", "max_tokens"]
    behind: list[tuple[str, int, int]] = []

    def writer() -> None:
        for step in range(1, 201):
            server.store.set_variable(session, names[step % 2], step if step % 2 else step / 1000)

    thread = threading.Thread(target=writer, name="writer", daemon=True)

    def check(event: WatchEvent, read: tuple[Any, int]) -> bool:
        if read[1] < event.version:
            behind.append((event.name, event.version, read[1]))
        return event.name == "max_tokens" and event.value == 199

    if client.kind == "sync":
        ctx = client.ctx
        with ctx.watch_variables(names) as watch:
            thread.start()
            for event in watch:
                if check(event, ctx.get_versioned(event.name)):
                    break
    else:

        async def worker() -> None:
            ctx = client.ctx
            async with ctx.watch_variables(names) as watch:
                thread.start()
                async for event in watch:
                    if check(event, await ctx.get_versioned(event.name)):
                        break

        client.run(worker)
    thread.join(DEADLINE_S)
    assert not behind, behind


def test_a_watch_without_the_cache_still_follows_changes(
    make_client: Callable[..., Any], server: BridgeServer, session: str
) -> None:
    client = make_client(server.address, session, cache=False)
    events, stop = client.watch(["temperature"])
    try:
        assert (events.next().update_type, client.cached("temperature")) == ("initial_value", None)
        server.store.set_variable(session, "temperature", 1.5)
        change = events.next()
        assert (change.value, change.version, change.update_type) == (1.5, 2, "value_change")
    finally:
        stop()


def test_a_cached_watch_opens_no_stream_of_its_own(make_client: Callable[..., Any]) -> None:
    store = SessionStore()
    store.create_session("s")
    store.register_variable("s", "x", "integer", 0)
    bridge, _ = create_server(store, port=0, heartbeat_interval=HEARTBEAT_S)
    bridge.start()
    try:
        client = make_client(bridge.address, "s")
        assert client.wait_synced(DEADLINE_S)
        streams = bridge.servicer.active_watches
        events, stop = client.watch(["x"])
        try:
            assert events.next().version == 1
            store.set_variable("s", "x", 1)
            assert events.next().version == 2
            assert bridge.servicer.active_watches == streams
        finally:
            stop()
    finally:
        bridge.stop(grace=0)
        store.close()


def test_a_watch_ends_when_its_session_is_cleaned_up(client: Any, server: BridgeServer, session: str) -> None:
    events, stop = client.watch(["temperature"])
    try:
        assert events.next().update_type == "initial_value"
        server.store.cleanup_session(session)
        with pytest.raises(SessionNotFoundError):
            events.until(lambda e: False)
    finally:
        stop()


def test_a_watch_gives_up_after_the_reconnect_timeout(make_client: Callable[..., Any]) -> None:
    store = SessionStore()
    store.create_session("s")
    store.register_variable("s", "x", "integer", 0)
    bridge, _ = create_server(store, port=0, heartbeat_interval=HEARTBEAT_S)
    bridge.start()
    try:
        client = make_client(bridge.address, "s", reconnect_timeout=0.5)
        events, stop = client.watch()
        try:
            assert events.next().update_type == "initial_value"
            bridge.stop(grace=0)
            with pytest.raises(BridgeUnavailableError):
                events.until(lambda e: False)
        finally:
            stop()
    finally:
        bridge.stop(grace=0)
        store.close()
