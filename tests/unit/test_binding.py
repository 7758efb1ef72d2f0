"""Binding module attributes to session variables: the API, its errors, copies and saved state.

No LM is called here (see tests/integration/test_modules.py for calls); the variables live in
a local :class:`~dspex_dspy.Context`.
"""

from __future__ import annotations

import asyncio
import copy
import pickle
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import cloudpickle
import dspy
import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.errors import DSPexError, ValidationError, VariableNotFoundError
from dspex_dspy.modules import (
    BINDABLE_ATTRIBUTES,
    AwaitRequiredError,
    ModuleVariableResolver,
    RoutedPredict,
    VariableAwareChainOfThought,
    VariableAwarePredict,
    VariableAwareProgramOfThought,
    VariableAwareReAct,
    VariableBindingMixin,
    VariableSource,
    create_variable_aware_program,
    get_provenance,
    route_predictors,
)
from dspex_dspy.modules._binding import STATE_KEY

pytestmark = pytest.mark.unit

# DSPy 3.4 deprecates ProgramOfThought and says so on every construction; the tests that build
# one on purpose ignore exactly that warning.
ignore_pot_deprecation = pytest.mark.filterwarnings("ignore:ProgramOfThought is deprecated:DeprecationWarning")


def lookup(city: str) -> str:
    """Look a city up."""
    return f"{city} is sunny"


