"""Signed session tokens: the capabilities a bridge checks on every call.

A token is a standard JWT signed with HS256 (PyJWT) under a secret that every bridge node of a
fleet shares, so any node verifies a token minted by any other without asking anyone. Its claims
say who holds it (``sub``), which sessions it opens (``sessions``: a list of ids, or ``"*"`` for
all), what it may do there (``perms``, a subset of :data:`PERMISSIONS`) and until when (``exp``).
:func:`mint_token` makes one, :func:`verify_token` checks one and returns its :class:`Claims`.
Nothing here ever puts a secret or a token into an error message.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt

from dspex_dspy.errors import AuthenticationError, ValidationError

__all__ = [
    "ALGORITHM",
    "ALL_SESSIONS",
    "MIN_SECRET_BYTES",
    "PERMISSIONS",
    "Claims",
    "load_secret",
    "mint_token",
    "verify_token",
]

ALGORITHM: Final = "HS256"
ALL_SESSIONS: Final = "*"
"""The ``sessions`` claim that opens every session."""
PERMISSIONS: Final = ("read", "write", "watch", "optimize", "admin")
"""What a token may allow: read variables and sessions, write them, watch them, run optimizations,
and administer sessions it does not name."""
MIN_SECRET_BYTES: Final = 32
"""The shortest secret accepted: HS256 wants a key at least as long as its 256-bit hash."""
_REQUIRED_CLAIMS: Final = ("sub", "sessions", "perms", "exp")


@dataclass(frozen=True)
class Claims:
    """What a verified token allows.

    Attributes:
        sub: who holds it; recorded as the writer of every write made with it.
        sessions: the session ids it opens, or None for all sessions (``"*"``).
        perms: its permissions, a subset of :data:`PERMISSIONS`.
        exp: when it expires, in wall-clock seconds since the epoch.
    """

    sub: str
    sessions: frozenset[str] | None
    perms: frozenset[str]
    exp: float

    def names_session(self, session_id: str) -> bool:
        """Whether the token names ``session_id`` (or every session)."""
        return self.sessions is None or session_id in self.sessions

    def allows(self, perm: str, session_id: str | None) -> bool:
        """Whether the token grants ``perm`` on ``session_id`` (None: a call about no session)."""
        if perm not in self.perms:
            return False
        return session_id is None or self.names_session(session_id)


def _check_perms(perms: Iterable[str]) -> frozenset[str]:
    if isinstance(perms, str):
        perms = [p for p in perms.split(",") if p.strip()]
    chosen = frozenset(p.strip() for p in perms)
    unknown = sorted(chosen - set(PERMISSIONS))
    if unknown:
        raise ValidationError("", "perms", unknown, f"unknown permission(s) {unknown}; known: {list(PERMISSIONS)}")
    return chosen


def _as_key(secret: bytes | str) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_SECRET_BYTES:
        raise ValidationError(
            "", "secret", None, f"a token secret must be at least {MIN_SECRET_BYTES} bytes long, got {len(key)}"
        )
    return key


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a token secret from a file (surrounding whitespace and newlines are dropped).

    Raises:
        ValidationError: the file cannot be read, or holds fewer than :data:`MIN_SECRET_BYTES` bytes.

    Example:
        >>> load_secret("/run/secrets/dspex-bridge")  # doctest: +SKIP
    """
    try:
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValidationError(
            "", "secret", None, f"cannot read the secret file {os.fspath(path)}: {exc.strerror}"
        ) from None
    return _as_key(data)


def mint_token(
    secret: bytes | str,
    *,
    sub: str,
    sessions: Iterable[str] | str,
    perms: Iterable[str] | str,
    ttl: float,
    now: float | None = None,
) -> str:
    """Sign a token for ``sub`` that grants ``perms`` on ``sessions`` for ``ttl`` seconds.

    Args:
        secret: the fleet's shared secret (at least :data:`MIN_SECRET_BYTES` bytes).
        sub: who will hold the token.
        sessions: the session ids it opens, or ``"*"`` for all.
        perms: permissions from :data:`PERMISSIONS` (an iterable or a comma-separated string).
        ttl: seconds until it expires.
        now: the issue time (default: the current wall-clock time).

    Raises:
        ValidationError: an empty ``sub``, no session, an unknown permission, a ttl that is not
            positive or a secret that is too short.

    Example:
        >>> token = mint_token("s" * 32, sub="worker-1", sessions=["ctx_1"], perms="read,watch", ttl=3600)
        >>> verify_token("s" * 32, token).perms == {"read", "watch"}
        True
    """
    if not isinstance(sub, str) or not sub:
        raise ValidationError("", "sub", sub, "a token needs a non-empty sub (who holds it)")
    if not ttl > 0:
        raise ValidationError("", "ttl", ttl, f"a token's ttl must be positive, got {ttl}")
    if sessions == ALL_SESSIONS:
        session_claim: str | list[str] = ALL_SESSIONS
    else:
        session_claim = [sessions] if isinstance(sessions, str) else list(sessions)
        if not session_claim or not all(isinstance(s, str) and s for s in session_claim):
            raise ValidationError("", "sessions", session_claim, "a token needs session ids (non-empty strings) or '*'")
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {
        "sub": sub,
        "sessions": session_claim,
        "perms": sorted(_check_perms(perms)),
        "iat": int(issued),
        "exp": issued + float(ttl),
    }
    return jwt.encode(payload, _as_key(secret), algorithm=ALGORITHM)


def verify_token(secret: bytes | str, token: str, now: float | None = None) -> Claims:
    """Check a token's signature, expiry and claims; return what it allows.

    A token is valid until the exact time its ``exp`` names (fractions of a second included), the
    rule the bridge applies to a token it has already checked. (PyJWT's own check truncates ``exp``
    to a whole second, which would refuse a token up to a second early; so it is made here.)

    Args:
        secret: the fleet's shared secret.
        token: the token to check.
        now: the time to check the expiry against (default: the current wall-clock time).

    Raises:
        AuthenticationError: the token is malformed, signed with another secret, expired, or
            lacks a claim. The message says which, never the token or the secret.
    """
    try:
        payload = jwt.decode(
            token,
            _as_key(secret),
            algorithms=[ALGORITHM],
            options={"require": list(_REQUIRED_CLAIMS), "verify_exp": False},
        )
    except jwt.InvalidSignatureError:
        raise AuthenticationError("the token's signature is not valid for this bridge") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthenticationError(f"the token lacks the {exc.claim!r} claim") from None
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError(f"the token is malformed ({type(exc).__name__})") from None
    exp = payload["exp"]
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
        raise AuthenticationError("the token's exp claim is not a time (seconds since the epoch)")
    if exp <= (time.time() if now is None else now):
        raise AuthenticationError("the token has expired")
    sub, sessions, perms = payload["sub"], payload["sessions"], payload["perms"]
    if not isinstance(sub, str) or not sub:
        raise AuthenticationError("the token's sub claim is not a non-empty string")
    if sessions == ALL_SESSIONS:
        allowed: frozenset[str] | None = None
    elif isinstance(sessions, list) and all(isinstance(s, str) for s in sessions):
        allowed = frozenset(sessions)
    else:
        raise AuthenticationError("the token's sessions claim is neither a list of ids nor '*'")
    if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
        raise AuthenticationError("the token's perms claim is not a list of permissions")
    return Claims(sub=sub, sessions=allowed, perms=frozenset(perms) & set(PERMISSIONS), exp=float(exp))
