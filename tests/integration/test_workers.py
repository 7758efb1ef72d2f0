"""An orchestrator Context and real worker subprocesses sharing variables through the embedded bridge.

The orchestrator is this test process (``Context`` + ``Variables``, bridged with
``ensure_bridged()``); each worker is ``python tests/integration/workers/worker.py`` connecting with
:class:`~dspex_dspy.client.SessionContext` to ``ctx.bridge_address`` and ``ctx.id``. Workers report
on stdout (JSON lines, ``ready`` when in position); every wait has a generous deadline.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.server import EmbeddedBridge

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("workers") / "worker.py"
DEADLINE_S = 120.0


class Worker:
    """A worker subprocess whose stdout lines are collected by a thread (so it can never block)."""

    def __init__(self, job: str, ctx: Context, *args: str) -> None:
        assert ctx.bridge_address is not None
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), job, *args, "--address", ctx.bridge_address, "--session", ctx.id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr = ""
        self._out = threading.Thread(target=self._drain, daemon=True)
        self._err = threading.Thread(target=self._drain_err, daemon=True)
        self._out.start()
        self._err.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _drain_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def line(self, timeout: float = DEADLINE_S) -> str:
        """The next stdout line (fails if the worker ends or stays silent for ``timeout`` s)."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker silent for {timeout} s") from None
        if line is None:
            self.proc.wait(timeout=DEADLINE_S)
            self._err.join(timeout=DEADLINE_S)
            raise AssertionError(f"worker exited ({self.proc.returncode}) early:\n{self.stderr}")
        return line

    def wait_for_line(self, text: str) -> list[str]:
        """Lines up to (not including) the first that equals ``text``."""
        before = []
        while (line := self.line()) != text:
            before.append(line)
        return before

    def result(self) -> Any:
        """The worker's last JSON line, after it exited successfully."""
        lines = []
        while (line := self.lines.get(timeout=DEADLINE_S)) is not None:
            lines.append(line)
        assert self.proc.wait(timeout=DEADLINE_S) == 0, self.stderr_text()
        assert lines, self.stderr_text()
        return json.loads(lines[-1])

    def stderr_text(self) -> str:
        self._err.join(timeout=DEADLINE_S)
        return self.stderr

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE_S)
        self._out.join(timeout=DEADLINE_S)
        self._err.join(timeout=DEADLINE_S)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def ctx() -> Iterator[Context]:
    """An orchestrator context with the seed variables, bridged for workers."""
    context = Context()
    Variables.defvariable(context, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(context, "max_tokens", "integer", 256, constraints={"min": 1, "max": 4096})
    Variables.defvariable(context, "model_name", "string", "gpt-4")
    Variables.defvariable(context, "counter", "integer", 0)
    context.ensure_bridged()
    yield context
    context.stop()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(job: str, ctx: Context, *args: str) -> Worker:
        worker = Worker(job, ctx, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def test_a_worker_reads_the_orchestrators_variables(ctx: Context, spawn: Callable[..., Worker]) -> None:
    worker = spawn("read", ctx, "temperature", "max_tokens", "model_name")
    assert worker.result() == {"temperature": 0.7, "max_tokens": 256, "model_name": "gpt-4"}


def test_the_orchestrator_sees_a_workers_writes(ctx: Context, spawn: Callable[..., Worker]) -> None:
    worker = spawn("write", ctx, "temperature=0.9", "max_tokens=512")
    assert worker.result() == {"temperature": 2, "max_tokens": 2}
    assert Variables.get(ctx, "temperature") == 0.9
    assert Variables.get(ctx, "max_tokens") == 512
    sources = {v.name: v.source for v in Variables.list(ctx)}
    assert sources["temperature"] == sources["max_tokens"] == "worker"
    assert sources["model_name"] == "orchestrator"


def test_a_worker_rejected_write_changes_nothing(ctx: Context, spawn: Callable[..., Worker]) -> None:
    worker = spawn("write", ctx, "temperature=2.5")
    worker.proc.wait(timeout=DEADLINE_S)
    assert worker.proc.returncode != 0
    assert "ValidationError" in worker.stderr_text() and "maximum" in worker.stderr_text()
    assert Variables.get(ctx, "temperature") == 0.7


def test_a_watching_worker_sees_increasing_versions_ending_at_the_latest(
    ctx: Context, spawn: Callable[..., Worker]
) -> None:
    watcher = spawn("watch", ctx, "counter", "--until", "100")
    watcher.wait_for_line("ready")
    for value in range(1, 101):
        Variables.set(ctx, "counter", value)
    observed = watcher.result()
    versions = [version for version, _ in observed]
    assert versions == sorted(set(versions)), versions
    assert observed[-1] == [101, 100]
    assert observed[0] == [1, 0]


def test_concurrent_compare_and_swap_loses_no_update(ctx: Context, spawn: Callable[..., Worker]) -> None:
    workers = [spawn("cas", ctx, "counter", "--times", "250") for _ in range(4)]
    results = [w.result() for w in workers]
    assert [r["done"] for r in results] == [250] * 4
    assert Variables.get(ctx, "counter") == 1000
    assert max(v.version for v in Variables.list(ctx) if v.name == "counter") == 1001


def test_a_killed_worker_disturbs_no_one(ctx: Context, spawn: Callable[..., Worker]) -> None:
    bridge = EmbeddedBridge.get()
    watches_before = bridge.servicer.active_watches
    victim = spawn("cas", ctx, "counter", "--forever")
    incs_before_ready = victim.wait_for_line("ready")
    others = [spawn("cas", ctx, "counter", "--times", "150") for _ in range(3)]
    seen_incs = len(incs_before_ready)
    while seen_incs < 20:
        if victim.line().startswith("inc "):
            seen_incs += 1
    victim.kill()
    assert victim.proc.returncode == -signal.SIGKILL
    while (line := victim.lines.get(timeout=DEADLINE_S)) is not None:
        seen_incs += line.startswith("inc ")

    assert [w.result()["done"] for w in others] == [150] * 3
    reader = spawn("read", ctx, "model_name", "counter")
    final = reader.result()
    assert final["model_name"] == "gpt-4"
    counter = Variables.get(ctx, "counter")
    assert final["counter"] == counter
    # Every accepted write added exactly 1 (no lost or torn update), whoever made it.
    version = next(v.version for v in Variables.list(ctx) if v.name == "counter")
    assert counter == version - 1
    # The victim may have died between a write and reporting it.
    assert 450 + seen_incs <= counter <= 450 + seen_incs + 1
    # The server let go of the dead worker's watch stream.
    deadline = time.monotonic() + DEADLINE_S
    while bridge.servicer.active_watches > watches_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bridge.servicer.active_watches <= watches_before
