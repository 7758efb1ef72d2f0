"""Client calls of the bridge's operator service, ``dspex.bridge.v1.BridgeAdmin``.

The service speaks protobuf's ``Struct`` (see :mod:`dspex_dspy.admin`, which serves it):
:func:`ask_admin` makes one such call and maps its failure to this package's errors, and
:func:`report_calls` / :func:`recent_calls` send and read the module call records workers report.
Worker clients (their background reporter) and the operator tools share these.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import grpc
from google.protobuf import json_format, struct_pb2

from dspex_dspy.errors import ValidationError
from dspex_dspy.wire_errors import error_from_rpc

__all__ = [
    "ADMIN_SERVICE",
    "LIST_SESSIONS",
    "RECENT_CALLS",
    "REPORT_CALLS",
    "ask_admin",
    "recent_calls",
    "report_calls",
]

ADMIN_SERVICE: Final = "dspex.bridge.v1.BridgeAdmin"
LIST_SESSIONS: Final = f"/{ADMIN_SERVICE}/ListSessions"
REPORT_CALLS: Final = f"/{ADMIN_SERVICE}/ReportCalls"
RECENT_CALLS: Final = f"/{ADMIN_SERVICE}/RecentCalls"


def ask_admin(
    channel: grpc.Channel,
    method: str,
    request: Mapping[str, Any],
    *,
    timeout: float,
    metadata: Any = None,
    session_id: str = "",
) -> dict[str, Any]:
    """One ``BridgeAdmin`` call: ``request`` as a ``Struct`` in, the answer as a dict out.

    Raises:
        DSPexError: the error the bridge answered (or ``BridgeUnavailableError``), as every call.
    """
    call: Callable[..., struct_pb2.Struct] = channel.unary_unary(
        method,
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=struct_pb2.Struct.FromString,
    )
    message = struct_pb2.Struct()
    if request:
        message.update(dict(request))
    try:
        reply = call(message, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        raise error_from_rpc(err, session_id=session_id) from err
    return json_format.MessageToDict(reply)


def report_calls(
    channel: grpc.Channel,
    session_id: str,
    calls: Sequence[Mapping[str, Any]],
    *,
    timeout: float = 10.0,
    metadata: Any = None,
) -> int:
    """Report module call records for a session (each travels as its JSON text); how many were kept.

    Raises:
        ValidationError: a record is not JSON (nothing is sent), or the bridge refused one.
        SessionNotFoundError: the session does not exist.
        PermissionDeniedError: the token lacks ``write`` on the session.
        BridgeUnavailableError: the bridge cannot be reached.
    """
    texts = []
    for i, call in enumerate(calls):
        try:
            texts.append(json.dumps(dict(call), separators=(",", ":"), ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValidationError("", "calls", call, f"call {i} is not JSON: {exc}") from None
    request = {"session_id": session_id, "calls": texts}
    answer = ask_admin(channel, REPORT_CALLS, request, timeout=timeout, metadata=metadata, session_id=session_id)
    return int(answer.get("stored", 0))


def recent_calls(
    channel: grpc.Channel, session_id: str, *, limit: int = 50, timeout: float = 10.0, metadata: Any = None
) -> list[dict[str, Any]]:
    """The session's newest reported module calls, newest first (at most ``limit``).

    Raises:
        SessionNotFoundError: the session does not exist.
        PermissionDeniedError: the token lacks ``read`` on the session.
        BridgeUnavailableError: the bridge cannot be reached.
    """
    request = {"session_id": session_id, "limit": limit}
    answer = ask_admin(channel, RECENT_CALLS, request, timeout=timeout, metadata=metadata, session_id=session_id)
    return [json.loads(text) for text in answer.get("calls", [])]
