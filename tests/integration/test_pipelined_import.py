"""A non-atomic import travels in parts, each sent while the next is checked, and still lands whole or
not at all; a context's switch into a session it made imports that way (real gRPC bridges)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from dspex_dspy import Context, Variables
from dspex_dspy.errors import ValidationError, VariableExistsError
from dspex_dspy.remote import RemoteStore
from dspex_dspy.remote.store import PIPELINED_IMPORT_CHUNK
from dspex_dspy.server import BridgeServer, create_server
from dspex_dspy.store import SessionStore
from dspex_dspy.types import Variable
from tests.support.old_bridge import older_bridge

pytestmark = pytest.mark.integration

COUNT = 2 * PIPELINED_IMPORT_CHUNK + PIPELINED_IMPORT_CHUNK // 2  # two whole parts and a half one


class CountingStore(SessionStore):
    """Records the size of every ``ImportVariables`` call the bridge serves (what it imports per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[int] = []
        self._lock = threading.Lock()

    def import_variable_ids(self, session_id: str, variables: Sequence[Variable]) -> list[str]:
        with self._lock:
            self.parts.append(len(variables))
        return super().import_variable_ids(session_id, variables)


@pytest.fixture
def bridge() -> Iterator[BridgeServer]:
    server, _ = create_server(CountingStore(), "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def counted(server: BridgeServer) -> CountingStore:
    store = server.store
    assert isinstance(store, CountingStore)
    return store


def many(count: int = COUNT) -> list[Variable]:
    return [Variable("", f"v{i}", "integer", i, version=1 + i % 3, created_at=1000.0 + i) for i in range(count)]


def test_a_non_atomic_import_travels_in_parts_and_lands_whole(bridge: BridgeServer) -> None:
    with RemoteStore.connect(bridge.address) as remote:
        remote.create_session("s")
        made = remote.import_variables("s", many(), atomic=False)
    assert sorted(counted(bridge).parts) == sorted([PIPELINED_IMPORT_CHUNK] * 2 + [PIPELINED_IMPORT_CHUNK // 2])
    stored = bridge.store.list_variables("s")
    assert [v.name for v in stored] == [f"v{i}" for i in range(COUNT)]
    assert [(v.value, v.version, v.created_at) for v in stored] == [(i, 1 + i % 3, 1000.0 + i) for i in range(COUNT)]
    # The records answered carry the ids the bridge gave, each to its own variable, in input order.
    assert [(v.name, v.id) for v in made] == [(v.name, v.id) for v in stored]


def test_an_atomic_import_is_one_call_and_a_small_one_is_never_split(bridge: BridgeServer) -> None:
    with RemoteStore.connect(bridge.address) as remote:
        remote.create_session("s")
        remote.import_variables("s", many())
        remote.create_session("t")
        remote.import_variables("t", many(PIPELINED_IMPORT_CHUNK), atomic=False)
    assert counted(bridge).parts == [COUNT, PIPELINED_IMPORT_CHUNK]


def test_a_part_the_bridge_refuses_undoes_every_part_it_made(bridge: BridgeServer) -> None:
    bridge.store.create_session("s")
    bridge.store.register_variable("s", "v2300", "string", "already here")  # only the third part meets it
    with RemoteStore.connect(bridge.address) as remote, pytest.raises(VariableExistsError, match="v2300"):
        remote.import_variables("s", many(), atomic=False)
    assert len(counted(bridge).parts) == 3  # every part reached the bridge ...
    assert [v.name for v in bridge.store.list_variables("s")] == ["v2300"]  # ... and none is left


def test_a_bad_variable_found_after_parts_were_sent_undoes_them(bridge: BridgeServer) -> None:
    variables = many()
    variables[PIPELINED_IMPORT_CHUNK + 10] = Variable("", "bad", "integer", 1, version=0)
    with RemoteStore.connect(bridge.address) as remote:
        remote.create_session("s")
        with pytest.raises(ValidationError, match="version"):
            remote.import_variables("s", variables, atomic=False)
    assert counted(bridge).parts == [PIPELINED_IMPORT_CHUNK]  # the first part had gone when "bad" was checked
    assert bridge.store.list_variables("s") == []


def test_a_non_atomic_import_to_an_older_bridge_registers_one_by_one() -> None:
    with older_bridge() as (port, store):
        with RemoteStore.connect(f"127.0.0.1:{port}") as remote:
            remote.create_session("s")
            made = remote.import_variables("s", many(PIPELINED_IMPORT_CHUNK + 200), atomic=False)
        assert [v.name for v in made] == [f"v{i}" for i in range(PIPELINED_IMPORT_CHUNK + 200)]
        stored = store.list_variables("s")
        assert [(v.name, v.version) for v in stored] == [
            (f"v{i}", 1 + i % 3) for i in range(PIPELINED_IMPORT_CHUNK + 200)
        ]


def test_a_switch_into_a_session_it_made_imports_in_parts(bridge: BridgeServer) -> None:
    ctx = Context(bridge=bridge.address)
    try:
        for i in range(COUNT):
            Variables.defvariable(ctx, f"v{i}", "integer", i)
        Variables.set(ctx, "v7", 70)
        ctx.ensure_bridged()
        assert len(counted(bridge).parts) == 3
        listed = Variables.list(ctx)
        assert [v.name for v in listed] == [f"v{i}" for i in range(COUNT)]
        assert (listed[7].value, listed[7].version) == (70, 2)
    finally:
        ctx.stop()
