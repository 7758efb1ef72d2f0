"""The limits every backend enforces, and the size estimate they are judged on.

One :class:`Limits` object describes how large a value and how many variables a context or a
session may hold. :class:`~dspex_dspy.state.LocalState` and the
:class:`~dspex_dspy.store.SessionStore` apply the same checks with the same functions, so a value a
local context accepts can always be moved to a bridge, and a breach reads the same everywhere.
This module is part of the bottom layer: it knows nothing of storage, gRPC or DSPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dspex_dspy.errors import LimitExceededError

__all__ = ["Limits", "StoreLimits", "check_count", "check_value_size", "value_size"]


@dataclass(frozen=True)
class Limits:
    """Limits a backend enforces; a breach raises :class:`LimitExceededError` and changes nothing.

    A store counts every byte it keeps against one of these (see ``docs/reliability.md``). Sizes
    are UTF-8 bytes of strings (names, ids, descriptions, metadata keys and values, the
    constraints as JSON) and the approximate encoded size of values (:func:`value_size`).

    Attributes:
        max_sessions: sessions alive at once (a store's limit; a local context is one session).
        max_variables_per_session: variables in one session or local context.
        max_value_bytes: approximate encoded size of one value (see :func:`value_size`).
        max_watchers: watchers registered at once, over all sessions.
        history_limit: writes remembered per variable (older ones are dropped).
        max_history_bytes: bytes of remembered writes per variable (values and their metadata);
            older writes are dropped past it (the latest is always kept). A store's limit.
        max_session_metadata_bytes: a session's metadata. A store's limit.
        max_variable_metadata_bytes: a variable's metadata (after a write merges into it). A
            store's limit.
        max_description_bytes: a variable's description. A store's limit.
        max_constraints_bytes: a variable's constraints, as JSON. A store's limit.
        max_session_bytes: everything one session holds: its metadata and, per variable, the
            name, id, description, constraints, metadata and remembered writes. A store's limit.
        max_total_bytes: everything a store holds, over all sessions.
    """

    max_sessions: int = 10_000
    max_variables_per_session: int = 100_000
    max_value_bytes: int = 1 << 20
    max_watchers: int = 2048
    history_limit: int = 100
    max_history_bytes: int = 4 << 20
    max_session_metadata_bytes: int = 64 << 10
    max_variable_metadata_bytes: int = 64 << 10
    max_description_bytes: int = 16 << 10
    max_constraints_bytes: int = 256 << 10
    max_session_bytes: int = 256 << 20
    max_total_bytes: int = 2 << 30


#: The name the store has always used for :class:`Limits`.
StoreLimits = Limits


def value_size(type_: str, value: Any) -> int:
    """A cheap estimate of a normalised value's encoded size in bytes.

    Strings count their UTF-8 bytes (characters while short), lists of numbers 8 bytes a number,
    every other value 8 bytes.
    """
    if isinstance(value, str):
        return len(value) if len(value) < 1 << 16 else len(value.encode("utf-8"))
    if type_ == "embedding":
        return 8 * len(value)
    if type_ == "tensor":
        return 8 * len(value["data"])
    return 8


def check_value_size(limits: Limits, name: str, type_: str, value: Any) -> None:
    """Raise :class:`LimitExceededError` when ``value`` is larger than ``limits`` allow."""
    size = value_size(type_, value)
    if size > limits.max_value_bytes:
        raise LimitExceededError(f"{name}: value size in bytes", size, limits.max_value_bytes)


def check_count(limits: Limits, current: int, adding: int) -> None:
    """Raise :class:`LimitExceededError` when ``current + adding`` variables are more than allowed."""
    total = current + adding
    if total > limits.max_variables_per_session:
        raise LimitExceededError("variables per session", total, limits.max_variables_per_session)
