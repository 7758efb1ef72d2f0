"""LocalState: the in-process backend a Context starts on.

A dict of small records behind one lock. Reads take the lock, look the record up and return the
value; writes validate through the variable's compiled spec. No I/O: that is what makes it
sub-microsecond. Like a bridge session it keeps a bounded history of each variable's writes (so
``rollback`` works), and it tells watchers about changes; with no watcher registered a write pays
one attribute check for that.

When the context switches to a bridge, the migration holds this state's lock while it exports
and imports, then *retires* the state: its records are dropped and every later call — from a
thread that still holds a reference — is forwarded to the new provider. A write can therefore
never land in a state that has already been copied.
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
from dspex_dspy.state.base import StateProvider
from dspex_dspy.store.storage import HistoryEntry
from dspex_dspy.store.watch import UpdateType, VariableUpdate, Watch
from dspex_dspy.types import Variable, VariableSpec, compile_spec, normalize_metadata, validate_name

__all__ = ["LocalState"]

_MUTABLE_TYPES = frozenset({"embedding", "tensor"})
#: Writes remembered per variable, as a bridge session does by default.
DEFAULT_HISTORY_LIMIT = 100
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
        history_limit: writes remembered per variable (older ones are dropped).

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

    def __init__(self, owner: str | None = None, *, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        if history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, got {history_limit}")
        self.owner = owner
        self.history_limit = history_limit
        self._watchers: list[Watch] = []
        self._lock = threading.Lock()
        self._vars: dict[str, _Record] = {}
        self._ids = itertools.count(1)
        self._retired: StateProvider | None = None
        self._by_id: dict[str, str] = {}
        self._last_created = 0.0

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
        spec = compile_spec(name, type_, constraints)
        normalised = spec.validate(value)
        meta = normalize_metadata(name, metadata)
        meta.setdefault("source", "orchestrator")
        meta.setdefault("backend", "local")
        with self._lock:
            forward = self._retired
            if forward is None:
                if name in self._vars:
                    raise VariableExistsError(name, self.owner)
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
    ) -> int:
        meta = normalize_metadata(name, metadata) if metadata else None
        with self._lock:
            rec = self._vars.get(name)
            if rec is not None:
                normalised = rec.spec.validate(value)
                if expected_version and expected_version != rec.version:
                    raise VersionConflictError(name, expected_version, rec.version)
                rec.value = normalised
                rec.version += 1
                now = rec.updated_at = time.time()
                rec.history.append((rec.version, normalised, now, meta))
                if self._watchers:
                    self._notify(self._snapshot(name, rec), UpdateType.VALUE_CHANGE, meta, now)
                return rec.version
        target, key = self._miss(name)
        return target.set(key, value, metadata=metadata, expected_version=expected_version)

    def update_many(self, updates: Mapping[str, Any], *, atomic: bool = True) -> dict[str, int]:
        with self._lock:
            forward = self._retired
            if forward is None:
                checked: list[tuple[str, _Record, Any]] = []
                errors: dict[str, DSPexError] = {}
                for name, value in updates.items():
                    rec = self._find(name)
                    if rec is None:
                        errors[name] = VariableNotFoundError(name, self.owner)
                        continue
                    try:
                        checked.append((name, rec, rec.spec.validate(value)))
                    except DSPexError as exc:
                        errors[name] = exc
                if atomic and errors:
                    raise BatchUpdateError(errors)
                now = time.time()
                versions: dict[str, int] = {}
                for name, rec, normalised in checked:
                    rec.value = normalised
                    rec.version += 1
                    rec.updated_at = now
                    rec.history.append((rec.version, normalised, now, None))
                    versions[name] = rec.version
                    if self._watchers:
                        self._notify(self._snapshot(self._by_id[rec.id], rec), UpdateType.VALUE_CHANGE, None, now)
                if errors:
                    raise BatchUpdateError(errors, versions)
                return versions
        return forward.update_many(updates, atomic=atomic)

    def delete(self, name: str) -> None:
        with self._lock:
            rec = self._vars.pop(name, None)
            if rec is not None:
                del self._by_id[rec.id]
                if self._watchers:
                    self._notify(self._snapshot(name, rec), UpdateType.DELETED, None, time.time())
                return
        target, key = self._miss(name)
        target.delete(key)

    def import_state(self, variables: Sequence[Variable]) -> None:
        prepared = []
        for var in variables:
            validate_name(var.name)
            spec = compile_spec(var.name, var.type, var.constraints)
            prepared.append((var, spec, spec.validate(var.value), normalize_metadata(var.name, var.metadata)))
        with self._lock:
            forward = self._retired
            if forward is None:
                names = [v.name for v, *_ in prepared]
                clash = [n for n in names if n in self._vars] or [n for n in set(names) if names.count(n) > 1]
                if clash:
                    raise VariableExistsError(clash[0], self.owner)
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
        forward.import_state(variables)

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

    # ---------------------------------------------------------------- migration support

    @contextmanager
    def frozen(self) -> Iterator[builtins.list[Variable]]:
        """Hold this state's lock and yield a full export; writers wait until the block ends."""
        with self._lock:
            yield [self._snapshot(n, r) for n, r in self._vars.items()]

    def retire_locked(self, successor: StateProvider) -> None:
        """Drop every record and forward all later calls to ``successor``.

        Must be called inside :meth:`frozen`, after the export was imported into ``successor``.
        """
        self._retired = successor
        self._vars.clear()
        self._by_id.clear()
        # Watchers of this state end here; a context's watch reopens on the successor.
        self._close_watchers()

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

    @staticmethod
    def _snapshot(name: str, rec: _Record) -> Variable:
        return Variable(
            id=rec.id,
            name=name,
            type=rec.spec.type,
            value=_copy_value(rec.value) if rec.mutable else rec.value,
            constraints=dict(rec.spec.constraints),
            description=rec.description,
            metadata=dict(rec.metadata),
            version=rec.version,
            created_at=rec.created_at,
            updated_at=rec.updated_at,
            source=rec.source,
        )
