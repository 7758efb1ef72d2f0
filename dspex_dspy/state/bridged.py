"""BridgedState: a context's variables kept in a session of a SessionStore.

The session lives either in a store in this process (the embedded bridge: calls go straight to
the store, as the orchestrator reads its own table) or behind a remote bridge server (calls go
over gRPC through :class:`~dspex_dspy.remote.RemoteStore`). Both expose the same store methods,
so this class has one behaviour for both.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from dspex_dspy.errors import BatchUpdateError, VariableNotFoundError
from dspex_dspy.leases import OptimizationLease
from dspex_dspy.records import BatchResult, HistoryEntry, Watch
from dspex_dspy.types import Variable

__all__ = ["BridgedState", "SessionAccess"]


class SessionAccess(Protocol):
    """The store methods BridgedState needs; :class:`SessionStore` and :class:`RemoteStore` have them."""

    def register_variable(
        self,
        session_id: str,
        name: str,
        type_: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = ...,
        description: str = ...,
        metadata: Mapping[str, Any] | None = ...,
        source: str = ...,
    ) -> Variable: ...

    def import_variables(
        self, session_id: str, variables: Sequence[Variable], *, atomic: bool = True
    ) -> builtins.list[Variable]: ...

    def get_variable(self, session_id: str, identifier: str) -> Variable: ...

    def get_variables(self, session_id: str, identifiers: Iterable[str]) -> tuple[dict[str, Variable], list[str]]: ...

    def set_variable(
        self,
        session_id: str,
        identifier: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = ...,
        expected_version: int | None = ...,
        source: str = ...,
        force: bool = ...,
    ) -> Variable: ...

    def set_variables(
        self,
        session_id: str,
        updates: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = ...,
        atomic: bool = ...,
        source: str = ...,
        force: bool = ...,
    ) -> BatchResult: ...

    def list_variables(self, session_id: str, pattern: str | None = ...) -> builtins.list[Variable]: ...

    def delete_variable(self, session_id: str, identifier: str, *, source: str = ...) -> None: ...

    def get_history(self, session_id: str, identifier: str, limit: int = ...) -> builtins.list[HistoryEntry]: ...

    def rollback_variable(
        self, session_id: str, identifier: str, target_version: int, *, source: str = ...
    ) -> Variable: ...

    def watch(
        self, session_id: str, identifiers: Iterable[str] | None = ..., *, include_initial: bool = ...
    ) -> Watch: ...
    def start_optimization(
        self, session_id: str, identifiers: Sequence[str], optimizer_id: str, *, ttl: float
    ) -> OptimizationLease: ...

    def stop_optimization(self, session_id: str, identifier: str, *, force: bool = ...) -> None: ...


class BridgedState:
    """Variables of one context, kept in session ``session_id`` of ``store``.

    Args:
        store: a :class:`~dspex_dspy.store.SessionStore` (embedded) or a
            :class:`~dspex_dspy.remote.RemoteStore` (a bridge server over gRPC).
        session_id: the session holding this context's variables; it must exist.
        address: where workers connect (``"host:port"``).
    """

    kind = "bridged"
    requires_bridge = True

    def __init__(self, store: SessionAccess, session_id: str, address: str | None = None) -> None:
        self.store = store
        self.session_id = session_id
        self.address = address

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({"cas", "atomic_batch", "history", "rollback", "watch", "cross_process"})

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
        meta = dict(metadata or {})
        meta.setdefault("source", "orchestrator")
        meta.setdefault("backend", "bridged")
        return self.store.register_variable(
            self.session_id, name, type_, value, constraints=constraints, description=description, metadata=meta
        )

    def get(self, name: str) -> Any:
        return self.store.get_variable(self.session_id, name).value

    def get_versioned(self, name: str) -> tuple[Any, int]:
        var = self.store.get_variable(self.session_id, name)
        return var.value, var.version

    def get_versioned_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        # One store call: one lock hold in process, one GetVariables RPC over gRPC.
        found, missing = self.store.get_variables(self.session_id, list(names))
        if missing:
            raise VariableNotFoundError(", ".join(dict.fromkeys(missing)), self.session_id)
        return {name: (var.value, var.version) for name, var in found.items()}

    def get_variable(self, name: str) -> Variable:
        return self.store.get_variable(self.session_id, name)

    def set(
        self,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        force: bool = False,
    ) -> int:
        return self.store.set_variable(
            self.session_id, name, value, metadata=metadata, expected_version=expected_version, force=force
        ).version

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        found, missing = self.store.get_variables(self.session_id, list(names))
        if missing:
            raise VariableNotFoundError(", ".join(missing), self.session_id)
        return {name: var.value for name, var in found.items()}

    def update_many(
        self,
        updates: Mapping[str, Any],
        *,
        atomic: bool = True,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> dict[str, int]:
        result = self.store.set_variables(self.session_id, updates, metadata=metadata, atomic=atomic, force=force)
        if result.errors:
            raise BatchUpdateError(result.errors, result.new_versions)
        return result.new_versions

    def list(self) -> builtins.list[Variable]:
        return self.store.list_variables(self.session_id)

    def delete(self, name: str) -> None:
        self.store.delete_variable(self.session_id, name)

    def exists(self, name: str) -> bool:
        found, _ = self.store.get_variables(self.session_id, [name])
        return bool(found)

    def history(self, name: str, limit: int = 0) -> builtins.list[HistoryEntry]:
        return self.store.get_history(self.session_id, name, limit)

    def rollback(self, name: str, version: int) -> int:
        return self.store.rollback_variable(self.session_id, name, version).version

    def watch(self, names: Iterable[str] | None = None, *, include_initial: bool = True) -> Watch:
        return self.store.watch(self.session_id, list(names or ()), include_initial=include_initial)

    def start_optimization(self, names: Sequence[str], optimizer_id: str, *, ttl: float) -> OptimizationLease:
        return self.store.start_optimization(self.session_id, list(names), optimizer_id, ttl=ttl)

    def stop_optimization(self, identifier: str, *, force: bool = False) -> None:
        self.store.stop_optimization(self.session_id, identifier, force=force)

    def export_state(self) -> builtins.list[Variable]:
        return self.list()

    def import_state(self, variables: Sequence[Variable], *, atomic: bool = True) -> None:
        self.store.import_variables(self.session_id, variables, atomic=atomic)

    def close(self) -> None:
        """Nothing to release: the session outlives the provider (the context cleans it up)."""
