"""Errors on the wire: each :class:`~dspex_dspy.errors.DSPexError` as a gRPC status with rich details.

The server reports a failure with the status code and message a snakepit 0.4 peer expects
(``PROTOCOL.md``) and adds a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer
(the gRPC rich error model, via grpcio-status): an ``ErrorInfo`` in domain :data:`DOMAIN` whose
``reason`` names the error class and whose ``metadata`` carries the error's fields (variable, rule,
value as JSON, expected and current versions, session id, limit), plus a ``BadRequest`` field
violation for a rejected value. A batch reports the same ``Status`` per rejected entry, packed in
``BatchSetVariablesResponse.error_details``. The client rebuilds the very exception the server
raised (class, fields and message) from those details, never from the message text. A peer that
sends no details (the Elixir bridge) gets the class its status code stands for, with the fields the
call itself knows. Both the server and every client use this module; it opens no connection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from dspex_dspy.errors import (
    AuthenticationError,
    BridgeError,
    BridgeUnavailableError,
    DSPexError,
    LimitExceededError,
    PermissionDeniedError,
    RateLimitError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)

__all__ = [
    "DOMAIN",
    "MAX_DETAIL_VALUE_CHARS",
    "MAX_TRAILER_STATUS_BYTES",
    "REASONS",
    "error_from_rpc",
    "error_from_status",
    "error_info",
    "pack_status",
    "reported_failure",
    "rpc_status_for",
    "status_for",
    "status_proto",
    "unpack_status",
]

DOMAIN: Final = "dspex.bridge"
"""The ``ErrorInfo.domain`` of every error this package reports."""

MAX_DETAIL_VALUE_CHARS: Final = 1024
"""Longest JSON of a rejected value carried in ``ErrorInfo.metadata["value"]``.

A larger value (or one that is not JSON) is left out, ``metadata["value_omitted"]`` says why, and
the rebuilt error's ``value`` is None.
"""

MAX_TRAILER_STATUS_BYTES: Final = 2048
"""Largest serialized ``google.rpc.Status`` sent in a failed call's trailers.

gRPC refuses trailers beyond a few KiB (8 KiB by default, counting the message twice: once as
``grpc-message`` and once inside the status), and a refused trailer would turn the real error into
``RESOURCE_EXHAUSTED``. A status that does not fit is sent without the rejected value, and if it
still does not fit (an identifier of thousands of characters), without details at all: the
client then reads the code and message, as from a peer that sends no details.
"""

# class -> (ErrorInfo reason, status code). Order matters only for subclasses: a subclass comes first.
_KINDS: Final[tuple[tuple[type[DSPexError], str, grpc.StatusCode], ...]] = (
    (ValidationError, "VALIDATION_FAILED", grpc.StatusCode.INVALID_ARGUMENT),
    (VariableNotFoundError, "VARIABLE_NOT_FOUND", grpc.StatusCode.NOT_FOUND),
    (SessionNotFoundError, "SESSION_NOT_FOUND", grpc.StatusCode.NOT_FOUND),
    (VariableExistsError, "VARIABLE_EXISTS", grpc.StatusCode.ALREADY_EXISTS),
    (SessionExistsError, "SESSION_EXISTS", grpc.StatusCode.ALREADY_EXISTS),
    (VersionConflictError, "VERSION_CONFLICT", grpc.StatusCode.ABORTED),
    (RateLimitError, "RATE_LIMITED", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitExceededError, "LIMIT_EXCEEDED", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AuthenticationError, "UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, "PERMISSION_DENIED", grpc.StatusCode.PERMISSION_DENIED),
    (VariableLockedError, "VARIABLE_LOCKED", grpc.StatusCode.FAILED_PRECONDITION),
    (BridgeUnavailableError, "BRIDGE_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE),
)

REASONS: Final[Mapping[type[DSPexError], str]] = {cls: reason for cls, reason, _ in _KINDS}
"""The ``ErrorInfo.reason`` of each error class. Any other error is ``"INTERNAL"`` (or, for a
:class:`~dspex_dspy.errors.BridgeError`, the reason it carries)."""

# The message of a rate-limit refusal (RateLimitError), for refusals sent without details.
_RATE_RE: Final = re.compile(r"(?s)rate limit exceeded for (?P<principal>.*): retry after (?P<retry>[0-9.]+) s")
_UNAVAILABLE_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_CODES_BY_NUMBER: Final[Mapping[int, grpc.StatusCode]] = {code.value[0]: code for code in grpc.StatusCode}


# --------------------------------------------------------------------------------------------
# Server side: exception -> status
# --------------------------------------------------------------------------------------------


def status_for(exc: Exception) -> grpc.StatusCode:
    """The gRPC status code that reports ``exc`` (``INTERNAL`` for anything that is not a known error).

    Example:
        >>> status_for(SessionNotFoundError("s1"))
        <StatusCode.NOT_FOUND: (5, 'not found')>
    """
    for cls, _, code in _KINDS:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, BridgeError) and exc.code in grpc.StatusCode.__members__:
        return grpc.StatusCode[exc.code]
    return grpc.StatusCode.INTERNAL


def _value_metadata(value: Any, limit: int) -> dict[str, str]:
    """``{"value": <JSON>}``, or ``{"value_omitted": <why>}`` when it is not JSON or longer than ``limit``."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return {"value_omitted": f"a {type(value).__name__} is not JSON"}
    if len(text) > limit:
        return {"value_omitted": f"{len(text)} characters of JSON (more than {limit} fit in the details)"}
    return {"value": text}


