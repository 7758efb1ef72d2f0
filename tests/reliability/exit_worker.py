"""A short-lived worker for the exit test: connect, watch, read, and exit without closing anything.

Run as ``python exit_worker.py ADDRESS SESSION MODE``; prints ``done <monotonic seconds>`` when its
work is over, then leaves the interpreter to shut down with the client, its cache feed and its
watch still live. Modes: ``sync`` (cached client, cache-fed watch), ``sync-plain`` (no watch),
``sync-nocache`` (a watch with its own stream), ``async`` (asyncio client and watch).
"""

from __future__ import annotations

import asyncio
import sys
import time

from dspex_dspy.client import AsyncSessionContext, SessionContext

_KEEP: list[object] = []  # live until the interpreter shuts down


def say_done() -> None:
    print(f"done {time.monotonic():.6f}", flush=True)


def run_sync(address: str, session: str, mode: str) -> None:
    ctx = SessionContext.connect(address, session, cache=mode != "sync-nocache")
    _KEEP.append(ctx)
    if mode != "sync-plain":
        watch = ctx.watch_variables(["x"])
        _KEEP.append(watch)
        next(watch)
    assert ctx["x"] == 1
    say_done()


async def run_async(address: str, session: str) -> None:
    ctx = await AsyncSessionContext.connect(address, session)
    _KEEP.append(ctx)
    watch = ctx.watch_variables(["x"])
    _KEEP.append(watch)
    await watch.__anext__()
    assert await ctx.get_variable("x") == 1
    say_done()


def main(argv: list[str]) -> None:
    address, session, mode = argv
    if mode == "async":
        asyncio.run(run_async(address, session))
    else:
        run_sync(address, session, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
