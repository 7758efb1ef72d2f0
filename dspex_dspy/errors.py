"""The exceptions raised by dspex-dspy.

Every error is a :class:`DSPexError`, and each one is also the builtin exception a Python user
would reach for first, so ``except KeyError`` and ``except DSPexError`` both work::

    DSPexError
    ├── ValidationError          (ValueError)       a value, type, constraint or name was rejected
    ├── BatchUpdateError         (ValueError)       some writes of a batch were rejected
    ├── VariableNotFoundError    (KeyError)         no variable with that name or id
    ├── VariableExistsError      (ValueError)       a variable with that name already exists
    ├── VersionConflictError     (RuntimeError)     expected_version did not match the current one
    ├── SessionNotFoundError     (KeyError)         the session does not exist (or expired)
    ├── SessionExistsError       (ValueError)       a session with that id already exists
    ├── LimitExceededError       (RuntimeError)     a configured limit (size, count, watchers) was hit
    │   └── RateLimitError                          too many calls from one principal: retry later
    ├── VariableLockedError      (RuntimeError)     an optimizer's lease holds the variable
    ├── AuthenticationError      (PermissionError)  no token, or a malformed, badly signed or expired one
    ├── PermissionDeniedError    (PermissionError)  a valid token that does not allow this session or operation
    ├── BridgeUnavailableError   (ConnectionError)  the bridge server or store cannot be reached
    └── BridgeError              (RuntimeError)     the bridge reported a failure no class above
                                                    describes (unimplemented, internal, untyped)

A rejected write never changes anything: the variable keeps its value and version.

Over gRPC each error travels with its fields (the rich error model, :mod:`dspex_dspy.wire_errors`),
and the client raises the same class with the same fields and message that the server raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AuthenticationError",
    "BatchUpdateError",
    "BridgeError",
    "BridgeUnavailableError",
    "DSPexError",
    "LimitExceededError",
    "PermissionDeniedError",
    "RateLimitError",
    "SessionExistsError",
    "SessionNotFoundError",
    "ValidationError",
    "VariableExistsError",
    "VariableLockedError",
    "VariableNotFoundError",
    "VersionConflictError",
]


class DSPexError(Exception):
    """Base class of every error raised by dspex-dspy."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # KeyError's own __str__ would quote the message; every error reads the same way instead.
        return self.message


class ValidationError(DSPexError, ValueError):
    """A value, type or constraint was rejected.

    Attributes:
        variable: the variable's name (empty when not tied to one variable).
        rule: the rule that failed, e.g. ``"max"`` or ``"type"``.
        value: the rejected value.

    Example:
        ``temperature: 2.5 is above the maximum 2.0 (rule max)``
    """

    def __init__(self, variable: str, rule: str, value: Any, detail: str) -> None:
        prefix = f"{variable}: " if variable else ""
        super().__init__(f"{prefix}{detail} (rule {rule})")
        self.variable = variable
        self.rule = rule
        self.value = value
        self.detail = detail


class BatchUpdateError(DSPexError, ValueError):
    """Some writes of a batch were rejected.

    Attributes:
        errors: identifier -> the error that rejected that write.
        new_versions: identifier -> new version of each write that was applied (always empty for
            an atomic batch, which applies all or nothing).
    """

    def __init__(self, errors: dict[str, DSPexError], new_versions: dict[str, int] | None = None) -> None:
        applied = new_versions or {}
        what = "nothing was applied" if not applied else f"{len(applied)} other write(s) were applied"
        details = "; ".join(str(e) for e in errors.values())
        super().__init__(f"{len(errors)} write(s) rejected, {what}: {details}")
        self.errors = errors
        self.new_versions = applied


class VariableNotFoundError(DSPexError, KeyError):
    """No variable has that name or id in this context or session."""

    def __init__(self, identifier: str, session_id: str | None = None) -> None:
        where = f" in session {session_id}" if session_id else ""
        super().__init__(f"Variable not found: {identifier}{where}")
        self.identifier = identifier
        self.session_id = session_id


