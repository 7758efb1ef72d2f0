"""Faults: the proxy's own switches, a switch cut off midway, a bridge killed with SIGKILL, and a
client that tries to take every watch slot."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from dspex_dspy import Context, Variables
from dspex_dspy import context as context_module
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import BridgeUnavailableError, SessionExistsError, SessionNotFoundError
from dspex_dspy.server import ServerLimits
from tests.conftest import BridgeProcess
from tests.reliability.conftest import Served, serve
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.reliability

DEADLINE = 30.0
# Hang guards only: generous enough for a slow, loaded machine; never a speed requirement.
HANG_GUARD_S = 60.0
# The switch deadline while the link may be cut: the cut-off switch gives up after it. Long enough
# that creating the session (before the cut) never races it on a loaded machine.
CUT_OFF_SWITCH_TIMEOUT_S = 10.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def fresh_channel(address: str) -> grpc.Channel:
    """A channel with its own connection (not shared with other channels of this process)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


# ----------------------------------------------------------------------------- the proxy


def test_the_proxy_forwards_resets_blackholes_and_restores(served: Served, proxy: FaultProxy) -> None:
    channel = fresh_channel(proxy.address)
    stub = pb_grpc.BridgeServiceStub(channel)
    try:
        assert stub.Ping(pb.PingRequest(message="a"), timeout=DEADLINE).message == "pong: a"
        assert proxy.connections == 1

        proxy.blackhole()
        with pytest.raises(grpc.RpcError) as info:
            stub.Ping(pb.PingRequest(message="b"), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert proxy.connections == 1  # silently dropped: nothing was closed

        proxy.restore()
        assert stub.Ping(pb.PingRequest(message="c"), timeout=DEADLINE).message == "pong: c"

        assert proxy.reset() == 1
        wait_until(lambda: proxy.connections == 0, "the reset connection to go")

        # A call racing the reset may fail UNAVAILABLE; then the channel reconnects on its own.
        def pings() -> bool:
            try:
                return stub.Ping(pb.PingRequest(message="d"), timeout=5.0, wait_for_ready=True).message == "pong: d"
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                return False

        wait_until(pings, "a ping through a new connection")
        assert proxy.accepted == 2
    finally:
        channel.close()


# ----------------------------------------------------------------------------- a switch cut off midway


def _seeded_context(address: str, count: int) -> Context:
    ctx = Context(bridge=address)
    # Short, so a cut-off switch gives up soon; once the link works again the tests raise it
    # (see _link_restored).
    ctx.switch_timeout = CUT_OFF_SWITCH_TIMEOUT_S
    for i in range(count):
        Variables.defvariable(ctx, f"v{i}", "integer", i)
    return ctx


def _link_restored(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the link works again, no deadline of the context may race a slow, loaded machine.

    A retried switch (clean-up, create, import of every variable) gets a generous switch_timeout,
    and so does the clean-up of what the cut-off switch left: ``Context.stop`` tries that once
    under ``_CLEANUP_TIMEOUT`` (2 s) and swallows its failure. Set only after the cut-off, so the
    cut-off switch itself still gives up after its short deadline.
    """
    ctx.switch_timeout = HANG_GUARD_S
    monkeypatch.setattr(context_module, "_CLEANUP_TIMEOUT", HANG_GUARD_S / 2)


def test_a_switch_cut_off_midway_fails_in_bounded_time_and_a_retry_succeeds(
    served: Served, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 1500
    ctx = _seeded_context(proxy.address, count)
    try:
        # Let the connection set-up and part of the imports through, then drop everything silently.
        proxy.blackhole_after(40_000)
        started = time.monotonic()
        with pytest.raises(BridgeUnavailableError):
            ctx.ensure_bridged()
        took = time.monotonic() - started
        print(f"\nthe cut-off switch failed after {took:.1f} s (switch_timeout {ctx.switch_timeout:g} s)")
        # A hang guard, not a speed bound: without its deadline the switch would wait for ever on
        # the silent link (the proxy never closes it), so returning at all shows it is bounded.
        assert took < HANG_GUARD_S + ctx.switch_timeout, f"the cut-off switch took {took:.1f} s"
        assert not ctx.is_bridged
        assert Variables.get(ctx, "v7") == 7
        # The session reached the server and could not be removed (the link was down); the import
        # is one all-or-nothing call that never arrived whole, so no variable of it is there.
        assert served.store.has_session(ctx.id)
        assert served.store.list_variables(ctx.id) == []

        # The peer is gone for good: its connections die; a new one works.
        proxy.reset()
        proxy.restore()
        _link_restored(ctx, monkeypatch)
        ctx.ensure_bridged()
        assert ctx.is_bridged
        listed = served.store.list_variables(ctx.id)
        assert [v.name for v in listed] == [f"v{i}" for i in range(count)]
        assert Variables.get(ctx, "v1499") == 1499
    finally:
        ctx.stop()


def test_stopping_after_a_cut_off_switch_removes_what_it_left(
    served: Served, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _seeded_context(proxy.address, 1500)
    proxy.blackhole_after(40_000)
    with pytest.raises(BridgeUnavailableError):
        ctx.ensure_bridged()
    assert served.store.has_session(ctx.id)
    proxy.reset()
    proxy.restore()
    _link_restored(ctx, monkeypatch)
    ctx.stop()
    assert not served.store.has_session(ctx.id)


def test_a_switch_onto_an_existing_session_is_refused_and_leaves_it_alone(served: Served, proxy: FaultProxy) -> None:
    # A context never imports into a session it did not make (joining is Context.attach), so a
    # failed or refused switch cannot leave anything in someone else's session.
    ctx = _seeded_context(proxy.address, 1500)
    served.store.create_session(ctx.id)
    served.store.register_variable(ctx.id, "theirs", "string", "keep me")
    try:
        with pytest.raises(SessionExistsError, match="attach"):
            ctx.ensure_bridged()
        assert not ctx.is_bridged and Variables.get(ctx, "v1499") == 1499
        assert [v.name for v in served.store.list_variables(ctx.id)] == ["theirs"]
        assert served.store.get_variable(ctx.id, "theirs").value == "keep me"
    finally:
        ctx.stop()
    assert served.store.has_session(ctx.id)  # not the stopped context's to delete


# ----------------------------------------------------------------------------- kill -9


@pytest.fixture
def bridges(spawn_bridge: Callable[..., BridgeProcess]) -> Iterator[Callable[[], BridgeProcess]]:
    started: list[BridgeProcess] = []

    def start() -> BridgeProcess:
        bridge = spawn_bridge()
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


def _port(bridge: BridgeProcess) -> int:
    assert bridge.address is not None
    return int(bridge.address.rsplit(":", 1)[1])


def test_a_killed_bridge_fails_calls_fast_and_a_context_recovers_its_session_on_a_new_one(
    bridges: Callable[[], BridgeProcess],
) -> None:
    first = bridges()
    with FaultProxy(_port(first)) as proxy:
        ctx = Context(bridge=proxy.address)
        try:
            Variables.defvariable(ctx, "temperature", "float", 0.5)
            Variables.defvariable(ctx, "prompt", "string", "hello")
            ctx.ensure_bridged()
            Variables.set(ctx, "temperature", 0.9)
            assert Variables.get(ctx, "prompt") == "hello"

            first.kill()
            first.proc.wait(timeout=DEADLINE)
            started = time.monotonic()
            with pytest.raises(BridgeUnavailableError):
                Variables.get(ctx, "temperature")
            assert time.monotonic() - started < DEADLINE

            second = bridges()
            proxy.retarget(_port(second))
            proxy.reset()

            # The new bridge has no such session: a clear error that says how to recover.
            def lost() -> bool:
                try:
                    Variables.get(ctx, "temperature")
                except SessionNotFoundError as exc:
                    assert "ensure_bridged()" in str(exc), str(exc)
                    return True
                except BridgeUnavailableError:
                    return False
                return False

            wait_until(lost, "the new bridge to answer")
            ctx.ensure_bridged()
            assert Variables.get(ctx, "temperature") == 0.9
            assert Variables.get(ctx, "prompt") == "hello"
            assert Variables.get_variable(ctx, "temperature").version == 2
            last = ctx.get_backend().history[-1]
            assert (last.from_backend, last.to_backend, last.variables) == ("bridged", "bridged", 2)
            Variables.set(ctx, "temperature", 1.1)
            assert Variables.get(ctx, "temperature") == 1.1
        finally:
            ctx.stop()


def test_writes_to_a_bridge_killed_under_load_fail_fast_and_never_hang(
    bridges: Callable[[], BridgeProcess],
) -> None:
    """A writer in a tight loop when the bridge is killed with SIGKILL gets UNAVAILABLE, never a hang."""
    bridge = bridges()
    channel = fresh_channel(bridge.address or "")
    stub = pb_grpc.BridgeServiceStub(channel)
    stub.InitializeSession(pb.InitializeSessionRequest(session_id="k"), timeout=DEADLINE)
    from dspex_dspy.wire import value_to_any

    stub.RegisterVariable(
        pb.RegisterVariableRequest(session_id="k", name="n", type="integer", initial_value=value_to_any("integer", 0)),
        timeout=DEADLINE,
    )
    outcomes: queue.Queue[Any] = queue.Queue()
    acknowledged = [0]

    def writer() -> None:
        last = 0
        for i in range(100_000):
            try:
                version = stub.SetVariable(
                    pb.SetVariableRequest(session_id="k", variable_identifier="n", value=value_to_any("integer", i)),
                    timeout=5.0,
                ).new_version
            except grpc.RpcError as err:
                outcomes.put(err.code())
                return
            assert version > last
            last = version
            acknowledged[0] += 1
        outcomes.put(None)

    thread = threading.Thread(target=writer)
    thread.start()
    wait_until(lambda: acknowledged[0] >= 50, "some writes to be acknowledged")
    bridge.kill()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "a write hung after the bridge was killed"
    assert outcomes.get_nowait() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None)
    channel.close()


# ----------------------------------------------------------------------------- fair watch slots


def test_one_client_cannot_take_every_watch_slot() -> None:
    served = serve(limits=ServerLimits(max_watchers=8))
    try:
        for sid in ("s1", "s2"):
            served.store.create_session(sid)
            served.store.register_variable(sid, "x", "integer", 0)
        greedy = fresh_channel(f"127.0.0.1:{served.server.port}")
        other = fresh_channel(f"127.0.0.1:{served.server.port}")
        opened: list[Any] = []
        refused = []
        try:
            stub = pb_grpc.BridgeServiceStub(greedy)
            for _ in range(8):
                call = stub.WatchVariables(
                    pb.WatchVariablesRequest(session_id="s1", include_initial_values=True), timeout=DEADLINE
                )
                try:
                    first = next(call)
                    assert first.update_type == "initial_value"
                    opened.append(call)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused.append(err.details())
            assert 1 <= len(opened) < 8
            assert all("one client" in d or "one session" in d for d in refused)
            # Another client, another session: its worker still gets a watch.
            call = pb_grpc.BridgeServiceStub(other).WatchVariables(
                pb.WatchVariablesRequest(session_id="s2", include_initial_values=True), timeout=DEADLINE
            )
            assert next(call).variable.name == "x"
            call.cancel()
        finally:
            for call in opened:
                call.cancel()
            greedy.close()
            other.close()
    finally:
        served.server.stop(0)
        served.store.close()


def test_the_cli_serves_with_the_fair_shares_and_byte_limits_it_is_given(
    spawn_bridge: Callable[..., BridgeProcess],
) -> None:
    from dspex_dspy.wire import value_to_any

    bridge = spawn_bridge("--max-watchers", "8", "--max-watchers-per-client", "1", "--max-history-bytes", "2500000")
    channel = fresh_channel(bridge.address or "")
    stub = pb_grpc.BridgeServiceStub(channel)
    try:
        stub.InitializeSession(pb.InitializeSessionRequest(session_id="c"), timeout=DEADLINE)
        stub.RegisterVariable(
            pb.RegisterVariableRequest(
                session_id="c", name="h", type="string", initial_value=value_to_any("string", "")
            ),
            timeout=DEADLINE,
        )
        first = stub.WatchVariables(pb.WatchVariablesRequest(session_id="c", include_initial_values=True))
        assert next(first).update_type == "initial_value"
        second = stub.WatchVariables(pb.WatchVariablesRequest(session_id="c", include_initial_values=True))
        with pytest.raises(grpc.RpcError) as info:
            next(second)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watch streams of one client" in info.value.details()
        first.cancel()
        for i in range(5):
            value = value_to_any("string", str(i) * 1_000_000)
            stub.SetVariable(
                pb.SetVariableRequest(session_id="c", variable_identifier="h", value=value), timeout=DEADLINE
            )
        history = stub.GetVariableHistory(
            pb.GetVariableHistoryRequest(session_id="c", variable_identifier="h"), timeout=DEADLINE
        ).entries
        assert [e.version for e in history] == [6, 5]
    finally:
        channel.close()
        bridge.stop()
