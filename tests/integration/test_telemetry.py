"""OpenTelemetry spans around variable-aware module calls, with the provenance of each call.

The tracing test runs in a subprocess: an OpenTelemetry SDK installs a process-wide tracer
provider, which must not leak into the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dspex_dspy import telemetry

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import asyncio, json
    import dspy
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from support.recording_lm import RecordingEngine, recording_lm
    from dspex_dspy import Context, Variables, telemetry
    from dspex_dspy.modules import VariableAwarePredict

    before = telemetry.active_tracer()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    ctx = Context()
    Variables.defvariable(ctx, "temperature", "float", 0.7)
    Variables.set(ctx, "temperature", 0.9)
    predictor = VariableAwarePredict("question -> answer", session_context=ctx)
    with dspy.context(lm=recording_lm(RecordingEngine())):
        predictor(question="hi")
        Variables.set(ctx, "temperature", 1.1)
        asyncio.run(predictor.acall(question="again"))
    spans = [
        {"name": s.name, "attributes": dict(s.attributes)}
        for s in exporter.get_finished_spans()
        if s.name.startswith("dspex.")
    ]
    print(json.dumps({"before": before is not None, "spans": spans}))
    """
)


def test_module_calls_are_spans_carrying_the_variable_versions(tmp_path: Path) -> None:
    script = tmp_path / "traced.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["before"] is False, "no SDK configured: no tracer"
    spans = report["spans"]
    assert [s["name"] for s in spans] == ["dspex.module VariableAwarePredict"] * 2
    first, second = (s["attributes"] for s in spans)
    assert first["dspex.module"] == "VariableAwarePredict"
    assert (first["dspex.variable.temperature.name"], first["dspex.variable.temperature.version"]) == (
        "temperature",
        2,
    )
    assert first["dspex.variable.temperature.applied"] is True
    assert second["dspex.variable.temperature.version"] == 3


def test_without_an_sdk_nothing_is_traced() -> None:
    assert telemetry.active_tracer() is None
    assert telemetry.provenance_attributes(None) == {}
