"""Worker clients across ``fork``: a child never uses the channel it inherited.

The parent uses a client, then a ``multiprocessing`` pool of 4 forked children each uses that same
client object (inherited, not pickled): it must reconnect in the child, on a channel of its own,
and never hang. 20 pools in a row. The parent is a process spawned for the test, a plain client
program. The bridge runs in a process of its own: a process serving a
bridge in process runs grpc.aio, which does not support fork. (An inherited asyncio
client refuses use in a child with a clear error: grpc.aio does not support fork at all, see
``docs/multiprocessing.md``.)
"""

from __future__ import annotations

import multiprocessing
import secrets
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from dspex_dspy.client import SessionContext
from dspex_dspy.remote import RemoteStore
from tests.conftest import BridgeProcess

pytestmark = pytest.mark.integration

ROUNDS = 20
CHILDREN = 4
POOL_DEADLINE_S = 60.0
PARENT_DEADLINE_S = 240.0

# The client the forked children inherit (set by the test before each pool starts).
INHERITED: dict[str, Any] = {}


class Bridge:
    """A bridge process, and a store client of it."""

    def __init__(self, process: BridgeProcess) -> None:
        self.address = process.address or ""
        self.store = RemoteStore.connect(self.address)


@pytest.fixture(scope="module")
def bridge(remote_bridge: BridgeProcess) -> Iterator[Bridge]:
    served = Bridge(remote_bridge)
    yield served
    served.store.close()


def use_sync(i: int) -> tuple[int, Any, bool]:
    ctx: SessionContext = INHERITED["ctx"]
    version = ctx.set_variable("x", i)
    record = ctx.get_variable_record("x")
    return version, ctx.get_versioned_many(["y"])["y"][0], record.version >= version


def new_session(bridge: Bridge) -> str:
    session = "fork_" + secrets.token_hex(4)
    bridge.store.create_session(session)
    bridge.store.register_variable(session, "x", "integer", 0)
    bridge.store.register_variable(session, "y", "integer", 7)
    return session


def fork_pools(address: str, session: str) -> None:
    """20 rounds: the client is used, then inherited by a fork pool whose children use it too.

    Runs in a freshly spawned process (the pools' parent), so threads that other code of the test
    process may have left inside gRPC (a fork skips gRPC's fork handlers then) cannot interfere.
    """
    fork = multiprocessing.get_context("fork")
    store = RemoteStore.connect(address)
    client = SessionContext.connect(address, session)
    INHERITED["ctx"] = client
    try:
        for round_ in range(ROUNDS):
            client.set_variable("x", -round_)
            watch = client.watch_variables(["y"])
            assert next(watch).value == client["y"] == 7
            with fork.Pool(CHILDREN) as pool:
                results = pool.map_async(use_sync, range(CHILDREN * 2)).get(timeout=POOL_DEADLINE_S)
            watch.close()
            assert [value for _, value, _ in results] == [7] * (CHILDREN * 2), results
            assert all(fresh for _, _, fresh in results), results
            # The parent's client still works, and its cache follows the children's writes.
            last = store.get_variable(session, "x").version
            assert last > 2 * CHILDREN * round_
            assert client.wait_cached("x", last, POOL_DEADLINE_S)
    finally:
        INHERITED.clear()
        client.close()
        store.close()


def run_fork_pools(address: str, session: str, report: Connection) -> None:
    """:func:`fork_pools` in the spawned parent; sends None, or the traceback of what failed."""
    try:
        fork_pools(address, session)
    except BaseException:
        report.send(traceback.format_exc())
        raise
    report.send(None)


def test_a_fork_pool_uses_an_inherited_client_20_times_in_a_row(bridge: Bridge) -> None:
    session = new_session(bridge)
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    parent = spawn.Process(target=run_fork_pools, args=(bridge.address, session, send), name="fork-pools")
    parent.start()
    try:
        assert receive.poll(PARENT_DEADLINE_S), f"the fork pools did not finish in {PARENT_DEADLINE_S} s"
        failure = receive.recv()
        assert failure is None, failure
    finally:
        parent.kill()
        parent.join()
    assert bridge.store.get_variable(session, "x").version > 2 * CHILDREN * (ROUNDS - 1)
