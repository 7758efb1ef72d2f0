"""The Variables API: define, read and write a context's variables, whatever its backend.

Functions take the context first, as in DSPex (``Variables.get(ctx, "temperature")``). They work
the same on a local and on a bridged context, and keep working across a switch.
"""

from __future__ import annotations

import builtins
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from dspex_dspy.context import Context
from dspex_dspy.errors import ValidationError, VariableNotFoundError, VersionConflictError
from dspex_dspy.leases import DEFAULT_LEASE_SECONDS, OptimizationLease
from dspex_dspy.types import Variable

__all__ = ["UPDATE_BACKOFF_BASE", "UPDATE_BACKOFF_CAP", "Variables", "backoff_delays"]

_MISSING: Any = object()

#: First and largest pause between two attempts of :meth:`Variables.update` (seconds).
UPDATE_BACKOFF_BASE = 0.001
UPDATE_BACKOFF_CAP = 0.1


def backoff_delays(
    attempts: int, base: float = UPDATE_BACKOFF_BASE, cap: float = UPDATE_BACKOFF_CAP
) -> Iterator[float]:
    """The upper bounds of the pauses between ``attempts`` tries: doubling from ``base``, at most ``cap``.

    Example:
        >>> [round(d, 3) for d in backoff_delays(5, 0.01, 0.05)]
        [0.01, 0.02, 0.04, 0.05]
    """
    delay = base
    for _ in builtins.range(attempts - 1):
        yield min(delay, cap)
        delay *= 2


