"""Live tuning: a worker process picks up a change made elsewhere on its very next call.

The orchestrator defines ``temperature`` and ``max_tokens``, bridges the context and starts a
worker process. The worker binds a ``VariableAwarePredict`` to the session and answers; the
orchestrator (standing in for a notebook user) changes the temperature; the worker's next call
uses the new value — read from its watch-fed cache, no polling, no restart — and its provenance
says which version it used.

Run: ``python examples/live_tuning.py`` (offline; set OPENAI_API_KEY to use a real model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _lm import example_lm

from dspex_dspy import Context, Variables


def worker(address: str, session_id: str) -> None:
    """The worker process: answer, wait for the orchestrator's change, answer again."""
    import dspy

    from dspex_dspy import SessionContext, VariableAwarePredict
    from dspex_dspy.modules import get_provenance

    with SessionContext.connect(address, session_id=session_id) as session, dspy.context(lm=example_lm()):
        qa = VariableAwarePredict("question -> answer", session_context=session)
        for call in (1, 2):
            if call == 2:
                wanted = int(sys.stdin.readline())
                session.wait_cached("temperature", wanted, timeout=30)
            prediction = qa(question="Suggest a name for a sailing boat.")
            used = get_provenance(prediction)["temperature"]
            print(
                json.dumps(
                    {"call": call, "temperature": used.value, "version": used.version, "answer": prediction.answer}
                ),
                flush=True,
            )


def main() -> list[dict[str, object]]:
    """Run the orchestrator side; return what the worker reported."""
    with Context() as ctx:
        Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
        Variables.defvariable(ctx, "max_tokens", "integer", 200, constraints={"min": 1, "max": 4096})
        ctx.ensure_bridged()
        print(f"bridged at {ctx.bridge_address}; starting a worker", flush=True)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(ctx.bridge_address), ctx.id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        reports = [json.loads(proc.stdout.readline())]
        print(f"worker call 1 used temperature {reports[0]['temperature']} (v{reports[0]['version']})", flush=True)

        version = Variables.set(ctx, "temperature", 1.2)
        print(f"orchestrator set temperature = 1.2 (v{version})", flush=True)
        proc.stdin.write(f"{version}\n")
        proc.stdin.flush()
        reports.append(json.loads(proc.stdout.readline()))
        print(f"worker call 2 used temperature {reports[1]['temperature']} (v{reports[1]['version']})", flush=True)
        if proc.wait(timeout=60) != 0:
            raise SystemExit("the worker failed")
        assert reports[1]["temperature"] == 1.2
        return reports


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
