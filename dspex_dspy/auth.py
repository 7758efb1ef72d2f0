"""Who may do what on a bridge: token checks per RPC, a rate limit per principal, and an audit trail.

:class:`AsyncBridgeGuard` (a ``grpc.aio`` server's interceptor; :class:`BridgeGuard` is the same
for a blocking server) stands in front of ``BridgeService``. With a secret
it requires a bearer token (:mod:`dspex_dspy.tokens`) on every call except the health service,
checks the permission each RPC needs (:data:`RPC_PERMISSIONS`, and :data:`ADMIN_RPC_PERMISSIONS`
for the operator RPCs about one session) on the session named by the request's ``session_id``, and makes the token's claims the call's principal
(:func:`current_principal`), so the servicer records the token's ``sub`` as the writer. Without a
secret every call passes, as the snakepit contract expects on loopback. In both modes it applies
an optional per-principal token-bucket :class:`RateLimiter` (``RESOURCE_EXHAUSTED`` with a retry
hint) and writes one JSON line per write, rollback, delete, session change and refusal to the
``dspex_dspy.audit`` logger. Audit lines name principals, sessions, variables and versions, never
values, tokens or secrets. :func:`check_exposure` holds the rule for binding beyond loopback.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf import struct_pb2

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import AuthenticationError, PermissionDeniedError, RateLimitError
from dspex_dspy.tls import is_loopback
from dspex_dspy.tokens import Claims, verify_token

__all__ = [
    "AUDIT_LOGGER",
    "AsyncBridgeGuard",
    "EXEMPT_SERVICES",
    "RPC_PERMISSIONS",
    "SESSION_RPCS",
    "BridgeGuard",
    "RateLimiter",
    "check_exposure",
    "current_principal",
    "seconds_left",
]

logger = logging.getLogger(__name__)

AUDIT_LOGGER: Final = "dspex_dspy.audit"
audit_logger = logging.getLogger(AUDIT_LOGGER)

_SERVICE: Final = pb.DESCRIPTOR.services_by_name["BridgeService"].full_name
EXEMPT_SERVICES: Final = frozenset({"grpc.health.v1.Health"})
"""Services served to anyone: a load balancer's health check carries no token."""

RPC_PERMISSIONS: Final[Mapping[str, str | None]] = {
    "Ping": None,
    "InitializeSession": "write",
    "CleanupSession": "write",
    "GetSession": "read",
    "Heartbeat": "read",
    "GetVariable": "read",
    "GetVariables": "read",
    "ListVariables": "read",
    "GetVariableHistory": "read",
    "GetExposedElixirTools": "read",
    "RegisterVariable": "write",
    "ImportVariables": "write",
    "SetVariable": "write",
    "SetVariables": "write",
    "DeleteVariable": "write",
    "RollbackVariable": "write",
    "AddDependency": "write",
    "ExecuteTool": "write",
    "ExecuteStreamingTool": "write",
    "RegisterTools": "write",
    "ExecuteElixirTool": "write",
    "WatchVariables": "watch",
    "StartOptimization": "optimize",
    "StopOptimization": "optimize",
}
"""The permission each ``BridgeService`` RPC needs on the request's session (None: any valid
token). An RPC missing here, or any other service, needs ``admin``."""

OPEN_ADMIN_RPCS: Final = frozenset({"/dspex.bridge.v1.BridgeAdmin/ListSessions"})
"""Operator RPCs any valid token may call: the service itself narrows the answer to what the
token may see (``ListSessions`` lists only the sessions a token without ``admin`` names)."""

ADMIN_RPC_PERMISSIONS: Final = {
    "/dspex.bridge.v1.BridgeAdmin/ReportCalls": "write",
    "/dspex.bridge.v1.BridgeAdmin/RecentCalls": "read",
}
"""Operator RPCs about one session (named by the request's ``session_id`` field) and the
permission each needs on it."""

SESSION_RPCS: Final = frozenset({"InitializeSession", "CleanupSession", "GetSession", "Heartbeat"})
"""RPCs about a whole session: ``admin`` allows them on sessions the token does not name."""

