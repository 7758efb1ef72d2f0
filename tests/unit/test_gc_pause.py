"""The collector pause around bulk copies: nested and overlapping pauses, and the collector's own state."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from dspex_dspy._gc import collector_paused


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_off_inside_and_back_on_after() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_failure_inside_still_turns_it_back_on() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_nested_pauses_resume_at_the_outermost_end() -> None:
    gc.enable()
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_overlapping_pauses_in_two_threads_resume_when_the_last_ends() -> None:
    gc.enable()
    inside, release, seen = threading.Event(), threading.Event(), []

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(30)
        seen.append(gc.isenabled())

    thread = threading.Thread(target=other)
    with collector_paused():
        thread.start()
        assert inside.wait(30)
    assert not gc.isenabled()  # the other thread's pause is still on
    release.set()
    thread.join(30)
    assert seen == [True]
    assert gc.isenabled()


_FORK_DURING_A_PAUSE = """
import gc, os
from dspex_dspy._gc import collector_paused
gc.enable()
with collector_paused():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, b"1" if gc.isenabled() else b"0")
        os._exit(0)
    os.close(write)
    child = os.read(read, 1).decode()
    os.waitpid(pid, 0)
    parent = gc.isenabled()
print(child, int(parent), int(gc.isenabled()))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_during_a_pause_has_its_collector_on() -> None:
    # In a fresh interpreter with one thread (forking a threaded test process is unsafe).
    out = subprocess.run(
        [sys.executable, "-c", _FORK_DURING_A_PAUSE], capture_output=True, text=True, timeout=60, check=True
    )
    child, parent_inside, parent_after = out.stdout.split()
    assert (child, parent_inside, parent_after) == ("1", "0", "1")
