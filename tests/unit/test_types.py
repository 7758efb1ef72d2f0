"""Variable types: normalisation, every constraint, constraint checking, error texts, wire encoding."""

from __future__ import annotations

import math
from typing import Any

import pytest

from dspex_dspy.errors import DSPexError, ValidationError
from dspex_dspy.types import (
    MAX_NAME_LENGTH,
    MAX_PATTERN_LENGTH,
    TYPE_URL_PREFIX,
    VARIABLE_TYPES,
    Variable,
    compile_spec,
    decode_constraints,
    decode_value,
    encode_constraints,
    encode_value,
    normalize_metadata,
    type_from_url,
    validate_name,
)

pytestmark = pytest.mark.unit


def validate(type_: str, value: Any, constraints: dict[str, Any] | None = None, name: str = "v") -> Any:
    return compile_spec(name, type_, constraints).validate(value)


def rejected(type_: str, value: Any, constraints: dict[str, Any] | None = None, name: str = "v") -> ValidationError:
    spec = compile_spec(name, type_, constraints)
    with pytest.raises(ValidationError) as info:
        spec.validate(value)
    return info.value


def bad_constraints(type_: str, constraints: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        compile_spec("v", type_, constraints)
    assert info.value.rule == "constraints"
    return info.value


def test_the_eight_types() -> None:
    assert VARIABLE_TYPES == ("float", "integer", "string", "boolean", "choice", "module", "embedding", "tensor")


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        compile_spec("v", "complex")
    assert info.value.rule == "type"
    assert "complex" in str(info.value)


# ------------------------------------------------------------------ float


class TestFloat:
    def test_int_becomes_float(self) -> None:
        out = validate("float", 1)
        assert out == 1.0
        assert type(out) is float

    def test_float_kept(self) -> None:
        assert validate("float", 0.7) == 0.7

    def test_special_floats_allowed_without_range(self) -> None:
        assert math.isnan(validate("float", math.nan))
        assert validate("float", math.inf) == math.inf
        assert validate("float", -math.inf) == -math.inf

    @pytest.mark.parametrize("value", [True, False, "0.5", None, [0.5], {"x": 1}])
    def test_non_numbers_rejected(self, value: Any) -> None:
        error = rejected("float", value)
        assert error.rule == "type"
        assert error.value is value

    def test_min_and_max(self) -> None:
        c = {"min": 0.0, "max": 2.0}
        assert validate("float", 0.0, c) == 0.0
        assert validate("float", 2.0, c) == 2.0
        assert validate("float", 1, c) == 1.0
        assert rejected("float", -0.1, c).rule == "min"
        assert rejected("float", 2.5, c).rule == "max"

    def test_error_text_names_variable_rule_and_value(self) -> None:
        error = rejected("float", 2.5, {"min": 0.0, "max": 2.0}, name="temperature")
        assert "temperature: 2.5 is above the maximum 2.0" in str(error)
        assert "max" in str(error)
        assert (error.variable, error.rule, error.value) == ("temperature", "max", 2.5)
        error = rejected("float", -1.5, {"min": 0.0}, name="temperature")
        assert "temperature: -1.5 is below the minimum 0.0" in str(error)

    def test_nan_rejected_when_a_range_is_set(self) -> None:
        assert rejected("float", math.nan, {"min": 0.0}).variable == "v"
        assert rejected("float", math.inf, {"max": 1.0}).rule == "max"

    def test_huge_int_is_a_validation_error(self) -> None:
        rejected("float", 10**400)


# ------------------------------------------------------------------ integer


class TestInteger:
    def test_int_kept(self) -> None:
        assert validate("integer", 42) == 42

    def test_whole_float_becomes_int(self) -> None:
        out = validate("integer", 512.0)
        assert out == 512
        assert type(out) is int

    @pytest.mark.parametrize("value", [10.5, math.nan, math.inf, -math.inf, True, "42", None])
    def test_non_integers_rejected(self, value: Any) -> None:
        assert rejected("integer", value).rule == "type"

    def test_min_and_max(self) -> None:
        c = {"min": 1, "max": 4096}
        assert validate("integer", 1, c) == 1
        assert validate("integer", 4096, c) == 4096
        error = rejected("integer", 5000, c, name="max_tokens")
        assert error.rule == "max"
        assert "max_tokens: 5000 is above the maximum 4096" in str(error)
        assert rejected("integer", 0, c).rule == "min"

    def test_float_bounds_apply_to_integers(self) -> None:
        assert rejected("integer", 0, {"min": 0.5}).rule == "min"
        assert validate("integer", 1, {"min": 0.5}) == 1


# ------------------------------------------------------------------ string


class TestString:
    def test_string_kept(self) -> None:
        assert validate("string", "hello") == "hello"
        assert validate("string", "") == ""

    @pytest.mark.parametrize("value", [1, 1.5, True, None, b"bytes", ["a"]])
    def test_non_strings_rejected(self, value: Any) -> None:
        assert rejected("string", value).rule == "type"

    def test_min_length(self) -> None:
        assert validate("string", "ab", {"min_length": 2}) == "ab"
        error = rejected("string", "a", {"min_length": 2}, name="title")
        assert error.rule == "min_length"
        assert str(error).startswith("title: 'a'")

    def test_max_length(self) -> None:
        assert validate("string", "ab", {"max_length": 2}) == "ab"
        error = rejected("string", "abc", {"max_length": 2}, name="title")
        assert error.rule == "max_length"
        assert "'abc'" in str(error)

    def test_enum(self) -> None:
        c = {"enum": ["red", "green", "blue"]}
        assert validate("string", "green", c) == "green"
        error = rejected("string", "yellow", c, name="colour")
        assert error.rule == "enum"
        assert "colour" in str(error)
        assert "'yellow'" in str(error)

    def test_pattern_is_a_full_match(self) -> None:
        c = {"pattern": "^[A-Z]+[0-9]+$"}
        assert validate("string", "ABC123", c) == "ABC123"
        error = rejected("string", "ABC123x", c, name="code")
        assert error.rule == "pattern"
        assert "code" in str(error)
        assert "'ABC123x'" in str(error)

    def test_unanchored_pattern_still_matches_the_whole_string(self) -> None:
        assert rejected("string", "ABC1", {"pattern": "[A-Z]+"}).rule == "pattern"
        assert rejected("string", "xABC", {"pattern": "[A-Z]+"}).rule == "pattern"
        assert validate("string", "ABC", {"pattern": "[A-Z]+"}) == "ABC"
        assert validate("string", "ab", {"pattern": "a|ab"}) == "ab"

    def test_trailing_newline_is_not_matched_by_dollar(self) -> None:
        assert rejected("string", "a\n", {"pattern": "a$"}).rule == "pattern"

    def test_hostile_pattern_and_value_finish(self) -> None:
        # A backtracking engine would never return; RE2 is linear, so this simply completes.
        error = rejected("string", "a" * 50_000 + "b", {"pattern": "(a+)+$"})
        assert error.rule == "pattern"
        assert len(str(error)) < 500, "the error text shows a shortened value"

    def test_constraints_combine(self) -> None:
        c = {"min_length": 2, "max_length": 4, "pattern": "[a-z]+"}
        assert validate("string", "abc", c) == "abc"
        assert rejected("string", "a", c).rule == "min_length"
        assert rejected("string", "abcde", c).rule == "max_length"
        assert rejected("string", "AB", c).rule == "pattern"


# ------------------------------------------------------------------ boolean


class TestBoolean:
    @pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("true", True), ("false", False)])
    def test_accepted(self, value: Any, expected: bool) -> None:
        assert validate("boolean", value) is expected

    @pytest.mark.parametrize(("value", "expected"), [("TRUE", True), (" False ", False)])
    def test_text_is_case_and_space_insensitive(self, value: str, expected: bool) -> None:
        assert validate("boolean", value) is expected

    @pytest.mark.parametrize("value", [1, 0, "yes", "", None, 1.0])
    def test_others_rejected(self, value: Any) -> None:
        assert rejected("boolean", value).rule == "type"

    def test_has_no_constraints(self) -> None:
        assert "none" in str(bad_constraints("boolean", {"min": 0}))


