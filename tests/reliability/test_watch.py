"""Watches under load stay ordered, unique and convergent, with connections reset under them."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from tests.reliability.conftest import Served
from tests.support.proxy import FaultProxy
from tests.support.watch_validators import WatchLog

pytestmark = pytest.mark.reliability

SID = "w"
VARIABLES = [f"x{i}" for i in range(5)]
WATCHERS = 6
WRITERS = 3
WRITES_PER_WRITER = 4000
DEADLINE = 60.0


def test_the_validators_catch_violations() -> None:
    log = WatchLog()
    log.new_stream()
    for version in (1, 3, 2, 3):
        log.record("a", version)
    log.new_stream()
    log.record("a", 1)
    problems = log.problems({"a": 4})
    assert any(p.startswith("out of order") for p in problems)
    assert any(p.startswith("duplicate") for p in problems)
    assert any(p.startswith("went back") for p in problems)
    assert any(p.startswith("not converged") for p in problems)


class Watcher(threading.Thread):
    def __init__(self, address: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.log = WatchLog()
        self.reconnects = 0
        self.updates = 0
        self._stop_event = stop
        self._channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self._stub = pb_grpc.BridgeServiceStub(self._channel)
        self._call: grpc.Future | None = None

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.log.new_stream()
            call = self._stub.WatchVariables(
                pb.WatchVariablesRequest(session_id=SID, include_initial_values=True), wait_for_ready=True
            )
            self._call = call
            try:
                for update in call:
                    if update.update_type in ("initial_value", "value_change"):
                        self.log.record(update.variable.name, update.variable.version)
                        self.updates += 1
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            self.reconnects += 1

    def close(self) -> None:
        self._stop_event.set()
        if self._call is not None:
            self._call.cancel()
        self.join(DEADLINE)
        self._channel.close()


@pytest.mark.parametrize("resets", [False, True], ids=["steady", "with-resets"])
def test_watches_under_load_are_ordered_unique_and_convergent(served: Served, proxy: FaultProxy, resets: bool) -> None:
    served.store.create_session(SID)
    for name in VARIABLES:
        served.store.register_variable(SID, name, "integer", 0)
    stop = threading.Event()
    watchers = [Watcher(proxy.address, stop) for _ in range(WATCHERS)]
    for w in watchers:
        w.start()
    end = time.monotonic() + DEADLINE
    while any(len(w.log.last_versions()) < len(VARIABLES) for w in watchers):
        assert time.monotonic() < end, "the watchers did not receive their initial values"
        time.sleep(0.02)
    rounds = [0]
    wanted_rounds = 5 if resets else 0

    def write(seed: int) -> None:
        rng = random.Random(seed)
        i = 0
        while i < WRITES_PER_WRITER or rounds[0] < wanted_rounds:
            served.store.set_variable(SID, rng.choice(VARIABLES), i, source="worker")
            i += 1
            if i % 50 == 0:
                time.sleep(0.001)  # leave the streams some room to interleave with the writes

    writers = [threading.Thread(target=write, args=(s,)) for s in range(WRITERS)]
    for t in writers:
        t.start()
    while any(t.is_alive() for t in writers):
        if resets:
            rounds[0] += proxy.reset() > 0
        time.sleep(0.05)
    final = {name: served.store.get_variable(SID, name).version for name in VARIABLES}
    end = time.monotonic() + DEADLINE
    try:
        while any(w.log.last_versions() != final for w in watchers):
            assert time.monotonic() < end, "the watchers did not converge on the final versions"
            time.sleep(0.05)
    finally:
        for w in watchers:
            w.close()
    total = sum(w.updates for w in watchers)
    problems = [p for w in watchers for p in w.log.problems(final)]
    print(
        f"\nwatch ({'with' if resets else 'no'} resets, {rounds[0]} reset rounds): {total} updates over "
        f"{WATCHERS} watchers validated, {sum(w.reconnects for w in watchers)} reconnects, "
        f"{WRITERS * WRITES_PER_WRITER} writes; problems: {problems[:5]}"
    )
    assert not problems
    assert total >= WATCHERS * len(VARIABLES)
    if resets:
        assert rounds[0] >= wanted_rounds
