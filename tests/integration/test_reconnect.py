"""Worker clients across a restart of a standalone bridge (``python -m dspex_dspy.cli serve``).

The server runs as a subprocess (the ``spawn_bridge`` fixture of ``tests/conftest.py``); it is
stopped (SIGTERM, or SIGKILL) and started again on the same port, and the test re-creates the
session's state through :class:`~dspex_dspy.remote.RemoteStore`, as an orchestrator would. Each
test runs for the blocking and the asyncio client. Waits are bounded and end on an event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from workers.adapters import CLIENTS, DEADLINE_S, reads, wait_for

from dspex_dspy.errors import BridgeUnavailableError
from dspex_dspy.remote import RemoteStore
from dspex_dspy.types import Variable

pytestmark = pytest.mark.integration


@pytest.fixture(params=sorted(CLIENTS))
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(address: str, session_id: str) -> Any:
        client = CLIENTS[request.param].connect(address, session_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def history(events: list[Any], name: str) -> list[tuple[int, Any]]:
    """``(version, value)`` of each non-deletion event of ``name``."""
    return [(e.version, e.value) for e in events if e.name == name and e.update_type != "deleted"]


def start_session(address: str) -> RemoteStore:
    orchestrator = RemoteStore.connect(address, timeout=DEADLINE_S)
    orchestrator.create_session("s")
    return orchestrator


@pytest.mark.parametrize("stop", ["terminate", "kill"])
def test_watchers_and_clients_recover_without_repeats_or_going_back(
    spawn_bridge: Callable[..., Any], make_client: Callable[..., Any], stop: str
) -> None:
    first = spawn_bridge()
    address = first.address
    port = address.rsplit(":", 1)[1]
    orchestrator = start_session(address)
    orchestrator.register_variable("s", "counter", "integer", 0)
    orchestrator.register_variable("s", "label", "string", "a")

    client = make_client(address, "s")
    events, stop_watch = client.watch()
    seen = events.gather(lambda got: {e.name for e in got} == {"counter", "label"})
    for value in range(1, 11):
        orchestrator.set_variable("s", "counter", value)
    seen += events.until(lambda e: e.name == "counter" and e.value == 10)
    assert client.wait_cached("counter", 11)
    state: list[Variable] = orchestrator.list_variables("s")
    orchestrator.close()

    if stop == "kill":
        first.kill()
    first.stop()  # waits until the process is gone and its port is free
    assert wait_for(lambda: client.cached("counter") is None), "the cache kept serving while the watch was down"
    with pytest.raises(BridgeUnavailableError):
        client.get("counter")

    second = spawn_bridge("--port", port)
    assert second.address == address
    orchestrator = start_session(address)
    orchestrator.import_variables("s", state)
    for value in range(11, 21):
        orchestrator.set_variable("s", "counter", value)

    seen += events.gather(lambda got: any(e.name == "counter" and e.value == 20 for e in got))
    assert wait_for(lambda: reads(client, "counter") == 20)
    assert client.wait_cached("counter", 21)
    assert client.cached("counter") == (20, 21)
    assert client.set("label", "b") == 2
    assert orchestrator.get_variable("s", "label").value == "b"
    seen += events.until(lambda e: e.name == "label" and e.version == 2)
    stop_watch()
    orchestrator.close()

    counter = history(seen, "counter")
    versions = [version for version, _ in counter]
    assert versions == sorted(set(versions)), counter
    assert counter[0] == (1, 0) and counter[-1] == (21, 20)
    assert all(version == value + 1 for version, value in counter)
    assert history(seen, "label") == [(1, "a"), (2, "b")]


def test_a_variable_recreated_from_scratch_is_a_new_incarnation(
    spawn_bridge: Callable[..., Any], make_client: Callable[..., Any]
) -> None:
    first = spawn_bridge()
    address = first.address
    orchestrator = start_session(address)
    orchestrator.register_variable("s", "counter", "integer", 0)
    for value in range(1, 6):
        orchestrator.set_variable("s", "counter", value)
    orchestrator.close()

    client = make_client(address, "s")
    events, stop_watch = client.watch(["counter"])
    seen = events.until(lambda e: e.value == 5)
    first.stop()

    second = spawn_bridge("--port", address.rsplit(":", 1)[1])
    orchestrator = start_session(second.address)
    orchestrator.register_variable("s", "counter", "integer", 100)  # versions start again at 1
    orchestrator.set_variable("s", "counter", 101)
    seen += events.until(lambda e: e.value == 101)
    stop_watch()
    orchestrator.close()

    # The rule: a new creation time starts a new incarnation, whose versions count again from 1
    # (the watch sees version 1 only if it reconnected before the second write).
    assert [(e.version, e.value) for e in seen] in ([(6, 5), (1, 100), (2, 101)], [(6, 5), (2, 101)])
    assert wait_for(lambda: client.cached("counter") == (101, 2))
