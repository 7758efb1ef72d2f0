"""A client process holding many ``WatchVariables`` streams at once over one ``grpc.aio`` channel.

Run as ``python tests/reliability/watch_swarm.py ADDRESS SESSION STREAMS FINAL_VERSION``. It opens
STREAMS watches of variable ``x`` with their initial values, prints ``READY`` once every stream has
received its initial value, then follows every stream until it reaches FINAL_VERSION, checking
that versions strictly increase, and prints ``DONE <streams on the final version> <final values>``
(the distinct values the streams ended on).
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import grpc.aio

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.wire import any_to_value

DEADLINE_S = 300.0


async def _next_change(call: grpc.aio.UnaryStreamCall) -> pb.VariableUpdate:  # type: ignore[type-arg]
    while True:
        update = await call.read()
        if update is grpc.aio.EOF:
            raise RuntimeError(f"the stream ended early: {await call.code()} {await call.details()}")
        assert isinstance(update, pb.VariableUpdate)
        if update.update_type != "heartbeat":
            return update


async def _follow(call: grpc.aio.UnaryStreamCall, start: int, final: int) -> object:  # type: ignore[type-arg]
    last = start
    value: object = None
    while last < final:
        update = await _next_change(call)
        version = update.variable.version
        if version <= last:
            raise RuntimeError(f"version went from {last} to {version}")
        last = version
        value = any_to_value(update.variable.value, name="x")
    call.cancel()
    return value


async def main(address: str, session: str, streams: int, final: int) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        request = pb.WatchVariablesRequest(session_id=session, variable_identifiers=["x"], include_initial_values=True)
        calls = [stub.WatchVariables(request, timeout=DEADLINE_S) for _ in range(streams)]
        firsts = await asyncio.gather(*(_next_change(call) for call in calls))
        if any(first.update_type != "initial_value" for first in firsts):
            raise RuntimeError("a stream did not start with its initial value")
        print("READY", flush=True)
        ends = await asyncio.gather(
            *(_follow(c, f.variable.version, final) for c, f in zip(calls, firsts, strict=True))
        )
        print("DONE", len(ends), sorted({repr(end) for end in ends}), flush=True)
    return 0


if __name__ == "__main__":
    address, session, streams, final = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sys.exit(asyncio.run(main(address, session, streams, final)))
