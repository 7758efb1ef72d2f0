"""Session storage: the :class:`SessionStore`, its watchers and its storage engines (no gRPC, no DSPy)."""

from dspex_dspy.records import BatchResult, HistoryEntry, SessionInfo, UpdateType, VariableUpdate
from dspex_dspy.store.session_store import SessionStore, StoreLimits
from dspex_dspy.store.storage import MemoryStorage, Storage
from dspex_dspy.store.watch import Watch

__all__ = [
    "BatchResult",
    "HistoryEntry",
    "MemoryStorage",
    "SessionInfo",
    "SessionStore",
    "Storage",
    "StoreLimits",
    "UpdateType",
    "VariableUpdate",
    "Watch",
]
