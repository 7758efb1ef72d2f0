"""``LoopRedis``, the multiplexing asyncio Redis client, against real ``redis-server`` processes.

Each test drives a real server: the shared session server, a ``RedisServer`` of its own (to kill,
restart, pause or count connections without disturbing anyone), or a ``redis-server`` started
here with a password, a unix socket or TLS. The checks: concurrent commands on one connection get
their own answers; errors raise redis-py's classes and leave the connection aligned; scripts
survive ``SCRIPT FLUSH``; cancelled callers do not shift later answers; a killed Redis fails
waiting and new commands and is reconnected to once it is back; the watchdog fails a stalled
connection with ``TimeoutError``; URLs carry AUTH, SELECT, unix sockets and TLS; ``aclose``
fails what waits and what comes after.

Waits end on conditions seen on the server (``CLIENT LIST``, ``INFO``); deadlines are generous
safety nets, never what makes a test pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import uvloop
from redis.backoff import NoBackoff
from redis.retry import Retry

from dspex_dspy.store._redis_loop import DEFAULT_TIMEOUT_S, LoopRedis
from tests.support.redis_server import RedisServer, free_port, stop_process
from tests.support.tls_material import TlsMaterial, make_material

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0  # generous bound on every wait; never an assertion on speed
PAUSE_MS = 60_000  # CLIENT PAUSE length: always ended early by CLIENT UNPAUSE
READY = re.compile(r"ready to accept connections", re.IGNORECASE)

T = TypeVar("T")


new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on the standard library's loop and on uvloop's (a bridge node's default)."""
    kind = str(request.param)
    monkeypatch.setattr(
        sys.modules[__name__], "new_loop", uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    )
    return kind


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run one test's coroutine on a fresh event loop of the test's kind, with a safety-net deadline."""
    loop = new_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main, DEADLINE_S * 2))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@contextlib.asynccontextmanager
async def loop_redis(url: str, **options: Any) -> AsyncIterator[LoopRedis]:
    client = LoopRedis(url, **options)
    try:
        yield client
    finally:
        await client.aclose()


async def gather(*calls: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
    """``asyncio.gather``'s answers, as a list."""
    return list(await asyncio.gather(*calls, return_exceptions=return_exceptions))


def command(admin: redis.Redis, *args: Any) -> Any:
    """One raw command through a synchronous client."""
    return admin.execute_command(*args)  # type: ignore[no-untyped-call]


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait (letting the loop run) until ``predicate()`` holds."""
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def clients(admin: redis.Redis) -> dict[int, dict[str, Any]]:
    """The server's ``CLIENT LIST`` by client id."""
    return {int(entry["id"]): entry for entry in admin.client_list()}


def blocked(admin: redis.Redis, client_id: int) -> bool:
    """Whether the connection ``client_id`` is blocked on the server (BLPOP or a paused command)."""
    entry = clients(admin).get(client_id)
    return entry is not None and "b" in entry["flags"]