# ------------------------------------------------------------------ choice / module


class TestChoice:
    def test_choices(self) -> None:
        c = {"choices": ["fast", "accurate"]}
        assert validate("choice", "fast", c) == "fast"
        error = rejected("choice", "slow", c, name="mode")
        assert error.rule == "choices"
        assert "mode" in str(error)
        assert "'slow'" in str(error)

    def test_non_string_rejected(self) -> None:
        assert rejected("choice", 1, {"choices": ["a"]}).rule == "type"

    def test_choices_required(self) -> None:
        bad_constraints("choice", None)
        bad_constraints("choice", {})

    def test_empty_choices_rejected(self) -> None:
        assert "choices" in str(bad_constraints("choice", {"choices": []}))


class TestModule:
    def test_any_name_without_constraint(self) -> None:
        assert validate("module", "ChainOfThought") == "ChainOfThought"

    def test_allowed_modules(self) -> None:
        c = {"allowed_modules": ["Predict", "ChainOfThought"]}
        assert validate("module", "Predict", c) == "Predict"
        error = rejected("module", "ReAct", c, name="strategy")
        assert error.rule == "allowed_modules"
        assert "strategy" in str(error)
        assert "'ReAct'" in str(error)

    def test_non_string_rejected(self) -> None:
        assert rejected("module", 3).rule == "type"


