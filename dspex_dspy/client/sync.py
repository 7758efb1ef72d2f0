"""The blocking driver: :class:`SessionContext`, its cache feed thread and :class:`VariableWatch`.

A thin shell over the machines of :mod:`.feed` and the operations of :mod:`.core`: it opens
streams, runs calls and threads. One daemon thread per client feeds the cache; one process-wide
watchdog thread cancels cache streams silent for longer than their ``silence_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.client.cache import WORKER, VariableCache
from dspex_dspy.client.core import (
    CLIENT_CHANNEL_OPTIONS,
    ClientCore,
    ClientOptions,
    ConnectOptions,
    Op,
    Streams,
    check_session_id,
    connect_options,
    finalizing,
    resolve_address,
)
from dspex_dspy.client.events import WatchEvent, deprecated, detached
from dspex_dspy.client.feed import CachedWatch, CacheFeed, Listing, StreamWatch
from dspex_dspy.client.reporter import CallReporter
from dspex_dspy.errors import BridgeUnavailableError, DSPexError
from dspex_dspy.leases import DEFAULT_LEASE_SECONDS, OptimizationLease
from dspex_dspy.ops import CallbackWatch, cas_update
from dspex_dspy.records import HistoryEntry
from dspex_dspy.remote import BridgeCall, BridgeCalls, RemoteStore, open_channel
from dspex_dspy.remote.reports import report_calls
from dspex_dspy.tls import ChannelSecurity, resolve_security, secure_channel
from dspex_dspy.types import Variable, is_secret

__all__ = ["SessionContext", "VariableWatch"]

_T = TypeVar("_T")
logger = logging.getLogger("dspex_dspy.client")
if TYPE_CHECKING:
    from dspex_dspy.client.core import DefineOptions, Meta, Unpack

_SECRET_TEXT = "<secret>"  # what a secret variable's value is reported as (as everywhere it is shown)

# What a forked child inherited and must never touch (closing it could wait on the parent's threads).
_INHERITED: list[Any] = []


class _Link:
    """A client's stub, channel and :class:`RemoteStore`; reopened after a fork or a dead connection.

    Only a channel this package opened (from an address) can be reopened; a stub given by the
    caller is used as is.
    """

    def __init__(
        self,
        stub: Any,
        channel: grpc.Channel | None,
        address: str | None,
        call_timeout: float,
        security: ChannelSecurity,
    ) -> None:
        self.address = address
        self.security = security
        self.call_timeout = call_timeout
        self.owned = channel is not None and address is not None
        self.retired: list[RemoteStore] = []
        self._set(stub, channel)

    def _set(self, stub: Any, channel: grpc.Channel | None) -> None:
        self.stub = stub
        self.channel = channel
        self.remote = RemoteStore(stub, channel=channel, address=self.address, call_timeout=self.call_timeout)

    def reopen(self, *, inherited: bool) -> bool:
        """A new channel to the same address; False if this link cannot open one.

        The old channel is kept untouched if ``inherited`` (a forked child), else retired: calls
        in flight on it end by their own deadline, and it is closed at the next reopen or close.
        """
        if not self.owned or self.address is None:
            return False
        old = self.remote
        _, channel = secure_channel(self.address, self.security, CLIENT_CHANNEL_OPTIONS)
        self._set(pb_grpc.BridgeServiceStub(channel), channel)
        if inherited:
            _INHERITED.append(old)
            self.retired = []
        else:
            self.close_retired()
            self.retired = [old]
        return True

    def close_retired(self) -> None:
        retired, self.retired = self.retired, []
        for remote in retired:
            remote.close()

    def close(self) -> None:
        self.close_retired()
        self.remote.close()


class _Watchdog:
    """One daemon thread that cancels the cache streams silent longer than their limit."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._guarded: dict[int, tuple[Any, CacheFeed]] = {}
        self._thread: threading.Thread | None = None

    def guard(self, stream: Any, feed: CacheFeed) -> None:
        if feed.silence_left() is None:
            return
        with self._cond:
            self._guarded[id(stream)] = (stream, feed)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="dspex-cache-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def release(self, stream: Any) -> None:
        with self._cond:
            self._guarded.pop(id(stream), None)

    def _overdue(self) -> tuple[list[Any], float]:
        """The streams to cancel now, and how long to sleep before looking again (under the lock)."""
        overdue, wait = [], 1.0
        for key, (stream, feed) in list(self._guarded.items()):
            left = feed.silence_left()
            if left is not None and left <= 0:
                overdue.append(stream)
                del self._guarded[key]
            elif left is not None:
                wait = min(wait, left + 0.01)
        return overdue, wait

    def _run(self) -> None:
        while True:
            with self._cond:
                overdue, wait = self._overdue()
                if not overdue:
                    self._cond.wait(wait)
            for stream in overdue:
                stream.cancel()