class VariableExistsError(DSPexError, ValueError):
    """A variable with that name is already defined."""

    def __init__(self, name: str, session_id: str | None = None) -> None:
        where = f" in session {session_id}" if session_id else ""
        super().__init__(f"Variable already exists: {name}{where}")
        self.name = name
        self.session_id = session_id


class VersionConflictError(DSPexError, RuntimeError):
    """A compare-and-swap write named a version that is not the current one; nothing changed."""

    def __init__(self, name: str, expected: int, actual: int) -> None:
        super().__init__(f"{name}: expected version {expected} but the current version is {actual}")
        self.name = name
        self.expected = expected
        self.actual = actual


class SessionNotFoundError(DSPexError, KeyError):
    """The session does not exist, was cleaned up, or expired."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session not found: {session_id}")
        self.session_id = session_id


class SessionExistsError(DSPexError, ValueError):
    """A session with that id already exists."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session already exists: {session_id}")
        self.session_id = session_id


class LimitExceededError(DSPexError, RuntimeError):
    """A configured limit was reached (value size, variables per session, sessions, watchers)."""

    def __init__(self, limit: str, value: int, maximum: int) -> None:
        super().__init__(f"{limit}: {value} exceeds the limit {maximum}")
        self.limit = limit
        self.value = value
        self.maximum = maximum


class VariableLockedError(DSPexError, RuntimeError):
    """An optimization lease holds the variable: only its optimizer may write it (or start on it).

    A write passes anyway when forced (``force=True``), and the forced write is recorded in the
    variable's metadata (``forced_over``). Reads and watches are never refused.

    Attributes:
        name: the variable.
        optimizer_id: the optimizer holding the lease.
        detail: what the caller can do about it.
        others: the other variables of the same write found held (an atomic batch is refused as
            a whole and reports each one); empty for a single write.
    """

    def __init__(
        self, name: str, optimizer_id: str, detail: str = "", others: Sequence[VariableLockedError] = ()
    ) -> None:
        what = detail or "writes need force=True until the optimization stops or its lease expires"
        super().__init__(f"Variable locked: {name} is held by optimizer {optimizer_id}; {what}")
        self.name = name
        self.optimizer_id = optimizer_id
        self.detail = what
        self.others = tuple(others)


class BridgeUnavailableError(DSPexError, ConnectionError):
    """The bridge server or its session store cannot be reached."""


class RateLimitError(LimitExceededError):
    """A principal made more calls than its rate limit allows; nothing was done.

    Attributes:
        principal: who was limited (a token's ``sub``, or the peer address without tokens).
        retry_after: seconds after which a call will be accepted again.
    """

    def __init__(self, principal: str, retry_after: float) -> None:
        DSPexError.__init__(self, f"rate limit exceeded for {principal}: retry after {retry_after:.3f} s")
        self.limit = "rate"
        self.value = -1
        self.maximum = -1
        self.principal = principal
        self.retry_after = retry_after


class AuthenticationError(DSPexError, PermissionError):
    """The bridge requires a token and none was sent, or it is malformed, badly signed or expired."""


class PermissionDeniedError(DSPexError, PermissionError):
    """A valid token was used on a session it does not name, or for an operation outside its perms."""


class BridgeError(DSPexError, RuntimeError):
    """The bridge reported a failure that none of the other classes describes.

    Raised for an RPC the server does not implement, an internal error of the server, or a peer
    that reports a failure (``success=false``, a batch entry) without saying what kind it is.

    Attributes:
        code: the gRPC status code's name (``"UNIMPLEMENTED"``, ``"INTERNAL"``), or ``""`` when the
            failure was reported in a response body rather than as a status.
        reason: the ``google.rpc.ErrorInfo`` reason the server gave, or ``""``.
    """

    def __init__(self, message: str, *, code: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
