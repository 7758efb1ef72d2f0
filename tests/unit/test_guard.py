"""The server's door: message clipping, field bounds, fair watch slots, and the glob translation."""

from __future__ import annotations

import fnmatch

import pytest
from google.protobuf import any_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.errors import LimitExceededError, ValidationError
from dspex_dspy.guard import MAX_IDENTIFIER_LENGTH, WatchSlots, check_request, clip
from dspex_dspy.store.glob import MAX_GLOB_LENGTH, compile_glob, glob_match

pytestmark = pytest.mark.unit


def test_clip_keeps_short_text_and_both_ends_of_long_text() -> None:
    assert clip("short") == "short"
    long = "start-" + "x" * 10_000 + "-(rule max)"
    clipped = clip(long, 300)
    assert len(clipped) <= 300
    assert clipped.startswith("start-") and clipped.endswith("-(rule max)")
    assert "10017 characters" in clipped


@pytest.mark.parametrize(
    ("request_msg", "field"),
    [
        (pb.GetVariableRequest(session_id="s" * (MAX_IDENTIFIER_LENGTH + 1)), "session_id"),
        (pb.GetVariableRequest(session_id="s", variable_identifier="v" * 1025), "variable_identifier"),
        (pb.BatchGetVariablesRequest(session_id="s", variable_identifiers=["ok", "v" * 1025]), "variable_identifiers"),
        (pb.ListVariablesRequest(session_id="s", pattern="*" * (MAX_GLOB_LENGTH + 1)), "pattern"),
        (pb.RegisterVariableRequest(session_id="s", name="n", initial_version=-1), "initial_version"),
        (
            pb.RegisterVariableRequest(session_id="s", name="n", created_at=timestamp_pb2.Timestamp(seconds=2**62)),
            "created_at",
        ),
        (pb.SetVariableRequest(session_id="s", variable_identifier="v", expected_version=-5), "expected_version"),
        (pb.GetVariableHistoryRequest(session_id="s", variable_identifier="v", limit=-1), "limit"),
        (pb.BatchSetVariablesRequest(session_id="s", updates={"u" * 1025: any_pb2.Any()}), "updates"),
        (pb.BatchSetVariablesRequest(session_id="s", binary_updates={"b" * 1025: b""}), "binary_updates"),
        (pb.HeartbeatRequest(session_id="s", client_time=timestamp_pb2.Timestamp(seconds=-(2**40))), "client_time"),
    ],
)
def test_out_of_bounds_fields_are_refused_by_name(request_msg: object, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_request(request_msg)
    assert field in str(info.value)
    assert len(str(info.value)) < 400


def test_in_bounds_requests_pass() -> None:
    check_request(pb.RegisterVariableRequest(session_id="s", name="n", initial_version=2**31 - 1))
    check_request(pb.SetVariableRequest(session_id="s" * MAX_IDENTIFIER_LENGTH, variable_identifier="v"))
    check_request(pb.ListVariablesRequest(session_id="s", pattern="*" * MAX_GLOB_LENGTH))


def test_watch_slots_share_fairly_and_give_back() -> None:
    slots = WatchSlots(total=4, per_session=3, per_principal=2)
    slots.acquire("s1", "a")
    slots.acquire("s1", "a")
    with pytest.raises(LimitExceededError, match="one client"):
        slots.acquire("s1", "a")
    slots.acquire("s1", "b")
    with pytest.raises(LimitExceededError, match="one session"):
        slots.acquire("s1", "c")
    slots.acquire("s2", "c")
    with pytest.raises(LimitExceededError, match="watch streams: 5"):
        slots.acquire("s3", "d")
    assert slots.open == 4
    for sid, who in (("s1", "a"), ("s1", "a"), ("s1", "b"), ("s2", "c")):
        slots.release(sid, who)
    assert slots.open == 0
    slots.acquire("s1", "a")
    with pytest.raises(ValueError, match="per_principal"):
        WatchSlots(1, 1, 0)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # no timing on a loaded machine
@given(
    st.text(alphabet="ab-]![*?.\\^c", max_size=8),
    st.text(alphabet="ab-]![.\\^c*?", max_size=8),
)
def test_globs_match_exactly_like_fnmatch(pattern: str, name: str) -> None:
    assert glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern)


def test_a_glob_longer_than_the_bound_is_refused() -> None:
    with pytest.raises(ValidationError, match="longer than"):
        compile_glob("*" * (MAX_GLOB_LENGTH + 1))
    assert not glob_match("anything", "[z-a]")
