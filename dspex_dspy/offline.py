"""A deterministic offline LM for demos, examples and notebooks: a real ``dspy.LM``, no network.

:func:`offline_lm` returns ``dspy.LM(model, engine=OfflineEngine())`` — DSPy 3.4's supported way
to plug a custom backend. The engine answers every output field the ChatAdapter asks for with a
short text that states the settings it was called with (model, temperature, max_tokens), so the
effect of changing a bound variable is visible in the answer itself. Same request, same answer.

Example:
    >>> import dspy
    >>> lm = offline_lm("offline/small")
    >>> with dspy.context(lm=lm):
    ...     dspy.Predict("question -> answer")(question="2+2?", config={"temperature": 0.2}).answer
    'answer to "2+2?" [model=offline/small temperature=0.2 max_tokens=-]'
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

__all__ = ["OFFLINE_MODEL_QUALITY", "OfflineEngine", "offline_lm", "settings_quality"]

#: How good each offline model is on :func:`settings_quality`'s synthetic task.
OFFLINE_MODEL_QUALITY = {"offline/small": 0.7, "offline/medium": 0.85, "offline/large": 1.0}
_SETTINGS = re.compile(r"model=(?P<model>\S+) temperature=(?P<temperature>\S+) max_tokens=(?P<max_tokens>[^\]\s]+)")

_OUTPUTS = re.compile(r"Your output fields are:\n(.*?)(?:\nAll interactions|\Z)", re.DOTALL)
_FIELD = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)
_LAST_INPUT = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\Z)", re.DOTALL)


def _text(parts: Any) -> str:
    if isinstance(parts, str):
        return parts
    return "".join(getattr(p, "text", "") or "" for p in parts or ())


class OfflineEngine:
    """A dspy engine (``complete(Request) -> Response``) that answers deterministically.

    Args:
        model_label: how the model is named in answers (defaults to the request's model).
    """

    def __init__(self, model_label: str | None = None) -> None:
        self.model_label = model_label
        self.calls = 0

    def complete(self, request: Request) -> Response:
        """Answer each requested output field with a text naming the question and the settings."""
        self.calls += 1
        system = _text(request.system)
        section = _OUTPUTS.search(system)
        fields = _FIELD.findall(section.group(1)) if section else ["answer"]
        user = _text(request.messages[-1].parts) if request.messages else ""
        inputs = dict(_LAST_INPUT.findall(user))
        subject = next(iter(inputs.values()), "").strip().splitlines()[0] if inputs else ""
        config = request.config
        settings = (
            f"model={self.model_label or request.model} "
            f"temperature={config.temperature if config.temperature is not None else '-'} "
            f"max_tokens={config.max_tokens if config.max_tokens is not None else '-'}"
        )
        body = "\n\n".join(f'[[ ## {name} ## ]]\n{name} to "{subject}" [{settings}]' for name in fields)
        return Response(
            id=f"offline-{self.calls}",
            model=request.model,
            message=Message.assistant([TextPart(body + "\n\n[[ ## completed ## ]]")]),
            finish_reason="stop",
            usage=Usage(
                input_tokens=len(user) // 4, output_tokens=len(body) // 4, total_tokens=(len(user) + len(body)) // 4
            ),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        """One response as stream events."""
        return iter(response_to_events(self.complete(request)))

    def close(self) -> None:
        """Nothing to release."""


class _AsyncOfflineEngine:
    def __init__(self, engine: OfflineEngine) -> None:
        self.engine = engine

    async def complete(self, request: Request) -> Response:
        return self.engine.complete(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in response_to_events(self.engine.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to release."""


def settings_quality(answer: str) -> float:
    """A synthetic, deterministic quality score of an offline answer, from the settings it states.

    The best answer (1.0) comes from ``offline/large`` at temperature 0.35 with 600 max tokens;
    quality falls off smoothly with the temperature and the token budget and is scaled by the
    model (:data:`OFFLINE_MODEL_QUALITY`; unknown models score 0.5). Used as a tuning metric in
    examples, notebooks and tests, where the known optimum makes a search checkable.

    Example:
        >>> settings_quality('answer to "x" [model=offline/large temperature=0.35 max_tokens=600]')
        1.0
    """
    found = _SETTINGS.search(answer)
    if found is None:
        return 0.0
    try:
        temperature = float(found.group("temperature"))
        max_tokens = float(found.group("max_tokens"))
    except ValueError:
        return 0.0
    weight = OFFLINE_MODEL_QUALITY.get(found.group("model"), 0.5)
    return weight * (1.0 - 0.5 * (temperature - 0.35) ** 2) * (1.0 - 0.5 * ((max_tokens - 600.0) / 4000.0) ** 2)


def offline_lm(model: str = "offline/demo", **kwargs: Any) -> Any:
    """A real ``dspy.LM`` on an :class:`OfflineEngine` (cache off), for runs without network or keys."""
    engine = OfflineEngine()
    return dspy.LM(model, engine=engine, async_engine=_AsyncOfflineEngine(engine), cache=False, **kwargs)
