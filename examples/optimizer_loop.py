"""An optimizer loop: search a bound variable's declared range, publish the best value to all workers.

The search space is not hard-coded: it is read from the variable's own constraints
(``{"min": 0.0, "max": 1.5}``). Each candidate is written to the session, the bound program is
scored on a small dev set, and the best value is published with one write that every worker
sees. Two worker processes wait for the published value and report what their own bound
predictors will now use.

Offline, the metric is a synthetic quality curve over the temperature each answer reports it was
generated with (the offline LM states its settings), so the run is deterministic; with
OPENAI_API_KEY set the same loop scores real answers with exact match.

Run: ``python examples/optimizer_loop.py``
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _lm import example_lm

from dspex_dspy import Context, Variables

DEV_SET = [("What is 2 + 3?", "5"), ("What is the capital of Italy?", "Rome"), ("How many legs has a spider?", "8")]


def score(answer: str, gold: str) -> float:
    """Exact match with a real LM; offline, a synthetic curve peaking at temperature 0.3."""
    if os.environ.get("OPENAI_API_KEY"):
        return float(gold.lower() in answer.lower())
    used = float(re.search(r"temperature=([0-9.]+)", answer).group(1))  # type: ignore[union-attr]
    return 1.0 - (used - 0.3) ** 2


def worker(address: str, session_id: str, name: str) -> None:
    """Wait until the optimizer publishes, then report the temperature this worker's predictor uses."""
    from dspex_dspy import SessionContext, VariableAwarePredict

    with SessionContext.connect(address, session_id=session_id) as session:
        qa = VariableAwarePredict("question -> answer", session_context=session)
        with session.watch_variables(["temperature"]) as watch:
            next(watch)  # the initial value: the watch is registered, no later write can be missed
            print(json.dumps({"worker": name, "ready": True}), flush=True)
            published = next(e for e in watch if e.metadata.get("published_by") == "optimizer_loop")
        # Read-after-watch: once the watch yielded the published write, cached reads include it.
        assert session.get_versioned("temperature")[1] >= published.version
        print(json.dumps({"worker": name, "temperature": qa.temperature}), flush=True)


def main() -> float:
    """Run the search and the two workers; return the published temperature."""
    import dspy

    from dspex_dspy import VariableAwarePredict

    with Context() as ctx:
        Variables.defvariable(ctx, "temperature", "float", 1.0, constraints={"min": 0.0, "max": 1.5})
        ctx.ensure_bridged()
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(ctx.bridge_address), ctx.id, f"worker-{i}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in (1, 2)
        ]
        for proc in workers:
            assert proc.stdout is not None
            json.loads(proc.stdout.readline())  # ready

        bounds = Variables.get_variable(ctx, "temperature").constraints
        low, high, steps = float(bounds["min"]), float(bounds["max"]), 6
        candidates = [round(low + (high - low) * i / (steps - 1), 3) for i in range(steps)]
        print(f"searching temperature over its declared range [{low}, {high}]: {candidates}", flush=True)

        program = VariableAwarePredict("question -> answer", session_context=ctx)
        results = {}
        with dspy.context(lm=example_lm()):
            for candidate in candidates:
                Variables.set(ctx, "temperature", candidate)
                total = sum(score(program(question=q).answer, gold) for q, gold in DEV_SET)
                results[candidate] = total / len(DEV_SET)
                print(f"  temperature {candidate:<5} -> score {results[candidate]:.3f}", flush=True)
        best = max(results, key=lambda t: results[t])
        version = Variables.set(ctx, "temperature", best, metadata={"published_by": "optimizer_loop"})
        print(f"published temperature = {best} (v{version}) to all workers", flush=True)

        for proc in workers:
            assert proc.stdout is not None
            report = json.loads(proc.stdout.readline())
            print(f"{report['worker']} now uses temperature {report['temperature']}", flush=True)
            assert report["temperature"] == best
            if proc.wait(timeout=60) != 0:
                raise SystemExit("a worker failed")
        return best


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
