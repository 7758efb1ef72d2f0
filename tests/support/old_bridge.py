"""A bridge that speaks only the plain contract: no ``ImportVariables`` extension (as an older peer)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.server import BridgeServicer
from dspex_dspy.store import SessionStore


class _OldBridge(BridgeServicer):
    """Answers ``ImportVariables`` as a peer without it does: ``UNIMPLEMENTED``."""

    def ImportVariables(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


@contextmanager
def older_bridge() -> Iterator[tuple[int, SessionStore]]:
    """A blocking gRPC server of :class:`_OldBridge` on a loopback port: ``(port, its store)``."""
    store = SessionStore()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_BridgeServiceServicer_to_server(_OldBridge(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, store
    finally:
        server.stop(None)
        store.close()
