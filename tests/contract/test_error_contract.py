"""Errors are the same on every backend: class, variable, rule, value, versions and message.

Each failure is provoked on the parametrized backend (local, embedded, remote over gRPC) and on a
plain local Context as the reference; the two errors must agree field by field. Over gRPC the
fields travel in the rich error details, so this also proves they survive the round trip.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from test_state_contract import VIOLATIONS

from dspex_dspy import Context, Variables
from dspex_dspy.errors import (
    BatchUpdateError,
    DSPexError,
    LimitExceededError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)

pytestmark = pytest.mark.integration

FIELDS = (
    "variable",
    "rule",
    "value",
    "detail",
    "identifier",
    "name",
    "expected",
    "actual",
    "limit",
    "maximum",
    "message",
)


def fields(error: BaseException) -> dict[str, Any]:
    """The error's class and the fields every backend must agree on."""
    out: dict[str, Any] = {"class": type(error).__name__}
    for attr in FIELDS:
        if hasattr(error, attr):
            value = getattr(error, attr)
            out[attr] = "NaN" if isinstance(value, float) and math.isnan(value) else value
    if "message" in out:  # each context has its own session id
        out["message"] = re.sub(r" in session \S+", " in session <id>", out["message"])
    return out


def raised(action: Callable[[], object]) -> DSPexError:
    with pytest.raises(DSPexError) as info:
        action()
    return info.value


@pytest.fixture
def reference() -> Any:
    ctx = Context()
    yield ctx
    ctx.stop()


def on_both(ctx: Context, reference: Context, setup: Callable[[Context], object]) -> None:
    setup(ctx)
    setup(reference)


@pytest.mark.parametrize(
    ("type_", "constraints", "initial", "accepted", "bad", "rule"),
    VIOLATIONS,
    ids=[f"{v[0]}-{v[5]}-{i}" for i, v in enumerate(VIOLATIONS)],
)
def test_a_rejected_write_carries_variable_rule_and_value(
    ctx: Context,
    reference: Context,
    type_: str,
    constraints: dict[str, Any],
    initial: Any,
    accepted: Any,
    bad: Any,
    rule: str,
) -> None:
    on_both(ctx, reference, lambda c: Variables.defvariable(c, "v", type_, initial, constraints=constraints))
    error = raised(lambda: Variables.set(ctx, "v", bad))
    assert isinstance(error, ValidationError)
    assert (error.variable, error.rule) == ("v", rule)
    assert error.value is not None
    assert fields(error) == fields(raised(lambda: Variables.set(reference, "v", bad)))


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "partial"])
@pytest.mark.parametrize(
    ("type_", "constraints", "initial", "accepted", "bad", "rule"),
    VIOLATIONS,
    ids=[f"{v[0]}-{v[5]}-{i}" for i, v in enumerate(VIOLATIONS)],
)
def test_each_batch_entry_carries_its_own_error(
    ctx: Context,
    reference: Context,
    atomic: bool,
    type_: str,
    constraints: dict[str, Any],
    initial: Any,
    accepted: Any,
    bad: Any,
    rule: str,
) -> None:
    on_both(ctx, reference, lambda c: Variables.defvariable(c, "v", type_, initial, constraints=constraints))
    on_both(ctx, reference, lambda c: Variables.defvariable(c, "other", "integer", 0))
    updates = {"other": 1, "v": bad, "missing": 1}
    error = raised(lambda: Variables.update_many(ctx, updates, atomic=atomic))
    expected = raised(lambda: Variables.update_many(reference, updates, atomic=atomic))
    assert isinstance(error, BatchUpdateError) and isinstance(expected, BatchUpdateError)
    assert set(error.errors) == {"v", "missing"}
    entry = error.errors["v"]
    assert isinstance(entry, ValidationError)
    assert (entry.variable, entry.rule) == ("v", rule)
    assert isinstance(error.errors["missing"], VariableNotFoundError)
    assert error.errors["missing"].identifier == "missing"
    assert {k: fields(e) for k, e in error.errors.items()} == {k: fields(e) for k, e in expected.errors.items()}
    assert error.new_versions == expected.new_versions


