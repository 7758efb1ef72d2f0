"""One reading interface over the three places a bound variable can live.

A variable-aware module reads its bound variables from an orchestrator-side
:class:`~dspex_dspy.Context` (in process, at local-state speed) or a worker-side ``SessionContext``
(synchronous, watch-fed cache) — both :class:`~dspex_dspy.reader.VariableReader` — or an
``AsyncSessionContext`` (an :class:`~dspex_dspy.reader.AsyncVariableReader`: coroutines, plus a
synchronous ``cached`` peek). :class:`VariableSource` hides the difference behind
``read``/``aread``, ``read_many``/``aread_many`` (every binding of one call from one snapshot) and
``has``/``ahas``. Only the public read surface is used, so this module never imports the gRPC
client and never reaches into a context's backend.

A source is *shared* by every copy of a module: ``copy.deepcopy`` (what DSPy optimizers use)
returns the same source, and pickling drops it (a saved program never carries a live session).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dspex_dspy.context import Context
from dspex_dspy.errors import DSPexError

__all__ = ["AwaitRequiredError", "VariableSource", "detached"]


class AwaitRequiredError(DSPexError, RuntimeError):
    """A synchronous read needs a value that an ``AsyncSessionContext`` has not cached yet."""


def detached() -> None:
    """What a pickled :class:`VariableSource` becomes: no session (it is never persisted)."""
    return None


class VariableSource:
    """Reads ``(value, version)`` of named variables from a Context or a session client.

    Args:
        target: a :class:`~dspex_dspy.Context`, a ``SessionContext`` (sync ``get_versioned`` and
            ``has_variable``) or an ``AsyncSessionContext`` (coroutine ``get_versioned`` and
            ``has_variable``, sync ``cached``).

    Raises:
        TypeError: ``target`` is none of these.
    """

    __slots__ = ("_kind", "many_reader", "reader", "report", "target")

    target: Any
    _kind: str
    #: The fastest callable doing what :meth:`read` does.
    reader: Callable[[str], tuple[Any, int]]
    #: The fastest callable doing what :meth:`read_many` does (the per-call hot path uses it).
    many_reader: Callable[[Iterable[str]], dict[str, tuple[Any, int]]]
    #: Where a finished call's provenance goes: a worker client's ``report_call`` when it reports
    #: calls (``report_calls=True``), else None (the call path then does nothing more).
    report: Callable[[Mapping[str, Any]], None] | None

    def __init__(self, target: Any) -> None:
        if isinstance(target, VariableSource):
            target = target.target
        if isinstance(target, Context):
            kind = "context"
        elif callable(getattr(target, "cached", None)) and inspect.iscoroutinefunction(
            getattr(target, "get_versioned", None)
        ):
            kind = "async"
        elif callable(getattr(target, "get_versioned", None)) and callable(getattr(target, "has_variable", None)):
            kind = "sync"
        else:
            raise TypeError(
                "session_context must be a dspex_dspy.Context, a SessionContext or an AsyncSessionContext, "
                f"not {type(target).__name__}"
            )
        self.target = target
        self._kind = kind
        report = getattr(target, "report_call", None) if getattr(target, "reporting_calls", False) is True else None
        self.report = report if callable(report) else None
        if kind == "async":
            self.reader = self.read
            self.many_reader = self.read_many
            return
        self.reader = target.get_versioned
        many = getattr(target, "get_versioned_many", None)
        self.many_reader = many if callable(many) else self._one_by_one

    @property
    def is_async(self) -> bool:
        """Whether reads of uncached values need ``await`` (an ``AsyncSessionContext``)."""
        return self._kind == "async"

    @property
    def session_id(self) -> str | None:
        """The context or session id, for error messages."""
        target = self.target
        found = getattr(target, "session_id", None) if self._kind != "context" else target.id
        return found if isinstance(found, str) else None

    def read(self, name: str) -> tuple[Any, int]:
        """The current ``(value, version)`` of ``name``.

        Raises:
            VariableNotFoundError: no such variable.
            AwaitRequiredError: an ``AsyncSessionContext`` has not cached ``name``; use ``aread``.
        """
        if self._kind != "async":
            result: tuple[Any, int] = self.target.get_versioned(name)
            return result
        hit = self.target.cached(name)
        if hit is None:
            raise AwaitRequiredError(
                f"variable {name!r} is not in the AsyncSessionContext's cache yet: use the async API "
                "(await module.acall(...), await module.abind_to_variable(...), await module.aget_bound_value(...))"
            )
        cached: tuple[Any, int] = hit
        return cached

    def read_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """``(value, version)`` of several variables, read from one snapshot.

        Raises:
            VariableNotFoundError: naming the missing variables.
            AwaitRequiredError: an ``AsyncSessionContext`` has not cached them all; use ``aread_many``.
        """
        if self._kind != "async":
            return self.many_reader(names)
        found: dict[str, tuple[Any, int]] = {}
        for name in names:
            if name not in found:
                found[name] = self.read(name)
        return found

    async def aread_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """``(value, version)`` of several variables from one snapshot, awaiting the session when needed."""
        if self._kind != "async":
            return self.read_many(names)
        wanted = list(dict.fromkeys(names))
        hits = {name: self.target.cached(name) for name in wanted}
        if all(hit is not None for hit in hits.values()):
            return {name: hit for name, hit in hits.items() if hit is not None}
        many = getattr(self.target, "get_versioned_many", None)
        if many is not None and inspect.iscoroutinefunction(many):
            result: dict[str, tuple[Any, int]] = await many(wanted)
            return result
        return {name: await self.aread(name) for name in wanted}

    def _one_by_one(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        # For a reader without get_versioned_many: consistent per variable, not across them.
        read = self.target.get_versioned
        return {name: read(name) for name in dict.fromkeys(names)}

    async def aread(self, name: str) -> tuple[Any, int]:
        """The current ``(value, version)`` of ``name``, awaiting the session when needed."""
        if self._kind != "async":
            return self.read(name)
        hit = self.target.cached(name)
        if hit is not None:
            cached: tuple[Any, int] = hit
            return cached
        result: tuple[Any, int] = await self.target.get_versioned(name)
        return result

    def has(self, name: str) -> bool | None:
        """Whether ``name`` exists; None when only an await could tell (uncached async session)."""
        if self._kind != "async":
            return bool(self.target.has_variable(name))
        return True if self.target.cached(name) is not None else None

    async def ahas(self, name: str) -> bool:
        """Whether ``name`` exists, awaiting the session when needed."""
        if self._kind != "async":
            return bool(self.has(name))
        if self.target.cached(name) is not None:
            return True
        return bool(await self.target.has_variable(name))

    # A source is a live connection, shared by every copy of a module and never persisted.
    def __copy__(self) -> VariableSource:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> VariableSource:
        return self

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (detached, ())

    def __repr__(self) -> str:
        return f"VariableSource({self.target!r})"
