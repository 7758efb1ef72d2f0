"""Hostile input: random bytes to every RPC, every request field set to edge values, and the
specific inputs that used to break the server. Never ``INTERNAL``; nothing accepted may make a
later read fail; the server keeps serving. Each case count is printed (run with ``-s``)."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.guard import MAX_STATUS_MESSAGE
from dspex_dspy.store import glob as store_glob
from dspex_dspy.wire import value_to_any
from tests.reliability.conftest import Served

pytestmark = pytest.mark.reliability

SERVICE = pb.DESCRIPTOR.services_by_name["BridgeService"]
SID = "fz"
TIMEOUT = 20.0


def call_raw(served: Served, method: Any, payload: bytes) -> grpc.StatusCode:
    """Send ``payload`` as the request bytes of ``method``; return the status code."""
    path = f"/snakepit.bridge.BridgeService/{method.name}"
    try:
        if method.server_streaming:
            stream = served.channel.unary_stream(path)(payload, timeout=TIMEOUT)
            for _ in stream:
                stream.cancel()
                break
        else:
            served.channel.unary_unary(path)(payload, timeout=TIMEOUT)
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK
        assert code != grpc.StatusCode.INTERNAL, f"{method.name}: {err.details()}"
        return code  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def seed(served: Served) -> None:
    stub = served.stub
    stub.InitializeSession(pb.InitializeSessionRequest(session_id=SID), timeout=TIMEOUT)
    for name, type_, value in (("x", "float", 0.5), ("s", "string", "hello"), ("e", "embedding", [1.0, 2.0])):
        stub.RegisterVariable(
            pb.RegisterVariableRequest(session_id=SID, name=name, type=type_, initial_value=value_to_any(type_, value)),
            timeout=TIMEOUT,
        )


def reads_all_work(served: Served, session_id: str = SID) -> None:
    """Every read of the session answers (a stored value that breaks a read is the bug hunted here)."""
    stub = served.stub
    listed = stub.ListVariables(pb.ListVariablesRequest(session_id=session_id), timeout=TIMEOUT).variables
    names = [v.name for v in listed]
    stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT)
    stub.GetVariables(pb.BatchGetVariablesRequest(session_id=session_id, variable_identifiers=names), timeout=TIMEOUT)
    for name in names:
        stub.GetVariable(pb.GetVariableRequest(session_id=session_id, variable_identifier=name), timeout=TIMEOUT)
        stub.GetVariableHistory(
            pb.GetVariableHistoryRequest(session_id=session_id, variable_identifier=name), timeout=TIMEOUT
        )
    watch = stub.WatchVariables(
        pb.WatchVariablesRequest(session_id=session_id, include_initial_values=True), timeout=TIMEOUT
    )
    seen = 0
    for update in watch:
        if update.update_type == "initial_value":
            seen += 1
        if seen >= len(names):
            break
    watch.cancel()


def still_serves(served: Served) -> None:
    assert served.stub.Ping(pb.PingRequest(message="ok"), timeout=TIMEOUT).message == "pong: ok"
    reads_all_work(served)


def test_random_bytes_to_every_rpc_are_invalid_argument(served: Served) -> None:
    seed(served)
    rng = random.Random(1234)
    codes: Counter[str] = Counter()
    per_rpc = 30
    for method in SERVICE.methods:
        for _ in range(per_rpc):
            payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
            codes[call_raw(served, method, payload).name] += 1
    total = sum(codes.values())
    print(f"\nrandom bytes: {total} cases over {len(SERVICE.methods)} RPCs: {dict(codes)}")
    assert len(SERVICE.methods) == 24  # the 23 RPCs of the contract and ImportVariables
    assert total == 24 * per_rpc
    assert codes["INTERNAL"] == 0
    # Nearly all random bytes are not a valid message: those must be INVALID_ARGUMENT.
    assert codes["INVALID_ARGUMENT"] >= total * 0.8
    still_serves(served)


# ----------------------------------------------------------------------------- every field


def _any_values() -> list[any_pb2.Any]:
    prefix = "type.googleapis.com/snakepit."
    return [
        any_pb2.Any(),
        any_pb2.Any(type_url=prefix + "float", value=b"1e999"),
        any_pb2.Any(type_url=prefix + "float", value=b"\xff\xfe"),
        any_pb2.Any(type_url=prefix + "integer", value=b"99999999999999999999999"),
        any_pb2.Any(type_url=prefix + "tensor", value=b'{"shape":[1000000000,1000000000],"data":[]}'),
        any_pb2.Any(type_url=prefix + "embedding.binary", value=b'{"shape":[3]}'),
        any_pb2.Any(type_url=prefix + "string", value=b'"' + b"[" * 4096 + b'"'),
        any_pb2.Any(type_url=prefix + "nope", value=b"1"),
        any_pb2.Any(type_url="x" * 5000, value=os.urandom(64)),
        any_pb2.Any(type_url=prefix + "string", value=b"[" * 100_000),
    ]


def _timestamps() -> list[timestamp_pb2.Timestamp]:
    return [
        timestamp_pb2.Timestamp(seconds=2**63 - 1),
        timestamp_pb2.Timestamp(seconds=-(2**63)),
        timestamp_pb2.Timestamp(seconds=1, nanos=-1),
        timestamp_pb2.Timestamp(seconds=1, nanos=2_000_000_000),
        timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999),
        timestamp_pb2.Timestamp(seconds=0),
    ]


STRINGS = ["", "x", "e", "var_x_1", "*", "[", "a" * 300, "a" * 20_000, "\x00", "é✓\U0001f600", "x" * 129, "[!" * 600]
INT32 = [0, 1, -1, 2**31 - 1, -(2**31)]
INT64 = [0, -1, 2**63 - 1, -(2**63)]


def _values_for(field: FieldDescriptor) -> Iterator[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        if value_field.message_type is not None and value_field.message_type.full_name == "google.protobuf.Any":
            for any_msg in _any_values():
                yield {"x": any_msg}
            yield {"a" * 20_000: value_to_any("float", 1.0)}
        elif value_field.type == FieldDescriptor.TYPE_BYTES:
            yield {"e": os.urandom(24)}
            yield {"x": b""}
        elif value_field.type == FieldDescriptor.TYPE_STRING:
            yield {"": ""}
            yield {"source": "orchestrator"}
            yield {"k" * 1000: "v" * 200_000}
            yield {f"k{i}": "v" * 100 for i in range(2000)}
        else:
            yield {"x": 2**31 - 1}
        return
    repeated = field.is_repeated
    if field.message_type is not None:
        name = field.message_type.full_name
        if name == "google.protobuf.Any":
            singles: list[Any] = list(_any_values())
        elif name == "google.protobuf.Timestamp":
            singles = list(_timestamps())
        else:
            singles = [field.message_type._concrete_class()]  # an empty message of that type
    elif field.type == FieldDescriptor.TYPE_STRING:
        singles = list(STRINGS)
    elif field.type == FieldDescriptor.TYPE_BYTES:
        singles = [b"", b"\x00" * 9, os.urandom(4096)]
    elif field.type == FieldDescriptor.TYPE_BOOL:
        singles = [True, False]
    elif field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM):
        singles = list(INT32)
    elif field.type == FieldDescriptor.TYPE_INT64:
        singles = list(INT64)
    else:
        singles = [0]
    if repeated:
        for value in singles:
            yield [value]
        yield list(singles)
    else:
        yield from singles


def _base(request_class: Any, counter: int) -> Any:
    request = request_class()
    fields = request_class.DESCRIPTOR.fields_by_name
    if "session_id" in fields:
        request.session_id = SID
    if "variable_identifier" in fields:
        request.variable_identifier = "x"
    if request_class is pb.RegisterVariableRequest:
        request.name = f"n{counter}"
        request.type = "float"
        request.initial_value.CopyFrom(value_to_any("float", 0.25))
    if request_class is pb.SetVariableRequest:
        request.value.CopyFrom(value_to_any("float", 0.75))
    return request


def _assign(request: Any, field: FieldDescriptor, value: Any) -> None:
    target = getattr(request, field.name)
    if isinstance(value, dict):
        target.clear()
        for k, v in value.items():
            if field.message_type.fields_by_name["value"].message_type is not None:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif isinstance(value, list):
        del target[:]
        if field.message_type is not None:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(request, field.name, value)


def test_every_request_field_with_edge_values_is_never_internal(served: Served) -> None:
    seed(served)
    codes: Counter[str] = Counter()
    cases_per_rpc: Counter[str] = Counter()
    counter = 0
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        for field in request_class.DESCRIPTOR.fields:
            for value in _values_for(field):
                counter += 1
                request = _base(request_class, counter)
                if method.name in ("CleanupSession",) and field.name != "session_id":
                    continue  # removing the fuzzed session would only end the run early
                if method.name == "DeleteVariable":
                    if value in ("x", "e", "s"):
                        continue  # keep the seeded variables for the other RPCs
                    request.variable_identifier = "victim"
                    try:
                        served.stub.RegisterVariable(
                            pb.RegisterVariableRequest(
                                session_id=SID, name="victim", type="integer", initial_value=value_to_any("integer", 1)
                            ),
                            timeout=TIMEOUT,
                        )
                    except grpc.RpcError as err:
                        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
                try:
                    _assign(request, field, value)
                except (ValueError, TypeError):
                    continue  # the Python protobuf runtime itself refuses the value
                code = call_raw(served, method, request.SerializeToString())
                codes[code.name] += 1
                cases_per_rpc[method.name] += 1
                if code == grpc.StatusCode.OK:
                    # Whatever was accepted must not break any later read.
                    reads_all_work(served)
    total = sum(codes.values())
    print(f"\nfield fuzz: {total} cases: {dict(codes)}; per RPC: {dict(cases_per_rpc)}")
    assert len(cases_per_rpc) == 24
    assert codes["INTERNAL"] == 0
    still_serves(served)


# ----------------------------------------------------------------------------- known breakers


def test_a_version_at_the_int32_limit_never_makes_reads_fail(served: Served) -> None:
    seed(served)
    stub = served.stub
    stub.RegisterVariable(
        pb.RegisterVariableRequest(
            session_id=SID,
            name="top",
            type="integer",
            initial_value=value_to_any("integer", 1),
            initial_version=2**31 - 1,
        ),
        timeout=TIMEOUT,
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.SetVariable(
            pb.SetVariableRequest(session_id=SID, variable_identifier="top", value=value_to_any("integer", 2)),
            timeout=TIMEOUT,
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "version" in info.value.details()
    got = stub.GetVariable(pb.GetVariableRequest(session_id=SID, variable_identifier="top"), timeout=TIMEOUT)
    assert got.variable.version == 2**31 - 1
    assert got.variable.value.value == b"1"
    reads_all_work(served)


def test_a_created_at_out_of_range_is_refused_and_reads_keep_working(served: Served) -> None:
    seed(served)
    for seconds in (2**63 - 1, -(2**63), 253_402_300_800):
        with pytest.raises(grpc.RpcError) as info:
            served.stub.RegisterVariable(
                pb.RegisterVariableRequest(
                    session_id=SID,
                    name="old",
                    type="integer",
                    initial_value=value_to_any("integer", 1),
                    created_at=timestamp_pb2.Timestamp(seconds=seconds),
                ),
                timeout=TIMEOUT,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "created_at" in info.value.details()
    reads_all_work(served)


@pytest.mark.parametrize("where", ["session_id", "variable_identifier"])
def test_a_huge_identifier_is_not_echoed(served: Served, where: str) -> None:
    seed(served)
    huge = "q" * 20_000
    request = pb.GetVariableRequest(session_id=SID, variable_identifier="x")
    setattr(request, where, huge)
    with pytest.raises(grpc.RpcError) as info:
        served.stub.GetVariable(request, timeout=TIMEOUT)
    # Not RESOURCE_EXHAUSTED ("metadata exceeds hard limit"): a short, clear refusal.
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert len(info.value.details()) <= MAX_STATUS_MESSAGE
    assert where in info.value.details() and "20000 characters" in info.value.details()


@pytest.mark.parametrize("pattern", ["[" * 16_384, "*a" * 500_000])
def test_a_huge_listing_pattern_is_refused(served: Served, pattern: str) -> None:
    seed(served)
    with pytest.raises(grpc.RpcError) as info:
        served.stub.ListVariables(pb.ListVariablesRequest(session_id=SID, pattern=pattern), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pattern" in info.value.details()
    assert len(info.value.details()) <= MAX_STATUS_MESSAGE


def test_hostile_patterns_within_the_bound_match_like_fnmatch_and_the_cache_stays_bounded(served: Served) -> None:
    import fnmatch

    seed(served)
    names = ["a" * 120, "x", "s", "e"]
    for name in names[:1]:
        served.stub.RegisterVariable(
            pb.RegisterVariableRequest(
                session_id=SID, name=name, type="integer", initial_value=value_to_any("integer", 1)
            ),
            timeout=TIMEOUT,
        )
    for pattern in ["*a" * 512, "[" * 1024, "*" * 1024, "a*" * 60 + "b", "[!x]", "?", "[a-z]*"]:
        listed = served.stub.ListVariables(pb.ListVariablesRequest(session_id=SID, pattern=pattern), timeout=TIMEOUT)
        got = sorted(v.name for v in listed.variables)
        assert got == sorted(n for n in names if fnmatch.fnmatchcase(n, pattern)), pattern
    for i in range(300):
        served.stub.ListVariables(
            pb.ListVariablesRequest(session_id=SID, pattern=f"*{i}*" + "b" * 900), timeout=TIMEOUT
        )
    info = store_glob._compiled.cache_info()
    assert info.maxsize == store_glob.GLOB_CACHE_SIZE and info.currsize <= store_glob.GLOB_CACHE_SIZE
