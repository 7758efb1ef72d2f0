"""Context: a named set of variables that starts local and moves to a bridge when Python needs it.

A :class:`Context` begins on :class:`~dspex_dspy.state.LocalState`. :meth:`Context.ensure_bridged`
(or registering a program that needs Python) moves it to :class:`~dspex_dspy.state.BridgedState`:
every variable is exported, imported into a session of a SessionStore under the context's id, and
only then is the local copy dropped. Readers and writers are not held while the import runs; a
write that lands meanwhile is detected by the local state's write counter and the import is redone
(the last try holds writers, never readers), so no write is lost. A failure at any step leaves the
context local with every value intact.

A context reads like a worker's ``SessionContext`` (``get_variable``, ``get_versioned``,
``get_versioned_many``, ``has_variable`` ...): both satisfy :class:`~dspex_dspy.reader.VariableReader`,
which is what variable-aware modules read through.

The bridge is the embedded one by default (started lazily in this process on an ephemeral
loopback port), or a running ``dspex-bridge serve`` named by ``bridge="host:port"``. A bridge that
takes tokens is reached with ``token=`` (or ``DSPEX_BRIDGE_TOKEN``), or with the fleet's secret
(``auth_secret=`` or the file named by ``DSPEX_BRIDGE_SECRET_FILE``), from which the context signs
its own token and :meth:`Context.worker_token` signs narrower ones for its workers.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from dspex_dspy._gc import collector_paused
from dspex_dspy.display import VariableList, context_html, context_text
from dspex_dspy.errors import (
    BridgeUnavailableError,
    DSPexError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
)
from dspex_dspy.state import BridgedState, LocalState, StateProvider
from dspex_dspy.types import Variable

__all__ = ["SECRET_FILE_ENV", "BackendInfo", "Context", "SwitchEvent", "program_requires_python"]

logger = logging.getLogger(__name__)

SECRET_FILE_ENV = "DSPEX_BRIDGE_SECRET_FILE"
"""Path of the fleet's token secret, read by a context that was given no ``auth_secret``."""
_OWN_TOKEN_TTL = 24 * 3600.0
_OWN_PERMS = ("read", "write", "watch", "optimize")
_WORKER_PERMS = frozenset(_OWN_PERMS)
#: Imports tried while writers keep going before the last try, which holds writers (never readers).
_OPTIMISTIC_SWITCH_TRIES = 3

_PYTHON_TYPES = frozenset({"dspy", "python"})
_CLEANUP_TIMEOUT = 2.0


@dataclass(frozen=True)
class SwitchEvent:
    """One backend switch of a context."""

    from_backend: str
    to_backend: str
    at: float
    variables: int
    duration_s: float
    reason: str


@dataclass(frozen=True)
class BackendInfo:
    """What :meth:`Context.get_backend` reports.

    Attributes:
        type: ``"local"`` or ``"bridged"``.
        module: the provider class (:class:`LocalState` or :class:`BridgedState`).
        switches: how many times the context switched backend.
        history: the switches, oldest first.
        capabilities: what the current backend offers.
    """

    type: str
    module: builtins.type
    switches: int
    history: tuple[SwitchEvent, ...]
    capabilities: frozenset[str]


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else getattr(value, "name", str(value))


def program_requires_python(spec: Mapping[str, Any]) -> bool:
    """Whether a program spec needs Python workers (and so a bridged context).

    True when ``requires_python`` is true, ``type`` is ``dspy`` or ``python``, ``adapter``
    contains ``"Python"``, or a ``modules`` entry has type ``dspy``/``python`` or a ``class``
    naming DSPy.

    Example:
        >>> program_requires_python({"type": "dspy"})
        True
        >>> program_requires_python({"type": "native", "modules": [{"class": "Tokenizer"}]})
        False
    """
    if spec.get("requires_python") is True:
        return True
    if _as_text(spec.get("type", "")).lower() in _PYTHON_TYPES:
        return True
    if "python" in _as_text(spec.get("adapter", "")).lower():
        return True
    for module in spec.get("modules") or ():
        if not isinstance(module, Mapping):
            continue
        if _as_text(module.get("type", "")).lower() in _PYTHON_TYPES:
            return True
        if "dspy" in _as_text(module.get("class", "")).lower():
            return True
    return False


KEEPALIVE_MAX_INTERVAL = 30.0
"""Longest pause between two heartbeats of an open bridged context (a third of the TTL if shorter)."""


