"""One module call reads every binding from one snapshot.

A writer applies atomic ``update_many({"a": i, "b": i})`` as fast as it can while a
variable-aware module is called over and over; every call must see ``a`` and ``b`` from the same
write. Thread switches are forced far more often than the interpreter's default so that a call
reading its bindings one by one would be caught between two writes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import dspy
import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.modules import VariableBindingMixin, get_provenance
from dspex_dspy.reader import VariableReader
from dspex_dspy.server import create_server
from dspex_dspy.store import SessionStore
from dspex_dspy.types import Variable

pytestmark = pytest.mark.integration

CALLS = 20_000
TIME_BUDGET_S = 4.0  # how long to keep looking for a mixed call (more calls, more chances); not a bound
HANG_GUARD_S = 60.0  # generous bound on waiting for the writer to be seen; never an assertion on speed


class Echo(VariableBindingMixin, dspy.Module):  # type: ignore[misc]
    """Returns the bound values of the call, as the call saw them."""

    def forward(self) -> Any:
        bound = self.get_bindings()
        return dspy.Prediction(**{attr: getattr(self, attr) for attr in ("temperature", "max_tokens") if attr in bound})


@pytest.fixture
def fast_switching() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("backend", ["local", "embedded"])
def test_every_call_sees_one_atomic_write(backend: str, fast_switching: None) -> None:
    with Context() as ctx:
        Variables.defvariable(ctx, "a", "float", 1.0)
        Variables.defvariable(ctx, "b", "integer", 1)
        if backend == "embedded":
            ctx.ensure_bridged()
        module = Echo(session_context=ctx, variable_bindings={"temperature": "a", "max_tokens": "b"})
        stop = threading.Event()
        written = [0]

        def writer() -> None:
            i = 1
            while not stop.is_set():
                i += 1
                Variables.update_many(ctx, {"a": i, "b": i})
                written[0] = i

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        mismatches: list[tuple[Any, Any]] = []
        seen: set[int] = set()
        calls = 0

        def writes_seen() -> bool:
            # The writer wrote several times and the calls saw its values change: checked below.
            return written[0] > 2 and len(seen) > 2

        started = time.monotonic()
        try:
            # Call for the time budget (at least 500 calls), then on until the writes were seen
            # however slowly the writer got going on a loaded machine (the hang guard ends the wait).
            while (calls < CALLS and (calls < 500 or time.monotonic() < started + TIME_BUDGET_S)) or (
                not writes_seen() and time.monotonic() < started + HANG_GUARD_S
            ):
                pred = module()
                calls += 1
                prov = get_provenance(pred)
                if pred.temperature != pred.max_tokens or prov["temperature"].version != prov["max_tokens"].version:
                    mismatches.append((prov["temperature"], prov["max_tokens"]))
                seen.add(pred.max_tokens)
        finally:
            stop.set()
            thread.join(30)
        assert written[0] > 2, "the writer never ran"
        assert len(seen) > 2, "the calls never saw the writer's values change"
        assert mismatches == [], f"{len(mismatches)} of {calls} calls mixed two writes: {mismatches[:3]}"


def test_a_missing_binding_is_still_named(fast_switching: None) -> None:
    with Context() as ctx:
        Variables.defvariable(ctx, "a", "float", 1.0)
        Variables.defvariable(ctx, "b", "integer", 1)
        module = Echo(session_context=ctx, variable_bindings={"temperature": "a", "max_tokens": "b"})
        Variables.delete(ctx, "b")
        with pytest.raises(KeyError, match=r"Echo\.max_tokens is bound to 'b', which no longer exists"):
            module()


class CountingStore(SessionStore):
    """A real store that counts the reads a bridge server makes on it."""

    def __init__(self) -> None:
        super().__init__()
        self.single_reads = 0
        self.batch_reads = 0

    def get_variable(self, session_id: str, identifier: str) -> Variable:
        self.single_reads += 1
        return super().get_variable(session_id, identifier)

    def get_variables(self, session_id: str, identifiers: Iterable[str]) -> tuple[dict[str, Variable], list[str]]:
        self.batch_reads += 1
        return super().get_variables(session_id, identifiers)

    # A grpc.aio server serves reads on its event loop through these.
    async def get_variable_async(self, session_id: str, identifier: str) -> Variable:
        self.single_reads += 1
        return await super().get_variable_async(session_id, identifier)

    async def get_variables_async(
        self, session_id: str, identifiers: Iterable[str]
    ) -> tuple[dict[str, Variable], list[str]]:
        self.batch_reads += 1
        return await super().get_variables_async(session_id, identifiers)


def test_a_call_on_a_remote_bridge_reads_its_bindings_in_one_rpc() -> None:
    store = CountingStore()
    server, port = create_server(store, "127.0.0.1", 0)
    server.start()
    try:
        with Context(bridge=f"127.0.0.1:{port}") as ctx:
            Variables.defvariable(ctx, "a", "float", 0.5)
            Variables.defvariable(ctx, "b", "integer", 100)
            Variables.defvariable(ctx, "c", "float", 0.9)
            ctx.ensure_bridged()
            assert isinstance(ctx, VariableReader)
            module = Echo(session_context=ctx, variable_bindings={"temperature": "a", "max_tokens": "b", "top_p": "c"})
            store.single_reads = store.batch_reads = 0
            for _ in range(5):
                module()
            assert (store.single_reads, store.batch_reads) == (0, 5)
    finally:
        server.stop(0)
