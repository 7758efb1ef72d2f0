"""Variable-aware modules drop into DSPy call sites and survive DSPy's save/load wherever nested.

- DSPy's own positional constructor forms work for all four modules, ``session_context`` is
  keyword-only, and passing a session in a DSPy slot is a clear error.
- A variable-aware module (or a user module with the mixin) nested in a plain ``dspy.Module``,
  ``dspy.BestOfN``, ``dspy.Refine`` or a program run with ``dspy.Parallel`` keeps every binding
  through ``program.save("x.json")`` / ``load``.
- Modules that sample at their own temperature (``BestOfN``, ``Refine``): a bound temperature
  wins, as any binding wins over what the LM carries (docs/modules.md).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback
from support.recording_lm import RecordingEngine, recording_lm

from dspex_dspy import Context, Variables
from dspex_dspy.modules import (
    OWNER_STATE_KEY,
    VariableAwareChainOfThought,
    VariableAwarePredict,
    VariableAwareProgramOfThought,
    VariableAwareReAct,
    VariableBindingMixin,
    get_provenance,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:ProgramOfThought is deprecated:DeprecationWarning"),
]


@pytest.fixture
def ctx() -> Iterator[Context]:
    context = Context()
    Variables.defvariable(context, "creative", "float", 0.3, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(context, "budget", "integer", 321)
    Variables.defvariable(context, "steps", "integer", 4)
    yield context
    context.stop()


def lookup(city: str) -> str:
    """Return the weather of a city."""
    return f"{city}: sunny"


# ------------------------------------------------------------------ constructor forms


PAIRS = [
    (VariableAwarePredict, dspy.Predict),
    (VariableAwareChainOfThought, dspy.ChainOfThought),
    (VariableAwareProgramOfThought, dspy.ProgramOfThought),
    (VariableAwareReAct, dspy.ReAct),
]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=lambda c: c.__name__)
def test_positional_parameters_are_dspys_own(ours: type, theirs: type) -> None:
    def positional(cls: type) -> list[tuple[str, Any]]:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return [(p.name, p.default) for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    assert positional(ours) == positional(theirs)
    session = inspect.signature(ours.__init__).parameters["session_context"]
    assert session.kind is inspect.Parameter.KEYWORD_ONLY


def test_dspy_call_forms_work_for_all_four(ctx: Context) -> None:
    class Seen(BaseCallback):
        def __init__(self) -> None:
            self.starts = 0

        def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            self.starts += 1

    seen = Seen()
    predict = VariableAwarePredict("question -> answer", [seen], session_context=ctx)
    assert predict.callbacks == [seen]
    with dspy.context(lm=recording_lm(RecordingEngine())):
        predict(question="q")
    assert seen.starts == 1

    rationale = dspy.OutputField(desc="work it out in three steps")
    cot = VariableAwareChainOfThought("question -> answer", rationale, session_context=ctx)
    assert cot.predict.signature.output_fields["reasoning"].json_schema_extra["desc"] == "work it out in three steps"

    pot = VariableAwareProgramOfThought("question -> answer", 2, session_context=ctx)
    assert pot.max_iters == 2

    react = VariableAwareReAct("question -> answer", [lookup], session_context=ctx)
    assert "lookup" in react.tools and react.max_iters == 20
    react = VariableAwareReAct("question -> answer", [lookup], 5, session_context=ctx)
    assert react.max_iters == 5


@pytest.mark.parametrize(
    "build",
    [
        lambda c: VariableAwarePredict("q -> a", c),
        lambda c: VariableAwareChainOfThought("q -> a", c),
        lambda c: VariableAwareProgramOfThought("q -> a", c),
        lambda c: VariableAwareReAct("q -> a", c),
    ],
    ids=["Predict", "ChainOfThought", "ProgramOfThought", "ReAct"],
)
def test_a_session_in_a_dspy_slot_is_a_clear_error(ctx: Context, build: Callable[[Context], Any]) -> None:
    with pytest.raises(TypeError, match="session_context is keyword-only"):
        build(ctx)


# ------------------------------------------------------------------ nested save / load


class Answer(VariableBindingMixin, dspy.Module):  # type: ignore[misc]
    """A user module made variable-aware with the mixin."""

    def __init__(self, session_context: Any = None) -> None:
        super().__init__(session_context=session_context)
        self.generate = dspy.ChainOfThought("question -> answer")

    def forward(self, question: str) -> Any:
        return self.generate(question=question)


BINDINGS = {"temperature": "creative", "max_tokens": "budget"}

# name -> (build(ctx or None), bindings it gets)
LEAVES: dict[str, tuple[Callable[[Any], Any], dict[str, str]]] = {
    "Predict": (
        lambda c: VariableAwarePredict("question -> answer", session_context=c, default_bindings=False),
        BINDINGS,
    ),
    "ChainOfThought": (
        lambda c: VariableAwareChainOfThought("question -> answer", session_context=c, default_bindings=False),
        BINDINGS,
    ),
    "ProgramOfThought": (
        lambda c: VariableAwareProgramOfThought("question -> answer", session_context=c, default_bindings=False),
        BINDINGS,
    ),
    "ReAct": (
        lambda c: VariableAwareReAct("question -> answer", [lookup], session_context=c, default_bindings=False),
        {**BINDINGS, "max_iters": "steps"},
    ),
    "mixin": (lambda c: Answer(session_context=c), BINDINGS),
}


class Holder(dspy.Module):  # type: ignore[misc]
    """A plain DSPy program holding a variable-aware module and a plain predictor."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.plain = dspy.Predict("answer -> summary")

    def forward(self, question: str) -> Any:
        return self.inner(question=question)


