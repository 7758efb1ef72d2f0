"""The benchmark runner itself works: a quick run of its sections prints the table and writes JSON.

Nothing here judges speed (tests never depend on timing); it only keeps ``make bench`` runnable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def test_quick_benchmark_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "local", "workers", "tuner", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert {
        "LocalState get",
        "LocalState set (validated)",
        "worker read (watch-fed cache)",
        "set -> seen by a watcher in another process",
        "tuner, TPE: 20 trials x 32 ex.",
    } <= set(rows)
    for row in rows.values():
        assert row["ratio"] > 0 and row["baseline"]
    assert "benchmark" in proc.stdout and "ratio" in proc.stdout


def test_quick_redis_benchmark_run_writes_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "redis", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"] for r in json.loads(out.read_text())["rows"]}
    assert {
        "Redis-backed bridged get (remote node)",
        "write via node A -> seen by a watcher via node B",
        "switch of 10,000 variables to a remote Redis node",
        "sustained writes, 4 processes, 1 node",
        "sustained writes, 4 processes, 2 nodes",
        "sustained writes, 4 processes, bare SetVariable stubs, 1 bridge node(s)",
        "sustained writes, 4 processes, bare SetVariable stubs, 1 floor node(s)",
        "sustained writes, 4 processes, bare SetVariable stubs, 2 bridge node(s)",
        "sustained writes, 4 processes, bare SetVariable stubs, 2 floor node(s)",
    } <= rows


def test_the_instruction_counter_refuses_a_count_of_no_calls() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--calls", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--calls must be at least 1, got 0" in proc.stderr
