"""Who may do what on a bridge: token checks per RPC, a rate limit per principal, and an audit trail.

:class:`BridgeGuard` is a ``grpc.ServerInterceptor`` in front of ``BridgeService``. With a secret
it requires a bearer token (:mod:`dspex_dspy.tokens`) on every call except the health service,
checks the permission each RPC needs (:data:`RPC_PERMISSIONS`) on the session named by the
request's ``session_id``, and makes the token's claims the call's principal
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import AuthenticationError, PermissionDeniedError, RateLimitError
from dspex_dspy.tls import is_loopback
from dspex_dspy.tokens import Claims, verify_token

__all__ = [
    "AUDIT_LOGGER",
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


class BridgeGuard(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """The interceptor that authenticates, authorizes, rate-limits and audits bridge calls.

    Args:
        secret: the token secret; None serves everyone (loopback use, the snakepit contract).
        limiter: a per-principal rate limit; None for no limit.
    """

    def __init__(self, secret: bytes | None = None, limiter: RateLimiter | None = None) -> None:
        self.secret = secret
        self.limiter = limiter
        self._verified: dict[str, Claims] = {}
        self._cache_lock = threading.Lock()

    @property
    def requires_tokens(self) -> bool:
        """Whether calls need a token."""
        return self.secret is not None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the handler of every guarded call (health calls pass untouched)."""
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        service, _, rpc = method.lstrip("/").rpartition("/")
        if handler is None or service in EXEMPT_SERVICES:
            return handler
        if self.secret is None and self.limiter is None and rpc not in _AUDITED:
            return handler  # nothing to check or record: the call runs untouched
        perm = RPC_PERMISSIONS.get(rpc, "admin") if service == _SERVICE else "admin"
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

    # ------------------------------------------------------------------ checks

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

    def _authorize(
        self, rpc: str, perm: str | None, request: Any, metadata: Sequence[tuple[str, Any]], context: Any
    ) -> tuple[_Call, Claims | None]:
        """Check the call; on refusal audit it and end it with its status (raises)."""
        session = getattr(request, "session_id", "") if request is not None else ""
        call = _Call(rpc, context, session, "anonymous")
        claims: Claims | None = None
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
            self._refuse(context, call, grpc.StatusCode.UNAUTHENTICATED, str(exc), _write_target(rpc, request))
        except PermissionDeniedError as exc:
            self._refuse(context, call, grpc.StatusCode.PERMISSION_DENIED, str(exc), _write_target(rpc, request))
        except RateLimitError as exc:
            context.set_trailing_metadata((("retry-after", f"{exc.retry_after:.3f}"),))
            self._refuse(context, call, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), _write_target(rpc, request))
        return call, claims

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

    @staticmethod
    def _refuse(context: Any, call: _Call, code: grpc.StatusCode, message: str, variable: Any = None) -> None:
        _audit(call, code.name, variable=variable, reason=message)
        context.abort(code, message)

    def _refuse_streaming(self, rpc: str) -> Callable[[Any, Any], Any]:
        def refuse(request: Any, context: Any) -> Any:
            call = _Call(rpc, context, "", "anonymous")
            self._refuse(context, call, grpc.StatusCode.PERMISSION_DENIED, f"{rpc} is not served to token holders")

        return refuse

    # ------------------------------------------------------------------ wrappers

    def _guard_unary(
        self, behavior: Callable[[Any, Any], Any], rpc: str, perm: str | None, metadata: Sequence[tuple[str, Any]]
    ) -> Callable[[Any, Any], Any]:
        audited = rpc in _AUDITED

        def guarded(request: Any, context: Any) -> Any:
            call, claims = self._authorize(rpc, perm, request, metadata, context)
            reset = _principal.set(claims)
            try:
                if not audited:
                    return behavior(request, context)
                try:
                    response = behavior(request, context)
                except Exception:
                    code = context.code()
                    _audit(
                        call,
                        code.name if isinstance(code, grpc.StatusCode) else "FAILED",
                        variable=_write_target(rpc, request),
                    )
                    raise
                outcome = "OK" if getattr(response, "success", True) else "REJECTED"
                _audit(
                    call, outcome, variable=_write_target(rpc, request), version=_write_version(rpc, request, response)
                )
                return response
            finally:
                _reset(reset)

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
            reset = _principal.set(claims)
            try:
                yield from behavior(request, context)
            finally:
                _reset(reset)

        return guarded