# ------------------------------------------------------------------ embedding


class TestEmbedding:
    def test_list_of_numbers(self) -> None:
        out = validate("embedding", [1, 2.5, -3])
        assert out == [1.0, 2.5, -3.0]
        assert all(type(x) is float for x in out)

    def test_tuple_accepted(self) -> None:
        assert validate("embedding", (0.1, 0.2)) == [0.1, 0.2]

    @pytest.mark.parametrize("value", [[1, "a"], [True], "abc", 1.0, None, [[1.0]]])
    def test_non_vectors_rejected(self, value: Any) -> None:
        assert rejected("embedding", value).rule == "type"

    def test_dimensions(self) -> None:
        assert validate("embedding", [0.0, 0.0, 0.0], {"dimensions": 3}) == [0.0, 0.0, 0.0]
        error = rejected("embedding", [1.0, 2.0], {"dimensions": 3}, name="vec")
        assert error.rule == "dimensions"
        assert "vec" in str(error)
        assert "2" in str(error)

    def test_zero_dimensions_rejected(self) -> None:
        bad_constraints("embedding", {"dimensions": 0})


# ------------------------------------------------------------------ tensor


class TestTensor:
    def test_flat_form(self) -> None:
        assert validate("tensor", {"shape": [2, 2], "data": [1, 2, 3, 4]}) == {
            "shape": [2, 2],
            "data": [1.0, 2.0, 3.0, 4.0],
        }

    def test_nested_data_in_the_object(self) -> None:
        assert validate("tensor", {"shape": [2, 2], "data": [[1, 2], [3, 4]]}) == {
            "shape": [2, 2],
            "data": [1.0, 2.0, 3.0, 4.0],
        }

    def test_nested_list(self) -> None:
        assert validate("tensor", [[1, 2, 3], [4, 5, 6]]) == {"shape": [2, 3], "data": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}

    def test_scalar_tensor(self) -> None:
        assert validate("tensor", {"shape": [], "data": [5]}) == {"shape": [], "data": [5.0]}

    def test_size_checked(self) -> None:
        error = rejected("tensor", {"shape": [2, 2], "data": [1, 2, 3]}, name="weights")
        assert error.rule == "shape"
        assert "weights" in str(error)
        assert "4" in str(error)
        assert "3" in str(error)

    def test_nested_data_must_match_the_shape(self) -> None:
        assert rejected("tensor", {"shape": [2], "data": [[1], [2]]}).rule == "shape"

    def test_ragged_rejected(self) -> None:
        assert rejected("tensor", [[1, 2], [3]]).rule == "shape"
        assert rejected("tensor", {"shape": [2, 1], "data": [[1], 2]}).rule == "shape"

    @pytest.mark.parametrize(
        "value",
        [
            {"shape": [2]},
            {"shape": [1], "data": [1], "dtype": "f32"},
            "tensor",
            3.0,
            {"shape": [1], "data": ["a"]},
        ],
    )
    def test_malformed_rejected(self, value: Any) -> None:
        assert rejected("tensor", value).rule in ("type", "shape")

    @pytest.mark.parametrize("shape", [[-1], [1.5], "2", [True]])
    def test_bad_shape_rejected(self, shape: Any) -> None:
        assert rejected("tensor", {"shape": shape, "data": [1.0]}).rule in ("shape", "type")

    def test_shape_constraint(self) -> None:
        c = {"shape": [None, 2]}
        assert validate("tensor", [[1, 2], [3, 4], [5, 6]], c)["shape"] == [3, 2]
        assert rejected("tensor", [[1, 2, 3]], c).rule == "shape"
        assert rejected("tensor", [1, 2], c).rule == "shape"

    def test_exact_shape_constraint(self) -> None:
        assert rejected("tensor", [[1], [2]], {"shape": [2]}).rule == "shape"

    def test_bad_shape_constraint(self) -> None:
        bad_constraints("tensor", {"shape": "ab"})
        bad_constraints("tensor", {"shape": [-1]})


