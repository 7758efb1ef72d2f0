"""Session storage: the :class:`SessionStore`, its watchers and its storage engines (no gRPC, no DSPy)."""

from dspex_dspy.store.session_store import BatchResult, SessionInfo, SessionStore, StoreLimits
from dspex_dspy.store.storage import HistoryEntry, MemoryStorage, Storage
from dspex_dspy.store.watch import UpdateType, VariableUpdate, Watch

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
