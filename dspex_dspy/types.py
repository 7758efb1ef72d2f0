"""Variable types, constraints, normalisation and the wire encoding of values.

This module is the bottom layer: it knows nothing of storage, gRPC or DSPy. It defines the eight
variable types, compiles a variable's constraints once into a :class:`VariableSpec` whose
``validate`` is the hot path of every write, and encodes values as the bridge carries them
(``type.googleapis.com/snakepit.<type>`` + UTF-8 JSON, special floats as strings).

Constraints are compiled on pydantic: each spec becomes a strict pydantic ``TypeAdapter``
(``Field(ge/le/min_length/max_length/pattern)``, ``allow_inf_nan=False`` under a range, ``Literal``
for enums), which also gives every variable a JSON Schema (:meth:`Variable.json_schema`). Errors
keep this package's wording: the variable, the rule, the bound and the value. Patterns run on
pydantic-core's Rust regex engine, which is linear time (no hostile pattern or value can stall a
writer) and has no backreferences or lookarounds; a pattern always matches the **whole** string,
as if anchored at both ends.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Final, Literal, cast

from pydantic import ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import SchemaError
from typing_extensions import TypedDict

from dspex_dspy.errors import ValidationError

__all__ = [
    "BATCH_METADATA_KEY",
    "MAX_NAME_LENGTH",
    "MAX_PATTERN_LENGTH",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_TENSOR_RANK",
    "OptimizationStatus",
    "TYPE_URL_PREFIX",
    "VARIABLE_TYPES",
    "Variable",
    "VariableSpec",
    "VariableType",
    "batch_marker",
    "compile_spec",
    "decode_constraints",
    "decode_value",
    "encode_constraints",
    "encode_value",
    "is_secret",
    "normalize_metadata",
    "type_from_url",
    "unwrap_scalar",
    "validate_name",
]

VariableType = Literal["float", "integer", "string", "boolean", "choice", "module", "embedding", "tensor"]
VARIABLE_TYPES: Final[tuple[str, ...]] = (
    "float",
    "integer",
    "string",
    "boolean",
    "choice",
    "module",
    "embedding",
    "tensor",
)
TYPE_URL_PREFIX: Final = "type.googleapis.com/snakepit."
MAX_NAME_LENGTH: Final = 128
MAX_PATTERN_LENGTH: Final = 1024
MAX_TENSOR_RANK: Final = 32
#: The deepest nesting of lists and objects a value's JSON may have.
MAX_JSON_DEPTH: Final = 256
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_SPECIAL_FLOATS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclass(frozen=True)
class OptimizationStatus:
    """An optimization lease holding a variable (see :mod:`dspex_dspy.leases`).

    Attributes:
        optimizer_id: the optimizer holding the lease.
        started_at: wall-clock seconds since the epoch when the lease was taken.
    """

    optimizer_id: str
    started_at: float


@dataclass(frozen=True)
class Variable:
    """A snapshot of one variable: what it is, its current value and version.

    Attributes:
        id: unique id within its store (``var_<name>_<n>`` on a bridge).
        name: the name it is looked up by.
        type: one of :data:`VARIABLE_TYPES`.
        value: the current, normalised value.
        constraints: the constraints it was defined with.
        description: free text.
        metadata: ``str -> str`` annotations (``source``, ``backend``, ``migrated_from`` ...).
        version: 1 when defined, +1 per accepted write.
        created_at: wall-clock seconds since the epoch.
        updated_at: wall-clock seconds since the epoch of the last accepted write.
        source: who wrote it last: ``"orchestrator"`` or ``"worker"``.
        optimization_status: the optimization lease holding it, or None.
    """

    id: str
    name: str
    type: str
    value: Any
    constraints: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    version: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0
    source: str = "orchestrator"
    optimization_status: OptimizationStatus | None = None

    def __repr__(self) -> str:
        from dspex_dspy.display import variable_repr

        return variable_repr(self)

    def _repr_html_(self) -> str:
        from dspex_dspy.display import variable_html

        return variable_html(self)

    def to_record(self) -> dict[str, Any]:
        """The variable as a plain dict (JSON-ready; times as ISO-8601 UTC)."""
        from dspex_dspy.display import variable_record

        return variable_record(self)

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of this variable's values (type and constraints), titled with its name.

        Example:
            >>> Variable("var_t_1", "t", "float", 0.7, {"min": 0.0, "max": 2.0}).json_schema()
            {'maximum': 2.0, 'minimum': 0.0, 'type': 'number', 'title': 't'}
        """
        schema = compile_spec(self.name, self.type, self.constraints).json_schema()
        schema["title"] = self.name
        if self.description:
            schema["description"] = self.description
        return schema


