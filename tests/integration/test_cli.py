"""The ``dspex-bridge`` command as a user runs it: a real subprocess, real gRPC, real signals."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.wire import value_to_any

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # generous bound for start-up and shutdown; never an assertion on speed
LISTENING = re.compile(r"dspex-bridge listening on (?P<address>\S+:(?P<port>\d+))")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServeProcess:
    """``python -m dspex_dspy.cli serve`` in a subprocess, its stdout read line by line in a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dspex_dspy.cli", "serve", "--port", "0", "--log-level", "WARNING", *args],
            cwd=REPO_ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._stderr: str | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = self._wait_listening()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_listening(self) -> str:
        line = self._lines.get(timeout=DEADLINE)
        if line is None:
            raise AssertionError(f"the server exited before listening: {self.stop_and_collect()}")
        match = LISTENING.fullmatch(line.strip())
        assert match, f"unexpected first line {line!r}"
        assert int(match.group("port")) > 0
        return match.group("address")

    def signal_and_wait(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=DEADLINE)

    def stop_and_collect(self) -> str:
        """Kill the process if it still runs, close its pipes, and return what it wrote to stderr."""
        if self._stderr is None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=DEADLINE)
            self._reader.join(DEADLINE)
            assert self.proc.stderr is not None
            self._stderr = self.proc.stderr.read()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
        return self._stderr


@pytest.fixture
def serve() -> Iterator[type[ServeProcess]]:
    started: list[ServeProcess] = []

    class Tracked(ServeProcess):
        def __init__(self, *args: str) -> None:
            started.append(self)
            super().__init__(*args)

    yield Tracked
    for process in started:
        process.stop_and_collect()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_prints_its_address_serves_and_stops_cleanly_on_signal(
    serve: type[ServeProcess], signum: signal.Signals
) -> None:
    server = serve("--heartbeat-interval", "0.5")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        assert stub.Ping(pb.PingRequest(message="cli"), timeout=DEADLINE).message == "pong: cli"
        stub.InitializeSession(pb.InitializeSessionRequest(session_id="s"), timeout=DEADLINE)
        stub.RegisterVariable(
            pb.RegisterVariableRequest(
                session_id="s", name="t", type="float", initial_value=value_to_any("float", 1.0)
            ),
            timeout=DEADLINE,
        )
        stream = stub.WatchVariables(
            pb.WatchVariablesRequest(session_id="s", include_initial_values=True), timeout=DEADLINE
        )
        assert next(stream).update_type == "initial_value"

        assert server.signal_and_wait(signum) == 0
        # The open watch stream ended with the server: cleanly, or as the connection closed.
        try:
            leftovers = [update.update_type for update in stream]
        except grpc.RpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
        else:
            assert set(leftovers) <= {"heartbeat"}
    assert server.stop_and_collect() == ""


def test_serve_applies_its_limits(serve: type[ServeProcess]) -> None:
    server = serve("--max-sessions", "1", "--max-value-bytes", "64")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        stub.InitializeSession(pb.InitializeSessionRequest(session_id="a"), timeout=DEADLINE)
        with pytest.raises(grpc.RpcError) as info:
            stub.InitializeSession(pb.InitializeSessionRequest(session_id="b"), timeout=DEADLINE)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as info:
            stub.RegisterVariable(
                pb.RegisterVariableRequest(
                    session_id="a", name="s", type="string", initial_value=value_to_any("string", "x" * 200)
                ),
                timeout=DEADLINE,
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.signal_and_wait(signal.SIGTERM) == 0


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("dspex-bridge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dspex_dspy.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=REPO_ROOT,
        env={**_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def test_ping_prints_the_reply(serve: type[ServeProcess]) -> None:
    server = serve()
    result = _run_cli("ping", server.address, "--message", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pong: hello (server_time ")
    assert server.signal_and_wait(signal.SIGTERM) == 0


def test_ping_of_a_dead_address_fails_with_a_message(serve: type[ServeProcess]) -> None:
    server = serve()
    address = server.address
    assert server.signal_and_wait(signal.SIGTERM) == 0
    result = _run_cli("ping", address, "--timeout", "1")
    assert result.returncode == 1
    assert f"ping {address} failed" in result.stderr
    assert "unavailable" in result.stderr


def test_serve_on_a_taken_port_fails_with_a_message(serve: type[ServeProcess]) -> None:
    server = serve()
    port = server.address.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "dspex_dspy.cli", "serve", "--port", port],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot bind" in result.stderr
    assert "listening" not in result.stdout
    assert server.signal_and_wait(signal.SIGTERM) == 0


def test_serve_with_an_unknown_event_loop_fails_with_a_message() -> None:
    result = _run_cli("serve", "--port", "0", env={"DSPEX_EVENT_LOOP": "trio"})
    assert result.returncode == 1
    assert "DSPEX_EVENT_LOOP must be 'uvloop' or 'asyncio', not 'trio'" in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout


def test_bad_arguments_exit_with_usage() -> None:
    result = _run_cli("serve", "--port", "70000")
    assert result.returncode == 2
    assert "a port is 0..65535" in result.stderr
