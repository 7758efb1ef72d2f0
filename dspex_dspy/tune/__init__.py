"""Tuning bound variables: :class:`VariableTuner`, a DSPy teleprompter on Optuna.

The constraints declared on session variables (``min``/``max``, ``enum``, ``choices``,
``allowed_modules``) are the search space; the session is how the winner reaches every worker.
Importing this package imports DSPy and Optuna (the ``tune`` extra).

Example:
    >>> from dspex_dspy.tune import VariableTuner                         # doctest: +SKIP
    >>> tuner = VariableTuner(metric, num_trials=30, seed=0)              # doctest: +SKIP
    >>> program = tuner.compile(program, trainset=devset)                 # doctest: +SKIP
    >>> tuner.result.best.values, tuner.result.published[-1].versions     # doctest: +SKIP
"""

from dspex_dspy.tune._space import LOG_SCALE_KEY, bound_variables, build_space
from dspex_dspy.tune._tuner import Publication, TrialRecord, TuningResult, VariableTuner

__all__ = [
    "LOG_SCALE_KEY",
    "Publication",
    "TrialRecord",
    "TuningResult",
    "VariableTuner",
    "bound_variables",
    "build_space",
]