def _fields(exc: DSPexError, value_limit: int) -> dict[str, str]:
    """The error's fields as ``ErrorInfo.metadata``."""
    if isinstance(exc, ValidationError):
        value = _value_metadata(exc.value, value_limit)
        return {"variable": exc.variable, "rule": exc.rule, "detail": exc.detail, **value}
    if isinstance(exc, VariableNotFoundError):
        fields = {"variable": exc.identifier}
        return {**fields, "session_id": exc.session_id} if exc.session_id else fields
    if isinstance(exc, VariableExistsError):
        fields = {"variable": exc.name}
        return {**fields, "session_id": exc.session_id} if exc.session_id else fields
    if isinstance(exc, VersionConflictError):
        return {"variable": exc.name, "expected_version": str(exc.expected), "current_version": str(exc.actual)}
    if isinstance(exc, (SessionNotFoundError, SessionExistsError)):
        return {"session_id": exc.session_id}
    if isinstance(exc, RateLimitError):
        return {"principal": exc.principal, "retry_after": f"{exc.retry_after:.3f}"}
    if isinstance(exc, LimitExceededError):
        return {"limit": exc.limit, "value": str(exc.value), "maximum": str(exc.maximum)}
    if isinstance(exc, VariableLockedError):
        return {"variable": exc.name, "optimizer_id": exc.optimizer_id, "detail": exc.detail}
    return {}


def error_info(exc: DSPexError, *, value_limit: int = MAX_DETAIL_VALUE_CHARS) -> error_details_pb2.ErrorInfo:
    """The ``google.rpc.ErrorInfo`` describing ``exc``: its reason, :data:`DOMAIN` and fields.

    Example:
        >>> info = error_info(VersionConflictError("t", 3, 4))
        >>> info.reason, info.domain, dict(info.metadata)["current_version"]
        ('VERSION_CONFLICT', 'dspex.bridge', '4')
    """
    reason = next((r for cls, r, _ in _KINDS if isinstance(exc, cls)), None)
    if reason is None:
        reason = exc.reason if isinstance(exc, BridgeError) and exc.reason else "INTERNAL"
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=_fields(exc, value_limit))


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_proto(exc: DSPexError, *, value_limit: int = MAX_DETAIL_VALUE_CHARS) -> status_pb2.Status:
    """The ``google.rpc.Status`` reporting ``exc``: code, message, ``ErrorInfo`` (+ ``BadRequest``).

    ``value_limit`` bounds the JSON of a rejected value carried in the details.
    """
    details = [_pack(error_info(exc, value_limit=value_limit))]
    if isinstance(exc, ValidationError):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.variable or "value", description=f"{exc.detail} (rule {exc.rule})"
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    return status_pb2.Status(code=status_for(exc).value[0], message=str(exc), details=details)


