"""Bridge nodes on one Redis: ``dspex-bridge serve --storage redis://...`` processes serving the same
sessions, clients failing over between them, and nothing acknowledged lost when nodes or Redis die.

Every node and every Redis is a real process (``tests/support/redis_server.py`` starts redis-server
on an ephemeral loopback port); workers are real subprocesses. Waits end on conditions, with
generous deadlines.
"""

from __future__ import annotations

import random
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from test_workers import Worker
from workers.adapters import CLIENTS, DEADLINE_S

from dspex_dspy import Context, Variables
from dspex_dspy.client import SessionContext
from dspex_dspy.errors import (
    BatchUpdateError,
    BridgeUnavailableError,
    DSPexError,
    VariableLockedError,
    VersionConflictError,
)
from dspex_dspy.remote import RemoteStore

pytestmark = pytest.mark.integration


def node(spawn_bridge: Callable[..., Any], url: str, *args: str) -> Any:
    return spawn_bridge("--storage", url, *args)


def wait_for(predicate: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_context_made_through_one_node_is_read_written_and_watched_through_another(
    spawn_bridge: Callable[..., Any], redis_url: str
) -> None:
    # Node A runs on uvloop (the default where installed), node B on the standard library's loop.
    a = node(spawn_bridge, redis_url)
    b = spawn_bridge("--storage", redis_url, env={"DSPEX_EVENT_LOOP": "asyncio"})
    assert any("(event loop: uvloop)" in line for line in a.output), a.output
    assert any("(event loop: asyncio)" in line for line in b.output), b.output
    with Context(bridge=a.address) as ctx:
        Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"max": 2.0})
        ctx.ensure_bridged()
        with SessionContext.connect(b.address, ctx.id) as worker, SessionContext.connect(b.address, ctx.id) as watcher:
            assert worker.get_variable("temperature") == 0.7
            assert worker.set_variable("temperature", 0.9) == 2
            assert Variables.get(ctx, "temperature") == 0.9
            with watcher.watch_variables(["temperature"]) as watch:
                first = next(watch)
                assert first.value == 0.9
                for value in (1.0, 1.1, 1.2):
                    Variables.set(ctx, "temperature", value)  # through node A
                seen = [first.version]
                while seen[-1] < 5:
                    seen.append(next(watch).version)
            assert seen == sorted(set(seen)) and seen[-1] == 5
            assert watcher.get_variable("temperature") == 1.2