class Variables:
    """Operations on the variables of a :class:`~dspex_dspy.Context` (all static).

    Example:
        >>> from dspex_dspy import Context, Variables
        >>> ctx = Context()
        >>> _ = Variables.defvariable(ctx, "tokens", "integer", 256, constraints={"min": 1, "max": 4096})
        >>> Variables.update(ctx, "tokens", lambda n: n * 2)
        2
        >>> Variables.get(ctx, "tokens")
        512
    """

    @staticmethod
    def defvariable(
        ctx: Context,
        name: str,
        type: str,
        value: Any,
        *,
        constraints: Mapping[str, Any] | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Define a variable and return its id.

        Args:
            ctx: the context.
            name: unique within the context.
            type: ``float``, ``integer``, ``string``, ``boolean``, ``choice``, ``module``,
                ``embedding`` or ``tensor``.
            value: the initial value (validated and normalised).
            constraints: e.g. ``{"min": 0.0, "max": 2.0}``, ``{"enum": [...]}``, ``{"pattern": "..."}``.
            description: free text.
            metadata: ``str -> str`` annotations.

        Raises:
            ValidationError: bad name, type, constraints or value.
            VariableExistsError: the name is taken.
        """
        var = ctx._provider.register(
            name, type, value, constraints=constraints, description=description or "", metadata=metadata
        )
        return var.id

    @staticmethod
    def get(ctx: Context, name: str, default: Any = _MISSING) -> Any:
        """The variable's current value, or ``default`` if it does not exist.

        Raises:
            VariableNotFoundError: no such variable and no default given.
        """
        try:
            return ctx.get_variable(name)
        except VariableNotFoundError:
            if default is _MISSING:
                raise
            return default

    @staticmethod
    def get_variable(ctx: Context, name: str) -> Variable:
        """The whole :class:`~dspex_dspy.types.Variable` record (value, version, metadata ...)."""
        return ctx.get_variable_record(name)

    @staticmethod
    def set(
        ctx: Context,
        name: str,
        value: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        force: bool = False,
    ) -> int:
        """Write a value and return the new version.

        Args:
            expected_version: when non-zero, write only if this is the current version
                (compare-and-swap); otherwise raise :class:`VersionConflictError`.
            force: write even though an optimizer's lease holds the variable; the write records
                ``forced_over: <optimizer id>`` in the variable's metadata.

        Raises:
            ValidationError: the value breaks the type or a constraint (nothing changes).
            VersionConflictError: ``expected_version`` is stale (nothing changes).
            VariableLockedError: another optimizer's lease holds the variable (nothing changes).
        """
        return ctx._provider.set(name, value, metadata=metadata, expected_version=expected_version, force=force)

    @staticmethod
    def update(ctx: Context, name: str, fn: Callable[[Any], Any], *, max_attempts: int = 64) -> int:
        """Atomically replace the value with ``fn(value)``; return the new version.

        A compare-and-swap loop: concurrent writers never lose an update. After a conflict it
        pauses a random time up to a bound that doubles from 1 ms to at most 100 ms
        (:func:`backoff_delays`), so contending writers spread out. ``fn`` may run more than once,
        so it must not have side effects.

        Raises:
            VersionConflictError: every one of ``max_attempts`` tries lost to another writer;
                ``expected``/``actual`` are the versions of the last try.
            ValidationError: ``max_attempts`` is not a positive integer, or ``fn``'s result is rejected.
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValidationError(name, "max_attempts", max_attempts, "max_attempts must be a positive integer")
        pauses = backoff_delays(max_attempts)
        provider = ctx.provider
        while True:
            value, version = ctx.get_versioned(name)
            try:
                return provider.set(name, fn(value), expected_version=version)
            except VersionConflictError as exc:
                conflict = exc
            pause = next(pauses, None)
            if pause is None:
                break
            time.sleep(random.uniform(0, pause))
            provider = ctx.provider
        error = VersionConflictError(name, conflict.expected, conflict.actual)
        error.message = (
            f"{name}: update gave up after {max_attempts} attempts, each lost to a concurrent write "
            f"(last: expected version {conflict.expected} but the current version was {conflict.actual})"
        )
        error.args = (error.message,)
        raise error

    @staticmethod
    def get_many(ctx: Context, names: Iterable[str]) -> dict[str, Any]:
        """Values of several variables, by name.

        Raises:
            VariableNotFoundError: naming every missing variable.
        """
        return ctx.get_variables(names)

    @staticmethod
    def update_many(
        ctx: Context,
        updates: Mapping[str, Any],
        *,
        atomic: bool = True,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> dict[str, int]:
        """Write several variables; return their new versions.

        ``atomic=True`` (default) validates every value first and applies all or none.
        ``atomic=False`` applies what it can. ``metadata`` is merged into every variable written
        (an optimizer names itself with ``optimizer_id`` to write through its own lease);
        ``force`` writes through other optimizers' leases.

        Raises:
            BatchUpdateError: some writes were rejected; ``.errors`` says which and why and
                ``.new_versions`` lists the writes applied (none when atomic).
        """
        return ctx._provider.update_many(updates, atomic=atomic, metadata=metadata, force=force)

    @staticmethod
    def start_optimization(
        ctx: Context,
        names: Sequence[str],
        optimizer_id: str,
        *,
        ttl: float = DEFAULT_LEASE_SECONDS,
    ) -> OptimizationLease:
        """Take an optimization lease on ``names`` for ``optimizer_id``; call again to renew it.

        While the lease holds (``ttl`` seconds after its last start or renewal), writes to those
        variables are refused with :class:`~dspex_dspy.errors.VariableLockedError` unless they
        carry ``metadata={"optimizer_id": optimizer_id}`` or are forced, and no other optimizer
        can take any of them. Reads and watches are not affected; ``Variable.optimization_status``
        shows the lease.

        Example:
            >>> lease = Variables.start_optimization(ctx, ["temperature"], "tuner-1", ttl=30)  # doctest: +SKIP
            >>> Variables.stop_optimization(ctx, lease)                                        # doctest: +SKIP

        Raises:
            VariableLockedError: another optimizer holds one of the variables (nothing changes).
            VariableNotFoundError: a variable does not exist.
            ValidationError: a bad optimizer id, ttl or list of names.
        """
        return ctx._provider.start_optimization(list(names), optimizer_id, ttl=ttl)

    @staticmethod
    def renew_optimization(ctx: Context, lease: OptimizationLease) -> OptimizationLease:
        """Extend a lease by its ttl (a heartbeat); the same as starting it again."""
        return ctx._provider.start_optimization(list(lease.variables), lease.optimizer_id, ttl=lease.ttl)

    @staticmethod
    def stop_optimization(ctx: Context, lease: OptimizationLease | str, *, force: bool = False) -> None:
        """End a lease: pass the lease (or its id), or a variable name with ``force=True``.

        Stopping a lease that already ended does nothing.

        Raises:
            VariableLockedError: a variable is named without ``force`` while a lease holds it.
        """
        target = lease.id if isinstance(lease, OptimizationLease) else lease
        ctx._provider.stop_optimization(target, force=force)

    @staticmethod
    def list(ctx: Context) -> builtins.list[Variable]:
        """Every variable, in creation order."""
        return ctx._provider.list()

    @staticmethod
    def delete(ctx: Context, name: str) -> None:
        """Remove a variable. Raises :class:`VariableNotFoundError` if it does not exist."""
        ctx._provider.delete(name)

    @staticmethod
    def exists(ctx: Context, name: str) -> bool:
        """Whether the context has a variable of that name."""
        return ctx.has_variable(name)
