"""Where a :class:`~dspex_dspy.store.SessionStore` keeps its records.

The store owns every rule (validation, versions, TTL, watchers, locking); a storage engine only
holds records. :class:`MemoryStorage` keeps them in process; a distributed engine implements the
same small :class:`Storage` protocol and plugs in without touching the store, the server or the
clients.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from dspex_dspy.types import VariableSpec

__all__ = ["HistoryEntry", "MemoryStorage", "SessionRecord", "Storage", "VariableRecord"]


@dataclass(frozen=True)
class HistoryEntry:
    """One accepted write of a variable: the value it set and who set it."""

    version: int
    value: Any
    timestamp: float
    changed_by: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class VariableRecord:
    """The stored state of one variable (mutable; only the store changes it, under its lock)."""

    id: str
    name: str
    spec: VariableSpec
    value: Any
    description: str
    metadata: dict[str, str]
    version: int
    created_at: float
    updated_at: float
    source: str
    history: deque[HistoryEntry]
    #: Bytes counted for the name, id, description, constraints and metadata (see StoreLimits).
    fixed_bytes: int = 0
    #: Bytes counted for the remembered writes (their values and metadata).
    history_bytes: int = 0


@dataclass
class SessionRecord:
    """The stored state of one session."""

    id: str
    metadata: dict[str, str]
    created_at: float
    ttl: float
    last_access: float
    variables: dict[str, VariableRecord] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    #: True when an import arrived out of creation order; listing re-sorts once by ``created_at``.
    unordered: bool = False
    #: Bytes counted against ``StoreLimits.max_session_bytes`` (metadata plus every variable).
    bytes_used: int = 0


class Storage(Protocol):
    """The records a store keeps: sessions, and per session its variables in creation order."""

    def get_session(self, session_id: str) -> SessionRecord | None:
        """Return the session's record, or None."""

    def put_session(self, record: SessionRecord) -> None:
        """Store a new session record."""

    def delete_session(self, session_id: str) -> SessionRecord | None:
        """Remove a session and return what it held, or None."""

    def sessions(self) -> Iterator[SessionRecord]:
        """Iterate over every session."""

    def session_count(self) -> int:
        """The number of sessions."""


class MemoryStorage:
    """In-process storage: plain dicts, which keep insertion (= creation) order."""

    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}

    def get_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    def put_session(self, record: SessionRecord) -> None:
        self._sessions[record.id] = record

    def delete_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.pop(session_id, None)

    def sessions(self) -> Iterator[SessionRecord]:
        return iter(list(self._sessions.values()))

    def session_count(self) -> int:
        return len(self._sessions)
