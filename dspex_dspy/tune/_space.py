"""The search space of a tuning run: the variables bound in a program and their declared constraints.

A variable-aware program already says what may be tuned and within which bounds: each bound
variable has a type and constraints. :func:`bound_variables` finds every binding of every
variable-aware module in a program; :func:`build_space` turns each variable's constraints into an
Optuna distribution:

- ``float`` / ``integer`` with ``min`` and ``max``: a range, on a log scale when the variable's
  metadata says ``search_scale: log``;
- ``string`` with ``enum``, ``choice`` (``choices``), ``module`` (``allowed_modules``) and
  ``boolean``: categorical (so ``instructions`` bound to a string with an ``enum`` of candidate
  texts searches those candidates).

A variable with no searchable constraint is left alone and reported as skipped. The caller's
``space`` narrows the search to the variables it names and may override their distributions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from dspex_dspy.errors import DSPexError, ValidationError
from dspex_dspy.types import Variable, compile_spec

__all__ = ["LOG_SCALE_KEY", "Binding", "bound_variables", "build_space", "describe"]

#: Variable metadata key: ``"log"`` searches a float or integer range on a log scale.
LOG_SCALE_KEY = "search_scale"

Binding = tuple[str, str]  # (module path, attribute)


def _variable_aware_modules(program: Any) -> Iterator[tuple[str, Any]]:
    """Variable-aware modules of ``program``: itself, module attributes, and modules in lists, tuples and dicts.

    Unlike ``named_sub_modules`` it does not walk into plain data (a predictor's call history grows
    with every call), so finding the bindings costs the same before and after many calls.
    """
    from dspy.primitives.base_module import BaseModule

    from dspex_dspy.modules import VariableBindingMixin

    seen: set[int] = set()
    queue: list[tuple[str, Any]] = [("self", program)]
    while queue:
        path, module = queue.pop(0)
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, VariableBindingMixin):
            yield path, module
        for name, value in vars(module).items():
            if isinstance(value, BaseModule):
                queue.append((f"{path}.{name}", value))
            elif isinstance(value, (list, tuple)):
                queue.extend((f"{path}.{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, BaseModule))
            elif isinstance(value, dict):
                queue.extend((f"{path}.{name}[{k}]", v) for k, v in value.items() if isinstance(v, BaseModule))


def bound_variables(program: Any) -> tuple[dict[str, list[Binding]], Any]:
    """Every variable bound anywhere in ``program`` (name -> where it is bound) and their session.

    Raises:
        DSPexError: no module of ``program`` binds a variable, or bound modules read different
            sessions.
    """
    found: dict[str, list[Binding]] = {}
    session: Any = None
    for path, module in _variable_aware_modules(program):
        bindings = module.get_bindings()
        if not bindings:
            continue
        target = module.session_context
        if target is None:
            raise DSPexError(f"{path} ({type(module).__name__}) has bindings but no session context to read them")
        if session is None:
            session = target
        elif target is not session:
            raise DSPexError("the program's variable-aware modules read different sessions: tune one session at a time")
        for attr, variable in bindings.items():
            found.setdefault(variable, []).append((path, attr))
    if not found:
        raise DSPexError(
            f"{type(program).__name__} binds no variables: bind attributes to session variables "
            "(bind_to_variable) before tuning them"
        )
    return found, session


def _derived(var: Variable) -> BaseDistribution | str:
    """The distribution a variable's constraints declare, or why there is none."""
    constraints = var.constraints
    log = str(var.metadata.get(LOG_SCALE_KEY, "")).lower() == "log"
    if var.type in ("float", "integer"):
        if "min" not in constraints or "max" not in constraints:
            return f"a {var.type} needs both min and max to be searched"
        low, high = constraints["min"], constraints["max"]
        if log and low <= 0:
            raise ValidationError(var.name, LOG_SCALE_KEY, low, "a log-scale search needs a positive minimum")
        if var.type == "float":
            return FloatDistribution(float(low), float(high), log=log)
        return IntDistribution(int(low), int(high), log=log)
    if var.type == "string":
        if constraints.get("enum"):
            return CategoricalDistribution(list(constraints["enum"]))
        return "a string needs an enum of candidates to be searched"
    if var.type == "choice":
        return CategoricalDistribution(list(constraints["choices"]))
    if var.type == "module":
        if constraints.get("allowed_modules"):
            return CategoricalDistribution(list(constraints["allowed_modules"]))
        return "a module needs allowed_modules to be searched"
    if var.type == "boolean":
        return CategoricalDistribution([True, False])
    return f"a {var.type} is not searchable"


