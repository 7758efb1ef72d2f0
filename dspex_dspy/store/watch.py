"""Watchers: how a store tells interested parties that variables changed.

A :class:`Watch` holds at most one pending update per variable. A new update for a variable that
still has one pending replaces it (and takes the newest place in line), so a slow consumer receives
coalesced updates — always ending on the latest value — and a watcher's memory is bounded by the
number of variables it watches, never by the number of writes. Per variable, the versions it
delivers strictly increase: an update at a version the watch already took in (from a write seen
both directly and through a change log, or a snapshot older than a change) is dropped.
"""

from __future__ import annotations

from dspex_dspy.records import UpdateType, VariableUpdate, Watch

__all__ = ["UpdateType", "VariableUpdate", "Watch"]
