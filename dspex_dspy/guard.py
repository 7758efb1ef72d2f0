"""The bridge server's door: requests that cannot be decoded or are out of range never get in.

Three things happen here before a request reaches :class:`~dspex_dspy.server.BridgeServicer`:

- **Decoding.** gRPC's default request deserializer raises on bytes that are not the expected
  message, and gRPC answers that with ``INTERNAL``. :func:`guarded_handler` registers every RPC with
  a deserializer that never raises, so an undecodable request is answered ``INVALID_ARGUMENT``.
- **Ranges.** :func:`check_request` checks each field against what the wire and the store can hold:
  identifiers (session ids, variable names and ids, listing patterns) are bounded, versions are
  within ``int32`` (``initial_version`` >= 1 when set, ``expected_version`` >= 0), ``limit`` is not
  negative, and a timestamp lies between years 1 and 9999. So nothing the server accepts can make
  a later read fail.
- **Echoes.** :func:`clip` bounds every status message: a message never carries more than
  :data:`MAX_STATUS_MESSAGE` characters of anything a client sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import ValidationError
from dspex_dspy.store.glob import MAX_GLOB_LENGTH

__all__ = [
    "INT32_MAX",
    "MAX_IDENTIFIER_LENGTH",
    "MAX_STATUS_MESSAGE",
    "TIMESTAMP_MAX_SECONDS",
    "TIMESTAMP_MIN_SECONDS",
    "check_request",
    "clip",
    "guarded_handler",
]

INT32_MAX: Final = 2**31 - 1
MAX_IDENTIFIER_LENGTH: Final = 256
"""Longest session id or variable identifier accepted (a name is at most 128 characters)."""
MAX_STATUS_MESSAGE: Final = 2048
"""Longest status message sent (gRPC refuses trailing metadata past a few KiB)."""
TIMESTAMP_MIN_SECONDS: Final = -62_135_596_800
"""``0001-01-01T00:00:00Z``, the earliest ``google.protobuf.Timestamp``."""
TIMESTAMP_MAX_SECONDS: Final = 253_402_300_799
"""``9999-12-31T23:59:59Z``, the latest ``google.protobuf.Timestamp``."""

_SERVICE: Final = "snakepit.bridge.BridgeService"


def clip(text: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """Shorten ``text`` to at most ``limit`` characters, keeping its start and its end.

    The end is kept because error messages end with the rule that failed (``(rule max)``).

    Example:
        >>> len(clip("x" * 10_000, 100)) <= 100
        True
    """
    if len(text) <= limit:
        return text
    tail = min(200, limit // 4)
    marker = f" ...[{len(text)} characters, shortened]... "
    head = max(0, limit - tail - len(marker))
    return text[:head] + marker + text[len(text) - tail :]


def _preview(value: str) -> str:
    return repr(value[:40] + "...") if len(value) > 40 else repr(value)


def _identifier(field: str, value: str, *, required: bool = False) -> None:
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise ValidationError(
            "",
            field,
            None,
            f"{field} {_preview(value)} is {len(value)} characters long; at most {MAX_IDENTIFIER_LENGTH} are allowed",
        )
    if required and not value:
        raise ValidationError("", field, value, f"{field} must not be empty")


def _timestamp(field: str, ts: Any, variable: str = "") -> None:
    if not TIMESTAMP_MIN_SECONDS <= ts.seconds <= TIMESTAMP_MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise ValidationError(
            variable,
            field,
            ts.seconds,
            f"{field} must be a time between years 1 and 9999 (seconds {TIMESTAMP_MIN_SECONDS}.."
            f"{TIMESTAMP_MAX_SECONDS}, nanos 0..999999999), got seconds={ts.seconds} nanos={ts.nanos}",
        )


def _non_negative(field: str, value: int, variable: str = "") -> None:
    if value < 0:
        raise ValidationError(variable, field, value, f"{field} must not be negative, got {value}")


def check_request(request: Any) -> None:
    """Check a decoded request's fields against their bounds.

    Raises:
        ValidationError: the first field out of bounds (the message echoes at most a short preview).
    """
    if hasattr(request, "session_id"):
        _identifier("session_id", request.session_id)
    for field in ("variable_identifier", "name", "from_variable", "to_variable"):
        if hasattr(request, field):
            _identifier(field, getattr(request, field))
    if hasattr(request, "variable_identifiers"):
        for ident in request.variable_identifiers:
            _identifier("variable_identifiers", ident)
    if isinstance(request, pb.BatchSetVariablesRequest):
        for ident in request.updates:
            _identifier("updates", ident)
        for ident in request.binary_updates:
            _identifier("binary_updates", ident)
    if isinstance(request, pb.ListVariablesRequest) and len(request.pattern) > MAX_GLOB_LENGTH:
        raise ValidationError(
            "",
            "pattern",
            None,
            f"a pattern of {len(request.pattern)} characters is longer than the {MAX_GLOB_LENGTH} allowed",
        )
    if isinstance(request, pb.RegisterVariableRequest):
        _non_negative("initial_version", request.initial_version, request.name)
        if request.HasField("created_at"):
            _timestamp("created_at", request.created_at, request.name)
    if isinstance(request, pb.SetVariableRequest):
        _non_negative("expected_version", request.expected_version, request.variable_identifier)
    if isinstance(request, pb.GetVariableHistoryRequest):
        _non_negative("limit", request.limit, request.variable_identifier)
    if isinstance(request, pb.HeartbeatRequest) and request.HasField("client_time"):
        _timestamp("client_time", request.client_time)


class _Undecodable:
    """Stands for a request whose bytes are not the expected message."""

    def __init__(self, message_name: str, error: Exception) -> None:
        self.message_name = message_name
        self.error = error


def _deserializer(message_class: Any) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.name

    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # DecodeError, or anything the parser raises on hostile bytes
            return _Undecodable(name, exc)

    return deserialize


def _refusal(request: Any) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(request, _Undecodable):
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            clip(f"the request is not a valid {request.message_name} message: {request.error} (rule decoding)"),
        )
    try:
        check_request(request)
    except ValidationError as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, clip(str(exc))
    return None


def _unary_behaviour(method: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
        refusal = _refusal(request)
        if refusal is not None:
            context.abort(*refusal)
        return method(request, context)

    return behaviour


def _stream_behaviour(method: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    def behaviour(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        refusal = _refusal(request)
        if refusal is not None:
            context.abort(*refusal)
        yield from method(request, context)

    return behaviour


def guarded_handler(servicer: Any) -> grpc.GenericRpcHandler[Any, Any]:
    """The RPC handlers of ``snakepit.bridge.BridgeService`` for ``servicer``, behind the door.

    Register with ``server.add_generic_rpc_handlers((guarded_handler(servicer),))`` instead of the
    generated ``add_BridgeServiceServicer_to_server``.
    """
    service = pb.DESCRIPTOR.services_by_name["BridgeService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream_behaviour(implementation),
                request_deserializer=_deserializer(request_class),
                response_serializer=response_class.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_behaviour(implementation),
                request_deserializer=_deserializer(request_class),
                response_serializer=response_class.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(_SERVICE, handlers)
