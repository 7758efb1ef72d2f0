"""Optimization leases: an optimizer's claim on a set of variables while it searches them.

An optimizer (``optimizer_id``) takes a lease on some variables for ``ttl`` seconds and renews it
with heartbeats (starting again on the same variables). While the lease holds, a write by anyone
but its optimizer is refused with :class:`~dspex_dspy.errors.VariableLockedError` unless forced,
and a second optimizer cannot take any of those variables. The lease ends when its optimizer
stops it, when it expires (the optimizer died), or when someone stops it by force. Reads and
watches are never blocked.

:class:`LeaseTable` holds those rules for one backend (LocalState, SessionStore). It keys leases by
variable id and is not thread-safe: each backend calls it under the lock that guards its
variables, so a lease check and the write it admits are one atomic step.

A write identifies its optimizer by the metadata key ``optimizer_id``; a forced write is asked
for with ``force=True`` (on the wire: the metadata key ``dspex.force`` set to ``"true"``, which is
never stored) and is recorded in the variable's metadata as ``forced_over: <optimizer id>``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex_dspy.errors import ValidationError, VariableLockedError
from dspex_dspy.types import OptimizationStatus

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "FORCED_OVER_KEY",
    "FORCE_METADATA_KEY",
    "HOLDER_METADATA_KEY",
    "LEASE_ID_PREFIX",
    "LeaseTable",
    "OptimizationLease",
    "lease_request_config",
    "lease_request_options",
    "pop_force",
    "validate_lease_request",
]

#: Seconds a lease lives without a heartbeat unless the optimizer asks otherwise.
DEFAULT_LEASE_SECONDS = 30.0
#: Write metadata naming the optimizer that writes (the lease holder's writes carry it).
HOLDER_METADATA_KEY = "optimizer_id"
#: Write metadata asking to write through a lease (``"true"``); removed before the write is stored.
FORCE_METADATA_KEY = "dspex.force"
#: Metadata a forced write records: the optimizer whose lease it went through.
FORCED_OVER_KEY = "forced_over"
#: Every lease id starts with this (a stop names a lease by id or a variable by id or name).
LEASE_ID_PREFIX = "opt_"

_OPTIMIZER_ID_RE = re.compile(r"[A-Za-z0-9_.:@\-]{1,128}")


@dataclass(frozen=True)
class OptimizationLease:
    """A lease an optimizer holds, as returned by ``start_optimization``.

    Attributes:
        id: the lease's id (``opt_<hex>``); stopping by it proves the caller holds the lease.
        optimizer_id: the optimizer holding it.
        variables: the variables it covers (names, in the order asked).
        ttl: seconds it lives without a heartbeat.
        expires_at: wall-clock time it ends unless renewed (as the caller saw it).
    """

    id: str
    optimizer_id: str
    variables: tuple[str, ...]
    ttl: float
    expires_at: float


@dataclass
class _Lease:
    id: str
    scope: str
    optimizer_id: str
    ttl: float
    started_at: float
    deadline: float
    names: dict[str, str] = field(default_factory=dict)  # variable id -> name


def validate_lease_request(optimizer_id: Any, ttl: Any, names: Sequence[Any]) -> float:
    """Check a start request's arguments; return the ttl as a float.

    Raises:
        ValidationError: a bad optimizer id, ttl or variable list (naming what is wrong).
    """
    if not isinstance(optimizer_id, str) or not _OPTIMIZER_ID_RE.fullmatch(optimizer_id):
        raise ValidationError(
            "",
            "optimizer_id",
            optimizer_id,
            "an optimizer id is 1 to 128 letters, digits or _ . : @ -, e.g. 'tuner-1'",
        )
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise ValidationError("", "ttl", ttl, "a lease ttl must be a positive number of seconds")
    if isinstance(names, str) or not names:
        raise ValidationError("", "variables", names, "a lease needs a non-empty list of variable names")
    return float(ttl)


def lease_request_options(names: Sequence[str], ttl: float) -> dict[str, str]:
    """The ``optimizer_config`` of a ``StartOptimization`` request for several variables."""
    return {"variables": json.dumps(list(names)), "lease_seconds": repr(float(ttl))}


def lease_request_config(identifier: str, config: Mapping[str, str]) -> tuple[list[str], float]:
    """Read a ``StartOptimization`` request: ``(variables, ttl)``.

    ``config["variables"]`` (a JSON list of names) widens the lease beyond ``identifier``;
    ``config["lease_seconds"]`` sets its ttl (default :data:`DEFAULT_LEASE_SECONDS`).

    Raises:
        ValidationError: malformed ``variables`` or ``lease_seconds``.
    """
    names: Any = [identifier] if identifier else []
    if "variables" in config:
        try:
            names = json.loads(config["variables"])
        except json.JSONDecodeError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValidationError(
                "", "variables", config["variables"], "optimizer_config variables must be a JSON list of names"
            )
    try:
        ttl = float(config.get("lease_seconds", DEFAULT_LEASE_SECONDS))
    except ValueError:
        raise ValidationError(
            "", "ttl", config["lease_seconds"], "optimizer_config lease_seconds must be a number"
        ) from None
    return names, ttl


def pop_force(metadata: dict[str, str] | None) -> bool:
    """Remove the wire's force flag from write metadata; return whether it asked to force."""
    if not metadata or FORCE_METADATA_KEY not in metadata:
        return False
    return metadata.pop(FORCE_METADATA_KEY).strip().lower() == "true"


