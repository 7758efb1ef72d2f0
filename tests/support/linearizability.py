"""A linearizability checker for recorded histories of versioned registers (get / set / CAS).

Each variable of a session is a register holding ``(value, version)``. Clients record every
operation they run with :class:`History` (call and return times from one monotonic clock, the
input, and the outcome). An operation whose outcome is unknown (the connection dropped: it may or
may not have been applied) is recorded with :meth:`History.unknown`; the checker lets it take
effect at any point after its call, or never.

:func:`check` runs the Wing & Gong search with Lowe's memoisation (the algorithm of Knossos and
Porcupine) per variable: it looks for one total order of the operations that respects real time
(an operation that returned before another was called comes first) and the register's rules:

- ``get`` returns the current ``(value, version)``;
- ``set(value)`` makes version ``v + 1`` and returns it;
- ``cas(value, expected)`` does the same when ``expected`` is the current version and otherwise
  fails, reporting the current version.

Example:
    >>> h = History()
    >>> op = h.call("x", "set", ("a",))
    >>> h.ok(op, 2)
    >>> op = h.call("x", "get", ())
    >>> h.ok(op, ("a", 2))
    >>> check(h, initial={"x": ("init", 1)}).ok
    True
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CAS_FAILED", "CheckResult", "History", "Operation", "check", "check_register"]

CAS_FAILED = "cas-failed"
_INF = float("inf")


@dataclass
class Operation:
    """One recorded operation on one register."""

    key: str
    kind: str  # "get" | "set" | "cas"
    args: tuple[Any, ...]
    call: float
    ret: float = _INF
    output: Any = None
    known: bool = False


@dataclass
class History:
    """A thread-safe recorder of operations (call/return times from ``time.monotonic_ns``)."""

    operations: list[Operation] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def call(self, key: str, kind: str, args: tuple[Any, ...]) -> Operation:
        """Record the call of an operation; finish it with :meth:`ok` or :meth:`unknown`."""
        op = Operation(key, kind, args, time.monotonic_ns())
        with self._lock:
            self.operations.append(op)
        return op

    @staticmethod
    def ok(op: Operation, output: Any) -> None:
        """The operation returned ``output``: a new version (set/cas), ``(value, version)`` (get),
        or ``(CAS_FAILED, current_version)`` for a compare-and-swap that did not apply."""
        op.ret = time.monotonic_ns()
        op.output = output
        op.known = True

    def unknown(self, op: Operation) -> None:
        """The outcome is unknown: it may have been applied at any time after the call, or never.

        A read with an unknown outcome tells nothing and is dropped.
        """
        if op.kind == "get":
            with self._lock:
                self.operations.remove(op)

    def by_key(self) -> dict[str, list[Operation]]:
        """The operations grouped per register."""
        out: dict[str, list[Operation]] = {}
        with self._lock:
            for op in self.operations:
                out.setdefault(op.key, []).append(op)
        return out


@dataclass(frozen=True)
class CheckResult:
    """The verdict: ``ok`` when every register's history is linearizable."""

    ok: bool
    operations: int
    registers: int
    failed: tuple[str, ...] = ()

    def __str__(self) -> str:
        verdict = "linearizable" if self.ok else f"NOT linearizable: {', '.join(self.failed)}"
        return f"{self.operations} operations on {self.registers} registers checked: {verdict}"


def _step(state: tuple[Any, int], op: Operation) -> tuple[bool, tuple[Any, int]]:
    value, version = state
    if op.kind == "get":
        return (not op.known or tuple(op.output) == (value, version)), state
    if op.kind == "set":
        new = (op.args[0], version + 1)
        return (not op.known or op.output == version + 1), new
    if op.kind == "cas":
        target, expected = op.args
        if expected == version:
            return (not op.known or op.output == version + 1), (target, version + 1)
        if not op.known:
            return True, state
        failed = isinstance(op.output, tuple) and op.output[0] == CAS_FAILED
        return failed and (op.output[1] in (None, version)), state
    raise ValueError(f"unknown operation kind {op.kind!r}")


class _Entry:
    __slots__ = ("call", "index", "match", "next", "prev")

    def __init__(self, index: int, call: bool) -> None:
        self.index = index
        self.call = call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def check_register(ops: list[Operation], initial: tuple[Any, int]) -> bool:
    """Whether one register's history is linearizable from ``initial`` = ``(value, version)``."""
    events: list[tuple[float, int, int, bool]] = []
    for i, op in enumerate(ops):
        events.append((op.call, 0, i, True))
        if op.known:
            events.append((op.ret, 1, i, False))
    events.sort()
    head = _Entry(-1, False)
    prev = head
    calls: dict[int, _Entry] = {}
    for _, _, i, is_call in events:
        entry = _Entry(i, is_call)
        if is_call:
            calls[i] = entry
        else:
            calls[i].match = entry
        prev.next = entry
        entry.prev = prev
        prev = entry
    definite_left = sum(1 for op in ops if op.known)

    def lift(entry: _Entry) -> None:
        assert entry.prev is not None
        entry.prev.next = entry.next
        if entry.next is not None:
            entry.next.prev = entry.prev
        match = entry.match
        if match is not None:
            assert match.prev is not None
            match.prev.next = match.next
            if match.next is not None:
                match.next.prev = match.prev

    def unlift(entry: _Entry) -> None:
        match = entry.match
        if match is not None:
            assert match.prev is not None
            match.prev.next = match
            if match.next is not None:
                match.next.prev = match
        assert entry.prev is not None
        entry.prev.next = entry
        if entry.next is not None:
            entry.next.prev = entry

    state = initial
    linearized = 0
    cache: set[tuple[int, tuple[Any, int]]] = set()
    stack: list[tuple[_Entry, tuple[Any, int]]] = []
    entry = head.next
    while definite_left > 0:
        if entry is None:
            # Only calls of operations with unknown outcomes are left ahead: backtrack.
            if not stack:
                return False
            top, state = stack.pop()
            linearized &= ~(1 << top.index)
            if ops[top.index].known:
                definite_left += 1
            unlift(top)
            entry = top.next
            continue
        if entry.call:
            op = ops[entry.index]
            ok, new_state = _step(state, op)
            if ok:
                marked = linearized | (1 << entry.index)
                if (marked, new_state) not in cache:
                    cache.add((marked, new_state))
                    stack.append((entry, state))
                    state = new_state
                    linearized = marked
                    if op.known:
                        definite_left -= 1
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return False
            top, state = stack.pop()
            linearized &= ~(1 << top.index)
            if ops[top.index].known:
                definite_left += 1
            unlift(top)
            entry = top.next
    return True


def check(history: History, initial: Mapping[str, tuple[Any, int]]) -> CheckResult:
    """Check every register of ``history``; ``initial`` gives each one's ``(value, version)``."""
    groups = history.by_key()
    failed = tuple(key for key, ops in sorted(groups.items()) if not check_register(ops, initial[key]))
    total = sum(len(ops) for ops in groups.values())
    return CheckResult(not failed, total, len(groups), failed)