_WATCHDOG = _Watchdog()


class _ForkPause:
    """Takes every cache feed out of gRPC while the process forks, and lets it back in after.

    gRPC prepares a fork (so that the child may use gRPC) only when no other thread is inside
    gRPC at that moment; a child forked while a feed's stream is open can crash inside gRPC. So
    before a fork, each feed's stream is cancelled and the fork waits (at most
    :attr:`LIMIT` seconds) until every feed thread has left gRPC; the feeds reopen their streams
    once the parent is past the fork, and resync as after any reconnection (the cache serves no
    read from its copy meanwhile: reads go to the server).
    """

    LIMIT = 2.0

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._forking = 0  # forks under way (two threads may fork at once)
        self._inside = 0
        self._streams: set[Any] = set()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Hold while a feed thread uses gRPC; waits while a fork is under way."""
        with self._cond:
            while self._forking > 0:
                self._cond.wait()
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    def track(self, stream: Any) -> bool:
        """Register a feed's open stream for cancelling at a fork; False when one is under way."""
        with self._cond:
            if self._forking > 0:
                return False
            self._streams.add(stream)
            return True

    def untrack(self, stream: Any) -> None:
        with self._cond:
            self._streams.discard(stream)

    @property
    def forking(self) -> bool:
        return self._forking > 0

    def before(self) -> None:
        with self._cond:
            self._forking += 1
            streams = list(self._streams)
        for stream in streams:
            stream.cancel()
        with self._cond:
            left = self._cond.wait_for(lambda: self._inside == 0, self.LIMIT)
        if not left:
            logger.warning(
                "a cache feed was still inside a gRPC call after %g s; forking anyway (the child may "
                "not be able to use gRPC): prefer the spawn or forkserver start method",
                self.LIMIT,
                extra={"event": "fork_unquiesced"},
            )

    def after_in_parent(self) -> None:
        with self._cond:
            self._forking = max(0, self._forking - 1)
            self._cond.notify_all()

    def after_in_child(self) -> None:
        # The child's feeds are none (a client reconnects in a child on first use): start clean.
        self._cond = threading.Condition(threading.Lock())
        self._forking = 0
        self._inside = 0
        self._streams = set()


_FORK_PAUSE = _ForkPause()


def _new_watchdog_in_child() -> None:
    global _WATCHDOG
    _WATCHDOG = _Watchdog()
    _FORK_PAUSE.after_in_child()


os.register_at_fork(
    before=_FORK_PAUSE.before, after_in_parent=_FORK_PAUSE.after_in_parent, after_in_child=_new_watchdog_in_child
)


def _secrecy(link: _Link, cache: VariableCache | None, session_id: str, name: str) -> bool | None:
    """Whether a variable is secret (its metadata, from the cache or the bridge); None: cannot tell."""
    var = cache.lookup_record(name) if cache is not None else None
    if var is None:
        try:
            var = link.remote.call(BridgeCalls.get_variable(session_id, name))
        except DSPexError:
            return None
    return is_secret(var.metadata)


