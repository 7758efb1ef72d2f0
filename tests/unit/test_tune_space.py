"""The tuner's search space: derived from declared constraints, narrowed or overridden by the caller."""

from __future__ import annotations

from typing import Any

import pytest
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from dspex_dspy import Context, VariableAwarePredict, Variables
from dspex_dspy.errors import DSPexError, ValidationError
from dspex_dspy.tune import bound_variables, build_space
from dspex_dspy.types import Variable

pytestmark = pytest.mark.unit


def var(name: str, type_: str, value: Any, constraints: dict[str, Any] | None = None, **meta: str) -> Variable:
    return Variable(
        id=f"var_{name}_1", name=name, type=type_, value=value, constraints=constraints or {}, metadata=meta
    )


def test_each_searchable_constraint_becomes_a_distribution() -> None:
    variables = {
        v.name: v
        for v in [
            var("temperature", "float", 0.7, {"min": 0.0, "max": 2.0}),
            var("top_p", "float", 0.5, {"min": 0.01, "max": 1.0}, search_scale="log"),
            var("max_tokens", "integer", 64, {"min": 16, "max": 4096}, search_scale="log"),
            var("model", "string", "a", {"enum": ["a", "b"]}),
            var("style", "choice", "x", {"choices": ["x", "y"]}),
            var("module", "module", "Predict", {"allowed_modules": ["Predict", "ChainOfThought"]}),
            var("verbose", "boolean", True),
            var("notes", "string", "free"),
            var("unbounded", "float", 1.0, {"min": 0.0}),
            var("vector", "embedding", [1.0, 2.0]),
        ]
    }
    searched, skipped = build_space(variables, None)
    assert searched == {
        "temperature": FloatDistribution(0.0, 2.0),
        "top_p": FloatDistribution(0.01, 1.0, log=True),
        "max_tokens": IntDistribution(16, 4096, log=True),
        "model": CategoricalDistribution(["a", "b"]),
        "style": CategoricalDistribution(["x", "y"]),
        "module": CategoricalDistribution(["Predict", "ChainOfThought"]),
        "verbose": CategoricalDistribution([True, False]),
    }
    assert skipped == {
        "notes": "a string needs an enum of candidates to be searched",
        "unbounded": "a float needs both min and max to be searched",
        "vector": "a embedding is not searchable",
    }


def test_a_log_scale_needs_a_positive_minimum() -> None:
    with pytest.raises(ValidationError, match="temperature: a log-scale search needs a positive minimum"):
        build_space(
            {"temperature": var("temperature", "float", 0.5, {"min": 0.0, "max": 1.0}, search_scale="log")}, None
        )


def test_the_space_narrows_and_overrides_within_the_constraints() -> None:
    variables = {
        "temperature": var("temperature", "float", 0.7, {"min": 0.0, "max": 2.0}),
        "max_tokens": var("max_tokens", "integer", 64, {"min": 16, "max": 4096}),
        "model": var("model", "string", "a", {"enum": ["a", "b", "c"]}),
    }
    searched, skipped = build_space(
        variables,
        {"temperature": {"low": 0.1, "high": 0.5}, "model": ["a", "c"], "max_tokens": IntDistribution(16, 32)},
    )
    assert searched == {
        "temperature": FloatDistribution(0.1, 0.5),
        "max_tokens": IntDistribution(16, 32),
        "model": CategoricalDistribution(["a", "c"]),
    }
    assert skipped == {}
    searched, skipped = build_space(variables, {"model": None})
    assert list(searched) == ["model"]
    assert skipped == {"temperature": "not in the given space", "max_tokens": "not in the given space"}


class _OtherDistribution(BaseDistribution):
    """A distribution of a kind the tuner does not sample."""

    def to_external_repr(self, param_value_in_internal_repr: float) -> Any:
        return param_value_in_internal_repr

    def to_internal_repr(self, param_value_in_external_repr: Any) -> float:
        return float(param_value_in_external_repr)

    def single(self) -> bool:
        return False

    def _contains(self, param_value_in_internal_repr: float) -> bool:
        return True


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({"ghost": None}, "ghost: not bound in the program"),
        ({"model": ["a", "z"]}, "model: .*z"),
        ({"temperature": {"low": 0.1, "high": 9.0}}, "temperature: 9.0 is above the maximum 2.0"),
        ({"temperature": {"low": 0.1, "high": 0.5, "scale": "log"}}, "unknown range keys"),
        ({"model": {"low": "a", "high": "b"}}, "needs a float or integer variable"),
        ({"model": []}, "must not be empty"),
        ({"temperature": 0.5}, "give None"),
        ({"temperature": _OtherDistribution()}, "must be a Float-, Int- or CategoricalDistribution"),
        ({"notes": None}, "cannot derive a search space"),
        ({}, "searches no variable"),
    ],
)
def test_a_bad_space_is_refused_naming_what_is_wrong(space: dict[str, Any], match: str) -> None:
    variables = {
        "temperature": var("temperature", "float", 0.7, {"min": 0.0, "max": 2.0}),
        "model": var("model", "string", "a", {"enum": ["a", "b"]}),
        "notes": var("notes", "string", "free"),
    }
    with pytest.raises(ValidationError, match=match):
        build_space(variables, space)


def test_bound_variables_finds_every_binding_and_the_session() -> None:
    import dspy

    ctx = Context()
    Variables.defvariable(ctx, "temperature", "float", 0.7)
    Variables.defvariable(ctx, "model", "string", "a")

    class Pipeline(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.first = VariableAwarePredict("question -> answer", session_context=ctx)
            self.second = VariableAwarePredict("answer -> summary", session_context=ctx, default_bindings=False)
            self.second.bind_to_variable("model", "model")
            self.second.bind_to_variable("temperature", "temperature")

    bound, session = bound_variables(Pipeline())
    assert session is ctx
    assert bound == {
        "temperature": [("self.first", "temperature"), ("self.second", "temperature")],
        "model": [("self.second", "model")],
    }
    with pytest.raises(DSPexError, match="binds no variables"):
        bound_variables(dspy.Predict("question -> answer"))
