"""The StateProvider protocol: what every backend of a :class:`~dspex_dspy.Context` implements.

Two providers exist: :class:`~dspex_dspy.state.LocalState` (in process, sub-microsecond) and
:class:`~dspex_dspy.state.BridgedState` (a session of a SessionStore, in process or over gRPC).
The same contract test suite runs against both; anything that differs is a bug.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from dspex_dspy.leases import OptimizationLease
from dspex_dspy.records import HistoryEntry, Watch
from dspex_dspy.types import Variable

__all__ = ["StateProvider"]


@runtime_checkable
class StateProvider(Protocol):
    """A store of typed, constrained, versioned variables for one context.

    Every method raises a :class:`~dspex_dspy.errors.DSPexError` subclass on failure and changes
    nothing when it raises.
    """

    #: ``"local"`` or ``"bridged"``.
    kind: str
    #: True when this provider needs a bridge (a SessionStore) to exist.
    requires_bridge: bool

    @property
    def capabilities(self) -> frozenset[str]:
        """What this backend offers (``cas``, ``atomic_batch``, ``history``, ``watch`` ...)."""
        ...

    def register(
        self,
        name: str,
        type_: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> Variable:
        """Define a variable; raise VariableExistsError for a duplicate name."""
        ...

    def get(self, name: str) -> Any:
        """The current value; raise VariableNotFoundError if missing."""
        ...

    def get_versioned(self, name: str) -> tuple[Any, int]:
        """The current value and version, read together."""
        ...

    def get_versioned_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """``(value, version)`` of several variables from one snapshot (no write falls between them).

        Raises:
            VariableNotFoundError: naming every missing variable.
        """
        ...

    def get_variable(self, name: str) -> Variable:
        """The whole variable record."""
        ...

    def set(
        self,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        force: bool = False,
    ) -> int:
        """Write a value (CAS when ``expected_version`` is non-zero); return the new version.

        ``force`` writes through another optimizer's lease (recorded as ``forced_over``).
        """
        ...

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        """Values by name; raise VariableNotFoundError naming every missing one."""
        ...

    def update_many(
        self,
        updates: Mapping[str, Any],
        *,
        atomic: bool = True,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> dict[str, int]:
        """Write several values (merging ``metadata``); raise BatchUpdateError if any was rejected."""
        ...

    def start_optimization(self, names: Sequence[str], optimizer_id: str, *, ttl: float) -> OptimizationLease:
        """Take (or renew) an optimizer's lease on some variables; see :mod:`dspex_dspy.leases`."""
        ...

    def stop_optimization(self, identifier: str, *, force: bool = False) -> None:
        """End a lease by its id, or by force the lease holding a variable (an ended lease: no-op)."""
        ...

    def list(self) -> builtins.list[Variable]:
        """Every variable, in creation order."""
        ...

    def delete(self, name: str) -> None:
        """Remove a variable; raise VariableNotFoundError if missing."""
        ...

    def exists(self, name: str) -> bool:
        """Whether a variable of that name exists."""
        ...

    def history(self, name: str, limit: int = 0) -> builtins.list[HistoryEntry]:
        """The variable's remembered writes, newest first (``limit`` > 0 keeps that many)."""
        ...

    def rollback(self, name: str, version: int) -> int:
        """Write the value of a remembered ``version`` as a new version; return it."""
        ...

    def watch(self, names: Iterable[str] | None = None, *, include_initial: bool = True) -> Watch:
        """Register a coalescing watcher of some variables (None: all); close it when done."""
        ...

    def export_state(self) -> builtins.list[Variable]:
        """Every variable as a full record, in creation order (for migration)."""
        ...

    def import_state(self, variables: Sequence[Variable], *, atomic: bool = True) -> None:
        """Add whole variables (versions and metadata kept), all or nothing.

        ``atomic=False``: a failure still adds nothing, but others may see part of the variables
        while they are being added (a remote bridge then sends a large import in parts, faster);
        for a session nobody else uses yet.
        """
        ...

    def close(self) -> None:
        """Release what the provider holds."""
        ...
