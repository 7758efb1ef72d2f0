"""A worker that reports its module calls: ``python reporting.py --address A --session S --calls N``.

It connects with reporting on (``DSPEX_REPORT_CALLS=1`` from the test's environment, or
``--option``), runs a ``VariableAwarePredict`` bound to ``temperature`` and the secret
``system_prompt`` (as its instructions) N times on a real ``dspy.LM`` over the recording engine,
prints one JSON line per call with the versions its provenance shows, and closes (which sends what
is still queued).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import dspy

from dspex_dspy import SessionContext, VariableAwarePredict
from dspex_dspy.modules import get_provenance
from tests.support.recording_lm import RecordingEngine, recording_lm


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--option", action="store_true", help="report_calls=True instead of the environment")
    opts = parser.parse_args(argv)
    extra = {"report_calls": True} if opts.option else {}
    engine = RecordingEngine()
    with SessionContext.connect(opts.address, opts.session, **extra) as ctx:
        program = VariableAwarePredict(
            "question -> answer",
            session_context=ctx,
            variable_bindings={"temperature": "temperature", "instructions": "system_prompt"},
            default_bindings=False,
        )
        with dspy.context(lm=recording_lm(engine)):
            for i in range(opts.calls):
                prediction = program(question=f"q{i}")
                seen = {attr: b.version for attr, b in get_provenance(prediction).items()}
                print(json.dumps({"versions": seen, "temperature": engine.last.temperature}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
