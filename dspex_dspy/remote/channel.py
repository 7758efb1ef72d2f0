"""Channels to a bridge server: the options every channel of this package uses, and opening one.

After a server restart a channel retries its connection within 2 s (:data:`CHANNEL_OPTIONS`), and
every unary call carries a deadline (:data:`DEFAULT_CALL_TIMEOUT`). A channel uses TLS and carries
a bearer token as :func:`~dspex_dspy.tls.resolve_security` says (arguments, else the environment).
"""

from __future__ import annotations

from typing import Final

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import BridgeUnavailableError
from dspex_dspy.tls import CA_ENV, Pem, resolve_security, secure_channel

__all__ = ["CHANNEL_OPTIONS", "DEFAULT_CALL_TIMEOUT", "open_channel"]

DEFAULT_CALL_TIMEOUT: Final = 10.0
"""Seconds a unary call may take before it fails with :class:`BridgeUnavailableError`."""

CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
"""Options of the channels this package opens: after a server restart a channel retries its
connection within 2 s (gRPC's defaults start at 1 s and grow to 2 minutes)."""


def open_channel(
    address: str,
    *,
    timeout: float = 5.0,
    options: tuple[tuple[str, int], ...] = CHANNEL_OPTIONS,
    root_certificates: Pem | None = None,
    token: str | None = None,
    certificate_chain: Pem | None = None,
    private_key: Pem | None = None,
) -> grpc.Channel:
    """Open a channel to ``address`` and wait up to ``timeout`` seconds for it to be ready.

    The channel is plaintext unless root certificates are given (or ``DSPEX_BRIDGE_CA`` is set),
    and carries a bearer token when one is given (or ``DSPEX_BRIDGE_TOKEN`` is set); see
    :func:`~dspex_dspy.tls.resolve_security`.

    ``options`` are the channel's options (the worker clients add keepalive and message sizes).

    Raises:
        BridgeUnavailableError: the address is malformed or nothing answered in time (the message
            carries gRPC's last connection error, e.g. a failed TLS handshake).
    """
    if not isinstance(address, str) or ":" not in address:
        raise BridgeUnavailableError(f"a bridge address must be 'host:port', got {address!r}")
    security = resolve_security(root_certificates, token, certificate_chain=certificate_chain, private_key=private_key)
    transport, channel = secure_channel(address, security, options)
    try:
        grpc.channel_ready_future(transport).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        reason = _connection_error(transport)
        transport.close()
        hint = "" if security.tls else f"; if the bridge uses TLS, pass root_certificates= or set {CA_ENV}"
        raise BridgeUnavailableError(
            f"no bridge server answered at {address} within {timeout:g} s{reason}{hint}"
        ) from None
    return channel


def _connection_error(channel: grpc.Channel) -> str:
    """gRPC's last connection error on a channel that never became ready, as a message suffix."""
    try:
        pb_grpc.BridgeServiceStub(channel).Ping(pb.PingRequest(), timeout=1.0)
    except grpc.RpcError as err:
        details = err.details() if callable(getattr(err, "details", None)) else ""
        return f" (last error: {details})" if details else ""
    return ""