_AUDITED: Final = frozenset(
    {
        "InitializeSession",
        "CleanupSession",
        "RegisterVariable",
        "ImportVariables",
        "SetVariable",
        "SetVariables",
        "DeleteVariable",
        "RollbackVariable",
    }
)
_principal: contextvars.ContextVar[Claims | None] = contextvars.ContextVar("dspex_principal", default=None)
_TOKEN_CACHE_SIZE: Final = 1024


def current_principal() -> Claims | None:
    """The verified token claims of the call being served (None when the bridge takes no tokens)."""
    return _principal.get()


def seconds_left() -> float | None:
    """Seconds until the token of the call being served expires (None without a token)."""
    claims = _principal.get()
    return None if claims is None else claims.exp - time.time()


def _reset(token: contextvars.Token[Claims | None]) -> None:
    # A stream abandoned by its client is closed from another thread's context: nothing to undo.
    with contextlib.suppress(ValueError):
        _principal.reset(token)


def check_exposure(host: str, *, tls: bool, auth: bool, insecure: bool) -> None:
    """Refuse to serve beyond loopback without both TLS and tokens, unless ``insecure`` says so.

    Raises:
        PermissionDeniedError: ``host`` is not loopback, TLS or tokens are missing, and
            ``insecure`` is false. The message names what is missing.
    """
    if is_loopback(host) or (tls and auth):
        return
    missing = " and ".join(what for what, present in (("TLS", tls), ("tokens", auth)) if not present)
    if not insecure:
        raise PermissionDeniedError(
            f"refusing to serve on {host}, which is reachable from other machines, without {missing}: give "
            "--tls-cert/--tls-key and --auth-secret-file (or bind to 127.0.0.1), or pass --insecure to accept the risk"
        )
    logger.warning(
        "INSECURE: serving on %s without %s; anyone who can reach this port can read and change every session",
        host,
        missing,
    )


