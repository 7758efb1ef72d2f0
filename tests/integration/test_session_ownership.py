"""Sessions that do not vanish under their owner, and switching many variables to a remote bridge.

A bridged Context keeps its session alive while open (heartbeats), even idle past the TTL; a second
Context with the same id raises instead of merging; ``Context.attach`` joins explicitly; only the
owner's ``stop()`` deletes the session. Bridges are real ``dspex-bridge serve`` subprocesses, on
memory and on Redis storage.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from dspex_dspy import Context, Variables
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.admin import list_sessions
from dspex_dspy.errors import SessionExistsError, SessionNotFoundError
from dspex_dspy.remote import RemoteStore
from dspex_dspy.store import SessionStore
from dspex_dspy.types import Variable
from tests.support.old_bridge import older_bridge

pytestmark = pytest.mark.integration

# A context heartbeats its session every TTL/3: a 5 s TTL leaves a heartbeat over 3 s of slack before
# the session could expire under its owner. Tests wait for TTLs to pass on conditions, never sleeps.
TTL_S = 5.0
DEADLINE_S = 60.0  # hang guard for every wait below; never an assertion on speed


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def listed(address: str, session_id: str) -> bool:
    """Whether the bridge lists the session: ``ListSessions`` does not refresh any TTL, unlike ``GetSession``."""
    with grpc.insecure_channel(address) as channel:
        return session_id in {s.id for s in list_sessions(channel, timeout=DEADLINE_S)}


@pytest.fixture(params=["memory", "redis"])
def short_ttl_bridge(request: pytest.FixtureRequest, spawn_bridge: Callable[..., Any]) -> Any:
    storage = request.getfixturevalue("redis_url") if request.param == "redis" else "memory"
    return spawn_bridge("--storage", storage, "--ttl", str(TTL_S), "--sweep-interval", "0.1")


def test_an_idle_context_keeps_its_session_past_the_ttl(short_ttl_bridge: Any) -> None:
    with Context(bridge=short_ttl_bridge.address) as ctx, RemoteStore.connect(short_ttl_bridge.address) as probe:
        Variables.defvariable(ctx, "temperature", "float", 0.7)
        ctx.ensure_bridged()
        probe.create_session("unowned")  # the same TTL, but nobody keeps it alive
        assert listed(short_ttl_bridge.address, "unowned")
        # The context stays idle; "unowned" is only listed (a GetSession would refresh its TTL).
        wait_for(lambda: not listed(short_ttl_bridge.address, "unowned"), "the unowned session to expire")
        assert not probe.has_session("unowned")  # the TTL really passed ...
        assert Variables.get(ctx, "temperature") == 0.7  # ... yet the context's session is there
        assert probe.get_session(ctx.id).variable_count == 1


def test_same_id_twice_raises_attach_joins_and_only_the_owner_deletes(short_ttl_bridge: Any) -> None:
    address = short_ttl_bridge.address
    owner = Context(bridge=address, backend="bridged")
    Variables.defvariable(owner, "x", "integer", 1)
    with pytest.raises(SessionExistsError, match=r"Context\.attach"):
        Context(owner.id, bridge=address, backend="bridged")
    twin = Context(owner.id, bridge=address)
    Variables.defvariable(twin, "y", "integer", 2)
    with pytest.raises(SessionExistsError):
        twin.ensure_bridged()
    assert twin.get_backend().type == "local" and Variables.get(twin, "y") == 2  # nothing merged, nothing lost
    twin.stop()

    guest = Context.attach(owner.id, bridge=address)
    assert not guest.owns_session and owner.owns_session
    assert Variables.get(guest, "x") == 1
    Variables.set(guest, "x", 5)
    assert Variables.get(owner, "x") == 5
    guest.stop()
    assert Variables.get(owner, "x") == 5  # the guest's stop left the session alone
    with RemoteStore.connect(address) as probe:
        owner.stop()
        assert not probe.has_session(owner.id)
    with pytest.raises(SessionNotFoundError):
        Context.attach("no-such-session", bridge=address)


def test_attach_on_the_embedded_bridge() -> None:
    with Context(backend="bridged") as owner:
        Variables.defvariable(owner, "x", "integer", 1)
        guest = Context.attach(owner.id)
        assert Variables.get(guest, "x") == 1
        guest.stop()
        assert Variables.get(owner, "x") == 1


def test_switching_ten_thousand_variables_to_a_remote_bridge_lands_every_variable(remote_bridge: Any) -> None:
    ctx = Context(bridge=remote_bridge.address)
    try:
        for i in range(10_000):
            Variables.defvariable(ctx, f"v{i}", "integer", i, description=f"#{i}")
        Variables.set(ctx, "v7", 70)
        started = time.perf_counter()
        ctx.ensure_bridged()
        took = time.perf_counter() - started
        listed = Variables.list(ctx)
        assert [v.name for v in listed] == [f"v{i}" for i in range(10_000)]
        assert (listed[7].value, listed[7].version, listed[7].description) == (70, 2, "#7")
        print(f"switch of 10,000 variables to a remote bridge: {took:.3f} s")
        assert ctx.get_backend().history[-1].variables == 10_000
    finally:
        ctx.stop()


def test_import_falls_back_to_registering_one_by_one_on_an_older_bridge() -> None:
    with older_bridge() as (port, store):
        _import_through(port, store)


def _import_through(port: int, store: SessionStore) -> None:
    with RemoteStore(pb_grpc.BridgeServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))) as remote:
        remote.create_session("s")
        variables = [Variable("", f"v{i}", "integer", i, version=3, created_at=100.0 + i) for i in range(50)]
        made = remote.import_variables("s", variables)
        assert [v.version for v in made] == [3] * 50
        assert [v.name for v in store.list_variables("s")] == [f"v{i}" for i in range(50)]
        stub = pb_grpc.BridgeServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.RpcError) as info:
            stub.ImportVariables(pb.ImportVariablesRequest(session_id="s"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_context_dropped_without_stop_stops_keeping_its_session_alive(short_ttl_bridge: Any) -> None:
    ctx = Context(bridge=short_ttl_bridge.address, backend="bridged")
    session_id = ctx.id
    with RemoteStore.connect(short_ttl_bridge.address) as probe:
        assert probe.get_session(session_id).ttl == TTL_S
        del ctx
        gc.collect()
        # Only listed until it is gone (a GetSession would refresh its TTL).
        wait_for(lambda: not listed(short_ttl_bridge.address, session_id), "the dropped context's session to expire")
        assert not probe.has_session(session_id)
