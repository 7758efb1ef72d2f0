"""The reconnect policy the blocking and the asyncio clients share (pure: no I/O, no threads).

When a watch stream breaks, :class:`Reconnect` decides whether that ends the watch or calls for
another try, how long to wait before it (0.05 s doubling to 2 s, with jitter) and whether the
watch has waited longer than its ``reconnect_timeout``. :class:`Silence` tells when a stream that
delivered nothing (not even the server's periodic heartbeat) for too long is to be taken as dead.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from typing import Final

import grpc

from dspex_dspy.errors import BridgeUnavailableError, DSPexError, SessionNotFoundError, VariableNotFoundError
from dspex_dspy.types import Variable
from dspex_dspy.wire import error_from_rpc

__all__ = [
    "DEFAULT_RECONNECT_TIMEOUT",
    "DEFAULT_SILENCE_TIMEOUT",
    "Backoff",
    "Reconnect",
    "Silence",
    "unlisted",
    "watch_error",
    "watch_is_over",
]

DEFAULT_RECONNECT_TIMEOUT: Final = 30.0
"""Seconds a watch keeps trying to reconnect before it raises."""

DEFAULT_SILENCE_TIMEOUT: Final = 30.0
"""Seconds without any message on a watch stream after which it is taken as dead.

A bridge sends a ``heartbeat`` update on every watch stream after 10 s of silence (its default
``heartbeat_interval``), so a live stream is never silent that long; a peer gone without a
reset (a half-open connection) is. Keep it above the server's heartbeat interval."""

_BACKOFF_INITIAL: Final = 0.05
_BACKOFF_MAX: Final = 2.0


class Backoff:
    """Reconnect delays: 0.05 s doubling up to 2 s, with a little jitter so workers do not stampede."""

    def __init__(self) -> None:
        self._next = _BACKOFF_INITIAL

    def reset(self) -> None:
        """Start again from the shortest delay (after a successful connection)."""
        self._next = _BACKOFF_INITIAL

    def next(self) -> float:
        """The next delay, in seconds."""
        delay = min(_BACKOFF_MAX, self._next * (1.0 + 0.2 * random.random()))
        self._next = min(_BACKOFF_MAX, self._next * 2)
        return delay


def watch_error(exc: BaseException, identifiers: Sequence[str], session_id: str) -> DSPexError:
    """The :class:`DSPexError` a failure of a watch stream stands for."""
    if isinstance(exc, DSPexError):
        return exc
    if isinstance(exc, grpc.RpcError):
        return error_from_rpc(exc, identifier=", ".join(identifiers), session_id=session_id)
    return BridgeUnavailableError(f"the watch stream failed: {exc!r}")


def watch_is_over(error: DSPexError, *, live: bool, ever_connected: bool) -> bool:
    """Whether a watch should raise ``error`` instead of reconnecting.

    A session or variable that is not found ends the watch when it happened on a live connection
    (the session was cleaned up) or before any connection succeeded (a wrong id); while
    reconnecting it may just not be re-created yet, so the watch keeps trying. Errors other than
    "not found" and "unavailable" (a bad identifier, too many watchers) always end it.
    """
    if isinstance(error, (SessionNotFoundError, VariableNotFoundError)):
        return live or not ever_connected
    return not isinstance(error, BridgeUnavailableError)


def unlisted(identifiers: Sequence[str], listing: Iterable[Variable]) -> list[str]:
    """The identifiers that name no variable of ``listing`` (by name or id)."""
    known = {key for var in listing for key in (var.name, var.id)}
    return [ident for ident in dict.fromkeys(identifiers) if ident not in known]


class Reconnect:
    """The state of one watch across its connections: when it gave up, and how long to wait next.

    Args:
        session_id: the watched session (for messages).
        identifiers: the watched names or ids (for messages).
        timeout: seconds a broken watch may take to reconnect before it raises (None: for ever).
    """

    def __init__(self, session_id: str, identifiers: Sequence[str], timeout: float | None) -> None:
        self.session_id = session_id
        self.identifiers = list(identifiers)
        self.timeout = timeout
        self.backoff = Backoff()
        self.ever_connected = False
        self.down_since: float | None = None
        self.last_error: DSPexError | None = None

    def connected(self) -> None:
        """A connection succeeded (its listing arrived)."""
        self.ever_connected = True
        self.down_since = None
        self.backoff.reset()

    def failed(self, exc: BaseException | None, *, live: bool, now: float | None = None) -> float:
        """A connection ended (``exc``, or None for a plain end): the delay before the next try.

        Raises:
            DSPexError: the error that ends the watch, or the last error once reconnecting took
                longer than ``timeout``.
        """
        if exc is not None:
            error = watch_error(exc, self.identifiers, self.session_id)
            self.last_error = error
            if watch_is_over(error, live=live, ever_connected=self.ever_connected):
                raise error from exc
        now = time.monotonic() if now is None else now
        self.down_since = self.down_since if self.down_since is not None else now
        if self.timeout is not None and now - self.down_since > self.timeout:
            raise self.gave_up()
        return self.backoff.next()

    def gave_up(self) -> DSPexError:
        """The error a watch raises when it could not reconnect in time."""
        return self.last_error or BridgeUnavailableError(
            f"the watch of session {self.session_id} could not reconnect within {self.timeout:g} s"
        )


class Silence:
    """When a stream that delivered nothing for ``limit`` seconds is to be taken as dead.

    Args:
        limit: seconds of silence that make a stream dead (None: never).
    """

    def __init__(self, limit: float | None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError(f"silence_timeout must be positive, got {limit}")
        self.limit = limit
        self._heard = time.monotonic()

    def heard(self, now: float | None = None) -> None:
        """A message (any message, heartbeats included) arrived."""
        self._heard = time.monotonic() if now is None else now

    def left(self, now: float | None = None) -> float | None:
        """Seconds until the stream counts as dead (<= 0: it does); None without a limit."""
        if self.limit is None:
            return None
        return self._heard + self.limit - (time.monotonic() if now is None else now)

    def dead(self) -> bool:
        """Whether the stream has been silent longer than the limit (on every cached read: kept cheap)."""
        return self.limit is not None and time.monotonic() - self._heard >= self.limit