class LeaseTable:
    """The leases of one backend, keyed by variable id (callers hold their own lock).

    Args:
        clock: monotonic seconds, for expiry.
        wall_clock: seconds since the epoch, for reported times.

    Example:
        >>> table = LeaseTable()
        >>> lease = table.start("", {"var_t_1": "t"}, "tuner-1", 30.0)
        >>> table.admit("var_t_1", "t", {"optimizer_id": "tuner-1"}, force=False)
        >>> table.status("var_t_1").optimizer_id
        'tuner-1'
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._wall = wall_clock
        self._by_variable: dict[str, _Lease] = {}
        self._by_id: dict[str, _Lease] = {}

    def __bool__(self) -> bool:
        return bool(self._by_variable)

    def holder(self, variable_id: str) -> _Lease | None:
        """The live lease on a variable, dropping it if it expired."""
        lease = self._by_variable.get(variable_id)
        if lease is not None and self._clock() >= lease.deadline:
            self._end(lease)
            return None
        return lease

    def admit(
        self, variable_id: str, name: str, metadata: Mapping[str, str] | None, *, force: bool
    ) -> dict[str, str] | None:
        """Check a write; return metadata to record with it (a forced write's), or None.

        Raises:
            VariableLockedError: another optimizer's lease holds the variable and the write is not forced.
        """
        lease = self.holder(variable_id)
        if lease is None:
            return None
        if metadata and metadata.get(HOLDER_METADATA_KEY) == lease.optimizer_id:
            return None
        if not force:
            raise VariableLockedError(name, lease.optimizer_id)
        return {FORCED_OVER_KEY: lease.optimizer_id}

    def refuse_if_held(self, variable_id: str, name: str, what: str) -> None:
        """Raise when a lease holds the variable (for deletes and rollbacks, which cannot be forced)."""
        lease = self.holder(variable_id)
        if lease is not None:
            raise VariableLockedError(name, lease.optimizer_id, f"{what} needs the optimization stopped first")

    def start(self, scope: str, variables: Mapping[str, str], optimizer_id: str, ttl: float) -> OptimizationLease:
        """Take (or renew and extend) ``optimizer_id``'s lease on ``variables`` (id -> name).

        All or nothing: if any variable is held by another optimizer, nothing changes.

        Raises:
            VariableLockedError: another optimizer holds one of the variables.
        """
        for variable_id, name in variables.items():
            held = self.holder(variable_id)
            if held is not None and held.optimizer_id != optimizer_id:
                raise VariableLockedError(
                    name, held.optimizer_id, f"optimizer {optimizer_id} cannot start on it until that lease ends"
                )
        now = self._clock()
        lease = next(
            (
                lease
                for lease in self._by_id.values()
                if lease.scope == scope and lease.optimizer_id == optimizer_id and now < lease.deadline
            ),
            None,
        )
        if lease is None:
            lease = _Lease(LEASE_ID_PREFIX + secrets.token_hex(12), scope, optimizer_id, ttl, self._wall(), now + ttl)
            self._by_id[lease.id] = lease
        lease.ttl = ttl
        lease.deadline = now + ttl
        for variable_id, name in variables.items():
            lease.names[variable_id] = name
            self._by_variable[variable_id] = lease
        return OptimizationLease(lease.id, optimizer_id, tuple(variables.values()), ttl, self._wall() + ttl)

    def lease_by_id(self, lease_id: str, scope: str) -> _Lease | None:
        """The live lease with that id in ``scope``, or None."""
        lease = self._by_id.get(lease_id)
        if lease is None or lease.scope != scope:
            return None
        if self._clock() >= lease.deadline:
            self._end(lease)
            return None
        return lease

    def stop(self, lease: _Lease) -> list[str]:
        """End a lease; return the names of the variables it covered."""
        names = list(lease.names.values())
        self._end(lease)
        return names

    def stop_variable(self, variable_id: str, name: str, *, force: bool) -> list[str]:
        """End the lease holding a variable (a forced stop); nothing held returns ``[]``.

        Raises:
            VariableLockedError: a lease holds it and ``force`` is false (only the holder, naming its
                lease by id, stops without force).
        """
        lease = self.holder(variable_id)
        if lease is None:
            return []
        if not force:
            raise VariableLockedError(
                name, lease.optimizer_id, "stop the optimization by its lease id, or with force=True"
            )
        return self.stop(lease)

    def status(self, variable_id: str) -> OptimizationStatus | None:
        """The optimization status a variable reports (None when no lease holds it)."""
        lease = self.holder(variable_id)
        return None if lease is None else OptimizationStatus(lease.optimizer_id, lease.started_at)

    def held(self) -> dict[str, tuple[OptimizationStatus, float]]:
        """Every variable a live lease holds: id -> (its status, the lease's monotonic deadline)."""
        out = {}
        for variable_id in list(self._by_variable):
            lease = self.holder(variable_id)
            if lease is not None:
                out[variable_id] = (OptimizationStatus(lease.optimizer_id, lease.started_at), lease.deadline)
        return out

    def forget(self, variable_ids: Sequence[str]) -> None:
        """Drop deleted variables from their leases."""
        for variable_id in variable_ids:
            lease = self._by_variable.pop(variable_id, None)
            if lease is not None:
                lease.names.pop(variable_id, None)
                if not lease.names:
                    self._by_id.pop(lease.id, None)

    def _end(self, lease: _Lease) -> None:
        self._by_id.pop(lease.id, None)
        for variable_id in lease.names:
            if self._by_variable.get(variable_id) is lease:
                del self._by_variable[variable_id]
