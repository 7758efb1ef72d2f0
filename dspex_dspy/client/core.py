"""What the blocking and the asyncio clients share: identity, options, channel settings, the cache,
every operation described without I/O, and the process-wide lifecycle (exit and fork).

An operation is an :class:`Op`: either answered already (from the cache) or one unary call to
make plus what to do with its answer (update the cache, shape the result). A driver runs it with
one line (``op.finish(call result)``), blocking or awaiting, so no operation is written twice.

Lifecycle: every live client is remembered (weakly). An ``atexit`` hook closes them while the
interpreter's threads still run, so no stream is cancelled during finalization, when a frozen
daemon thread may hold a lock it needs (``__del__`` does no blocking work then). An at-fork hook
makes every client in a forked child drop what it inherited (channels, streams, locks, the cache's
contents) without touching it: the child reconnects lazily on its first call.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, Generic, TypedDict, TypeVar, cast

from dspex_dspy.client.cache import WORKER, CacheState, VariableCache
from dspex_dspy.client.events import detached
from dspex_dspy.client.feed import CachedWatch, StreamWatch
from dspex_dspy.client.policy import DEFAULT_RECONNECT_TIMEOUT, DEFAULT_SILENCE_TIMEOUT
from dspex_dspy.errors import BatchUpdateError, BridgeUnavailableError, ValidationError, VariableNotFoundError
from dspex_dspy.leases import OptimizationLease
from dspex_dspy.records import BatchResult
from dspex_dspy.remote import CHANNEL_OPTIONS, DEFAULT_CALL_TIMEOUT, BridgeCall, BridgeCalls, registered_variable
from dspex_dspy.tls import Pem, resolve_security
from dspex_dspy.types import Variable, normalize_metadata

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ADDRESS_ENV",
    "REPORT_CALLS_ENV",
    "CLIENT_CHANNEL_OPTIONS",
    "ClientCore",
    "ClientOptions",
    "ConnectOptions",
    "Op",
    "Streams",
    "Unpack",
]

logger = logging.getLogger("dspex_dspy.client")

ADDRESS_ENV: Final = "DSPEX_BRIDGE_ADDRESS"
"""The environment variable naming the bridge address when ``connect`` is given none."""

REPORT_CALLS_ENV: Final = "DSPEX_REPORT_CALLS"
"""Set to ``1`` to have worker clients report module call provenance (see ``report_calls``)."""

MAX_RECEIVE_BYTES: Final = 64 * 1024 * 1024
"""The largest message a worker client accepts: above what a bridge sends (16 MiB by default)."""

KEEPALIVE_TIME_MS: Final = 10_000
KEEPALIVE_TIMEOUT_MS: Final = 5_000

CLIENT_CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    *CHANNEL_OPTIONS,
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)
"""Channel options of the worker clients: while a call is open (the cache's watch always is) a
ping every 10 s that must be answered within 5 s (a bridge permits one every 5 s, see
:func:`dspex_dspy.server.create_server`), so a connection whose peer vanished without a reset is
closed within about 15 s; messages up to 64 MiB (a bridge sends up to 16 MiB by default)."""

_T = TypeVar("_T")
_C = TypeVar("_C", bound="ClientCore")
_Meta = Mapping[str, Any] | None
Meta = _Meta
"""Metadata or constraints as callers give them: ``str -> value`` (None: none)."""


def resolve_address(address: str | None) -> str:
    """``address``, or the ``DSPEX_BRIDGE_ADDRESS`` environment variable."""
    resolved = address or os.environ.get(ADDRESS_ENV, "")
    if not resolved:
        raise BridgeUnavailableError(
            f"no bridge address: pass address='host:port' or set the {ADDRESS_ENV} environment variable"
        )
    return resolved


def check_session_id(session_id: object) -> str:
    """``session_id`` if it is a non-empty string."""
    if not isinstance(session_id, str) or not session_id:
        raise ValidationError("", "session_id", session_id, "a session id (a non-empty string) is required")
    return session_id


class Streams:
    """The open streaming calls of one client, so that ``close()`` can cancel them all."""

    def __init__(self, closed: bool = False) -> None:
        self._lock = threading.Lock()
        self._open: set[Any] = set()
        self._closed = threading.Event()
        if closed:
            self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking early (and returning True) if the client closes."""
        return self._closed.wait(timeout)

    def add(self, call: Any) -> None:
        with self._lock:
            if not self._closed.is_set():
                self._open.add(call)
                return
        call.cancel()

    def discard(self, call: Any) -> None:
        with self._lock:
            self._open.discard(call)

    def cancel_all(self) -> None:
        with self._lock:
            self._closed.set()
            calls, self._open = list(self._open), set()
        for call in calls:
            call.cancel()


class ClientOptions(TypedDict, total=False):
    """The options both worker clients take (keyword arguments of their constructors and ``connect``).

    Attributes:
        cache: serve reads from a watch-fed local cache (default True).
        call_timeout: the deadline of each unary call, in seconds (default 10).
        reconnect_timeout: how long ``watch_variables`` keeps trying to reconnect before it raises
            (None: for ever; default 30 s). The cache itself retries until the client closes.
        silence_timeout: seconds without any message (not even a heartbeat) on the cache's stream
            after which the connection is taken as dead (None: never; default 30 s; keep it above
            the server's heartbeat interval, 10 s by default).
        root_certificates: PEM roots to trust (bytes, text or a path; default ``DSPEX_BRIDGE_CA``):
            the client's channels use TLS.
        token: a bearer token sent on every call (default ``DSPEX_BRIDGE_TOKEN``).
        certificate_chain: a client certificate (PEM), for bridges that require mutual TLS.
        private_key: the key of that client certificate.
        report_calls: report the provenance of each call of a variable-aware module bound to this
            client to the bridge, in the background (default False, or ``DSPEX_REPORT_CALLS=1``;
            the blocking client only).
    """

    cache: bool
    call_timeout: float
    reconnect_timeout: float | None
    silence_timeout: float | None
    root_certificates: Pem | None
    token: str | None
    certificate_chain: Pem | None
    private_key: Pem | None
    report_calls: bool


class ConnectOptions(ClientOptions, total=False):
    """What ``connect`` takes besides the address and the session: the client options and ``timeout``.

    Attributes:
        timeout: seconds to wait for the connection (default 5).
    """

    timeout: float


class DefineOptions(TypedDict, total=False):
    """The optional parts of a new variable (keyword arguments of ``register_variable``).

    Attributes:
        constraints: the type's constraints (``min``/``max``, ``choices``, ...).
        description: a text for people.
        metadata: ``str -> str`` kept with the variable.
    """

    constraints: Mapping[str, Any] | None
    description: str | None
    metadata: Mapping[str, Any] | None


def connect_options(options: ConnectOptions) -> tuple[float, ClientOptions]:
    """``(timeout, the client options)`` of ``connect``'s keyword arguments."""
    rest = {key: value for key, value in options.items() if key != "timeout"}
    return float(options.get("timeout", 5.0)), cast(ClientOptions, rest)


class Op(Generic[_T]):
    """One client operation: a unary call to make (None: answered from the cache) and its finish.

    Attributes:
        call: the call, or None when ``finish(None)`` already has the answer.
        finish: turns the call's result (None without a call) into the operation's result.
    """

    __slots__ = ("call", "finish")

    def __init__(self, call: BridgeCall[Any] | None, finish: Callable[[Any], _T]) -> None:
        self.call = call
        self.finish = finish


def _same(result: _T) -> _T:
    return result


def _record(var: Variable) -> Variable:
    return replace(var, value=detached(var.value)) if isinstance(var.value, (list, dict)) else var


class ClientCore:
    """Identity, options, the cache, and every operation as an :class:`Op` (no I/O here)."""

    def __init__(
        self,
        session_id: str,
        *,
        address: str | None,
        cache: bool = True,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        reconnect_timeout: float | None = DEFAULT_RECONNECT_TIMEOUT,
        silence_timeout: float | None = DEFAULT_SILENCE_TIMEOUT,
        root_certificates: Pem | None = None,
        token: str | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        report_calls: bool | None = None,
    ) -> None:
        if call_timeout <= 0:
            raise ValueError(f"call_timeout must be positive, got {call_timeout}")
        self.session_id = check_session_id(session_id)
        self.address = address
        self.call_timeout = float(call_timeout)
        self.reconnect_timeout = reconnect_timeout
        self.silence_timeout = silence_timeout
        # How every channel this client opens (first, after a fork, after a dead stream) is secured.
        self.security = resolve_security(
            root_certificates, token, certificate_chain=certificate_chain, private_key=private_key
        )
        self._cache = VariableCache(silence_timeout) if cache else None
        # Opt-in: report module call provenance (the environment decides when the caller does not).
        self.reporting_calls = (
            bool(report_calls) if report_calls is not None else os.environ.get(REPORT_CALLS_ENV, "") == "1"
        )
        self._streams = Streams()
        self._generation = _FORKS[0]
        _LIVE.add(self)

    @property
    def cache_enabled(self) -> bool:
        """Whether reads may be served from the watch-fed cache."""
        return self._cache is not None

    @property
    def cache_synced(self) -> bool:
        """Whether the cache is live and serving reads now."""
        return self._cache is not None and self._cache.synced

    @property
    def cache_state(self) -> CacheState:
        """``synced`` / ``syncing`` / ``down`` / ``disabled`` (see :class:`~.cache.CacheState`)."""
        if self._cache is None or self.closed:
            return CacheState.DISABLED
        return self._cache.state

    @property
    def closed(self) -> bool:
        """True once the client was closed."""
        return self._streams.closed

    def cached(self, name: str) -> tuple[Any, int] | None:
        """``(value, version)`` of ``name`` from the cache alone; None if not cached, not fresh or not synced.

        Never performs I/O (safe from any thread).
        """
        var = self._cache.lookup(name) if self._cache is not None else None
        return (detached(var.value), var.version) if var is not None else None

    def _options(self) -> ClientOptions:
        return {
            "cache": self._cache is not None,
            "call_timeout": self.call_timeout,
            "reconnect_timeout": self.reconnect_timeout,
            "silence_timeout": self.silence_timeout,
            "root_certificates": self.security.root_certificates,
            "token": self.security.token,
            "certificate_chain": self.security.certificate_chain,
            "private_key": self.security.private_key,
            "report_calls": self.reporting_calls,
        }

    @classmethod
    def _unpickle(cls, address: str, session_id: str, options: ClientOptions) -> ClientCore:
        raise NotImplementedError

    def __reduce__(self) -> tuple[Callable[..., ClientCore], tuple[str, str, ClientOptions]]:
        """Pickling stores the address, session id and options; unpickling connects again."""
        if self.address is None:
            raise TypeError(
                f"cannot pickle a {type(self).__name__} made from a stub without an address: "
                "pass address='host:port' when creating it (or use connect())"
            )
        return type(self)._unpickle, (self.address, self.session_id, self._options())

    def __copy__(self: _C) -> _C:
        """Copies share the live session (DSPy optimizers deep-copy modules)."""
        return self

    def __deepcopy__(self: _C, memo: dict[int, Any]) -> _C:
        return self

    def _state_text(self) -> str:
        return "closed" if self.closed else ("synced" if self.cache_synced else "live")

    def _synced_or_closed(self) -> bool:
        return self.closed or self.cache_synced

    def _arrived(self, name: str, version: int) -> Callable[[], bool]:
        """A condition: the cache serves ``name`` at ``version`` or later (or the client closed)."""

        def arrived() -> bool:
            var = self._lookup(name)
            return self.closed or (var is not None and var.version >= version)

        return arrived

    def _watch_machine(self, identifiers: Sequence[str], include_initial: bool) -> CachedWatch | StreamWatch:
        """The machine of a new watch: fed by the cache, or by a stream of its own without one."""
        if self._cache is not None:
            return CachedWatch(self._cache, self.session_id, identifiers, include_initial, self.reconnect_timeout)
        return StreamWatch(self.session_id, identifiers, include_initial, self.reconnect_timeout)

    def _type_hint(self, name: str) -> str | None:
        return self._cache.type_of(name) if self._cache is not None else None

    # ------------------------------------------------------------------ lifecycle hooks

    def _forked(self) -> bool:
        """Whether this client was inherited by a forked child (its transport is the parent's)."""
        return self._generation != _FORKS[0]

    def _adopted(self) -> None:
        """This client now belongs to the current process."""
        self._generation = _FORKS[0]

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's streams and cache state (never touch them)."""
        self._streams = Streams(closed=self._streams.closed)
        if self._cache is not None:
            self._cache.after_fork()

    def _close_at_exit(self) -> None:
        """Close while the interpreter's threads still run (the ``atexit`` hook)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ operations

    def _lookup(self, name: str) -> Variable | None:
        return self._cache.lookup(name) if self._cache is not None else None

    def _hit(self, name: str) -> tuple[Any, int] | None:
        """``(value, version)`` when the cache serves ``name`` in this process (the fast path of reads)."""
        cache = self._cache
        if cache is None or self._generation != _FORKS[0]:
            return None
        var = cache.lookup(name)
        return None if var is None else (detached(var.value), var.version)

    def _record_op(self, name: str) -> Op[Variable]:
        var = self._cache.lookup_record(name) if self._cache is not None else None
        if var is not None:
            return Op(None, lambda _: _record(var))
        return Op(BridgeCalls.get_variable(self.session_id, name), _record)

    def _versioned_op(self, name: str) -> Op[tuple[Any, int]]:
        var = self._lookup(name)
        if var is not None:
            return Op(None, lambda _: (detached(var.value), var.version))
        return Op(BridgeCalls.get_versioned(self.session_id, name), lambda got: got)

    def _has_op(self, name: str) -> Op[bool]:
        if self._lookup(name) is not None:
            return Op(None, lambda _: True)
        return Op(BridgeCalls.get_variables(self.session_id, [name]), lambda answer: not answer[1])

    def _many_op(self, names: Iterable[str], shape: Callable[[Variable], _T]) -> Op[dict[str, _T]]:
        """Several variables from one cache snapshot, or from one ``GetVariables`` call."""
        wanted = list(dict.fromkeys(names))
        hit = self._cache.lookup_many(wanted) if self._cache is not None else None
        if hit is not None:
            return Op(None, lambda _: {name: shape(var) for name, var in hit.items()})

        def finish(answer: tuple[Mapping[str, Variable], Sequence[str]]) -> dict[str, _T]:
            found, missing = answer
            if missing:
                raise VariableNotFoundError(", ".join(missing), self.session_id)
            return {name: shape(found[name]) for name in wanted}

        return Op(BridgeCalls.get_variables(self.session_id, wanted), finish)

    def _values_op(self, names: Iterable[str]) -> Op[dict[str, Any]]:
        return self._many_op(names, lambda var: detached(var.value))

    def _versioned_many_op(self, names: Iterable[str]) -> Op[dict[str, tuple[Any, int]]]:
        return self._many_op(names, lambda var: (detached(var.value), var.version))

    def _list_op(self, pattern: str | None) -> Op[list[Variable]]:
        return Op(BridgeCalls.list_variables(self.session_id, pattern), list)

    def _register_op(self, name: str, type_: str, value: Any, options: DefineOptions) -> Op[str]:
        constraints, metadata = options.get("constraints"), options.get("metadata")
        description = options.get("description")
        call = BridgeCalls.register_variable(
            self.session_id,
            name,
            type_,
            value,
            constraints=constraints,
            description=description or "",
            metadata=metadata,
            source=WORKER,
        )

        def finish(var_id: str) -> str:
            if self._cache is not None:
                self._cache.own_register(
                    registered_variable(var_id, name, type_, value, constraints, description, metadata, WORKER)
                )
            return var_id

        return Op(call, finish)

    def _written(self, name: str, version: int, value: Any, metadata: _Meta) -> int:
        if self._cache is not None:
            self._cache.own_write(name, version, value, normalize_metadata(name, metadata))
        return version

    def _set_op(self, name: str, value: Any, metadata: _Meta, expected_version: int | None) -> Op[int]:
        call = BridgeCalls.set_variable(
            self.session_id,
            name,
            value,
            type_hint=self._type_hint(name),
            metadata=metadata,
            expected_version=expected_version,
            source=WORKER,
        )
        return Op(call, lambda version: self._written(name, version, value, metadata))

    def _batch_op(self, updates: Mapping[str, Any], atomic: bool, metadata: _Meta) -> Op[dict[str, int]]:
        hints = {name: hint for name in updates if (hint := self._type_hint(name)) is not None}
        call = BridgeCalls.set_variables(
            self.session_id, updates, type_hints=hints, metadata=metadata, atomic=atomic, source=WORKER
        )

        def finish(result: BatchResult) -> dict[str, int]:
            for name, version in result.new_versions.items():
                self._written(name, version, updates[name], metadata)
            if result.errors:
                raise BatchUpdateError(result.errors, result.new_versions)
            return dict(result.new_versions)

        return Op(call, finish)

    def _start_optimization_op(self, names: Sequence[str], optimizer_id: str, ttl: float) -> Op[OptimizationLease]:
        return Op(BridgeCalls.start_optimization(self.session_id, list(names), optimizer_id, ttl=ttl), _same)

    def _stop_optimization_op(self, lease: OptimizationLease | str, force: bool) -> Op[None]:
        target = lease.id if isinstance(lease, OptimizationLease) else lease
        return Op(BridgeCalls.stop_optimization(self.session_id, target, force=force), _same)

    def _delete_op(self, name: str) -> Op[None]:
        def finish(_: None) -> None:
            if self._cache is not None:
                self._cache.own_delete(name)

        return Op(BridgeCalls.delete_variable(self.session_id, name, source=WORKER), finish)


# --------------------------------------------------------------------------------------------
# Process-wide lifecycle: exit and fork
# --------------------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[ClientCore] = weakref.WeakSet()
_FORKS = [0]  # how many forks lie between the first process and this one (cheaper than getpid)


def live_clients() -> list[ClientCore]:
    """The clients of this process not yet collected (closed or not)."""
    return list(_LIVE)


@atexit.register
def _close_all_at_exit() -> None:
    """Close every live client while threads still run (registered after grpc's own exit hooks, so it runs first)."""
    for client in live_clients():
        if client.closed or client._forked():
            continue
        try:
            client._close_at_exit()
        except Exception:  # pragma: no cover - best effort at exit
            logger.debug("closing %r at exit failed", client, exc_info=True)


def _after_fork_in_child() -> None:
    _FORKS[0] += 1
    for client in live_clients():
        client._after_fork()


def finalizing() -> bool:
    """Whether the interpreter is shutting down (no blocking work in ``__del__`` then)."""
    return sys.is_finalizing()


os.register_at_fork(after_in_child=_after_fork_in_child)
