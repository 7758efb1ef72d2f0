"""Variable-aware DSPy modules calling a real ``dspy.LM`` on a recording engine.

Every test checks what reached the engine: the bound temperature, max_tokens, model,
instructions and demos of each request, before and after writes made in this process, through
the bridge, and from another process; under ``dspy.Parallel`` and ``asyncio.gather``; through
ChainOfThought, ReAct and ProgramOfThought; and after DSPy's copies, optimizers and save/load.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from support.recording_lm import RecordedRequest, RecordingEngine, output_fields, recording_lm

from dspex_dspy import Context, Variables
from dspex_dspy.errors import DSPexError, ValidationError, VariableNotFoundError
from dspex_dspy.modules import (
    STATE_KEY,
    VariableAwareChainOfThought,
    VariableAwarePredict,
    VariableAwareProgramOfThought,
    VariableAwareReAct,
    VariableBindingMixin,
    get_provenance,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

# DSPy 3.4 deprecates ProgramOfThought and warns on every construction; the tests that build one
# on purpose ignore exactly that warning.
ignore_pot_deprecation = pytest.mark.filterwarnings("ignore:ProgramOfThought is deprecated:DeprecationWarning")

DEMOS = json.dumps(
    [{"question": "Capital of Peru?", "answer": "Lima"}, {"question": "Capital of Chad?", "answer": "N'Djamena"}]
)


@pytest.fixture
def ctx() -> Iterator[Context]:
    context = Context()
    Variables.defvariable(context, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(context, "max_tokens", "integer", 256, constraints={"min": 1, "max": 4096})
    yield context
    context.stop()


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture
def lm(engine: RecordingEngine) -> Iterator[Any]:
    model = recording_lm(engine)
    with dspy.context(lm=model):
        yield model


def request_for(engine: RecordingEngine, marker: str) -> RecordedRequest:
    """The one request whose current inputs contain ``marker``."""
    found = [r for r in engine.requests if marker in r.last_user_text]
    assert len(found) == 1, f"{len(found)} requests carry {marker!r}"
    return found[0]


# ------------------------------------------------------------------ values reach the engine


def test_bound_generation_settings_reach_the_engine(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    for name, type_, value in [
        ("top_p", "float", 0.9),
        ("frequency_penalty", "float", 0.25),
        ("presence_penalty", "float", -0.5),
        ("seed", "integer", 11),
        ("stop_at", "string", "END"),
    ]:
        Variables.defvariable(ctx, name, type_, value)
    predictor = VariableAwarePredict(
        "question -> answer", session_context=ctx, variable_bindings={"seed": "seed", "stop": "stop_at"}
    )
    assert set(predictor.get_bindings()) == {
        "temperature",
        "max_tokens",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "seed",
        "stop",
    }

    prediction = predictor(question="What is 6 * 7?")

    sent = engine.last
    assert (sent.temperature, sent.max_tokens, sent.top_p) == (0.7, 256, 0.9)
    assert (sent.frequency_penalty, sent.presence_penalty, sent.seed, sent.stop) == (0.25, -0.5, 11, ("END",))
    assert prediction.answer == "answer-1"
    provenance = get_provenance(prediction)
    assert provenance["temperature"].value == 0.7 and provenance["temperature"].version == 1
    assert provenance["stop"].value == ["END"] and provenance["stop"].variable == "stop_at"
    assert predictor.last_provenance == provenance


def test_next_call_uses_the_value_written_since(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    predictor(question="first")
    Variables.set(ctx, "temperature", 0.2)
    Variables.update(ctx, "max_tokens", lambda n: n * 2)
    second = predictor(question="second")
    assert [(r.temperature, r.max_tokens) for r in engine.requests] == [(0.7, 256), (0.2, 512)]
    assert get_provenance(second)["temperature"].version == 2
    assert get_provenance(second)["max_tokens"].value == 512


def test_per_call_config_wins_over_a_binding(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    prediction = predictor(question="q", config={"temperature": 1.5})
    assert (engine.last.temperature, engine.last.max_tokens) == (1.5, 256)
    provenance = get_provenance(prediction)
    assert provenance["temperature"].applied is False
    assert provenance["max_tokens"].applied is True
    predictor(question="q")
    assert engine.last.temperature == 0.7


def test_binding_wins_over_predictor_config_and_lm_kwargs(ctx: Context, engine: RecordingEngine) -> None:
    model = recording_lm(engine, temperature=0.0, max_tokens=10)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx, temperature=0.1)
    with dspy.context(lm=model):
        predictor(question="q")
        assert (engine.last.temperature, engine.last.max_tokens) == (0.7, 256)
        predictor.unbind_variable("temperature")
        predictor.unbind_variable("max_tokens")
        predictor(question="q")
        assert (engine.last.temperature, engine.last.max_tokens) == (0.1, 10)


def test_model_binding_selects_an_lm_copy_without_changing_the_shared_lm(
    ctx: Context, engine: RecordingEngine, lm: Any
) -> None:
    Variables.defvariable(ctx, "model", "string", "openai/fast-model")
    lm_kwargs = dict(lm.kwargs)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx, variable_bindings={"model": "model"})
    predictor(question="q")
    assert engine.last.model == "openai/fast-model"
    Variables.set(ctx, "model", "openai/accurate-model")
    predictor(question="q")
    assert engine.last.model == "openai/accurate-model"
    predictor(question="q", lm=lm)  # an explicit per-call LM wins
    assert engine.last.model == "openai/test-model"
    assert lm.model == "openai/test-model" and lm.kwargs == lm_kwargs
    plain = dspy.Predict("question -> answer")
    plain(question="q")
    assert engine.last.model == "openai/test-model"


def test_model_binding_with_an_lm_map(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    other = RecordingEngine()
    mapped = {"small": recording_lm(other, "openai/small-v2"), "large": recording_lm(engine, "openai/large-v9")}
    Variables.defvariable(ctx, "tier", "string", "small")
    predictor = VariableAwarePredict(
        "question -> answer", session_context=ctx, variable_bindings={"model": "tier"}, lm_map=mapped
    )
    predictor(question="q")
    assert [r.model for r in other.requests] == ["openai/small-v2"] and engine.requests == []
    Variables.set(ctx, "tier", "large")
    predictor(question="q")
    assert engine.last.model == "openai/large-v9"
    Variables.set(ctx, "tier", "medium")
    with pytest.raises(ValidationError, match="'medium' is not in lm_map \\(known: large, small\\)"):
        predictor(question="q")


def test_instructions_binding_reaches_the_prompt_without_changing_the_signature(
    ctx: Context, engine: RecordingEngine, lm: Any
) -> None:
    Variables.defvariable(ctx, "policy", "string", "Answer in one word.")
    predictor = VariableAwarePredict(
        "question -> answer", session_context=ctx, variable_bindings={"instructions": "policy"}
    )
    original = predictor.signature
    predictor(question="q")
    assert "Answer in one word." in engine.last.system
    Variables.set(ctx, "policy", "Answer in French.")
    predictor(question="q")
    assert "Answer in French." in engine.last.system and "one word" not in engine.last.system
    assert predictor.signature is original
    assert predictor.signature.instructions == "Given the fields `question`, produce the fields `answer`."


def test_demos_binding_wins_over_the_predictors_demos_until_unbound(
    ctx: Context, engine: RecordingEngine, lm: Any
) -> None:
    Variables.defvariable(ctx, "shots", "string", DEMOS)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx, variable_bindings={"demos": "shots"})
    predictor.demos = [dspy.Example(question="Capital of Mali?", answer="Bamako")]  # as an optimizer would
    prediction = predictor(question="Capital of Fiji?")
    assert "Capital of Peru?" in engine.last.user_text and "Capital of Chad?" in engine.last.user_text
    assert "Capital of Mali?" not in engine.last.user_text
    assert [d.answer for d in get_provenance(prediction)["demos"].value] == ["Lima", "N'Djamena"]
    predictor.unbind_variable("demos")
    predictor(question="Capital of Fiji?")
    assert "Capital of Mali?" in engine.last.user_text and "Capital of Peru?" not in engine.last.user_text


def test_bad_value_written_later_fails_the_call_clearly(ctx: Context, lm: Any) -> None:
    Variables.defvariable(ctx, "shots", "string", DEMOS)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx, variable_bindings={"demos": "shots"})
    Variables.set(ctx, "shots", "not json")
    with pytest.raises(ValidationError, match="demos needs a JSON list of objects"):
        predictor(question="q")


def test_deleted_variable_fails_the_call_with_its_name(ctx: Context, lm: Any) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    Variables.delete(ctx, "max_tokens")
    with pytest.raises(
        VariableNotFoundError,
        match=r"VariableAwarePredict\.max_tokens is bound to 'max_tokens', which no longer exists",
    ):
        predictor(question="q")


# ------------------------------------------------------------------ wrappers


def test_chain_of_thought_uses_reasoning_temperature(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    Variables.defvariable(ctx, "reasoning_temperature", "float", 0.35)
    Variables.defvariable(ctx, "reasoning_max_tokens", "integer", 1200)
    Variables.defvariable(ctx, "policy", "string", "Think about units.")
    cot = VariableAwareChainOfThought("question -> answer", session_context=ctx)
    cot.bind_to_variable("instructions", "policy")
    prediction = cot(question="How far?")
    assert (engine.last.temperature, engine.last.max_tokens) == (0.35, 1200)
    assert "Think about units." in engine.last.system
    assert prediction.reasoning == "reasoning-1" and prediction.answer == "answer-1"
    assert get_provenance(prediction)["temperature"].variable == "reasoning_temperature"
    cot(question="How far?", config={"temperature": 0.0})
    assert engine.last.temperature == 0.0


def lookup(city: str) -> str:
    """Return the weather of a city."""
    return f"{city}: sunny"


def react_responder(finish_after: int | None, tool: str = "lookup") -> Callable[[RecordedRequest], Any]:
    """Agent steps that call ``tool`` until ``finish_after`` observations exist, then finish."""

    def respond(request: RecordedRequest) -> Any:
        fields = output_fields(request.system)
        if "next_tool_name" not in fields:
            return {"reasoning": "the tool said so", "answer": "sunny"}
        seen = request.last_user_text.count("[[ ## observation_")
        if finish_after is not None and seen >= finish_after:
            return {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}}
        return {"next_thought": "look it up", "next_tool_name": tool, "next_tool_args": {"city": "Paris"}}

    return respond


def test_react_with_a_tool_runs_on_bound_settings(ctx: Context) -> None:
    Variables.defvariable(ctx, "react_temperature", "float", 0.45)
    Variables.defvariable(ctx, "react_max_tokens", "integer", 700)
    Variables.defvariable(ctx, "policy", "string", "Check the weather tool first.")
    engine = RecordingEngine(responder=react_responder(finish_after=1, tool="weather"))
    calls: list[str] = []

    def weather(city: str) -> str:
        """Return the weather of a city."""
        calls.append(city)
        return f"{city}: sunny"

    react = VariableAwareReAct("question -> answer", session_context=ctx, tools=[weather])
    react.bind_to_variable("instructions", "policy")
    with dspy.context(lm=recording_lm(engine)):
        prediction = react(question="Weather in Paris?")

    assert prediction.answer == "sunny" and calls == ["Paris"]
    assert len(engine.requests) == 3  # agent step, finish step, extraction
    assert {(r.temperature, r.max_tokens) for r in engine.requests} == {(0.45, 700)}
    agent_prompt = engine.requests[0].system
    assert "Check the weather tool first." in agent_prompt and "(1) weather" in agent_prompt.replace("`", "")
    assert "Check the weather tool first." in engine.requests[-1].system
    assert prediction.trajectory["tool_name_0"] == "weather"


def test_react_max_iters_binding_limits_the_loop(ctx: Context) -> None:
    Variables.defvariable(ctx, "max_react_iterations", "integer", 1)
    engine = RecordingEngine(responder=react_responder(finish_after=None))
    react = VariableAwareReAct("question -> answer", session_context=ctx, tools=[lookup], max_iters=20)
    assert react.max_iters == 1

    def agent_steps() -> int:
        return sum("next_tool_name" in output_fields(r.system) for r in engine.requests)

    with dspy.context(lm=recording_lm(engine)):
        first = react(question="Weather?")
        assert agent_steps() == 1
        assert get_provenance(first)["max_iters"].value == 1
        Variables.set(ctx, "max_react_iterations", 3)
        react(question="Weather?")
        assert agent_steps() == 1 + 3
        react(question="Weather?", max_iters=2)  # the caller's keyword wins
        assert agent_steps() == 1 + 3 + 2


def test_react_acall(ctx: Context) -> None:
    Variables.defvariable(ctx, "react_temperature", "float", 0.15)
    engine = RecordingEngine(responder=react_responder(finish_after=1))
    react = VariableAwareReAct("question -> answer", session_context=ctx, tools=[lookup])

    async def run() -> Any:
        with dspy.context(lm=recording_lm(engine)):
            return await react.acall(question="Weather in Paris?")

    prediction = asyncio.run(run())
    assert prediction.answer == "sunny"
    assert {r.temperature for r in engine.requests} == {0.15}
    assert get_provenance(prediction)["temperature"].value == 0.15


def pot_responder(request: RecordedRequest) -> Any:
    if "generated_code" in output_fields(request.system):
        return {"reasoning": "compute it", "generated_code": "```python\nSUBMIT({'answer': 6 * 7})\n```"}
    return {"reasoning": "the code printed it", "answer": "42"}


@ignore_pot_deprecation
def test_program_of_thought_runs_with_a_local_interpreter(ctx: Context) -> None:
    Variables.defvariable(ctx, "pot_temperature", "float", 0.05)
    Variables.defvariable(ctx, "pot_max_tokens", "integer", 800)
    Variables.defvariable(ctx, "policy", "string", "Use integer arithmetic.")
    engine = RecordingEngine(responder=pot_responder)
    pot = VariableAwareProgramOfThought(
        "question -> answer",
        session_context=ctx,
        variable_bindings={"instructions": "policy"},
        interpreter_factory=dspy.LocalInterpreter,
    )
    with dspy.context(lm=recording_lm(engine)):
        prediction = pot(question="What is 6 * 7?")
    assert prediction.answer == "42"
    assert len(engine.requests) == 2  # generate code, then answer from its output
    assert '{"answer": 42}' in engine.requests[1].last_user_text
    assert {(r.temperature, r.max_tokens) for r in engine.requests} == {(0.05, 800)}
    assert all(
        r.system.split("objective is:")[1].strip().startswith("Use integer arithmetic.") for r in engine.requests
    )


@ignore_pot_deprecation
@pytest.mark.skipif(shutil.which("deno") is None, reason="Deno is not installed: dspy.PythonInterpreter needs it")
def test_program_of_thought_runs_with_the_default_deno_interpreter(ctx: Context) -> None:
    Variables.defvariable(ctx, "pot_temperature", "float", 0.05)
    engine = RecordingEngine(responder=pot_responder)
    pot = VariableAwareProgramOfThought("question -> answer", session_context=ctx)
    with dspy.context(lm=recording_lm(engine)):
        prediction = pot(question="What is 6 * 7?")
    assert prediction.answer == "42"
    assert {r.temperature for r in engine.requests} == {0.05}


# ------------------------------------------------------------------ user modules and nesting


class Fanout(VariableBindingMixin, dspy.Module):  # type: ignore[misc]
    """A user module whose plain ChainOfThought runs in dspy.Parallel worker threads."""

    def __init__(self, session_context: Any = None, **kwargs: Any) -> None:
        super().__init__(session_context=session_context, **kwargs)
        self.answer = dspy.ChainOfThought("question -> answer")

    def forward(self, questions: list[str]) -> Any:
        pairs = [(self.answer, {"question": q}) for q in questions]
        results = dspy.Parallel(num_threads=4, disable_progress_bar=True)(pairs)
        return dspy.Prediction(answers=[r.answer for r in results])


def test_user_module_applies_bindings_inside_its_parallel_workers(
    ctx: Context, engine: RecordingEngine, lm: Any
) -> None:
    program = Fanout(ctx, variable_bindings={"temperature": "temperature", "max_tokens": "max_tokens"})
    prediction = program(questions=[f"q{i}" for i in range(8)])
    assert len(prediction.answers) == 8 and len(engine.requests) == 8
    assert {(r.temperature, r.max_tokens) for r in engine.requests} == {(0.7, 256)}
    assert set(get_provenance(prediction)) == {"temperature", "max_tokens"}
    dspy.ChainOfThought("question -> answer")(question="outside")
    assert engine.last.temperature is None  # nothing leaked into DSPy's own modules


class Answer(VariableBindingMixin, dspy.Module):  # type: ignore[misc]
    def __init__(self, session_context: Any = None, **kwargs: Any) -> None:
        super().__init__(session_context=session_context, **kwargs)
        self.generate = dspy.Predict("question -> answer")
        self.review: Any = None

    def forward(self, question: str) -> Any:
        answer = self.generate(question=question)
        return self.review(answer=answer.answer) if self.review is not None else answer


class Pipeline(VariableBindingMixin, dspy.Module):  # type: ignore[misc]
    def __init__(self, session_context: Any, **kwargs: Any) -> None:
        super().__init__(session_context=session_context, **kwargs)
        self.draft = VariableAwarePredict("question -> answer", session_context=session_context, default_bindings=False)
        self.polish = dspy.Predict("answer -> final")

    def forward(self, question: str) -> Any:
        return self.polish(answer=self.draft(question=question).answer)


def test_inner_module_bindings_win_over_the_enclosing_modules(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    Variables.defvariable(ctx, "draft_temperature", "float", 1.1)
    pipeline = Pipeline(ctx, variable_bindings={"temperature": "temperature", "max_tokens": "max_tokens"})
    pipeline.draft.bind_to_variable("temperature", "draft_temperature")
    pipeline(question="q")
    draft, polish = engine.requests
    assert (draft.temperature, draft.max_tokens) == (1.1, 256)
    assert (polish.temperature, polish.max_tokens) == (0.7, 256)


class Review(VariableBindingMixin, dspy.Module):  # type: ignore[misc]
    """A variable-aware module with no bindings of its own, used inside a bound one."""

    def __init__(self, session_context: Any = None) -> None:
        super().__init__(session_context=session_context, default_bindings=False)
        self.check: Any = None

    def forward(self, answer: str) -> Any:
        return dspy.Prediction(verdict="none") if self.check is None else self.check(answer=answer)


def test_unbound_inner_module_takes_the_enclosing_bindings(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    review = Review(ctx)
    outer = Answer(ctx, variable_bindings={"max_tokens": "max_tokens"})
    outer.review = review
    outer(question="first")  # routes what the program holds now
    review.check = dspy.Predict("answer -> verdict")  # added later, inside the inner module
    outer(question="second")
    assert [r.max_tokens for r in engine.requests] == [256, 256, 256]
    review(answer="alone")
    assert engine.last.max_tokens is None


# ------------------------------------------------------------------ concurrency


def test_parallel_calls_over_one_module_show_no_cross_talk(ctx: Context) -> None:
    """8 threads call one module while every LM request rewrites the bound variables.

    Each call must send exactly the values its own provenance recorded (or its own per-call
    config): any state shared between calls would let one call's values leak into another's.
    """
    Variables.defvariable(ctx, "model", "string", "openai/m0")
    Variables.defvariable(ctx, "policy", "string", "Policy 0.")
    writes = itertools.count(1)
    writing = threading.Lock()  # the k-th write applied is write k: version k + 1 holds "openai/m{k}"

    def respond(request: RecordedRequest) -> Any:
        with writing:
            k = next(writes)
            Variables.update_many(ctx, {"temperature": k / 100, "model": f"openai/m{k}", "policy": f"Policy {k}."})
        time.sleep(0.002)
        return {"answer": "ok"}

    engine = RecordingEngine(responder=respond)
    predictor = VariableAwarePredict(
        "question -> answer", session_context=ctx, variable_bindings={"model": "model", "instructions": "policy"}
    )
    pairs = []
    for i in range(64):
        example: dict[str, Any] = {"question": f"call-{i:03d}"}
        if i % 2 == 0:
            example["config"] = {"temperature": 1.0 + i / 1000}
        pairs.append((predictor, example))
    with dspy.context(lm=recording_lm(engine)):
        results = dspy.Parallel(num_threads=8, disable_progress_bar=True)(pairs)

    assert len(engine.requests) == 64 and all(r is not None for r in results)
    seen_versions = set()
    for i, prediction in enumerate(results):
        provenance = get_provenance(prediction)
        sent = request_for(engine, f"call-{i:03d}")
        assert sent.model == provenance["model"].value
        assert provenance["instructions"].value in sent.system
        if i % 2 == 0:
            assert sent.temperature == 1.0 + i / 1000
            assert provenance["temperature"].applied is False
        else:
            assert sent.temperature == provenance["temperature"].value
            assert provenance["temperature"].applied is True
        assert provenance["model"].value == f"openai/m{provenance['model'].version - 1}"
        seen_versions.add(provenance["model"].version)
    # The writes really interleaved with the calls. A thread's calls run one after another and each
    # writes before it returns, so every call of a thread reads a newer version than the one before;
    # some thread of the 8 ran at least 64 / 8 = 8 calls, hence at least 8 versions whatever the
    # scheduling (a reader that missed the writes would see one).
    assert len(seen_versions) >= 8


def test_concurrent_acalls_show_no_cross_talk(ctx: Context) -> None:
    writes = itertools.count(1)

    def respond(request: RecordedRequest) -> Any:
        Variables.set(ctx, "temperature", next(writes) / 100)
        return {"answer": "ok"}

    engine = RecordingEngine(responder=respond, delay_s=0.002)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)

    async def run() -> list[Any]:
        with dspy.context(lm=recording_lm(engine)):
            calls = [
                predictor.acall(question=f"call-{i:03d}", **({"config": {"max_tokens": 100 + i}} if i % 3 == 0 else {}))
                for i in range(24)
            ]
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    for i, prediction in enumerate(results):
        provenance = get_provenance(prediction)
        sent = request_for(engine, f"call-{i:03d}")
        assert sent.temperature == provenance["temperature"].value
        assert sent.max_tokens == (100 + i if i % 3 == 0 else 256)
    assert predictor.last_provenance is None  # gather ran each call in its own task


def test_acall_reads_the_current_values(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)

    async def run() -> Any:
        first = await predictor.acall(question="one")
        Variables.set(ctx, "temperature", 1.9)
        second = await predictor.acall(question="two")
        return first, second, predictor.last_provenance

    first, second, last = asyncio.run(run())
    assert [r.temperature for r in engine.requests] == [0.7, 1.9]
    assert last == get_provenance(second) and get_provenance(first)["temperature"].value == 0.7


# ------------------------------------------------------------------ optimizers and save/load

TRAINSET = [
    dspy.Example(question="Capital of France?", answer="Paris").with_inputs("question"),
    dspy.Example(question="Capital of Spain?", answer="Madrid").with_inputs("question"),
    dspy.Example(question="Capital of Italy?", answer="Rome").with_inputs("question"),
]


def test_labeled_few_shot_compile_keeps_bindings(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    student = VariableAwarePredict("question -> answer", session_context=ctx)
    compiled = dspy.LabeledFewShot(k=2).compile(student, trainset=TRAINSET)
    assert compiled is not student
    assert compiled.get_bindings() == student.get_bindings() and compiled.session_context is ctx
    assert len(compiled.demos) == 2
    Variables.set(ctx, "temperature", 0.3)
    compiled(question="Capital of Peru?")
    assert engine.last.temperature == 0.3
    assert "Capital of France?" in engine.last.user_text or "Capital of Spain?" in engine.last.user_text


def test_bootstrap_few_shot_compile_keeps_bindings_and_runs_on_them(
    ctx: Context, engine: RecordingEngine, lm: Any
) -> None:
    Variables.defvariable(ctx, "model", "string", "openai/teacher-model")
    Variables.defvariable(ctx, "shots", "string", DEMOS)
    student = VariableAwareChainOfThought(
        "question -> answer", session_context=ctx, variable_bindings={"temperature": "temperature", "model": "model"}
    )
    optimizer = dspy.BootstrapFewShot(metric=lambda example, pred, trace=None: True, max_bootstrapped_demos=2)
    compiled = optimizer.compile(student, trainset=TRAINSET)

    assert engine.requests, "the teacher ran on the recording LM"
    assert {(r.temperature, r.model) for r in engine.requests} == {(0.7, "openai/teacher-model")}
    assert compiled.get_bindings() == {"temperature": "temperature", "model": "model"}
    assert compiled.session_context is ctx
    demos = compiled.predict.demos
    assert demos and all(set(d.toDict()) <= {"question", "reasoning", "answer", "augmented"} for d in demos)

    engine.clear()
    compiled.bind_to_variable("demos", "shots")
    compiled(question="Capital of Fiji?")
    assert "Capital of Peru?" in engine.last.user_text  # the bound demos win while bound
    compiled.unbind_variable("demos")
    compiled(question="Capital of Fiji?")
    assert "Capital of Peru?" not in engine.last.user_text
    assert demos[0].question in engine.last.user_text  # the optimizer's demos apply again


def test_save_and_load_restore_bindings_but_not_the_session(
    ctx: Context, engine: RecordingEngine, lm: Any, tmp_path: Path
) -> None:
    Variables.defvariable(ctx, "policy", "string", "Be brief.")
    program = dspy.LabeledFewShot(k=1).compile(
        VariableAwarePredict("question -> answer", session_context=ctx, variable_bindings={"instructions": "policy"}),
        trainset=TRAINSET,
    )
    path = tmp_path / "program.json"
    program.save(str(path))
    saved = path.read_text()
    assert json.loads(saved)[STATE_KEY] == program.get_bindings()
    assert ctx.id not in saved

    loaded = VariableAwarePredict("question -> answer")
    loaded.load(str(path))
    assert loaded.get_bindings() == {"temperature": "temperature", "max_tokens": "max_tokens", "instructions": "policy"}
    assert loaded.session_context is None and len(loaded.demos) == 1
    with pytest.raises(DSPexError, match="no session context"):
        loaded(question="q")
    loaded.set_session_context(ctx)
    loaded(question="q")
    assert (engine.last.temperature, engine.last.max_tokens) == (0.7, 256)
    assert "Be brief." in engine.last.system


def test_dspy_load_of_a_whole_saved_program(ctx: Context, engine: RecordingEngine, lm: Any, tmp_path: Path) -> None:
    program = VariableAwareChainOfThought(
        "question -> answer", session_context=ctx, variable_bindings={"max_tokens": "max_tokens"}
    )
    program.save(str(tmp_path / "whole"), save_program=True)
    loaded = dspy.load(str(tmp_path / "whole"), allow_pickle=True)
    assert loaded.get_bindings() == {"max_tokens": "max_tokens"} and loaded.session_context is None
    loaded.set_session_context(ctx)
    loaded(question="q")
    assert engine.last.max_tokens == 256


# ------------------------------------------------------------------ across processes

WRITER = textwrap.dedent(
    """
    import sys
    from dspex_dspy.client import SessionContext

    address, session_id, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with SessionContext.connect(address, session_id=session_id, cache=False) as session:
        print(session.set_variable("temperature", value))
    """
)

SEED_WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from dspex_dspy.client import AsyncSessionContext
    from dspex_dspy.modules import VariableAwarePredict

    async def main():
        ctx = await AsyncSessionContext.connect(sys.argv[1], session_id=sys.argv[2])
        try:
            predictor = VariableAwarePredict("question -> answer", session_context=ctx)
            await predictor.abind_to_variable("temperature", "temperature")
            await predictor.abind_to_variable("max_tokens", "max_tokens")
            return {
                "temperature": await predictor.aget_bound_value("temperature"),
                "max_tokens": await predictor.aget_bound_value("max_tokens"),
                "bindings": predictor.get_bindings(),
            }
        finally:
            await ctx.close()

    print(json.dumps(asyncio.run(main())))
    """
)


