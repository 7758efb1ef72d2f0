"""A loopback TCP proxy that can reset or silently drop the connections it carries.

:class:`FaultProxy` listens on an ephemeral ``127.0.0.1`` port and forwards every accepted
connection to a target (a bridge server's port). Tests point clients at :attr:`FaultProxy.address`
and inject faults between the two ends:

* :meth:`FaultProxy.reset` closes every current connection on both sides with an RST
  (``SO_LINGER`` 0), like a peer that crashed or a middlebox that dropped the flow.
* :meth:`FaultProxy.blackhole` silently stops forwarding in both directions. Sockets stay open,
  nothing is closed and no RST is sent; bytes wait in the kernel buffers, like a peer that vanished
  (a half-open connection). New connections are accepted but carry nothing either.
* :meth:`FaultProxy.restore` resumes forwarding. Nothing was dropped while blackholed, so
  connections that survived carry on where they stopped.
* :meth:`FaultProxy.blackhole_after` blackholes once that many more bytes went client -> server
  (to cut a connection in the middle of a long exchange, deterministically).
* :meth:`FaultProxy.retarget` sends *new* connections to another port (a restarted server).
* :meth:`FaultProxy.close` resets every connection and stops listening.

Each connection pair is pumped by one thread with non-blocking sockets and bounded buffers, so a
slow side never blocks the other direction and fault switches take effect within one poll tick.

Example:
    >>> with FaultProxy(server_port) as proxy:          # doctest: +SKIP
    ...     client = connect(proxy.address)
    ...     proxy.blackhole()
    ...     ...                                          # the client sees a half-open connection
    ...     proxy.restore()
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from types import TracebackType

__all__ = ["FaultProxy"]

_POLL_S = 0.02
_CHUNK = 65536
_BUFFER_CAP = 1 << 20


def _rst_close(sock: socket.socket) -> None:
    """Close ``sock`` so the kernel sends an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One proxied connection: the accepted client socket and the upstream socket."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.reset_requested = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fault-proxy-pair", daemon=True)

    def _run(self) -> None:
        try:
            self._pump()
        finally:
            self.done.set()
            self.proxy._forget(self)

    def _pump(self) -> None:
        socks = (self.client, self.upstream)
        for s in socks:
            s.setblocking(False)
        other = {self.client: self.upstream, self.upstream: self.client}
        pending: dict[socket.socket, bytearray] = {self.client: bytearray(), self.upstream: bytearray()}
        eof: dict[socket.socket, bool] = {self.client: False, self.upstream: False}
        shut: dict[socket.socket, bool] = {self.client: False, self.upstream: False}
        sel = selectors.DefaultSelector()
        try:
            while True:
                if self.reset_requested.is_set():
                    _rst_close(self.client)
                    _rst_close(self.upstream)
                    return
                if self.proxy._paused.is_set():
                    # Blackholed: read nothing, write nothing, keep everything open.
                    self.proxy._resumed.wait(_POLL_S)
                    continue
                for s in socks:
                    events = 0
                    if not eof[s] and len(pending[other[s]]) < _BUFFER_CAP:
                        events |= selectors.EVENT_READ
                    if pending[s]:
                        events |= selectors.EVENT_WRITE
                    key = sel.get_map().get(s)
                    if events and key is None:
                        sel.register(s, events)
                    elif events and key is not None and key.events != events:
                        sel.modify(s, events)
                    elif not events and key is not None:
                        sel.unregister(s)
                if not sel.get_map():
                    # Both sides finished and every byte was delivered.
                    for s in socks:
                        with contextlib.suppress(OSError):
                            s.close()
                    return
                for key, mask in sel.select(_POLL_S):
                    s = self.client if key.fileobj is self.client else self.upstream
                    if mask & selectors.EVENT_READ:
                        try:
                            data = s.recv(_CHUNK)
                        except (BlockingIOError, InterruptedError):
                            data = None
                        except OSError:
                            # The peer reset: pass the reset on to the other side.
                            _rst_close(self.client)
                            _rst_close(self.upstream)
                            return
                        if data == b"":
                            eof[s] = True
                        elif data:
                            pending[other[s]] += data
                            if s is self.client:
                                self.proxy._count_upstream(len(data))
                    if mask & selectors.EVENT_WRITE and pending[s]:
                        try:
                            sent = s.send(pending[s])
                        except (BlockingIOError, InterruptedError):
                            sent = 0
                        except OSError:
                            _rst_close(self.client)
                            _rst_close(self.upstream)
                            return
                        del pending[s][:sent]
                # Half-close: once one side sent EOF and its bytes were delivered, pass the FIN on.
                for s in socks:
                    if eof[s] and not pending[other[s]] and not shut[other[s]]:
                        shut[other[s]] = True
                        with contextlib.suppress(OSError):
                            other[s].shutdown(socket.SHUT_WR)
                if all(eof.values()) and not pending[self.client] and not pending[self.upstream]:
                    for s in socks:
                        with contextlib.suppress(OSError):
                            s.close()
                    return
        finally:
            sel.close()


