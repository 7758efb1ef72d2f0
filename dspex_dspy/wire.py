"""Conversions between this package's records and errors and the bridge's protobuf messages.

Both sides of the wire use this module: the bridge server turns :class:`~dspex_dspy.types.Variable`
records into ``snakepit.bridge.Variable`` messages and exceptions into gRPC status codes, and the
client does the inverse (messages back into records, a failed RPC back into the exception the
server raised: :func:`error_from_rpc` and :func:`status_for` live in :mod:`dspex_dspy.wire_errors`
and are re-exported here). Nothing here starts a server or opens a channel.

Values travel as ``google.protobuf.Any`` (``type.googleapis.com/snakepit.<type>`` + UTF-8 JSON, see
:func:`dspex_dspy.types.encode_value`). Embeddings and tensors may also travel on the documented
binary path: a ``.binary`` type URL suffix, ``{"shape": [...]}`` as the JSON part, and the elements
as little-endian IEEE-754 float64 in the message's ``binary_value`` field (never pickle).
"""

from __future__ import annotations

import functools
import json
import math
import struct
from typing import Any, Final

from google.protobuf import any_pb2, timestamp_pb2

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import ValidationError
from dspex_dspy.records import VariableUpdate
from dspex_dspy.types import (
    TYPE_URL_PREFIX,
    VARIABLE_TYPES,
    OptimizationStatus,
    Variable,
    VariableSpec,
    compile_spec,
    decode_constraints,
    decode_value,
    encode_constraints,
    encode_value,
    type_from_url,
)
from dspex_dspy.wire_errors import error_from_rpc, status_for

__all__ = [
    "BINARY_SUFFIX",
    "any_to_value",
    "error_from_rpc",
    "from_timestamp",
    "proto_to_update",
    "proto_to_variable",
    "source_from_proto",
    "source_to_proto",
    "status_for",
    "timestamp",
    "update_to_proto",
    "value_to_any",
    "value_to_binary",
    "variable_to_proto",
]

BINARY_SUFFIX: Final = ".binary"
_BINARY_TYPES: Final = frozenset({"embedding", "tensor"})
_NANOS: Final = 1_000_000_000

# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def value_to_any(type_: str, value: Any) -> any_pb2.Any:
    """Encode a normalised value of a variable type as a ``google.protobuf.Any``.

    Args:
        type_: one of the eight variable types.
        value: a value already normalised for that type (as a store returns it).

    Returns:
        The ``Any`` with ``type_url = type.googleapis.com/snakepit.<type>`` and the JSON payload.

    Raises:
        ValidationError: the type is unknown or the value cannot be encoded as JSON.

    Example:
        >>> value_to_any("float", 0.5).value
        b'0.5'
    """
    if type_ not in VARIABLE_TYPES:
        raise ValidationError(
            "", "type", type_, f"unknown variable type {type_!r} (one of {', '.join(VARIABLE_TYPES)})"
        )
    try:
        type_url, data = encode_value(type_, value)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValidationError("", "encoding", value, f"a {type_} value that cannot be encoded: {exc}") from None
    return any_pb2.Any(type_url=type_url, value=data)


def value_to_binary(type_: str, value: Any) -> tuple[any_pb2.Any, bytes]:
    """Encode an embedding or tensor on the binary path: ``(Any with the shape, float64 LE bytes)``.

    The bytes go into the message's ``binary_value`` (or ``initial_binary_value`` / ``binary_updates``)
    field beside the returned ``Any``.

    Args:
        type_: ``"embedding"`` or ``"tensor"``.
        value: the normalised value (a list of floats, or ``{"shape": [...], "data": [...]}``).

    Raises:
        ValidationError: another type, or a value that is not a flat list of numbers.

    Example:
        >>> any_msg, data = value_to_binary("embedding", [1.0, 2.0])
        >>> any_msg.type_url, any_msg.value, len(data)
        ('type.googleapis.com/snakepit.embedding.binary', b'{"shape":[2]}', 16)
    """
    if type_ not in _BINARY_TYPES:
        raise ValidationError("", "encoding", type_, f"the binary path carries embeddings and tensors, not {type_}")
    if type_ == "embedding":
        shape, data = [len(value)], value
    else:
        shape, data = list(value["shape"]), value["data"]
    try:
        payload = struct.pack(f"<{len(data)}d", *data)
    except struct.error as exc:
        raise ValidationError("", "encoding", value, f"a {type_} value that cannot be encoded: {exc}") from None
    header = json.dumps({"shape": shape}, separators=(",", ":")).encode()
    return any_pb2.Any(type_url=TYPE_URL_PREFIX + type_ + BINARY_SUFFIX, value=header), payload


