"""Recorded histories of get / set / CAS per variable are linearizable: embedded (the store in this
process) and remote (gRPC through a proxy that resets every connection again and again)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from dspex_dspy.errors import BridgeUnavailableError, VersionConflictError
from dspex_dspy.remote import RemoteStore
from dspex_dspy.store import SessionStore
from tests.reliability.conftest import Served
from tests.support.linearizability import CAS_FAILED, History, Operation, check, check_register
from tests.support.proxy import FaultProxy

pytestmark = pytest.mark.reliability

KEYS = ("a", "b", "c")
THREADS = 4
OPS_PER_THREAD = 400
RESET_EVERY = 40  # operations begun (by all threads) per connection-reset round of the remote test


# ----------------------------------------------------------------------------- the checker itself


def _op(kind: str, args: tuple[Any, ...], call: float, ret: float, output: Any, known: bool = True) -> Operation:
    return Operation("k", kind, args, call, ret if known else float("inf"), output, known)


def test_the_checker_accepts_a_concurrent_but_linearizable_history() -> None:
    ops = [
        _op("set", ("v1",), 0, 10, 2),
        _op("get", (), 1, 3, ("v0", 1)),  # overlaps the write: may read the old value
        _op("get", (), 2, 12, ("v1", 2)),
        _op("cas", ("v2", 2), 11, 13, 3),
        _op("cas", ("v3", 2), 11, 14, (CAS_FAILED, 3)),
    ]
    assert check_register(ops, ("v0", 1))


@pytest.mark.parametrize(
    "ops",
    [
        # A read after a completed write sees the old value (stale read).
        [_op("set", ("v1",), 0, 1, 2), _op("get", (), 2, 3, ("v0", 1))],
        # Two compare-and-swaps on the same version both succeed.
        [_op("cas", ("x", 1), 0, 5, 2), _op("cas", ("y", 1), 0, 5, 2)],
        # A write reports a version that skips one.
        [_op("set", ("v1",), 0, 1, 3)],
        # A read returns a value no one wrote.
        [_op("set", ("v1",), 0, 1, 2), _op("get", (), 2, 3, ("zz", 2))],
    ],
    ids=["stale-read", "double-cas", "skipped-version", "phantom-value"],
)
def test_the_checker_rejects_violations(ops: list[Operation]) -> None:
    assert not check_register(ops, ("v0", 1))


def test_an_unknown_write_may_or_may_not_have_happened() -> None:
    unknown = _op("set", ("u",), 0, 0, None, known=False)
    assert check_register([unknown, _op("get", (), 5, 6, ("v0", 1))], ("v0", 1))
    assert check_register([unknown, _op("get", (), 5, 6, ("u", 2))], ("v0", 1))
    assert not check_register([unknown, _op("get", (), 5, 6, ("w", 2))], ("v0", 1))


# ----------------------------------------------------------------------------- real histories


def _run(
    history: History,
    read: Callable[[str], tuple[Any, int]],
    write: Callable[[str, str], int],
    cas: Callable[[str, str, int], int],
    unavailable: type[Exception] | tuple[type[Exception], ...],
    seed: int,
) -> None:
    rng = random.Random(seed)
    last_seen: dict[str, int] = dict.fromkeys(KEYS, 1)
    for i in range(OPS_PER_THREAD):
        key = rng.choice(KEYS)
        roll = rng.random()
        value = f"t{seed}-{i}"
        if roll < 0.4:
            op = history.call(key, "get", ())
            try:
                got = read(key)
            except unavailable:
                history.unknown(op)
                continue
            history.ok(op, got)
            last_seen[key] = got[1]
        elif roll < 0.7:
            op = history.call(key, "set", (value,))
            try:
                history.ok(op, write(key, value))
            except unavailable:
                history.unknown(op)
        else:
            expected = last_seen[key]
            op = history.call(key, "cas", (value, expected))
            try:
                history.ok(op, cas(key, value, expected))
            except VersionConflictError as exc:
                history.ok(op, (CAS_FAILED, exc.actual if exc.actual >= 0 else None))
            except unavailable:
                history.unknown(op)


def _threads(target: Callable[[int], None]) -> None:
    workers = [threading.Thread(target=target, args=(seed,)) for seed in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=240)
        assert not w.is_alive()


def test_embedded_histories_are_linearizable() -> None:
    store = SessionStore()
    store.create_session("lin")
    for key in KEYS:
        store.register_variable("lin", key, "string", "init")
    history = History()

    def read(key: str) -> tuple[Any, int]:
        var = store.get_variable("lin", key)
        return var.value, var.version

    def run(seed: int) -> None:
        _run(
            history,
            read,
            lambda k, v: store.set_variable("lin", k, v).version,
            lambda k, v, e: store.set_variable("lin", k, v, expected_version=e).version,
            (),
            seed,
        )

    _threads(run)
    result = check(history, dict.fromkeys(KEYS, ("init", 1)))
    print(f"\nembedded: {result}")
    assert result.operations >= THREADS * OPS_PER_THREAD * 0.9
    assert result.ok, str(result)


def test_remote_histories_through_connection_resets_are_linearizable(served: Served, proxy: FaultProxy) -> None:
    served.store.create_session("lin")
    for key in KEYS:
        served.store.register_variable("lin", key, "string", "init")
    history = History()
    stores = [RemoteStore.connect(proxy.address, call_timeout=10.0) for _ in range(THREADS)]
    stop = threading.Event()
    resets = 0
    started = [0] * THREADS  # operations each thread has begun

    def chaos() -> None:
        # A reset round per RESET_EVERY operations begun, not per stretch of time: a slow machine
        # gets as many rounds (and writes of unknown outcome, which the checker must place) as a
        # fast one, so the history's shape and the check's cost do not grow with the run's length.
        nonlocal resets
        next_round = RESET_EVERY
        while not stop.wait(0.005):
            if sum(started) >= next_round:
                next_round += RESET_EVERY
                resets += proxy.reset() > 0

    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()

    def run(seed: int) -> None:
        remote = stores[seed]

        def read(key: str) -> tuple[Any, int]:
            started[seed] += 1
            var = remote.get_variable("lin", key)
            return var.value, var.version

        def write(key: str, value: str) -> int:
            started[seed] += 1
            return remote.set_variable("lin", key, value).version

        def cas(key: str, value: str, expected: int) -> int:
            started[seed] += 1
            return remote.set_variable("lin", key, value, expected_version=expected).version

        _run(history, read, write, cas, BridgeUnavailableError, seed)

    try:
        _threads(run)
    finally:
        stop.set()
        chaos_thread.join()
        for remote in stores:
            remote.close()
    result = check(history, dict.fromkeys(KEYS, ("init", 1)))
    unknown = sum(1 for ops in history.by_key().values() for op in ops if not op.known)
    print(f"\nremote through {resets} reset rounds: {result} ({unknown} writes with unknown outcome)")
    assert resets > 0
    assert result.operations >= THREADS * OPS_PER_THREAD * 0.5
    assert result.ok, str(result)
