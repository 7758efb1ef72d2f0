"""The bridge's operator service: list the sessions a bridge holds, and the module calls workers report.

The snakepit ``BridgeService`` contract has no call that lists sessions, and it is kept unchanged.
This module adds a second, small gRPC service beside it, ``dspex.bridge.v1.BridgeAdmin``, built on
protobuf's well-known ``Struct`` message (so it needs no generated code): ``ListSessions`` takes an
optional ``{"pattern": "<glob>"}`` and answers ``{"sessions": [{id, created_at, ttl, expires_in,
variables, metadata, watchers}, ...]}``. Listing does not refresh any session's TTL.
``ReportCalls`` takes ``{"session_id", "calls": [...]}`` (each call a record object, or its JSON
text so numbers keep their type) and answers ``{"stored": n}``; ``RecentCalls`` takes
``{"session_id", "limit"}`` and answers ``{"calls": [...]}`` (each call's JSON text, newest
first): the provenance of recent module calls that workers report. They need the ``write`` and
``read`` permission on that session when the bridge checks tokens (see :mod:`dspex_dspy.auth`).
:func:`add_admin_service` serves it on the bridge's ``grpc.aio`` server (the store calls run in a
thread pool) or on a blocking ``grpc.server``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format, struct_pb2

from dspex_dspy.auth import current_principal
from dspex_dspy.errors import DSPexError, ValidationError
from dspex_dspy.remote.reports import (
    ADMIN_SERVICE,
    LIST_SESSIONS,
    ask_admin,
    recent_calls,
    report_calls,
)
from dspex_dspy.store import SessionStore
from dspex_dspy.store.glob import compile_glob
from dspex_dspy.wire_errors import rpc_status_for

__all__ = [
    "ADMIN_SERVICE",
    "SessionSummary",
    "add_admin_service",
    "list_sessions",
    "recent_calls",
    "report_calls",
]


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


def _session_id(data: Mapping[str, Any]) -> str:
    session_id = data.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise ValidationError("", "session_id", session_id, "session_id must be a non-empty string")
    return session_id


def _report(store: SessionStore, request: struct_pb2.Struct) -> struct_pb2.Struct:
    """The reply to ``ReportCalls`` (raises the store's error when refused)."""
    data = json_format.MessageToDict(request)
    session_id = _session_id(data)
    calls = data.get("calls")
    if not isinstance(calls, list):
        raise ValidationError("", "calls", calls, "calls must be a list of call records")
    records: list[Any] = []
    for i, call in enumerate(calls):
        if isinstance(call, str):
            try:
                call = json.loads(call)
            except ValueError as exc:
                raise ValidationError("", "calls", call, f"call {i} is not JSON: {exc}") from None
        records.append(call)
    stored = store.report_calls(session_id, records)
    reply = struct_pb2.Struct()
    reply.update({"stored": stored})
    return reply


def _recent(store: SessionStore, request: struct_pb2.Struct) -> struct_pb2.Struct:
    """The reply to ``RecentCalls``: each call as its JSON text, newest first."""
    data = json_format.MessageToDict(request)
    session_id = _session_id(data)
    limit = data.get("limit", 50)
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)  # a Struct carries every number as a double
    calls = store.recent_calls(session_id, limit)
    reply = struct_pb2.Struct()
    reply.update({"calls": [json.dumps(call, separators=(",", ":"), ensure_ascii=False) for call in calls]})
    return reply


def _serve(handle: Callable[[SessionStore, struct_pb2.Struct], struct_pb2.Struct], store: SessionStore) -> Any:
    """A blocking handler for ``handle``: a store error ends the call with its status."""

    def handler(request: struct_pb2.Struct, context: grpc.ServicerContext) -> struct_pb2.Struct:
        try:
            return handle(store, request)
        except DSPexError as exc:
            context.abort_with_status(rpc_status_for(exc))
            raise  # pragma: no cover - abort raises

    return handler


def _serve_async(
    handle: Callable[[SessionStore, struct_pb2.Struct], struct_pb2.Struct],
    store: SessionStore,
    executor: Executor | None,
) -> Any:
    """A ``grpc.aio`` handler for ``handle``, run in ``executor`` with the caller's context."""

    async def handler(request: struct_pb2.Struct, context: grpc.aio.ServicerContext[Any, Any]) -> struct_pb2.Struct:
        call = contextvars.copy_context()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, call.run, handle, store, request)
        except DSPexError as exc:
            status = rpc_status_for(exc)
            await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
            raise  # pragma: no cover - abort raises

    return handler


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

    is_aio = isinstance(server, grpc.aio.Server)

    def unary(behavior: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=struct_pb2.Struct.FromString,
            response_serializer=struct_pb2.Struct.SerializeToString,
        )

    handler = grpc.method_handlers_generic_handler(
        ADMIN_SERVICE,
        {
            "ListSessions": unary(list_async if is_aio else list_handler),
            "ReportCalls": unary(_serve_async(_report, store, executor) if is_aio else _serve(_report, store)),
            "RecentCalls": unary(_serve_async(_recent, store, executor) if is_aio else _serve(_recent, store)),
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
    data = ask_admin(
        channel, LIST_SESSIONS, {"pattern": pattern} if pattern else {}, timeout=timeout, metadata=metadata
    )
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
