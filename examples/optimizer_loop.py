"""Tune a live fleet: VariableTuner searches the bound variables while two workers keep serving.

The search space is not written anywhere in this file: it is read from the variables' declared
constraints (a float range, an integer range, an enum of models). Each trial runs the program with
the trial's values applied per call, so the two worker processes keep answering with the
published values the whole time; the tuner holds a lease on the variables while it searches and
publishes the winner in one atomic write. The workers' provenance shows the switch: each reports
the values and versions its calls used before and after.

The run is offline and deterministic: the offline LM states the settings it was called with and
``settings_quality`` scores them (best: ``offline/large``, temperature 0.35, 600 max tokens).

Run: ``python examples/optimizer_loop.py``
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

import dspy

from dspex_dspy import Context, SessionContext, VariableAwarePredict, Variables
from dspex_dspy.modules import get_provenance
from dspex_dspy.offline import offline_lm, settings_quality
from dspex_dspy.tune import VariableTuner

MODELS = ["offline/small", "offline/medium", "offline/large"]
DEV_SET = [
    dspy.Example(question=q).with_inputs("question")
    for q in ("What is 2 + 3?", "What is the capital of Italy?", "How many legs has a spider?", "Largest planet?")
]


def build_program(session: object) -> VariableAwarePredict:
    """The program the fleet serves: temperature and max_tokens bound by default, model bound here."""
    program = VariableAwarePredict("question -> answer", session_context=session)
    program.bind_to_variable("model", "model")
    return program


def metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
    return settings_quality(prediction.answer)


def worker(address: str, session_id: str, name: str) -> None:
    """Serve calls until stdin closes; print the provenance of the first call and of every change."""
    with SessionContext.connect(address, session_id=session_id) as session:
        program = build_program(session)
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        last = None
        with dspy.context(lm=offline_lm(MODELS[0])):
            while not stop.is_set():
                at = time.time()
                used = get_provenance(program(question="What is 2 + 3?"))
                seen = {attr: [b.value, b.version] for attr, b in sorted(used.items())}
                if seen != last:
                    print(json.dumps({"worker": name, "seen": seen, "at": at}), flush=True)
                    last = seen
                stop.wait(0.02)


def _show(seen: dict[str, list[object]]) -> str:
    return ", ".join(f"{attr} {value} (v{version})" for attr, (value, version) in seen.items())


def main() -> None:
    """Start two workers, tune while they serve, and show them switching to the winner."""
    logging.basicConfig(level=logging.WARNING)
    with Context() as ctx:
        Variables.defvariable(ctx, "temperature", "float", 1.2, constraints={"min": 0.0, "max": 1.5})
        Variables.defvariable(ctx, "max_tokens", "integer", 64, constraints={"min": 16, "max": 4096})
        Variables.defvariable(ctx, "model", "string", MODELS[0], constraints={"enum": MODELS})
        ctx.ensure_bridged()
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(ctx.bridge_address), ctx.id, f"worker-{i}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in (1, 2)
        ]
        before = {}
        for proc in workers:
            assert proc.stdout is not None
            report = json.loads(proc.stdout.readline())
            before[report["worker"]] = report["seen"]
            print(f"{report['worker']} serves: {_show(report['seen'])}", flush=True)

        during: list[str] = []

        def watched_metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
            if not during:  # what everyone else sees while the search runs
                status = Variables.get_variable(ctx, "model").optimization_status
                during.append(f"model is held by optimizer {status.optimizer_id}" if status else "model is not held")
            return metric(example, prediction, trace)

        tuner = VariableTuner(watched_metric, num_trials=30, seed=0, num_threads=2, optimizer_id="example-tuner")
        program = build_program(ctx)
        with dspy.context(lm=offline_lm(MODELS[0])):
            tuner.compile(program, trainset=DEV_SET)
        result = tuner.result
        assert result is not None and result.best is not None
        print("searching " + ", ".join(f"{n} ({d})" for n, d in result.searched.items()), flush=True)
        print(f"during the search: {during[0]}", flush=True)
        print(f"best trial {result.best.number}: score {result.best.score:.4f} with {result.best.values}", flush=True)
        published = result.published[-1]
        print(f"published v{published.versions['model']} of {sorted(published.versions)} by {tuner.optimizer_id}")
        model = Variables.get_variable(ctx, "model")
        print(f"model metadata: {dict(model.metadata)}", flush=True)

        for proc in workers:
            assert proc.stdout is not None
            report = json.loads(proc.stdout.readline())
            name = report["worker"]
            changes = ", ".join(
                f"{attr} {before[name][attr][0]} (v{before[name][attr][1]}) -> {value} (v{version})"
                for attr, (value, version) in report["seen"].items()
            )
            lag = report["at"] - model.updated_at
            print(f"{name} switched: {changes} (first call {lag:.3f} s after publication)", flush=True)
        for proc in workers:
            assert proc.stdin is not None
            proc.stdin.close()
            if proc.wait(timeout=60) != 0:
                raise SystemExit("a worker failed")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