_SECRET_WORDS: Final = frozenset({"true", "1", "yes"})


def is_secret(metadata: Mapping[str, Any] | None) -> bool:
    """Whether metadata marks a variable secret (``{"secret": "true"}``, or ``"1"``/``"yes"``): its
    value is never shown.

    Example:
        >>> is_secret({"secret": "true"}), is_secret({"secret": "no"}), is_secret(None)
        (True, False, False)
    """
    if not metadata:
        return False
    return str(metadata.get("secret", "")).strip().lower() in _SECRET_WORDS


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid variable name, else raise :class:`ValidationError`.

    A name starts with a letter or ``_`` and continues with letters, digits, ``_``, ``-`` or ``.``,
    at most :data:`MAX_NAME_LENGTH` characters.
    """
    if not isinstance(name, str):
        raise ValidationError(str(name), "name", name, f"a variable name must be a string, got {type(name).__name__}")
    if not name or len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise ValidationError(
            name,
            "name",
            name,
            f"{name!r} is not a valid name (a letter or _, then letters, digits, _ - or ., "
            f"at most {MAX_NAME_LENGTH} characters)",
        )
    return name


BATCH_METADATA_KEY: Final = "dspex.batch"
"""Write metadata that marks the writes of one atomic batch: ``"<batch id>/<number of writes>"``.

A worker's cache holds a batch's updates until all of them arrived and applies them together, so
no read sees part of an atomic ``update_many``.
"""


def batch_marker(metadata: Mapping[str, str]) -> tuple[str, int] | None:
    """``(batch id, number of writes)`` from a write's metadata, or None when it was no batch (or the mark is malformed)."""
    text = metadata.get(BATCH_METADATA_KEY)
    if not text:
        return None
    batch_id, _, size = text.rpartition("/")
    if not batch_id or not size.isdigit() or int(size) < 2:
        return None
    return batch_id, int(size)


