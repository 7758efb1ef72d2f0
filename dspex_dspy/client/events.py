"""Watch events and the pure bookkeeping behind them: repeats filtered per name, stream order.

Nothing here performs I/O. :class:`WatchTracker` turns the messages and listings of successive
watch connections into :class:`WatchEvent` records without repeats; :class:`StreamOrder` tells
whether one stream delivered an update in write order (see :mod:`dspex_dspy.client`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from dspex_dspy.ops import WatchEvent
from dspex_dspy.records import UpdateType, VariableUpdate
from dspex_dspy.types import Variable, is_secret

__all__ = ["StreamOrder", "WatchEvent", "WatchTracker", "detached"]

# Two records of one name are the same incarnation if created within this many seconds of each
# other: creation times survive a round trip through the wire only to about a microsecond.
_SAME_CREATION: Final = 1e-3


def deprecated(old: str, new: str) -> None:
    """Warn that the client method ``old`` is deprecated in favour of ``new``."""
    import warnings

    warnings.warn(
        f"{old}() is deprecated and will be removed in the next release; use {new}()",
        DeprecationWarning,
        stacklevel=3,
    )


def detached(value: Any) -> Any:
    """A copy of a mutable value (embedding list, tensor dict) so callers cannot change the cache."""
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return {"shape": list(value["shape"]), "data": list(value["data"])}
    return value


@dataclass
class _Seen:
    created_at: float
    version: int
    value: Any
    variable_id: str
    deleted: bool = False


class WatchTracker:
    """Turns the messages and listings of successive watch connections into events without repeats.

    Per variable name it remembers the last event yielded: creation time, version, deleted or not.
    An update is yielded only if it is new — a higher version of the same incarnation, or a new
    incarnation (after a ``deleted``, or with another ``created_at``). After each (re)connect a
    listing brings every variable to its latest version and reports, as ``deleted``, those that
    disappeared while the stream was down. Heartbeats are dropped.

    With ``include_initial=False`` the first connection's snapshot and listing only set the
    baseline; later changes are yielded.
    """

    def __init__(self, identifiers: Sequence[str], include_initial: bool) -> None:
        self._wanted = frozenset(identifiers) or None
        self._seen: dict[str, _Seen] = {}
        self._baseline = not include_initial

    def wants(self, var: Variable) -> bool:
        """Whether ``var`` is one of the watched variables (by name or id; all when none are named)."""
        return self._wanted is None or var.name in self._wanted or var.id in self._wanted

    def _is_new(self, var: Variable) -> bool:
        seen = self._seen.get(var.name)
        return (
            seen is None
            or seen.deleted
            or abs(seen.created_at - var.created_at) > _SAME_CREATION
            or var.version > seen.version
        )

    def _remember(self, var: Variable, *, deleted: bool = False) -> None:
        self._seen[var.name] = _Seen(var.created_at, var.version, var.value, var.id, deleted)

    def on_update(self, update: VariableUpdate) -> WatchEvent | None:
        """The event for one streamed update, or None if it is a heartbeat, a repeat or an old version."""
        var = update.variable
        if var is None or update.update_type == UpdateType.HEARTBEAT or not self.wants(var):
            return None
        if update.update_type == UpdateType.DELETED:
            seen = self._seen.get(var.name)
            if seen is not None and seen.deleted and abs(seen.created_at - var.created_at) <= _SAME_CREATION:
                return None
            self._remember(var, deleted=True)
        else:
            if not self._is_new(var):
                return None
            self._remember(var)
            if self._baseline and update.update_type == UpdateType.INITIAL_VALUE:
                return None
        return WatchEvent(
            var.name,
            detached(var.value),
            var.version,
            update.update_type,
            update.source,
            update.timestamp,
            var.id,
            dict(update.metadata),
            var.optimization_status,
            is_secret(var.metadata),
        )

    def on_listing(self, variables: Iterable[Variable]) -> list[WatchEvent]:
        """Events that bring every watched variable to the listed state (taken after the stream opened)."""
        events: list[WatchEvent] = []
        listed: set[str] = set()
        for var in variables:
            if not self.wants(var):
                continue
            listed.add(var.name)
            if not self._is_new(var):
                continue
            # A variable seen before (same incarnation) caught up by the listing has changed.
            seen = self._seen.get(var.name)
            changed = seen is not None and not seen.deleted and abs(seen.created_at - var.created_at) <= _SAME_CREATION
            self._remember(var)
            if not self._baseline:
                events.append(
                    WatchEvent(
                        var.name,
                        detached(var.value),
                        var.version,
                        UpdateType.VALUE_CHANGE if changed else UpdateType.INITIAL_VALUE,
                        var.source,
                        var.updated_at,
                        var.id,
                        {},
                        var.optimization_status,
                        is_secret(var.metadata),
                    )
                )
        now = time.time()
        for name, seen in self._seen.items():
            if seen.deleted or name in listed:
                continue
            seen.deleted = True
            if not self._baseline:
                events.append(
                    WatchEvent(name, detached(seen.value), seen.version, UpdateType.DELETED, "", now, seen.variable_id)
                )
        self._baseline = False
        return events


class StreamOrder:
    """Tells, message by message, whether one watch stream delivered an update in write order.

    The server keeps at most one pending update per variable, and a newer write *replaces* a
    pending one in its place in line. So an update can overtake writes of other variables made
    before it: pending ``[done=False, temperature]`` becomes ``[done=True, temperature]``, and
    ``done=True`` arrives before the earlier temperature. An update is certainly in order when no
    replacement can have happened: the variable's next version after the last message of this
    stream (or its first version, or an initial value, or a deletion at the last version seen),
    since then it was queued when it was written, behind every earlier write.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def in_order(self, update: VariableUpdate) -> bool:
        var = update.variable
        if var is None or update.update_type == UpdateType.HEARTBEAT:
            return True
        if update.update_type == UpdateType.DELETED:
            return self._last.pop(var.id, None) == var.version
        last = self._last.get(var.id)
        self._last[var.id] = var.version
        if update.update_type == UpdateType.INITIAL_VALUE:
            return True
        return var.version == (1 if last is None else last + 1)