class FaultProxy:
    """A loopback TCP proxy in front of ``target_host:target_port`` with fault switches.

    Args:
        target_port: The port to forward to (a server listening on ``target_host``).
        target_host: The host to forward to (default ``127.0.0.1``).

    The proxy starts listening at construction on an ephemeral port of ``127.0.0.1``;
    :attr:`port` and :attr:`address` say where. Use it as a context manager or call
    :meth:`close`.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, int(target_port))
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._paused = threading.Event()
        self._resumed = threading.Event()
        self._resumed.set()
        self._closed = threading.Event()
        self.accepted = 0
        self.upstream_bytes = 0
        self._trip_at: int | None = None
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(_POLL_S * 5)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, the address clients should dial."""
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """How many proxied connections are open now."""
        with self._lock:
            return len(self._pairs)

    @property
    def blackholed(self) -> bool:
        """Whether forwarding is currently stopped."""
        return self._paused.is_set()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5.0)
            except OSError:
                _rst_close(client)
                continue
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, client, upstream)
            with self._lock:
                if self._closed.is_set():
                    _rst_close(client)
                    _rst_close(upstream)
                    return
                self._pairs.add(pair)
                self.accepted += 1
            pair.thread.start()

    def _count_upstream(self, n: int) -> None:
        with self._lock:
            self.upstream_bytes += n
            tripped = self._trip_at is not None and self.upstream_bytes >= self._trip_at
            if tripped:
                self._trip_at = None
        if tripped:
            self.blackhole()

    def blackhole_after(self, upstream_bytes: int) -> None:
        """Blackhole (as :meth:`blackhole`) once ``upstream_bytes`` more bytes went client -> server.

        The chunk that crosses the threshold is still delivered; nothing after it is.
        """
        with self._lock:
            self._trip_at = self.upstream_bytes + upstream_bytes

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    def reset(self, timeout: float = 10.0) -> int:
        """Close every current connection on both sides with an RST.

        New connections are accepted afterwards as usual (and stay blackholed if the proxy is).

        Args:
            timeout: Seconds to wait for the pump threads to finish.

        Returns:
            How many connections were reset.
        """
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.reset_requested.set()
        for pair in pairs:
            pair.done.wait(timeout)
        return len(pairs)

    def blackhole(self) -> None:
        """Silently stop forwarding in both directions; keep every socket open, send no RST."""
        self._resumed.clear()
        self._paused.set()

    def restore(self) -> None:
        """Resume forwarding (bytes held while blackholed are delivered, nothing was lost)."""
        self._paused.clear()
        self._resumed.set()

    def retarget(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        """Send connections accepted from now on to ``target_host:target_port``."""
        self._target = (target_host, int(target_port))

    def close(self) -> None:
        """Stop listening and reset every connection. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.restore()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(timeout=5.0)
        self.reset()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