# ------------------------------------------------------------------ constraint definitions


class TestConstraintDefinitions:
    @pytest.mark.parametrize(
        ("type_", "constraints"),
        [
            ("float", {"minimum": 0}),
            ("integer", {"pattern": "x"}),
            ("string", {"min": 0}),
            ("choice", {"choices": ["a"], "enum": ["a"]}),
            ("module", {"choices": ["a"]}),
            ("embedding", {"shape": [2]}),
            ("tensor", {"dimensions": 2}),
        ],
    )
    def test_unknown_key(self, type_: str, constraints: dict[str, Any]) -> None:
        error = bad_constraints(type_, constraints)
        assert "unknown constraint" in str(error)

    def test_min_greater_than_max(self) -> None:
        error = bad_constraints("float", {"min": 2.0, "max": 1.0})
        assert "min" in str(error)
        assert "max" in str(error)
        bad_constraints("integer", {"min": 10, "max": 1})

    def test_min_equal_to_max_allowed(self) -> None:
        assert validate("integer", 5, {"min": 5, "max": 5}) == 5

    def test_min_length_greater_than_max_length(self) -> None:
        bad_constraints("string", {"min_length": 3, "max_length": 2})

    @pytest.mark.parametrize("bound", ["1", None, math.nan, True, [1]])
    def test_bounds_must_be_numbers(self, bound: Any) -> None:
        bad_constraints("float", {"min": bound})

    @pytest.mark.parametrize("length", [-1, 1.5, "2", True])
    def test_lengths_must_be_non_negative_integers(self, length: Any) -> None:
        bad_constraints("string", {"max_length": length})

    @pytest.mark.parametrize("pattern", ["(", "[a-", "(a)\\1", "a{2,1}"])
    def test_pattern_that_does_not_compile(self, pattern: str) -> None:
        error = bad_constraints("string", {"pattern": pattern})
        assert "compile" in str(error)

    def test_pattern_must_be_a_bounded_string(self) -> None:
        bad_constraints("string", {"pattern": 5})
        bad_constraints("string", {"pattern": "a" * (MAX_PATTERN_LENGTH + 1)})
        assert validate("string", "a" * 10, {"pattern": "a*"}) == "a" * 10

    @pytest.mark.parametrize("items", [[], "abc", [1, 2], ["a", "a"], None])
    def test_enum_must_be_a_non_empty_list_of_distinct_strings(self, items: Any) -> None:
        bad_constraints("string", {"enum": items})

    def test_allowed_modules_must_not_be_empty(self) -> None:
        bad_constraints("module", {"allowed_modules": []})

    def test_constraints_must_be_a_mapping(self) -> None:
        bad_constraints("float", [("min", 1)])

    @pytest.mark.parametrize("constraints", [[1], "ab"])
    def test_non_mapping_constraints_are_a_validation_error(self, constraints: Any) -> None:
        bad_constraints("float", constraints)

    def test_spec_keeps_normalised_constraints(self) -> None:
        spec = compile_spec("v", "string", {"enum": ("a", "b"), "pattern": "[ab]"})
        assert spec.constraints == {"enum": ["a", "b"], "pattern": "[ab]"}

    def test_checks_have_readable_reprs(self) -> None:
        spec = compile_spec("v", "float", {"min": 0.0, "max": 2.0})
        text = repr(spec.checks)
        assert "0.0" in text
        assert "2.0" in text


