"""A worker notices a half-open connection: the peer silently gone, no reset.

A real bridge is reached through a loopback proxy that stops forwarding without closing anything.
The bridge sends a heartbeat on every watch stream after 0.2 s of silence here, so a cache stream
that stays silent for ``silence_timeout`` (1.5 s here) is dead: the cache must stop claiming to be
current (and say that the silence timeout is why), reads must go to the server (and end by their
``call_timeout`` while it is unreachable, not hang), and once traffic flows again the cache and the
watch must reconnect and catch up. Every wait is on a condition; the time limits are hang guards,
and how fast the silence was noticed is printed for information.
"""

from __future__ import annotations

import logging
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
HANG_GUARD_S = 60.0  # waits are on conditions; this only stops a broken build from hanging


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


def silence_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client's reports that its cache stream went silent for longer than ``SILENCE_S``."""
    wanted = f"silent for more than {SILENCE_S:g} s"
    return [r.getMessage() for r in caplog.records if r.name.startswith("dspex_dspy") and wanted in r.getMessage()]


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_a_silent_connection_stops_the_cache_and_the_watch_reconnects(
    bridge: BridgeServer, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dspex_dspy")
    with FaultProxy(bridge.port) as proxy:
        client = CLIENTS[kind].connect(proxy.address, "s", silence_timeout=SILENCE_S, call_timeout=CALL_S)
        events, stop_watch = client.watch(["x"])
        try:
            assert events.next(timeout=HANG_GUARD_S).version == 1
            # The cache serves x=1. A stall of the loaded test machine longer than SILENCE_S may take
            # the live stream for dead now and then; it reconnects and resyncs on its own, so wait
            # for the condition rather than read it once.
            assert wait_for(lambda: client.cached("x") == (1, 1), timeout=HANG_GUARD_S), client.ctx.cache_state
            caplog.clear()  # only what follows the cut counts below

            proxy.blackhole()
            cut = time.monotonic()
            bridge.store.set_variable("s", "x", 2)
            # Nothing but the silence can tell the client: the link is not closed and the channel
            # has no keepalive, so the cache would serve x=1 for ever without the silence timeout.
            assert wait_for(lambda: client.cached("x") is None, timeout=HANG_GUARD_S), (
                "the cache kept serving the old value over a dead connection"
            )
            detected = time.monotonic() - cut
            assert client.ctx.cache_state == "down"
            # ... and it was the silence timeout, as configured, that took the stream for dead.
            assert wait_for(lambda: silence_reports(caplog) != [], timeout=HANG_GUARD_S), [
                r.getMessage() for r in caplog.records
            ]
            # A read goes to the server and, while it is unreachable, fails by its call deadline
            # rather than waiting for ever (the link is silent, never closed).
            outcome, got, took = read_or_unavailable(client, "x")
            assert (outcome, got) == ("value", 2) or outcome == "unavailable", (outcome, got)
            assert took < HANG_GUARD_S, f"a read over the dead connection took {took:.1f} s"

            proxy.restore()
            assert wait_for(lambda: client.cached("x") == (2, 2), timeout=HANG_GUARD_S), "the cache did not resync"
            assert events.until(lambda e: e.version >= 2, timeout=HANG_GUARD_S)[-1].value == 2
            bridge.store.set_variable("s", "x", 3)
            assert events.until(lambda e: e.version >= 3, timeout=HANG_GUARD_S)[-1].value == 3
            print(
                f"\n{kind}: a silent connection was detected after {detected:.2f} s (silence_timeout {SILENCE_S} s);"
                f" a read over it ended after {took:.2f} s (call_timeout {CALL_S} s); for information"
            )
        finally:
            stop_watch()
            client.close()