def run_python(script: str, *args: str) -> str:
    """Run ``script`` in a fresh interpreter (another process) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def bridged(ctx: Context) -> Context:
    pytest.importorskip("dspex_dspy.client", reason="the worker client (dspex_dspy.client) is not available")
    ctx.ensure_bridged()
    assert ctx.bridge_address is not None
    return ctx


def test_write_from_another_process_reaches_the_next_call(bridged: Context, engine: RecordingEngine, lm: Any) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=bridged)
    predictor(question="before")
    assert run_python(WRITER, str(bridged.bridge_address), bridged.id, "0.25") == "2"
    after = predictor(question="after")
    assert [r.temperature for r in engine.requests] == [0.7, 0.25]
    assert get_provenance(after)["temperature"].version == 2


def wait_for(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the write to arrive"
        time.sleep(0.02)


def test_worker_session_context_sees_a_write_from_another_process(
    bridged: Context, engine: RecordingEngine, lm: Any
) -> None:
    from dspex_dspy.client import SessionContext

    with SessionContext.connect(str(bridged.bridge_address), session_id=bridged.id) as worker:
        predictor = VariableAwarePredict("question -> answer", session_context=worker)
        assert predictor.get_bindings() == {"temperature": "temperature", "max_tokens": "max_tokens"}
        predictor(question="before")
        run_python(WRITER, str(bridged.bridge_address), bridged.id, "1.25")
        wait_for(lambda: predictor.temperature == 1.25)
        prediction = predictor(question="after")
    assert [r.temperature for r in engine.requests] == [0.7, 1.25]
    assert get_provenance(prediction)["temperature"].version == 2


def test_async_session_context_source_with_acall(bridged: Context, engine: RecordingEngine, lm: Any) -> None:
    from dspex_dspy.client import AsyncSessionContext

    async def run() -> tuple[Any, Any]:
        session = await AsyncSessionContext.connect(str(bridged.bridge_address), session_id=bridged.id)
        try:
            predictor = VariableAwarePredict("question -> answer", session_context=session)
            first = await predictor.acall(question="before")  # resolves the default bindings
            await asyncio.to_thread(run_python, WRITER, str(bridged.bridge_address), bridged.id, "0.05")
            deadline = time.monotonic() + 20
            while await predictor.aget_bound_value("temperature") != 0.05:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            return first, await predictor.acall(question="after")
        finally:
            await session.close()

    first, second = asyncio.run(run())
    assert set(get_provenance(first)) == {"temperature", "max_tokens"}
    assert [r.temperature for r in engine.requests] == [0.7, 0.05]
    assert get_provenance(second)["temperature"].version == 2


def test_seed_variable_aware_module_in_a_worker_process(bridged: Context) -> None:
    """The seed's "variable-aware DSPy modules" test, in a real worker process over gRPC."""
    Variables.defvariable(bridged, "model_name", "string", "gpt-4")
    result = json.loads(run_python(SEED_WORKER, str(bridged.bridge_address), bridged.id))
    assert result["temperature"] == 0.7
    assert result["max_tokens"] == 256
    assert result["bindings"]["temperature"] == "temperature"


def test_context_switching_to_the_bridge_mid_life_keeps_serving(ctx: Context, engine: RecordingEngine, lm: Any) -> None:
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    predictor(question="local")
    pytest.importorskip("dspex_dspy.server", reason="the bridge server is not available")
    ctx.ensure_bridged()
    Variables.set(ctx, "temperature", 0.9)
    predictor(question="bridged")
    assert [r.temperature for r in engine.requests] == [0.7, 0.9]


def test_threads_writing_and_calling_never_see_torn_values(ctx: Context, engine: RecordingEngine) -> None:
    """Calls running while another thread writes always send a value some version really had."""
    model = recording_lm(engine)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            k = (k + 1) % 100
            Variables.set(ctx, "temperature", k / 50)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with dspy.context(lm=model):
            predictions = [predictor(question=f"call-{i:03d}") for i in range(30)]
    finally:
        stop.set()
        thread.join()
    for i, prediction in enumerate(predictions):
        assert request_for(engine, f"call-{i:03d}").temperature == get_provenance(prediction)["temperature"].value
