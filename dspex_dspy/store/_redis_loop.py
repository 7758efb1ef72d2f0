"""Redis commands from one event loop, multiplexed on one connection (RESP2, hiredis).

redis-py's asyncio client checks a connection out of its pool for every command, guards each send
with a timer task and reads through asyncio streams: about 40 µs of CPU per command here, four
times what the command costs Redis. A bridge node answers every read and write with one script, so
that overhead was a fifth of its CPU per write. Redis answers the commands of a connection in the
order it received them, so one connection can carry all of a loop's commands at once: each caller
writes its command and waits on a future, and replies resolve the futures in order (about 10 µs).
No maintained asyncio Redis client multiplexes this way, so this module does it by hand, leaving
the protocol itself to hiredis (packing and parsing, in C) and the URL and the error classes to
redis-py, so both clients read one URL alike and fail alike.

Nothing is retried: a command whose connection drops fails with :class:`redis.ConnectionError`
(it may or may not have run, as with any call whose answer is lost), and the next command opens a
new connection. A connection whose oldest command has waited longer than its timeout is taken for
dead: every command on it fails with :class:`redis.TimeoutError` and it is closed.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Sequence
from typing import Any, Final, cast

import hiredis
import redis
from redis._parsers import BaseParser
from redis.connection import parse_url

__all__ = ["LoopRedis"]

DEFAULT_TIMEOUT_S: Final = 5.0
"""How long a command may wait for its answer before its connection is taken for dead (redis-py's
default socket timeout)."""


class _Connection(asyncio.Protocol):
    """One Redis connection: commands are written as they come and answered in order."""

    def __init__(self, timeout: float) -> None:
        self._reader = hiredis.Reader(replyError=redis.ResponseError, encoding="utf-8")
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.failure: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, so no isinstance check).
        self._transport = cast(asyncio.Transport, transport)

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Write one command; the future resolves with its answer (or its error)."""
        if self.failure is not None or self._transport is None:
            raise redis.ConnectionError(f"the Redis connection is closed: {self.failure}")
        future = self._loop.create_future()
        self._transport.write(hiredis.pack_command(args))
        self._waiting.append((future, self._loop.time() + self._timeout))
        if self._timer is None:
            self._timer = self._loop.call_at(self._waiting[0][1], self._check)
        return future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = self._reader.gets()
            except UnicodeDecodeError as exc:  # hiredis skipped the whole reply: only its command fails
                reply = exc
            if reply is False:
                return
            if not waiting:
                self._abort(redis.ConnectionError("Redis sent an answer to no command"))
                return
            future = waiting.popleft()[0]
            if future.done():  # its caller gave up (cancelled): the answer goes nowhere
                continue
            if isinstance(reply, redis.ResponseError):
                future.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            elif isinstance(reply, UnicodeDecodeError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _check(self) -> None:
        """The oldest command's deadline passed: take the connection for dead, or wait for the next."""
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        if self._loop.time() >= deadline:
            self._abort(redis.TimeoutError(f"Redis did not answer within {self._timeout:g} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check)

    def _abort(self, failure: Exception) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails every command still waiting
        self.connection_lost(failure)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failure is None:
            self.failure = exc if exc is not None else redis.ConnectionError("Redis closed the connection")
        if not isinstance(self.failure, redis.RedisError):
            self.failure = redis.ConnectionError(f"the Redis connection was lost: {self.failure}")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(self.failure)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.connection_lost(redis.ConnectionError("the Redis connection was closed"))


def _tls(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context a ``rediss://`` URL asks for, read as redis-py reads its ``ssl_*`` options."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    required = options.get("ssl_cert_reqs", "required")
    if required in ("none", ssl.CERT_NONE):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif required in ("optional", ssl.CERT_OPTIONAL):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    elif str(options.get("ssl_check_hostname", "true")).lower() in ("false", "0", "no"):
        context.check_hostname = False
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


class LoopRedis:
    """Commands and scripts of one event loop on one multiplexed Redis connection.

    Args:
        url: the same ``redis://``, ``rediss://`` or ``unix://`` URL redis-py reads (host, port,
            path, db, username, password, ``ssl_*`` and ``socket_timeout`` are honoured).
        timeout: seconds a command may wait for its answer (the URL's ``socket_timeout`` if given).

    Made and used on one running event loop; :meth:`aclose` on that loop.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._options = options
        self._timeout = float(options.get("socket_timeout") or timeout)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._shas: dict[str, str] = {}
        self._closed = False

    async def call(self, *args: Any) -> Any:
        """One command's answer; raises what redis-py raises for the same failure."""
        connection = self._connection
        if connection is None or connection.failure is not None:
            connection = await self._connect()
        return await connection.send(args)

    async def script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script by its SHA1 (``EVALSHA``), sending its source once if Redis lacks it."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a restarted or flushed Redis forgot it
            return await self.call("EVAL", source, len(keys), *keys, *args)

    async def _connect(self) -> _Connection:
        if self._closed:
            raise redis.ConnectionError("this client is closed")
        if self._connecting is None or self._connecting.done():  # done: its callers were all cancelled
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        options = self._options
        timeout = float(options.get("socket_connect_timeout") or self._timeout)
        try:
            if options.get("path"):
                opening = loop.create_unix_connection(lambda: _Connection(self._timeout), options["path"])
            else:
                tls = _tls(options) if options.get("connection_class") is redis.SSLConnection else None
                opening = loop.create_connection(
                    lambda: _Connection(self._timeout),
                    options.get("host", "localhost"),
                    int(options.get("port", 6379)),
                    ssl=tls,
                )
            _, connection = await asyncio.wait_for(opening, timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise redis.ConnectionError(f"cannot connect to Redis: {exc}") from exc
        hello: list[asyncio.Future[Any]] = []
        if options.get("password") is not None:
            user = (options["username"],) if options.get("username") else ()
            hello.append(connection.send(("AUTH", *user, options["password"])))
        if int(options.get("db") or 0):
            hello.append(connection.send(("SELECT", int(options["db"]))))
        try:
            for answer in hello:
                await answer
        except BaseException:  # refused (AUTH, SELECT), lost or cancelled: the socket goes too
            connection.close()
            raise
        self._connection = connection
        if self._closed:
            connection.close()
            raise redis.ConnectionError("this client is closed")
        return connection

    async def aclose(self) -> None:
        """Close the connection; commands still waiting fail with :class:`redis.ConnectionError`."""
        self._closed = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None
