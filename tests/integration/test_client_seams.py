"""The worker clients' seams: one snapshot for several reads, name watches across re-creation,
a cache feed that survives anything, large sessions, and the cache's reported state.

Each test runs for the blocking and the asyncio client. Some clients are built on a channel with
real gRPC client interceptors that record the RPCs made (or fail the first watch), so a test can
tell "one ``GetVariables``" from "one ``GetVariable`` per name" without any stand-in.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import test_client
from workers.adapters import CLIENTS, AsyncClient, SyncClient, wait_for

from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.client import AsyncSessionContext, CacheState, SessionContext
from dspex_dspy.errors import VariableNotFoundError
from dspex_dspy.server import BridgeServer, create_server

pytestmark = pytest.mark.integration

QUICK_S = 10.0
# Shared with the client tests: the bridge, the seeded session (temperature, max_tokens,
# model_name) and the client factory of the parametrized kind.
HEARTBEAT_S = test_client.HEARTBEAT_S
server = test_client.server
session = test_client.session
make_client = test_client.make_client


class Calls:
    """The RPC method names a client made, and how many watch openings are still to fail."""

    def __init__(self, fail_watches: int = 0) -> None:
        self.names: list[str] = []
        self.fail_watches = fail_watches
        self._lock = threading.Lock()

    def record(self, method: str | bytes) -> None:
        text = method.decode() if isinstance(method, bytes) else method
        with self._lock:
            self.names.append(text.rsplit("/", 1)[-1])

    def unary(self) -> list[str]:
        with self._lock:
            return [name for name in self.names if name != "WatchVariables"]

    def clear(self) -> None:
        with self._lock:
            self.names.clear()

    def fail_this_watch(self) -> bool:
        with self._lock:
            if self.fail_watches > 0:
                self.fail_watches -= 1
                return True
            return False


class SyncRecorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.record(details.method)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.record(details.method)
        if self.calls.fail_this_watch():
            raise RuntimeError("an unexpected failure while opening the watch")
        return continuation(details, request)


class AioUnaryRecorder(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.record(details.method)
        return await continuation(details, request)


class AioStreamRecorder(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """grpc.aio takes one interceptor object per kind of call."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls.record(details.method)
        if self.calls.fail_this_watch():
            raise RuntimeError("an unexpected failure while opening the watch")
        return await continuation(details, request)


@pytest.fixture(params=sorted(CLIENTS))
def recorded(request: pytest.FixtureRequest) -> Iterator[Callable[..., tuple[Any, Calls]]]:
    """Make clients of the parametrized kind on a recording channel: ``make(address, session, **options)``."""
    closers: list[Callable[[], None]] = []

    def make(address: str, session_id: str, fail_watches: int = 0, **options: Any) -> tuple[Any, Calls]:
        calls = Calls(fail_watches)
        if request.param == "sync":
            channel = grpc.intercept_channel(grpc.insecure_channel(address), SyncRecorder(calls))
            ctx = SessionContext(pb_grpc.BridgeServiceStub(channel), session_id, address=address, **options)
            client: Any = SyncClient(ctx)

            def close_sync() -> None:
                client.close()
                channel.close()

            closers.append(close_sync)
            return client, calls
        loop, thread = AsyncClient.start_loop()

        async def build() -> tuple[AsyncSessionContext, Any]:
            aio_channel = grpc.aio.insecure_channel(
                address, interceptors=[AioUnaryRecorder(calls), AioStreamRecorder(calls)]
            )
            return AsyncSessionContext(pb_grpc.BridgeServiceStub(aio_channel), session_id, **options), aio_channel

        actx, aio_channel = asyncio.run_coroutine_threadsafe(build(), loop).result(QUICK_S)
        aclient = AsyncClient(actx, loop, thread)

        def close_async() -> None:
            aclient.run(actx.close)
            aclient.run(aio_channel.close, None)
            aclient.close()

        closers.append(close_async)
        return aclient, calls

    yield make
    for close in closers:
        close()


# --------------------------------------------------------------------------------------------
# get_versioned_many: one snapshot, one call
# --------------------------------------------------------------------------------------------


def test_versioned_many_without_cache_is_one_get_variables(
    recorded: Callable[..., tuple[Any, Calls]], server: BridgeServer, session: str
) -> None:
    client, calls = recorded(server.address, session, cache=False)
    server.store.set_variable(session, "max_tokens", 300)
    calls.clear()
    got = client.run(client.ctx.get_versioned_many, ["temperature", "max_tokens", "temperature"])
    assert got == {"temperature": (0.7, 1), "max_tokens": (300, 2)}
    assert calls.unary() == ["GetVariables"]

    calls.clear()
    with pytest.raises(VariableNotFoundError) as info:
        client.run(client.ctx.get_versioned_many, ["temperature", "nope", "gone"])
    assert "nope" in str(info.value) and "gone" in str(info.value)
    assert calls.unary() == ["GetVariables"]


