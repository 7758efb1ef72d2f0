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

:class:`WatchSlots` shares the watch streams fairly (per session and per principal under a global
cap), so one client cannot take every slot.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final, NoReturn

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import DSPexError, LimitExceededError, ValidationError
from dspex_dspy.store.glob import MAX_GLOB_LENGTH
from dspex_dspy.wire_errors import rpc_status_for

__all__ = [
    "Abort",
    "INT32_MAX",
    "MAX_IDENTIFIER_LENGTH",
    "MAX_STATUS_MESSAGE",
    "TIMESTAMP_MAX_SECONDS",
    "TIMESTAMP_MIN_SECONDS",
    "WatchSlots",
    "check_request",
    "clip",
    "abort_with",
    "clipped",
    "failure_status",
    "guarded_async_handler",
    "guarded_handler",
    "peer_principal",
]

INT32_MAX: Final = 2**31 - 1
MAX_IDENTIFIER_LENGTH: Final = 1024
"""Longest session id or variable identifier accepted (names have at most 128 characters, session ids 256)."""
MAX_STATUS_MESSAGE: Final = 4096
"""Longest status message sent (gRPC clients refuse trailing metadata past 8 KiB)."""
TIMESTAMP_MIN_SECONDS: Final = -62_135_596_800
"""``0001-01-01T00:00:00Z``, the earliest ``google.protobuf.Timestamp``."""
TIMESTAMP_MAX_SECONDS: Final = 253_402_300_799
"""``9999-12-31T23:59:59Z``, the latest ``google.protobuf.Timestamp``."""

_SERVICE: Final = "snakepit.bridge.BridgeService"
logger = logging.getLogger("dspex_dspy.server")


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


def clipped(exc: DSPexError, limit: int = MAX_STATUS_MESSAGE) -> DSPexError:
    """``exc`` with its message shortened by :func:`clip` (the same object, changed in place)."""
    if len(exc.message) > limit:
        exc.message = clip(exc.message, limit)
        exc.args = (exc.message,)
    return exc