@pytest.mark.parametrize("text", ["not found", "already exists", "expected version 1 but the current version is 2"])
def test_a_rejected_value_is_a_validation_error_whatever_its_text(ctx: Context, reference: Context, text: str) -> None:
    on_both(ctx, reference, lambda c: Variables.defvariable(c, "status", "integer", 0))
    error = raised(lambda: Variables.update_many(ctx, {"status": text}))
    assert isinstance(error, BatchUpdateError)
    entry = error.errors["status"]
    assert type(entry) is ValidationError
    assert (entry.variable, entry.rule, entry.value) == ("status", "type", text)
    expected = raised(lambda: Variables.update_many(reference, {"status": text}))
    assert isinstance(expected, BatchUpdateError)
    assert fields(entry) == fields(expected.errors["status"])
    single = raised(lambda: Variables.set(ctx, "status", text))
    assert type(single) is ValidationError
    assert fields(single) == fields(raised(lambda: Variables.set(reference, "status", text)))
    assert Variables.get_variable(ctx, "status").version == 1


def test_a_version_conflict_carries_both_versions(ctx: Context, reference: Context) -> None:
    on_both(ctx, reference, lambda c: Variables.defvariable(c, "counter", "integer", 0))
    on_both(ctx, reference, lambda c: Variables.set(c, "counter", 1))
    on_both(ctx, reference, lambda c: Variables.set(c, "counter", 2))
    error = raised(lambda: Variables.set(ctx, "counter", 9, expected_version=1))
    assert isinstance(error, VersionConflictError)
    assert (error.name, error.expected, error.actual) == ("counter", 1, 3)
    assert fields(error) == fields(raised(lambda: Variables.set(reference, "counter", 9, expected_version=1)))


def test_a_missing_variable_carries_its_identifier(ctx: Context) -> None:
    for action in (
        lambda: Variables.get(ctx, "ghost"),
        lambda: Variables.set(ctx, "ghost", 1),
        lambda: Variables.delete(ctx, "ghost"),
    ):
        error = raised(action)
        assert isinstance(error, VariableNotFoundError)
        assert error.identifier == "ghost"
        assert str(error).startswith("Variable not found: ghost")


def test_a_duplicate_carries_the_name(ctx: Context, reference: Context) -> None:
    on_both(ctx, reference, lambda c: Variables.defvariable(c, "x", "integer", 1))
    error = raised(lambda: Variables.defvariable(ctx, "x", "integer", 2))
    assert isinstance(error, VariableExistsError)
    assert error.name == "x"
    assert type(error) is type(raised(lambda: Variables.defvariable(reference, "x", "integer", 2)))


def limit_fields(error: DSPexError) -> tuple[str, str, int, bool]:
    """A limit error's class, limit and maximum, and whether the value it names is over the maximum.

    The size itself is not compared: a bridge server measures the value as it arrives on the wire
    (its JSON, quotes included) before decoding it, a store measures the decoded value.
    """
    assert isinstance(error, LimitExceededError)
    return type(error).__name__, error.limit, error.maximum, error.value > error.maximum


def test_a_limit_carries_what_was_exceeded(ctx: Context, reference: Context) -> None:
    too_big = "x" * (2 << 20)
    on_both(ctx, reference, lambda c: Variables.defvariable(c, "text", "string", "short"))
    error = raised(lambda: Variables.set(ctx, "text", too_big))
    assert limit_fields(error) == ("LimitExceededError", "text: value size in bytes", 1 << 20, True)
    assert limit_fields(error) == limit_fields(raised(lambda: Variables.set(reference, "text", too_big)))
    batch = raised(lambda: Variables.update_many(ctx, {"text": too_big}))
    expected = raised(lambda: Variables.update_many(reference, {"text": too_big}))
    assert isinstance(batch, BatchUpdateError) and isinstance(expected, BatchUpdateError)
    assert limit_fields(batch.errors["text"]) == limit_fields(expected.errors["text"])
