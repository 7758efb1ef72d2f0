"""A real ``redis-server`` for tests: its own process, an ephemeral loopback port, a temp directory.

:class:`RedisServer` starts ``redis-server`` (the Debian package; ``make test`` installs it) with
no RDB snapshots and, when asked, an append-only file (``appendfsync always`` by default), so a
test can SIGKILL it and start it again from its AOF on the same port. The pytest fixtures give one
server per test session (flushed before each test that asks for ``redis_url``) and fresh durable
servers on demand.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

START_DEADLINE_S = 30.0


def free_port() -> int:
    """A loopback TCP port free at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1`` with its data in ``directory``."""

    def __init__(self, directory: Path, *, appendonly: bool = False, appendfsync: str = "always") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed; run: apt-get update && apt-get install -y redis-server "
                "(make test does this when run as root)"
            )
        self.binary = binary
        self.directory = directory
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (on its old port when restarting, so clients find it again)."""
        for _ in range(20):
            port = self.port or free_port()
            args = [
                self.binary,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync,
                "--daemonize", "no",
                "--logfile", str(self.directory / "redis.log"),
            ]  # fmt: skip
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            if self._wait_ready(port):
                self.port = port
                return
            self.kill()
            if self.port:
                time.sleep(0.2)  # the old port is still being released: try it again
        log = (self.directory / "redis.log").read_text() if (self.directory / "redis.log").exists() else ""
        raise RuntimeError(f"redis-server did not start; log:\n{log}")

    def _wait_ready(self, port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + START_DEADLINE_S
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (nothing flushed beyond what its fsync policy already wrote)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Terminate the server."""
        if self.proc is not None:
            stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a server process, killing it if it does not exit within 10 s, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole test session (no persistence)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's redis-server, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def durable_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Start fresh redis-servers with an append-only file (``appendfsync always`` by default)."""
    started: list[RedisServer] = []

    def make(appendfsync: str = "always") -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis-aof"), appendonly=True, appendfsync=appendfsync)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
