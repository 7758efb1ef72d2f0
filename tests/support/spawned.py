"""Run a test's body in a freshly spawned process, for tests that fork: whatever forking leaves
inside gRPC stays in that process, away from the test process and the tests after it."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def _report_outcome(report: Connection, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run ``target(*args)``; send None, or the traceback of what failed."""
    try:
        target(*args)
    except BaseException:
        report.send(traceback.format_exc())
        raise
    report.send(None)


def run_spawned(target: Callable[..., Any], args: tuple[Any, ...], *, deadline_s: float, name: str = "") -> None:
    """Run ``target(*args)`` (a module-level function) in a spawned process; fail the test if it
    fails or does not finish within ``deadline_s`` (the process is then killed)."""
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_report_outcome, args=(send, target, args), name=name or None)
    process.start()
    send.close()
    try:
        assert receive.poll(deadline_s), f"{name or target.__name__} did not finish within {deadline_s:g} s"
        failure = receive.recv()
        assert failure is None, failure
        process.join(deadline_s)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join()
        receive.close()
