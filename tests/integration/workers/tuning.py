"""Processes of the tuning tests: a serving worker, a tuner, and a helper running trials of a shared study.

    python tuning.py serve  --address A --session S --name N
        serve calls of a bound program until stdin closes; one JSON line per call with the
        values and versions its provenance shows, and when the call started and ended.
    python tuning.py tune   --address A --session S --optimizer-id ID --lease-ttl T [--hang]
        tune the session's variables as a worker; with --hang the metric blocks after the first
        trial's first example is scored (the process holds its lease until killed).
    python tuning.py helper --journal PATH_OR_REDIS_URL --study NAME --trials N --optimizer-id ID [--pause-after K]
        run trials of a shared study (Optuna journal storage on a file or Redis) on a local copy
        of the task; no lease, no publication. With --pause-after K, once K of its trials are done
        it prints ``paused`` (from inside its next trial) and waits for a line on stdin.

Each prints ``ready`` when in position.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import dspy

from dspex_dspy import Context, SessionContext, VariableAwarePredict, Variables
from dspex_dspy.modules import get_provenance
from dspex_dspy.offline import offline_lm, settings_quality
from dspex_dspy.tune import VariableTuner

MODELS = ["offline/small", "offline/medium", "offline/large"]
QUESTIONS = ["What is 2 + 3?", "Capital of Italy?", "Legs of a spider?", "Largest planet?"]


def say(message: object) -> None:
    print(message if isinstance(message, str) else json.dumps(message), flush=True)


def define_task(ctx: Context) -> None:
    """The tuning task's variables: temperature (float range), max_tokens (int range), model (enum)."""
    Variables.defvariable(ctx, "temperature", "float", 1.2, constraints={"min": 0.0, "max": 1.5})
    Variables.defvariable(ctx, "max_tokens", "integer", 64, constraints={"min": 16, "max": 4096})
    Variables.defvariable(ctx, "model", "string", "offline/small", constraints={"enum": MODELS})


def program_for(session: object) -> VariableAwarePredict:
    program = VariableAwarePredict("question -> answer", session_context=session)
    program.bind_to_variable("model", "model")
    return program


def trainset() -> list[dspy.Example]:
    return [dspy.Example(question=q).with_inputs("question") for q in QUESTIONS]


def metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
    return settings_quality(prediction.answer)


def journal_storage(where: str) -> object:
    """Optuna's journal storage on a file, or on Redis for a ``redis://`` URL."""
    import optuna

    journal = optuna.storages.journal
    if not where.startswith("redis://"):
        return optuna.storages.JournalStorage(journal.JournalFileBackend(where))
    with warnings.catch_warnings():
        # Optuna marks its Redis journal experimental; the test shows it works for a shared study.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.JournalStorage(journal.JournalRedisBackend(where))


def serve(opts: argparse.Namespace) -> None:
    with SessionContext.connect(opts.address, session_id=opts.session) as session:
        program = program_for(session)
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        with dspy.context(lm=offline_lm(MODELS[0])):
            say("ready")
            while not stop.is_set():
                at = time.time()
                prediction = program(question="What is 2 + 3?")
                end = time.time()
                seen = {attr: [b.value, b.version] for attr, b in get_provenance(prediction).items()}
                say({"worker": opts.name, "at": at, "end": end, "seen": seen, "answer": prediction.answer})
                stop.wait(0.02)


def tune(opts: argparse.Namespace) -> None:
    hang = threading.Event()
    scored = 0

    def blocking_metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
        nonlocal scored
        scored += 1
        if opts.hang and scored == 1:
            say("ready")
            hang.wait()
        return metric(example, prediction, trace)

    with SessionContext.connect(opts.address, session_id=opts.session) as session:
        tuner = VariableTuner(
            blocking_metric,
            num_trials=5,
            seed=0,
            num_threads=1,
            optimizer_id=opts.optimizer_id,
            lease_ttl=opts.lease_ttl,
            progress=False,
        )
        with dspy.context(lm=offline_lm(MODELS[0])):
            tuner.compile(program_for(session), trainset=trainset())
        say({"done": True})


def helper(opts: argparse.Namespace) -> None:

    storage = journal_storage(opts.journal)
    ctx = Context()
    define_task(ctx)
    scored = 0

    def slow_metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> float:
        nonlocal scored
        scored += 1  # num_threads=1: one example at a time
        if opts.pause_after is not None and scored == opts.pause_after * len(trainset()) + 1:
            say("paused")
            sys.stdin.readline()  # a line (or stdin closed) resumes
        time.sleep(opts.delay)
        return metric(example, prediction, trace)

    tuner = VariableTuner(
        slow_metric,
        num_trials=opts.trials,
        seed=1,
        publish=None,
        num_threads=1,
        storage=storage,
        study_name=opts.study,
        optimizer_id=opts.optimizer_id,
        progress=False,
    )
    say("ready")
    with dspy.context(lm=offline_lm(MODELS[0])):
        tuner.compile(program_for(ctx), trainset=trainset())
    assert tuner.result is not None
    mine = [t.number for t in tuner.result.trials if t.optimizer_id == opts.optimizer_id]
    say({"done": True, "trials": mine})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["serve", "tune", "helper"])
    parser.add_argument("--address")
    parser.add_argument("--session")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--optimizer-id", default="tuner-helper")
    parser.add_argument("--lease-ttl", type=float, default=30.0)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--journal")
    parser.add_argument("--study")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--pause-after", type=int, default=None)
    opts = parser.parse_args(argv)
    {"serve": serve, "tune": tune, "helper": helper}[opts.job](opts)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