def test_versioned_many_without_cache_never_mixes_atomic_writes(
    recorded: Callable[..., tuple[Any, Calls]], server: BridgeServer, session: str
) -> None:
    store = server.store
    store.register_variable(session, "a", "integer", 0)
    store.register_variable(session, "b", "integer", 0)
    client, _ = recorded(server.address, session, cache=False)
    stop = threading.Event()
    first_write = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.set_variables(session, {"a": i, "b": i})
            first_write.set()
            time.sleep(0.0002)  # interleave with the reads instead of starving them of the session lock

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        # Every read below comes after the first write, so the last one cannot still see the 0s.
        assert wait_for(first_write.is_set), "the writer never wrote"
        seen = [client.run(client.ctx.get_versioned_many, ["a", "b"]) for _ in range(300)]
    finally:
        stop.set()
        writer.join(QUICK_S)
    torn = [s for s in seen if s["a"] != s["b"]]
    assert not torn, f"{len(torn)} of {len(seen)} reads mixed two writes, e.g. {torn[0]}"
    assert seen[-1]["a"][0] > 0  # the reads saw the writes


def test_versioned_many_is_served_by_the_synced_cache_without_rpcs(
    recorded: Callable[..., tuple[Any, Calls]], server: BridgeServer, session: str
) -> None:
    client, calls = recorded(server.address, session)
    assert client.wait_synced()
    version = server.store.set_variable(session, "temperature", 0.9).version
    assert client.wait_cached("temperature", version)
    calls.clear()
    got = client.run(client.ctx.get_versioned_many, ["temperature", "model_name"])
    assert got == {"temperature": (0.9, 2), "model_name": ("gpt-4", 1)}
    assert calls.unary() == []
    # A name the cache does not hold goes to the server, in one call, and is reported.
    with pytest.raises(VariableNotFoundError, match="nope"):
        client.run(client.ctx.get_versioned_many, ["temperature", "nope"])
    assert calls.unary() == ["GetVariables"]


# --------------------------------------------------------------------------------------------
# Watches and the cache feed
# --------------------------------------------------------------------------------------------


def test_name_watch_without_cache_follows_a_variable_created_again(
    make_client: Callable[..., Any], server: BridgeServer, session: str
) -> None:
    client = make_client(server.address, session, cache=False)
    events, stop = client.watch(["model_name"])
    try:
        assert events.next().value == "gpt-4"
        server.store.delete_variable(session, "model_name")
        assert events.until(lambda e: e.update_type == "deleted", QUICK_S)[-1].name == "model_name"
        server.store.register_variable(session, "model_name", "string", "gpt-5")
        again = events.until(lambda e: e.update_type != "deleted", QUICK_S)[-1]
        assert (again.name, again.value, again.version) == ("model_name", "gpt-5", 1)
        server.store.set_variable(session, "model_name", "gpt-6")
        assert events.until(lambda e: e.value == "gpt-6", QUICK_S)[-1].version == 2
        # Other variables of the stream are not reported to a name watch.
        server.store.set_variable(session, "temperature", 1.0)
        server.store.set_variable(session, "model_name", "gpt-7")
        tail = events.until(lambda e: e.value == "gpt-7", QUICK_S)
        assert {e.name for e in tail} == {"model_name"}
    finally:
        stop()


def test_unknown_name_fails_a_watch_without_cache_at_once(
    make_client: Callable[..., Any], server: BridgeServer, session: str
) -> None:
    client = make_client(server.address, session, cache=False)
    events, stop = client.watch(["temperature", "nope"])
    try:
        with pytest.raises(VariableNotFoundError, match="nope"):
            events.next(QUICK_S)
    finally:
        stop()


def test_cache_feed_survives_an_unexpected_exception(
    recorded: Callable[..., tuple[Any, Calls]], server: BridgeServer, session: str
) -> None:
    client, calls = recorded(server.address, session, fail_watches=2)
    assert client.wait_synced(QUICK_S), "the cache never synced after its feed met an unexpected exception"
    assert calls.names.count("WatchVariables") >= 3
    version = server.store.set_variable(session, "temperature", 1.5).version
    assert client.wait_cached("temperature", version, QUICK_S)
    assert client.cached("temperature") == (1.5, version)


def test_a_session_listing_larger_than_4_mib_syncs(
    make_client: Callable[..., Any], server: BridgeServer, session: str
) -> None:
    big = {f"doc_{i}": chr(ord("a") + i) * 900_000 for i in range(5)}
    for name, text in big.items():
        server.store.register_variable(session, name, "string", text)
    client = make_client(server.address, session)
    assert client.wait_synced(QUICK_S), "the cache did not sync a session larger than 4 MiB"
    assert client.cached("doc_4") == (big["doc_4"], 1)
    assert [v.name for v in client.list()][-5:] == list(big)


# --------------------------------------------------------------------------------------------
# The cache's state
# --------------------------------------------------------------------------------------------


def test_cache_state_is_reported_and_an_outage_is_logged_once(
    make_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dspex_dspy.client")
    bridge, _ = create_server(heartbeat_interval=HEARTBEAT_S)
    bridge.start()
    try:
        bridge.store.create_session("s")
        bridge.store.register_variable("s", "x", "integer", 1)
        client = make_client(bridge.address, "s")
        plain = make_client(bridge.address, "s", cache=False)
        assert plain.ctx.cache_state == CacheState.DISABLED == "disabled"
        assert client.wait_synced()
        assert client.ctx.cache_state == "synced"
    finally:
        bridge.stop(0)
    assert wait_for(lambda: client.ctx.cache_state == "down")

    def broken_again() -> int:
        return sum("broke again" in r.getMessage() for r in caplog.records)

    assert wait_for(lambda: broken_again() >= 2), "the cache did not keep reconnecting"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "dspex_dspy.client"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "the cache of session s is down" in warnings[0].getMessage()
    client.close()
    assert client.ctx.cache_state == "disabled"
