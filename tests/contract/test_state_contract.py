"""One contract for every backend: each Variables operation behaves the same on LocalState,
embedded BridgedState and remote BridgedState (a ``dspex-bridge serve`` subprocess over gRPC).

A documented divergence would be an explicit ``pytest.skip`` with its reason; there are none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.errors import (
    BatchUpdateError,
    DSPexError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.types import Variable

pytestmark = pytest.mark.integration

# (type, initial value, constraints, expected normalised value)
ALL_TYPES: list[tuple[str, Any, dict[str, Any] | None, Any]] = [
    ("float", 1, {"min": 0.0, "max": 2.0}, 1.0),
    ("integer", 256.0, {"min": 1, "max": 4096}, 256),
    ("string", "ABC123", {"pattern": "^[A-Z]+[0-9]+$", "min_length": 2, "max_length": 10}, "ABC123"),
    ("boolean", "true", None, True),
    ("choice", "fast", {"choices": ["fast", "accurate"]}, "fast"),
    ("module", "ChainOfThought", {"allowed_modules": ["Predict", "ChainOfThought"]}, "ChainOfThought"),
    ("embedding", [1, 0.5, -2], {"dimensions": 3}, [1.0, 0.5, -2.0]),
    ("tensor", [[1, 2], [3, 4]], {"shape": [2, 2]}, {"shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}),
]

# (type, constraints, initial, accepted, rejected, rule)
VIOLATIONS: list[tuple[str, dict[str, Any], Any, Any, Any, str]] = [
    ("float", {"min": 0.0, "max": 1.0}, 0.5, 0.8, 1.5, "max"),
    ("float", {"min": 0.0, "max": 1.0}, 0.5, 0.0, -0.1, "min"),
    ("integer", {"min": 1, "max": 10}, 5, 10, 11, "max"),
    ("integer", {"min": 1, "max": 10}, 5, 1, 0, "min"),
    ("integer", {}, 5, 6, 6.5, "type"),
    ("integer", {}, 5, 6, "not an integer", "type"),
    ("string", {"pattern": "^[A-Z]+[0-9]+$"}, "ABC123", "XYZ789", "invalid", "pattern"),
    ("string", {"pattern": "[A-Z]+"}, "ABC", "XYZ", "ABC1", "pattern"),
    ("string", {"enum": ["red", "green", "blue"]}, "red", "blue", "yellow", "enum"),
    ("string", {"min_length": 2}, "ab", "abc", "a", "min_length"),
    ("string", {"max_length": 3}, "ab", "abc", "abcd", "max_length"),
    ("boolean", {}, True, "false", "maybe", "type"),
    ("choice", {"choices": ["a", "b"]}, "a", "b", "c", "choices"),
    ("module", {"allowed_modules": ["Predict"]}, "Predict", "Predict", "ReAct", "allowed_modules"),
    ("embedding", {"dimensions": 2}, [0.0, 0.0], [1.0, 1.0], [1.0], "dimensions"),
    ("tensor", {"shape": [2]}, [1.0, 2.0], [3.0, 4.0], [[1.0], [2.0]], "shape"),
    ("tensor", {}, [1.0, 2.0], [3.0, 4.0], {"shape": [3], "data": [1.0]}, "shape"),
]


def snapshot(ctx: Context, name: str) -> tuple[Any, int]:
    var = Variables.get_variable(ctx, name)
    return var.value, var.version


def names(ctx: Context) -> list[str]:
    return [v.name for v in Variables.list(ctx)]


# ------------------------------------------------------------------ defvariable / get


@pytest.mark.parametrize(("type_", "value", "constraints", "expected"), ALL_TYPES, ids=[t[0] for t in ALL_TYPES])
def test_defvariable_every_type(ctx: Context, type_: str, value: Any, constraints: Any, expected: Any) -> None:
    var_id = Variables.defvariable(
        ctx, "v", type_, value, constraints=constraints, description=f"a {type_}", metadata={"kind": type_, "n": 1}
    )
    assert isinstance(var_id, str)
    assert var_id
    assert Variables.get(ctx, "v") == expected
    var = Variables.get_variable(ctx, "v")
    assert isinstance(var, Variable)
    assert var.id == var_id
    assert var.name == "v"
    assert var.type == type_
    assert var.value == expected
    assert dict(var.constraints) == (constraints or {})
    assert var.description == f"a {type_}"
    assert var.metadata["kind"] == type_
    assert var.metadata["n"] == "1"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in var.metadata.items())
    assert var.version == 1
    assert var.created_at > 0
    assert var.updated_at >= var.created_at


def test_get_default_and_missing(ctx: Context) -> None:
    assert Variables.get(ctx, "missing", None) is None
    assert Variables.get(ctx, "missing", 42) == 42
    with pytest.raises(VariableNotFoundError) as info:
        Variables.get(ctx, "missing")
    assert "missing" in str(info.value)
    with pytest.raises(KeyError):
        Variables.get(ctx, "missing")
    with pytest.raises(VariableNotFoundError):
        Variables.get_variable(ctx, "missing")


def test_default_is_not_used_for_existing(ctx: Context) -> None:
    Variables.defvariable(ctx, "x", "integer", 0)
    assert Variables.get(ctx, "x", 99) == 0


@pytest.mark.parametrize(
    ("value", "check"),
    [
        (math.nan, math.isnan),
        (math.inf, lambda x: x == math.inf),
        (-math.inf, lambda x: x == -math.inf),
        (-0.0, lambda x: x == 0.0),
        (1e-300, lambda x: x == 1e-300),
    ],
    ids=["nan", "inf", "-inf", "-0", "tiny"],
)
def test_special_floats(ctx: Context, value: float, check: Callable[[float], bool]) -> None:
    Variables.defvariable(ctx, "f", "float", 0.0)
    Variables.set(ctx, "f", value)
    assert check(Variables.get(ctx, "f"))
    Variables.defvariable(ctx, "vec", "embedding", [value, 1.0])
    assert check(Variables.get(ctx, "vec")[0])


def test_unicode_and_large_strings(ctx: Context) -> None:
    text = "héllo wörld ✓ " * 1000
    Variables.defvariable(ctx, "s", "string", text)
    assert Variables.get(ctx, "s") == text


def test_returned_values_are_copies(ctx: Context) -> None:
    Variables.defvariable(ctx, "vec", "embedding", [1.0, 2.0])
    Variables.defvariable(ctx, "t", "tensor", {"shape": [2], "data": [1.0, 2.0]})
    Variables.get(ctx, "vec").append(3.0)
    Variables.get(ctx, "t")["data"][0] = 9.0
    Variables.get_many(ctx, ["vec"])["vec"].append(4.0)
    assert Variables.get(ctx, "vec") == [1.0, 2.0]
    assert Variables.get(ctx, "t") == {"shape": [2], "data": [1.0, 2.0]}


# ------------------------------------------------------------------ set / CAS / update


def test_set_returns_the_new_version(ctx: Context) -> None:
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    assert Variables.set(ctx, "temperature", 0.9) == 2
    assert Variables.get(ctx, "temperature") == 0.9
    assert Variables.set(ctx, "temperature", 1) == 3
    value = Variables.get(ctx, "temperature")
    assert value == 1.0
    assert type(value) is float
    assert snapshot(ctx, "temperature") == (1.0, 3)


def test_set_missing(ctx: Context) -> None:
    with pytest.raises(VariableNotFoundError):
        Variables.set(ctx, "missing", 1)
    assert names(ctx) == []


def test_write_metadata_does_not_stick_to_the_variable(ctx: Context) -> None:
    Variables.defvariable(ctx, "x", "integer", 0, metadata={"a": "1", "b": "2"})
    Variables.set(ctx, "x", 1, metadata={"b": "two", "c": 3})
    meta = Variables.get_variable(ctx, "x").metadata
    assert (meta["a"], meta["b"], meta["c"]) == ("1", "two", "3")  # on the version that write made
    Variables.set(ctx, "x", 2)
    meta = Variables.get_variable(ctx, "x").metadata
    assert (meta["a"], meta["b"], "c" in meta) == ("1", "2", False)  # and on no later one
    assert Variables.history(ctx, "x", limit=2)[1].metadata == {"b": "two", "c": "3"}


def test_cas(ctx: Context) -> None:
    Variables.defvariable(ctx, "counter", "integer", 0)
    assert Variables.set(ctx, "counter", 1, expected_version=1) == 2
    with pytest.raises(VersionConflictError) as info:
        Variables.set(ctx, "counter", 100, expected_version=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert snapshot(ctx, "counter") == (1, 2)
    assert Variables.set(ctx, "counter", 2, expected_version=2) == 3
    assert Variables.set(ctx, "counter", 3, expected_version=0) == 4
    assert Variables.set(ctx, "counter", 4, expected_version=None) == 5


def test_cas_future_version_conflicts(ctx: Context) -> None:
    Variables.defvariable(ctx, "counter", "integer", 0)
    with pytest.raises(VersionConflictError):
        Variables.set(ctx, "counter", 1, expected_version=7)
    assert snapshot(ctx, "counter") == (0, 1)


def test_update(ctx: Context) -> None:
    Variables.defvariable(ctx, "tokens", "integer", 256, constraints={"min": 1, "max": 4096})
    assert Variables.update(ctx, "tokens", lambda n: n * 2) == 2
    assert Variables.get(ctx, "tokens") == 512


def test_update_rejected_changes_nothing(ctx: Context) -> None:
    Variables.defvariable(ctx, "tokens", "integer", 4000, constraints={"min": 1, "max": 4096})
    with pytest.raises(ValidationError):
        Variables.update(ctx, "tokens", lambda n: n * 2)
    assert snapshot(ctx, "tokens") == (4000, 1)
    with pytest.raises(VariableNotFoundError):
        Variables.update(ctx, "missing", lambda n: n)


def test_update_sees_the_latest_value(ctx: Context) -> None:
    Variables.defvariable(ctx, "s", "string", "a")
    for _ in range(5):
        Variables.update(ctx, "s", lambda s: s + "b")
    assert snapshot(ctx, "s") == ("abbbbb", 6)


# ------------------------------------------------------------------ batches


def test_get_many(ctx: Context) -> None:
    Variables.defvariable(ctx, "temperature", "float", 0.7)
    Variables.defvariable(ctx, "tokens", "integer", 256)
    Variables.defvariable(ctx, "model", "string", "local")
    assert Variables.get_many(ctx, ["temperature", "tokens", "model"]) == {
        "temperature": 0.7,
        "tokens": 256,
        "model": "local",
    }
    assert Variables.get_many(ctx, ("model",)) == {"model": "local"}
    assert Variables.get_many(ctx, []) == {}


def test_get_many_missing(ctx: Context) -> None:
    Variables.defvariable(ctx, "a", "integer", 1)
    with pytest.raises(VariableNotFoundError) as info:
        Variables.get_many(ctx, ["a", "missing_one", "missing_two"])
    assert "missing_one" in str(info.value)
    assert "missing_two" in str(info.value)


def test_update_many_atomic(ctx: Context) -> None:
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(ctx, "tokens", "integer", 256)
    Variables.defvariable(ctx, "model", "string", "local", constraints={"enum": ["local", "fast"]})
    assert Variables.update_many(ctx, {"temperature": 0.5, "tokens": 1024, "model": "fast"}) == {
        "temperature": 2,
        "tokens": 2,
        "model": 2,
    }
    assert Variables.get_many(ctx, ["temperature", "tokens", "model"]) == {
        "temperature": 0.5,
        "tokens": 1024,
        "model": "fast",
    }


def test_update_many_atomic_is_all_or_nothing(ctx: Context) -> None:
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(ctx, "tokens", "integer", 256)
    with pytest.raises(BatchUpdateError) as info:
        Variables.update_many(ctx, {"tokens": 512, "temperature": 9.0, "missing": 1})
    error = info.value
    assert set(error.errors) == {"temperature", "missing"}
    assert all(isinstance(e, DSPexError) for e in error.errors.values())
    assert "9.0" in str(error.errors["temperature"])
    assert error.new_versions == {}
    assert isinstance(error, ValueError)
    assert snapshot(ctx, "tokens") == (256, 1)
    assert snapshot(ctx, "temperature") == (0.7, 1)


def test_update_many_non_atomic_is_partial(ctx: Context) -> None:
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(ctx, "tokens", "integer", 256)
    Variables.defvariable(ctx, "model", "string", "local")
    with pytest.raises(BatchUpdateError) as info:
        Variables.update_many(ctx, {"tokens": 512, "temperature": 9.0, "model": "fast", "missing": 1}, atomic=False)
    error = info.value
    assert set(error.errors) == {"temperature", "missing"}
    assert error.new_versions == {"tokens": 2, "model": 2}
    assert Variables.get_many(ctx, ["tokens", "model", "temperature"]) == {
        "tokens": 512,
        "model": "fast",
        "temperature": 0.7,
    }
    assert snapshot(ctx, "temperature") == (0.7, 1)


def test_update_many_non_atomic_all_good(ctx: Context) -> None:
    Variables.defvariable(ctx, "a", "integer", 1)
    assert Variables.update_many(ctx, {"a": 2}, atomic=False) == {"a": 2}


def test_update_many_empty(ctx: Context) -> None:
    assert Variables.update_many(ctx, {}) == {}


# ------------------------------------------------------------------ list / delete / exists


def test_list_in_creation_order(ctx: Context) -> None:
    order = ["zeta", "alpha", "mid", "beta"]
    for i, name in enumerate(order):
        Variables.defvariable(ctx, name, "integer", i)
    Variables.set(ctx, "zeta", 10)
    listed = Variables.list(ctx)
    assert [v.name for v in listed] == order
    assert [v.value for v in listed] == [10, 1, 2, 3]
    assert [v.version for v in listed] == [2, 1, 1, 1]
    assert all(isinstance(v, Variable) for v in listed)


def test_list_empty(ctx: Context) -> None:
    assert Variables.list(ctx) == []


def test_delete_and_exists(ctx: Context) -> None:
    Variables.defvariable(ctx, "a", "integer", 1)
    Variables.defvariable(ctx, "b", "integer", 2)
    assert Variables.exists(ctx, "a")
    assert not Variables.exists(ctx, "nope")
    Variables.delete(ctx, "a")
    assert not Variables.exists(ctx, "a")
    assert names(ctx) == ["b"]
    with pytest.raises(VariableNotFoundError):
        Variables.get(ctx, "a")
    with pytest.raises(VariableNotFoundError):
        Variables.delete(ctx, "a")
    Variables.defvariable(ctx, "a", "string", "again")
    assert snapshot(ctx, "a") == ("again", 1)
    assert names(ctx) == ["b", "a"]


def test_duplicate_name(ctx: Context) -> None:
    Variables.defvariable(ctx, "x", "integer", 1)
    with pytest.raises(VariableExistsError) as info:
        Variables.defvariable(ctx, "x", "string", "other")
    assert "x" in str(info.value)
    assert snapshot(ctx, "x") == (1, 1)
    assert Variables.get_variable(ctx, "x").type == "integer"
    assert names(ctx) == ["x"]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("type_", "constraints", "initial", "accepted", "bad", "rule"),
    VIOLATIONS,
    ids=[f"{v[0]}-{v[5]}-{i}" for i, v in enumerate(VIOLATIONS)],
)
def test_constraint_violation_leaves_value_unchanged(
    ctx: Context, type_: str, constraints: dict[str, Any], initial: Any, accepted: Any, bad: Any, rule: str
) -> None:
    Variables.defvariable(ctx, "v", type_, initial, constraints=constraints)
    Variables.set(ctx, "v", accepted)
    before = snapshot(ctx, "v")
    with pytest.raises(ValidationError) as info:
        Variables.set(ctx, "v", bad)
    assert "v" in str(info.value)
    assert rule in str(info.value)
    with pytest.raises(ValidationError):
        Variables.set(ctx, "v", bad, expected_version=before[1])
    assert snapshot(ctx, "v") == before


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "partial"])
@pytest.mark.parametrize(
    ("type_", "constraints", "initial", "accepted", "bad", "rule"),
    VIOLATIONS,
    ids=[f"{v[0]}-{v[5]}-{i}" for i, v in enumerate(VIOLATIONS)],
)
def test_batch_with_a_rejected_value_reports_it_per_entry(
    ctx: Context,
    atomic: bool,
    type_: str,
    constraints: dict[str, Any],
    initial: Any,
    accepted: Any,
    bad: Any,
    rule: str,
) -> None:
    Variables.defvariable(ctx, "v", type_, initial, constraints=constraints)
    Variables.defvariable(ctx, "other", "integer", 0)
    before = snapshot(ctx, "v")
    with pytest.raises(BatchUpdateError) as info:
        Variables.update_many(ctx, {"other": 1, "v": bad}, atomic=atomic)
    assert set(info.value.errors) == {"v"}
    assert isinstance(info.value.errors["v"], ValidationError)
    assert rule in str(info.value.errors["v"])
    assert info.value.new_versions == ({} if atomic else {"other": 2})
    assert snapshot(ctx, "v") == before
    assert snapshot(ctx, "other") == ((0, 1) if atomic else (1, 2))


@pytest.mark.parametrize(
    ("type_", "constraints", "initial", "accepted", "bad", "rule"),
    VIOLATIONS,
    ids=[f"{v[0]}-{v[5]}-{i}" for i, v in enumerate(VIOLATIONS)],
)
def test_invalid_initial_value_defines_nothing(
    ctx: Context, type_: str, constraints: dict[str, Any], initial: Any, accepted: Any, bad: Any, rule: str
) -> None:
    with pytest.raises(ValidationError):
        Variables.defvariable(ctx, "v", type_, bad, constraints=constraints)
    assert not Variables.exists(ctx, "v")
    assert names(ctx) == []


def test_error_text_names_variable_rule_and_value(ctx: Context) -> None:
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    with pytest.raises(ValidationError) as info:
        Variables.set(ctx, "temperature", 2.5)
    assert "temperature: 2.5 is above the maximum 2.0" in str(info.value)
    assert "max" in str(info.value)


@pytest.mark.parametrize(
    ("name", "type_", "value", "constraints"),
    [
        ("9bad", "integer", 1, None),
        ("has space", "integer", 1, None),
        ("ok", "complex", 1, None),
        ("ok", "float", 1.0, {"min": 2.0, "max": 1.0}),
        ("ok", "float", 1.0, {"minimum": 0}),
        ("ok", "string", "x", {"pattern": "("}),
        ("ok", "choice", "a", {"choices": []}),
        ("ok", "choice", "a", None),
        ("ok", "integer", 1, {"min": "zero"}),
    ],
    ids=["digit-first", "space", "type", "min>max", "unknown-key", "pattern", "empty-choices", "no-choices", "bound"],
)
def test_bad_definitions_define_nothing(ctx: Context, name: str, type_: str, value: Any, constraints: Any) -> None:
    with pytest.raises(ValidationError):
        Variables.defvariable(ctx, name, type_, value, constraints=constraints)
    assert names(ctx) == []


@pytest.mark.parametrize("metadata", [{"a": None}, {"a": [1]}, {"a": {"b": "c"}}])
def test_bad_metadata(ctx: Context, metadata: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Variables.defvariable(ctx, "x", "integer", 1, metadata=metadata)
    assert names(ctx) == []
    Variables.defvariable(ctx, "x", "integer", 1)
    with pytest.raises(ValidationError):
        Variables.set(ctx, "x", 2, metadata=metadata)
    assert snapshot(ctx, "x") == (1, 1)


def test_versions_count_every_accepted_write(ctx: Context) -> None:
    Variables.defvariable(ctx, "x", "integer", 0, constraints={"max": 100})
    Variables.set(ctx, "x", 1)
    Variables.update(ctx, "x", lambda n: n + 1)
    Variables.update_many(ctx, {"x": 5})
    with pytest.raises(ValidationError):
        Variables.set(ctx, "x", 1000)
    with pytest.raises(VersionConflictError):
        Variables.set(ctx, "x", 6, expected_version=1)
    assert snapshot(ctx, "x") == (5, 4)


def test_contexts_are_isolated(make_ctx: Callable[[], Context]) -> None:
    first, second = make_ctx(), make_ctx()
    assert first.id != second.id
    Variables.defvariable(first, "x", "integer", 1)
    Variables.defvariable(second, "x", "integer", 2)
    assert Variables.get(first, "x") == 1
    assert Variables.get(second, "x") == 2
    Variables.delete(first, "x")
    assert Variables.get(second, "x") == 2


def test_stopped_context_refuses_use(make_ctx: Callable[[], Context]) -> None:
    ctx = make_ctx()
    Variables.defvariable(ctx, "x", "integer", 1)
    ctx.stop()
    ctx.stop()
    with pytest.raises(DSPexError):
        Variables.get(ctx, "x")
    with pytest.raises(DSPexError):
        Variables.set(ctx, "x", 2)


def test_backend_report(ctx: Context, backend: str) -> None:
    info = ctx.get_backend()
    assert info.type == ("local" if backend == "local" else "bridged")
    assert info.switches == (0 if backend == "local" else 1)
    assert "cas" in info.capabilities
    assert "atomic_batch" in info.capabilities
    if backend == "local":
        assert ctx.bridge_address is None
    else:
        assert ctx.bridge_address is not None
        assert ":" in ctx.bridge_address


# ------------------------------------------------------------------ identifiers and bounds (once divergences)


@pytest.mark.parametrize("name", ["", None], ids=["empty", "none"])
def test_an_impossible_name_is_a_validation_error(ctx: Context, name: Any) -> None:
    with pytest.raises(ValidationError) as info:
        Variables.get(ctx, name, "fallback")
    assert info.value.rule == "identifier"
    with pytest.raises(ValidationError):
        Variables.delete(ctx, name)
    assert Variables.exists(ctx, "") is False


def test_the_id_from_defvariable_reads_the_variable(ctx: Context) -> None:
    var_id = Variables.defvariable(ctx, "a", "integer", 1)
    assert Variables.get(ctx, var_id) == 1
    assert Variables.set(ctx, var_id, 2) == 2
    assert Variables.get(ctx, "a") == 2
    assert Variables.exists(ctx, var_id)
    assert Variables.get_many(ctx, [var_id]) == {var_id: 2}


def test_an_infinite_bound_is_rejected(ctx: Context) -> None:
    with pytest.raises(ValidationError) as info:
        Variables.defvariable(ctx, "x", "float", 1.0, constraints={"min": -math.inf, "max": math.inf})
    assert info.value.rule == "constraints"
    assert not Variables.exists(ctx, "x")
