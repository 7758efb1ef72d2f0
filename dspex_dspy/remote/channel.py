"""Channels to a bridge server: the options every channel of this package uses, and opening one.

After a server restart a channel retries its connection within 2 s (:data:`CHANNEL_OPTIONS`), and
every unary call carries a deadline (:data:`DEFAULT_CALL_TIMEOUT`). A channel uses TLS and carries
a bearer token as :func:`~dspex_dspy.tls.resolve_security` says (arguments, else the environment).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Final

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from dspex_dspy.errors import BridgeUnavailableError
from dspex_dspy.tls import CA_ENV, Pem, resolve_security, secure_channel

__all__ = ["BALANCE_ENV", "CHANNEL_OPTIONS", "DEFAULT_CALL_TIMEOUT", "channel_args", "open_channel", "wait_ready"]

DEFAULT_CALL_TIMEOUT: Final = 10.0
"""Seconds a unary call may take before it fails with :class:`BridgeUnavailableError`."""

CHANNEL_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
"""Options of the channels this package opens: after a server restart a channel retries its
connection within 2 s (gRPC's defaults start at 1 s and grow to 2 minutes)."""


BALANCE_ENV: Final = "DSPEX_BRIDGE_BALANCE"
"""How a client spreads calls over several bridge nodes: ``failover`` (default: one node at a time,
the next when it becomes unavailable) or ``round_robin`` (calls alternate over the live nodes)."""


def _service_config(policy: str) -> str:
    return json.dumps(
        {
            "loadBalancingConfig": [{policy: {}}],
            "methodConfig": [
                {
                    "name": [{"service": "snakepit.bridge.BridgeService"}],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def _split_address(part: str, whole: str) -> tuple[str, int]:
    host, sep, port = part.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BridgeUnavailableError(
            f"a bridge address must be 'host:port' (or several, comma-separated), got {whole!r}"
        )
    return host, int(port)


def channel_args(
    address: str, options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS
) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The gRPC target and channel options (``options`` plus what several nodes need) for an address.

    ``address`` is ``"host:port"``, or several bridge nodes ``"h1:p1,h2:p2"``: the channel then
    connects to the first node that answers and, when that node becomes unavailable, moves on to
    the next (gRPC ``pick_first`` over the resolved addresses), retrying calls that failed with
    ``UNAVAILABLE`` (up to 5 attempts, backoff 0.05 s to 1 s). With ``DSPEX_BRIDGE_BALANCE=round_robin``
    calls alternate over the live nodes instead. A write whose node died after applying it but
    before answering may so be applied twice (see ``docs/redis.md``).

    Raises:
        BridgeUnavailableError: the address is malformed or a host cannot be resolved.

    Example:
        >>> channel_args("127.0.0.1:50051")[0]
        '127.0.0.1:50051'
        >>> channel_args("127.0.0.1:50051,127.0.0.1:50052")[0]
        'ipv4:127.0.0.1:50051,127.0.0.1:50052'
    """
    if not isinstance(address, str) or ":" not in address:
        raise BridgeUnavailableError(f"a bridge address must be 'host:port', got {address!r}")
    parts = [p for p in address.split(",") if p.strip()]
    if len(parts) == 1:
        return parts[0].strip(), options
    v4: list[str] = []
    v6: list[str] = []
    for part in parts:
        host, port = _split_address(part, address)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise BridgeUnavailableError(f"cannot resolve bridge host {host!r} in {address!r}: {exc}") from None
        ipv4 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET]
        ipv6 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET6]
        if ipv4:
            v4.append(f"{ipv4[0]}:{port}")
        elif ipv6:
            v6.append(f"[{ipv6[0]}]:{port}")
    if v4 and v6:
        raise BridgeUnavailableError(f"bridge nodes must all be IPv4 or all IPv6, got {address!r}")
    target = "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)
    balance = os.environ.get(BALANCE_ENV, "failover") or "failover"
    if balance not in ("failover", "round_robin"):
        raise BridgeUnavailableError(f"{BALANCE_ENV} must be 'failover' or 'round_robin', got {balance!r}")
    policy = "pick_first" if balance == "failover" else "round_robin"
    return target, (*options, ("grpc.enable_retries", 1), ("grpc.service_config", _service_config(policy)))


def open_channel(
    address: str,
    *,
    timeout: float = 5.0,
    options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS,
    root_certificates: Pem | None = None,
    token: str | None = None,
    certificate_chain: Pem | None = None,
    private_key: Pem | None = None,
) -> grpc.Channel:
    """Open a channel to ``address`` and wait up to ``timeout`` seconds for it to be ready.

    The channel is plaintext unless root certificates are given (or ``DSPEX_BRIDGE_CA`` is set),
    and carries a bearer token when one is given (or ``DSPEX_BRIDGE_TOKEN`` is set); see
    :func:`~dspex_dspy.tls.resolve_security`.

    ``address`` may name several bridge nodes, ``"h1:p1,h2:p2"`` (see :func:`channel_args`).
    ``options`` are the channel's options (the worker clients add keepalive and message sizes).

    Raises:
        BridgeUnavailableError: the address is malformed or nothing answered in time (the message
            carries gRPC's last connection error, e.g. a failed TLS handshake).
    """
    target, channel_options = channel_args(address, options)
    security = resolve_security(root_certificates, token, certificate_chain=certificate_chain, private_key=private_key)
    transport, channel = secure_channel(target, security, channel_options)
    answered, reason = wait_ready(transport, timeout)
    if not answered:
        transport.close()
        hint = "" if security.tls else f"; if the bridge uses TLS, pass root_certificates= or set {CA_ENV}"
        raise BridgeUnavailableError(
            f"no bridge server answered at {address} within {timeout:g} s{reason}{hint}"
        ) from None
    return channel


def wait_ready(transport: grpc.Channel, timeout: float) -> tuple[bool, str]:
    """Wait up to ``timeout`` seconds for a bridge to answer on ``transport``.

    One health check that waits for the connection, not ``grpc.channel_ready_future``: that
    future polls connectivity on a thread that lingers inside gRPC after it resolves, and a
    process forked meanwhile skips gRPC's fork handlers (its child may then crash inside gRPC).
    Health checks need no token and are not audited; any answer counts (a peer without the
    health service answers ``UNIMPLEMENTED``).

    Returns:
        ``(answered, reason)``: ``reason`` is gRPC's last connection error as a message suffix
        (e.g. a failed TLS handshake), empty when it answered or said nothing.
    """
    try:
        HealthStub(transport).Check(HealthCheckRequest(), timeout=timeout, wait_for_ready=True)
    except grpc.RpcError as err:
        code = err.code() if callable(getattr(err, "code", None)) else None
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return True, ""
    else:
        return True, ""
    # A call that waited for the connection reports only its deadline: one that fails fast
    # carries the reason the connection failed.
    try:
        HealthStub(transport).Check(HealthCheckRequest(), timeout=1.0)
    except grpc.RpcError as err:
        details = err.details() if callable(getattr(err, "details", None)) else ""
        return False, f" (last error: {details})" if details else ""
    return True, ""
