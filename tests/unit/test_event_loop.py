"""The event loop a bridge node runs on: uvloop where installed, the standard one on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from dspex_dspy.aio_server import EVENT_LOOP_ENV, EventLoopThread, new_event_loop


def test_a_node_runs_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


@pytest.mark.parametrize(("wanted", "kind"), [("asyncio", asyncio.BaseEventLoop), (" UVLoop ", uvloop.Loop)])
def test_the_environment_chooses_the_loop(monkeypatch: pytest.MonkeyPatch, wanted: str, kind: type) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, wanted)
    loop = new_event_loop()
    try:
        assert isinstance(loop, kind)
        assert isinstance(loop, uvloop.Loop) == (kind is uvloop.Loop)
    finally:
        loop.close()


def test_an_unknown_loop_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    with pytest.raises(ValueError, match="DSPEX_EVENT_LOOP must be 'uvloop' or 'asyncio', not 'trio'"):
        EventLoopThread("refused")


def test_the_loop_thread_runs_coroutines_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "asyncio")
    thread = EventLoopThread("chosen")

    async def running() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    try:
        assert thread.run(running(), timeout=30) is thread.loop
        assert not isinstance(thread.loop, uvloop.Loop)
    finally:
        thread.stop()
