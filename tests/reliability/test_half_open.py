"""A worker notices a half-open connection: the peer silently gone, no reset.

A real bridge is reached through a loopback proxy that stops forwarding without closing anything.
The bridge sends a heartbeat on every watch stream after 0.2 s of silence here, so a cache stream
that stays silent for ``silence_timeout`` (1.5 s here) is dead: the cache must stop claiming to be
current, reads must go to the server (and fail within ``call_timeout`` while it is unreachable),
and once traffic flows again the cache and the watch must reconnect and catch up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_dspy.errors import BridgeUnavailableError
from dspex_dspy.server import BridgeServer, create_server
from tests.integration.workers.adapters import CLIENTS, wait_for
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.reliability

HEARTBEAT_S = 0.2
SILENCE_S = 1.5
CALL_S = 2.0


@pytest.fixture
def bridge() -> Iterator[BridgeServer]:
    server, _ = create_server(heartbeat_interval=HEARTBEAT_S)
    server.start()
    server.store.create_session("s")
    server.store.register_variable("s", "x", "integer", 1)
    yield server
    server.stop(0)


def read_or_unavailable(client: Any, name: str) -> tuple[str, Any, float]:
    """``("value", v, seconds)`` or ``("unavailable", error, seconds)``."""
    start = time.monotonic()
    try:
        value = client.get(name)
    except BridgeUnavailableError as exc:
        return "unavailable", exc, time.monotonic() - start
    return "value", value, time.monotonic() - start


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_a_silent_connection_stops_the_cache_and_the_watch_reconnects(bridge: BridgeServer, kind: str) -> None:
    with FaultProxy(bridge.port) as proxy:
        client = CLIENTS[kind].connect(proxy.address, "s", silence_timeout=SILENCE_S, call_timeout=CALL_S)
        events, stop_watch = client.watch(["x"])
        try:
            assert events.next().version == 1
            assert client.wait_synced()
            assert client.cached("x") == (1, 1)

            proxy.blackhole()
            cut = time.monotonic()
            bridge.store.set_variable("s", "x", 2)
            assert wait_for(lambda: client.cached("x") is None, timeout=SILENCE_S + 10), (
                "the cache kept serving the old value over a dead connection"
            )
            detected = time.monotonic() - cut
            assert client.ctx.cache_state == "down"
            outcome, got, took = read_or_unavailable(client, "x")
            assert (outcome, got) == ("value", 2) or outcome == "unavailable", (outcome, got)
            assert took < CALL_S + 5

            proxy.restore()
            assert wait_for(lambda: client.cached("x") == (2, 2), timeout=60), "the cache did not resync"
            assert events.until(lambda e: e.version >= 2, timeout=60)[-1].value == 2
            bridge.store.set_variable("s", "x", 3)
            assert events.until(lambda e: e.version >= 3, timeout=30)[-1].value == 3
            print(f"{kind}: a silent connection was detected after {detected:.2f} s (limit {SILENCE_S} s)")
            assert detected < SILENCE_S + 5
        finally:
            stop_watch()
            client.close()