def _override(var: Variable, given: Any) -> BaseDistribution:
    """The caller's distribution for a variable, checked against the variable's constraints."""
    spec = compile_spec(var.name, var.type, var.constraints)
    if isinstance(given, (FloatDistribution, IntDistribution, CategoricalDistribution)):
        dist = given
    elif isinstance(given, BaseDistribution):
        raise ValidationError(
            var.name, "space", given, "an optuna distribution must be a Float-, Int- or CategoricalDistribution"
        )
    elif isinstance(given, (list, tuple)):
        if not given:
            raise ValidationError(var.name, "space", given, "a list of candidates must not be empty")
        dist = CategoricalDistribution([spec.validate(v) for v in given])
    elif isinstance(given, Mapping) and "low" in given and "high" in given:
        extra = set(given) - {"low", "high", "log", "step"}
        if extra:
            raise ValidationError(
                var.name, "space", given, f"unknown range keys {sorted(extra)} (low, high, log, step)"
            )
        low, high = spec.validate(given["low"]), spec.validate(given["high"])
        log = bool(given.get("log", False))
        if var.type == "integer":
            dist = IntDistribution(int(low), int(high), log=log, step=int(given.get("step", 1)))
        elif var.type == "float":
            dist = FloatDistribution(float(low), float(high), log=log, step=given.get("step"))
        else:
            raise ValidationError(
                var.name, "space", given, f"a range needs a float or integer variable, not {var.type}"
            )
    else:
        raise ValidationError(
            var.name,
            "space",
            given,
            "give None (use the declared constraints), a list of candidates, {'low': .., 'high': ..} "
            "or an optuna distribution",
        )
    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            spec.validate(choice)
    elif isinstance(dist, (FloatDistribution, IntDistribution)):
        spec.validate(dist.low)
        spec.validate(dist.high)
    return dist


def build_space(
    variables: Mapping[str, Variable], space: Mapping[str, Any] | None
) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """``(searched: name -> distribution, skipped: name -> reason)`` for the bound ``variables``.

    Raises:
        ValidationError: ``space`` names a variable that is not bound, gives a distribution that
            breaks the variable's constraints, or asks to search a variable with no searchable
            constraint.
    """
    searched: dict[str, BaseDistribution] = {}
    skipped: dict[str, str] = {}
    if space is None:
        for name, var in variables.items():
            derived = _derived(var)
            if isinstance(derived, str):
                skipped[name] = derived
            else:
                searched[name] = derived
        return searched, skipped
    if not isinstance(space, Mapping):
        raise ValidationError("", "space", space, "space must map variable names to distributions")
    unknown = [name for name in space if name not in variables]
    if unknown:
        raise ValidationError(
            unknown[0], "space", unknown, f"not bound in the program (bound: {', '.join(sorted(variables))})"
        )
    for name, var in variables.items():
        if name not in space:
            skipped[name] = "not in the given space"
            continue
        given = space[name]
        if given is None:
            derived = _derived(var)
            if isinstance(derived, str):
                raise ValidationError(name, "space", None, f"cannot derive a search space: {derived}")
            searched[name] = derived
        else:
            searched[name] = _override(var, given)
    if not searched:
        raise ValidationError("", "space", dict(space), "the space searches no variable")
    return searched, skipped


def describe(dist: BaseDistribution) -> str:
    """A short text for a distribution: ``float [0.0, 1.5]``, ``int [16, 4096] log``, ``one of [...]``."""
    if isinstance(dist, CategoricalDistribution):
        return f"one of {list(dist.choices)!r}"
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        kind = "float" if isinstance(dist, FloatDistribution) else "int"
        return f"{kind} [{dist.low}, {dist.high}]" + (" log" if dist.log else "")
    return repr(dist)