class Abort(Exception):
    """Raised inside a handler to end the call with a given status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def failure_status(rpc: str, exc: Exception) -> grpc.Status:
    """The status that reports ``exc`` raised by ``rpc``, its fields in the rich error details.

    Bad input and every project error get their own code; anything else is ``INTERNAL`` (a bug in
    the server) and is logged.
    """
    if isinstance(exc, Abort):
        return rpc_status_for(code=exc.code, message=clip(exc.message))
    if isinstance(exc, RecursionError):
        # A value nested thousands of levels deep is bad input, not a bug.
        exc = ValidationError("", "encoding", None, f"{rpc}: the value is nested too deeply")
    if isinstance(exc, DSPexError):
        return rpc_status_for(clipped(exc))
    logger.error("%s failed unexpectedly", rpc, exc_info=exc)
    return rpc_status_for(
        code=grpc.StatusCode.INTERNAL,
        message=clip(f"{rpc}: internal error in the bridge server: {type(exc).__name__}: {exc}"),
    )


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


_IDENTIFIER_FIELDS: Final = ("session_id", "variable_identifier", "name", "from_variable", "to_variable")
_FIELD_PLANS: dict[type, tuple[tuple[str, ...], bool]] = {}


def _identifier_fields(request: Any) -> tuple[tuple[str, ...], bool]:
    """The identifier fields a request's message type has, and whether it has an identifier list
    (found once per type: asking each request costs an exception per field it lacks)."""
    plan = _FIELD_PLANS.get(type(request))
    if plan is None:
        found = tuple(field for field in _IDENTIFIER_FIELDS if hasattr(request, field))
        plan = _FIELD_PLANS[type(request)] = (found, hasattr(request, "variable_identifiers"))
    return plan


def _check_batch_set(request: pb.BatchSetVariablesRequest) -> None:
    for ident in request.updates:
        _identifier("updates", ident)
    for ident in request.binary_updates:
        _identifier("binary_updates", ident)


def _check_list(request: pb.ListVariablesRequest) -> None:
    if len(request.pattern) > MAX_GLOB_LENGTH:
        raise ValidationError(
            "",
            "pattern",
            None,
            f"a pattern of {len(request.pattern)} characters is longer than the {MAX_GLOB_LENGTH} allowed",
        )


def _check_register(request: pb.RegisterVariableRequest) -> None:
    _non_negative("initial_version", request.initial_version, request.name)
    if request.HasField("created_at"):
        _timestamp("created_at", request.created_at, request.name)


def _check_set(request: pb.SetVariableRequest) -> None:
    _non_negative("expected_version", request.expected_version, request.variable_identifier)


def _check_history(request: pb.GetVariableHistoryRequest) -> None:
    _non_negative("limit", request.limit, request.variable_identifier)


def _check_heartbeat(request: pb.HeartbeatRequest) -> None:
    if request.HasField("client_time"):
        _timestamp("client_time", request.client_time)


# The checks of one message type beyond its identifier fields, looked up by its exact type (the
# generated message classes are never subclassed): one lookup per request, not a test per kind.
_TYPE_CHECKS: Final[dict[type, Callable[[Any], None]]] = {
    pb.BatchSetVariablesRequest: _check_batch_set,
    pb.ListVariablesRequest: _check_list,
    pb.RegisterVariableRequest: _check_register,
    pb.SetVariableRequest: _check_set,
    pb.GetVariableHistoryRequest: _check_history,
    pb.HeartbeatRequest: _check_heartbeat,
}


def check_request(request: Any) -> None:
    """Check a decoded request's fields against their bounds.

    Raises:
        ValidationError: the first field out of bounds (the message echoes at most a short preview).
    """
    identifiers, has_list = _identifier_fields(request)
    for field in identifiers:
        _identifier(field, getattr(request, field))
    if has_list:
        for ident in request.variable_identifiers:
            _identifier("variable_identifiers", ident)
    more = _TYPE_CHECKS.get(type(request))
    if more is not None:
        more(request)


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


def _refusal(request: Any) -> grpc.Status | None:
    if isinstance(request, _Undecodable):
        detail = clip(f"the request is not a valid {request.message_name} message: {request.error}")
        return rpc_status_for(ValidationError("", "decoding", None, detail))
    try:
        check_request(request)
    except ValidationError as exc:
        return rpc_status_for(clipped(exc))
    return None


def _unary_behaviour(method: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
        refusal = _refusal(request)
        if refusal is not None:
            context.abort_with_status(refusal)
        return method(request, context)

    return behaviour


def _stream_behaviour(method: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    def behaviour(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        refusal = _refusal(request)
        if refusal is not None:
            context.abort_with_status(refusal)
        yield from method(request, context)

    return behaviour


def _handlers(
    servicer: Any, unary: Callable[[Any], Callable[..., Any]], stream: Callable[[Any], Callable[..., Any]]
) -> grpc.GenericRpcHandler[Any, Any]:
    service = pb.DESCRIPTOR.services_by_name["BridgeService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        implementation = getattr(servicer, method.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            (stream if method.server_streaming else unary)(implementation),
            request_deserializer=_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(_SERVICE, handlers)


def guarded_handler(servicer: Any) -> grpc.GenericRpcHandler[Any, Any]:
    """The RPC handlers of ``snakepit.bridge.BridgeService`` for ``servicer``, behind the door.

    Register with ``server.add_generic_rpc_handlers((guarded_handler(servicer),))`` instead of the
    generated ``add_BridgeServiceServicer_to_server``.
    """
    return _handlers(servicer, _unary_behaviour, _stream_behaviour)


def _async_unary_behaviour(method: Callable[[Any, Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def behaviour(request: Any, context: Any) -> Any:
        refusal = _refusal(request)
        if refusal is not None:
            await abort_with(context, refusal)
        return await method(request, context)

    return behaviour


def _async_stream_behaviour(method: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def behaviour(request: Any, context: Any) -> AsyncIterator[Any]:
        refusal = _refusal(request)
        if refusal is not None:
            await abort_with(context, refusal)
        async for item in method(request, context):
            yield item

    return behaviour


def guarded_async_handler(servicer: Any) -> grpc.GenericRpcHandler[Any, Any]:
    """:func:`guarded_handler` for a ``grpc.aio`` server: ``servicer``'s RPC methods are coroutines
    (unary) and async generators (streams)."""
    return _handlers(servicer, _async_unary_behaviour, _async_stream_behaviour)


async def abort_with(context: Any, status: grpc.Status) -> NoReturn:
    """End an asyncio call with ``status`` (its code, message and rich details)."""
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def peer_principal(context: grpc.ServicerContext) -> str:
    """Who is calling, for fair shares: the peer's address (``ipv4:127.0.0.1:53312``).

    Each client connection is one principal; an authenticated server can name principals by
    identity instead (see :class:`WatchSlots`).
    """
    peer = context.peer() or "unknown"
    return peer[:MAX_IDENTIFIER_LENGTH]


class WatchSlots:
    """Fair shares of the server's watch streams: a global cap, and caps per session and per principal.

    One client (or one session) can hold at most its share, so it can never leave the others
    without a watch. Not thread-safe on its own: the server calls it under its lock.

    Args:
        total: streams open at once, over everything.
        per_session: streams open at once on one session.
        per_principal: streams open at once by one principal (a peer address, or an identity).

    Example:
        >>> slots = WatchSlots(total=4, per_session=2, per_principal=1)
        >>> slots.acquire("s1", "peer-a")
        >>> slots.acquire("s1", "peer-a")
        Traceback (most recent call last):
        ...
        dspex_dspy.errors.LimitExceededError: watch streams of one client: 2 exceeds the limit 1
    """

    def __init__(self, total: int, per_session: int, per_principal: int) -> None:
        for name, value in (("total", total), ("per_session", per_session), ("per_principal", per_principal)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.total = total
        self.per_session = per_session
        self.per_principal = per_principal
        self._open = 0
        self._by_session: dict[str, int] = {}
        self._by_principal: dict[str, int] = {}

    @property
    def open(self) -> int:
        """Streams holding a slot now."""
        return self._open

    def acquire(self, session_id: str, principal: str) -> None:
        """Take one slot, or raise :class:`LimitExceededError` naming the share that is full."""
        if self._open >= self.total:
            raise LimitExceededError("watch streams", self._open + 1, self.total)
        in_session = self._by_session.get(session_id, 0)
        if in_session >= self.per_session:
            raise LimitExceededError("watch streams of one session", in_session + 1, self.per_session)
        of_principal = self._by_principal.get(principal, 0)
        if of_principal >= self.per_principal:
            raise LimitExceededError("watch streams of one client", of_principal + 1, self.per_principal)
        self._open += 1
        self._by_session[session_id] = in_session + 1
        self._by_principal[principal] = of_principal + 1

    def release(self, session_id: str, principal: str) -> None:
        """Give one slot back."""
        self._open = max(0, self._open - 1)
        for counts, key in ((self._by_session, session_id), (self._by_principal, principal)):
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)
