"""Worker clients across ``fork``: a child never uses the channel it inherited.

The parent uses a client, then a ``multiprocessing`` pool of 4 forked children each uses that same
client object (inherited, not pickled): it must reconnect in the child, on a channel of its own,
and never hang. 20 pools in a row, in a spawned process that serves the bridge itself, and 20
more against a bridge in another process (where, without the client taking its cache stream out
of gRPC for each fork, children crashed inside gRPC in most runs). The parent's cache stream and
a watch stay open across every fork. (An inherited asyncio client refuses use in a child with a
clear error: grpc.aio does not support fork at all, see ``docs/multiprocessing.md``.)
"""

from __future__ import annotations

import multiprocessing
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from support.spawned import run_spawned

from dspex_dspy.client import SessionContext
from dspex_dspy.remote import RemoteStore
from dspex_dspy.server import create_server

pytestmark = pytest.mark.integration

ROUNDS = 20
CHILDREN = 4
POOL_DEADLINE_S = 60.0
PARENT_DEADLINE_S = 240.0

# The client the forked children inherit (set by the test before each pool starts).
INHERITED: dict[str, Any] = {}


def use_sync(i: int) -> tuple[int, Any, bool]:
    ctx: SessionContext = INHERITED["ctx"]
    version = ctx.set_variable("x", i)
    record = ctx.get_variable_record("x")
    return version, ctx.get_versioned_many(["y"])["y"][0], record.version >= version


def new_session(store: RemoteStore) -> str:
    session = "fork_" + secrets.token_hex(4)
    store.create_session(session)
    store.register_variable(session, "x", "integer", 0)
    store.register_variable(session, "y", "integer", 7)
    return session


@contextmanager
def bridge_address(where: str) -> Iterator[str]:
    """A bridge served by this process (blocking server), or by a ``dspex-bridge serve`` process."""
    if where == "here":
        bridge, _ = create_server(heartbeat_interval=0.5, asyncio=False)
        bridge.start()
        try:
            yield bridge.address
        finally:
            bridge.stop(0)
        return
    command = [sys.executable, "-m", "dspex_dspy.cli", "serve", "--port", "0", "--heartbeat-interval", "0.5"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        found = re.search(r"listening on (\S+)", proc.stdout.readline())
        assert found, "the bridge process did not start"
        yield found.group(1)
    finally:
        proc.kill()
        proc.wait()


def fork_pools(where: str) -> None:
    """20 rounds: the parent uses its client, then a fork pool's children use the same object."""
    fork = multiprocessing.get_context("fork")
    with bridge_address(where) as address:
        store = RemoteStore.connect(address)
        session = new_session(store)
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
                assert client["x"] == store.get_variable(session, "x").value
        finally:
            INHERITED.clear()
            client.close()
            store.close()


@pytest.mark.parametrize("where", ["here", "another process"])
def test_a_fork_pool_uses_an_inherited_client_20_times_in_a_row(where: str) -> None:
    # The pools' parent is a fresh process of its own: what forking leaves inside gRPC stays there,
    # away from the test process and the tests after this one.
    #
    # With the bridge served by the forking process itself, gRPC skips its fork preparation at
    # every fork (the server's threads are always inside gRPC), and a child can then crash inside
    # gRPC, which leaves its pool waiting: about 2 runs of 20 rounds in 100 here, as
    # docs/multiprocessing.md says. Only that outcome (a pool that never answers) gets a second
    # run; a wrong value fails at once, and two hung runs fail the test.
    runs = 2 if where == "here" else 1
    for run in range(1, runs + 1):
        try:
            run_spawned(fork_pools, (where,), deadline_s=PARENT_DEADLINE_S, name="the fork pools")
            return
        except AssertionError as failure:
            if run == runs or "multiprocessing.context.TimeoutError" not in str(failure):
                raise