def _masked(
    batch: list[Mapping[str, Any]], link: _Link, cache: VariableCache | None, session_id: str
) -> list[Mapping[str, Any]]:
    """The records with each secret variable's value as ``"<secret>"`` (left out when unknown)."""
    known: dict[str, bool | None] = {}
    out: list[Mapping[str, Any]] = []
    for record in batch:
        bindings = record.get("bindings")
        if not isinstance(bindings, Mapping):
            out.append(record)
            continue
        shown: dict[str, Any] = {}
        for attr, binding in bindings.items():
            name = binding.get("variable") if isinstance(binding, Mapping) else None
            if not isinstance(name, str) or "value" not in binding:
                shown[attr] = binding
                continue
            if name not in known:
                known[name] = _secrecy(link, cache, session_id, name)
            secret = known[name]
            if secret is None:
                shown[attr] = {k: v for k, v in binding.items() if k != "value"}  # the version only
            elif secret:
                shown[attr] = {**binding, "value": _SECRET_TEXT}
            else:
                shown[attr] = binding
        out.append({**record, "bindings": shown})
    return out


def _call_sender(
    link: _Link, cache: VariableCache | None, session_id: str
) -> Callable[[list[Mapping[str, Any]]], object]:
    """Sends a batch of call records on the link's current channel (no reference to the client)."""

    def send(batch: list[Mapping[str, Any]]) -> object:
        if link.channel is None:
            raise BridgeUnavailableError("this client was made from a stub without its channel")
        return report_calls(
            link.channel, session_id, _masked(batch, link, cache, session_id), timeout=link.call_timeout
        )

    return send


def _feed_cache(link: _Link, feed: CacheFeed, streams: Streams) -> None:
    """The cache feed thread: the :class:`CacheFeed` machine over blocking streams, until closed.

    It holds no reference to its SessionContext, so an abandoned context can still be collected.
    """
    while not streams.closed:
        feed.opened()
        failure: BaseException | None = None
        stream: Any = None
        paused = False
        with _FORK_PAUSE.inside():
            try:
                stream = link.stub.WatchVariables(feed.request, metadata=(("source", WORKER),))
                streams.add(stream)
                if _FORK_PAUSE.track(stream):
                    _WATCHDOG.guard(stream, feed)
                    for message in stream:
                        if (listing := feed.on_message(message)) is not None:
                            feed.on_listing(link.remote.call(listing))
            except Exception as exc:
                failure = exc
            finally:
                if stream is not None:
                    _WATCHDOG.release(stream)
                    _FORK_PAUSE.untrack(stream)
                    streams.discard(stream)
                    stream.cancel()
                paused = _FORK_PAUSE.forking
        # A stream cancelled for a fork is no outage: the cache stops serving its copy, quietly,
        # and the feed reconnects at once when the fork is done.
        delay = feed.on_end(failure, closed=streams.closed or paused)
        if feed.cache.silence.dead() and not streams.closed:
            link.reopen(inherited=False)  # the connection is dead: do not wait for keepalive to notice
        if streams.wait_closed(delay):
            return


