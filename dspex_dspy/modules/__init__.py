"""Variable-aware DSPy modules: generation settings, model, instructions and demos bound to session variables.

Bind an attribute of a module to a session variable and every call reads the variable's current
value — written by this process, the orchestrator or any worker — and passes it to DSPy through
the per-call channels of ``Predict.forward``. Nothing shared is mutated, so one module serves
many threads and tasks at once, and each prediction records which variable values produced it.
See ``docs/modules.md`` for the rules. Importing this package imports DSPy.

Example:
    >>> from dspex_dspy import Context, Variables
    >>> from dspex_dspy.modules import VariableAwarePredict, get_provenance   # doctest: +SKIP
    >>> ctx = Context()                                                         # doctest: +SKIP
    >>> _ = Variables.defvariable(ctx, "temperature", "float", 0.7)            # doctest: +SKIP
    >>> predictor = VariableAwarePredict("question -> answer", session_context=ctx)  # doctest: +SKIP
    >>> predictor.get_bindings()                                                # doctest: +SKIP
    {'temperature': 'temperature'}
"""

try:
    import dspy as _dspy  # noqa: F401
except ModuleNotFoundError as _missing:  # pragma: no cover - exercised in a fresh venv by the packaging test
    if _missing.name != "dspy":
        raise
    raise ImportError(
        "dspex_dspy.modules (VariableAwarePredict and its siblings) needs DSPy, which is not installed. "
        'Install the extra: pip install "dspex-dspy[dspy]"   (Context, Variables, the bridge and the '
        "worker clients work without it)"
    ) from None

from dspex_dspy.modules._binding import (
    BINDABLE_ATTRIBUTES,
    OWNER_STATE_KEY,
    STATE_KEY,
    BoundValue,
    RoutedPredict,
    VariableBindingMixin,
    get_provenance,
    route_predictors,
    trial_values,
)
from dspex_dspy.modules._programs import (
    ModuleVariableResolver,
    VariableAwareChainOfThought,
    VariableAwarePredict,
    VariableAwareProgramOfThought,
    VariableAwareReAct,
    create_variable_aware_program,
    default_resolver,
)
from dspex_dspy.modules._source import AwaitRequiredError, VariableSource

__all__ = [
    "BINDABLE_ATTRIBUTES",
    "OWNER_STATE_KEY",
    "STATE_KEY",
    "AwaitRequiredError",
    "BoundValue",
    "ModuleVariableResolver",
    "RoutedPredict",
    "VariableAwareChainOfThought",
    "VariableAwarePredict",
    "VariableAwareProgramOfThought",
    "VariableAwareReAct",
    "VariableBindingMixin",
    "VariableSource",
    "create_variable_aware_program",
    "default_resolver",
    "get_provenance",
    "route_predictors",
    "trial_values",
]