@pytest.fixture
def ctx() -> Iterator[Context]:
    context = Context()
    Variables.defvariable(context, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(context, "max_tokens", "integer", 256, constraints={"min": 1, "max": 4096})
    Variables.defvariable(context, "model_name", "string", "gpt-4")
    yield context
    context.stop()


class AsyncCacheView:
    """An ``AsyncSessionContext``-shaped view of a Context: coroutine reads, and a ``cached``
    that only knows the variables read through it so far (as a cold client cache would)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.session_id = context.id
        self._seen: set[str] = set()

    def cached(self, name: str) -> tuple[Any, int] | None:
        return self.context._provider.get_versioned(name) if name in self._seen else None

    async def get_versioned(self, name: str) -> tuple[Any, int]:
        found = self.context._provider.get_versioned(name)
        self._seen.add(name)
        return found

    async def has_variable(self, name: str) -> bool:
        return Variables.exists(self.context, name)


# ------------------------------------------------------------------ the seed's module test


def test_predictor_bound_to_temperature_and_max_tokens_reports_their_values(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    predictor.bind_to_variable("temperature", "temperature")
    predictor.bind_to_variable("max_tokens", "max_tokens")

    assert predictor.temperature == 0.7
    assert predictor.max_tokens == 256
    assert predictor.get_bindings()["temperature"] == "temperature"
    assert predictor.get_bindings() == {"temperature": "temperature", "max_tokens": "max_tokens"}


def test_bound_attribute_reads_the_current_value(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    Variables.set(ctx, "temperature", 1.3)
    assert predictor.temperature == 1.3
    assert predictor.get_bound_value("temperature") == 1.3


def test_get_bindings_is_a_copy(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    predictor.get_bindings()["temperature"] = "something_else"
    assert predictor.get_bindings()["temperature"] == "temperature"


# ------------------------------------------------------------------ default bindings


def test_predict_defaults_apply_only_for_variables_the_session_has(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    assert predictor.get_bindings() == {"temperature": "temperature", "max_tokens": "max_tokens"}
    with pytest.raises(AttributeError):
        _ = predictor.top_p


def test_defaults_can_be_turned_off_and_explicit_bindings_replace_them(ctx: Context) -> None:
    Variables.defvariable(ctx, "creative", "float", 1.2)
    assert VariableAwarePredict("q -> a", session_context=ctx, default_bindings=False).get_bindings() == {}
    predictor = VariableAwarePredict("q -> a", session_context=ctx, variable_bindings={"temperature": "creative"})
    assert predictor.get_bindings() == {"temperature": "creative", "max_tokens": "max_tokens"}
    assert predictor.temperature == 1.2


def test_chain_of_thought_defaults(ctx: Context) -> None:
    assert VariableAwareChainOfThought("question -> answer", session_context=ctx).get_bindings() == {}
    Variables.defvariable(ctx, "reasoning_temperature", "float", 0.3)
    Variables.defvariable(ctx, "reasoning_max_tokens", "integer", 900)
    cot = VariableAwareChainOfThought("question -> answer", session_context=ctx)
    assert cot.get_bindings() == {"temperature": "reasoning_temperature", "max_tokens": "reasoning_max_tokens"}
    assert (cot.temperature, cot.max_tokens) == (0.3, 900)
    assert type(cot.predict) is RoutedPredict


def test_react_defaults_include_max_iters(ctx: Context) -> None:
    Variables.defvariable(ctx, "react_temperature", "float", 0.2)
    Variables.defvariable(ctx, "max_react_iterations", "integer", 3)
    react = VariableAwareReAct("question -> answer", session_context=ctx, tools=[lookup], max_iters=7)
    assert react.get_bindings() == {"temperature": "react_temperature", "max_iters": "max_react_iterations"}
    assert react.max_iters == 3
    Variables.set(ctx, "max_react_iterations", 5)
    assert react.max_iters == 5
    react.unbind_variable("max_iters")
    assert react.max_iters == 7
    assert {type(p) for _, p in react.named_predictors()} == {RoutedPredict}


@ignore_pot_deprecation
def test_program_of_thought_defaults_and_binding(ctx: Context) -> None:
    Variables.defvariable(ctx, "pot_temperature", "float", 0.1)
    Variables.defvariable(ctx, "pot_max_tokens", "integer", 512)
    pot = VariableAwareProgramOfThought("question -> answer", session_context=ctx)
    assert pot.get_bindings() == {"temperature": "pot_temperature", "max_tokens": "pot_max_tokens"}
    assert (pot.temperature, pot.max_tokens) == (0.1, 512)
    pot.bind_to_variable("model", "model_name")
    assert pot.model == "gpt-4"
    assert len(pot.named_predictors()) == 3
    assert {type(p) for _, p in pot.named_predictors()} == {RoutedPredict}


# ------------------------------------------------------------------ errors


def test_binding_to_a_missing_variable_raises_a_clear_error(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    with pytest.raises(VariableNotFoundError) as caught:
        predictor.bind_to_variable("top_p", "nucleus")
    message = str(caught.value)
    assert "cannot bind VariableAwarePredict.top_p" in message
    assert "nucleus" in message
    assert ctx.id in message
    assert isinstance(caught.value, KeyError)
    assert "top_p" not in predictor.get_bindings()


def test_missing_variable_in_constructor_bindings_raises(ctx: Context) -> None:
    with pytest.raises(VariableNotFoundError, match=r"cannot bind VariableAwareChainOfThought\.temperature"):
        VariableAwareChainOfThought("q -> a", session_context=ctx, variable_bindings={"temperature": "nope"})


def test_unbindable_attribute_is_rejected_with_the_allowed_names(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    with pytest.raises(ValidationError, match="cannot bind 'max_iters'") as caught:
        predictor.bind_to_variable("max_iters", "max_tokens")
    assert "temperature" in str(caught.value)
    with pytest.raises(ValidationError):
        predictor.bind_to_variable("signature", "model_name")
    with pytest.raises(ValidationError, match="variable name"):
        predictor.bind_to_variable("temperature", "")
    assert "max_iters" in VariableAwareReAct.bindable_attributes()
    assert VariableAwarePredict.bindable_attributes() == BINDABLE_ATTRIBUTES


def test_value_that_does_not_fit_the_attribute_is_rejected(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx, default_bindings=False)
    with pytest.raises(ValidationError, match="max_tokens needs an integer") as caught:
        predictor.bind_to_variable("max_tokens", "model_name")
    assert caught.value.variable == "model_name"
    with pytest.raises(ValidationError, match="temperature needs a number"):
        predictor.bind_to_variable("temperature", "model_name")
    assert predictor.get_bindings() == {}


def test_module_without_a_session_explains_how_to_give_one() -> None:
    predictor = VariableAwarePredict("question -> answer")
    assert predictor.get_bindings() == {}
    assert predictor.session_context is None
    with pytest.raises(DSPexError, match="set_session_context"):
        predictor.bind_to_variable("temperature", "temperature")


def test_set_session_context_later_applies_defaults(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer")
    predictor.set_session_context(ctx)
    assert predictor.session_context is ctx
    assert predictor.get_bindings() == {"temperature": "temperature", "max_tokens": "max_tokens"}


def test_unknown_session_object_is_rejected() -> None:
    with pytest.raises(TypeError, match="session_context must be"):
        VariableAwarePredict("q -> a", session_context={"temperature": 0.7})


def test_lm_map_keys_must_be_model_names(ctx: Context) -> None:
    with pytest.raises(ValidationError, match="lm_map"):
        VariableAwarePredict("q -> a", session_context=ctx, lm_map={1: "x"})  # type: ignore[dict-item]


def test_prediction_from_a_plain_module_has_no_provenance() -> None:
    with pytest.raises(DSPexError, match="not returned by a variable-aware module"):
        get_provenance(dspy.Prediction(answer="42"))


# ------------------------------------------------------------------ unbind and set


def test_unbind_removes_the_binding_and_is_idempotent(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    predictor.unbind_variable("temperature")
    predictor.unbind_variable("temperature")
    assert "temperature" not in predictor.get_bindings()
    with pytest.raises(AttributeError):
        _ = predictor.temperature
    with pytest.raises(KeyError, match="not bound"):
        predictor.get_bound_value("temperature")


def test_assigning_a_bound_attribute_is_refused(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    with pytest.raises(AttributeError, match="bound to the variable 'temperature'"):
        predictor.temperature = 0.1
    predictor.unbind_variable("temperature")
    predictor.temperature = 0.1  # a plain attribute again, as on dspy.Predict
    assert predictor.temperature == 0.1


def test_dspy_owned_attribute_keeps_its_dspy_meaning(ctx: Context) -> None:
    Variables.defvariable(ctx, "shots", "string", '[{"question": "1+1?", "answer": "2"}]')
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    predictor.bind_to_variable("demos", "shots")
    predictor.demos = [dspy.Example(question="2+2?", answer="4")]  # what an optimizer writes
    assert predictor.demos[0].answer == "4"
    assert predictor.get_bound_value("demos")[0].answer == "2"


# ------------------------------------------------------------------ user modules


class Answer(VariableBindingMixin, dspy.Module):  # type: ignore[misc]
    def __init__(self, session_context: Any = None, **kwargs: Any) -> None:
        super().__init__(session_context=session_context, **kwargs)
        self.generate = dspy.ChainOfThought("question -> answer")

    def forward(self, question: str) -> Any:
        return self.generate(question=question)


def test_user_module_gets_bindings_and_routed_predictors(ctx: Context) -> None:
    program = Answer(ctx, variable_bindings={"model": "model_name"})
    program.bind_to_variable("temperature", "temperature")
    assert program.get_bindings() == {"model": "model_name", "temperature": "temperature"}
    assert program.model == "gpt-4"
    # Routed as soon as the sub-module is assigned, so a save before the first call keeps bindings.
    assert type(program.generate.predict) is RoutedPredict
    program.extra = dspy.Predict("a -> b")
    assert type(program.extra) is RoutedPredict
    plain = dspy.ChainOfThought("q -> a")
    route_predictors(plain)
    assert type(plain.predict) is RoutedPredict
    assert repr(program.generate.predict).startswith("Predict(")


# ------------------------------------------------------------------ copies, state, pickling


def test_deepcopy_keeps_bindings_and_shares_the_session(ctx: Context) -> None:
    Variables.defvariable(ctx, "reasoning_temperature", "float", 0.3)
    cot = VariableAwareChainOfThought("question -> answer", session_context=ctx)
    copied = copy.deepcopy(cot)
    assert copied.get_bindings() == cot.get_bindings()
    assert copied.session_context is ctx
    assert copied.temperature == 0.3
    copied.unbind_variable("temperature")
    assert cot.get_bindings() == {"temperature": "reasoning_temperature"}
    assert type(copied.predict) is RoutedPredict and copied.predict is not cot.predict


def test_reset_copy_keeps_bindings(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    predictor.demos = [dspy.Example(question="q", answer="a")]
    fresh = predictor.reset_copy()
    assert fresh.get_bindings() == predictor.get_bindings()
    assert fresh.demos == []
    assert fresh.session_context is ctx


def test_dump_and_load_state_restore_bindings_but_not_the_session(ctx: Context) -> None:
    cot = VariableAwareChainOfThought(
        "question -> answer", session_context=ctx, variable_bindings={"temperature": "temperature"}
    )
    state = cot.dump_state()
    assert state[STATE_KEY] == {"temperature": "temperature"}
    assert ctx.id not in repr(state)

    loaded = VariableAwareChainOfThought("question -> answer")
    loaded.load_state(state)
    assert loaded.get_bindings() == {"temperature": "temperature"}
    assert loaded.session_context is None
    with pytest.raises(DSPexError, match="no session context"):
        _ = loaded.temperature
    loaded.set_session_context(ctx)
    assert loaded.temperature == 0.7


def test_load_state_rejects_bad_saved_bindings() -> None:
    predictor = VariableAwarePredict("question -> answer")
    state = predictor.dump_state()
    state[STATE_KEY] = {"nonsense": "x"}
    with pytest.raises(ValidationError, match="cannot bind 'nonsense'"):
        predictor.load_state(state)


def test_pickling_drops_the_session_and_keeps_bindings(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    # cloudpickle, as dspy's save(save_program=True) uses: signature classes are made at runtime.
    restored = cloudpickle.loads(cloudpickle.dumps(predictor))
    assert restored.get_bindings() == predictor.get_bindings()
    assert restored.session_context is None
    assert restored.last_provenance is None


def test_variable_source_is_shared_not_copied(ctx: Context) -> None:
    source = VariableSource(ctx)
    assert copy.deepcopy(source) is source
    assert copy.copy(source) is source
    assert VariableSource(source).target is ctx
    assert source.read("temperature") == (0.7, 1)
    assert source.has("temperature") is True and source.has("nope") is False
    assert pickle.loads(pickle.dumps(source)) is None


# ------------------------------------------------------------------ async sources


def test_async_source_needs_await_until_cached(ctx: Context) -> None:
    view = AsyncCacheView(ctx)
    predictor = VariableAwarePredict("question -> answer", session_context=view)
    assert predictor.get_bindings() == {}  # the defaults are pending: only an await can check them
    with pytest.raises(AwaitRequiredError, match="abind_to_variable"):
        predictor.bind_to_variable("temperature", "temperature")

    async def bind() -> None:
        await predictor.abind_to_variable("max_tokens", "max_tokens")
        assert await predictor.aget_bound_value("temperature") == 0.7

    asyncio.run(bind())
    assert predictor.get_bindings() == {"max_tokens": "max_tokens", "temperature": "temperature"}
    assert predictor.temperature == 0.7  # cached now, so a sync read works


def test_async_missing_variable_raises(ctx: Context) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=AsyncCacheView(ctx), default_bindings=False)
    with pytest.raises(VariableNotFoundError, match=r"cannot bind VariableAwarePredict\.temperature"):
        asyncio.run(predictor.abind_to_variable("temperature", "nope"))


# ------------------------------------------------------------------ resolver and factory


def test_resolver_knows_the_builtins_by_several_names() -> None:
    resolver = ModuleVariableResolver()
    assert resolver.resolve("Predict") is VariableAwarePredict
    assert resolver.resolve("predict") is VariableAwarePredict
    assert resolver.resolve("chain_of_thought") is VariableAwareChainOfThought
    assert resolver.resolve("CoT") is VariableAwareChainOfThought
    assert resolver.resolve("ReAct") is VariableAwareReAct
    assert resolver.resolve("program-of-thought") is VariableAwareProgramOfThought
    assert resolver.resolve("VariableAwarePredict") is VariableAwarePredict
    assert resolver.resolve(VariableAwareReAct) is VariableAwareReAct
    with pytest.raises(ValidationError, match="unknown module type 'Retrieve'") as caught:
        resolver.resolve("Retrieve")
    assert "VariableAwarePredict" in str(caught.value)


def test_resolver_registers_user_modules() -> None:
    resolver = ModuleVariableResolver()
    resolver.register("answer", Answer)
    assert resolver.resolve("Answer") is Answer
    with pytest.raises(TypeError, match="VariableBindingMixin"):
        resolver.register("plain", dspy.Predict)
    with pytest.raises(ValidationError, match="already registered"):
        resolver.register("predict", Answer)
    resolver.register("predict", Answer, replace=True)
    assert resolver.resolve("predict") is Answer
    assert ModuleVariableResolver().resolve("predict") is VariableAwarePredict


def test_create_variable_aware_program(ctx: Context) -> None:
    program = create_variable_aware_program("ChainOfThought", "question -> answer", ctx, {"temperature": "temperature"})
    assert isinstance(program, VariableAwareChainOfThought)
    assert program.get_bindings() == {"temperature": "temperature"}
    react = create_variable_aware_program("react", "question -> answer", ctx, tools=[lookup], max_iters=2)
    assert isinstance(react, VariableAwareReAct) and react.max_iters == 2
    with pytest.raises(ValidationError, match="unknown module type"):
        create_variable_aware_program("Retrieve", "question -> answer", ctx)


def test_mixing_into_a_plain_predict_subclass_is_refused(ctx: Context) -> None:
    class Unrouted(VariableBindingMixin, dspy.Predict):  # type: ignore[misc]
        pass

    with pytest.raises(TypeError, match=r"derive from dspex_dspy\.modules\.RoutedPredict"):
        Unrouted("question -> answer", session_context=ctx)

    class Routed(VariableBindingMixin, RoutedPredict):
        default_variable_bindings: ClassVar[Mapping[str, str]] = {"temperature": "temperature"}

    assert Routed("question -> answer", session_context=ctx).temperature == 0.7


def test_public_names() -> None:
    import dspex_dspy
    import dspex_dspy.modules as modules

    assert set(modules.__all__) == {
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
    }
    assert all(hasattr(modules, name) for name in modules.__all__)
    assert dspex_dspy.VariableAwarePredict is VariableAwarePredict
    assert dspex_dspy.create_variable_aware_program is create_variable_aware_program