# ------------------------------------------------------------------ names and metadata


class TestNames:
    @pytest.mark.parametrize("name", ["temperature", "_x", "a.b-c_D9", "T", "a" * MAX_NAME_LENGTH])
    def test_valid(self, name: str) -> None:
        assert validate_name(name) == name

    @pytest.mark.parametrize("name", ["", "9lives", "a b", "a\n", "-x", ".x", "é", "a" * (MAX_NAME_LENGTH + 1)])
    def test_invalid(self, name: str) -> None:
        with pytest.raises(ValidationError) as info:
            validate_name(name)
        assert info.value.rule == "name"

    @pytest.mark.parametrize("name", [None, 5, b"x", ["x"]])
    def test_not_a_string(self, name: Any) -> None:
        with pytest.raises(ValidationError) as info:
            validate_name(name)
        assert info.value.rule == "name"


class TestMetadata:
    def test_none_is_empty(self) -> None:
        assert normalize_metadata("v", None) == {}

    def test_scalars_become_strings(self) -> None:
        assert normalize_metadata("v", {"s": "x", "i": 3, "f": 1.5, "t": True, "n": False}) == {
            "s": "x",
            "i": "3",
            "f": "1.5",
            "t": "true",
            "n": "false",
        }

    @pytest.mark.parametrize("meta", [{"a": None}, {"a": [1]}, {"a": {"b": "c"}}, {1: "a"}, ["a"], "a=b"])
    def test_others_rejected(self, meta: Any) -> None:
        with pytest.raises(ValidationError) as info:
            normalize_metadata("v", meta)
        assert info.value.rule == "metadata"
        assert info.value.variable == "v"

    def test_input_not_mutated(self) -> None:
        meta = {"index": 3}
        normalize_metadata("v", meta)
        assert meta == {"index": 3}


# ------------------------------------------------------------------ wire encoding


