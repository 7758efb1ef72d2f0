"""The fork pause of the worker client: feeds stay out of gRPC until every fork under way is done."""

from __future__ import annotations

import threading

import pytest

from dspex_dspy.client.sync import _ForkPause

pytestmark = pytest.mark.unit


def test_two_forks_at_once_keep_the_feeds_out_until_both_are_done() -> None:
    pause = _ForkPause()
    pause.before()
    pause.before()  # a second thread forks meanwhile
    pause.after_in_parent()
    assert pause.forking, "the first fork's end must not let feeds back in while the second runs"
    entered = threading.Event()

    def feed() -> None:
        with pause.inside():
            entered.set()

    thread = threading.Thread(target=feed)
    thread.start()
    assert not entered.wait(0.2)  # held while a fork is under way
    pause.after_in_parent()
    assert not pause.forking
    thread.join(10)
    assert entered.is_set()


def test_a_stream_is_not_tracked_during_a_fork_and_is_cancelled_before_one() -> None:
    class Stream:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    pause = _ForkPause()
    stream = Stream()
    assert pause.track(stream)
    pause.before()
    assert stream.cancelled
    assert not pause.track(Stream())
    pause.after_in_parent()
    pause.untrack(stream)
    assert pause.track(Stream())


def test_a_child_starts_with_no_fork_under_way() -> None:
    pause = _ForkPause()
    pause.before()
    pause.after_in_child()
    assert not pause.forking
    with pause.inside():
        pass