def connections_received(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_connections_received"])


@contextlib.contextmanager
def paused_writes(admin: redis.Redis) -> Iterator[None]:
    """``CLIENT PAUSE ... WRITE`` until the block ends (reads, CLIENT LIST and UNPAUSE still run)."""
    command(admin, "CLIENT", "PAUSE", PAUSE_MS, "WRITE")
    try:
        yield
    finally:
        command(admin, "CLIENT", "UNPAUSE")


# --- servers ---------------------------------------------------------------------------------


class SpawnedRedis:
    """A ``redis-server`` with options of a test's choosing (password, unix socket, TLS).

    It listens on an ephemeral loopback port (plain, or TLS only when ``tls``), or on no TCP port
    at all when not ``tcp``; readiness is read from its log file.
    """

    def __init__(self, directory: Path, options: list[str], *, tls: bool, tcp: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run: apt-get install -y redis-server")
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        log = directory / "redis.log"
        for attempt in range(10):
            port = free_port() if tcp else 0
            ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
            log = directory / f"redis-{attempt}.log"
            args = [
                binary, "--bind", "127.0.0.1", *ports,
                "--dir", str(directory), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(log), *options,
            ]  # fmt: skip
            with open(log.with_suffix(".err"), "wb") as err:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            if self._wait_ready(log):
                self.port = port
                return
            self.stop()  # most likely the port was taken meanwhile: try another
        text = "".join(path.read_text() for path in (log, log.with_suffix(".err")) if path.exists())
        raise RuntimeError(f"redis-server {' '.join(options)} did not start; its output:\n{text}")

    def _wait_ready(self, log: Path) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if log.exists() and READY.search(log.read_text()):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def spawn_redis(tmp_path: Path) -> Iterator[Callable[..., SpawnedRedis]]:
    """Start ``redis-server`` processes with extra options; all are stopped at teardown."""
    started: list[SpawnedRedis] = []

    def spawn(*options: str, tls: bool = False, tcp: bool = True) -> SpawnedRedis:
        directory = tmp_path / f"redis-{len(started)}"
        directory.mkdir()
        server = SpawnedRedis(directory, list(options), tls=tls, tcp=tcp)
        started.append(server)
        return server

    yield spawn
    for server in started:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A plain redis-server of this test's own (to kill, pause or count connections on)."""
    directory = tmp_path / "own-redis"
    directory.mkdir()
    server = RedisServer(directory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_admin() -> Iterator[Callable[..., redis.Redis]]:
    """Synchronous redis-py clients to watch and steer servers (decoded, no retries), closed at teardown."""
    made: list[redis.Redis] = []

    def make(**options: Any) -> redis.Redis:
        client = redis.Redis(decode_responses=True, socket_timeout=DEADLINE_S, retry=Retry(NoBackoff(), 0), **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def admin_of(make_admin: Callable[..., redis.Redis], url: str) -> redis.Redis:
    host, port = urllib.parse.urlparse(url).hostname, urllib.parse.urlparse(url).port
    return make_admin(host=host, port=port)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_material(tmp_path_factory.mktemp("redis-tls"))


# --- 1. multiplexing -------------------------------------------------------------------------

COUNT = 1000


def test_a_thousand_concurrent_commands_each_get_their_own_answer_on_one_connection(
    own_redis: RedisServer, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, own_redis.url)
    admin.mset({f"g:{i}": f"g{i}" for i in range(COUNT)})
    before = connections_received(admin)

    def first_round(i: int) -> tuple[tuple[Any, ...], Any]:
        return [
            (("SET", f"s:{i}", f"v{i}"), "OK"),
            (("GET", f"g:{i}"), f"g{i}"),
            (("INCRBY", f"c:{i}", i), i),
            (("ECHO", f"e{i}"), f"e{i}"),
        ][i % 4]

    def second_round(i: int) -> tuple[tuple[Any, ...], Any]:
        return [
            (("GET", f"s:{i}"), f"v{i}"),
            (("STRLEN", f"g:{i}"), len(f"g{i}")),
            (("INCRBY", f"c:{i}", 1), i + 1),
            (("EXISTS", f"e:{i}", f"g:{i}"), 1),
        ][i % 4]

    async def main() -> tuple[list[Any], list[Any], set[int]]:
        async with loop_redis(own_redis.url) as client:
            # Every call starts before the connection exists: all wait for the one being opened.
            rounds = [first_round(i) for i in range(COUNT)]
            ids = [client.call("CLIENT", "ID") for _ in range(10)]
            answers = await gather(*(client.call(*args) for args, _ in rounds), *ids)
            # And again on the open connection: all written at once, answered in order.
            again = [second_round(i) for i in range(COUNT)]
            answers_again = await gather(*(client.call(*args) for args, _ in again))
            ids_after = await gather(*(client.call("CLIENT", "ID") for _ in range(10)))
            return answers, answers_again, set(answers[COUNT:]) | set(ids_after)

    answers, answers_again, ids = run(main())
    assert answers[:COUNT] == [expected for _, expected in (first_round(i) for i in range(COUNT))]
    assert answers_again == [expected for _, expected in (second_round(i) for i in range(COUNT))]
    assert len(ids) == 1, f"commands ran on several connections: {ids}"
    assert connections_received(admin) - before == 1, "LoopRedis opened more than one connection"
    assert admin.get("s:4") == "v4" and admin.get("c:6") == "7"


# --- 2. errors -------------------------------------------------------------------------------


def test_error_replies_raise_redis_py_classes_and_the_connection_stays_aligned(
    redis_url: str, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, redis_url)
    admin.set("text", "abc")
    bad_commands: list[tuple[Any, ...]] = [
        ("INCR", "text"),
        ("NOSUCHCOMMAND", "x"),
        ("HGET", "text", "field"),
        ("AUTH", "nobody-configured-a-password"),
        ("SET", "a"),
    ]
    expected: list[BaseException] = []
    for bad in bad_commands:
        with pytest.raises(redis.RedisError) as raised:
            command(admin, *bad)
        expected.append(raised.value)

    async def main() -> tuple[list[Any], list[Any], set[int]]:
        async with loop_redis(redis_url) as client:
            ids = {await client.call("CLIENT", "ID")}
            mixed: list[tuple[Any, ...]] = []
            for index, bad in enumerate(bad_commands):
                mixed += [("SET", f"ok:{index}", f"v{index}"), bad, ("GET", f"ok:{index}")]
            answers = await gather(*(client.call(*args) for args in mixed), return_exceptions=True)
            after = [await client.call("INCR", "n"), await client.call("GET", "text"), await client.call("ECHO", "z")]
            ids.add(await client.call("CLIENT", "ID"))
            return answers, after, ids

    answers, after, ids = run(main())
    for index, wanted in enumerate(expected):
        ok, failure, read = answers[3 * index : 3 * index + 3]
        assert (ok, read) == ("OK", f"v{index}")
        assert type(failure) is type(wanted), (bad_commands[index], failure)
        assert str(failure) == str(wanted)
    assert "not an integer" in str(answers[1])
    assert "unknown command" in str(answers[4])
    assert str(answers[7]).startswith("WRONGTYPE")
    assert isinstance(answers[10], redis.AuthenticationError)
    assert after == [1, "abc", "z"]
    assert len(ids) == 1, "an error reply cost the connection"


def test_a_reply_that_is_not_utf8_fails_only_its_own_command(
    redis_url: str, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, redis_url)
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.set("binary", b"\xff\xfe")
    finally:
        raw.close()
    with pytest.raises(UnicodeDecodeError):
        admin.get("binary")  # redis-py, decoding answers, fails the same way

    async def main() -> tuple[list[Any], set[int]]:
        async with loop_redis(redis_url) as client:
            ids = {await client.call("CLIENT", "ID")}
            answers = await gather(
                client.call("SET", "a", "1"),
                client.call("GET", "binary"),
                client.call("MGET", "a", "binary"),
                client.call("GET", "a"),
                return_exceptions=True,
            )
            ids.add(await client.call("CLIENT", "ID"))
            return answers, ids

    answers, ids = run(main())
    assert answers[0] == "OK" and answers[3] == "1"
    assert isinstance(answers[1], UnicodeDecodeError) and isinstance(answers[2], UnicodeDecodeError)
    assert len(ids) == 1, "one undecodable answer cost the whole connection"


# --- 3. scripts ------------------------------------------------------------------------------

SCRIPT = "return {KEYS[1], redis.call('INCRBY', KEYS[1], ARGV[1])}"


def test_a_script_runs_by_sha_and_survives_a_script_flush(
    own_redis: RedisServer, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, own_redis.url)

    def evals() -> int:
        return int(admin.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))

    async def main() -> None:
        async with loop_redis(own_redis.url) as client:
            assert await client.script(SCRIPT, ["k"], [5]) == ["k", 5]
            sent_source = evals()
            assert sent_source == 1  # NOSCRIPT once, then the source
            for n in range(10):
                assert await client.script(SCRIPT, ["k"], [1]) == ["k", 6 + n]
            assert evals() == sent_source, "the source was sent again while Redis had the script"

            admin.script_flush()
            assert await client.script(SCRIPT, ["k"], [100]) == ["k", 115]
            assert evals() == sent_source + 1
            assert await client.script(SCRIPT, ["k"], [1]) == ["k", 116]

            admin.script_flush()  # many callers at once on a Redis that forgot the script
            answers = await gather(*(client.script(SCRIPT, [f"key:{i}"], [i]) for i in range(50)))
            assert answers == [[f"key:{i}", i] for i in range(50)]

            with pytest.raises(redis.ResponseError, match="custom failure"):
                await client.script("return redis.error_reply('custom failure')", [], [])
            admin.set("text", "abc")
            with pytest.raises(redis.ResponseError, match="not an integer"):
                await client.script("return redis.call('INCR', KEYS[1])", ["text"], [])
            assert await client.call("GET", "k") == "116"

    run(main())
    assert admin.script_exists(hashlib.sha1(SCRIPT.encode()).hexdigest()) == [True]


# --- 4. cancellation -------------------------------------------------------------------------


def test_a_caller_cancelled_while_waiting_does_not_shift_later_answers(
    own_redis: RedisServer, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, own_redis.url)

    async def main() -> None:
        async with loop_redis(own_redis.url, timeout=DEADLINE_S * 2) as client:
            client_id = await client.call("CLIENT", "ID")
            with paused_writes(admin):
                first = asyncio.ensure_future(client.call("INCR", "counter"))
                second = asyncio.ensure_future(client.call("SET", "other", "x"))
                third = asyncio.ensure_future(client.call("GET", "counter"))
                # The INCR reached Redis and waits there; what follows waits behind it.
                await eventually(lambda: blocked(admin, client_id), "the INCR to be held by the pause")
                first.cancel()
                third.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
                with pytest.raises(asyncio.CancelledError):
                    await third
                fourth = asyncio.ensure_future(client.call("ECHO", "after the cancel"))
                assert not second.done()
            assert await second == "OK"
            assert await fourth == "after the cancel"
            # The cancelled INCR did run (its answer went nowhere), and the answers stay aligned.
            assert await client.call("GET", "counter") == "1"
            answers = await gather(client.call("INCR", "counter"), client.call("GET", "other"))
            assert answers == [2, "x"]
            assert await client.call("CLIENT", "ID") == client_id

    run(main())


def test_a_caller_cancelled_while_connecting_leaves_no_stale_connection_behind(
    own_redis: RedisServer, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, own_redis.url)

    async def main() -> None:
        async with loop_redis(own_redis.url, timeout=DEADLINE_S * 2) as client:
            caller = asyncio.ensure_future(client.call("SET", "k", "v"))
            await asyncio.sleep(0)  # the caller now waits for the connection being opened
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            # The connection is opened all the same, for whoever comes next.
            await eventually(lambda: client._connection is not None, "the connection to open")
            client_id = await client.call("CLIENT", "ID")
            waiting = asyncio.ensure_future(client.call("BLPOP", "nothing", 0))
            await eventually(lambda: blocked(admin, client_id), "the BLPOP to block")
            admin.client_kill_filter(_id=client_id)
            with pytest.raises(redis.ConnectionError):
                await waiting
            # The drop was seen: the next command opens a new connection.
            assert await client.call("ECHO", "again") == "again"
            assert await client.call("CLIENT", "ID") != client_id

    run(main())


# --- 5. a killed Redis -----------------------------------------------------------------------


def test_a_killed_redis_fails_waiting_and_new_commands_and_is_reconnected_to_after_a_restart(
    own_redis: RedisServer, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, own_redis.url)

    async def main() -> None:
        async with loop_redis(own_redis.url, timeout=DEADLINE_S * 2) as client:
            assert await client.call("SET", "k", "v") == "OK"
            client_id = await client.call("CLIENT", "ID")
            waiting = [
                asyncio.ensure_future(client.call("BLPOP", "nothing", 0)),
                asyncio.ensure_future(client.call("ECHO", "behind the BLPOP")),
            ]
            await eventually(lambda: blocked(admin, client_id), "the BLPOP to block")
            own_redis.kill()
            for future in waiting:
                with pytest.raises(redis.ConnectionError):
                    await future
            for _ in range(2):  # Redis is down: each new command tries to connect, and fails
                with pytest.raises(redis.ConnectionError):
                    await client.call("PING")
            with pytest.raises(redis.ConnectionError):
                await client.script(SCRIPT, ["k"], [1])

            own_redis.start()  # the same port
            assert await client.call("PING") == "PONG"
            answers = await gather(client.call("SET", "k", "w"), client.call("GET", "k"))
            assert answers == ["OK", "w"]
            assert await client.script(SCRIPT, ["n"], [3]) == ["n", 3]

    run(main())


# --- 6. the watchdog -------------------------------------------------------------------------


def test_the_watchdog_fails_a_stalled_connection_and_the_next_command_opens_a_new_one(
    own_redis: RedisServer, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, own_redis.url)
    # Every command of these clients, in the pause or not, runs under the watchdog: twice the
    # default is long enough that no answer outside the pause is ever that late, even on a loaded
    # machine, and a stall that lasts it shows the configured timeout was used, not the default.
    timeout = 2 * DEFAULT_TIMEOUT_S
    # The timeout given as the argument and in the URL, both clients stalled by the same pause.
    configured = {
        "argument": (own_redis.url, {"timeout": timeout}),
        "url": (f"{own_redis.url}?socket_timeout={timeout:g}", {}),
    }

    async def stall(where: str, client: LoopRedis, old_id: int) -> int:
        """Two commands stalled by the pause fail together; the next opens a new connection."""
        started = time.monotonic()
        stalled = [
            asyncio.ensure_future(client.call("SET", f"stalled-{where}", "v")),
            asyncio.ensure_future(client.call("GET", f"stalled-{where}")),
        ]
        for future in stalled:
            with pytest.raises(redis.TimeoutError):
                await future
        waited = time.monotonic() - started
        assert waited >= timeout - 0.01, f"{where}: failed after {waited:.2f} s, before its deadline"
        # Reads still run during a WRITE pause: the next command gets a new connection.
        new_id: int = await client.call("CLIENT", "ID")
        assert new_id != old_id, where
        return new_id

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            by_where = {
                where: await stack.enter_async_context(loop_redis(url, **options))
                for where, (url, options) in configured.items()
            }
            old_ids = {where: await client.call("CLIENT", "ID") for where, client in by_where.items()}
            with paused_writes(admin):
                stalls = [stall(where, client, old_ids[where]) for where, client in by_where.items()]
                new_ids = dict(zip(by_where, await gather(*stalls), strict=True))
            for where, client in by_where.items():
                assert await client.call("SET", f"k-{where}", "w") == "OK"
                assert await client.call("GET", f"k-{where}") == "w"
                assert await client.call("CLIENT", "ID") == new_ids[where], where
            await eventually(
                lambda: not set(old_ids.values()) & set(clients(admin)), "the stalled connections to be closed"
            )

    run(main())


# --- 7. URL options --------------------------------------------------------------------------

PASSWORD = "p@ss:w/rd secret"


def test_a_password_url_authenticates_and_selects_its_db(
    spawn_redis: Callable[..., SpawnedRedis], make_admin: Callable[..., redis.Redis]
) -> None:
    server = spawn_redis("--requirepass", PASSWORD)
    admin = make_admin(host="127.0.0.1", port=server.port, password=PASSWORD)
    command(admin, "ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all")
    command(admin, "ACL", "SETUSER", "reader", "on", ">reader-pw", "~*", "+@read", "+select")
    base = f"127.0.0.1:{server.port}"
    quoted = urllib.parse.quote(PASSWORD, safe="")

    async def main() -> None:
        async with loop_redis(f"redis://:{quoted}@{base}/3") as client:
            assert await client.call("SET", "k", "in db 3") == "OK"
            assert "db=3" in await client.call("CLIENT", "INFO")
        async with loop_redis(f"redis://alice:alice-pw@{base}/0") as client:
            assert await client.call("ACL", "WHOAMI") == "alice"
            assert await client.call("SET", "alice", "was here") == "OK"
        async with loop_redis(f"redis://reader:reader-pw@{base}/3") as client:
            assert await client.call("GET", "k") == "in db 3"
            with pytest.raises(redis.exceptions.NoPermissionError):
                await client.call("SET", "k", "overwritten")
            assert await client.call("GET", "k") == "in db 3"
        for url in (f"redis://:wrong@{base}/3", f"redis://alice:wrong@{base}/0", f"redis://nobody:{quoted}@{base}/0"):
            async with loop_redis(url) as client:
                for _ in range(2):  # every call tries again, and fails again
                    with pytest.raises(redis.AuthenticationError):
                        await client.call("SET", "never", "written")
        # A refused connection is closed, not left open: only the admin's own connection remains.
        await eventually(lambda: len(clients(admin)) == 1, "the refused connections to close")
        async with loop_redis(f"redis://{base}/0") as client:
            with pytest.raises(redis.AuthenticationError):
                await client.call("SET", "never", "written")

    run(main())
    db3 = make_admin(host="127.0.0.1", port=server.port, password=PASSWORD, db=3)
    assert db3.get("k") == "in db 3" and admin.get("k") is None
    assert admin.get("alice") == "was here"
    assert admin.exists("never") == 0 and db3.exists("never") == 0


@pytest.fixture
def short_directory() -> Iterator[Path]:
    """A short directory for a unix socket (their paths are limited to about 100 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="loop-redis-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_unix_socket_url_connects_and_selects_its_db(
    spawn_redis: Callable[..., SpawnedRedis], make_admin: Callable[..., redis.Redis], short_directory: Path
) -> None:
    path = short_directory / "redis.sock"
    spawn_redis("--unixsocket", str(path), "--unixsocketperm", "700", tcp=False)  # no TCP port at all

    async def main() -> str:
        async with loop_redis(f"unix://{path}?db=2") as client:
            answers = await gather(client.call("SET", "k", "over a socket"), client.call("GET", "k"))
            assert answers == ["OK", "over a socket"]
            return str(await client.call("CLIENT", "INFO"))

    info = run(main())
    assert "db=2" in info and f"addr={path}" in info
    assert make_admin(unix_socket_path=str(path), db=2).get("k") == "over a socket"
    assert make_admin(unix_socket_path=str(path), db=0).get("k") is None


# --- 8. TLS ----------------------------------------------------------------------------------


def _tls_options(material: TlsMaterial, *, auth_clients: str) -> list[str]:
    return [
        "--tls-cert-file", str(material.server.cert_path),
        "--tls-key-file", str(material.server.key_path),
        "--tls-ca-cert-file", str(material.ca.path),
        "--tls-auth-clients", auth_clients,
    ]  # fmt: skip


def spawn_tls(spawn_redis: Callable[..., SpawnedRedis], material: TlsMaterial, *, auth_clients: str) -> SpawnedRedis:
    """A TLS-only redis-server (Debian's redis-server is built with TLS; one built without it fails
    here with its own message, never skips)."""
    return spawn_redis(*_tls_options(material, auth_clients=auth_clients), tls=True)


def test_tls_urls_verify_the_server_against_their_ca(
    spawn_redis: Callable[..., SpawnedRedis], material: TlsMaterial
) -> None:
    server = spawn_tls(spawn_redis, material, auth_clients="no")
    base = f"127.0.0.1:{server.port}"
    ca = urllib.parse.quote(str(material.ca.path))

    async def main() -> None:
        for url in (f"rediss://{base}/0?ssl_ca_certs={ca}", f"rediss://localhost:{server.port}/0?ssl_ca_certs={ca}"):
            async with loop_redis(url) as client:
                answers = await gather(client.call("SET", "k", "over TLS"), client.call("GET", "k"))
                assert answers == ["OK", "over TLS"]
        async with loop_redis(f"rediss://{base}/0?ssl_cert_reqs=none") as client:
            assert await client.call("GET", "k") == "over TLS"
        async with loop_redis(
            f"rediss://{base}/0?ssl_ca_certs={urllib.parse.quote(str(material.other_ca.path))}"
        ) as client:
            for _ in range(2):
                with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
                    await client.call("GET", "k")
        async with loop_redis(f"redis://{base}/0", timeout=DEADLINE_S * 2) as client:  # plaintext to a TLS port
            with pytest.raises(redis.ConnectionError):
                await client.call("GET", "k")

    run(main())


def test_mutual_tls_needs_the_client_certificate(
    spawn_redis: Callable[..., SpawnedRedis], material: TlsMaterial
) -> None:
    server = spawn_tls(spawn_redis, material, auth_clients="yes")
    base = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={urllib.parse.quote(str(material.ca.path))}"
    client_cert = (
        f"&ssl_certfile={urllib.parse.quote(str(material.client.cert_path))}"
        f"&ssl_keyfile={urllib.parse.quote(str(material.client.key_path))}"
    )

    async def main() -> None:
        async with loop_redis(base + client_cert) as client:
            answers = await gather(client.call("SET", "k", "mutual"), client.call("GET", "k"))
            assert answers == ["OK", "mutual"]
        async with loop_redis(base, timeout=DEADLINE_S * 2) as client:
            with pytest.raises(redis.ConnectionError):
                await client.call("GET", "k")

    run(main())


# --- 9. aclose -------------------------------------------------------------------------------


def test_aclose_fails_waiting_and_later_commands(
    own_redis: RedisServer, make_admin: Callable[..., redis.Redis]
) -> None:
    admin = admin_of(make_admin, own_redis.url)
    redis_url = own_redis.url

    async def main() -> None:
        client = LoopRedis(redis_url, timeout=DEADLINE_S * 2)
        client_id = await client.call("CLIENT", "ID")
        waiting = [
            asyncio.ensure_future(client.call("BLPOP", "nothing", 0)),
            asyncio.ensure_future(client.call("ECHO", "behind the BLPOP")),
        ]
        await eventually(lambda: blocked(admin, client_id), "the BLPOP to block")
        await client.aclose()
        for future in waiting:
            with pytest.raises(redis.ConnectionError):
                await future
        with pytest.raises(redis.ConnectionError):
            await client.call("PING")
        with pytest.raises(redis.ConnectionError):
            await client.script(SCRIPT, ["k"], [1])
        await client.aclose()  # twice is fine
        await eventually(lambda: client_id not in clients(admin), "the connection to be closed")

        # Closed while its first connection is being opened: the caller fails, nothing stays open.
        before = set(clients(admin))
        client = LoopRedis(redis_url)
        caller = asyncio.ensure_future(client.call("SET", "never", "written"))
        await asyncio.sleep(0)
        await client.aclose()
        with pytest.raises(redis.ConnectionError):
            await caller
        await eventually(lambda: set(clients(admin)) <= before, "the late connection to be closed")

    run(main())
    assert admin.exists("never") == 0
