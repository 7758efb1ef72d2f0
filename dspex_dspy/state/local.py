"""LocalState: the in-process backend a Context starts on.

A dict of small records behind one lock. Reads take the lock, look the record up and return the
value; writes validate through the variable's compiled spec. No I/O: that is what makes it
sub-microsecond. Like a bridge session it keeps a bounded history of each variable's writes (so
``rollback`` works), and it tells watchers about changes; with no watcher registered a write pays
one attribute check for that.

It enforces the same :class:`~dspex_dspy.limits.Limits` as a bridge's store (value size,
variables per context), so whatever a local context holds can always be moved to a bridge.

When the context switches to a bridge, the migration exports under this state's lock and imports
*outside* it, so readers and writers keep going while the import runs. Every accepted write bumps
a state-wide write counter; after the import the migration takes the lock again and compares the
counter with the one it exported at (:meth:`LocalState.export_versioned`). Unchanged: the state
is *retired* (its records dropped, every later call — from a thread that still holds a reference —
forwarded to the new provider), so a write can never land in a state that has already been
copied. Changed: the migration undoes the import and tries again, and after a few tries it fences
writers (:meth:`LocalState.fenced`; readers are never held) for one last import.
"""

from __future__ import annotations

import builtins
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from dspex_dspy.errors import (
    BatchUpdateError,
    DSPexError,
    ValidationError,
    VariableExistsError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.leases import (
    LEASE_ID_PREFIX,
    LeaseTable,
    OptimizationLease,
    pop_force,
    validate_lease_request,
)
from dspex_dspy.limits import Limits, check_count, check_value_size
from dspex_dspy.records import HistoryEntry, UpdateType, VariableUpdate, Watch
from dspex_dspy.state.base import StateProvider
from dspex_dspy.types import Variable, VariableSpec, compile_spec, is_secret, normalize_metadata, validate_name

__all__ = ["LocalState"]

_MUTABLE_TYPES = frozenset({"embedding", "tensor"})
_ORCHESTRATOR = "orchestrator"


class _Record:
    __slots__ = (
        "created_at",
        "description",
        "history",
        "id",
        "metadata",
        "mutable",
        "source",
        "spec",
        "updated_at",
        "value",
        "version",
    )

    def __init__(
        self,
        id_: str,
        spec: VariableSpec,
        value: Any,
        description: str,
        metadata: dict[str, str],
        version: int,
        created_at: float,
        updated_at: float,
        source: str,
        history_limit: int,
    ) -> None:
        self.id = id_
        self.spec = spec
        self.value = value
        self.description = description
        self.metadata = metadata
        self.version = version
        self.created_at = created_at
        self.updated_at = updated_at
        self.source = source
        self.mutable = spec.type in _MUTABLE_TYPES
        # (version, value, timestamp, metadata of that write); HistoryEntry records are built on read.
        self.history: deque[tuple[int, Any, float, dict[str, str] | None]] = deque(
            [(version, value, updated_at, dict(metadata))], maxlen=history_limit
        )


def _copy_value(value: Any) -> Any:
    if not isinstance(value, (list, dict)):
        return value
    if isinstance(value, list):
        return list(value)
    return {"shape": list(value["shape"]), "data": list(value["data"])}


class LocalState:
    """In-process variables for one context: thread-safe, versions from 1, creation order kept.

    Args:
        owner: the owning context's id (used in error messages only).
        limits: the value-size, variable-count and history limits (the store's defaults when None).

    Example:
        >>> state = LocalState()
        >>> _ = state.register("temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
        >>> state.set("temperature", 0.9)
        2
        >>> state.get("temperature")
        0.9
    """

    kind = "local"
    requires_bridge = False

    def __init__(self, owner: str | None = None, *, limits: Limits | None = None) -> None:
        self.owner = owner
        self.limits = limits or Limits()
        self.history_limit = self.limits.history_limit
        self._watchers: list[Watch] = []
        self._lock = threading.Lock()
        self._unfenced = threading.Condition(self._lock)
        self._fenced = False
        self._writes = 0
        self._vars: dict[str, _Record] = {}
        self._ids = itertools.count(1)
        self._retired: StateProvider | None = None
        self._by_id: dict[str, str] = {}
        self._last_created = 0.0
        self._leases = LeaseTable()

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({"cas", "atomic_batch", "in_process", "history", "rollback", "watch"})

    # ---------------------------------------------------------------- reads

    def get(self, name: str) -> Any:
        with self._lock:
            rec = self._vars.get(name)
        if rec is None:
            target, key = self._miss(name)
            return target.get(key)
        value = rec.value
        return _copy_value(value) if rec.mutable else value

    def get_versioned(self, name: str) -> tuple[Any, int]:
        with self._lock:
            rec = self._vars.get(name)
            if rec is not None:
                value, version = rec.value, rec.version
        if rec is None:
            target, key = self._miss(name)
            return target.get_versioned(key)
        return (_copy_value(value) if rec.mutable else value), version

    def get_versioned_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        wanted = list(names)
        with self._lock:
            forward = self._retired
            if forward is None:
                found = {n: (r.value, r.version, r.mutable) for n in wanted if (r := self._find(n)) is not None}
        if forward is not None:
            return forward.get_versioned_many(wanted)
        missing = [n for n in wanted if n not in found]
        if missing:
            raise VariableNotFoundError(", ".join(dict.fromkeys(missing)), self.owner)
        return {n: ((_copy_value(v) if m else v), ver) for n, (v, ver, m) in found.items()}

    def get_variable(self, name: str) -> Variable:
        with self._lock:
            rec = self._vars.get(name)
            snapshot = self._snapshot(name, rec) if rec is not None else None
        if snapshot is None:
            target, key = self._miss(name)
            return target.get_variable(key)
        return snapshot

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        wanted = list(names)
        with self._lock:
            if self._retired is not None:
                forward = self._retired
            else:
                forward = None
                found = {n: r for n in wanted if (r := self._find(n)) is not None}
        if forward is not None:
            return forward.get_many(wanted)
        missing = [n for n in wanted if n not in found]
        if missing:
            raise VariableNotFoundError(", ".join(missing), self.owner)
        return {n: (_copy_value(r.value) if r.mutable else r.value) for n, r in found.items()}

    def exists(self, name: str) -> bool:
        with self._lock:
            if self._find(name) is not None:
                return True
            forward = self._retired
        return forward.exists(name) if forward is not None else False

    def list(self) -> builtins.list[Variable]:
        with self._lock:
            forward = self._retired
            if forward is None:
                return [self._snapshot(n, r) for n, r in self._vars.items()]
        return forward.list()

    def export_state(self) -> builtins.list[Variable]:
        return self.list()

    # ---------------------------------------------------------------- writes

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
        validate_name(name)
        spec = compile_spec(name, type_, constraints, secret=is_secret(metadata))
        normalised = spec.validate(value)
        check_value_size(self.limits, name, spec.type, normalised)
        meta = normalize_metadata(name, metadata)
        meta.setdefault("source", "orchestrator")
        meta.setdefault("backend", "local")
        with self._lock:
            if self._fenced:
                self._wait_unfenced()
            forward = self._retired
            if forward is None:
                if name in self._vars:
                    raise VariableExistsError(name, self.owner)
                check_count(self.limits, len(self._vars), 1)
                self._writes += 1
                now = time.time()
                if now <= self._last_created:
                    now = self._last_created + 1e-6  # creation times must order creation
                self._last_created = now
                rec = _Record(
                    f"var_{name}_{next(self._ids)}",
                    spec,
                    normalised,
                    description or "",
                    meta,
                    1,
                    now,
                    now,
                    _ORCHESTRATOR,
                    self.history_limit,
                )
                self._vars[name] = rec
                self._by_id[rec.id] = name
                snapshot = self._snapshot(name, rec)
                if self._watchers:
                    self._notify(snapshot, UpdateType.VALUE_CHANGE, None, now)
                return snapshot
        return forward.register(name, type_, value, constraints=constraints, description=description, metadata=metadata)

    def set(
        self,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        force: bool = False,
    ) -> int:
        meta = normalize_metadata(name, metadata) if metadata else None
        forcing = pop_force(meta) or force
        with self._lock:
            if self._fenced:
                self._wait_unfenced()
            rec = self._vars.get(name)
            if rec is not None:
                spec = rec.spec
                normalised = spec.validate(value)
                check_value_size(self.limits, name, spec.type, normalised)
                if expected_version and expected_version != rec.version:
                    raise VersionConflictError(name, expected_version, rec.version)
                if self._leases:
                    forced = self._leases.admit(rec.id, name, meta, force=forcing)
                    if forced:
                        meta = {**(meta or {}), **forced}
                self._writes += 1
                rec.value = normalised
                rec.version += 1
                now = rec.updated_at = time.time()
                rec.history.append((rec.version, normalised, now, meta))
                if self._watchers:
                    self._notify(self._snapshot(name, rec), UpdateType.VALUE_CHANGE, meta, now)
                return rec.version
        target, key = self._miss(name)
        return target.set(key, value, metadata=metadata, expected_version=expected_version, force=force)

    def update_many(
        self,
        updates: Mapping[str, Any],
        *,
        atomic: bool = True,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> dict[str, int]:
        meta = normalize_metadata("", metadata) if metadata else None
        forcing = pop_force(meta) or force
        with self._lock:
            if self._fenced:
                self._wait_unfenced()
            forward = self._retired
            if forward is None:
                checked: list[tuple[str, _Record, Any, dict[str, str] | None]] = []
                errors: dict[str, DSPexError] = {}
                for name, value in updates.items():
                    rec = self._find(name)
                    if rec is None:
                        errors[name] = VariableNotFoundError(name, self.owner)
                        continue
                    try:
                        normalised = rec.spec.validate(value)
                        check_value_size(self.limits, name, rec.spec.type, normalised)
                        forced = self._leases.admit(rec.id, name, meta, force=forcing) if self._leases else None
                        checked.append((name, rec, normalised, {**(meta or {}), **forced} if forced else meta))
                    except DSPexError as exc:
                        errors[name] = exc
                if atomic and errors:
                    raise BatchUpdateError(errors)
                now = time.time()
                versions: dict[str, int] = {}
                self._writes += 1
                for name, rec, normalised, write_meta in checked:
                    rec.value = normalised
                    rec.version += 1
                    rec.updated_at = now
                    rec.history.append((rec.version, normalised, now, write_meta))
                    versions[name] = rec.version
                    if self._watchers:
                        self._notify(self._snapshot(self._by_id[rec.id], rec), UpdateType.VALUE_CHANGE, write_meta, now)
                if errors:
                    raise BatchUpdateError(errors, versions)
                return versions
        return forward.update_many(updates, atomic=atomic, metadata=metadata, force=force)

    def delete(self, name: str) -> None:
        with self._lock:
            if self._fenced:
                self._wait_unfenced()
            rec = self._vars.get(name)
            if rec is not None:
                if self._leases:
                    self._leases.refuse_if_held(rec.id, name, "deleting it")
                    self._leases.forget([rec.id])
                del self._vars[name]
                self._writes += 1
                del self._by_id[rec.id]
                if self._watchers:
                    self._notify(self._snapshot(name, rec), UpdateType.DELETED, None, time.time())
                return
        target, key = self._miss(name)
        target.delete(key)

    def import_state(self, variables: Sequence[Variable], *, atomic: bool = True) -> None:
        prepared = []
        for var in variables:
            validate_name(var.name)
            spec = compile_spec(var.name, var.type, var.constraints, secret=is_secret(var.metadata))
            normalised = spec.validate(var.value)
            check_value_size(self.limits, var.name, spec.type, normalised)
            prepared.append((var, spec, normalised, normalize_metadata(var.name, var.metadata)))
        with self._lock:
            if self._fenced:
                self._wait_unfenced()
            forward = self._retired
            if forward is None:
                names = [v.name for v, *_ in prepared]
                clash = [n for n in names if n in self._vars] or [n for n in set(names) if names.count(n) > 1]
                if clash:
                    raise VariableExistsError(clash[0], self.owner)
                check_count(self.limits, len(self._vars), len(prepared))
                self._writes += 1
                for var, spec, value, meta in prepared:
                    rec = self._vars[var.name] = _Record(
                        f"var_{var.name}_{next(self._ids)}",
                        spec,
                        value,
                        var.description,
                        meta,
                        var.version,
                        var.created_at,
                        var.updated_at,
                        var.source,
                        self.history_limit,
                    )
                    self._by_id[rec.id] = var.name
                    self._last_created = max(self._last_created, var.created_at)
                return
        forward.import_state(variables, atomic=atomic)

    def close(self) -> None:
        with self._lock:
            self._vars.clear()
            self._by_id.clear()
            self._close_watchers()

    # ---------------------------------------------------------------- history, rollback, watch

    def history(self, name: str, limit: int = 0) -> builtins.list[HistoryEntry]:
        """The variable's remembered writes, newest first; ``limit`` > 0 keeps that many."""
        with self._lock:
            rec = self._vars.get(name)
            entries = list(rec.history) if rec is not None else None
        if rec is None or entries is None:
            target, key = self._miss(name)
            return target.history(key, limit)
        entries.reverse()
        if limit > 0:
            entries = entries[:limit]
        return [
            HistoryEntry(version, _copy_value(value), at, _ORCHESTRATOR, dict(meta or {}))
            for version, value, at, meta in entries
        ]

    def rollback(self, name: str, version: int) -> int:
        """Write the value the variable had at ``version`` as a new version; return that version.

        Raises:
            ValidationError: ``version`` is not in the remembered history (nothing changes).
        """
        with self._lock:
            if self._fenced:
                self._wait_unfenced()
            rec = self._vars.get(name)
            if rec is not None:
                entry = next((e for e in rec.history if e[0] == version), None)
                if entry is None:
                    known = ", ".join(str(e[0]) for e in rec.history)
                    raise ValidationError(
                        name,
                        "target_version",
                        version,
                        f"version {version} is not in the remembered history (versions {known})",
                    )
                value = rec.spec.validate(entry[1])
                meta = {"rolled_back_to": str(version)}
                self._writes += 1
                rec.value = value
                rec.version += 1
                now = rec.updated_at = time.time()
                rec.history.append((rec.version, value, now, meta))
                if self._watchers:
                    self._notify(self._snapshot(name, rec), UpdateType.VALUE_CHANGE, meta, now)
                return rec.version
        target, key = self._miss(name)
        return target.rollback(key, version)

    def watch(self, names: Iterable[str] | None = None, *, include_initial: bool = True) -> Watch:
        """Register a watcher of some variables (None or empty: every variable, now and later).

        Returns a store :class:`~dspex_dspy.store.Watch` (coalescing). It is registered under the
        write lock before its initial values are queued, so no write is missed. It closes when
        this state is retired by a switch (a context's watch then reopens on the new backend).
        """
        idents = list(names or [])
        with self._lock:
            forward = self._retired
            if forward is None:
                records = []
                for ident in idents:
                    rec = self._find(ident)
                    if rec is None:
                        raise VariableNotFoundError(ident, self.owner)
                    records.append(rec)
                watch = Watch(self.owner or "", frozenset(r.id for r in records) if idents else None)
                self._watchers = [*(w for w in self._watchers if not w.closed), watch]
                if include_initial:
                    now = time.time()
                    for rec in records if idents else list(self._vars.values()):
                        watch.offer(
                            VariableUpdate(
                                rec.id,
                                self._snapshot(self._by_id[rec.id], rec),
                                UpdateType.INITIAL_VALUE,
                                rec.source,
                                {},
                                now,
                            )
                        )
                return watch
        return forward.watch(idents, include_initial=include_initial)

    def _notify(self, snapshot: Variable, update_type: str, meta: Mapping[str, str] | None, now: float) -> None:
        """Offer a change to the watchers that follow it (lock held)."""
        update = VariableUpdate(snapshot.id, snapshot, update_type, _ORCHESTRATOR, dict(meta or {}), now)
        closed = False
        for watch in self._watchers:
            if watch.closed:
                closed = True
            elif watch.wants(snapshot.id):
                watch.offer(update)
        if closed:
            self._watchers = [w for w in self._watchers if not w.closed]

    def _close_watchers(self) -> None:
        for watch in self._watchers:
            watch.close()
        self._watchers = []

    # ---------------------------------------------------------------- optimization leases

    def start_optimization(self, names: Sequence[str], optimizer_id: str, *, ttl: float) -> OptimizationLease:
        """Take (or renew) an optimizer's lease on some variables (see :mod:`dspex_dspy.leases`)."""
        ttl = validate_lease_request(optimizer_id, ttl, names)
        with self._lock:
            if self._fenced:
                self._wait_unfenced()
            forward = self._retired
            if forward is None:
                records: dict[str, str] = {}
                for name in names:
                    rec = self._find(name)
                    if rec is None:
                        raise VariableNotFoundError(name, self.owner)
                    records[rec.id] = self._by_id[rec.id]
                return self._leases.start("", records, optimizer_id, ttl)
        return forward.start_optimization(names, optimizer_id, ttl=ttl)

    def stop_optimization(self, identifier: str, *, force: bool = False) -> None:
        """End a lease named by its id, or (with ``force``) the lease holding a variable."""
        with self._lock:
            forward = self._retired
            if forward is None:
                if isinstance(identifier, str) and identifier.startswith(LEASE_ID_PREFIX):
                    lease = self._leases.lease_by_id(identifier, "")
                    if lease is not None:
                        self._leases.stop(lease)
                    return
                rec = self._find(identifier)
                if rec is None:
                    raise VariableNotFoundError(identifier, self.owner)
                self._leases.stop_variable(rec.id, self._by_id[rec.id], force=force)
                return
        forward.stop_optimization(identifier, force=force)

    # ---------------------------------------------------------------- migration support

    def export_versioned(self, marks: Mapping[str, str] | None = None) -> tuple[builtins.list[Variable], int]:
        """A full export and the write counter it was taken at, read together under the lock.

        ``marks``: metadata added to every exported variable's (a migration's stamp).

        Raises:
            DSPexError: the state was already retired (its variables live elsewhere now).
        """
        with self._lock:
            if self._retired is not None:
                raise DSPexError(f"the local state of {self.owner} was already moved")
            return [self._snapshot(n, r, overlay=False, marks=marks) for n, r in self._vars.items()], self._writes

    def retire_if_unchanged(self, successor: StateProvider, writes: int) -> bool:
        """Retire in favour of ``successor`` if no write was accepted since the export at ``writes``.

        Returns:
            True when retired: every later call goes to ``successor``. False when a write landed
            after the export (the export is stale and nothing changed here).
        """
        with self._lock:
            if self._writes != writes:
                return False
            self._retire(successor)
            return True

    @contextmanager
    def fenced(self) -> Iterator[None]:
        """Hold writers (never readers) until the block ends; for a migration's last try."""
        with self._lock:
            self._fenced = True
        try:
            yield
        finally:
            with self._lock:
                self._fenced = False
                self._unfenced.notify_all()

    def _retire(self, successor: StateProvider) -> None:
        self._retired = successor
        self._vars.clear()
        self._by_id.clear()
        # Watchers of this state end here; a context's watch reopens on the successor.
        self._close_watchers()

    def _wait_unfenced(self) -> None:
        """Wait (lock held, released while waiting) until a migration's fence is lifted."""
        while self._fenced:
            self._unfenced.wait()

    # ---------------------------------------------------------------- internals

    def _find(self, identifier: str) -> _Record | None:
        """The record named ``identifier``, or whose id it is (lock held)."""
        rec = self._vars.get(identifier)
        if rec is None and identifier in self._by_id:
            rec = self._vars.get(self._by_id[identifier])
        return rec

    def _miss(self, name: str) -> tuple[StateProvider, str]:
        """Where a call for an unknown name goes: the successor, or this state under the id's name."""
        forward = self._retired
        if forward is not None:
            return forward, name
        if not isinstance(name, str) or not name:
            raise ValidationError("", "identifier", name, "a variable identifier must be a non-empty string")
        real = self._by_id.get(name)
        if real is None:
            raise VariableNotFoundError(name, self.owner)
        return self, real

    def _snapshot(
        self, name: str, rec: _Record, *, overlay: bool = True, marks: Mapping[str, str] | None = None
    ) -> Variable:
        """The record as a Variable; ``overlay``: with the current version's write metadata on top;
        ``marks``: metadata added on top of all."""
        metadata = dict(rec.metadata)
        if overlay and rec.version > 1:
            last = rec.history[-1] if rec.history else None
            if last is not None and last[0] == rec.version and last[3]:
                metadata.update(last[3])
        if marks:
            metadata.update(marks)
        return Variable(
            id=rec.id,
            name=name,
            type=rec.spec.type,
            value=_copy_value(rec.value) if rec.mutable else rec.value,
            constraints=dict(rec.spec.constraints),
            description=rec.description,
            metadata=metadata,
            version=rec.version,
            created_at=rec.created_at,
            updated_at=rec.updated_at,
            source=rec.source,
            optimization_status=self._leases.status(rec.id) if self._leases else None,
        )
