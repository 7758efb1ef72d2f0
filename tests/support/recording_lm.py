"""A real ``dspy.LM`` on a recording engine: every request is kept, every answer is well-formed.

DSPy 3.4 plugs a custom backend into ``dspy.LM`` as an *engine* (``complete(Request) ->
Response``, plus an async twin). :class:`RecordingEngine` records the final, merged request the
LM builds — model, temperature, max_tokens, top_p, penalties, seed, stop, the system prompt and
the messages — and answers in the ChatAdapter's format, so the whole DSPy stack (adapter,
parsing, history, callbacks) runs for real. Answers are scripted (a list consumed in order, or a
function of the request) or derived from the output fields the system prompt asks for.

Example:
    >>> engine = RecordingEngine()
    >>> lm = recording_lm(engine)
    >>> with dspy.context(lm=lm):
    ...     dspy.Predict("question -> answer")(question="hi", config={"temperature": 0.3}).answer
    'answer-1'
    >>> engine.last.temperature
    0.3
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

__all__ = [
    "AsyncRecordingEngine",
    "RecordedRequest",
    "RecordingEngine",
    "chat_answer",
    "output_fields",
    "recording_lm",
]

_OUTPUTS_SECTION = re.compile(r"Your output fields are:\n(.*?)(?:\nAll interactions|\Z)", re.DOTALL)
_FIELD = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)

Answer = Mapping[str, Any] | str
Responder = Callable[["RecordedRequest"], Answer]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the engine received it."""

    model: str
    temperature: float | None
    max_tokens: int | None
    top_p: float | None
    frequency_penalty: float | None
    presence_penalty: float | None
    seed: int | None
    stop: tuple[str, ...]
    system: str
    messages: tuple[tuple[str, str], ...]
    raw: Request = field(repr=False)

    @property
    def user_text(self) -> str:
        """The text of every user message, joined."""
        return "\n".join(text for role, text in self.messages if role == "user")

    @property
    def last_user_text(self) -> str:
        """The last user message (the current inputs, after any demos)."""
        return next((text for role, text in reversed(self.messages) if role == "user"), "")

    @property
    def prompt(self) -> str:
        """System prompt and every message, joined: what a substring search should look at."""
        return "\n".join([self.system, *(text for _, text in self.messages)])


def output_fields(system: str) -> list[str]:
    """The output field names the ChatAdapter's system prompt asks for, in order."""
    section = _OUTPUTS_SECTION.search(system)
    return _FIELD.findall(section.group(1)) if section else []


def chat_answer(values: Mapping[str, Any]) -> str:
    """``values`` in the ChatAdapter's format (non-strings as JSON), ending with ``completed``."""
    parts = []
    for name, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"[[ ## {name} ## ]]\n{text}")
    parts.append("[[ ## completed ## ]]")
    return "\n\n".join(parts)


def _text_of(parts: Iterable[Any]) -> str:
    return "".join(getattr(p, "text", "") or "" for p in parts)


class RecordingEngine:
    """A synchronous dspy engine that records requests and answers them.

    Args:
        answers: scripted answers, consumed in order: a mapping of output field -> value, or
            the raw completion text. When they run out, answers are derived from the prompt.
        responder: a function of the :class:`RecordedRequest` returning an answer (wins over
            ``answers``).
        delay_s: seconds to sleep in each request (to make concurrent calls overlap).
    """

    def __init__(
        self,
        answers: Iterable[Answer] = (),
        *,
        responder: Responder | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self._answers = list(answers)
        self._responder = responder
        self._delay_s = delay_s
        self._lock = threading.Lock()
        self._count = 0
        self.requests: list[RecordedRequest] = []

    @property
    def last(self) -> RecordedRequest:
        """The most recent request."""
        with self._lock:
            return self.requests[-1]

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    def record(self, request: Request) -> tuple[RecordedRequest, int]:
        """Record ``request``; return it and its 1-based sequence number."""
        system = request.system if isinstance(request.system, str) else _text_of(request.system or ())
        config = request.config
        recorded = RecordedRequest(
            model=request.model,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            top_p=config.top_p,
            frequency_penalty=config.frequency_penalty,
            presence_penalty=config.presence_penalty,
            seed=config.seed,
            stop=tuple(config.stop),
            system=system or "",
            messages=tuple((m.role, _text_of(m.parts)) for m in request.messages),
            raw=request,
        )
        with self._lock:
            self.requests.append(recorded)
            self._count += 1
            number = self._count
        return recorded, number

    def answer(self, recorded: RecordedRequest, number: int) -> Response:
        """The response to a recorded request."""
        if self._responder is not None:
            answer: Answer = self._responder(recorded)
        else:
            with self._lock:
                scripted = self._answers.pop(0) if self._answers else None
            answer = (
                scripted
                if scripted is not None
                else {name: f"{name}-{number}" for name in output_fields(recorded.system)}
            )
        text = answer if isinstance(answer, str) else chat_answer(answer)
        return Response(
            id=f"rec-{number}",
            model=recorded.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2),
        )

    def complete(self, request: Request) -> Response:
        recorded, number = self.record(request)
        if self._delay_s:
            time.sleep(self._delay_s)
        return self.answer(recorded, number)

    def stream(self, request: Request) -> Any:
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Nothing to release."""


class AsyncRecordingEngine:
    """The async twin of a :class:`RecordingEngine`; records into the same list."""

    def __init__(self, sync: RecordingEngine) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        recorded, number = self.sync.record(request)
        if self.sync._delay_s:
            await asyncio.sleep(self.sync._delay_s)
        return self.sync.answer(recorded, number)

    async def stream(self, request: Request) -> Any:
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to release."""


def recording_lm(engine: RecordingEngine, model: str = "openai/test-model", **kwargs: Any) -> Any:
    """A real ``dspy.LM`` (no cache) whose requests go to ``engine``."""
    return dspy.LM(model, engine=engine, async_engine=AsyncRecordingEngine(engine), cache=False, **kwargs)
