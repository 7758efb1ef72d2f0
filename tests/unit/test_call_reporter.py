"""The worker's call reporter: a bounded queue that never blocks or raises, batches of at most 100
sent inside the client's fork guard, and a close that sends what is queued."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from dspex_dspy.client.reporter import MAX_BATCH, MAX_QUEUED, CallReporter
from dspex_dspy.errors import BridgeUnavailableError

pytestmark = pytest.mark.unit

DEADLINE_S = 30.0


class Sender:
    """Records batches; the first send waits until ``release`` is set."""

    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[list[Mapping[str, Any]]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.inside_guard: list[bool] = []
        self.guarded = False
        self.fail = fail

    def __call__(self, batch: list[Mapping[str, Any]]) -> None:
        self.inside_guard.append(self.guarded)
        self.started.set()
        assert self.release.wait(DEADLINE_S)
        if self.fail:
            raise BridgeUnavailableError("the bridge is gone")
        self.batches.append(batch)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        self.guarded = True
        try:
            yield
        finally:
            self.guarded = False


def test_queued_records_go_out_in_batches_of_at_most_100_inside_the_guard() -> None:
    sender = Sender()
    reporter = CallReporter(sender, guard=sender.guard)
    reporter.put({"n": 0})
    assert sender.started.wait(DEADLINE_S)  # the first record is in flight; the sender holds it
    for n in range(1, 251):
        reporter.put({"n": n})
    sender.release.set()
    reporter.close(timeout=DEADLINE_S)
    assert [len(b) for b in sender.batches] == [1, MAX_BATCH, MAX_BATCH, 50]
    assert [r["n"] for b in sender.batches for r in b] == list(range(251))
    assert all(sender.inside_guard)
    assert reporter.sent == 251 and reporter.dropped == 0


def test_a_full_queue_drops_records_without_blocking_or_raising() -> None:
    sender = Sender()
    reporter = CallReporter(sender)
    reporter.put({"n": -1})
    assert sender.started.wait(DEADLINE_S)
    for n in range(MAX_QUEUED + 3):
        reporter.put({"n": n})  # returns at once even when the queue is full
    assert reporter.dropped == 3
    sender.release.set()
    reporter.close(timeout=DEADLINE_S)
    assert reporter.sent == MAX_QUEUED + 1


def test_a_failed_send_drops_its_batch_quietly_and_the_reporter_goes_on() -> None:
    sender = Sender(fail=True)
    sender.release.set()
    reporter = CallReporter(sender)
    reporter.put({"n": 1})
    reporter.close(timeout=DEADLINE_S)
    assert reporter.dropped == 1 and reporter.sent == 0
    reporter.put({"n": 2})  # after close: ignored, no error
    assert reporter.dropped == 1
