"""The backends the contract suite runs against, as one parametrized ``ctx`` fixture.

- ``local``: a plain :class:`Context` on LocalState;
- ``embedded``: a Context bridged to the embedded bridge (the store read in process);
- ``remote``: a Context bridged over gRPC to a ``dspex-bridge serve`` subprocess (one per module);
- ``embedded-redis``: the embedded bridge with its sessions in a real redis-server;
- ``remote-redis``: two ``dspex-bridge serve --storage redis://...`` nodes on one redis-server, the
  context's calls alternating between them (``DSPEX_BRIDGE_BALANCE=round_robin``), so every
  operation also checks that a node holds no state the other one needs (optimization leases
  included: Redis holds them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dspex_dspy import Context
from dspex_dspy.remote import BALANCE_ENV
from dspex_dspy.server import EmbeddedBridge

BACKENDS = ("local", "embedded", "remote", "embedded-redis", "remote-redis")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def redis_nodes(spawn_bridge: Callable[..., Any], redis_server: Any) -> Iterator[str]:
    """Two bridge nodes on the session's redis-server, as one ``"A,B"`` address (one pair per module)."""
    nodes = [spawn_bridge("--storage", redis_server.url) for _ in range(2)]
    yield ",".join(node.address for node in nodes)
    for node in nodes:
        node.stop()


@pytest.fixture
def make_ctx(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], Context]]:
    """Build contexts on the parametrized backend; every one is stopped at teardown."""
    address: str | None = None
    if backend == "remote":
        address = request.getfixturevalue("remote_bridge").address
    elif backend == "remote-redis":
        address = request.getfixturevalue("redis_nodes")
        monkeypatch.setenv(BALANCE_ENV, "round_robin")
    elif backend == "embedded-redis":
        EmbeddedBridge.configure(request.getfixturevalue("redis_server").url)
    made: list[Context] = []

    def make() -> Context:
        ctx = Context(bridge=address)
        made.append(ctx)
        if backend != "local":
            ctx.ensure_bridged()
            assert ctx.get_backend().type == "bridged"
        return ctx

    yield make
    for ctx in made:
        ctx.stop()
    if backend == "embedded-redis":
        EmbeddedBridge.configure("memory")


@pytest.fixture
def ctx(make_ctx: Callable[[], Context]) -> Context:
    return make_ctx()
