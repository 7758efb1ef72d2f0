"""Constraints compiled on pydantic: strict adapters, JSON Schemas, linear-time full-match patterns."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
from pydantic import TypeAdapter

from dspex_dspy.errors import ValidationError
from dspex_dspy.types import Variable, compile_spec

pytestmark = pytest.mark.unit


def test_every_spec_compiles_to_strict_pydantic_adapters() -> None:
    spec = compile_spec("t", "float", {"min": 0.0, "max": 2.0})
    assert all(isinstance(a, TypeAdapter) for a in spec.compiled.adapters)
    assert spec.compiled.validators, "a constrained spec is checked by pydantic"
    assert spec.json_schema() == {"type": "number", "minimum": 0.0, "maximum": 2.0}
    assert compile_spec("x", "integer").compiled.validators == ()  # nothing to check beyond the type


SCHEMAS: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = [
    ("float", {"min": 0.0, "max": 2.0}, {"type": "number", "minimum": 0.0, "maximum": 2.0}),
    ("integer", {"min": 1, "max": 4096}, {"type": "integer", "minimum": 1, "maximum": 4096}),
    ("string", {"min_length": 2, "max_length": 5}, {"type": "string", "minLength": 2, "maxLength": 5}),
    ("string", {"pattern": "[A-Z]+"}, {"type": "string", "pattern": "^(?:[A-Z]+)$"}),
    ("string", {"enum": ["red", "green"]}, {"type": "string", "enum": ["red", "green"]}),
    ("boolean", None, {"type": "boolean"}),
    ("choice", {"choices": ["fast", "accurate"]}, {"type": "string", "enum": ["fast", "accurate"]}),
    ("module", {"allowed_modules": ["Predict"]}, {"type": "string", "const": "Predict"}),
    ("module", None, {"type": "string"}),
    ("embedding", {"dimensions": 3}, {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}),
]


@pytest.mark.parametrize(("type_", "constraints", "expected"), SCHEMAS)
def test_json_schema_of_each_type(type_: str, constraints: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    var = Variable("var_v_1", "v", type_, None, constraints or {}, description="what it is")
    schema = var.json_schema()
    assert schema.pop("title") == "v"
    assert schema.pop("description") == "what it is"
    assert schema == expected


def test_tensor_schema_names_shape_and_data() -> None:
    schema = Variable("var_w_1", "w", "tensor", None, {"shape": [2, None]}).json_schema()
    assert set(schema["properties"]) == {"shape", "data"}
    assert schema["x-shape"] == [2, None]


def test_enum_with_other_string_constraints_keeps_the_rule_order() -> None:
    spec = compile_spec("c", "string", {"min_length": 3, "enum": ["red", "green"]})
    assert spec.validate("red") == "red"
    with pytest.raises(ValidationError) as short:
        spec.validate("re")
    assert short.value.rule == "min_length"
    with pytest.raises(ValidationError) as other:
        spec.validate("blue")
    assert other.value.rule == "enum"
    assert str(other.value) == "c: 'blue' is not one of ['red', 'green'] (rule enum)"
    assert spec.json_schema() == {"type": "string", "minLength": 3, "enum": ["red", "green"]}


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("(a+)+$", "a" * 50_000 + "!"),
        ("(x+x+)+y", "x" * 50_000),
        ("(a|aa)+$", "a" * 50_000 + "b"),
        ("(.*a){20}", "a" * 5_000 + "b"),
    ],
)
def test_hostile_patterns_finish(pattern: str, value: str) -> None:
    # A backtracking engine would not return for years on these; the Rust engine is linear.
    spec = compile_spec("h", "string", {"pattern": pattern})
    with pytest.raises(ValidationError) as info:
        spec.validate(value)
    assert info.value.rule == "pattern"
    assert f"does not match the pattern {pattern!r}" in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "accepted", "rejected"),
    [
        ("a|ab", ["a", "ab"], ["abc", "b", ""]),
        ("[0-9]+", ["123"], ["12a", "a12", "1\n"]),
        ("^x$", ["x"], ["x\n", "xx"]),
        ("(?i)abc", ["ABC", "abc"], ["abcd"]),
    ],
)
def test_patterns_match_the_whole_string(pattern: str, accepted: list[str], rejected: list[str]) -> None:
    spec = compile_spec("p", "string", {"pattern": pattern})
    for value in accepted:
        assert spec.validate(value) == value
    for value in rejected:
        with pytest.raises(ValidationError):
            spec.validate(value)


@pytest.mark.parametrize("pattern", ["(a)\\1", "(?=a)a", "(?<!b)a", "("])
def test_patterns_a_linear_engine_cannot_run_are_refused_at_definition(pattern: str) -> None:
    with pytest.raises(ValidationError) as info:
        compile_spec("p", "string", {"pattern": pattern})
    assert info.value.rule == "constraints"
    assert "does not compile" in str(info.value)


def test_infinities_need_no_range_but_a_range_needs_finite_numbers() -> None:
    assert compile_spec("f", "float").validate(math.inf) == math.inf
    assert compile_spec("f", "float", {"min": 0.0}).validate(1e308) == 1e308
    with pytest.raises(ValidationError) as above:
        compile_spec("f", "float", {"max": 1.0}).validate(math.inf)
    assert (above.value.rule, str(above.value)) == ("max", "f: inf is above the maximum 1.0 (rule max)")
    with pytest.raises(ValidationError) as below:
        compile_spec("f", "float", {"min": 0.0}).validate(-math.inf)
    assert below.value.rule == "min"
    with pytest.raises(ValidationError) as unbounded_side:
        compile_spec("f", "float", {"min": 0.0}).validate(math.inf)
    assert unbounded_side.value.rule == "range"


def test_integer_bounds_given_as_fractions() -> None:
    spec = compile_spec("n", "integer", {"min": 0.5, "max": 2.5})
    assert spec.validate(1) == 1 and spec.validate(2) == 2
    with pytest.raises(ValidationError, match=r"n: 0 is below the minimum 0\.5 \(rule min\)"):
        spec.validate(0)
    with pytest.raises(ValidationError, match=r"n: 3 is above the maximum 2\.5 \(rule max\)"):
        spec.validate(3)


def test_the_types_layer_no_longer_needs_re2() -> None:
    code = "import sys, dspex_dspy, dspex_dspy.store, dspex_dspy.state, dspex_dspy.types; print('re2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
