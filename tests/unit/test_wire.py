"""Wire conversions: values, variables and timestamps (errors: ``test_wire_errors.py``)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from google.protobuf import any_pb2

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import (
    ValidationError,
)
from dspex_dspy.store import VariableUpdate
from dspex_dspy.types import TYPE_URL_PREFIX, Variable, compile_spec
from dspex_dspy.wire import (
    any_to_value,
    from_timestamp,
    proto_to_update,
    proto_to_variable,
    proto_to_versioned,
    timestamp,
    update_to_proto,
    value_to_any,
    value_to_binary,
    variable_to_proto,
)

pytestmark = pytest.mark.unit


def same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN, through lists and dicts."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


VALUES = [
    ("float", 0.7),
    ("float", -1e-300),
    ("float", math.nan),
    ("float", math.inf),
    ("float", -math.inf),
    ("integer", 42),
    ("integer", -(2**62)),
    ("string", 'héllo "quoted" \n ✓'),
    ("string", ""),
    ("boolean", True),
    ("boolean", False),
    ("choice", "fast"),
    ("module", "ChainOfThought"),
    ("embedding", [0.1, -2.0, math.nan, math.inf, -math.inf]),
    ("embedding", []),
    ("tensor", {"shape": [2, 2], "data": [1.0, 2.0, math.nan, -math.inf]}),
    ("tensor", {"shape": [0], "data": []}),
]


@pytest.mark.parametrize(("type_", "value"), VALUES, ids=[f"{t}-{v!r}"[:40] for t, v in VALUES])
def test_every_type_round_trips_through_any(type_: str, value: Any) -> None:
    msg = value_to_any(type_, value)
    assert msg.type_url == TYPE_URL_PREFIX + type_
    decoded = any_to_value(msg, name="x")
    constraints = {"choices": ["fast", "slow"]} if type_ == "choice" else None
    assert same(compile_spec("x", type_, constraints).validate(decoded), value)


def test_special_floats_travel_as_json_strings() -> None:
    assert value_to_any("float", math.nan).value == b'"NaN"'
    assert value_to_any("float", math.inf).value == b'"Infinity"'
    assert value_to_any("embedding", [-math.inf, 1.0]).value == b'["-Infinity",1.0]'


def test_nested_tensor_data_is_accepted_and_normalised_flat() -> None:
    msg = any_pb2.Any(type_url=TYPE_URL_PREFIX + "tensor", value=b'{"shape":[2,2],"data":[[1,2],[3,"NaN"]]}')
    value = compile_spec("t", "tensor").validate(any_to_value(msg, name="t"))
    assert value["shape"] == [2, 2]
    assert value["data"][:3] == [1.0, 2.0, 3.0]
    assert math.isnan(value["data"][3])


@pytest.mark.parametrize(
    ("type_", "value"),
    [("embedding", [1.5, -2.0, math.nan]), ("tensor", {"shape": [2, 3], "data": [1.0, 2, 3, 4, 5, math.inf]})],
)
def test_binary_path_round_trips_little_endian_float64(type_: str, value: Any) -> None:
    msg, data = value_to_binary(type_, value)
    assert msg.type_url.endswith(".binary")
    expected_count = len(value) if type_ == "embedding" else 6
    assert len(data) == 8 * expected_count
    decoded = compile_spec("x", type_).validate(any_to_value(msg, name="x", binary=data))
    assert same(decoded, compile_spec("x", type_).validate(value))


def test_binary_payload_that_does_not_match_its_shape_is_rejected() -> None:
    msg, data = value_to_binary("embedding", [1.0, 2.0])
    with pytest.raises(ValidationError, match="needs 16 bytes"):
        any_to_value(msg, name="e", binary=data[:-1])
    with pytest.raises(ValidationError, match="embeddings and tensors"):
        value_to_binary("float", 1.0)


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (None, "no value"),
        (any_pb2.Any(), "no value"),
        (any_pb2.Any(type_url="type.googleapis.com/other.float", value=b"1"), "does not start with"),
        (any_pb2.Any(type_url=TYPE_URL_PREFIX + "complex", value=b"1"), "names no variable type"),
        (any_pb2.Any(type_url=TYPE_URL_PREFIX + "float", value=b"{not json"), "not valid JSON"),
        (any_pb2.Any(type_url=TYPE_URL_PREFIX + "string", value=b"\xff\xfe"), "not valid JSON"),
        (any_pb2.Any(type_url=TYPE_URL_PREFIX + "float", value=b'"fast"'), "is not a number"),
        (
            any_pb2.Any(
                type_url=TYPE_URL_PREFIX + "tensor", value=b'{"shape":[1],"data":' + b"[" * 3000 + b"]" * 3000 + b"}"
            ),
            "nested too deeply",
        ),
    ],
    ids=["none", "empty", "foreign-url", "unknown-type", "bad-json", "bad-utf8", "bad-float", "deep-nesting"],
)
def test_malformed_any_is_a_validation_error(msg: any_pb2.Any | None, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle) as info:
        any_to_value(msg, name="v")
    assert isinstance(info.value, ValueError)


def test_value_to_any_rejects_an_unknown_type() -> None:
    with pytest.raises(ValidationError, match="unknown variable type"):
        value_to_any("complex", 1)


@pytest.mark.parametrize("seconds", [0.0, 1.5, 1_767_225_600.123456, time.time(), -2.25])
def test_timestamps_round_trip(seconds: float) -> None:
    ts = timestamp(seconds)
    assert 0 <= ts.nanos < 1_000_000_000
    assert from_timestamp(ts) == seconds


def test_timestamp_carries_nanosecond_rounding_into_seconds() -> None:
    ts = timestamp(1.9999999999)
    assert (ts.seconds, ts.nanos) == (2, 0)


NOW = 1_767_225_600.25
VARIABLES = [
    Variable(
        id="var_temperature_1",
        name="temperature",
        type="float",
        value=0.7,
        constraints={"min": 0.0, "max": 2.0},
        description="sampling temperature",
        metadata={"owner": "tuner"},
        version=3,
        created_at=NOW,
        updated_at=NOW + 12.5,
        source="worker",
    ),
    Variable(id="var_n_2", name="n", type="integer", value=5, constraints={"min": 1}, created_at=NOW, updated_at=NOW),
    Variable(
        id="var_model_3",
        name="model",
        type="string",
        value="gpt-x",
        constraints={"pattern": "gpt-.*", "max_length": 20},
        created_at=NOW,
        updated_at=NOW,
    ),
    Variable(id="var_on_4", name="on", type="boolean", value=False, created_at=NOW, updated_at=NOW),
    Variable(
        id="var_mode_5",
        name="mode",
        type="choice",
        value="b",
        constraints={"choices": ["a", "b"]},
        created_at=NOW,
        updated_at=NOW,
    ),
    Variable(
        id="var_m_6",
        name="m",
        type="module",
        value="Predict",
        constraints={"allowed_modules": ["Predict", "ChainOfThought"]},
        created_at=NOW,
        updated_at=NOW,
    ),
    Variable(
        id="var_e_7",
        name="e",
        type="embedding",
        value=[0.5, -1.0, 2.0],
        constraints={"dimensions": 3},
        created_at=NOW,
        updated_at=NOW,
    ),
    Variable(
        id="var_w_8",
        name="w",
        type="tensor",
        value={"shape": [1, 3], "data": [1.0, 2.0, 3.0]},
        constraints={"shape": [None, 3]},
        created_at=NOW,
        updated_at=NOW,
    ),
]


@pytest.mark.parametrize("var", VARIABLES, ids=[v.type for v in VARIABLES])
def test_variables_round_trip_through_the_message(var: Variable) -> None:
    msg = variable_to_proto(var)
    assert msg.version == var.version
    assert msg.source == (pb.Variable.PYTHON if var.source == "worker" else pb.Variable.ELIXIR)
    assert proto_to_variable(msg) == var


def test_variable_message_survives_serialisation() -> None:
    var = VARIABLES[0]
    wire = variable_to_proto(var).SerializeToString()
    assert proto_to_variable(pb.Variable.FromString(wire)) == var


def test_proto_to_variable_validates_the_value() -> None:
    msg = variable_to_proto(VARIABLES[0])
    msg.value.CopyFrom(value_to_any("float", 5.0))
    with pytest.raises(ValidationError, match=r"temperature: 5\.0 is above the maximum 2\.0 \(rule max\)"):
        proto_to_variable(msg)
    msg.constraints_json = "[1]"
    with pytest.raises(ValidationError, match="must be a JSON object"):
        proto_to_variable(msg)


@pytest.mark.parametrize("var", VARIABLES, ids=[v.type for v in VARIABLES])
def test_the_value_and_version_alone_decode_as_the_whole_record_does(var: Variable) -> None:
    msg = variable_to_proto(var)
    whole = proto_to_variable(msg)
    assert proto_to_versioned(msg) == (whole.value, whole.version)
    bad = variable_to_proto(VARIABLES[0])
    bad.value.CopyFrom(value_to_any("float", 5.0))
    with pytest.raises(ValidationError, match=r"above the maximum 2\.0 \(rule max\)"):
        proto_to_versioned(bad)


def test_updates_round_trip_including_heartbeats() -> None:
    update = VariableUpdate("var_n_2", VARIABLES[1], "value_change", "worker", {"k": "v"}, NOW)
    assert proto_to_update(update_to_proto(update)) == update
    heartbeat = VariableUpdate("", None, "heartbeat", "", {}, NOW)
    msg = update_to_proto(heartbeat)
    assert not msg.HasField("variable")
    assert proto_to_update(msg) == heartbeat


def test_decoded_variables_never_share_their_constraint_lists() -> None:
    # The compiled spec of a definition is cached; the records built from it must not alias it.
    var = Variable(id="var_m_1", name="m", type="string", value="a", constraints={"enum": ["a", "b"]})
    message = variable_to_proto(var)
    first = proto_to_variable(message)
    first.constraints["enum"].append("zzz")
    second = proto_to_variable(message)
    assert second.constraints == {"enum": ["a", "b"]}
