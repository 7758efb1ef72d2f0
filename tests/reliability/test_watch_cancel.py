"""A watch cancelled while the server is still opening it leaves nothing registered.

The store here opens watches slowly (as a Redis round trip under load would): its ``watch``
waits on a gate the test opens only after the client has cancelled the call. Both server kinds
must end with no open watch slot and no watcher in the store. The pause before the gate opens
only gives the server time to see the cancellation first; the assertions wait on conditions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import grpc
import pytest

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.server import create_server
from dspex_dspy.store import SessionStore, Watch

pytestmark = pytest.mark.reliability

DEADLINE_S = 30.0


class GatedStore(SessionStore):
    """A store whose ``watch`` waits until :attr:`gate` opens (and says when it started waiting)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def watch(self, session_id: str, identifiers: Iterable[str] | None = None, **options: Any) -> Watch:
        self.entered.set()
        assert self.gate.wait(DEADLINE_S), "the test never opened the gate"
        return super().watch(session_id, identifiers, **options)


def wait_for(predicate: Any, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("asyncio", [True, False], ids=["aio", "blocking"])
def test_a_watch_cancelled_while_it_opens_frees_its_slot(asyncio: bool) -> None:
    store = GatedStore()
    store.create_session("s")
    store.register_variable("s", "x", "integer", 0)
    server, _ = create_server(store, asyncio=asyncio, heartbeat_interval=0.2)
    server.start()
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.BridgeServiceStub(channel)
        call = stub.WatchVariables(pb.WatchVariablesRequest(session_id="s", include_initial_values=True))
        assert store.entered.wait(DEADLINE_S), "the server never started opening the watch"
        call.cancel()
        time.sleep(0.3)  # let the server see the cancellation before the opening completes
        store.gate.set()
        wait_for(lambda: server.servicer.active_watches == 0, "the watch slot to be freed")
        wait_for(lambda: store.watcher_count == 0, "the store's watcher to be removed")
        # The server still serves watches normally.
        again = stub.WatchVariables(pb.WatchVariablesRequest(session_id="s", include_initial_values=True))
        assert next(again).variable.name == "x"
        again.cancel()
    finally:
        channel.close()
        server.stop(0)
        store.close()
