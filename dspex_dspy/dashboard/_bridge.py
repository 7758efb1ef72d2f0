"""How the dashboard reaches a bridge: one client per token, JSON-ready records, live updates.

The dashboard is a client like any other. Every action it offers goes through the same calls a
worker or the CLI makes (``RemoteStore`` for reads and writes, a ``WatchVariables`` stream for
live values), carrying the token the person in front of the page gave, so the bridge validates,
versions, audits and authorises each one exactly as it would any other client's.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import grpc.aio

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.admin import SessionSummary, list_sessions, recent_calls
from dspex_dspy.errors import BridgeUnavailableError
from dspex_dspy.records import SessionInfo
from dspex_dspy.remote import CHANNEL_OPTIONS, RemoteStore
from dspex_dspy.remote.channel import wait_ready
from dspex_dspy.tls import ChannelSecurity, secure_aio_channel, secure_channel
from dspex_dspy.types import Variable, is_secret
from dspex_dspy.wire import error_from_rpc, proto_to_update

__all__ = ["BridgeLink", "jsonable", "session_record", "variable_record"]

_CLIENTS_PER_LINK = 16


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats spelled as strings, so strict JSON can carry it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    return value


def variable_record(var: Variable) -> dict[str, Any]:
    """What the page shows of one variable; a secret variable's value is never sent."""
    secret = is_secret(var.metadata)
    metadata = dict(var.metadata)
    return {
        "id": var.id,
        "name": var.name,
        "type": var.type,
        "value": None if secret else jsonable(var.value),
        "secret": secret,
        "constraints": jsonable(dict(var.constraints)),
        "description": var.description,
        "metadata": metadata,
        "version": var.version,
        "created_at": var.created_at,
        "updated_at": var.updated_at,
        "changed_by": metadata.get("changed_by") or var.source,
        "lease": _lease_of(var),
    }


def _lease_of(var: Variable) -> dict[str, Any] | None:
    status = var.optimization_status
    if status is None:
        return None
    return {"optimizer_id": status.optimizer_id, "started_at": status.started_at}


def session_record(session: SessionSummary | SessionInfo) -> dict[str, Any]:
    """What the page shows of one session (from a listing or from ``GetSession``)."""
    metadata = dict(session.metadata)
    count = session.variables if isinstance(session, SessionSummary) else session.variable_count
    idle = session.ttl - session.expires_in  # seconds since the session was last used
    return {
        "id": session.id,
        "variables": count,
        "created_at": session.created_at,
        "last_access": time.time() - idle if math.isfinite(idle) and idle >= 0 else None,
        "expires_in": session.expires_in if math.isfinite(session.expires_in) else None,
        "owner": metadata.get("owner") or metadata.get("created_by"),
        "watchers": session.watchers if isinstance(session, SessionSummary) else None,
        "metadata": metadata,
    }


class BridgeLink:
    """Clients of one bridge, kept per token (a small LRU), for the dashboard's requests.

    Args:
        address: ``"host:port"`` of the bridge (several, comma-separated, when the bridge
            clients accept that form).
        root_certificates: PEM of the CA that signed the bridge's certificate, for TLS.
        connect_timeout: seconds to wait for the bridge when a client is opened.
    """

    def __init__(self, address: str, *, root_certificates: bytes | None = None, connect_timeout: float = 5.0) -> None:
        self.address = address
        self._root_certificates = root_certificates
        self._connect_timeout = connect_timeout
        self._clients: OrderedDict[str, RemoteStore] = OrderedDict()
        self._channels: dict[int, grpc.Channel] = {}
        self._lock = threading.Lock()

    def store(self, token: str | None) -> RemoteStore:
        """A connected client that sends ``token`` (``None``: no token) with every call."""
        key = token or ""
        with self._lock:
            client = self._clients.get(key)
            if client is not None:
                self._clients.move_to_end(key)
                return client
        client = self._connect(token)
        with self._lock:
            existing = self._clients.get(key)
            if existing is not None:
                client.close()
                return existing
            self._clients[key] = client
            while len(self._clients) > _CLIENTS_PER_LINK:
                _, evicted = self._clients.popitem(last=False)
                self._channels.pop(id(evicted), None)
                evicted.close()
        return client

    def _security(self, token: str | None) -> ChannelSecurity:
        # Built here rather than resolved from the environment: a page without a token must not
        # borrow the dashboard process's own DSPEX_BRIDGE_TOKEN.
        return ChannelSecurity(root_certificates=self._root_certificates, token=token)

    def _connect(self, token: str | None) -> RemoteStore:
        target = self.address.split(",")[0].strip()
        transport, channel = secure_channel(target, self._security(token), CHANNEL_OPTIONS)
        if not wait_ready(transport, self._connect_timeout)[0]:
            transport.close()
            raise BridgeUnavailableError(
                f"no bridge server answered at {target} within {self._connect_timeout:g} s"
            ) from None
        store = RemoteStore(pb_grpc.BridgeServiceStub(channel), channel=channel, address=target)
        self._channels[id(store)] = channel
        return store

    def sessions(self, token: str | None, pattern: str = "") -> list[SessionSummary]:
        """The bridge's sessions (its ``BridgeAdmin.ListSessions``), as the token may see them."""
        store = self.store(token)
        return list_sessions(self._channels[id(store)], pattern=pattern, timeout=store.call_timeout)

    def recent_calls(self, token: str | None, session_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The session's newest reported module calls (its ``BridgeAdmin.RecentCalls``), newest first."""
        store = self.store(token)
        calls = recent_calls(self._channels[id(store)], session_id, limit=limit, timeout=store.call_timeout)
        return [jsonable(call) for call in calls]

    def close(self) -> None:
        """Close every client. Idempotent."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
            self._channels.clear()
        for client in clients:
            client.close()

    async def updates(self, session_id: str, token: str | None) -> AsyncIterator[dict[str, Any] | None]:
        """Live changes of a session's variables, as page records; ``None`` marks a heartbeat.

        Ends when the session goes away; raises the bridge's error (e.g. an expired token).
        """
        target = self.address.split(",")[0].strip()
        async with secure_aio_channel(target, self._security(token), CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.BridgeServiceStub(channel)
            request = pb.WatchVariablesRequest(session_id=session_id, include_initial_values=False)
            call = stub.WatchVariables(request)
            try:
                async for message in call:
                    update = proto_to_update(message)
                    if update.update_type == "heartbeat":
                        yield None
                        continue
                    record = variable_record(update.variable) if update.variable is not None else None
                    yield {
                        "kind": update.update_type,
                        "name": update.name,
                        "source": update.source,
                        "variable": record,
                    }
            except grpc.RpcError as err:
                raise error_from_rpc(err, session_id=session_id) from err
            except grpc.aio.UsageError as err:  # the channel closed under the stream
                raise BridgeUnavailableError(f"the watch of {session_id} ended: {err}") from err