def any_to_value(any_msg: any_pb2.Any | None, *, name: str = "", binary: bytes = b"") -> Any:
    """Decode a ``google.protobuf.Any`` carrying a variable value (not yet validated).

    Args:
        any_msg: the ``Any`` (a missing or empty one is rejected).
        name: the variable's name, used in error messages.
        binary: the message's binary field, used when the type URL ends in ``.binary``.

    Returns:
        The plain value; pass it through the variable's spec to normalise and validate it.

    Raises:
        ValidationError: no value, an unknown type URL, a payload that is not valid JSON, or a binary
            payload that does not match its shape.

    Example:
        >>> any_to_value(value_to_any("float", float("nan")))
        nan
    """
    if any_msg is None or not any_msg.type_url:
        raise ValidationError(name, "value", None, "no value was given (an empty google.protobuf.Any)")
    type_url = any_msg.type_url
    if type_url.endswith(BINARY_SUFFIX):
        return _decode_binary(type_url, bytes(any_msg.value), bytes(binary), name)
    return decode_value(type_url, bytes(any_msg.value), name=name)


def _decode_binary(type_url: str, header: bytes, data: bytes, name: str) -> Any:
    type_ = type_from_url(type_url)
    if type_ not in _BINARY_TYPES:
        raise ValidationError(
            name, "encoding", type_url, f"the binary path carries embeddings and tensors, not {type_}"
        )
    try:
        meta = json.loads(header.decode("utf-8")) if header else None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(
            name, "encoding", header[:60], f"the binary value's header is not valid JSON: {exc}"
        ) from None
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ValidationError(
            name, "encoding", meta, 'the binary value\'s header must be {"shape": [non-negative ints]}'
        )
    count = math.prod(shape)
    if len(data) != 8 * count:
        raise ValidationError(
            name, "encoding", len(data), f"shape {shape} needs {8 * count} bytes of float64 data, got {len(data)}"
        )
    values = list(struct.unpack(f"<{count}d", data))
    if type_ == "embedding":
        if len(shape) != 1:
            raise ValidationError(name, "encoding", shape, f"an embedding has one dimension, got shape {shape}")
        return values
    return {"shape": shape, "data": values}


# --------------------------------------------------------------------------------------------
# Timestamps and variables
# --------------------------------------------------------------------------------------------


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """Convert wall-clock seconds since the epoch to a ``google.protobuf.Timestamp``.

    Example:
        >>> ts = timestamp(1.5)
        >>> (ts.seconds, ts.nanos)
        (1, 500000000)
    """
    ts = timestamp_pb2.Timestamp()
    _stamp(ts, seconds)
    return ts


def _stamp(ts: timestamp_pb2.Timestamp, seconds: float) -> None:
    """Set ``ts`` (a message's own field: no copy) to wall-clock ``seconds``."""
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * _NANOS)
    if nanos >= _NANOS:
        whole, nanos = whole + 1, nanos - _NANOS
    ts.seconds = int(whole)
    ts.nanos = int(nanos)


def from_timestamp(ts: timestamp_pb2.Timestamp) -> float:
    """Convert a ``google.protobuf.Timestamp`` to wall-clock seconds since the epoch (unset = 0.0)."""
    return float(ts.seconds) + ts.nanos / _NANOS


def source_to_proto(source: str) -> pb.Variable.Source:
    """The ``Variable.Source`` of a writer: ``"worker"`` is ``PYTHON``, anything else ``ELIXIR``."""
    return pb.Variable.PYTHON if source == "worker" else pb.Variable.ELIXIR


def source_from_proto(source: int) -> str:
    """The writer named by a ``Variable.Source``: ``PYTHON`` is ``"worker"``, ``ELIXIR`` ``"orchestrator"``."""
    return "worker" if source == pb.Variable.PYTHON else "orchestrator"


