"""Properties: wire round-trips, range constraints, values and constraints surviving a switch, and a
stateful model check of random operation sequences (define, set, CAS, batch, delete, switch).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dspex_dspy import Context, Variables
from dspex_dspy.errors import (
    BatchUpdateError,
    DSPexError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.types import compile_spec, decode_value, encode_value

pytestmark = pytest.mark.property

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_float = st.floats(allow_nan=True, allow_infinity=True)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)


@st.composite
def tensors(draw: st.DrawFn, elements: st.SearchStrategy[float] = any_float) -> dict[str, Any]:
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    size = math.prod(shape)
    return {"shape": shape, "data": draw(st.lists(elements, min_size=size, max_size=size))}


def typed_values(elements: st.SearchStrategy[float] = any_float) -> st.SearchStrategy[tuple[str, Any]]:
    """(type, already-normalised value) for every variable type."""
    return st.one_of(
        st.tuples(st.just("float"), elements),
        st.tuples(st.just("integer"), st.integers(-(2**63), 2**63 - 1)),
        st.tuples(st.just("string"), st.text(max_size=50)),
        st.tuples(st.just("boolean"), st.booleans()),
        st.tuples(st.just("choice"), st.text(min_size=1, max_size=10)),
        st.tuples(st.just("module"), st.sampled_from(["Predict", "ChainOfThought", "ReAct"])),
        st.tuples(st.just("embedding"), st.lists(elements, max_size=8)),
        st.tuples(st.just("tensor"), tensors(elements)),
    )


def constraints_for(type_: str, value: Any) -> dict[str, Any] | None:
    return {"choices": [value]} if type_ == "choice" else None


def same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (and types of numbers must match)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------ wire encoding


@SETTINGS
@given(typed_values())
def test_encode_decode_round_trips_every_type(typed: tuple[str, Any]) -> None:
    type_, value = typed
    url, data = encode_value(type_, value)
    decoded = decode_value(url, data)
    normalised = compile_spec("v", type_, constraints_for(type_, value)).validate(decoded)
    assert same(normalised, value)


@SETTINGS
@given(typed_values())
@example(("float", math.nan))
@example(("float", -math.inf))
@example(("float", -0.0))
@example(("integer", -(2**63)))
@example(("boolean", False))
def test_a_value_travels_as_the_json_encoder_writes_it(typed: tuple[str, Any]) -> None:
    """The scalar fast paths spell a value byte for byte as the general encoder does."""
    import json

    type_, value = typed
    payload = (
        {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(repr(value), value) if type_ == "float" else value
    )
    if type_ in ("float", "integer", "boolean", "string", "choice", "module"):
        expected = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        assert encode_value(type_, value) == ("type.googleapis.com/snakepit." + type_, expected)


@SETTINGS
@given(st.sampled_from([math.nan, math.inf, -math.inf]), st.lists(any_float, max_size=5))
def test_special_floats_round_trip(special: float, rest: list[float]) -> None:
    assert same(decode_value(*encode_value("float", special)), special)
    vector = [special, *rest]
    assert same(decode_value(*encode_value("embedding", vector)), vector)


# ------------------------------------------------------------------ range constraints


@st.composite
def integer_ranges(draw: st.DrawFn) -> tuple[int, int, int, int]:
    lo = draw(st.integers(-1000, 1000))
    hi = draw(st.integers(lo + 1, lo + 1000))
    inside = draw(st.integers(lo, hi))
    outside = draw(st.one_of(st.integers(hi + 1, hi + 1000), st.integers(lo - 1000, lo - 1)))
    return lo, hi, inside, outside


@st.composite
def float_ranges(draw: st.DrawFn) -> tuple[float, float, float, float]:
    lo = draw(st.floats(-1e6, 1e6))
    hi = draw(st.floats(-1e6, 1e6).filter(lambda x: x > lo))
    inside = draw(st.floats(lo, hi))
    outside = draw(
        st.one_of(
            st.floats(min_value=hi, exclude_min=True, allow_nan=False),
            st.floats(max_value=lo, exclude_max=True, allow_nan=False),
        )
    )
    return lo, hi, inside, outside


def check_range(bridged: bool, type_: str, lo: Any, hi: Any, inside: Any, outside: Any) -> None:
    with Context() as ctx:
        if bridged:
            ctx.ensure_bridged()
        Variables.defvariable(ctx, "bounded", type_, inside, constraints={"min": lo, "max": hi})
        assert Variables.set(ctx, "bounded", lo) == 2
        assert Variables.set(ctx, "bounded", hi) == 3
        assert Variables.set(ctx, "bounded", inside) == 4
        with pytest.raises(ValidationError) as info:
            Variables.set(ctx, "bounded", outside)
        assert info.value.rule in ("min", "max")
        with pytest.raises(ValidationError):
            Variables.defvariable(ctx, "other", type_, outside, constraints={"min": lo, "max": hi})
        assert Variables.get(ctx, "bounded") == inside
        assert Variables.get_variable(ctx, "bounded").version == 4
        assert not Variables.exists(ctx, "other")


@SETTINGS
@given(integer_ranges(), st.booleans())
def test_integer_range_inside_accepted_outside_rejected(r: tuple[int, int, int, int], bridged: bool) -> None:
    check_range(bridged, "integer", *r)


@SETTINGS
@given(float_ranges(), st.booleans())
def test_float_range_inside_accepted_outside_rejected(r: tuple[float, float, float, float], bridged: bool) -> None:
    check_range(bridged, "float", *r)


# ------------------------------------------------------------------ switching


@SETTINGS
@given(names, typed_values())
def test_values_of_every_type_survive_a_switch(name: str, typed: tuple[str, Any]) -> None:
    type_, value = typed
    with Context() as ctx:
        Variables.defvariable(ctx, name, type_, value, constraints=constraints_for(type_, value))
        before = Variables.get_variable(ctx, name)
        ctx.ensure_bridged()
        after = Variables.get_variable(ctx, name)
        assert same(Variables.get(ctx, name), value)
        assert (after.type, after.version, dict(after.constraints)) == (
            before.type,
            before.version,
            dict(before.constraints),
        )


# (type, constraints, a valid initial value, candidate values to write)
CONSTRAINED = st.one_of(
    st.tuples(st.integers(-50, 50), st.integers(0, 100)).flatmap(
        lambda p: st.tuples(
            st.just("integer"),
            st.just({"min": p[0], "max": p[0] + p[1]}),
            st.just(p[0]),
            st.lists(st.one_of(st.integers(-200, 200), st.floats(-200, 200), st.text(max_size=3)), max_size=8),
        )
    ),
    st.sampled_from(
        [
            ({"pattern": "^[A-Z]+[0-9]+$"}, "ABC123"),
            ({"pattern": "[a-c]*"}, "abc"),
            ({"enum": ["red", "green", "blue"]}, "red"),
            ({"min_length": 1, "max_length": 3}, "ab"),
        ]
    ).flatmap(
        lambda c: st.tuples(
            st.just("string"),
            st.just(c[0]),
            st.just(c[1]),
            st.lists(
                st.one_of(st.text(alphabet="abcABC019 ", max_size=5), st.sampled_from(["red", "ABC123"])), max_size=8
            ),
        )
    ),
    st.tuples(
        st.just("embedding"),
        st.just({"dimensions": 2}),
        st.just([0.0, 0.0]),
        st.lists(st.lists(finite, max_size=3), max_size=5),
    ),
)


def outcomes(ctx: Context, candidates: list[Any]) -> list[Any]:
    """For each candidate: the normalised value it was stored as, or the rule that rejected it."""
    results = []
    for candidate in candidates:
        try:
            Variables.set(ctx, "v", candidate)
        except ValidationError as exc:
            results.append(("rejected", exc.rule, Variables.get(ctx, "v")))
        else:
            results.append(("stored", Variables.get(ctx, "v")))
    return results


@SETTINGS
@given(CONSTRAINED)
def test_constraints_enforced_identically_before_and_after_a_switch(
    case: tuple[str, dict[str, Any], Any, list[Any]],
) -> None:
    type_, constraints, initial, candidates = case
    with Context() as local, Context() as bridged:
        bridged.ensure_bridged()
        for ctx in (local, bridged):
            Variables.defvariable(ctx, "v", type_, initial, constraints=constraints)
        before = outcomes(local, candidates)
        assert outcomes(bridged, candidates) == before
        local.ensure_bridged()
        assert Variables.get(local, "v") == Variables.get(bridged, "v")
        assert outcomes(local, candidates) == outcomes(bridged, candidates)
        assert [o[0] for o in outcomes(local, candidates)] == [o[0] for o in before]


# ------------------------------------------------------------------ stateful model check

POOL = ["a", "b", "c", "d", "e"]
INT_CONSTRAINTS = {"min": 0, "max": 100}
ENUM = ["red", "green", "blue"]


def model_valid(type_: str, value: Any) -> bool:
    if type_ == "integer":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100
    return value in ENUM


def category(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    for cls in (BatchUpdateError, VersionConflictError, VariableExistsError, VariableNotFoundError, ValidationError):
        if isinstance(exc, cls):
            return cls.__name__
    return type(exc).__name__


values = st.one_of(st.integers(-10, 110), st.sampled_from([*ENUM, "purple"]))


class VariablesMachine(RuleBasedStateMachine):
    """Random operations applied to a Context and to a plain dict model must never diverge."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = Context()
        # name -> [type, value, version], in creation order (dicts keep insertion order).
        self.model: dict[str, list[Any]] = {}
        self.switched = False

    def teardown(self) -> None:
        self.ctx.stop()

    def run(self, fn: Any) -> tuple[Any, BaseException | None]:
        try:
            return fn(), None
        except DSPexError as exc:
            return None, exc

    @rule(name=st.sampled_from(POOL), type_=st.sampled_from(["integer", "string"]), value=values)
    def define(self, name: str, type_: str, value: Any) -> None:
        constraints = INT_CONSTRAINTS if type_ == "integer" else {"enum": ENUM}
        _, error = self.run(lambda: Variables.defvariable(self.ctx, name, type_, value, constraints=constraints))
        if name in self.model:
            expected = (
                "VariableExistsError" if model_valid(type_, value) else ("ValidationError", "VariableExistsError")
            )
        elif not model_valid(type_, value):
            expected = "ValidationError"
        else:
            expected = None
            self.model[name] = [type_, value, 1]
        if isinstance(expected, tuple):
            assert category(error) in expected
        else:
            assert category(error) == expected, error

    def _expect_write(self, name: str, value: Any, expected_version: int | None) -> str | None:
        if name not in self.model:
            return "VariableNotFoundError"
        type_, _, version = self.model[name]
        if not model_valid(type_, value):
            return "ValidationError"
        if expected_version and expected_version != version:
            return "VersionConflictError"
        self.model[name] = [type_, value, version + 1]
        return None

    @rule(name=st.sampled_from(POOL), value=values)
    def set(self, name: str, value: Any) -> None:
        result, error = self.run(lambda: Variables.set(self.ctx, name, value))
        assert category(error) == self._expect_write(name, value, None), error
        if error is None:
            assert result == self.model[name][2]

    @rule(name=st.sampled_from(POOL), value=values, offset=st.sampled_from([0, 0, -1, 1, 5]))
    def cas(self, name: str, value: Any, offset: int) -> None:
        expected_version = (self.model[name][2] if name in self.model else 1) + offset
        result, error = self.run(lambda: Variables.set(self.ctx, name, value, expected_version=expected_version))
        assert category(error) == self._expect_write(name, value, expected_version), error
        if error is None:
            assert result == self.model[name][2]

    @rule(
        updates=st.dictionaries(st.sampled_from(POOL), values, min_size=1, max_size=4),
        atomic=st.booleans(),
    )
    def batch(self, updates: dict[str, Any], atomic: bool) -> None:
        result, error = self.run(lambda: Variables.update_many(self.ctx, updates, atomic=atomic))
        bad = {n for n, v in updates.items() if n not in self.model or not model_valid(self.model[n][0], v)}
        applied: dict[str, int] = {}
        if not (atomic and bad):
            for name, value in updates.items():
                if name not in bad:
                    self.model[name] = [self.model[name][0], value, self.model[name][2] + 1]
                    applied[name] = self.model[name][2]
        if bad:
            assert isinstance(error, BatchUpdateError), error
            assert set(error.errors) == bad
            assert error.new_versions == applied
        else:
            assert error is None, error
            assert result == applied

    @rule(name=st.sampled_from(POOL))
    def delete(self, name: str) -> None:
        _, error = self.run(lambda: Variables.delete(self.ctx, name))
        if name in self.model:
            assert error is None, error
            del self.model[name]
        else:
            assert category(error) == "VariableNotFoundError"

    @precondition(lambda self: not self.switched)
    @rule()
    def switch(self) -> None:
        self.ctx.ensure_bridged()
        self.switched = True
        assert self.ctx.get_backend().type == "bridged"

    @invariant()
    def agrees_with_the_model(self) -> None:
        listed = Variables.list(self.ctx)
        assert [v.name for v in listed] == list(self.model)
        assert [(v.value, v.version) for v in listed] == [(m[1], m[2]) for m in self.model.values()]
        for name in POOL:
            assert Variables.exists(self.ctx, name) == (name in self.model)
        assert self.ctx.get_backend().type == ("bridged" if self.switched else "local")


VariablesMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestVariablesMachine = VariablesMachine.TestCase


times = st.one_of(finite, st.integers(-(2**53), 2**53))


@SETTINGS
@given(
    name=st.text(),
    description=st.text(),
    constraints=st.dictionaries(st.text(), st.one_of(finite, st.integers(), st.text(), st.lists(st.text()))),
    typed=typed_values(),
    created_at=times,
    updated_at=times,
    source=st.text(),
    metadata=st.dictionaries(st.text(), st.text()),
)
def test_redis_records_are_the_json_the_encoder_writes(
    name: str,
    description: str,
    constraints: dict[str, Any],
    typed: tuple[str, Any],
    created_at: float,
    updated_at: float,
    source: str,
    metadata: dict[str, str],
) -> None:
    """The definition, state and metadata records, spelled out from their parts, are byte for byte
    what the general JSON encoder writes for the same values (so every reader of the records reads them)."""
    import json

    from dspex_dspy.store import redis_storage
    from dspex_dspy.store.storage import NewVariable

    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
    type_, value = typed
    new = NewVariable(name, type_, value, constraints, description)
    assert redis_storage._definition(new, created_at) == encoder.encode(
        [name, type_, constraints, description, created_at]
    )
    value_json = encode_value(type_, value)[1].decode()
    assert redis_storage._state(type_, value, updated_at, source) == encoder.encode([value_json, updated_at, source])
    assert redis_storage._text_map(metadata) == encoder.encode(metadata)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, "1", None])
def test_a_redis_record_refuses_a_time_that_is_not_a_finite_number(bad: Any) -> None:
    from dspex_dspy.store import redis_storage

    with pytest.raises(ValueError, match="finite number"):
        redis_storage._state("integer", 1, bad, "orchestrator")


@SETTINGS
@given(mapping=st.dictionaries(st.text(), st.text()))
def test_map_bytes_counts_the_utf8_bytes_of_keys_and_values(mapping: dict[str, str]) -> None:
    """The limits count a map's size as its keys' and values' UTF-8 bytes (lone surrogates included)."""
    from dspex_dspy.store.storage import map_bytes

    expected = sum(
        len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass")) for k, v in mapping.items()
    )
    assert map_bytes(mapping) == expected