def rpc_status_for(
    exc: DSPexError | None = None,
    *,
    code: grpc.StatusCode | None = None,
    message: str = "",
    reason: str = "",
) -> grpc.Status:
    """The ``grpc.Status`` for ``context.abort_with_status``: ``exc``'s, or one built from its parts.

    Args:
        exc: the error to report; when None, ``code``, ``message`` and ``reason`` describe it.
        code: the status code (without ``exc``).
        message: the status message (without ``exc``).
        reason: the ``ErrorInfo`` reason (without ``exc``); defaults to the code's name.
    """
    if exc is None:
        if code is None:
            raise ValueError("rpc_status_for needs an error or a status code")
        exc = BridgeError(message, code=code.name, reason=reason or code.name)
    try:
        status = status_proto(exc)
        if status.ByteSize() > MAX_TRAILER_STATUS_BYTES:
            status = status_proto(exc, value_limit=0)
    except UnicodeError:  # text that is not valid UTF-8 (a lone surrogate) cannot travel in a proto
        return _PlainStatus(status_for(exc), str(exc).encode("utf-8", "backslashreplace").decode("utf-8"))
    if status.ByteSize() > MAX_TRAILER_STATUS_BYTES:
        return _PlainStatus(status_for(exc), str(exc))
    return rpc_status.to_status(status)