ROUND_TRIPS: list[tuple[str, Any]] = [
    ("float", 0.7),
    ("float", -0.0),
    ("float", 1e308),
    ("integer", 42),
    ("integer", -(2**62)),
    ("integer", 10**30),
    ("string", 'héllo "quoted" \n'),
    ("string", ""),
    ("boolean", True),
    ("boolean", False),
    ("choice", "fast"),
    ("module", "ChainOfThought"),
    ("embedding", [0.1, -2.0, 3.5]),
    ("embedding", []),
    ("tensor", {"shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}),
    ("tensor", {"shape": [0], "data": []}),
]


class TestWire:
    @pytest.mark.parametrize(("type_", "value"), ROUND_TRIPS)
    def test_round_trip(self, type_: str, value: Any) -> None:
        url, data = encode_value(type_, value)
        assert url == TYPE_URL_PREFIX + type_
        assert isinstance(data, bytes)
        assert decode_value(url, data) == value

    @pytest.mark.parametrize(
        ("value", "text"), [(math.nan, b'"NaN"'), (math.inf, b'"Infinity"'), (-math.inf, b'"-Infinity"')]
    )
    def test_special_floats_travel_as_strings(self, value: float, text: bytes) -> None:
        url, data = encode_value("float", value)
        assert data == text
        decoded = decode_value(url, data)
        assert math.isnan(decoded) if math.isnan(value) else decoded == value

    def test_special_floats_in_vectors(self) -> None:
        url, data = encode_value("embedding", [math.nan, math.inf, -math.inf, 1.0])
        assert data == b'["NaN","Infinity","-Infinity",1.0]'
        out = decode_value(url, data)
        assert math.isnan(out[0])
        assert out[1:] == [math.inf, -math.inf, 1.0]

    def test_special_floats_in_tensors(self) -> None:
        url, data = encode_value("tensor", {"shape": [3], "data": [math.inf, -math.inf, math.nan]})
        out = decode_value(url, data)
        assert out["shape"] == [3]
        assert out["data"][:2] == [math.inf, -math.inf]
        assert math.isnan(out["data"][2])

    def test_nested_tensor_data_decodes_special_floats(self) -> None:
        out = decode_value(TYPE_URL_PREFIX + "tensor", b'{"shape":[1,2],"data":[["Infinity",1]]}')
        assert out == {"shape": [1, 2], "data": [[math.inf, 1]]}
        assert compile_spec("t", "tensor").validate(out) == {"shape": [1, 2], "data": [math.inf, 1.0]}

    def test_encoding_is_compact_utf8_json(self) -> None:
        assert encode_value("string", "é") == (TYPE_URL_PREFIX + "string", b'"\\u00e9"')
        assert encode_value("tensor", {"shape": [1], "data": [1.0]})[1] == b'{"shape":[1],"data":[1.0]}'

    def test_binary_suffix_accepted(self) -> None:
        assert type_from_url(TYPE_URL_PREFIX + "float.binary") == "float"
        assert decode_value(TYPE_URL_PREFIX + "float.binary", b"1.5") == 1.5

    @pytest.mark.parametrize(
        "url", ["", "float", "type.googleapis.com/other.float", TYPE_URL_PREFIX + "floaty", TYPE_URL_PREFIX]
    )
    def test_bad_type_url(self, url: str) -> None:
        with pytest.raises(ValidationError) as info:
            type_from_url(url)
        assert info.value.rule == "encoding"

    @pytest.mark.parametrize("data", [b"{", b"\xff\xfe", b"", b"null", b'"nan"', b'"inf"'])
    def test_bad_payload(self, data: bytes) -> None:
        with pytest.raises(ValidationError) as info:
            decode_value(TYPE_URL_PREFIX + "float", data, name="temperature")
        assert info.value.rule == "encoding"
        assert info.value.variable == "temperature"

    def test_decoded_value_is_validated_separately(self) -> None:
        raw = decode_value(TYPE_URL_PREFIX + "integer", b'"42"')
        assert raw == "42"
        assert rejected("integer", raw).rule == "type"

    def test_constraints_round_trip(self) -> None:
        constraints = {"min": 0.0, "max": 2.0, "enum": ["a"], "shape": [None, 2]}
        assert decode_constraints(encode_constraints(constraints)) == constraints
        assert decode_constraints("") == {}

    @pytest.mark.parametrize("text", ["{", "[1]", '"x"', "1"])
    def test_bad_constraints_json(self, text: str) -> None:
        with pytest.raises(ValidationError) as info:
            decode_constraints(text, name="v")
        assert info.value.rule == "constraints"

    def test_infinite_bounds_are_rejected_so_every_accepted_constraint_encodes(self) -> None:
        with pytest.raises(ValidationError) as info:
            compile_spec("v", "float", {"max": math.inf})
        assert info.value.rule == "constraints"
        spec = compile_spec("v", "float", {"min": -1e308, "max": 1e308})
        assert decode_constraints(encode_constraints(spec.constraints)) == {"min": -1e308, "max": 1e308}


# ------------------------------------------------------------------ Variable record


def test_variable_is_a_frozen_record() -> None:
    var = Variable(id="var_x_1", name="x", type="float", value=1.0)
    assert var.version == 1
    assert var.constraints == {}
    assert var.metadata == {}
    with pytest.raises(AttributeError):
        var.value = 2.0  # type: ignore[misc]


def test_validation_errors_are_dspex_and_value_errors() -> None:
    error = rejected("float", "x")
    assert isinstance(error, DSPexError)
    assert isinstance(error, ValueError)


def test_error_for_a_gigantic_integer_is_a_validation_error() -> None:
    rejected("integer", 10**5000, {"max": 10})