class RateLimiter:
    """A token bucket per principal: ``rate`` calls per second on average, bursts of ``burst``.

    Thread-safe; idle full buckets are forgotten so memory stays bounded.

    Example:
        >>> limiter = RateLimiter(rate=1.0, burst=2)
        >>> limiter.acquire("alice", now=0.0), limiter.acquire("alice", now=0.0), limiter.acquire("alice", now=0.0)
        (0.0, 0.0, 1.0)
    """

    def __init__(self, rate: float, burst: int | None = None, *, max_principals: int = 10_000) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = int(burst) if burst is not None else max(1, int(rate))
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.max_principals = max_principals
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, principal: str, *, now: float | None = None) -> float:
        """Take one call from ``principal``'s bucket: 0.0 if allowed, else the seconds to wait."""
        at = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(principal, (float(self.burst), at))
            tokens = min(float(self.burst), tokens + (at - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[principal] = (tokens - 1.0, at)
                if len(self._buckets) > self.max_principals:
                    self._forget_idle(at)
                return 0.0
            self._buckets[principal] = (tokens, at)
            return (1.0 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        full = [p for p, (tokens, last) in self._buckets.items() if tokens + (now - last) * self.rate >= self.burst]
        for principal in full:
            del self._buckets[principal]


@dataclass(frozen=True)
class _Call:
    """What the guard knows about one call while serving it."""

    rpc: str
    context: Any
    session: str
    principal: str

    @property
    def peer(self) -> str:
        # Asked only for an audit line or a limit without tokens: most calls never pay for it.
        return str(self.context.peer())


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1": one bucket per client host, not per connection.
    return peer.rpartition(":")[0] or peer


def _audit(call: _Call, outcome: str, *, variable: Any = None, version: Any = None, reason: str = "") -> None:
    if not audit_logger.isEnabledFor(logging.INFO):
        return
    line: dict[str, Any] = {
        "event": "audit",
        "rpc": call.rpc,
        "principal": call.principal,
        "peer": call.peer,
        "session": call.session,
        "variable": variable,
        "version": version,
        "outcome": outcome,
    }
    if reason:
        line["reason"] = reason
    audit_logger.info(json.dumps(line, sort_keys=False, default=str))


def _session_of(request: Any) -> str:
    """The session a request names: its ``session_id`` field (a message's, or a ``Struct``'s)."""
    if request is None:
        return ""
    if isinstance(request, struct_pb2.Struct):
        return request.fields["session_id"].string_value if "session_id" in request.fields else ""
    return getattr(request, "session_id", "")


def _write_target(rpc: str, request: Any) -> Any:
    if rpc == "RegisterVariable":
        return request.name
    if rpc == "ImportVariables":
        return [item.name for item in request.variables]
    if rpc == "SetVariables":
        return sorted(request.updates.keys())
    return getattr(request, "variable_identifier", None)


def _write_version(rpc: str, request: Any, response: Any) -> Any:
    if rpc == "RegisterVariable":
        return request.initial_version or 1
    if rpc == "SetVariable":
        return response.new_version
    if rpc == "SetVariables":
        return dict(response.new_versions)
    if rpc == "ImportVariables":
        return {item.name: item.initial_version or 1 for item in request.variables}
    if rpc == "RollbackVariable":
        return response.variable.version
    return None


@dataclass(frozen=True)
class _Refusal:
    """Why a call is refused: its status, message and trailing metadata (the refusal is audited already)."""

    code: grpc.StatusCode
    message: str
    trailing: tuple[tuple[str, str], ...] = ()


class _GuardCore:
    """The decisions shared by the blocking and the asyncio guards: which calls to wrap, token
    checks, permissions, the rate limit and the audit lines. The guards only add the calling
    convention of their server."""

    def __init__(self, secret: bytes | None = None, limiter: RateLimiter | None = None) -> None:
        self.secret = secret
        self.limiter = limiter
        self._verified: dict[str, Claims] = {}
        self._cache_lock = threading.Lock()

    @property
    def requires_tokens(self) -> bool:
        """Whether calls need a token."""
        return self.secret is not None

    def _route(self, handler_call_details: grpc.HandlerCallDetails) -> tuple[str, str | None] | None:
        """``(rpc, permission)`` of a call to guard, or None for one that runs untouched."""
        method: str = handler_call_details.method
        service, _, rpc = method.lstrip("/").rpartition("/")
        if service in EXEMPT_SERVICES:
            return None
        if (
            self.secret is None
            and self.limiter is None
            and (rpc not in _AUDITED or not audit_logger.isEnabledFor(logging.INFO))
        ):
            return None  # nothing to check or record (asked per call: the audit level may change)
        if service == _SERVICE:
            return rpc, RPC_PERMISSIONS.get(rpc, "admin")
        if method in ADMIN_RPC_PERMISSIONS:
            return rpc, ADMIN_RPC_PERMISSIONS[method]
        return rpc, (None if method in OPEN_ADMIN_RPCS else "admin")

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any] | None, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """``handler`` behind the guard's ``_guard_unary`` / ``_guard_stream`` (health calls pass untouched)."""
        route = self._route(handler_call_details)
        if handler is None or route is None:
            return handler
        rpc, perm = route
        metadata: Sequence[tuple[str, Any]] = handler_call_details.invocation_metadata or ()
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(handler.unary_unary, rpc, perm, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(handler.unary_stream, rpc, perm, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if self.secret is not None:
            # Request-streaming RPCs are not part of the bridge; with tokens, nothing unchecked passes.
            return grpc.unary_unary_rpc_method_handler(self._refuse_streaming(rpc))
        return handler

    def _guard_unary(
        self, behavior: Callable[..., Any], rpc: str, perm: str | None, metadata: Sequence[tuple[str, Any]]
    ) -> Callable[..., Any]:
        raise NotImplementedError

    def _guard_stream(
        self, behavior: Callable[..., Any], rpc: str, perm: str | None, metadata: Sequence[tuple[str, Any]]
    ) -> Callable[..., Any]:
        raise NotImplementedError

    def _refuse_streaming(self, rpc: str) -> Callable[..., Any]:
        raise NotImplementedError

    def _bearer(self, metadata: Sequence[tuple[str, Any]]) -> str | None:
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                return token.strip() if scheme.lower() == "bearer" else ""
        return None

    def _verify(self, token: str) -> Claims:
        assert self.secret is not None
        with self._cache_lock:
            claims = self._verified.get(token)
        if claims is not None:
            if claims.exp <= time.time():
                raise AuthenticationError("the token has expired")
            return claims
        claims = verify_token(self.secret, token)
        with self._cache_lock:
            if len(self._verified) >= _TOKEN_CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = claims
        return claims

    def _decide(
        self, rpc: str, perm: str | None, request: Any, metadata: Sequence[tuple[str, Any]], context: Any
    ) -> tuple[_Call, Claims | None, _Refusal | None]:
        """Check the call: who it is, and the refusal (audited here) if it may not run."""
        session = _session_of(request)
        call = _Call(rpc, context, session, "anonymous")
        claims: Claims | None = None
        refusal: _Refusal | None = None
        try:
            if self.secret is not None:
                token = self._bearer(metadata)
                if not token:
                    raise AuthenticationError(
                        f"{rpc} needs a bearer token: send gRPC metadata 'authorization: Bearer <token>'"
                    )
                try:
                    claims = self._verify(token)
                except AuthenticationError as exc:
                    raise AuthenticationError(f"{rpc} refused: {exc}") from None
                call = _Call(rpc, context, session, claims.sub)
                self._check(rpc, perm, session, claims)
            if self.limiter is not None:
                key = claims.sub if claims is not None else _peer_host(call.peer)
                wait = self.limiter.acquire(key)
                if wait > 0:
                    raise RateLimitError(key, wait)
        except AuthenticationError as exc:
            refusal = _Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except PermissionDeniedError as exc:
            refusal = _Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except RateLimitError as exc:
            refusal = _Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), (("retry-after", f"{exc.retry_after:.3f}"),)
            )
        if refusal is not None:
            _audit(call, refusal.code.name, variable=_write_target(rpc, request), reason=refusal.message)
        return call, claims, refusal

    @staticmethod
    def _check(rpc: str, perm: str | None, session: str, claims: Claims) -> None:
        if perm is None:
            return
        session_admin = rpc in SESSION_RPCS and "admin" in claims.perms
        if perm not in claims.perms and not session_admin:
            have = ", ".join(sorted(claims.perms)) or "none"
            raise PermissionDeniedError(f"{rpc} needs the {perm!r} permission; the token of {claims.sub} has: {have}")
        if perm == "admin" or session_admin or claims.names_session(session):
            return
        raise PermissionDeniedError(f"{rpc}: the token of {claims.sub} does not open session {session!r}")

    def _streaming_refusal(self, rpc: str, context: Any) -> _Refusal:
        refusal = _Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{rpc} is not served to token holders")
        _audit(_Call(rpc, context, "", "anonymous"), refusal.code.name, reason=refusal.message)
        return refusal


@contextlib.contextmanager
def _serving(
    claims: Claims | None, audited: _Call | None = None, request: Any = None, context: Any = None
) -> Iterator[Callable[[Any], Any]]:
    """Serve a call as ``claims``' principal; with ``audited``, audit its answer (passed to the
    yielded function, which returns it) or its failure."""

    def answered(response: Any) -> Any:
        if audited is not None:
            outcome = "OK" if getattr(response, "success", True) else "REJECTED"
            target = _write_target(audited.rpc, request)
            _audit(audited, outcome, variable=target, version=_write_version(audited.rpc, request, response))
        return response

    reset = _principal.set(claims)
    try:
        yield answered
    except Exception:
        if audited is not None:
            code = context.code()
            failed = code.name if isinstance(code, grpc.StatusCode) else "FAILED"
            _audit(audited, failed, variable=_write_target(audited.rpc, request))
        raise
    finally:
        _reset(reset)


class BridgeGuard(_GuardCore, grpc.ServerInterceptor):  # type: ignore[type-arg]
    """The interceptor that authenticates, authorizes, rate-limits and audits calls of a blocking server.

    Args:
        secret: the token secret; None serves everyone (loopback use, the snakepit contract).
        limiter: a per-principal rate limit; None for no limit.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the handler of every guarded call (health calls pass untouched)."""
        return self._wrap(continuation(handler_call_details), handler_call_details)

    def _authorize(
        self, rpc: str, perm: str | None, request: Any, metadata: Sequence[tuple[str, Any]], context: Any
    ) -> tuple[_Call, Claims | None]:
        """Check the call; on refusal end it with its status (raises)."""
        call, claims, refusal = self._decide(rpc, perm, request, metadata, context)
        if refusal is not None:
            if refusal.trailing:
                context.set_trailing_metadata(refusal.trailing)
            context.abort(refusal.code, refusal.message)
        return call, claims

    def _refuse_streaming(self, rpc: str) -> Callable[[Any, Any], Any]:
        def refuse(request: Any, context: Any) -> Any:
            refusal = self._streaming_refusal(rpc, context)
            context.abort(refusal.code, refusal.message)

        return refuse

    def _guard_unary(
        self, behavior: Callable[[Any, Any], Any], rpc: str, perm: str | None, metadata: Sequence[tuple[str, Any]]
    ) -> Callable[[Any, Any], Any]:
        audited = rpc in _AUDITED

        def guarded(request: Any, context: Any) -> Any:
            call, claims = self._authorize(rpc, perm, request, metadata, context)
            with _serving(claims, call if audited else None, request, context) as answered:
                return answered(behavior(request, context))

        return guarded

    def _guard_stream(
        self,
        behavior: Callable[[Any, Any], Iterator[Any]],
        rpc: str,
        perm: str | None,
        metadata: Sequence[tuple[str, Any]],
    ) -> Callable[[Any, Any], Iterator[Any]]:
        def guarded(request: Any, context: Any) -> Iterator[Any]:
            _, claims = self._authorize(rpc, perm, request, metadata, context)
            with _serving(claims):
                yield from behavior(request, context)

        return guarded


class AsyncBridgeGuard(_GuardCore, grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """:class:`BridgeGuard` for a ``grpc.aio`` server: the same decisions, awaited handlers.

    Args:
        secret: the token secret; None serves everyone (loopback use, the snakepit contract).
        limiter: a per-principal rate limit; None for no limit.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Wrap the handler of every guarded call (health calls pass untouched)."""
        return self._wrap(await continuation(handler_call_details), handler_call_details)  # type: ignore[return-value]

    async def _authorize(
        self, rpc: str, perm: str | None, request: Any, metadata: Sequence[tuple[str, Any]], context: Any
    ) -> tuple[_Call, Claims | None]:
        call, claims, refusal = self._decide(rpc, perm, request, metadata, context)
        if refusal is not None:
            await context.abort(refusal.code, refusal.message, trailing_metadata=refusal.trailing)
        return call, claims

    def _refuse_streaming(self, rpc: str) -> Callable[[Any, Any], Awaitable[Any]]:
        async def refuse(request: Any, context: Any) -> Any:
            refusal = self._streaming_refusal(rpc, context)
            await context.abort(refusal.code, refusal.message)

        return refuse

    def _guard_unary(
        self,
        behavior: Callable[[Any, Any], Awaitable[Any]],
        rpc: str,
        perm: str | None,
        metadata: Sequence[tuple[str, Any]],
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        audited = rpc in _AUDITED

        async def guarded(request: Any, context: Any) -> Any:
            call, claims = await self._authorize(rpc, perm, request, metadata, context)
            with _serving(claims, call if audited else None, request, context) as answered:
                return answered(await behavior(request, context))

        return guarded

    def _guard_stream(
        self,
        behavior: Callable[[Any, Any], AsyncIterator[Any]],
        rpc: str,
        perm: str | None,
        metadata: Sequence[tuple[str, Any]],
    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
            _, claims = await self._authorize(rpc, perm, request, metadata, context)
            with _serving(claims):
                async for item in behavior(request, context):
                    yield item

        return guarded
