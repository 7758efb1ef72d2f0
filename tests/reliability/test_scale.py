"""One node holds a thousand watch streams: every watcher converges, unary calls still run, memory stays bounded.

The bridge runs in its own process (``dspex-bridge serve``) with its default limits. Watchers are
separate client processes (``watch_swarm.py``), each holding 250 streams over one ``grpc.aio``
channel. A server that held a thread per stream (or the old cap of 64 streams) fails these tests.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.wire import any_to_value, value_to_any
from tests.conftest import BridgeProcess
from tests.reliability.test_memory import rss_mb

pytestmark = pytest.mark.reliability

REPO_ROOT = Path(__file__).resolve().parents[2]
SWARM = Path(__file__).with_name("watch_swarm.py")
PROCESSES = 4
STREAMS_PER_PROCESS = 250
BURST = 100
DEADLINE = 300.0


class Swarm:
    """A watcher process and the lines it printed."""

    def __init__(self, address: str, session: str, streams: int, final_version: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SWARM), address, session, str(streams), str(final_version)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            },
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line.strip())
        self.lines.put("EOF")

    def expect(self, prefix: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=DEADLINE)
            except queue.Empty:
                raise AssertionError(
                    f"no {prefix!r} line from a watcher process; output:\n{''.join(self.output)}"
                ) from None
            if line.startswith(prefix):
                return line
            if line == "EOF":
                raise AssertionError(f"a watcher process ended without {prefix!r}; output:\n{''.join(self.output)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def bridge(spawn_bridge: Callable[..., BridgeProcess]) -> Iterator[tuple[BridgeProcess, pb_grpc.BridgeServiceStub]]:
    served = spawn_bridge()
    channel = grpc.insecure_channel(served.address or "")
    yield served, pb_grpc.BridgeServiceStub(channel)
    channel.close()
    served.stop()


def _register(stub: pb_grpc.BridgeServiceStub, session: str, value: str = "v0") -> None:
    stub.InitializeSession(pb.InitializeSessionRequest(session_id=session), timeout=DEADLINE)
    stub.RegisterVariable(
        pb.RegisterVariableRequest(
            session_id=session, name="x", type="string", initial_value=value_to_any("string", value)
        ),
        timeout=DEADLINE,
    )


def _write(stub: pb_grpc.BridgeServiceStub, session: str, value: str) -> int:
    response = stub.SetVariable(
        pb.SetVariableRequest(session_id=session, variable_identifier="x", value=value_to_any("string", value)),
        timeout=DEADLINE,
    )
    return int(response.new_version)


def test_a_thousand_watch_streams_on_one_node_converge_and_leave_unary_calls_served(
    bridge: tuple[BridgeProcess, pb_grpc.BridgeServiceStub],
) -> None:
    served, stub = bridge
    _register(stub, "scale")
    final_version = 1 + BURST
    swarms = [Swarm(served.address or "", "scale", STREAMS_PER_PROCESS, final_version) for _ in range(PROCESSES)]
    try:
        for swarm in swarms:
            swarm.expect("READY")
        # 1,000 streams are open now, none reading anything new: unary calls still complete.
        for i in range(20):
            assert stub.Ping(pb.PingRequest(message=str(i)), timeout=DEADLINE).message == f"pong: {i}"
            got = stub.GetVariable(pb.GetVariableRequest(session_id="scale", variable_identifier="x"), timeout=DEADLINE)
            assert any_to_value(got.variable.value) == "v0"
            listed = stub.ListVariables(pb.ListVariablesRequest(session_id="scale"), timeout=DEADLINE)
            assert [v.name for v in listed.variables] == ["x"]
        versions = [_write(stub, "scale", f"v{i}") for i in range(1, BURST + 1)]
        assert versions == list(range(2, final_version + 1))
        for swarm in swarms:
            done = swarm.expect("DONE").split(maxsplit=2)
            assert done[1] == str(STREAMS_PER_PROCESS), done
            assert done[2] == repr([repr(f"v{BURST}")]), done  # every stream ended on the final value
            assert swarm.proc.wait(timeout=DEADLINE) == 0, "".join(swarm.output)
        print(f"{PROCESSES * STREAMS_PER_PROCESS} watch streams on one node, each ended on the write {BURST}")
    finally:
        for swarm in swarms:
            swarm.stop()
    # The node still serves once they are gone.
    assert _write(stub, "scale", "after") == final_version + 1


def test_server_memory_stays_bounded_when_watchers_never_read(
    bridge: tuple[BridgeProcess, pb_grpc.BridgeServiceStub],
) -> None:
    served, stub = bridge
    _register(stub, "idle")
    watchers = 100
    value_bytes = 100_000
    writes = 200
    watch_channel = grpc.insecure_channel(served.address or "")
    try:
        watch_stub = pb_grpc.BridgeServiceStub(watch_channel)
        request = pb.WatchVariablesRequest(session_id="idle", variable_identifiers=["x"], include_initial_values=True)
        calls = [watch_stub.WatchVariables(request, timeout=DEADLINE) for _ in range(watchers)]
        for call in calls:
            assert next(call).update_type == "initial_value"
        # Warm up the write path, then measure: the watchers read nothing from here on.
        for i in range(10):
            _write(stub, "idle", f"{i}:" + "w" * value_bytes)
        before = rss_mb(served.proc.pid)
        for i in range(writes):
            _write(stub, "idle", f"{i}:" + "z" * value_bytes)
        after = rss_mb(served.proc.pid)
        unbounded_mb = watchers * writes * value_bytes / 1e6  # what queues holding every update would keep
        growth = after - before
        print(
            f"server RSS {before:.0f} -> {after:.0f} MB with {watchers} watchers never reading "
            f"{writes} writes of {value_bytes} B (unbounded queues: {unbounded_mb:.0f} MB)"
        )
        assert growth < 250, f"server RSS grew by {growth:.0f} MB"
        # Each stream, read at last, ends on the latest write (updates were coalesced, not lost).
        final = f"{writes - 1}:" + "z" * value_bytes
        for call in calls:
            while True:
                update = next(call)
                if update.update_type != "heartbeat" and any_to_value(update.variable.value) == final:
                    break
            call.cancel()
    finally:
        watch_channel.close()