class SessionContext(ClientCore):
    """A worker's blocking, thread-safe handle on one session of a bridge.

    Two ways to make one: ``SessionContext(stub, session_id)`` with a ``BridgeServiceStub`` you
    built (the snakepit form; the cache watches through the same stub), or
    :meth:`SessionContext.connect` with an address (``DSPEX_BRIDGE_ADDRESS`` by default).

    Consistency with the cache on (the default):

    - read-your-writes: after a write returns, reads return that version or newer;
    - read-after-watch: after :meth:`watch_variables` yields an event, cached reads return that
      version or newer for that variable and reflect every write the server applied before it
      (e.g. watch ``optimization_done``; once it is True, ``get_variable("temperature")`` sees
      the temperature written before it). The watch is fed by the cache's own stream.
    - a dead connection is noticed: a cache stream silent for ``silence_timeout`` seconds (the
      server sends a heartbeat after 10 s of silence) stops serving reads at once, is cancelled
      and reconnects (on a new channel when this client opened its own).

    Args:
        stub: a blocking ``snakepit.bridge.BridgeService`` stub.
        session_id: the session to work in.
        address: ``"host:port"`` of the server, needed for pickling and for reconnecting in a
            forked child.
        channel: the channel under ``stub``; closed by :meth:`close` when given.
        **options: ``cache`` (serve reads from a watch-fed local cache, default True),
            ``call_timeout`` (the deadline of each unary call, 10 s), ``reconnect_timeout`` (how
            long :meth:`watch_variables` keeps trying to reconnect before it raises, 30 s; None:
            for ever; the cache itself retries until :meth:`close`), ``silence_timeout`` (seconds
            without any message on the cache's stream after which the connection is taken as
            dead, 30 s; None: never; keep it above the server's heartbeat interval),
            ``report_calls`` (send the provenance of variable-aware module calls to the bridge in
            the background, see :meth:`report_call`; default ``DSPEX_REPORT_CALLS=1`` or off). See
            :class:`~dspex_dspy.client.core.ClientOptions`.

    Example:
        >>> with SessionContext.connect("127.0.0.1:50051", session_id="ctx_1") as ctx:  # doctest: +SKIP
        ...     ctx["temperature"]
        ...     ctx.set_variable("temperature", 0.9)
        0.7
        2
    """

    def __init__(
        self,
        stub: Any,
        session_id: str,
        *,
        address: str | None = None,
        channel: grpc.Channel | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        super().__init__(session_id, address=address, **options)
        self._link = _Link(stub, channel, address, self.call_timeout, self.security)
        self._fork_lock = threading.Lock()
        self._feed: threading.Thread | None = None
        self._reporter: CallReporter | None = None
        self._start_feed()
        self._start_reporter()

    @property
    def stub(self) -> Any:
        """The ``BridgeServiceStub`` in use."""
        return self._link.stub

    def _start_feed(self) -> None:
        if self._cache is None:
            return
        self._feed = threading.Thread(
            target=_feed_cache,
            args=(self._link, CacheFeed(self._cache, self.session_id), self._streams),
            name=f"dspex-cache-{self.session_id[:24]}",
            daemon=True,
        )
        self._feed.start()

    def _start_reporter(self) -> None:
        if not self.reporting_calls:
            return
        self._reporter = CallReporter(
            _call_sender(self._link, self._cache, self.session_id),
            guard=_FORK_PAUSE.inside,
            name=f"dspex-calls-{self.session_id[:24]}",
        )

    def report_call(self, record: Mapping[str, Any]) -> None:
        """Queue a module call record for the bridge (``BridgeAdmin/ReportCalls``), in the background.

        Never blocks and never raises: with reporting off, a closed client, a full queue (1,000
        records) or a bridge that cannot take the report, the record is dropped (a debug log line).
        Records should be JSON mappings of at most 8 KiB; the bridge keeps a session's newest 50.
        """
        if self._reporter is None or self.closed:
            return
        if self._forked():
            try:
                self._adopt()
            except DSPexError:
                return
        if self._reporter is not None:
            self._reporter.put(record)

    @classmethod
    def connect(
        cls, address: str | None = None, session_id: str | None = None, **options: Unpack[ConnectOptions]
    ) -> SessionContext:
        """Connect to the bridge at ``address`` and check that the session exists.

        Args:
            address: ``"host:port"``; defaults to the ``DSPEX_BRIDGE_ADDRESS`` environment variable.
            session_id: the session to work in (an orchestrator context's ``ctx.id``).
            **options: ``timeout`` (seconds to wait for the connection, 5 by default) and the
                options of the class.

        Raises:
            BridgeUnavailableError: no address, or nothing answered within ``timeout``.
            SessionNotFoundError: the bridge has no such session.
        """
        sid = check_session_id(session_id)
        resolved = resolve_address(address)
        timeout, rest = connect_options(options)
        security = resolve_security(
            rest.get("root_certificates"),
            rest.get("token"),
            certificate_chain=rest.get("certificate_chain"),
            private_key=rest.get("private_key"),
        )
        channel = open_channel(
            resolved,
            timeout=timeout,
            options=CLIENT_CHANNEL_OPTIONS,
            root_certificates=security.root_certificates,
            token=security.token,
            certificate_chain=security.certificate_chain,
            private_key=security.private_key,
        )
        ctx = cls(pb_grpc.BridgeServiceStub(channel), sid, address=resolved, channel=channel, **rest)
        try:
            ctx._call(BridgeCalls.get_session(sid))
        except BaseException:
            ctx.close()
            raise
        return ctx

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """End the cache feed and every watch, and close the channel (if this client opened it). Idempotent."""
        if self._streams.closed:
            return
        if self._forked():
            self._streams.cancel_all()  # nothing of the parent's is touched
            return
        self._streams.cancel_all()
        if self._cache is not None:
            self._cache.mark_down()
        if self._reporter is not None:
            self._reporter.close(timeout=self.call_timeout)  # what is queued goes out first
        if self._feed is not None and self._feed is not threading.current_thread():
            self._feed.join(timeout=self.call_timeout)
        self._link.close()

    def _close_at_exit(self) -> None:
        self.close()

    def _adopt(self) -> None:
        """First use in a forked child: a new channel and cache feed (the parent's are left alone)."""
        with self._fork_lock:
            if not self._forked():
                return
            if self.closed:
                self._adopted()
                return
            if not self._link.reopen(inherited=True):
                raise DSPexError(
                    f"this SessionContext (session {self.session_id}) was inherited by a forked process "
                    "from a stub it did not open, so it cannot reconnect: call SessionContext.connect(...) "
                    "in the child, or start workers with the 'spawn' or 'forkserver' method"
                )
            self._adopted()
            self._start_feed()
            self._start_reporter()

    def __enter__(self) -> SessionContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # No blocking work while the interpreter shuts down: a frozen daemon thread may hold a lock
        # that cancelling needs (the atexit hook has closed every live client already).
        streams = self.__dict__.get("_streams")
        if streams is None or streams.closed or finalizing() or self._forked():
            return
        streams.cancel_all()
        reporter = self.__dict__.get("_reporter")
        if reporter is not None:
            reporter.close(timeout=0)

    @classmethod
    def _unpickle(cls, address: str, session_id: str, options: ClientOptions) -> SessionContext:
        """Connect again with the same address, session and options."""
        return cls.connect(address, session_id, **options)

    def __repr__(self) -> str:
        return f"SessionContext(session_id={self.session_id!r}, address={self.address!r}, {self._state_text()})"

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until the cache serves reads (or ``timeout`` seconds pass); False if it did not.

        Always False with ``cache=False``.
        """
        return self._block(self._synced_or_closed, timeout) and self.cache_synced

    def wait_cached(self, name: str, version: int, timeout: float | None = None) -> bool:
        """Block until the cache serves ``name`` at ``version`` or later; False on timeout."""
        return self._block(self._arrived(name, version), timeout)

    def _block(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        if self._forked():
            self._adopt()
        return self._cache is not None and self._cache.wait(predicate, timeout) and not self.closed

    # ------------------------------------------------------------------ running operations

    def _call(self, call: BridgeCall[_T]) -> _T:
        if self._forked():
            self._adopt()
        return self._link.remote.call(call)

    def _run(self, op: Op[_T]) -> _T:
        if self._forked():
            self._adopt()
        return op.finish(None if op.call is None else self._link.remote.call(op.call))

    # ------------------------------------------------------------------ reads

    def get_variable_record(self, name: str) -> Variable:
        """The whole :class:`~dspex_dspy.types.Variable` record of ``name`` (cache first)."""
        return self._run(self._record_op(name))

    def get_versioned(self, name: str) -> tuple[Any, int]:
        """``(value, version)`` of a variable: from the cache when it is synced and fresh, else the server.

        Raises:
            VariableNotFoundError: no such variable.
        """
        return self._hit(name) or self._run(self._versioned_op(name))

    def get_versioned_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """``{name: (value, version)}`` of several variables, all from one state of the session.

        Served from one snapshot of the cache when it is synced and fresh for every name, else by
        one ``GetVariables`` call (the server answers it under one lock). The stream carries the
        writes of one atomic batch as one update per variable, and the cache applies them one by
        one: a cached snapshot is a state of the cache, which may fall between two variables of
        one batch for the instant between their two messages.

        Raises:
            VariableNotFoundError: naming every variable that does not exist.
        """
        return self._run(self._versioned_many_op(names))

    def get_variable(self, name: str) -> Any:
        """The current value of a variable (``ctx[name]`` does the same).

        Raises:
            VariableNotFoundError: no such variable.
        """
        return (self._hit(name) or self._run(self._versioned_op(name)))[0]

    def __getitem__(self, name: str) -> Any:
        return (self._hit(name) or self._run(self._versioned_op(name)))[0]

    def has_variable(self, name: str) -> bool:
        """Whether the session has a variable of that name (or id)."""
        return self._run(self._has_op(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.has_variable(name)

    def get_variables(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of several variables, in one round trip when the cache cannot answer them all.

        Raises:
            VariableNotFoundError: naming every variable that does not exist.
        """
        return self._run(self._values_op(names))

    def list_variables(self, pattern: str | None = None) -> list[Variable]:
        """The session's variables in creation order (always from the server); ``pattern`` is a ``*`` glob."""
        return self._run(self._list_op(pattern))

    # ------------------------------------------------------------------ writes

    def register_variable(self, name: str, type: str, value: Any, **options: Unpack[DefineOptions]) -> str:
        """Define a new variable in the session and return its id.

        Args:
            name: a new name (letters, digits, ``_``; not starting with a digit).
            type: a variable type (``float``, ``integer``, ``string``, ``boolean``, ``choice``, ...).
            value: its first value.
            **options: ``constraints``, ``description``, ``metadata``.

        Raises:
            VariableExistsError: the name is taken.
            ValidationError: bad name, type, constraints or value.
        """
        return self._run(self._register_op(name, type, value, options))

    def set_variable(self, name: str, value: Any, *, metadata: Meta = None, expected_version: int | None = None) -> int:
        """Write a variable and return its new version; the cache shows the write at once.

        Args:
            name: the variable's name (or id).
            value: the new value (checked by the server against the type and constraints).
            metadata: ``str -> str`` describing this write: kept in its history entry, sent to
                watchers and shown on this version only (it never sticks to later versions).
            expected_version: a non-zero version makes the write a compare-and-swap.

        Raises:
            ValidationError: the value is rejected; nothing changed.
            VersionConflictError: ``expected_version`` is not the current version; nothing changed.
            VariableNotFoundError: no such variable.
        """
        return self._run(self._set_op(name, value, metadata, expected_version))

    def update_variable(
        self, name: str, value: Any, *, metadata: Meta = None, expected_version: int | None = None
    ) -> int:
        """Deprecated alias of :meth:`set_variable` (it *sets*; :meth:`update` is read-modify-write).

        Kept for one release; it warns with a :class:`DeprecationWarning`.
        """
        deprecated("update_variable", "set_variable")
        return self._run(self._set_op(name, value, metadata, expected_version))

    def update_variables(
        self, updates: Mapping[str, Any], *, atomic: bool = True, metadata: Meta = None
    ) -> dict[str, int]:
        """Deprecated alias of :meth:`set_variables` (kept for one release; it warns)."""
        deprecated("update_variables", "set_variables")
        return self._run(self._batch_op(updates, atomic, metadata))

    def set_variables(
        self, updates: Mapping[str, Any], *, atomic: bool = True, metadata: Meta = None
    ) -> dict[str, int]:
        """Write several variables; return ``{name: new version}``.

        Args:
            updates: name -> new value.
            atomic: all or nothing (default); False applies every write that is valid.
            metadata: merged into each written variable's metadata.

        Raises:
            BatchUpdateError: some writes were rejected; ``.errors`` maps each to its error and
                ``.new_versions`` lists the writes applied (none when atomic).
        """
        return self._run(self._batch_op(updates, atomic, metadata))

    def delete_variable(self, name: str) -> None:
        """Delete a variable (watchers see ``deleted``).

        Raises:
            VariableNotFoundError: no such variable.
        """
        self._run(self._delete_op(name))

    def start_optimization(
        self, names: Sequence[str], optimizer_id: str, *, ttl: float = DEFAULT_LEASE_SECONDS
    ) -> OptimizationLease:
        """Take (or renew) an optimization lease on ``names``; see ``Variables.start_optimization``.

        Raises:
            VariableLockedError: another optimizer holds one of the variables (nothing changes).
        """
        return self._run(self._start_optimization_op(names, optimizer_id, ttl))

    def stop_optimization(self, lease: OptimizationLease | str, *, force: bool = False) -> None:
        """End a lease (the lease or its id), or with ``force=True`` the lease holding a variable."""
        self._run(self._stop_optimization_op(lease, force))

    # ------------------------------------------------------------------ watching

    def watch_variables(self, names: Iterable[str] | None = None, include_initial: bool = True) -> VariableWatch:
        """Iterate over changes of some variables (None: all), across reconnects, without repeats.

        Args:
            names: names or ids to watch; None or empty watches every variable, including new ones.
            include_initial: first yield each variable's current value (``initial_value``).

        Returns:
            A :class:`VariableWatch`: iterate it; stop it with ``close()`` (from any thread),
            by closing this context, or by leaving its ``with`` block.

        With the cache on, the watch is fed by the cache's stream (read-after-watch: once an event
        is yielded, cached reads are at least as new, for every variable). A watched name that is
        deleted is reported ``deleted``; a variable created again under it is a new incarnation,
        followed with the cache on or off.

        Example:
            >>> with ctx.watch_variables(["temperature"]) as watch:  # doctest: +SKIP
            ...     for event in watch:
            ...         print(event.name, event.value, event.version)
        """
        if self._forked():
            self._adopt()
        return VariableWatch(self, list(names or ()), include_initial)

    # ------------------------------------------------------------------ history, rollback, update, watch

    def history(self, name: str, limit: int = 0) -> list[HistoryEntry]:
        """The variable's remembered writes, newest first (``limit`` > 0 keeps that many).

        Each entry has the version, value, timestamp, writer and the metadata of that write.
        """
        return self._call(BridgeCalls.get_history(self.session_id, name, limit))

    def rollback(self, name: str, version: int) -> int:
        """Write the value the variable had at a remembered ``version`` as a new version; return it.

        Raises:
            ValidationError: ``version`` is not in the remembered history (nothing changes).
        """
        var = self._call(BridgeCalls.rollback_variable(self.session_id, name, version, source=WORKER))
        return self._written(name, var.version, var.value, None)

    def update(self, name: str, fn: Callable[[Any], Any], *, max_attempts: int = 64) -> int:
        """Atomically replace the value with ``fn(value)``; return the new version.

        A compare-and-swap loop with jittered backoff: concurrent writers (in any process) never
        lose an update. ``fn`` may run more than once, so it must have no side effects.

        Raises:
            VersionConflictError: ``max_attempts`` attempts all lost the race.
        """

        def read(attempt: int) -> tuple[Any, int]:
            if attempt == 0:
                return self.get_versioned(name)
            var = self._call(BridgeCalls.get_variable(self.session_id, name))
            return detached(var.value), var.version

        return cas_update(
            name,
            read,
            lambda value, version: self.set_variable(name, value, expected_version=version),
            fn,
            max_attempts=max_attempts,
        )

    def watch(
        self,
        names: Iterable[str] | None = None,
        *,
        callback: Callable[[WatchEvent], Any] | None = None,
        include_initial: bool = True,
    ) -> VariableWatch | CallbackWatch:
        """Watch some variables (None: all): an iterator, or with ``callback`` a running thread.

        Watches coalesce (a slow reader gets the latest value of each variable, not every write);
        the change log is :meth:`history`. See :meth:`watch_variables`.
        """
        events = self.watch_variables(names, include_initial)
        if callback is None:
            return events
        return CallbackWatch(events, callback, name=f"dspex-watch-{self.session_id[:24]}")


class VariableWatch(Iterator[WatchEvent]):
    """The iterator :meth:`SessionContext.watch_variables` returns (see there).

    Per variable it yields strictly increasing versions and never a repeat, also across broken
    streams and server restarts, and after a resync the last event of each variable is its latest
    value. It raises :class:`VariableNotFoundError` for a watched name the session does not have,
    :class:`SessionNotFoundError` if the session goes away on a live server, and the last error if
    reconnecting takes longer than the context's ``reconnect_timeout``. With the cache on it never
    runs ahead of the cache (see :class:`SessionContext`).
    """

    def __init__(self, ctx: SessionContext, identifiers: list[str], include_initial: bool) -> None:
        self._ctx = ctx
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        machine = self._machine = ctx._watch_machine(identifiers, include_initial)
        self._events = self._run_cached(machine) if isinstance(machine, CachedWatch) else self._run_stream(machine)

    def __iter__(self) -> VariableWatch:
        return self

    def __next__(self) -> WatchEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop the watch (thread-safe; iteration then ends). Idempotent."""
        self._stop.set()
        with self._lock:
            stream, machine = self._stream, self._machine
        if stream is not None:
            stream.cancel()
        if isinstance(machine, CachedWatch):
            machine.cache.release(machine.sub)  # wakes a reader waiting in another thread
        with contextlib.suppress(ValueError):  # running in another thread: the cancelled stream ends it
            self._events.close()

    def __enter__(self) -> VariableWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stopped(self) -> bool:
        return self._stop.is_set() or self._ctx.closed

    def _check(self, machine: CachedWatch, call: BridgeCall[Listing] | None) -> None:
        if call is not None:
            try:
                machine.checked(self._ctx._call(call))
            except BridgeUnavailableError:
                machine.checked(None)

    def _run_cached(self, machine: CachedWatch) -> Generator[WatchEvent, None, None]:
        """Events from the cache's own stream (the :class:`CachedWatch` machine)."""
        if self._stopped():
            return
        self._check(machine, machine.start())
        try:
            while not self._stopped():
                step = machine.step()
                if step.woken is not None:
                    machine.cache.wait(step.woken(self._stopped), step.wait)
                    continue
                self._check(machine, step.check)
                for event in step.events:
                    if self._stopped():
                        return
                    yield event
        finally:
            machine.stop()

    def _run_stream(self, machine: StreamWatch) -> Generator[WatchEvent, None, None]:
        """Events from a stream of the watch's own (the :class:`StreamWatch` machine)."""
        ctx = self._ctx
        while not self._stopped():
            failure: BaseException | None = None
            stream: Any = None
            try:
                if (check := machine.opened()) is not None:
                    machine.checked(ctx._call(check))
                stream = ctx.stub.WatchVariables(machine.request, metadata=(("source", WORKER),))
                with self._lock:
                    self._stream = stream
                ctx._streams.add(stream)
                for message in stream:
                    events, listing = machine.on_message(message)
                    yield from events
                    if listing is not None:
                        yield from machine.on_listing(ctx._call(listing))
            except ValueError as exc:  # the channel was closed under us
                if self._stopped():
                    return
                raise BridgeUnavailableError(f"the connection to the bridge is closed: {exc}") from exc
            except (grpc.RpcError, DSPexError) as exc:
                failure = exc
            finally:
                with self._lock:
                    self._stream = None
                if stream is not None:
                    ctx._streams.discard(stream)
                    stream.cancel()
            if self._stopped() or self._stop.wait(machine.on_end(failure)):
                return
