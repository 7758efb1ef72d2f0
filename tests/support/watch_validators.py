"""Validators of what watchers receive: ordered, unique and convergent.

A :class:`WatchLog` records, per watcher, each update as ``(stream number, variable, version)``;
a watcher that reconnects starts a new stream. The checks:

- **ordered**: within one stream, the versions of a variable strictly increase;
- **unique**: within one stream, no ``(variable, version)`` arrives twice;
- **monotonic across reconnects**: a new stream never goes back to a version older than the last
  one seen (its initial snapshot may repeat the last one);
- **convergent**: once writers stop, the last version seen of each variable is its final version.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["WatchLog"]


@dataclass
class WatchLog:
    """The updates one watcher received, in arrival order."""

    entries: list[tuple[int, str, int]] = field(default_factory=list)
    stream: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def new_stream(self) -> None:
        """The watcher (re)connected: later updates belong to a new stream."""
        with self._lock:
            self.stream += 1

    def record(self, variable: str, version: int) -> None:
        with self._lock:
            self.entries.append((self.stream, variable, version))

    def last_versions(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for _, variable, version in self.entries:
                out[variable] = version
            return out

    def problems(self, final: Mapping[str, int] | None = None) -> list[str]:
        """Every violation found (empty when the log is ordered, unique, monotonic and convergent)."""
        with self._lock:
            entries = list(self.entries)
        found: list[str] = []
        in_stream: dict[tuple[int, str], int] = {}
        seen: set[tuple[int, str, int]] = set()
        overall: dict[str, int] = {}
        for stream, variable, version in entries:
            if (stream, variable, version) in seen:
                found.append(f"duplicate: {variable} v{version} twice in stream {stream}")
            seen.add((stream, variable, version))
            previous = in_stream.get((stream, variable))
            if previous is not None and version <= previous:
                found.append(f"out of order: {variable} v{version} after v{previous} in stream {stream}")
            in_stream[(stream, variable)] = version
            if version < overall.get(variable, 0):
                found.append(f"went back: {variable} v{version} after v{overall[variable]} (stream {stream})")
            overall[variable] = max(overall.get(variable, 0), version)
        if final is not None:
            last = self.last_versions()
            for variable, version in final.items():
                if last.get(variable) != version:
                    found.append(f"not converged: {variable} last seen v{last.get(variable)}, final v{version}")
        return found