def test_an_optimization_lease_taken_through_one_node_holds_on_every_node(
    spawn_bridge: Callable[..., Any], redis_url: str
) -> None:
    a, b = node(spawn_bridge, redis_url), node(spawn_bridge, redis_url)
    tuner = RemoteStore.connect(a.address)
    tuner.create_session("leased")
    tuner.register_variable("leased", "temperature", "float", 0.7)
    tuner.register_variable("leased", "model", "string", "small")
    # The worker reads without a cache: a lease starting or ending is not a write, so no watch
    # carries it; the watcher's events carry the status of the lease holding each write.
    worker = SessionContext.connect(b.address, "leased", cache=False)
    other = SessionContext.connect(b.address, "leased")
    with worker, other, other.watch_variables(["temperature"]) as watch:
        assert next(watch).optimization_status is None
        lease = tuner.start_optimization("leased", ["temperature", "model"], "tuner-1", ttl=60)

        # Through node B: the lease shows, other writers are refused, nothing changes.
        status = worker.get_variable_record("temperature").optimization_status
        assert status is not None and status.optimizer_id == "tuner-1"
        with pytest.raises(VariableLockedError, match="held by optimizer tuner-1"):
            worker.set_variable("temperature", 0.1)
        with pytest.raises(BatchUpdateError) as batch:
            worker.set_variables({"temperature": 0.1, "model": "large"})
        assert set(batch.value.errors) == {"temperature", "model"}
        with pytest.raises(VariableLockedError):
            worker.start_optimization(["model"], "tuner-2", ttl=60)
        with pytest.raises(VariableLockedError, match="rolling it back"):
            worker.rollback("temperature", 1)
        assert tuner.get_variable("leased", "temperature").version == 1

        # The holder writes through B; a watcher on B sees the write with the lease's status.
        assert worker.set_variable("temperature", 0.2, metadata={"optimizer_id": "tuner-1"}) == 2
        event = next(watch)
        assert (event.value, event.version) == (0.2, 2)
        assert event.optimization_status is not None and event.optimization_status.optimizer_id == "tuner-1"

        # A forced write through B passes and says over whose lease.
        assert worker.set_variable("temperature", 1.5, metadata={"dspex.force": "true"}) == 3
        forced = tuner.get_variable("leased", "temperature")
        assert forced.metadata["forced_over"] == "tuner-1" and "dspex.force" not in forced.metadata
        assert worker.history("temperature", 1)[0].metadata == {"forced_over": "tuner-1"}

        # Renewing through B keeps the lease's id; stopping it through B frees writes through A.
        renewed = worker.start_optimization(["temperature"], "tuner-1", ttl=60)
        assert renewed.id == lease.id
        worker.stop_optimization(lease.id)
        assert tuner.set_variable("leased", "model", "large").version == 2
        assert worker.get_variable_record("temperature").optimization_status is None

        # A lease whose optimizer died ends on every node when its ttl passes (Redis's clock). Taken
        # for long enough to be seen holding on B, then renewed short as the optimizer's last act.
        dying = tuner.start_optimization("leased", ["model"], "tuner-3", ttl=60)
        with pytest.raises(VariableLockedError, match="held by optimizer tuner-3"):
            worker.set_variable("model", "small")
        assert tuner.start_optimization("leased", ["model"], "tuner-3", ttl=0.5).id == dying.id
        wait_for(lambda: worker.get_variable_record("model").optimization_status is None, "the lease to expire")
        assert worker.set_variable("model", "small") == 3
    tuner.close()


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_a_worker_on_two_nodes_keeps_serving_when_one_is_killed(
    spawn_bridge: Callable[..., Any], redis_url: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = node(spawn_bridge, redis_url), node(spawn_bridge, redis_url)
    orchestrator = RemoteStore.connect(b.address)
    orchestrator.create_session("s")
    orchestrator.register_variable("s", "counter", "integer", 0)
    monkeypatch.setenv("DSPEX_BRIDGE_ADDRESS", f"{a.address},{b.address}")
    worker = CLIENTS[kind].connect(None, "s")  # the addresses come from DSPEX_BRIDGE_ADDRESS
    try:
        assert worker.wait_synced(DEADLINE_S)
        events, stop = worker.watch(["counter"])
        for i in range(1, 101):
            orchestrator.set_variable("s", "counter", i)
        seen = events.until(lambda e: e.value == 100)
        a.kill()  # SIGKILL the node the worker is connected to (the first address)
        for i in range(101, 201):
            orchestrator.set_variable("s", "counter", i)
        seen += events.until(lambda e: e.value == 200)
        stop()
        versions = [e.version for e in seen]
        assert versions == sorted(set(versions))  # strictly increasing: no duplicate, never back
        assert (seen[-1].version, seen[-1].value) == (201, 200)
        assert worker.wait_cached("counter", 201)
        assert worker.get("counter") == 200
        assert worker.set("counter", 201) == 202  # writes go to the live node
        assert orchestrator.get_variable("s", "counter").value == 201
    finally:
        worker.close()
        orchestrator.close()


def test_cas_increments_from_four_processes_through_two_nodes_are_exact(
    spawn_bridge: Callable[..., Any], redis_url: str
) -> None:
    a, b = node(spawn_bridge, redis_url), node(spawn_bridge, redis_url)
    orchestrator = RemoteStore.connect(a.address)
    orchestrator.create_session("s")
    orchestrator.register_variable("s", "counter", "integer", 0)
    workers = [
        Worker("cas", types.SimpleNamespace(bridge_address=addr, id="s"), "counter", "--times", "1000")
        for addr in (a.address, b.address, a.address, b.address)
    ]
    try:
        results = [w.result() for w in workers]
    finally:
        for w in workers:
            w.close()
    assert [r["done"] for r in results] == [1000] * 4
    final = orchestrator.get_variable("s", "counter")
    assert (final.value, final.version) == (4000, 4001)
    orchestrator.close()


def _write_until_killed(store: RemoteStore, acknowledged: dict[str, int], stop: threading.Event) -> None:
    """Register ``v<i>`` and bump ``counter`` in turn, recording each acknowledged result."""
    i = 0
    while not stop.is_set():
        try:
            store.register_variable("s", f"v{i}", "integer", i)
            acknowledged[f"v{i}"] = i
            acknowledged["counter"] = store.set_variable("s", "counter", i).version
        except DSPexError:
            return  # the node died: nothing more is acknowledged
        i += 1


def _check_acknowledged(store: RemoteStore, acknowledged: dict[str, int]) -> None:
    listed = {v.name: v for v in store.list_variables("s")}
    lost = [name for name in acknowledged if name != "counter" and listed.get(name) is None]
    assert not lost, f"{len(lost)} acknowledged registrations lost"
    assert all(listed[name].value == value for name, value in acknowledged.items() if name != "counter")
    counter = listed["counter"]
    assert counter.version >= acknowledged["counter"]
    history = store.get_history("s", "counter")
    assert [e.version for e in history] == list(range(counter.version, counter.version - len(history), -1))


def test_every_acknowledged_write_survives_kill_9_of_every_node_and_of_redis(
    spawn_bridge: Callable[..., Any], durable_redis: Callable[..., Any]
) -> None:
    redis = durable_redis("always")
    first = node(spawn_bridge, redis.url)
    store = RemoteStore.connect(first.address)
    store.create_session("s")
    store.register_variable("s", "counter", "integer", 0)
    acknowledged: dict[str, int] = {}
    stop = threading.Event()
    writer = threading.Thread(target=_write_until_killed, args=(store, acknowledged, stop), daemon=True)
    writer.start()
    wait_for(lambda: len(acknowledged) > 200, "some acknowledged writes")
    first.kill()
    writer.join(DEADLINE_S)
    stop.set()
    store.close()
    assert len(acknowledged) > 200

    second = node(spawn_bridge, redis.url)
    with RemoteStore.connect(second.address) as again:
        _check_acknowledged(again, acknowledged)
        redis.kill()  # SIGKILL Redis itself; it restarts from its append-only file
        redis.start()
        wait_for(lambda: _answers(again), "the node to reach the restarted Redis")
        _check_acknowledged(again, acknowledged)


def _answers(store: RemoteStore) -> bool:
    try:
        store.get_session("s")
    except BridgeUnavailableError:
        return False
    return True


# ------------------------------------------------------------------ linearizability


@dataclass(frozen=True)
class Op:
    """One completed operation on the register: what it was, when, and what it returned."""

    client: int
    kind: str  # "get", "set", "cas" (successful) or "cas-failed"
    start: float
    end: float
    version: int  # read or written (for a failed CAS: the version it expected)
    value: int


def linearizability_violations(initial: tuple[int, int], ops: list[Op]) -> list[str]:
    """Check a history of one versioned register for linearizability; return what is wrong.

    Every accepted write makes the next version, so the versions order the writes, and a history is
    linearizable when: the written versions are exactly the ones after the initial one, without gap
    or repeat; a read returns the value written at the version it reports; real time is respected
    (an operation that starts after another ended never reports an older version, nor the same one
    if it writes); and a compare-and-swap fails only if its expected version was not current for
    the whole time it ran.
    """
    problems: list[str] = []
    writes = sorted((op for op in ops if op.kind in ("set", "cas")), key=lambda op: op.version)
    expected_versions = list(range(initial[0] + 1, initial[0] + 1 + len(writes)))
    if [op.version for op in writes] != expected_versions:
        problems.append(f"written versions {[op.version for op in writes]} are not {expected_versions}")
    value_at = {initial[0]: initial[1], **{op.version: op.value for op in writes}}
    by_version = {op.version: op for op in writes}
    for op in ops:
        if op.kind == "get" and value_at.get(op.version) != op.value:
            problems.append(f"{op} read a value never written at version {op.version}")
    ordered = sorted(ops, key=lambda op: op.end)
    for a in ordered:
        for b in ops:
            if b.start <= a.end or a.kind == "cas-failed" or b.kind == "cas-failed":
                continue
            strict = b.kind in ("set", "cas")
            if b.version < a.version or (strict and b.version == a.version):
                problems.append(f"{b} started after {a} ended but reports an older version")
    for op in ops:
        if op.kind != "cas-failed":
            continue
        made = by_version.get(op.version)
        replaced = by_version.get(op.version + 1)
        current_before = op.version == initial[0] or (made is not None and made.end < op.start)
        if current_before and (replaced is None or replaced.start > op.end):
            problems.append(f"{op} failed although version {op.version} was current all along")
    return problems


def test_the_history_checker_rejects_what_is_not_linearizable() -> None:
    fine = [Op(0, "set", 0.0, 1.0, 2, 10), Op(1, "get", 2.0, 3.0, 2, 10), Op(2, "cas-failed", 2.0, 3.0, 1, 0)]
    assert linearizability_violations((1, 0), fine) == []
    stale_read = [Op(0, "set", 0.0, 1.0, 2, 10), Op(1, "get", 2.0, 3.0, 1, 0)]
    assert linearizability_violations((1, 0), stale_read)
    wrong_value = [Op(0, "set", 0.0, 1.0, 2, 10), Op(1, "get", 2.0, 3.0, 2, 11)]
    assert linearizability_violations((1, 0), wrong_value)
    lost_cas = [Op(0, "set", 0.0, 1.0, 2, 10), Op(1, "cas-failed", 2.0, 3.0, 2, 0)]
    assert linearizability_violations((1, 0), lost_cas)
    gap = [Op(0, "set", 0.0, 1.0, 3, 10)]
    assert linearizability_violations((1, 0), gap)


def test_get_set_cas_from_eight_clients_on_two_nodes_is_linearizable(
    spawn_bridge: Callable[..., Any], redis_url: str
) -> None:
    a, b = node(spawn_bridge, redis_url), node(spawn_bridge, redis_url)
    with RemoteStore.connect(a.address) as setup:
        setup.create_session("s")
        setup.register_variable("s", "x", "integer", 0)
    ops: list[Op] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def client(n: int) -> None:
        rng = random.Random(n)
        with RemoteStore.connect(a.address if n % 2 else b.address) as store:
            seen = 1
            barrier.wait(DEADLINE_S)
            for i in range(40):
                kind = rng.choice(("get", "set", "cas"))
                value = n * 1000 + i + 1  # every written value is unique
                start = time.monotonic()
                if kind == "get":
                    var = store.get_variable("s", "x")
                    op = Op(n, "get", start, time.monotonic(), var.version, var.value)
                    seen = var.version
                elif kind == "set":
                    var = store.set_variable("s", "x", value)
                    op = Op(n, "set", start, time.monotonic(), var.version, value)
                    seen = var.version
                else:
                    try:
                        var = store.set_variable("s", "x", value, expected_version=seen)
                        op = Op(n, "cas", start, time.monotonic(), var.version, value)
                        seen = var.version
                    except VersionConflictError as conflict:
                        op = Op(n, "cas-failed", start, time.monotonic(), seen, value)
                        seen = max(conflict.actual, seen)
                with lock:
                    ops.append(op)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 4)
    assert len(ops) == 320
    # Whether a racing compare-and-swap wins depends on the schedule, so a last client, alone on
    # node B, makes sure the history holds both outcomes: a swap from what it read, then a swap
    # from the version that swap replaced.
    with RemoteStore.connect(b.address) as store:
        start = time.monotonic()
        var = store.get_variable("s", "x")
        ops.append(Op(8, "get", start, time.monotonic(), var.version, var.value))
        for value in (8001, 8002):
            start = time.monotonic()
            try:
                done = store.set_variable("s", "x", value, expected_version=var.version)
                ops.append(Op(8, "cas", start, time.monotonic(), done.version, value))
            except VersionConflictError:
                ops.append(Op(8, "cas-failed", start, time.monotonic(), var.version, value))
    assert [op.kind for op in ops[-3:]] == ["get", "cas", "cas-failed"]
    assert {op.kind for op in ops} == {"get", "set", "cas", "cas-failed"}
    assert linearizability_violations((1, 0), ops) == []


def test_serve_refuses_an_unknown_storage_or_an_unreachable_redis() -> None:
    import subprocess
    import sys

    for storage, message in (
        ("bogus", "--storage must be 'memory' or a redis://"),
        ("redis://127.0.0.1:1/0", "cannot be reached"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "dspex_dspy.cli", "serve", "--port", "0", "--storage", storage],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1
        assert message in proc.stderr
