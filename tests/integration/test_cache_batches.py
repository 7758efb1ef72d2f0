"""An atomic batch reaches a worker's cache whole: no cached read sees part of an ``update_many``.

In a separate process, a writer thread runs atomic ``update_many({"a": i, "b": i})`` while a
worker reads both variables from its watch-fed cache; every snapshot it takes must have ``a == b``
and matching versions. Unit tests pin the assembly of batch updates on the stream.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dspex_dspy.client.feed import BatchAssembly
from dspex_dspy.store import UpdateType, VariableUpdate, Watch
from dspex_dspy.types import BATCH_METADATA_KEY, Variable, batch_marker

pytestmark = pytest.mark.integration

WRITES = 1500
READER = Path(__file__).resolve().parent / "workers" / "batch_reads.py"


def test_a_cached_multi_read_never_sees_part_of_an_atomic_batch() -> None:
    result = subprocess.run(
        [sys.executable, str(READER), str(WRITES)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{report['snapshots']} cached snapshots during {WRITES} atomic batches, {report['torn']} torn")
    assert report["snapshots"] > 0
    assert report["torn"] == 0
    assert report["final"] == {"a": [WRITES, WRITES + 1], "b": [WRITES, WRITES + 1]}


def _update(name: str, version: int, batch: str = "") -> VariableUpdate:
    var = Variable(id=f"var_{name}_1", name=name, type="integer", value=version, version=version)
    metadata = {BATCH_METADATA_KEY: batch} if batch else {}
    return VariableUpdate(var.id, var, UpdateType.VALUE_CHANGE, "orchestrator", metadata, 0.0)


def test_batch_markers_are_read_strictly() -> None:
    assert batch_marker({BATCH_METADATA_KEY: "abc/3"}) == ("abc", 3)
    assert batch_marker({}) is None
    for bad in ("abc", "abc/", "/3", "abc/x", "abc/1"):
        assert batch_marker({BATCH_METADATA_KEY: bad}) is None


def test_the_assembly_releases_a_batch_only_when_complete() -> None:
    assembly = BatchAssembly()
    first, second = _update("a", 2, "b1/2"), _update("b", 2, "b1/2")
    assert assembly.add(first, True) == []
    assert assembly.add(second, True) == [(first, True), (second, True)]
    single = _update("c", 5)
    assert assembly.add(single, False) == [(single, False)]


def test_an_incomplete_batch_waits_for_the_next_boundary_of_the_stream() -> None:
    assembly = BatchAssembly()
    part = _update("a", 2, "b1/3")
    assert assembly.add(part, True) == []
    other = _update("c", 7, "b2/2")
    assert assembly.add(other, True) == []
    closing = _update("d", 3, "b2/2")
    assert assembly.add(closing, True) == [(part, True), (other, True), (closing, True)]
    held = _update("e", 4, "b3/2")
    assert assembly.add(held, False) == []
    plain = _update("f", 1)
    assert assembly.add(plain, True) == [(held, False), (plain, True)]


def test_a_coalescing_watch_keeps_a_batch_together_after_earlier_writes() -> None:
    watch = Watch("s", None)
    for update in (_update("a", 2, "b1/2"), _update("b", 2, "b1/2"), _update("a", 3, "b2/2"), _update("b", 3, "b2/2")):
        watch.offer(update)
    taken = [watch.next_update(0), watch.next_update(0)]
    assert [(u.name, u.variable.version) for u in taken if u is not None and u.variable is not None] == [
        ("a", 3),
        ("b", 3),
    ]
    assert watch.coalesced == 2