def variable_to_proto(var: Variable) -> pb.Variable:
    """Convert a :class:`~dspex_dspy.types.Variable` record to a ``snakepit.bridge.Variable`` message.

    Example:
        >>> msg = variable_to_proto(Variable(id="var_t_1", name="t", type="float", value=0.5))
        >>> msg.name, msg.value.value, msg.version
        ('t', b'0.5', 1)
    """
    msg = pb.Variable(
        id=var.id,
        name=var.name,
        type=var.type,
        constraints_json=encode_constraints(var.constraints) if var.constraints else "",
        metadata=dict(var.metadata),
        source=source_to_proto(var.source),
        version=var.version,
        description=var.description,
    )
    msg.value.CopyFrom(value_to_any(var.type, var.value))
    _stamp(msg.last_updated_at, var.updated_at)
    _stamp(msg.created_at, var.created_at)
    status = var.optimization_status
    if status is not None:
        msg.optimization_status.optimizing = True
        msg.optimization_status.optimizer_id = status.optimizer_id
        _stamp(msg.optimization_status.started_at, status.started_at)
    return msg


@functools.lru_cache(maxsize=4096)
def _received_spec(name: str, type_: str, constraints_json: str) -> VariableSpec:
    """The compiled spec of a received definition: a worker reads the same few variables over and
    over, and compiling pydantic checks costs more than the rest of decoding a message."""
    return compile_spec(name, type_, decode_constraints(constraints_json, name=name))


def proto_to_variable(msg: pb.Variable) -> Variable:
    """Convert a ``snakepit.bridge.Variable`` message to a validated, normalised record.

    The value is decoded and passed through the variable's compiled constraints, so a record built
    from a message obeys the same rules as one read from a store.

    Raises:
        ValidationError: unknown type, bad ``constraints_json``, or a value the constraints reject.

    Example:
        >>> v = Variable(id="var_t_1", name="t", type="float", value=0.5, created_at=1.0, updated_at=2.0)
        >>> proto_to_variable(variable_to_proto(v)) == v
        True
    """
    name = msg.name
    spec = _received_spec(name, msg.type, msg.constraints_json)
    raw = any_to_value(msg.value if msg.HasField("value") else None, name=name, binary=msg.binary_value)
    return Variable(
        id=msg.id,
        name=name,
        type=spec.type,
        value=spec.validate(raw),
        # A fresh copy: the spec (and its lists) is shared by every message of that definition.
        constraints={k: list(v) if isinstance(v, list) else v for k, v in spec.constraints.items()},
        description=msg.description,
        metadata=dict(msg.metadata),
        version=msg.version,
        created_at=from_timestamp(msg.created_at),
        updated_at=from_timestamp(msg.last_updated_at),
        source=source_from_proto(msg.source),
        optimization_status=(
            OptimizationStatus(msg.optimization_status.optimizer_id, from_timestamp(msg.optimization_status.started_at))
            if msg.optimization_status.optimizing
            else None
        ),
    )


def proto_to_versioned(msg: pb.Variable) -> tuple[Any, int]:
    """``(value, version)`` of a ``snakepit.bridge.Variable`` message, the value validated and
    normalised as :func:`proto_to_variable` does, without building the rest of the record.

    Raises:
        ValidationError: unknown type, bad ``constraints_json``, or a value the constraints reject.
    """
    spec = _received_spec(msg.name, msg.type, msg.constraints_json)
    raw = any_to_value(msg.value if msg.HasField("value") else None, name=msg.name, binary=msg.binary_value)
    return spec.validate(raw), msg.version


def update_to_proto(update: VariableUpdate) -> pb.VariableUpdate:
    """Convert a store's :class:`~dspex_dspy.store.VariableUpdate` to a ``VariableUpdate`` message.

    A heartbeat (no variable) leaves ``variable`` unset and ``variable_id`` empty.
    """
    msg = pb.VariableUpdate(
        variable_id=update.variable_id,
        update_source=update.source,
        update_metadata=dict(update.metadata),
        update_type=update.update_type,
        timestamp=timestamp(update.timestamp),
    )
    if update.variable is not None:
        msg.variable.CopyFrom(variable_to_proto(update.variable))
    return msg


def proto_to_update(msg: pb.VariableUpdate) -> VariableUpdate:
    """Convert a ``VariableUpdate`` message back to a :class:`~dspex_dspy.store.VariableUpdate`.

    Raises:
        ValidationError: the carried variable does not decode or validate.
    """
    variable = proto_to_variable(msg.variable) if msg.HasField("variable") else None
    return VariableUpdate(
        variable_id=msg.variable_id,
        variable=variable,
        update_type=msg.update_type,
        source=msg.update_source,
        metadata=dict(msg.update_metadata),
        timestamp=from_timestamp(msg.timestamp),
    )
