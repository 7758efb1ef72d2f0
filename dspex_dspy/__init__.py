"""dspex-dspy: typed, constrained, versioned session variables for DSPy programs.

Variables live in a :class:`Context` (local first, bridged to worker processes when needed), are
read and written through :class:`Variables`, reached from workers with :class:`SessionContext`
/ :class:`AsyncSessionContext`, and bound to DSPy modules with ``VariableAwarePredict`` and its
siblings. The DSPy-facing names are imported lazily so that code which never touches DSPy does not
pay for importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dspex_dspy.context import Context
from dspex_dspy.types import Variable
from dspex_dspy.variables import Variables

if TYPE_CHECKING:
    from dspex_dspy.client import AsyncSessionContext, SessionContext
    from dspex_dspy.modules import (
        ModuleVariableResolver,
        VariableAwareChainOfThought,
        VariableAwarePredict,
        VariableAwareProgramOfThought,
        VariableAwareReAct,
        VariableBindingMixin,
        create_variable_aware_program,
    )

__version__ = "0.1.0"

__all__ = [
    "AsyncSessionContext",
    "Context",
    "ModuleVariableResolver",
    "SessionContext",
    "Variable",
    "VariableAwareChainOfThought",
    "VariableAwarePredict",
    "VariableAwareProgramOfThought",
    "VariableAwareReAct",
    "VariableBindingMixin",
    "Variables",
    "create_variable_aware_program",
]

_LAZY = {
    "SessionContext": "dspex_dspy.client",
    "AsyncSessionContext": "dspex_dspy.client",
    "VariableBindingMixin": "dspex_dspy.modules",
    "VariableAwarePredict": "dspex_dspy.modules",
    "VariableAwareChainOfThought": "dspex_dspy.modules",
    "VariableAwareReAct": "dspex_dspy.modules",
    "VariableAwareProgramOfThought": "dspex_dspy.modules",
    "ModuleVariableResolver": "dspex_dspy.modules",
    "create_variable_aware_program": "dspex_dspy.modules",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dspex_dspy' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