class ParallelHolder(dspy.Module):  # type: ignore[misc]
    """A program that runs its variable-aware module under ``dspy.Parallel``."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, questions: list[str]) -> Any:
        return dspy.Parallel(num_threads=4, disable_progress_bar=True)(
            [(self.inner, dspy.Example(question=q).with_inputs("question")) for q in questions]
        )


def _reward(args: dict[str, Any], pred: Any) -> float:
    return 0.0


CONTAINERS: dict[str, Callable[[Any], Any]] = {
    "Module": Holder,
    "BestOfN": lambda inner: dspy.BestOfN(inner, N=2, reward_fn=_reward, threshold=1.0),
    "Refine": lambda inner: dspy.Refine(inner, N=2, reward_fn=_reward, threshold=1.0),
    "Parallel": ParallelHolder,
    "Module in Module": lambda inner: Holder(Holder(inner)),
}


def _leaf(program: Any) -> Any:
    found = [m for _, m in program.named_sub_modules() if isinstance(m, VariableBindingMixin)]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("leaf", list(LEAVES))
def test_nested_save_and_load_keep_every_binding(ctx: Context, tmp_path: Path, leaf: str, container: str) -> None:
    build, bindings = LEAVES[leaf]
    inner = build(ctx)
    for attr, variable in bindings.items():
        inner.bind_to_variable(attr, variable)
    program = CONTAINERS[container](inner)
    path = tmp_path / "program.json"
    program.save(str(path))
    assert ctx.id not in path.read_text()

    fresh = CONTAINERS[container](build(None))
    assert _leaf(fresh).get_bindings() == {}
    fresh.load(str(path))
    loaded = _leaf(fresh)
    assert loaded.get_bindings() == bindings
    assert loaded.session_context is None


def test_the_saved_state_names_each_owner_by_path(ctx: Context, tmp_path: Path) -> None:
    inner = Answer(session_context=ctx)
    inner.bind_to_variable("temperature", "creative")
    path = tmp_path / "p.json"
    Holder(inner).save(str(path))
    state = json.loads(path.read_text())
    assert state["inner.generate.predict"][OWNER_STATE_KEY] == {"generate.predict": {"temperature": "creative"}}
    assert OWNER_STATE_KEY not in state["plain"]


def test_a_loaded_nested_program_runs_on_its_bindings_under_parallel(ctx: Context, tmp_path: Path) -> None:
    inner = VariableAwareChainOfThought("question -> answer", session_context=ctx, variable_bindings=BINDINGS)
    path = tmp_path / "p.json"
    ParallelHolder(inner).save(str(path))
    fresh = ParallelHolder(VariableAwareChainOfThought("question -> answer", default_bindings=False))
    fresh.load(str(path))
    fresh.inner.set_session_context(ctx)
    engine = RecordingEngine()
    with dspy.context(lm=recording_lm(engine)):
        results = fresh(questions=["a", "b", "c"])
    assert len(results) == 3
    assert {(r.temperature, r.max_tokens) for r in engine.requests} == {(0.3, 321)}


def test_a_deep_copy_keeps_the_owners_of_its_own_predictors(ctx: Context, tmp_path: Path) -> None:
    inner = VariableAwareChainOfThought("question -> answer", session_context=ctx, variable_bindings=BINDINGS)
    copy = Holder(inner).deepcopy()
    copy.inner.unbind_variable("max_tokens")
    path = tmp_path / "p.json"
    copy.save(str(path))
    fresh = Holder(VariableAwareChainOfThought("question -> answer", default_bindings=False))
    fresh.load(str(path))
    assert fresh.inner.get_bindings() == {"temperature": "creative"}
    assert inner.get_bindings() == BINDINGS  # the original is untouched


# ------------------------------------------------------------------ modules with their own temperature


def test_a_bound_temperature_wins_over_best_of_n_sampling(ctx: Context) -> None:
    engine = RecordingEngine()
    bound = VariableAwareChainOfThought("question -> answer", session_context=ctx, variable_bindings=BINDINGS)
    with dspy.context(lm=recording_lm(engine)):
        dspy.BestOfN(bound, N=3, reward_fn=_reward, threshold=1.0)(question="q")
    assert len(engine.requests) == 3
    assert {r.temperature for r in engine.requests} == {0.3}

    engine.clear()
    unbound = VariableAwareChainOfThought("question -> answer", session_context=ctx, default_bindings=False)
    unbound.bind_to_variable("max_tokens", "budget")
    with dspy.context(lm=recording_lm(engine)):
        pred = dspy.BestOfN(unbound, N=3, reward_fn=_reward, threshold=1.0)(question="q")
    assert {(r.temperature, r.max_tokens) for r in engine.requests} == {(1.0, 321)}
    assert "temperature" not in get_provenance(pred)
