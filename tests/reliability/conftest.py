"""Fixtures of the reliability suite: a real bridge server in process, reached directly or through a proxy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.server import BridgeServer, ServerLimits, create_server
from dspex_dspy.store import SessionStore, StoreLimits
from tests.support.proxy import FaultProxy


@dataclass
class Served:
    """A running server, its store, a raw stub and the channel under it."""

    server: BridgeServer
    store: SessionStore
    channel: grpc.Channel
    stub: pb_grpc.BridgeServiceStub


def serve(store_limits: StoreLimits | None = None, limits: ServerLimits | None = None) -> Served:
    store = SessionStore(limits=store_limits)
    server, port = create_server(store, limits=limits, heartbeat_interval=0.5)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Served(server, store, channel, pb_grpc.BridgeServiceStub(channel))


@pytest.fixture
def served() -> Iterator[Served]:
    s = serve()
    yield s
    s.channel.close()
    s.server.stop(0)
    s.store.close()


@pytest.fixture
def proxy(served: Served) -> Iterator[FaultProxy]:
    with FaultProxy(served.server.port) as p:
        yield p
