"""Memory the limits bound: every stored byte counts against a documented limit.

The server runs in its own process (``dspex-bridge serve``); its resident memory is read from
``/proc/PID/status`` before and after each workload, and must grow by far less than the workload
would store without the limits (margins are generous: allocators keep freed memory)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import LimitExceededError
from dspex_dspy.store import SessionStore, StoreLimits
from dspex_dspy.wire import value_to_any
from tests.conftest import BridgeProcess

pytestmark = pytest.mark.reliability

MB = 1_000_000
TIMEOUT = 60.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


class Target:
    def __init__(self, bridge: BridgeProcess) -> None:
        self.bridge = bridge
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(bridge.address or "", options=options)
        self.stub = pb_grpc.BridgeServiceStub(self.channel)
        self.stub.InitializeSession(pb.InitializeSessionRequest(session_id="m"), timeout=TIMEOUT)

    @property
    def rss(self) -> float:
        return rss_mb(self.bridge.proc.pid)

    def code(self, call: Callable[[], object]) -> grpc.StatusCode:
        try:
            call()
        except grpc.RpcError as err:
            assert err.code() != grpc.StatusCode.INTERNAL, err.details()
            return err.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    def register(self, name: str, **fields: object) -> grpc.StatusCode:
        request = pb.RegisterVariableRequest(
            session_id="m", name=name, type="string", initial_value=value_to_any("string", "v"), **fields
        )
        return self.code(lambda: self.stub.RegisterVariable(request, timeout=TIMEOUT))


@pytest.fixture
def target(spawn_bridge: Callable[..., BridgeProcess], monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    # Fewer malloc arenas: freed memory of the many server threads is reused, not kept per thread.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    bridge = spawn_bridge()
    t = Target(bridge)
    yield t
    t.channel.close()
    bridge.stop()


def _measure(
    target: Target, workload: Callable[[int], grpc.StatusCode], rounds: int, warmup: int = 3
) -> tuple[float, dict[str, int]]:
    for i in range(warmup):
        workload(-1 - i)
    before = target.rss
    codes: dict[str, int] = {}
    for i in range(rounds):
        code = workload(i).name
        codes[code] = codes.get(code, 0) + 1
    return target.rss - before, codes


def test_session_metadata_is_bounded(target: Target) -> None:
    meta = {f"k{i}": "v" * 1000 for i in range(5000)}  # 5 MB

    def workload(i: int) -> grpc.StatusCode:
        request = pb.InitializeSessionRequest(session_id=f"big{i + 10}", metadata=meta)
        return target.code(lambda: target.stub.InitializeSession(request, timeout=TIMEOUT))

    # Parsing a 5 MB map leaves each server thread with memory the allocator keeps for reuse: it
    # levels off after some tens of requests, so the measure starts after that.
    grown, codes = _measure(target, workload, rounds=40, warmup=40)
    print(f"\n40 sessions with 5 MB of metadata: server RSS {grown:+.1f} MB, answers {codes}")
    assert codes == {"RESOURCE_EXHAUSTED": 40}
    missing = target.code(lambda: target.stub.GetSession(pb.GetSessionRequest(session_id="big10"), timeout=TIMEOUT))
    assert missing == grpc.StatusCode.NOT_FOUND
    assert grown < 60, f"the server grew by {grown:.1f} MB (unbounded it grows by ~200 MB)"


@pytest.mark.parametrize("field", ["metadata", "description"])
def test_variable_metadata_and_descriptions_are_bounded(target: Target, field: str) -> None:
    def workload(i: int) -> grpc.StatusCode:
        big: object = {"blob": "m" * MB} if field == "metadata" else "d" * MB
        return target.register(f"v{i + 10}", **{field: big})

    grown, codes = _measure(target, workload, rounds=100, warmup=50)
    print(f"\n100 x 1 MB {field}: server RSS {grown:+.1f} MB, answers {codes}")
    assert codes == {"RESOURCE_EXHAUSTED": 100}
    assert grown < 30, f"the server grew by {grown:.1f} MB (unbounded it grows by ~110 MB)"


def test_history_is_bounded_by_bytes(target: Target) -> None:
    assert target.register("h") == grpc.StatusCode.OK

    def workload(i: int) -> grpc.StatusCode:
        value = value_to_any("string", chr(ord("a") + i % 26) * MB)
        request = pb.SetVariableRequest(session_id="m", variable_identifier="h", value=value)
        return target.code(lambda: target.stub.SetVariable(request, timeout=TIMEOUT))

    grown, codes = _measure(target, workload, rounds=100, warmup=20)
    print(f"\n100 writes of 1 MB to one variable: server RSS {grown:+.1f} MB, answers {codes}")
    assert codes == {"OK": 100}
    history = target.stub.GetVariableHistory(
        pb.GetVariableHistoryRequest(session_id="m", variable_identifier="h"), timeout=TIMEOUT
    ).entries
    assert 1 <= len(history) <= 5  # 4 MiB of history per variable by default
    assert grown < 40, f"the server grew by {grown:.1f} MB (unbounded it grows by ~100 MB)"


# ----------------------------------------------------------------------------- every limit, in the store


def test_each_byte_limit_is_resource_exhausted_and_changes_nothing() -> None:
    limits = StoreLimits(
        max_session_metadata_bytes=100,
        max_variable_metadata_bytes=100,
        max_description_bytes=100,
        max_constraints_bytes=100,
        max_value_bytes=1000,
        max_history_bytes=2500,
        max_session_bytes=6000,
        max_total_bytes=7000,
    )
    store = SessionStore(limits=limits)
    with pytest.raises(LimitExceededError, match="session metadata bytes"):
        store.create_session("s", {"k": "v" * 200})
    store.create_session("s")
    with pytest.raises(LimitExceededError, match="metadata bytes"):
        store.register_variable("s", "a", "string", "x", metadata={"k": "v" * 200})
    with pytest.raises(LimitExceededError, match="description bytes"):
        store.register_variable("s", "a", "string", "x", description="d" * 200)
    with pytest.raises(LimitExceededError, match="constraints bytes"):
        store.register_variable("s", "a", "string", "x", constraints={"enum": ["c" * 50, "d" * 50, "x"]})
    with pytest.raises(LimitExceededError, match="value size"):
        store.register_variable("s", "a", "string", "x" * 2000)
    assert store.list_variables("s") == []

    store.register_variable("s", "a", "string", "x", metadata={"k": "v"})
    with pytest.raises(LimitExceededError, match="metadata bytes"):
        store.set_variable("s", "a", "y", metadata={"big": "b" * 200})
    assert store.get_variable("s", "a").version == 1

    # History is trimmed by bytes: writes of 900 bytes keep at most two entries (2500 bytes).
    for i in range(5):
        store.set_variable("s", "a", str(i) * 900)
    assert len(store.get_history("s", "a")) == 2

    # The session's total: more variables of 900 bytes until it is full.
    made = 0
    with pytest.raises(LimitExceededError, match="bytes held by the session"):
        for i in range(20):
            store.register_variable("s", f"b{i}", "string", "z" * 900)
            made += 1
    assert 1 <= made < 6
    assert len(store.list_variables("s")) == made + 1

    # An atomic batch that would pass the session's total applies nothing.
    names = [v.name for v in store.list_variables("s")]
    result = store.set_variables("s", {n: "w" * 999 for n in names}, atomic=True)
    assert result.errors and not result.new_versions

    # Deleting frees the bytes again.
    for i in range(made):
        store.delete_variable("s", f"b{i}")
    store.register_variable("s", "again", "string", "z" * 900)

    # The store's total over sessions.
    store.create_session("t")
    with pytest.raises(LimitExceededError, match="bytes held by the store"):
        for i in range(20):
            store.register_variable("t", f"c{i}", "string", "q" * 900)
