"""Optimization leases behave the same on LocalState, embedded and remote bridged contexts."""

from __future__ import annotations

import time

import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.errors import BatchUpdateError, ValidationError, VariableLockedError, VariableNotFoundError
from dspex_dspy.leases import LEASE_ID_PREFIX

pytestmark = pytest.mark.integration


def _define(ctx: Context) -> None:
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(ctx, "max_tokens", "integer", 256, constraints={"min": 1, "max": 4096})
    Variables.defvariable(ctx, "model", "string", "a", constraints={"enum": ["a", "b"]})


def _status(ctx: Context, name: str) -> str | None:
    status = Variables.get_variable(ctx, name).optimization_status
    return None if status is None else status.optimizer_id


def test_a_lease_refuses_other_writers_and_shows_in_listings(ctx: Context) -> None:
    _define(ctx)
    before = time.time()
    lease = Variables.start_optimization(ctx, ["temperature", "max_tokens"], "tuner-1", ttl=60)
    assert lease.id.startswith(LEASE_ID_PREFIX)
    assert lease.optimizer_id == "tuner-1"
    assert lease.variables == ("temperature", "max_tokens")

    listed = {v.name: v.optimization_status for v in Variables.list(ctx)}
    assert listed["model"] is None
    for name in ("temperature", "max_tokens"):
        status = listed[name]
        assert status is not None
        assert status.optimizer_id == "tuner-1"
        assert before - 5 <= status.started_at <= time.time() + 5

    with pytest.raises(VariableLockedError, match="held by optimizer tuner-1") as info:
        Variables.set(ctx, "temperature", 0.1)
    assert info.value.name == "temperature"
    assert info.value.optimizer_id == "tuner-1"
    with pytest.raises(BatchUpdateError) as batch:
        Variables.update_many(ctx, {"model": "b", "max_tokens": 10})
    assert isinstance(batch.value.errors["max_tokens"], VariableLockedError)
    # Reads are never blocked, and nothing changed.
    assert Variables.get_many(ctx, ["temperature", "max_tokens", "model"]) == {
        "temperature": 0.7,
        "max_tokens": 256,
        "model": "a",
    }
    assert Variables.get_variable(ctx, "temperature").version == 1
    # An unleased variable is writable as usual.
    assert Variables.set(ctx, "model", "b") == 2


def test_the_holder_writes_with_its_id_and_a_forced_write_is_recorded(ctx: Context) -> None:
    _define(ctx)
    Variables.start_optimization(ctx, ["temperature", "max_tokens"], "tuner-1", ttl=60)
    versions = Variables.update_many(
        ctx, {"temperature": 0.2, "max_tokens": 64}, metadata={"optimizer_id": "tuner-1", "score": "0.9"}
    )
    assert versions == {"temperature": 2, "max_tokens": 2}
    var = Variables.get_variable(ctx, "temperature")
    assert var.metadata["optimizer_id"] == "tuner-1"
    assert var.metadata["score"] == "0.9"

    assert Variables.set(ctx, "temperature", 1.5, force=True) == 3
    forced = Variables.get_variable(ctx, "temperature")
    assert forced.value == 1.5
    assert forced.metadata["forced_over"] == "tuner-1"
    assert "dspex.force" not in forced.metadata
    # The lease still holds after a forced write.
    assert _status(ctx, "temperature") == "tuner-1"
    with pytest.raises(VariableLockedError):
        Variables.set(ctx, "temperature", 1.0)


def test_a_second_optimizer_on_an_overlapping_set_is_refused(ctx: Context) -> None:
    _define(ctx)
    Variables.start_optimization(ctx, ["temperature", "max_tokens"], "tuner-1", ttl=60)
    with pytest.raises(VariableLockedError, match="held by optimizer tuner-1") as info:
        Variables.start_optimization(ctx, ["model", "max_tokens"], "tuner-2", ttl=60)
    assert info.value.name == "max_tokens"
    # All or nothing: the free variable was not taken either.
    assert _status(ctx, "model") is None
    assert Variables.set(ctx, "model", "b") == 2
    # A disjoint set is fine.
    Variables.start_optimization(ctx, ["model"], "tuner-2", ttl=60)
    assert _status(ctx, "model") == "tuner-2"


def test_stop_by_lease_forced_stop_and_renewal(ctx: Context) -> None:
    _define(ctx)
    lease = Variables.start_optimization(ctx, ["temperature"], "tuner-1", ttl=60)
    renewed = Variables.renew_optimization(ctx, lease)
    assert renewed.id == lease.id
    with pytest.raises(VariableLockedError, match="force=True"):
        Variables.stop_optimization(ctx, "temperature")
    assert _status(ctx, "temperature") == "tuner-1"
    Variables.stop_optimization(ctx, lease)
    assert _status(ctx, "temperature") is None
    assert Variables.set(ctx, "temperature", 0.3) == 2
    Variables.stop_optimization(ctx, lease)  # already ended: nothing to do

    other = Variables.start_optimization(ctx, ["temperature", "model"], "tuner-2", ttl=60)
    Variables.stop_optimization(ctx, "model", force=True)
    assert _status(ctx, "temperature") is None
    assert _status(ctx, "model") is None
    assert other.id != lease.id


def test_a_lease_ends_when_it_expires(ctx: Context) -> None:
    _define(ctx)
    Variables.start_optimization(ctx, ["temperature"], "tuner-1", ttl=0.2)
    deadline = time.monotonic() + 30
    while _status(ctx, "temperature") is not None:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.05)
    assert Variables.set(ctx, "temperature", 0.4) == 2
    Variables.start_optimization(ctx, ["temperature"], "tuner-2", ttl=60)
    assert _status(ctx, "temperature") == "tuner-2"


def test_a_leased_variable_cannot_be_deleted(ctx: Context) -> None:
    _define(ctx)
    lease = Variables.start_optimization(ctx, ["model"], "tuner-1", ttl=60)
    with pytest.raises(VariableLockedError, match="deleting it"):
        Variables.delete(ctx, "model")
    assert Variables.exists(ctx, "model")
    Variables.stop_optimization(ctx, lease)
    Variables.delete(ctx, "model")
    assert not Variables.exists(ctx, "model")


@pytest.mark.parametrize(
    ("names", "optimizer_id", "ttl", "error", "match"),
    [
        (["temperature"], "", 10, ValidationError, "optimizer id"),
        (["temperature"], "has space", 10, ValidationError, "optimizer id"),
        (["temperature"], "tuner-1", 0, ValidationError, "ttl"),
        ([], "tuner-1", 10, ValidationError, "non-empty list"),
        (["temperature", "ghost"], "tuner-1", 10, VariableNotFoundError, "ghost"),
    ],
)
def test_bad_lease_requests_are_refused_and_change_nothing(
    ctx: Context, names: list[str], optimizer_id: str, ttl: float, error: type[Exception], match: str
) -> None:
    _define(ctx)
    with pytest.raises(error, match=match):
        Variables.start_optimization(ctx, names, optimizer_id, ttl=ttl)
    assert _status(ctx, "temperature") is None
    assert Variables.set(ctx, "temperature", 0.5) == 2
