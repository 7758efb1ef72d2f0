"""Records shared by the store, the server and the clients: updates, history entries, batch outcomes.

These plain, immutable records describe what happened to variables and sessions. They live
outside :mod:`dspex_dspy.store` so that client code (workers, remote stores) can use them without
importing the store; :mod:`dspex_dspy.store` re-exports them under their old names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dspex_dspy.errors import DSPexError
from dspex_dspy.types import Variable

__all__ = ["BatchResult", "HistoryEntry", "SessionInfo", "UpdateType", "VariableUpdate"]


class UpdateType:
    """The ``update_type`` strings of the wire contract."""

    INITIAL_VALUE = "initial_value"
    VALUE_CHANGE = "value_change"
    DELETED = "deleted"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class VariableUpdate:
    """One change of one variable, as a watcher sees it.

    Attributes:
        variable_id: the variable's id (empty for a heartbeat).
        variable: the variable after the change (for ``deleted``: its last state).
        update_type: ``initial_value``, ``value_change``, ``deleted`` or ``heartbeat``.
        source: who made the change (``orchestrator`` / ``worker``).
        metadata: metadata given with the write.
        timestamp: wall-clock seconds since the epoch.
    """

    variable_id: str
    variable: Variable | None
    update_type: str
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    timestamp: float = 0.0

    @property
    def name(self) -> str:
        """The variable's name (empty for a heartbeat)."""
        return self.variable.name if self.variable is not None else ""


@dataclass(frozen=True)
class HistoryEntry:
    """One accepted write of a variable: the value it set and who set it."""

    version: int
    value: Any
    timestamp: float
    changed_by: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionInfo:
    """What a store reports about a session."""

    id: str
    metadata: Mapping[str, str]
    created_at: float
    ttl: float
    variable_count: int
    expires_in: float


@dataclass(frozen=True)
class BatchResult:
    """The outcome of a batch write.

    Attributes:
        new_versions: identifier -> new version, for each write applied.
        errors: identifier -> the error that rejected it. With ``atomic=True`` any error means
            nothing was applied and ``new_versions`` is empty.
    """

    new_versions: dict[str, int] = field(default_factory=dict)
    errors: dict[str, DSPexError] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """True when every write was applied."""
        return not self.errors
