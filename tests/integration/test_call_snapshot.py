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
from collections.abc import Iterator
from typing import Any

import dspy
import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.modules import VariableBindingMixin, get_provenance

pytestmark = pytest.mark.integration

CALLS = 20_000
TIME_BUDGET_S = 4.0


class Echo(VariableBindingMixin, dspy.Module):  # type: ignore[misc]
    """Returns the bound values of the call, as the call saw them."""

    def forward(self) -> Any:
        return dspy.Prediction(temperature=self.temperature, max_tokens=self.max_tokens)


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
        deadline = time.monotonic() + TIME_BUDGET_S
        try:
            while calls < CALLS and (calls < 500 or time.monotonic() < deadline):
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
