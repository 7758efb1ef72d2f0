"""What a variable-aware module reads its bound variables through: the :class:`VariableReader` protocol.

An orchestrator's :class:`~dspex_dspy.Context` and a worker's ``SessionContext`` both satisfy
:class:`VariableReader`; an ``AsyncSessionContext`` satisfies :class:`AsyncVariableReader` (the
same reads as coroutines, plus a synchronous ``cached`` peek that never does I/O).
``get_versioned_many`` reads several variables from one snapshot, so one module call never mixes
values from different writes. This module only declares types: it imports nothing else of the
package.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

__all__ = ["AnyVariableReader", "AsyncVariableReader", "VariableReader"]


@runtime_checkable
class VariableReader(Protocol):
    """Synchronous reads of a context's or session's variables."""

    def get_versioned(self, name: str) -> tuple[Any, int]:
        """``(value, version)`` of one variable; raise VariableNotFoundError if missing."""
        ...

    def get_versioned_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """``(value, version)`` of several variables from one snapshot; raise naming every missing one."""
        ...

    def has_variable(self, name: str) -> bool:
        """Whether a variable of that name (or id) exists."""
        ...


@runtime_checkable
class AsyncVariableReader(Protocol):
    """Asynchronous reads (an ``AsyncSessionContext``), with a synchronous cache peek."""

    async def get_versioned(self, name: str) -> tuple[Any, int]:
        """``(value, version)`` of one variable."""
        ...

    async def get_versioned_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """``(value, version)`` of several variables from one snapshot."""
        ...

    async def has_variable(self, name: str) -> bool:
        """Whether a variable of that name (or id) exists."""
        ...

    def cached(self, name: str) -> tuple[Any, int] | None:
        """``(value, version)`` from the local cache alone; None when it cannot answer (no I/O)."""
        ...


#: What ``session_context`` accepts: a Context, a SessionContext or an AsyncSessionContext.
AnyVariableReader = VariableReader | AsyncVariableReader
