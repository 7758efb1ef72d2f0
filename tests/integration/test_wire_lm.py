"""Bound values on the wire: ``dspy.LM`` over HTTP to a local OpenAI-compatible stub server.

The stub (``http.server`` on 127.0.0.1, port 0, in a thread) records the JSON body of every
``POST .../chat/completions`` and answers with a chat completion the ChatAdapter parses. The
assertions read the bodies as an OpenAI server would receive them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dspy
import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.modules import VariableAwarePredict, get_provenance

pytestmark = pytest.mark.integration

ANSWER = "[[ ## answer ## ]]\n42\n\n[[ ## completed ## ]]"


class ChatCompletionsStub(ThreadingHTTPServer):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint that records request bodies."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: ChatCompletionsStub

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        with self.server.lock:
            self.server.bodies.append(body)
            self.server.paths.append(self.path)
        if not self.path.rstrip("/").endswith("chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        self._send(
            200,
            {
                "id": f"chatcmpl-{len(self.server.bodies)}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "unknown"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            },
        )

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the recorded bodies instead."""


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatCompletionsStub]:
    # DSPy fetches a model-metadata map from the internet on first use unless told to use the
    # bundled copy; tests must not depend on (or wait for) the network.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    server = ChatCompletionsStub()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="chat-stub", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def ctx() -> Iterator[Context]:
    context = Context()
    Variables.defvariable(context, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(context, "max_tokens", "integer", 256)
    Variables.defvariable(context, "model", "string", "openai/stub-small")
    yield context
    context.stop()


def max_tokens_of(body: dict[str, Any]) -> Any:
    # DSPy's OpenAI wire sends max_tokens as the newer max_completion_tokens.
    return body.get("max_completion_tokens", body.get("max_tokens"))


def test_bound_temperature_max_tokens_and_model_are_on_the_wire(stub: ChatCompletionsStub, ctx: Context) -> None:
    lm = dspy.LM("openai/stub-default", api_base=stub.api_base, api_key="test", cache=False)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx, variable_bindings={"model": "model"})
    try:
        with dspy.context(lm=lm):
            first = predictor(question="What is 6 * 7?")
            Variables.update_many(ctx, {"temperature": 0.2, "max_tokens": 64, "model": "openai/stub-large"})
            second = predictor(question="What is 6 * 7?")
            dspy.Predict("question -> answer")(question="unbound")
    finally:
        lm.close()

    assert first.answer == second.answer == "42"
    assert stub.paths == ["/v1/chat/completions"] * 3
    bound_first, bound_second, plain = stub.bodies
    assert (bound_first["model"], bound_first["temperature"], max_tokens_of(bound_first)) == ("stub-small", 0.7, 256)
    assert (bound_second["model"], bound_second["temperature"], max_tokens_of(bound_second)) == ("stub-large", 0.2, 64)
    assert "What is 6 * 7?" in json.dumps(bound_first["messages"])
    assert plain["model"] == "stub-default" and "temperature" not in plain and max_tokens_of(plain) is None
    assert get_provenance(second)["model"].version == 2


def test_per_call_config_overrides_the_binding_on_the_wire(stub: ChatCompletionsStub, ctx: Context) -> None:
    lm = dspy.LM("openai/stub-default", api_base=stub.api_base, api_key="test", cache=False)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    try:
        with dspy.context(lm=lm):
            predictor(question="q", config={"temperature": 1.25})
    finally:
        lm.close()
    (body,) = stub.bodies
    assert (body["model"], body["temperature"], max_tokens_of(body)) == ("stub-default", 1.25, 256)
