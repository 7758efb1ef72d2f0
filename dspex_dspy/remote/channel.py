"""Channels to a bridge server: the options every channel of this package uses, and opening one.

After a server restart a channel retries its connection within 2 s (:data:`CHANNEL_OPTIONS`), and
every unary call carries a deadline (:data:`DEFAULT_CALL_TIMEOUT`).
"""

from __future__ import annotations

from typing import Final

import grpc

from dspex_dspy.errors import BridgeUnavailableError

__all__ = ["CHANNEL_OPTIONS", "DEFAULT_CALL_TIMEOUT", "open_channel"]

DEFAULT_CALL_TIMEOUT: Final = 10.0
"""Seconds a unary call may take before it fails with :class:`BridgeUnavailableError`."""

CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
"""Options of the channels this package opens: after a server restart a channel retries its
connection within 2 s (gRPC's defaults start at 1 s and grow to 2 minutes)."""


def open_channel(address: str, *, timeout: float = 5.0) -> grpc.Channel:
    """Open an insecure channel to ``address`` and wait up to ``timeout`` seconds for it to be ready.

    Raises:
        BridgeUnavailableError: the address is malformed or nothing answered in time.
    """
    if not isinstance(address, str) or ":" not in address:
        raise BridgeUnavailableError(f"a bridge address must be 'host:port', got {address!r}")
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise BridgeUnavailableError(f"no bridge server answered at {address} within {timeout:g} s") from None
    return channel
