"""Recent module calls a session keeps: bounded, newest first, checked, on every storage engine
(a real redis-server for Redis), shared by two stores on one Redis, and dropped with the session."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dspex_dspy.errors import SessionNotFoundError, ValidationError
from dspex_dspy.store import MemoryStorage, SessionStore
from dspex_dspy.store.calls import MAX_CALL_BYTES, MAX_CALLS_KEPT, MAX_CALLS_PER_REPORT
from dspex_dspy.store.redis_storage import RedisStorage

pytestmark = pytest.mark.unit


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], SessionStore]]:
    made: list[SessionStore] = []

    def make() -> SessionStore:
        if request.param == "redis":
            store = SessionStore(storage=RedisStorage(request.getfixturevalue("redis_url")))
        else:
            store = SessionStore(storage=MemoryStorage())
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def _call(n: int) -> dict[str, Any]:
    return {"module": "VariableAwarePredict", "at": 1000.5 + n, "bindings": {"t": {"variable": "t", "version": n}}}


def test_reported_calls_come_back_newest_first_and_unchanged(make_store: Callable[[], SessionStore]) -> None:
    store = make_store()
    store.create_session("s1")
    assert store.report_calls("s1", [_call(1), _call(2)]) == 2
    assert store.report_calls("s1", [_call(3)]) == 1
    assert store.recent_calls("s1") == [_call(3), _call(2), _call(1)]
    assert store.recent_calls("s1", limit=2) == [_call(3), _call(2)]
    got = store.recent_calls("s1")[0]["bindings"]["t"]["version"]
    assert got == 3 and isinstance(got, int)


def test_a_session_keeps_only_its_newest_calls(make_store: Callable[[], SessionStore]) -> None:
    store = make_store()
    store.create_session("s1")
    for start in range(0, 120, 40):
        store.report_calls("s1", [_call(n) for n in range(start, start + 40)])
    kept = store.recent_calls("s1", limit=1000)
    assert len(kept) == MAX_CALLS_KEPT
    assert [c["bindings"]["t"]["version"] for c in kept] == list(range(119, 119 - MAX_CALLS_KEPT, -1))


@pytest.mark.parametrize(
    ("calls", "named"),
    [
        ([_call(1), "not a mapping"], "call 1 must be a mapping"),
        ([_call(1), {"x": math.nan}], "call 1 is not JSON"),
        ([_call(1), {"x": object()}], "call 1 is not JSON"),
        ([_call(1), {"x": "a" * MAX_CALL_BYTES}], f"the most is {MAX_CALL_BYTES}"),
        ([_call(n) for n in range(MAX_CALLS_PER_REPORT + 1)], f"at most {MAX_CALLS_PER_REPORT} calls"),
        ({"module": "x"}, "calls must be a list"),
    ],
)
def test_a_bad_report_names_the_fault_and_keeps_nothing(
    make_store: Callable[[], SessionStore], calls: Any, named: str
) -> None:
    store = make_store()
    store.create_session("s1")
    store.report_calls("s1", [_call(0)])
    with pytest.raises(ValidationError, match=named):
        store.report_calls("s1", calls)
    assert store.recent_calls("s1") == [_call(0)]


def test_a_report_of_the_largest_accepted_size_is_kept(make_store: Callable[[], SessionStore]) -> None:
    store = make_store()
    store.create_session("s1")
    overhead = len('{"x":""}')
    big = {"x": "a" * (MAX_CALL_BYTES - overhead)}
    assert store.report_calls("s1", [big] * MAX_CALLS_PER_REPORT) == MAX_CALLS_PER_REPORT
    assert store.recent_calls("s1", limit=1) == [big]


def test_unknown_sessions_and_bad_limits_are_refused(make_store: Callable[[], SessionStore]) -> None:
    store = make_store()
    with pytest.raises(SessionNotFoundError):
        store.report_calls("nope", [_call(1)])
    with pytest.raises(SessionNotFoundError):
        store.recent_calls("nope")
    store.create_session("s1")
    for bad in (0, -1, "5", True):
        with pytest.raises(ValidationError, match="limit must be a positive integer"):
            store.recent_calls("s1", limit=bad)  # type: ignore[arg-type]


def test_calls_go_with_their_session(make_store: Callable[[], SessionStore]) -> None:
    store = make_store()
    store.create_session("s1")
    store.report_calls("s1", [_call(1)])
    store.cleanup_session("s1")
    store.create_session("s1")
    assert store.recent_calls("s1") == []


def test_two_stores_on_one_redis_see_the_same_calls(redis_url: str) -> None:
    a = SessionStore(storage=RedisStorage(redis_url))
    b = SessionStore(storage=RedisStorage(redis_url))
    try:
        a.create_session("shared-calls")
        a.report_calls("shared-calls", [_call(7)])
        assert b.recent_calls("shared-calls") == [_call(7)]
    finally:
        a.close()
        b.close()


def test_reporting_calls_refreshes_the_session_ttl_on_redis(redis_url: str) -> None:
    storage = RedisStorage(redis_url)
    store = SessionStore(storage=storage)
    try:
        store.create_session("ttl-calls", ttl=600)
        store.report_calls("ttl-calls", [_call(1)])
        client = storage._redis
        ttl_ms = client.pttl("dspex:{ttl-calls}:c")
        assert 0 < ttl_ms <= 600_000
    finally:
        store.close()