def normalize_metadata(name: str, metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Return metadata as ``str -> str``; numbers and booleans become strings, containers are rejected."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValidationError(name, "metadata", metadata, "metadata must be a mapping of str to str")
    out: dict[str, str] = {}
    for key, val in metadata.items():
        if not isinstance(key, str):
            raise ValidationError(name, "metadata", key, f"metadata key {key!r} is not a string")
        if isinstance(val, str):
            out[key] = val
        elif isinstance(val, bool):
            out[key] = "true" if val else "false"
        elif isinstance(val, (int, float)):
            out[key] = str(val)
        else:
            raise ValidationError(
                name, "metadata", val, f"metadata value for {key!r} must be a string, got {type(val).__name__}"
            )
    return out


# --------------------------------------------------------------------------------------------
# The one constraint pydantic cannot express: a tensor's shape (None = any size on that axis).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int | None, ...]

    def __call__(self, name: str, value: Any) -> None:
        shape = value["shape"]
        if len(shape) != len(self.shape) or any(
            e is not None and e != a for e, a in zip(self.shape, shape, strict=True)
        ):
            raise ValidationError(name, "shape", value, f"a tensor of shape {shape}, expected {list(self.shape)}")


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than the interpreter will print
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Normalisation per type
# --------------------------------------------------------------------------------------------


_PLAIN_TYPES: Final = frozenset({float, int, str, bool, list, dict})


def unwrap_scalar(value: Any) -> Any:
    """A numpy scalar or 0-d array as the Python number it holds; any other value unchanged.

    Every backend applies this before validating, so ``numpy.float32(0.5)`` and
    ``numpy.array(3)`` are accepted the same way by a local context, a bridge and a worker.

    Example:
        >>> unwrap_scalar(7)
        7
    """
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        return value.item()
    return value


def _type_error(name: str, type_: str, value: Any, expected: str) -> ValidationError:
    return ValidationError(name, "type", value, f"{_short(value)} is not {expected} (type {type_})")


def _norm_float(name: str, value: Any) -> float:
    cls = type(value)
    if cls is float:
        return cast(float, value)
    if cls is int or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        try:
            return float(value)
        except OverflowError:
            raise _type_error(name, "float", value, "a number that fits a 64-bit float") from None
    raise _type_error(name, "float", value, "a number")


def _norm_integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _type_error(name, "integer", value, "an integer")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        result = int(value)
    else:
        raise _type_error(name, "integer", value, "an integer")
    if not INT64_MIN <= result <= INT64_MAX:
        raise _type_error(name, "integer", value, "an integer in the signed 64-bit range")
    return result


def _norm_string(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _type_error(name, "string", value, "a string")


def _norm_boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "true":
            return True
        if low == "false":
            return False
    raise _type_error(name, "boolean", value, 'a boolean (or "true"/"false")')


def _norm_number_list(name: str, type_: str, value: Any) -> list[float]:
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _type_error(name, type_, value, "a list of numbers")
    out: list[float] = []
    for item in value:
        if type(item) is not float and type(item) is not int:
            item = unwrap_scalar(item)
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise _type_error(name, type_, value, "a list of numbers")
        try:
            out.append(float(item))
        except OverflowError:
            raise _type_error(name, type_, value, "a list of numbers that fit 64-bit floats") from None
    return out


def _norm_embedding(name: str, value: Any) -> list[float]:
    return _norm_number_list(name, "embedding", value)


def _flatten(name: str, value: Any, depth: int, shape: list[int], whole: Any) -> list[Any]:
    if depth > MAX_TENSOR_RANK:
        raise ValidationError(
            name, "shape", "...", f"tensor data is nested too deeply (more than {MAX_TENSOR_RANK} levels)"
        )
    if isinstance(value, (list, tuple)):
        if depth == len(shape):
            shape.append(len(value))
        elif shape[depth] != len(value):
            raise ValidationError(name, "shape", whole, "a ragged nested list is not a tensor")
        flat: list[Any] = []
        for item in value:
            flat.extend(_flatten(name, item, depth + 1, shape, whole))
        return flat
    if depth != len(shape):
        raise ValidationError(name, "shape", whole, "a ragged nested list is not a tensor")
    return [value]


def _norm_tensor(name: str, value: Any) -> dict[str, list[Any]]:
    if hasattr(value, "tolist") and hasattr(value, "shape") and not isinstance(value, Mapping):
        value = {"shape": list(value.shape), "data": value.tolist()}
    if isinstance(value, (list, tuple)):
        shape: list[int] = []
        data = _flatten(name, value, 0, shape, value)
        return {"shape": shape, "data": _norm_number_list(name, "tensor", data)}
    if not isinstance(value, Mapping) or set(value) != {"shape", "data"}:
        raise _type_error(name, "tensor", value, 'a {"shape": [...], "data": [...]} object or a nested list')
    raw_shape = value["shape"]
    if not isinstance(raw_shape, (list, tuple)) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in raw_shape
    ):
        raise ValidationError(name, "shape", value, f"shape {raw_shape!r} must be a list of non-negative integers")
    data = value["data"]
    if isinstance(data, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in data):
        inner: list[int] = []
        data = _flatten(name, data, 0, inner, value)
        if inner != list(raw_shape):
            raise ValidationError(
                name, "shape", value, f"nested data of shape {inner} does not match shape {list(raw_shape)}"
            )
    flat = _norm_number_list(name, "tensor", data)
    size = math.prod(raw_shape)
    if size != len(flat):
        raise ValidationError(
            name, "shape", value, f"shape {list(raw_shape)} holds {size} elements but data has {len(flat)}"
        )
    return {"shape": list(raw_shape), "data": flat}


_NORMALISERS = {
    "float": _norm_float,
    "integer": _norm_integer,
    "string": _norm_string,
    "boolean": _norm_boolean,
    "choice": _norm_string,
    "module": _norm_string,
    "embedding": _norm_embedding,
    "tensor": _norm_tensor,
}

_ALLOWED_CONSTRAINTS: Final[dict[str, frozenset[str]]] = {
    "float": frozenset({"min", "max"}),
    "integer": frozenset({"min", "max"}),
    "string": frozenset({"min_length", "max_length", "pattern", "enum"}),
    "boolean": frozenset(),
    "choice": frozenset({"choices"}),
    "module": frozenset({"allowed_modules"}),
    "embedding": frozenset({"dimensions"}),
    "tensor": frozenset({"shape"}),
}


# --------------------------------------------------------------------------------------------
# Compiled specs
# --------------------------------------------------------------------------------------------


class _TensorValue(TypedDict):
    shape: list[int]
    data: list[float]


_STRICT: Final = ConfigDict(strict=True)
_PYTHON_TYPES: Final[dict[str, Any]] = {
    "float": float,
    "integer": int,
    "string": str,
    "boolean": bool,
    "choice": str,
    "module": str,
    "embedding": list[float],
    "tensor": _TensorValue,
}
#: The constraint naming the allowed values, per type.
_ONE_OF_RULE: Final = {"string": "enum", "choice": "choices", "module": "allowed_modules"}


@dataclass(frozen=True)
class _Compiled:
    """The pydantic side of a spec: the adapters (run in order) and the Field metadata shown in reprs."""

    adapters: tuple[TypeAdapter[Any], ...]
    validators: tuple[Callable[[Any], Any], ...]
    metadata: tuple[Any, ...]


@functools.lru_cache(maxsize=4096)
def _compile_pydantic(type_: str, key: str) -> _Compiled:
    """Strict pydantic adapters for a type and its normalised constraints (``key`` is their JSON).

    Raises:
        SchemaError: a pattern the Rust regex engine does not accept.
    """
    norm: dict[str, Any] = json.loads(key)
    kwargs: dict[str, Any] = {}
    # An integer's fractional bound is the next whole number inward: the same values pass.
    if "min" in norm:
        kwargs["ge"] = math.ceil(norm["min"]) if type_ == "integer" else norm["min"]
    if "max" in norm:
        kwargs["le"] = math.floor(norm["max"]) if type_ == "integer" else norm["max"]
    if type_ == "float" and kwargs:
        kwargs["allow_inf_nan"] = False
    if "min_length" in norm:
        kwargs["min_length"] = norm["min_length"]
    if "max_length" in norm:
        kwargs["max_length"] = norm["max_length"]
    if "pattern" in norm:
        kwargs["pattern"] = f"^(?:{norm['pattern']})$"
    if "dimensions" in norm:
        kwargs["min_length"] = kwargs["max_length"] = norm["dimensions"]
    items = norm.get(_ONE_OF_RULE.get(type_, ""))
    adapters: list[TypeAdapter[Any]] = []
    checked = bool(kwargs)
    if kwargs or items is None:
        info = Field(strict=True, **kwargs)
        annotated: Any = Annotated[_PYTHON_TYPES[type_], info]
        adapters.append(TypeAdapter(annotated))
        metadata = tuple(info.metadata)
    else:
        metadata = ()
    if items is not None:
        one_of: Any = Literal[tuple(items)]
        adapters.append(TypeAdapter(one_of, config=_STRICT))
        metadata += (("one of", tuple(items)),)
        checked = True
    # Types are already checked by the normalisers: an unconstrained spec needs no second pass.
    validators = tuple(a.validator.validate_python for a in adapters) if checked and type_ != "tensor" else ()
    return _Compiled(tuple(adapters), validators, metadata)


@dataclass(frozen=True)
class VariableSpec:
    """A variable's type and constraints, compiled once; :meth:`validate` is the write hot path.

    A value is first normalised by its type's rules (an int for a float, ``"true"`` for a boolean,
    a nested list for a tensor ...), then checked by the strict pydantic adapters compiled from the
    constraints, then by the checks pydantic cannot express (a tensor's shape).

    Attributes:
        name: the variable's name (used in error messages).
        type: one of :data:`VARIABLE_TYPES`.
        constraints: the normalised constraints (JSON-friendly, as given after checking).
        checks: the compiled constraints, as pydantic ``Field`` metadata and Python checks.
        secret: the variable is secret: a rejected value is not shown in the error.
    """

    name: str
    type: str
    constraints: Mapping[str, Any]
    checks: tuple[Any, ...] = field(repr=False)
    compiled: _Compiled = field(repr=False, compare=False)
    post_checks: tuple[Any, ...] = field(default=(), repr=False, compare=False)
    secret: bool = False

    def validate(self, value: Any) -> Any:
        """Return the normalised value, or raise :class:`ValidationError` naming variable, rule and value.

        Example:
            >>> compile_spec("temperature", "float", {"min": 0.0, "max": 2.0}).validate(1)
            1.0
        """
        if self.secret:
            return self._validate_secret(value)
        if type(value) not in _PLAIN_TYPES:
            value = unwrap_scalar(value)
        normalised = _NORMALISERS[self.type](self.name, value)
        validators = self.compiled.validators
        if validators:
            try:
                for check in validators:
                    check(normalised)
            except PydanticValidationError as exc:
                raise self._explain(exc, normalised) from None
        for post in self.post_checks:
            post(self.name, normalised)
        return normalised

    def _validate_secret(self, value: Any) -> Any:
        try:
            return replace(self, secret=False).validate(value)
        except ValidationError as exc:
            raise ValidationError(
                self.name, exc.rule, None, f"the value was rejected (not shown: {self.name} is secret)"
            ) from None

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of this spec's values (from the pydantic adapters)."""
        schema: dict[str, Any] = {}
        for adapter in self.compiled.adapters:
            schema.update(adapter.json_schema())
        if self.type == "tensor" and "shape" in self.constraints:
            schema["x-shape"] = list(self.constraints["shape"])
        return schema

    def _explain(self, exc: PydanticValidationError, value: Any) -> ValidationError:
        """The pydantic error as this package words it: variable, rule, bound, value."""
        error = exc.errors(include_url=False)[0]
        kind = error["type"]
        bounds = self.constraints
        shown = _short(value)
        name = self.name
        if kind == "finite_number":
            if value != value:
                return ValidationError(name, "range", value, "NaN cannot be checked against a min/max range")
            if value > 0 and "max" in bounds:
                return ValidationError(name, "max", value, f"{shown} is above the maximum {bounds['max']!r}")
            if value < 0 and "min" in bounds:
                return ValidationError(name, "min", value, f"{shown} is below the minimum {bounds['min']!r}")
            return ValidationError(name, "range", value, f"{shown} is not a finite number, which a min/max range needs")
        if kind == "greater_than_equal":
            return ValidationError(name, "min", value, f"{shown} is below the minimum {bounds['min']!r}")
        if kind == "less_than_equal":
            return ValidationError(name, "max", value, f"{shown} is above the maximum {bounds['max']!r}")
        if kind in ("too_short", "too_long") and self.type == "embedding":
            return ValidationError(
                name, "dimensions", value, f"an embedding of {len(value)} dimensions, expected {bounds['dimensions']}"
            )
        if kind == "string_too_short":
            return ValidationError(
                name, "min_length", value, f"{shown} is shorter than the minimum length {bounds['min_length']}"
            )
        if kind == "string_too_long":
            return ValidationError(
                name, "max_length", value, f"{shown} is longer than the maximum length {bounds['max_length']}"
            )
        if kind == "string_pattern_mismatch":
            return ValidationError(name, "pattern", value, f"{shown} does not match the pattern {bounds['pattern']!r}")
        if kind == "literal_error":
            rule = _ONE_OF_RULE[self.type]
            return ValidationError(name, rule, value, f"{shown} is not one of {list(bounds[rule])!r}")
        return ValidationError(name, "type", value, f"{shown} is rejected: {error['msg']}")


def _number(name: str, key: str, raw: Any) -> float | int:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValidationError(name, "constraints", raw, f"constraint {key} must be a number, got {_short(raw)}")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValidationError(name, "constraints", raw, f"constraint {key} must be a finite number, got {raw!r}")
    if isinstance(raw, int) and not INT64_MIN <= raw <= INT64_MAX:
        raise ValidationError(name, "constraints", raw, f"constraint {key} must fit the signed 64-bit range")
    return raw


def _non_negative_int(name: str, key: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValidationError(
            name, "constraints", raw, f"constraint {key} must be a non-negative integer, got {_short(raw)}"
        )
    return raw


def _string_list(name: str, key: str, raw: Any) -> list[str]:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
        raise ValidationError(name, "constraints", raw, f"constraint {key} must be a list of strings")
    items = list(raw)
    if not items:
        raise ValidationError(name, "constraints", raw, f"constraint {key} must not be empty")
    if any(not isinstance(i, str) for i in items):
        raise ValidationError(name, "constraints", raw, f"constraint {key} must be a list of strings")
    if len(set(items)) != len(items):
        raise ValidationError(name, "constraints", raw, f"constraint {key} has duplicate entries")
    return items


def compile_spec(
    name: str, type_: str, constraints: Mapping[str, Any] | None = None, *, secret: bool = False
) -> VariableSpec:
    """Check ``type_`` and ``constraints`` and compile them for fast validation.

    ``secret`` compiles the spec of a secret variable, whose rejected values are never shown.

    Raises:
        ValidationError: unknown type, unknown constraint key, ``min > max``, a pattern that does not
            compile, an empty ``choices`` list, and the like.

    Example:
        >>> compile_spec("model", "string", {"enum": ["fast", "accurate"]}).validate("fast")
        'fast'
    """
    if not isinstance(type_, str) or type_ not in _NORMALISERS:
        raise ValidationError(
            name, "type", type_, f"unknown variable type {type_!r} (one of {', '.join(VARIABLE_TYPES)})"
        )
    if constraints is not None and type(constraints) is not dict and not isinstance(constraints, Mapping):
        raise ValidationError(name, "constraints", constraints, "constraints must be a mapping")
    raw = dict(constraints) if constraints else {}
    unknown = set(raw) - _ALLOWED_CONSTRAINTS[type_]
    if unknown:
        allowed = ", ".join(sorted(_ALLOWED_CONSTRAINTS[type_])) or "none"
        raise ValidationError(
            name,
            "constraints",
            sorted(unknown),
            f"unknown constraint {', '.join(sorted(unknown))} for type {type_} (allowed: {allowed})",
        )
    post_checks: list[Any] = []
    norm: dict[str, Any] = {}
    if type_ in ("float", "integer"):
        lo = _number(name, "min", raw["min"]) if "min" in raw else None
        hi = _number(name, "max", raw["max"]) if "max" in raw else None
        if lo is not None and hi is not None and lo > hi:
            raise ValidationError(name, "constraints", raw, f"min {lo!r} is greater than max {hi!r}")
        if lo is not None:
            norm["min"] = lo
        if hi is not None:
            norm["max"] = hi
    elif type_ == "string":
        lo_len = _non_negative_int(name, "min_length", raw["min_length"]) if "min_length" in raw else None
        hi_len = _non_negative_int(name, "max_length", raw["max_length"]) if "max_length" in raw else None
        if lo_len is not None and hi_len is not None and lo_len > hi_len:
            raise ValidationError(name, "constraints", raw, f"min_length {lo_len} is greater than max_length {hi_len}")
        if lo_len is not None:
            norm["min_length"] = lo_len
        if hi_len is not None:
            norm["max_length"] = hi_len
        if "pattern" in raw:
            pattern = raw["pattern"]
            if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_LENGTH:
                raise ValidationError(
                    name, "constraints", pattern, f"pattern must be a string of at most {MAX_PATTERN_LENGTH} characters"
                )
            norm["pattern"] = pattern
        if "enum" in raw:
            norm["enum"] = _string_list(name, "enum", raw["enum"])
    elif type_ == "choice":
        if "choices" not in raw:
            raise ValidationError(name, "constraints", raw, "a choice variable needs a non-empty 'choices' list")
        norm["choices"] = _string_list(name, "choices", raw["choices"])
    elif type_ == "module":
        if "allowed_modules" in raw:
            norm["allowed_modules"] = _string_list(name, "allowed_modules", raw["allowed_modules"])
    elif type_ == "embedding":
        if "dimensions" in raw:
            dims = _non_negative_int(name, "dimensions", raw["dimensions"])
            if dims == 0:
                raise ValidationError(name, "constraints", dims, "constraint dimensions must be positive")
            norm["dimensions"] = dims
    elif type_ == "tensor" and "shape" in raw:
        shape = raw["shape"]
        if not isinstance(shape, (list, tuple)) or any(
            d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0) for d in shape
        ):
            raise ValidationError(
                name, "constraints", shape, "constraint shape must be a list of non-negative integers (None = any)"
            )
        norm["shape"] = list(shape)
        post_checks.append(_Shape(tuple(shape)))
    try:
        compiled = _compile_pydantic(type_, json.dumps(norm, sort_keys=True) if norm else "{}")
    except SchemaError as exc:
        pattern = norm.get("pattern")
        detail = _short(str(exc).replace("\n", " "), 200)
        what = f"pattern {pattern!r} does not compile" if pattern is not None else "the constraints do not compile"
        raise ValidationError(name, "constraints", pattern, f"{what}: {detail}") from None
    return VariableSpec(
        name=name,
        type=type_,
        constraints=norm,
        checks=compiled.metadata + tuple(post_checks),
        compiled=compiled,
        post_checks=tuple(post_checks),
        secret=secret,
    )


# --------------------------------------------------------------------------------------------
# Wire encoding
# --------------------------------------------------------------------------------------------


def _encode_float(x: float) -> float | str:
    if math.isfinite(x):
        return x
    if x != x:
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def _decode_float(name: str, raw: Any) -> Any:
    if isinstance(raw, str):
        if raw in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[raw]
        raise ValidationError(name, "encoding", raw, f"{raw!r} is not a number")
    return raw


def type_from_url(type_url: str) -> str:
    """Return the variable type named by a ``type.googleapis.com/snakepit.<type>`` URL.

    A ``.binary`` suffix is accepted. Raises :class:`ValidationError` for any other URL.
    """
    if not type_url.startswith(TYPE_URL_PREFIX):
        raise ValidationError(
            "", "encoding", type_url, f"type_url {type_url!r} does not start with {TYPE_URL_PREFIX!r}"
        )
    type_ = type_url[len(TYPE_URL_PREFIX) :].removesuffix(".binary")
    if type_ not in _NORMALISERS:
        raise ValidationError("", "encoding", type_url, f"type_url {type_url!r} names no variable type")
    return type_


_WIRE_JSON: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
"""The JSON of values on the wire (one encoder: ``json.dumps`` with options builds one per call)."""


def encode_value(type_: str, value: Any) -> tuple[str, bytes]:
    """Encode a normalised value as ``(type_url, UTF-8 JSON)`` for a ``google.protobuf.Any``.

    NaN and ±inf travel as ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``.

    Example:
        >>> encode_value("float", float("inf"))
        ('type.googleapis.com/snakepit.float', b'"Infinity"')
    """
    kind = type(value)
    # The scalars of the common types, spelled as the encoder spells them (it builds a C encoder per
    # call even for one number): an int, a finite float, a bool.
    if kind is int and type_ == "integer":
        return TYPE_URL_PREFIX + type_, int.__repr__(value).encode()
    if kind is float and type_ == "float" and math.isfinite(value):
        return TYPE_URL_PREFIX + type_, float.__repr__(value).encode()
    if kind is bool and type_ == "boolean":
        return TYPE_URL_PREFIX + type_, b"true" if value else b"false"
    if type_ == "float":
        payload: Any = _encode_float(value)
    elif type_ == "embedding":
        payload = [_encode_float(x) for x in value]
    elif type_ == "tensor":
        payload = {"shape": value["shape"], "data": [_encode_float(x) for x in value["data"]]}
    else:
        payload = value
    return TYPE_URL_PREFIX + type_, _WIRE_JSON.encode(payload).encode()


def decode_value(type_url: str, data: bytes, *, name: str = "") -> Any:
    """Decode the JSON payload of an ``Any`` back to a plain value (not yet validated).

    Raises:
        ValidationError: the URL names no type, or the payload is not valid UTF-8 JSON.
    """
    type_ = type_from_url(type_url)
    try:
        raw = json.loads(data.decode("utf-8")) if data else None
    except RecursionError:
        raise ValidationError(name, "encoding", data[:60], "the value is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(name, "encoding", data[:60], f"the value is not valid JSON: {exc}") from None
    if raw is None:
        raise ValidationError(name, "encoding", raw, "the value is empty (null)")
    # Python 3.13's json decoder nests far deeper before a RecursionError: bound the depth ourselves.
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and _deeper_than(raw, MAX_JSON_DEPTH):
        raise ValidationError(name, "encoding", data[:60], "the value is nested too deeply")
    if type_ == "float":
        return _decode_float(name, raw)
    if type_ == "embedding" and isinstance(raw, list):
        return [_decode_float(name, x) for x in raw]
    if type_ == "tensor" and isinstance(raw, dict) and isinstance(raw.get("data"), list):
        data_list = raw["data"]
        return {**raw, "data": _decode_nested(name, data_list, 0)}
    return raw


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests lists/objects more than ``limit`` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return False


def _decode_nested(name: str, raw: list[Any], depth: int) -> list[Any]:
    if depth > MAX_TENSOR_RANK:
        raise ValidationError(
            name, "shape", "...", f"tensor data is nested too deeply (more than {MAX_TENSOR_RANK} levels)"
        )
    return [_decode_nested(name, x, depth + 1) if isinstance(x, list) else _decode_float(name, x) for x in raw]


def encode_constraints(constraints: Mapping[str, Any]) -> str:
    """Encode constraints as the JSON object carried in ``constraints_json``."""
    return _WIRE_JSON.encode(dict(constraints))


def decode_constraints(text: str, *, name: str = "") -> dict[str, Any]:
    """Decode ``constraints_json`` (empty string = no constraints)."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValidationError(name, "constraints", text[:60], f"constraints_json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValidationError(name, "constraints", raw, "constraints_json must be a JSON object")
    return raw
