"""The ``dspex-bridge`` command: run a standalone bridge server, ping one, or operate one.

``dspex-bridge serve`` starts a :class:`~dspex_dspy.server.BridgeServer` over a fresh
:class:`~dspex_dspy.store.SessionStore` (swept periodically) whose records live in this process
(``--storage memory``, the default) or in Redis (``--storage redis://HOST:PORT/DB``: any number of
nodes started with the same URL serve the same sessions, and a restart loses nothing), prints exactly one line
``dspex-bridge listening on HOST:PORT`` once it accepts calls (with ``--port 0`` the port is the one
the OS chose, so scripts and tests can read it), and stops gracefully on SIGTERM or SIGINT, exiting
0. ``dspex-bridge ping ADDRESS`` sends a ``Ping`` and prints the reply. ``dspex-bridge token``
prints a signed session token. ``serve`` takes TLS material (``--tls-cert``, ``--tls-key``,
``--tls-client-ca``), a token secret (``--auth-secret-file``) and a rate limit, and refuses to bind a
non-loopback address without both TLS and tokens unless ``--insecure`` is given. The operator commands
``sessions``, ``list``, ``get``, ``set``, ``history``, ``rollback`` and ``watch`` (with ``--json``
for scripts, and exit codes that say what went wrong) are in :mod:`dspex_dspy.commands`.
``dspex-bridge dashboard --bridge ADDRESS`` serves the live dashboard of a bridge, and ``serve
--dashboard-port N`` serves it beside the bridge (both need the ``dashboard`` extra). Also
runnable as ``python -m dspex_dspy`` or ``python -m dspex_dspy.cli``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.auth import RateLimiter
from dspex_dspy.commands import COMMANDS, add_bridge_option, add_commands, run
from dspex_dspy.errors import DSPexError
from dspex_dspy.logs import configure_logging
from dspex_dspy.server import DEFAULT_HEARTBEAT_INTERVAL, ServerLimits, create_server
from dspex_dspy.store import SessionStore, Storage, StoreLimits
from dspex_dspy.tls import CA_ENV, ServerTLS, read_pem, resolve_security, secure_channel
from dspex_dspy.tokens import PERMISSIONS, load_secret, mint_token
from dspex_dspy.wire import error_from_rpc, from_timestamp

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

_DEFAULT_STORE = StoreLimits()
_DEFAULT_SERVER = ServerLimits()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``dspex-bridge`` argument parser (``serve``, ``ping``, ``token`` and the operator subcommands)."""
    parser = argparse.ArgumentParser(
        prog="dspex-bridge",
        description="Serve, ping or operate a dspex-dspy bridge (snakepit.bridge.BridgeService over gRPC).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a standalone bridge server until SIGTERM/SIGINT")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, loopback)")
    serve.add_argument(
        "--port", type=_port, default=50051, help="port to bind; 0 picks a free one (default: %(default)s)"
    )
    serve.add_argument(
        "--ttl", type=_positive_float, default=3600.0, help="session TTL in seconds (default: %(default)s)"
    )
    serve.add_argument(
        "--sweep-interval",
        type=_positive_float,
        default=60.0,
        help="seconds between expiry sweeps (default: %(default)s)",
    )
    serve.add_argument("--max-sessions", type=_positive_int, default=_DEFAULT_STORE.max_sessions)
    serve.add_argument(
        "--max-variables", type=_positive_int, default=_DEFAULT_STORE.max_variables_per_session, help="per session"
    )
    serve.add_argument(
        "--max-value-bytes", type=_positive_int, default=_DEFAULT_STORE.max_value_bytes, help="largest value accepted"
    )
    serve.add_argument(
        "--max-watchers", type=_positive_int, default=_DEFAULT_SERVER.max_watchers, help="concurrent watch streams"
    )
    serve.add_argument(
        "--max-watchers-per-session",
        type=_positive_int,
        default=None,
        help="watch streams of one session (default: half of --max-watchers)",
    )
    serve.add_argument(
        "--max-watchers-per-client",
        type=_positive_int,
        default=None,
        help="watch streams of one client connection (default: a quarter of --max-watchers)",
    )
    serve.add_argument(
        "--max-session-bytes",
        type=_positive_int,
        default=_DEFAULT_STORE.max_session_bytes,
        help="bytes one session may hold: metadata, variables, history (default: %(default)s)",
    )
    serve.add_argument(
        "--max-history-bytes",
        type=_positive_int,
        default=_DEFAULT_STORE.max_history_bytes,
        help="bytes of remembered writes per variable (default: %(default)s)",
    )
    serve.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        help="seconds of silence before a watch stream sends a heartbeat (default: %(default)s)",
    )
    serve.add_argument(
        "--grace", type=float, default=5.0, help="seconds calls in flight get to finish on stop (default: %(default)s)"
    )
    serve.add_argument(
        "--storage",
        default="memory",
        help="where sessions live: 'memory' (this process only) or redis://HOST:PORT/DB, shared by every "
        "node started with the same URL (default: %(default)s)",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve over TLS")
    serve.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    serve.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    serve.add_argument(
        "--auth-secret-file", metavar="PATH", help="require tokens signed with the secret in PATH (>= 32 bytes)"
    )
    serve.add_argument(
        "--rate-limit",
        type=_positive_float,
        metavar="PER_SECOND",
        help="calls per second per principal (default: none)",
    )
    serve.add_argument("--rate-burst", type=_positive_int, metavar="N", help="burst size of --rate-limit")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without TLS and tokens (logs a warning at every start)",
    )
    serve.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="log lines as text or one JSON object each"
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port; default: off)",
    )

    serve.add_argument(
        "--dashboard-port",
        type=_port,
        default=None,
        help="serve the live dashboard beside the bridge on this port (0 picks one; needs the dashboard extra)",
    )
    serve.add_argument(
        "--dashboard-host", default="127.0.0.1", help="interface the dashboard binds (default: %(default)s, loopback)"
    )
    serve.add_argument(
        "--dashboard-ca",
        metavar="PEM",
        help="root certificates the dashboard trusts to reach this bridge over TLS (default: $DSPEX_BRIDGE_CA)",
    )

    dashboard = commands.add_parser("dashboard", help="serve the live dashboard of a bridge until SIGTERM/SIGINT")
    add_bridge_option(dashboard, "the bridge to show")
    dashboard.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, loopback)")
    dashboard.add_argument("--port", type=_port, default=8765, help="port to bind (default: %(default)s)")
    dashboard.add_argument("--ca", metavar="PEM", help="root certificates of a TLS bridge (default: $DSPEX_BRIDGE_CA)")

    ping = commands.add_parser("ping", help="send a Ping to a bridge and print the reply")
    ping.add_argument("address", help="HOST:PORT of the bridge")
    ping.add_argument("--message", default="ping", help="text to send (default: %(default)s)")
    ping.add_argument("--timeout", type=_positive_float, default=5.0, help="seconds to wait (default: %(default)s)")
    ping.add_argument("--ca", metavar="PEM", help="root certificates to trust: use TLS (default: $DSPEX_BRIDGE_CA)")
    ping.add_argument("--cert", metavar="PEM", help="client certificate, for mutual TLS")
    ping.add_argument("--key", metavar="PEM", help="private key of --cert")
    ping.add_argument("--token", help="bearer token (default: $DSPEX_BRIDGE_TOKEN)")

    token = commands.add_parser("token", help="print a signed session token")
    token.add_argument("--secret-file", required=True, metavar="PATH", help="the fleet's token secret")
    token.add_argument("--sub", required=True, help="who the token is for")
    token.add_argument(
        "--session", action="append", required=True, metavar="ID", help="a session it opens (repeatable; '*' = all)"
    )
    token.add_argument("--perms", required=True, help=f"comma-separated, from {','.join(PERMISSIONS)}")
    token.add_argument("--ttl", type=_positive_float, default=3600.0, help="seconds of validity (default: %(default)s)")

    add_commands(commands)
    return parser