def _keep_alive(
    store: Any, session_id: str, interval: float, stop: threading.Event, owner: weakref.ref[Context]
) -> None:
    """Heartbeat ``session_id`` every ``interval`` s until ``stop`` is set or the context is collected.

    It holds only a weak reference to its context: a context dropped without ``stop()`` stops
    keeping its session alive, which then expires as any idle session.
    """
    warned = False
    while not stop.wait(interval):
        if owner() is None:
            return
        try:
            alive = store.heartbeat(session_id)
        except DSPexError as exc:
            logger.debug("heartbeat of session %s failed: %s", session_id, exc)
            continue
        if not alive and not warned:
            logger.warning(
                "session %s is gone from the bridge (deleted by its owner, or the bridge lost it)", session_id
            )
            warned = True


class _Stopped:
    """Stands in for the provider of a stopped context: every use raises a clear error."""

    kind = "stopped"
    requires_bridge = False
    capabilities: frozenset[str] = frozenset()

    def __init__(self, context_id: str) -> None:
        self.context_id = context_id

    def __getattr__(self, name: str) -> Any:
        raise DSPexError(f"context {self.context_id} is stopped")


class Context:
    """Variables for one program run, local first and bridged when Python workers need them.

    Args:
        session_id: the context's id (and its session id once bridged); an unguessable
            ``"ctx_" + hex`` id when omitted.
        backend: ``"local"`` (default) or ``"bridged"`` (bridge right away).
        bridge: None for the embedded bridge, or ``"host:port"`` of a running bridge server.
        root_certificates: PEM roots (bytes, text or a path) that the remote bridge's certificate
            chains to: the connection uses TLS (default: ``DSPEX_BRIDGE_CA``).
        token: a bearer token for a remote bridge that takes tokens (default: ``DSPEX_BRIDGE_TOKEN``).
        auth_secret: the fleet's token secret (default: the file named by ``DSPEX_BRIDGE_SECRET_FILE``).
            Without ``token``, the context signs itself a token for its own session (sub
            ``"orchestrator"``, valid 24 h); it also lets :meth:`worker_token` sign worker tokens.

    Example:
        >>> from dspex_dspy import Context, Variables
        >>> with Context() as ctx:
        ...     _ = Variables.defvariable(ctx, "temperature", "float", 0.7)
        ...     ctx.get_backend().type
        'local'
    """

    #: Seconds a switch to a remote bridge may take in all (session, every import, and the
    #: clean-up of a failed attempt get a few seconds more); past it the switch fails with
    #: :class:`BridgeUnavailableError` and the context stays local.
    switch_timeout: float = 15.0

    def __init__(
        self,
        session_id: str | None = None,
        *,
        backend: str = "local",
        bridge: str | None = None,
        root_certificates: bytes | str | None = None,
        token: str | None = None,
        auth_secret: bytes | str | None = None,
    ) -> None:
        if backend not in ("local", "bridged"):
            raise ValidationError("", "backend", backend, f"backend must be 'local' or 'bridged', got {backend!r}")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise ValidationError("", "session_id", session_id, "session_id must be a non-empty string")
        if bridge is not None and (not isinstance(bridge, str) or ":" not in bridge):
            raise ValidationError("", "bridge", bridge, f"bridge must be a 'host:port' address, got {bridge!r}")
        self.id: str = session_id or "ctx_" + secrets.token_hex(16)
        self._bridge = bridge
        self._root_certificates = root_certificates
        self._token = token
        self._auth_secret = auth_secret
        self._provider: StateProvider = LocalState(self.id)
        self._switch_lock = threading.RLock()
        self._history: list[SwitchEvent] = []
        self._programs: dict[str, dict[str, Any]] = {}
        self._owns_session = False
        self._remote: Any = None
        self._keepalive_stop = threading.Event()
        # Marks the variables this context imports, so a retry can remove what a failed switch left.
        self._migration = secrets.token_hex(8)
        # What a failed switch may have left on the bridge: (session made by us, variable names).
        self._leftover: tuple[bool, frozenset[str]] | None = None
        if backend == "bridged":
            self._switch("requested at creation", count=False)

    @classmethod
    def attach(cls, session_id: str, *, bridge: str | None = None, **options: Any) -> Context:
        """Join an existing bridge session (made by another context) without owning it.

        The attached context reads and writes the session's variables and keeps the session
        alive while open; its :meth:`stop` leaves the session to its owner.

        Args:
            session_id: the session to join (the owner's ``ctx.id``).
            bridge: None for the embedded bridge, or the address(es) of a running bridge.
            **options: the security options of :class:`Context` (``root_certificates``, ``token``,
                ``auth_secret``).

        Raises:
            SessionNotFoundError: the bridge has no such session.
            BridgeUnavailableError: the bridge cannot be reached.
        """
        if not isinstance(session_id, str) or not session_id:
            raise ValidationError("", "session_id", session_id, "session_id must be a non-empty string")
        ctx = cls(session_id, bridge=bridge, **options)
        ctx._switch("attached to an existing session", count=False, join=True)
        return ctx

    @property
    def owns_session(self) -> bool:
        """Whether this context created its bridge session (and so deletes it on :meth:`stop`)."""
        return self._owns_session

    # ------------------------------------------------------------------ backend

    def get_backend(self) -> BackendInfo:
        """Describe the current backend: type, provider class, switch count and history."""
        provider = self._provider
        return BackendInfo(
            type=provider.kind,
            module=type(provider),
            switches=len(self._history),
            history=tuple(self._history),
            capabilities=provider.capabilities,
        )

    @property
    def bridge_address(self) -> str | None:
        """``"host:port"`` where workers connect to this context's session; None while local."""
        provider = self._provider
        return provider.address if isinstance(provider, BridgedState) else None

    @property
    def is_bridged(self) -> bool:
        """Whether the context's variables live in a bridge session."""
        return self._provider.kind == "bridged"

    def ensure_bridged(self) -> None:
        """Move the context to a bridge session, keeping every variable. Idempotent.

        On a context that is already bridged it checks that the bridge still has the session. A
        remote bridge that lost it (restarted with memory storage, or the session expired) gets
        it back: the session is re-created from the last value this context saw of each variable
        (with its version), and the switch is recorded in :meth:`get_backend` history. Writes that
        this context never saw (made by workers after its last read) cannot be recovered.

        A switch that fails (the bridge stops answering midway) fails within
        :attr:`switch_timeout` plus a few seconds of clean-up, and a retry works: what the failed
        attempt left on the bridge is removed first.

        While the variables are copied, Python's automatic cyclic garbage collection is paused in
        this process (every copy stays alive to the end, and each collection pass would walk them
        all again); it resumes when the copy ends, if it was on before.

        Raises:
            BridgeUnavailableError: the bridge or its store cannot be reached; the context is
                still local with every value intact (or, bridged, the embedded bridge lost the
                session: stop this context and start a new one).
        """
        provider = self._provider
        if isinstance(provider, BridgedState):
            self._recover(provider)
            return
        self._switch("ensure_bridged")

    def register_program(self, program_id: str, spec: Mapping[str, Any]) -> None:
        """Record a program; switch to the bridge first when it needs Python.

        See :func:`program_requires_python` for the rules. If the switch fails the program is not
        recorded and the error propagates.
        """
        if not isinstance(program_id, str) or not program_id:
            raise ValidationError("", "program_id", program_id, "program_id must be a non-empty string")
        if not isinstance(spec, Mapping):
            raise ValidationError(program_id, "spec", spec, "a program spec must be a mapping")
        if program_requires_python(spec):
            self._switch(f"program {program_id} requires Python")
        self._programs[program_id] = dict(spec)

    @property
    def programs(self) -> dict[str, dict[str, Any]]:
        """The registered programs (a copy)."""
        return {k: dict(v) for k, v in self._programs.items()}

    # ------------------------------------------------------------------ reads

    @property
    def provider(self) -> StateProvider:
        """The backend serving this context now (it changes once, when the context is bridged)."""
        return self._provider

    def get_variable(self, name: str) -> Any:
        """The current value of a variable (as ``SessionContext.get_variable``).

        Raises:
            VariableNotFoundError: no such variable.
        """
        return self._provider.get(name)

    def get_variable_record(self, name: str) -> Variable:
        """The whole :class:`~dspex_dspy.types.Variable` record of a variable."""
        return self._provider.get_variable(name)

    def get_versioned(self, name: str) -> tuple[Any, int]:
        """``(value, version)`` of a variable, read together."""
        return self._provider.get_versioned(name)

    def get_versioned_many(self, names: Iterable[str]) -> dict[str, tuple[Any, int]]:
        """``(value, version)`` of several variables from one snapshot: no write falls between them.

        Raises:
            VariableNotFoundError: naming every missing variable.
        """
        return self._provider.get_versioned_many(names)

    def get_variables(self, names: Iterable[str]) -> dict[str, Any]:
        """The values of several variables, by name (one snapshot).

        Raises:
            VariableNotFoundError: naming every missing variable.
        """
        return self._provider.get_many(names)

    def has_variable(self, name: str) -> bool:
        """Whether the context has a variable of that name (or id)."""
        return self._provider.exists(name)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Release the context: its bridge session is cleaned up if it created it (an attached
        context leaves the session to its owner). Idempotent."""
        with self._switch_lock:
            provider = self._provider
            if isinstance(provider, _Stopped):
                return
            self._provider = _Stopped(self.id)
            self._keepalive_stop.set()
            if isinstance(provider, BridgedState) and self._owns_session:
                try:
                    provider.store.cleanup_session(self.id)  # type: ignore[attr-defined]
                except DSPexError as exc:
                    logger.debug("cleanup of session %s failed: %s", self.id, exc)
            provider.close()
            if self._remote is not None:
                self._remote.close()
                self._remote = None
            if self._leftover is not None and self._bridge is not None:
                self._clear_leftover_quietly()

    def _clear_leftover_quietly(self) -> None:
        """On stop, try once (briefly) to remove what a failed switch left on the bridge."""
        try:
            store, _ = self._open_bridge()
        except Exception as exc:
            logger.debug("could not reach the bridge to clean up after context %s: %s", self.id, exc)
            return
        try:
            with self._deadline(store, _CLEANUP_TIMEOUT):
                self._clear_leftover(store)
        except Exception as exc:
            logger.debug("could not clean up what a failed switch of context %s left: %s", self.id, exc)
        finally:
            store.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = self._provider.kind
        if kind == "stopped":
            return f"Context(id={self.id!r}, stopped)"
        try:
            variables = self._provider.list()
        except DSPexError as exc:
            return f"Context(id={self.id!r}, backend={kind!r}, unreadable: {exc})"
        return context_text(self.id, kind, self.bridge_address, variables)

    def _repr_html_(self) -> str:
        kind = self._provider.kind
        variables = [] if kind == "stopped" else self._provider.list()
        return context_html(self.id, kind, self.bridge_address, variables)

    def to_records(self) -> builtins.list[dict[str, Any]]:
        """Every variable as a plain dict, in creation order (see ``Variable.to_record``)."""
        return VariableList(self._provider.list()).to_records()

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per variable (needs pandas)."""
        return VariableList(self._provider.list()).to_dataframe()

    # ------------------------------------------------------------------ switching

    def _open_bridge(self) -> tuple[Any, str]:
        """Return ``(store, address)``: the embedded store, or a gRPC client of a remote bridge."""
        if self._bridge is None:
            # Imported here: a purely local context never loads gRPC.
            from dspex_dspy.server import EmbeddedBridge

            server = EmbeddedBridge.get()
            return server.store, server.address
        from dspex_dspy.remote import RemoteStore

        token = self._token
        secret = self._secret(required=False)
        if token is None and not os.environ.get("DSPEX_BRIDGE_TOKEN") and secret is not None:
            from dspex_dspy.tokens import mint_token

            token = mint_token(secret, sub="orchestrator", sessions=[self.id], perms=_OWN_PERMS, ttl=_OWN_TOKEN_TTL)
        remote = RemoteStore.connect(self._bridge, root_certificates=self._root_certificates, token=token)
        return remote, self._bridge

    def _secret(self, *, required: bool) -> bytes | None:
        """The fleet's token secret: ``auth_secret``, else the file named by ``DSPEX_BRIDGE_SECRET_FILE``."""
        from dspex_dspy.tokens import load_secret

        if self._auth_secret is not None:
            return self._auth_secret.encode() if isinstance(self._auth_secret, str) else self._auth_secret
        path = os.environ.get(SECRET_FILE_ENV)
        if path:
            return load_secret(path)
        if required:
            raise DSPexError(f"context {self.id} cannot sign tokens: give it auth_secret= or set {SECRET_FILE_ENV}")
        return None

    def worker_token(
        self, perms: tuple[str, ...] | list[str] = ("read", "watch"), ttl: float = 3600.0, *, sub: str = "worker"
    ) -> str:
        """Sign a token that lets a worker into this context's session with ``perms`` for ``ttl`` seconds.

        Only a context that created its bridge session, and knows the fleet's secret, signs tokens;
        they name that session alone and never carry ``admin``.

        Args:
            perms: a subset of ``read``, ``write``, ``watch``, ``optimize``.
            ttl: seconds until the token expires.
            sub: who the worker is; recorded as the writer of its writes.

        Raises:
            DSPexError: the context does not own a bridge session, or knows no secret.
            ValidationError: an unknown permission, ``admin``, or a ttl that is not positive.

        Example:
            >>> token = ctx.worker_token(perms=("read", "watch"), ttl=600)  # doctest: +SKIP
            >>> SessionContext.connect(ctx.bridge_address, ctx.id, token=token)  # doctest: +SKIP
        """
        from dspex_dspy.tokens import mint_token

        if not (self.is_bridged and self._owns_session):
            raise DSPexError(f"context {self.id} signs worker tokens only for a bridge session it created")
        wanted = [perms] if isinstance(perms, str) else list(perms)
        beyond = sorted(set(wanted) - _WORKER_PERMS)
        if beyond:
            raise ValidationError(
                "", "perms", beyond, f"a worker token cannot carry {beyond}; allowed: {list(_OWN_PERMS)}"
            )
        secret = self._secret(required=True)
        assert secret is not None
        return mint_token(secret, sub=sub, sessions=[self.id], perms=wanted, ttl=ttl)

    def _switch(self, reason: str, *, count: bool = True, join: bool = False) -> None:
        with self._switch_lock:
            local = self._provider
            if not isinstance(local, LocalState):
                if isinstance(local, _Stopped):
                    raise DSPexError(f"context {self.id} is stopped")
                return
            started = time.perf_counter()
            try:
                store, address = self._open_bridge()
            except DSPexError:
                raise
            except Exception as exc:
                raise BridgeUnavailableError(f"cannot reach the bridge for context {self.id}: {exc}") from exc
            created = False
            try:
                with self._deadline(store, self.switch_timeout):
                    self._clear_leftover(store)
                    if join:
                        store.get_session(self.id)
                    else:
                        # Marked first: a create whose answer is lost may still have made the session.
                        self._leftover = (True, frozenset())
                        try:
                            store.create_session(self.id, {"context": self.id})
                        except SessionExistsError as exc:
                            self._leftover = None  # someone else's session: never ours to remove
                            exc.message = (
                                f"{exc.message}: another context owns it; join it with "
                                f"Context.attach({self.id!r}, bridge=...) or pick another id"
                            )
                            exc.args = (exc.message,)
                            raise
                        created = True
                    bridged = BridgedState(store, self.id, address)
                    with collector_paused():  # every record copied stays alive to the end
                        moved = self._migrate(local, bridged, store, created)
                    self._leftover = None
            except BaseException as exc:
                self._abandon(store, created)
                if isinstance(exc, DSPexError) or not isinstance(exc, Exception):
                    raise
                raise BridgeUnavailableError(f"switching context {self.id} to the bridge failed: {exc}") from exc
            self._owns_session = created
            self._remote = store if self._bridge is not None else None
            self._start_keepalive(store)
            duration = time.perf_counter() - started
            if count:
                self._history.append(SwitchEvent("local", "bridged", time.time(), len(moved), duration, reason))
            logger.info(
                "context %s bridged at %s (%d variables, %.1f ms)", self.id, address, len(moved), duration * 1e3
            )

    def _start_keepalive(self, store: Any) -> None:
        """Heartbeat the session while the context is open, so an idle context never loses it."""
        try:
            ttl = float(store.get_session(self.id).ttl)
        except DSPexError:
            ttl = math.nan
        interval = min(KEEPALIVE_MAX_INTERVAL, ttl / 3) if math.isfinite(ttl) else KEEPALIVE_MAX_INTERVAL
        thread = threading.Thread(
            target=_keep_alive,
            args=(store, self.id, max(interval, 0.01), self._keepalive_stop, weakref.ref(self)),
            name=f"dspex-keepalive-{self.id[:24]}",
            daemon=True,
        )
        thread.start()

    @staticmethod
    def _deadline(store: Any, seconds: float) -> contextlib.AbstractContextManager[Any]:
        """One deadline for every call to a remote store inside the block (none for an embedded one)."""
        deadline = getattr(store, "deadline", None)
        return deadline(seconds) if deadline is not None else contextlib.nullcontext()

    def _clear_leftover(self, store: Any) -> None:
        """Remove what an earlier failed switch of this context left on the bridge."""
        if self._leftover is None:
            return
        made_session, names = self._leftover
        if made_session:
            with contextlib.suppress(SessionNotFoundError):
                store.cleanup_session(self.id)
        elif names and store.has_session(self.id):
            found, _ = store.get_variables(self.id, sorted(names))
            for name, var in found.items():
                if var.metadata.get("migration") == self._migration:
                    store.delete_variable(self.id, name)
        self._leftover = None

    def _migrate(self, local: LocalState, bridged: BridgedState, store: Any, created: bool) -> list[Variable]:
        """Copy ``local`` into ``bridged`` and retire it; return what was moved.

        The export is taken under the local lock, the import runs outside it. A write accepted
        meanwhile makes the export stale: the import is undone and tried again; the last try
        fences writers (readers never wait).
        """
        for _ in range(_OPTIMISTIC_SWITCH_TRIES):
            moved, writes = local.export_versioned(self._marks())
            self._note_imports(moved, created)
            if moved:
                # Into a session this switch made, nobody else looks yet: the import may go in parts.
                bridged.import_state(moved, atomic=not created)
            if local.retire_if_unchanged(bridged, writes):
                self._provider = bridged
                return moved
            logger.debug("context %s: writes landed during the switch, importing again", self.id)
            self._undo_import(store, moved, created)
        with local.fenced():
            moved, writes = local.export_versioned(self._marks())
            self._note_imports(moved, created)
            if moved:
                bridged.import_state(moved, atomic=not created)
            if not local.retire_if_unchanged(bridged, writes):  # pragma: no cover - writers are fenced
                raise DSPexError(f"context {self.id} changed while its writers were fenced")
            self._provider = bridged
            return moved

    def _marks(self) -> dict[str, str]:
        """The metadata a migration stamps on every variable it moves."""
        stamp = datetime.now(timezone.utc).isoformat()
        return {"migrated_from": "local", "migrated_at": stamp, "migration": self._migration}

    def _note_imports(self, moved: Sequence[Variable], created: bool) -> None:
        """Remember what an import into a session this switch did not create may leave behind."""
        if not created:
            self._leftover = (False, frozenset(v.name for v in moved))

    def _undo_import(self, store: Any, moved: Sequence[Variable], created: bool) -> None:
        """Remove a stale import from the session, leaving it as it was before."""
        if created:
            store.cleanup_session(self.id)
            store.create_session(self.id, {"context": self.id})
            return
        for var in moved:
            store.delete_variable(self.id, var.name)

    def _abandon(self, store: Any, created: bool) -> None:
        if created:
            try:
                with self._deadline(store, _CLEANUP_TIMEOUT):
                    store.cleanup_session(self.id)
                self._leftover = None
            except Exception as exc:
                logger.debug("could not remove half-made session %s: %s", self.id, exc)
        if self._bridge is not None:
            store.close()

    def _recover(self, provider: BridgedState) -> None:
        """Re-create the session a remote bridge lost, from the last values this context saw."""
        with self._switch_lock:
            store: Any = provider.store
            if store.has_session(self.id):
                return
            known = getattr(store, "known_variables", None)
            if known is None:
                raise BridgeUnavailableError(
                    f"the bridge lost session {self.id} and this context keeps no copy of its values; "
                    "stop this context and start a new one"
                )
            started = time.perf_counter()
            stamp = datetime.now(timezone.utc).isoformat()
            values = [replace(v, metadata={**v.metadata, "restored_at": stamp}) for v in known(self.id)]
            with self._deadline(store, self.switch_timeout):
                store.create_session(self.id, {"context": self.id})
                try:
                    if values:
                        with collector_paused():  # as a switch: every record copied stays alive to the end
                            store.import_variables(self.id, values, atomic=False)  # a session just made
                except BaseException:
                    with contextlib.suppress(Exception), self._deadline(store, _CLEANUP_TIMEOUT):
                        store.cleanup_session(self.id)
                    raise
            self._owns_session = True
            duration = time.perf_counter() - started
            reason = "the bridge lost the session; re-created from the last known values"
            self._history.append(SwitchEvent("bridged", "bridged", time.time(), len(values), duration, reason))
            logger.warning("context %s: %s (%d variables)", self.id, reason, len(values))
