"""The demo pipeline (``make demo``): one configuration, shared live by an orchestrator and two workers.

1. An LLM configuration (model, temperature, max_tokens, top_p) is defined as constrained
   variables on a local context; three batched updates apply, an out-of-range one is rejected.
2. Registering a DSPy program moves the context to the bridge (embedded by default, or the
   ``--bridge host:port`` of a running ``dspex-bridge serve``) with every value.
3. A ``VariableAwarePredict`` bound to those variables answers on a deterministic offline LM.
4. Two worker processes connect to the session and answer with their own bound predictors.
5. The orchestrator changes temperature and model; the next call in every process uses them.
6. Every call's provenance — which version of which variable produced it — is printed as a table.

Runs offline; exits 0 on success. ``python -m dspex_dspy.demo --help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from dspex_dspy.context import Context
from dspex_dspy.errors import BatchUpdateError
from dspex_dspy.variables import Variables

__all__ = ["main"]

QUESTIONS = ("What is the capital of France?", "Name a prime number above 10.")
BOUND = ("temperature", "max_tokens", "model")


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _row(who: str, call: int, prediction: Any) -> dict[str, Any]:
    from dspex_dspy.modules import get_provenance

    used = get_provenance(prediction)
    row: dict[str, Any] = {"who": who, "call": call, "answer": prediction.answer}
    for attr in BOUND:
        bound = used.get(attr)
        row[attr] = f"{bound.value} (v{bound.version})" if bound is not None else "-"
    return row


def _predictor(source: Any) -> Any:
    from dspex_dspy.modules import VariableAwarePredict

    predictor = VariableAwarePredict("question -> answer", session_context=source)
    predictor.bind_to_variable("model", "model")
    return predictor


def _print_table(rows: list[dict[str, Any]]) -> None:
    columns = ("who", "call", *BOUND, "answer")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns)
    print(line)
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns))


def _define_configuration(ctx: Context) -> None:
    Variables.defvariable(
        ctx,
        "model",
        "string",
        "gpt-3.5-turbo",
        constraints={"enum": ["gpt-3.5-turbo", "gpt-4", "claude-3"]},
        description="LLM model selection",
    )
    Variables.defvariable(
        ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0}, description="Generation randomness"
    )
    Variables.defvariable(
        ctx, "max_tokens", "integer", 256, constraints={"min": 1, "max": 4096}, description="Maximum response length"
    )
    Variables.defvariable(
        ctx, "top_p", "float", 1.0, constraints={"min": 0.0, "max": 1.0}, description="Nucleus sampling"
    )
    for update in (
        {"temperature": 0.5, "max_tokens": 512},
        {"model": "gpt-4", "temperature": 0.8},
        {"max_tokens": 1024, "top_p": 0.95},
    ):
        Variables.update_many(ctx, update)
        _say(f"applied {update}")
    try:
        Variables.update_many(ctx, {"temperature": 3.5, "max_tokens": 64})
    except BatchUpdateError as exc:
        _say(f"rejected as expected: {exc}")
    config = Variables.get_many(ctx, ["model", "temperature", "max_tokens", "top_p"])
    _say(f"final configuration on the {ctx.get_backend().type} backend: {config}")


def _start_worker(name: str, address: str, session_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dspex_dspy.demo",
            "worker",
            "--name",
            name,
            "--address",
            address,
            "--session",
            session_id,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _read_row(proc: subprocess.Popen[str], name: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {name} exited early with code {proc.wait()}")
    row: dict[str, Any] = json.loads(line)
    return row


def run_orchestrator(bridge: str | None) -> int:
    """Run the whole demo; return the exit code."""
    import dspy

    from dspex_dspy.offline import offline_lm

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with Context(bridge=bridge) as ctx:
        _say(f"context {ctx.id} starts on the {ctx.get_backend().type} backend")
        _define_configuration(ctx)

        ctx.register_program("qa_pipeline", {"type": "dspy", "modules": [{"type": "dspy", "class": "Predict"}]})
        backend = ctx.get_backend()
        switch = backend.history[-1]
        _say(
            f"registered a DSPy program: switched to {backend.type} at {ctx.bridge_address} "
            f"({switch.variables} variables in {switch.duration_s * 1e3:.1f} ms)"
        )
        address = ctx.bridge_address
        assert address is not None

        lm = offline_lm("offline/gpt-4")
        predictor = _predictor(ctx)
        _say(f"orchestrator predictor bindings: {predictor.get_bindings()}")
        with dspy.context(lm=lm):
            for i, question in enumerate(QUESTIONS, start=1):
                rows.append(_row("orchestrator", i, predictor(question=question)))

        _say("starting 2 worker processes")
        workers = {name: _start_worker(name, address, ctx.id) for name in ("worker-1", "worker-2")}
        try:
            for name, proc in workers.items():
                rows.append(_read_row(proc, name))

            t_version = Variables.set(ctx, "temperature", 0.2)
            m_version = Variables.set(ctx, "model", "claude-3")
            _say(f"changed temperature -> 0.2 (v{t_version}) and model -> claude-3 (v{m_version}) live")
            for proc in workers.values():
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"temperature": t_version, "model": m_version}) + "\n")
                proc.stdin.flush()
            for name, proc in workers.items():
                rows.append(_read_row(proc, name))
            for name, proc in workers.items():
                code = proc.wait(timeout=60)
                if code != 0:
                    raise RuntimeError(f"worker {name} exited with code {code}")
        finally:
            for proc in workers.values():
                if proc.poll() is None:
                    proc.kill()

        with dspy.context(lm=lm):
            rows.append(_row("orchestrator", 3, predictor(question=QUESTIONS[0])))

    print()
    _print_table(rows)
    print()
    changed = [r for r in rows if r["temperature"].startswith("0.2")]
    _say(
        f"{len(changed)} of {len(rows)} calls ran with the new temperature; "
        f"done in {time.perf_counter() - started:.1f} s"
    )
    return 0


def run_worker(name: str, address: str, session_id: str) -> int:
    """A worker process: answer once, wait for the orchestrator's change, answer again."""
    import dspy

    from dspex_dspy.client import SessionContext
    from dspex_dspy.offline import offline_lm

    with SessionContext.connect(address, session_id=session_id) as session:
        predictor = _predictor(session)
        with dspy.context(lm=offline_lm("offline/gpt-4")):
            print(json.dumps(_row(name, 1, predictor(question=QUESTIONS[1]))), flush=True)
            expected = json.loads(sys.stdin.readline())
            for variable, version in expected.items():
                if not session.wait_cached(variable, version, timeout=30):
                    raise RuntimeError(f"{name}: {variable} v{version} did not arrive")
            print(json.dumps(_row(name, 2, predictor(question=QUESTIONS[1]))), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dspex_dspy.demo``."""
    parser = argparse.ArgumentParser(prog="python -m dspex_dspy.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bridge",
        default=os.environ.get("DSPEX_DEMO_BRIDGE"),
        help="host:port of a running dspex-bridge server (default: the embedded bridge)",
    )
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="run as a worker process (started by the demo itself)")
    worker.add_argument("--name", required=True)
    worker.add_argument("--address", required=True)
    worker.add_argument("--session", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "worker":
        return run_worker(args.name, args.address, args.session)
    return run_orchestrator(args.bridge)


if __name__ == "__main__":
    sys.exit(main())