class _PlainStatus(grpc.Status):
    """A status without rich details: just the code and message, as a snakepit 0.4 peer sends them."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = ()


def pack_status(exc: DSPexError) -> any_pb2.Any:
    """:func:`status_proto` packed in an ``Any`` (a batch's ``error_details`` entry)."""
    return _pack(status_proto(exc))


# --------------------------------------------------------------------------------------------
# Client side: status -> exception
# --------------------------------------------------------------------------------------------


def _with_message(exc: DSPexError, message: str) -> DSPexError:
    """Give ``exc`` the server's own text, so users read exactly what the server said."""
    if message and message != exc.message:
        exc.message = message
        exc.args = (message,)
    return exc


def _int(fields: Mapping[str, str], key: str) -> int:
    try:
        return int(fields.get(key, "-1"))
    except ValueError:
        return -1


def _float(fields: Mapping[str, str], key: str) -> float:
    try:
        return float(fields.get(key, "0"))
    except ValueError:
        return 0.0


def _value(fields: Mapping[str, str]) -> Any:
    text = fields.get("value")
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


_BUILDERS: Final[dict[str, Callable[[Mapping[str, str]], DSPexError]]] = {
    "VALIDATION_FAILED": lambda f: ValidationError(
        f.get("variable", ""), f.get("rule", ""), _value(f), f.get("detail", "")
    ),
    "VARIABLE_NOT_FOUND": lambda f: VariableNotFoundError(f.get("variable", ""), f.get("session_id") or None),
    "SESSION_NOT_FOUND": lambda f: SessionNotFoundError(f.get("session_id", "")),
    "VARIABLE_EXISTS": lambda f: VariableExistsError(f.get("variable", ""), f.get("session_id") or None),
    "SESSION_EXISTS": lambda f: SessionExistsError(f.get("session_id", "")),
    "VERSION_CONFLICT": lambda f: VersionConflictError(
        f.get("variable", ""), _int(f, "expected_version"), _int(f, "current_version")
    ),
    "LIMIT_EXCEEDED": lambda f: LimitExceededError(f.get("limit", ""), _int(f, "value"), _int(f, "maximum")),
    "BRIDGE_UNAVAILABLE": lambda f: BridgeUnavailableError(""),
    "RATE_LIMITED": lambda f: RateLimitError(f.get("principal", ""), _float(f, "retry_after")),
    "UNAUTHENTICATED": lambda f: AuthenticationError(""),
    "PERMISSION_DENIED": lambda f: PermissionDeniedError(""),
    "VARIABLE_LOCKED": lambda f: VariableLockedError(
        f.get("variable", ""), f.get("optimizer_id", ""), f.get("detail", "")
    ),
}


def _find_error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:  # Unpack is False for other detail types
            return info
    return None


def error_from_status(status: status_pb2.Status, *, identifier: str = "", session_id: str = "") -> DSPexError:
    """Rebuild the error a ``google.rpc.Status`` reports.

    With this package's ``ErrorInfo`` the result is the server's exception: same class, fields
    and message. Without it (a peer that sends no details), the status code decides the class and
    ``identifier`` / ``session_id`` (what the call was about) fill the fields.

    Example:
        >>> err = error_from_status(status_proto(ValidationError("t", "max", 2.5, "2.5 is above the maximum 2.0")))
        >>> type(err).__name__, err.variable, err.rule, err.value
        ('ValidationError', 't', 'max', 2.5)
    """
    code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    info = _find_error_info(status)
    if info is not None:
        build = _BUILDERS.get(info.reason)
        if build is not None:
            return _with_message(build(info.metadata), status.message)
        return BridgeError(status.message or code.name, code=code.name, reason=info.reason)
    return _error_from_code(code, status.message, identifier=identifier, session_id=session_id)


def _error_from_code(code: grpc.StatusCode, message: str, *, identifier: str, session_id: str) -> DSPexError:
    """The error a status without details stands for (a peer that sends no ``ErrorInfo``)."""
    error: DSPexError
    if code == grpc.StatusCode.NOT_FOUND:
        # PROTOCOL.md fixes this message for an unknown session; anything else is about the variable.
        if message.startswith("Session not found: ") or not identifier:
            error = SessionNotFoundError(message.removeprefix("Session not found: ") or session_id)
        else:
            error = VariableNotFoundError(identifier, session_id or None)
    elif code == grpc.StatusCode.ALREADY_EXISTS:
        error = VariableExistsError(identifier, session_id or None) if identifier else SessionExistsError(session_id)
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        error = ValidationError(identifier, "invalid_argument", None, message)
    elif code == grpc.StatusCode.ABORTED:
        error = VersionConflictError(identifier, -1, -1)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        rate = _RATE_RE.fullmatch(message)
        error = (
            RateLimitError(rate.group("principal"), float(rate.group("retry")))
            if rate
            else LimitExceededError("limit", -1, -1)
        )
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        error = AuthenticationError(message or "the bridge requires a valid token")
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        error = PermissionDeniedError(message or "the token does not allow this")
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        error = VariableLockedError(identifier, "", message)
    elif code in _UNAVAILABLE_CODES:
        text = f"the bridge is unavailable ({code.name})"
        return BridgeUnavailableError(f"{text}: {message}" if message else text)
    else:
        return BridgeError(f"{code.name}: {message}" if message else code.name, code=code.name)
    return _with_message(error, message)


def _rpc_code(err: grpc.RpcError) -> grpc.StatusCode:
    code_of: Callable[[], Any] | None = getattr(err, "code", None)
    code = code_of() if callable(code_of) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _rpc_details(err: grpc.RpcError) -> str:
    details_of: Callable[[], Any] | None = getattr(err, "details", None)
    details = details_of() if callable(details_of) else None
    return details if isinstance(details, str) else ""


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` in a failed call's trailers, if the server sent one that fits."""
    if not callable(getattr(err, "trailing_metadata", None)):
        return None
    try:
        # A sync RpcError is also its grpc.Call; a grpc.aio one answers the same methods at once.
        status: status_pb2.Status | None = rpc_status.from_call(cast(grpc.Call, err))
    except (ValueError, TypeError, DecodeError):
        return None  # details that contradict the call's own code or message are ignored
    return status


def error_from_rpc(err: grpc.RpcError, *, identifier: str = "", session_id: str = "") -> DSPexError:
    """Turn a failed RPC (sync or ``grpc.aio``) back into the error the server reported.

    The rich status in the call's trailers is read with grpcio-status; see
    :func:`error_from_status`. A connection failure or missed deadline (``UNAVAILABLE``,
    ``DEADLINE_EXCEEDED``, ``CANCELLED`` without details) is a
    :class:`~dspex_dspy.errors.BridgeUnavailableError`.

    Args:
        err: the ``grpc.RpcError`` raised by a stub call.
        identifier: the variable name or id the call was about, if any.
        session_id: the session the call was about, if any.

    Returns:
        The matching error; raise it ``from err``.

    Example:
        >>> try:  # doctest: +SKIP
        ...     stub.GetVariable(request)
        ... except grpc.RpcError as err:
        ...     raise error_from_rpc(err, identifier="temperature", session_id="s1") from err
    """
    status = _rich_status(err)
    if status is not None:
        return error_from_status(status, identifier=identifier, session_id=session_id)
    return _error_from_code(_rpc_code(err), _rpc_details(err), identifier=identifier, session_id=session_id)


def unpack_status(packed: any_pb2.Any, *, identifier: str = "", session_id: str = "") -> DSPexError:
    """The error a batch's ``error_details`` entry (an ``Any`` holding a ``google.rpc.Status``) reports."""
    status = status_pb2.Status()
    if not packed.Unpack(status):
        return BridgeError(f"{identifier}: the bridge reported an error detail of type {packed.type_url!r}")
    return error_from_status(status, identifier=identifier, session_id=session_id)


def reported_failure(rpc: str, message: str) -> BridgeError:
    """The error behind a response whose ``success`` is false (a peer that reports, not aborts).

    Such a report carries no kind, so it is a :class:`~dspex_dspy.errors.BridgeError` with the
    peer's text; a report without text is an error all the same.
    """
    return BridgeError(message or f"{rpc} failed and the bridge gave no reason")
