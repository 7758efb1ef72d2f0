"""Worker processes never hang at exit.

200 short worker processes in a row (a few at a time) each connect to a real bridge, watch a
variable, read it and exit without closing anything; every one must leave within 5 s of the end of
its work. Before the fix, a client's ``__del__`` cancelled its streams during interpreter
finalization and could wait for ever on a lock held by a frozen daemon thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dspex_dspy.server import BridgeServer, create_server

pytestmark = pytest.mark.reliability

WORKER = Path(__file__).with_name("exit_worker.py")
REPO = Path(__file__).resolve().parents[2]
RUNS = 200
AT_ONCE = 4
EXIT_LIMIT_S = 5.0
START_LIMIT_S = 60.0
MODES = ("sync", "sync-plain", "sync-nocache", "async")


@pytest.fixture(scope="module")
def bridge() -> Iterator[BridgeServer]:
    server, _ = create_server(heartbeat_interval=0.5)
    server.start()
    server.store.create_session("exit")
    server.store.register_variable("exit", "x", "integer", 1)
    yield server
    server.stop(0)


def run_one(address: str, mode: str) -> tuple[str, float | None, str]:
    """``(mode, seconds from the end of its work to its exit or None if it hung, output)``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), address, "exit", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        out, _ = proc.communicate(timeout=START_LIMIT_S + EXIT_LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return mode, None, out
    ended = time.monotonic()
    done = [line for line in out.splitlines() if line.startswith("done ")]
    if proc.returncode != 0 or not done:
        raise AssertionError(f"worker ({mode}) failed with {proc.returncode}:\n{out}")
    return mode, ended - float(done[0].split()[1]), out


def test_200_short_workers_all_exit_within_5_s(bridge: BridgeServer) -> None:
    modes = [MODES[i % len(MODES)] for i in range(RUNS)]
    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(lambda mode: run_one(bridge.address, mode), modes))
    hung = [(mode, out) for mode, took, out in results if took is None]
    slow = [(mode, took) for mode, took, _ in results if took is not None and took > EXIT_LIMIT_S]
    worst = max(took for _, took, _ in results if took is not None) if len(hung) < RUNS else float("nan")
    print(f"{RUNS} workers: {len(hung)} hung, {len(slow)} slower than {EXIT_LIMIT_S:g} s, slowest exit {worst:.2f} s")
    assert not hung, f"{len(hung)} of {RUNS} workers hung at exit, e.g. {hung[0][0]}: {hung[0][1][-2000:]}"
    assert not slow, f"{len(slow)} of {RUNS} workers took longer than {EXIT_LIMIT_S:g} s to exit: {slow[:5]}"