def _storage(spec: str) -> Storage | None:
    """The storage engine named by ``--storage`` (None = the in-process default)."""
    if spec == "memory":
        return None
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from dspex_dspy.store.redis_storage import RedisStorage  # only nodes on Redis need redis-py

        return RedisStorage(spec)
    raise DSPexError(f"--storage must be 'memory' or a redis://HOST:PORT/DB URL, got {spec!r}")


def _serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, json_lines=args.log_format == "json")
    try:
        storage = _storage(args.storage)
    except DSPexError as exc:
        print(f"dspex-bridge: {exc}", file=sys.stderr, flush=True)
        return 1
    store = SessionStore(
        storage=storage,
        default_ttl=args.ttl,
        limits=StoreLimits(
            max_sessions=args.max_sessions,
            max_variables_per_session=args.max_variables,
            max_value_bytes=args.max_value_bytes,
            max_watchers=args.max_watchers,
            max_session_bytes=args.max_session_bytes,
            max_history_bytes=args.max_history_bytes,
        ),
    )
    limits = ServerLimits(
        max_value_bytes=args.max_value_bytes,
        max_watchers=args.max_watchers,
        max_watchers_per_session=args.max_watchers_per_session,
        max_watchers_per_principal=args.max_watchers_per_client,
        max_message_bytes=max(_DEFAULT_SERVER.max_message_bytes, 2 * args.max_value_bytes),
    )
    try:
        if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
            raise DSPexError("--tls-cert and --tls-key go together, and --tls-client-ca needs both")
        tls = ServerTLS.load(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
        secret = load_secret(args.auth_secret_file) if args.auth_secret_file else None
    except DSPexError as exc:
        print(f"dspex-bridge: {exc}", file=sys.stderr, flush=True)
        store.close()
        return 2
    limiter = RateLimiter(args.rate_limit, args.rate_burst) if args.rate_limit else None
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        metrics = None
        try:
            interceptors = []
            if args.metrics_port is not None:
                try:
                    from dspex_dspy.metrics import BridgeMetrics
                except ImportError as exc:
                    print(
                        f"dspex-bridge: --metrics-port needs prometheus-client ({exc}); "
                        'install it with: pip install "dspex-dspy[metrics]"',
                        file=sys.stderr,
                        flush=True,
                    )
                    store.close()
                    return 1
                metrics = BridgeMetrics()
                interceptors.append(metrics.interceptor())
            server, _ = create_server(
                store,
                args.host,
                args.port,
                limits=limits,
                heartbeat_interval=args.heartbeat_interval,
                tls=tls,
                auth_secret=secret,
                rate_limit=limiter,
                insecure=args.insecure,
                interceptors=interceptors,
            )
            if metrics is not None:
                metrics.watch_server(server)
                metrics.serve(args.host, args.metrics_port)
        except (DSPexError, OSError, ValueError) as exc:  # ValueError: a bad DSPEX_EVENT_LOOP
            print(f"dspex-bridge: {exc}", file=sys.stderr, flush=True)
            store.close()
            store.storage.close()
            return 1
        store.start_sweeper(args.sweep_interval)
        server.start()
        print(f"dspex-bridge listening on {server.address}", flush=True)
        if metrics is not None:
            print(f"dspex-bridge metrics on {metrics.url}", flush=True)
        dashboard = None
        if args.dashboard_port is not None:
            try:
                dashboard = _start_dashboard(
                    _local_address(server.address), args.dashboard_host, args.dashboard_port, args.dashboard_ca
                )
            except DSPexError as exc:
                print(f"dspex-bridge: {exc}", file=sys.stderr, flush=True)
                server.stop(0)
                store.close()
                store.storage.close()
                if metrics is not None:
                    metrics.close()
                return 1
            print(f"dspex-bridge dashboard on {dashboard.url}", flush=True)
        # Wait in short slices so the signal handler runs promptly on the main thread.
        while not stop_requested.wait(0.5):
            pass
        if dashboard is not None:
            dashboard.stop()
        server.stop(args.grace)
        store.close()
        store.storage.close()
        if metrics is not None:
            metrics.close()
        logger.info("stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _roots(path: str | None) -> bytes | None:
    """The CA at ``path`` (else ``$DSPEX_BRIDGE_CA``) for the dashboard's channel; None = plaintext."""
    path = path or os.environ.get(CA_ENV) or None
    return read_pem(path, "tls CA") if path is not None else None


def _start_dashboard(bridge: str, host: str, port: int, ca: str | None) -> Any:
    """Start the dashboard on a background thread (see :class:`~dspex_dspy.dashboard.DashboardServer`).

    Raises:
        DSPexError: the dashboard extra is missing, the CA is unreadable or the port is taken.
    """
    from dspex_dspy.dashboard import DashboardServer

    try:
        server = DashboardServer(bridge, host=host, port=port, root_certificates=_roots(ca))
        return server.start()
    except (ImportError, RuntimeError) as exc:
        raise DSPexError(str(exc)) from None


def _local_address(address: str) -> str:
    """``address`` with a wildcard host replaced by loopback (what a process beside the server dials)."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::", ""):
        return f"127.0.0.1:{port}"
    return address


def _dashboard(args: argparse.Namespace) -> int:
    configure_logging("INFO")
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server = _start_dashboard(args.bridge, args.host, args.port, args.ca)
        except DSPexError as exc:
            print(f"dspex-bridge: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"dspex-bridge dashboard on {server.url} (bridge {args.bridge})", flush=True)
        while not stop_requested.wait(0.5):
            pass
        server.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ping(args: argparse.Namespace) -> int:
    try:
        security = resolve_security(args.ca, args.token, certificate_chain=args.cert, private_key=args.key)
        _, channel = secure_channel(args.address, security)
    except DSPexError as exc:
        print(f"dspex-bridge: {exc}", file=sys.stderr, flush=True)
        return 2
    with channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        try:
            reply = stub.Ping(pb.PingRequest(message=args.message), timeout=args.timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            print(f"dspex-bridge: ping {args.address} failed: {error_from_rpc(err)}", file=sys.stderr, flush=True)
            return 1
    server_time = from_timestamp(reply.server_time)
    print(f"{reply.message} (server_time {server_time:.6f})", flush=True)
    return 0


def _token(args: argparse.Namespace) -> int:
    sessions = "*" if "*" in args.session else args.session
    try:
        secret = load_secret(args.secret_file)
        print(mint_token(secret, sub=args.sub, sessions=sessions, perms=args.perms, ttl=args.ttl), flush=True)
    except DSPexError as exc:
        print(f"dspex-bridge: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dspex-bridge`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Example:
        >>> main(["ping", "127.0.0.1:50051"])  # doctest: +SKIP
        pong: ping (server_time 1767225600.000000)
        0
    """
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args)
    if args.command == "dashboard":
        return _dashboard(args)
    if args.command in COMMANDS:
        return run(args)
    return _ping(args)


if __name__ == "__main__":
    sys.exit(main())
