"""Prometheus metrics for a bridge: RPC latency by method and status, state gauges, watch lag, writes.

:class:`BridgeMetrics` owns a prometheus-client registry and serves it over HTTP at ``/metrics``
(``dspex-bridge serve --metrics-port N``). Its interceptor (:class:`AsyncMetricsInterceptor` for
the bridge's ``grpc.aio`` server, :class:`MetricsInterceptor` for a blocking ``grpc.server``) times
every unary RPC and counts the writes; for each message a ``WatchVariables`` stream sends it
records the watch lag (from the write to the moment its update leaves). Gauges are read from the store and the servicer at scrape time, so they cost nothing
between scrapes.

Metrics (all prefixed ``dspex_``):

- ``dspex_rpc_duration_seconds{method, code}`` histogram of unary RPCs;
- ``dspex_writes_total{method}`` accepted writes (set, batch, rollback, register, delete);
- ``dspex_watch_lag_seconds`` histogram; ``dspex_watch_messages_total{update_type}``;
- ``dspex_sessions``, ``dspex_variables``, ``dspex_open_watches`` gauges.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dspex_dspy.server import BridgeServer
from dspex_dspy.wire import from_timestamp

__all__ = ["AsyncMetricsInterceptor", "BridgeMetrics", "MetricsInterceptor"]

WRITE_METHODS: Final = frozenset(
    {"SetVariable", "SetVariables", "RollbackVariable", "RegisterVariable", "DeleteVariable"}
)
_LAG_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _code_of(context: Any, failed: bool) -> str:
    code = None
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if failed else "OK"


def _finished(metrics: BridgeMetrics, method: str, started: float, context: Any, failed: bool) -> None:
    """Record one unary call that ran since ``started`` (a ``perf_counter`` reading)."""
    code = _code_of(context, failed)
    metrics.rpc_duration.labels(method, code).observe(time.perf_counter() - started)
    if code == "OK" and method in WRITE_METHODS:
        metrics.writes.labels(method).inc()


def _sent(metrics: BridgeMetrics, message: Any) -> None:
    """Record one message leaving on a watch stream."""
    kind = getattr(message, "update_type", "")
    metrics.watch_messages.labels(kind or "unknown").inc()
    if kind == "value_change" and message.HasField("timestamp"):
        metrics.watch_lag.observe(max(0.0, time.time() - from_timestamp(message.timestamp)))


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


class MetricsInterceptor(_Interceptor):
    """Times unary RPCs, counts writes and measures watch lag on a blocking ``grpc.server`` (see the module doc)."""

    def __init__(self, metrics: BridgeMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._timed(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and method == "WatchVariables":
            return grpc.unary_stream_rpc_method_handler(
                self._lagged(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _timed(self, method: str, inner: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        metrics = self._metrics

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            failed = True
            try:
                response = inner(request, context)
                failed = False
                return response
            finally:
                _finished(metrics, method, started, context, failed)

        return call

    def _lagged(self, inner: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        metrics = self._metrics

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            for message in inner(request, context):
                _sent(metrics, message)
                yield message

        return stream


class AsyncMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """:class:`MetricsInterceptor` for a ``grpc.aio`` server (the bridge's own): awaited handlers."""

    def __init__(self, metrics: BridgeMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._timed(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and method == "WatchVariables":
            return grpc.unary_stream_rpc_method_handler(
                self._lagged(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _timed(self, method: str, inner: Callable[[Any, Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        metrics = self._metrics

        async def call(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            failed = True
            try:
                response = await inner(request, context)
                failed = False
                return response
            finally:
                _finished(metrics, method, started, context, failed)

        return call

    def _lagged(self, inner: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        metrics = self._metrics

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            async for message in inner(request, context):
                _sent(metrics, message)
                yield message

        return stream


class _StateCollector(Collector):
    """Gauges read from the served store and servicer at scrape time."""

    def __init__(self) -> None:
        self.server: BridgeServer | None = None

    def collect(self) -> Iterator[Metric]:
        server = self.server
        if server is None:
            return
        store = server.store
        yield GaugeMetricFamily("dspex_sessions", "Live sessions on this bridge.", value=len(store.session_ids()))
        yield GaugeMetricFamily("dspex_variables", "Variables over every live session.", value=store.variable_total())
        yield GaugeMetricFamily(
            "dspex_open_watches", "WatchVariables streams open now.", value=server.servicer.active_watches
        )


class BridgeMetrics:
    """The metrics of one bridge server and the HTTP endpoint that serves them.

    Example:
        >>> metrics = BridgeMetrics()
        >>> server, _ = create_server(interceptors=[metrics.interceptor()])  # doctest: +SKIP
        >>> metrics.watch_server(server); metrics.serve("127.0.0.1", 9108)  # doctest: +SKIP
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rpc_duration = Histogram(
            "dspex_rpc_duration_seconds",
            "Unary RPC latency, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.writes = Counter("dspex_writes", "Accepted writes, by RPC.", ["method"], registry=self.registry)
        self.watch_lag = Histogram(
            "dspex_watch_lag_seconds",
            "Seconds from a write to its update leaving on a watch stream.",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        self.watch_messages = Counter(
            "dspex_watch_messages",
            "Messages sent on watch streams, by update type.",
            ["update_type"],
            registry=self.registry,
        )
        self._state = _StateCollector()
        self.registry.register(self._state)
        self._http: Any = None
        self._thread: Any = None
        self.url = ""

    def interceptor(self) -> AsyncMetricsInterceptor:
        """The ``grpc.aio`` server interceptor feeding these metrics (pass it to ``create_server``)."""
        return AsyncMetricsInterceptor(self)

    def blocking_interceptor(self) -> MetricsInterceptor:
        """The interceptor feeding these metrics from a blocking ``grpc.server`` embedding the servicer."""
        return MetricsInterceptor(self)

    def watch_server(self, server: BridgeServer) -> None:
        """Report the sessions, variables and open watches of ``server``."""
        self._state.server = server

    def serve(self, host: str, port: int) -> str:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0: a free port) in a daemon thread; return the URL."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/metrics"
        return self.url

    def close(self) -> None:
        """Stop the HTTP endpoint. Idempotent."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
