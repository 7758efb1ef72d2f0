"""Backend parity at the edges: limits, numpy values, snapshot reads and the update loop.

The same checks run on LocalState, embedded BridgedState and remote BridgedState: a value one
backend accepts, every backend accepts, so a local context can always be bridged.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.errors import (
    BatchUpdateError,
    LimitExceededError,
    ValidationError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.limits import Limits, StoreLimits
from dspex_dspy.variables import backoff_delays

pytestmark = pytest.mark.integration

TWO_MIB = "x" * (2 << 20)


def test_the_store_limits_name_is_the_shared_limits_object() -> None:
    from dspex_dspy.store import StoreLimits as FromStore

    assert FromStore is StoreLimits is Limits


def test_a_value_over_the_size_limit_is_rejected_at_write_time(ctx: Context) -> None:
    with pytest.raises(LimitExceededError, match="big: value size in bytes"):
        Variables.defvariable(ctx, "big", "string", TWO_MIB)
    assert not Variables.exists(ctx, "big")
    Variables.defvariable(ctx, "text", "string", "short")
    with pytest.raises(LimitExceededError, match="text: value size in bytes"):
        Variables.set(ctx, "text", TWO_MIB)
    with pytest.raises(BatchUpdateError) as caught:
        Variables.update_many(ctx, {"text": TWO_MIB})
    assert isinstance(caught.value.errors["text"], LimitExceededError)
    var = Variables.get_variable(ctx, "text")
    assert (var.value, var.version) == ("short", 1)


def test_a_large_embedding_is_rejected_everywhere(ctx: Context) -> None:
    Variables.defvariable(ctx, "vec", "embedding", [0.0])
    with pytest.raises(LimitExceededError):
        Variables.set(ctx, "vec", [0.0] * ((1 << 20) // 8 + 1))
    assert Variables.get(ctx, "vec") == [0.0]


def test_a_local_context_holding_values_near_the_limit_can_be_bridged() -> None:
    with Context() as ctx:
        Variables.defvariable(ctx, "near", "string", "y" * (1 << 20))
        ctx.ensure_bridged()
        assert len(Variables.get(ctx, "near")) == 1 << 20


def test_the_local_variable_count_limit_matches_the_store() -> None:
    from dspex_dspy.state import LocalState

    state = LocalState("c", limits=Limits(max_variables_per_session=2))
    state.register("a", "integer", 1)
    state.register("b", "integer", 2)
    with pytest.raises(LimitExceededError, match="variables per session: 3 exceeds the limit 2"):
        state.register("c", "integer", 3)
    assert not state.exists("c")


NUMPY_VALUES: list[tuple[str, Any, Any]] = [
    ("float", np.float32(0.5), 0.5),
    ("float", np.float64(0.25), 0.25),
    ("float", np.array(1.5), 1.5),
    ("float", np.int32(2), 2.0),
    ("integer", np.int64(7), 7),
    ("integer", np.array(9), 9),
    ("boolean", np.bool_(True), True),
    ("embedding", [np.float32(1.0), np.int8(2)], [1.0, 2.0]),
    ("embedding", np.array([1.0, 2.0], dtype=np.float32), [1.0, 2.0]),
]


@pytest.mark.parametrize(("type_", "value", "expected"), NUMPY_VALUES, ids=lambda v: repr(v))
def test_numpy_scalars_and_0d_arrays_are_accepted_the_same_way(
    ctx: Context, type_: str, value: Any, expected: Any
) -> None:
    Variables.defvariable(ctx, "v", type_, value)
    assert Variables.get(ctx, "v") == expected
    assert Variables.set(ctx, "v", value) == 2
    assert Variables.update_many(ctx, {"v": value}) == {"v": 3}
    got = Variables.get(ctx, "v")
    assert got == expected
    assert type(got) is type(expected)


def test_get_versioned_many_reads_one_snapshot(ctx: Context) -> None:
    Variables.defvariable(ctx, "a", "integer", 1)
    Variables.defvariable(ctx, "b", "string", "x")
    Variables.set(ctx, "b", "y")
    assert ctx.get_versioned_many(["a", "b"]) == {"a": (1, 1), "b": ("y", 2)}
    with pytest.raises(VariableNotFoundError, match="nope, gone"):
        ctx.get_versioned_many(["a", "nope", "gone"])


def test_update_gives_up_with_the_real_versions(ctx: Context) -> None:
    Variables.defvariable(ctx, "n", "integer", 0)
    calls = []

    def interfering(value: int) -> int:
        # Another writer gets in between every read and write of the loop.
        calls.append(value)
        Variables.set(ctx, "n", value + 100)
        return value + 1

    with pytest.raises(VersionConflictError) as caught:
        Variables.update(ctx, "n", interfering, max_attempts=4)
    assert len(calls) == 4
    error = caught.value
    assert (error.expected, error.actual) == (4, 5)
    assert "gave up after 4 attempts" in str(error)
    assert "expected version 4 but the current version was 5" in str(error)
    assert "-1" not in str(error)
    assert Variables.get(ctx, "n") == 400


def test_update_rejects_a_bad_attempt_count(ctx: Context) -> None:
    Variables.defvariable(ctx, "n", "integer", 0)
    with pytest.raises(ValidationError, match="max_attempts"):
        Variables.update(ctx, "n", lambda v: v + 1, max_attempts=0)


def test_update_backs_off_exponentially_and_is_bounded() -> None:
    delays = list(backoff_delays(10, 0.001, 0.01))
    assert len(delays) == 9
    assert delays[:4] == [0.001, 0.002, 0.004, 0.008]
    assert max(delays) == 0.01
    assert delays == sorted(delays)


def test_concurrent_updates_lose_nothing(ctx: Context) -> None:
    Variables.defvariable(ctx, "count", "integer", 0)
    failures: list[BaseException] = []

    def bump() -> None:
        try:
            for _ in range(25):
                Variables.update(ctx, "count", lambda n: n + 1)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    assert Variables.get(ctx, "count") == 100
