"""The backends the contract suite runs against, as one parametrized ``ctx`` fixture.

- ``local``: a plain :class:`Context` on LocalState;
- ``embedded``: a Context bridged to the embedded bridge (the store read in process);
- ``remote``: a Context bridged over gRPC to a ``dspex-bridge serve`` subprocess (one per module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dspex_dspy import Context

BACKENDS = ("local", "embedded", "remote")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_ctx(backend: str, request: pytest.FixtureRequest) -> Iterator[Callable[[], Context]]:
    """Build contexts on the parametrized backend; every one is stopped at teardown."""
    address = request.getfixturevalue("remote_bridge").address if backend == "remote" else None
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


@pytest.fixture
def ctx(make_ctx: Callable[[], Context]) -> Context:
    return make_ctx()
