"""Fixtures shared by every test directory: a real standalone bridge server in a subprocess.

``dspex-bridge serve --port 0`` is started as ``python -m dspex_dspy.cli serve --port 0`` (the
same interpreter as the tests), and its address is read from the line it prints,
``dspex-bridge listening on HOST:PORT``. Output is drained in a thread so a chatty server can
never block on a full pipe. Every process started here is killed at teardown.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.redis_server"]

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"dspex-bridge listening on (\S+:\d+)")
START_DEADLINE_S = 60.0


class BridgeProcess:
    """A ``dspex-bridge serve`` subprocess and the address it listens on."""

    def __init__(self, *extra_args: str, env: Mapping[str, str] | None = None) -> None:
        environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dspex_dspy.cli", "serve", "--port", "0", *extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO_ROOT,
            env=environment,
        )
        self.output: list[str] = []
        self._found = threading.Event()
        self.address: str | None = None
        self._reader = threading.Thread(target=self._drain, name="bridge-output", daemon=True)
        self._reader.start()
        if not self._found.wait(START_DEADLINE_S) or self.address is None:
            self.stop()
            raise RuntimeError("dspex-bridge did not report its address; output:\n" + "".join(self.output))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = LISTENING.search(line)
            if match and self.address is None:
                self.address = match.group(1)
                self._found.set()
        self._found.set()

    def kill(self) -> None:
        """SIGKILL the server (no graceful shutdown)."""
        if self.proc.poll() is None:
            self.proc.kill()

    def stop(self) -> None:
        """Terminate the server and release its pipe."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="session")
def spawn_bridge() -> Iterator[Callable[..., BridgeProcess]]:
    """Start standalone bridge servers on demand; all are stopped at the end of the session."""
    started: list[BridgeProcess] = []

    def spawn(*extra_args: str, env: Mapping[str, str] | None = None) -> BridgeProcess:
        bridge = BridgeProcess(*extra_args, env=env)
        started.append(bridge)
        return bridge

    yield spawn
    for bridge in started:
        bridge.stop()


@pytest.fixture(scope="module")
def remote_bridge(spawn_bridge: Callable[..., BridgeProcess]) -> Iterator[BridgeProcess]:
    """One standalone bridge server per test module."""
    bridge = spawn_bridge()
    yield bridge
    bridge.stop()
