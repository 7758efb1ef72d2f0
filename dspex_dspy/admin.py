"""The bridge's operator service: list the sessions a bridge holds (for the CLI and dashboards).

The snakepit ``BridgeService`` contract has no call that lists sessions, and it is kept unchanged.
This module adds a second, small gRPC service beside it, ``dspex.bridge.v1.BridgeAdmin``, built on
protobuf's well-known ``Struct`` message (so it needs no generated code): ``ListSessions`` takes an
optional ``{"pattern": "<glob>"}`` and answers ``{"sessions": [{id, created_at, ttl, expires_in,
variables, metadata, watchers}, ...]}``. Listing does not refresh any session's TTL.
:func:`add_admin_service` serves it on the bridge's ``grpc.aio`` server (the store calls run in a
thread pool) or on a blocking ``grpc.server``.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf import json_format, struct_pb2

from dspex_dspy.auth import current_principal
from dspex_dspy.errors import DSPexError, ValidationError
from dspex_dspy.store import SessionStore
from dspex_dspy.store.glob import compile_glob
from dspex_dspy.wire_errors import error_from_rpc

__all__ = ["ADMIN_SERVICE", "SessionSummary", "add_admin_service", "list_sessions"]

ADMIN_SERVICE: Final = "dspex.bridge.v1.BridgeAdmin"
LIST_SESSIONS: Final = f"/{ADMIN_SERVICE}/ListSessions"


@dataclass(frozen=True)
class SessionSummary:
    """One session as ``ListSessions`` reports it.

    Attributes:
        id: the session id.
        created_at: seconds since the epoch.
        ttl: seconds the session lives unused.
        expires_in: seconds left before it expires unless used.
        variables: how many variables it holds.
        metadata: the session's metadata.
        watchers: open watch streams on it at the node that answered.
    """

    id: str
    created_at: float
    ttl: float
    expires_in: float
    variables: int
    metadata: dict[str, str]
    watchers: int = 0


def _summaries(store: SessionStore, pattern: str) -> list[SessionSummary]:
    matcher = compile_glob(pattern) if pattern else None
    claims = current_principal()
    visible = None if claims is None or "admin" in claims.perms else claims.names_session
    out = []
    for info in store.list_sessions():
        if matcher is not None and not matcher.match(info.id):
            continue
        if visible is not None and not visible(info.id):
            continue
        out.append(
            SessionSummary(
                info.id,
                info.created_at,
                info.ttl,
                max(0.0, info.expires_in),
                info.variable_count,
                dict(info.metadata),
                store.session_watchers(info.id),
            )
        )
    return out


def _answer(store: SessionStore, request: struct_pb2.Struct) -> struct_pb2.Struct | tuple[grpc.StatusCode, str]:
    """The reply to ``ListSessions``, or the status that refuses it."""
    pattern = json_format.MessageToDict(request).get("pattern", "")
    if not isinstance(pattern, str):
        return grpc.StatusCode.INVALID_ARGUMENT, "pattern must be a string"
    try:
        sessions = _summaries(store, pattern)
    except ValidationError as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    except DSPexError as exc:
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    reply = struct_pb2.Struct()
    reply.update({"sessions": [s.__dict__ for s in sessions]})
    return reply


def add_admin_service(
    server: grpc.Server | grpc.aio.Server, store: SessionStore, executor: Executor | None = None
) -> None:
    """Serve ``BridgeAdmin`` for ``store`` on ``server`` (before it starts).

    Args:
        server: a blocking ``grpc.Server`` or a ``grpc.aio`` server.
        store: the store whose sessions are listed.
        executor: on a ``grpc.aio`` server, the pool that runs the store calls (None: the event
            loop's default pool); the event loop itself never waits on the store.
    """

    def list_handler(request: struct_pb2.Struct, context: grpc.ServicerContext) -> struct_pb2.Struct:
        answer = _answer(store, request)
        if isinstance(answer, tuple):
            context.abort(*answer)
        return answer

    async def list_async(request: struct_pb2.Struct, context: grpc.aio.ServicerContext[Any, Any]) -> struct_pb2.Struct:
        # In a copy of this call's context, so the pool thread sees the caller's token.
        call = contextvars.copy_context()
        answer = await asyncio.get_running_loop().run_in_executor(executor, call.run, _answer, store, request)
        if isinstance(answer, tuple):
            await context.abort(*answer)
        return answer

    handler = grpc.method_handlers_generic_handler(
        ADMIN_SERVICE,
        {
            "ListSessions": grpc.unary_unary_rpc_method_handler(
                list_async if isinstance(server, grpc.aio.Server) else list_handler,
                request_deserializer=struct_pb2.Struct.FromString,
                response_serializer=struct_pb2.Struct.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


def list_sessions(
    channel: grpc.Channel, *, pattern: str = "", timeout: float = 10.0, metadata: Any = None
) -> list[SessionSummary]:
    """Ask the bridge behind ``channel`` for its sessions (``pattern``: a ``*`` glob on the id).

    Raises:
        BridgeUnavailableError: the bridge cannot be reached.
        DSPexError: the bridge refused (e.g. it does not serve ``BridgeAdmin``).
    """
    call: Callable[..., struct_pb2.Struct] = channel.unary_unary(
        LIST_SESSIONS,
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=struct_pb2.Struct.FromString,
    )
    request = struct_pb2.Struct()
    if pattern:
        request.update({"pattern": pattern})
    try:
        reply = call(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        raise error_from_rpc(err) from err
    data = json_format.MessageToDict(reply)
    return [
        SessionSummary(
            id=str(item["id"]),
            created_at=float(item.get("created_at", math.nan)),
            ttl=float(item.get("ttl", math.nan)),
            expires_in=float(item.get("expires_in", math.nan)),
            variables=int(item.get("variables", 0)),
            metadata={str(k): str(v) for k, v in (item.get("metadata") or {}).items()},
            watchers=int(item.get("watchers", 0)),
        )
        for item in data.get("sessions", [])
    ]
