"""The client's sans-I/O machines, driven by hand: messages and listings in, calls and events out.

No channel, thread or loop: each test builds wire messages, hands them to a machine and checks
what it asks for and what the cache then serves.
"""

from __future__ import annotations

import logging

import pytest

from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.client.cache import CacheState, VariableCache
from dspex_dspy.client.feed import CacheFeed, StreamWatch
from dspex_dspy.client.policy import Reconnect, Silence
from dspex_dspy.errors import BridgeUnavailableError, SessionNotFoundError, VariableNotFoundError
from dspex_dspy.store import VariableUpdate
from dspex_dspy.types import Variable
from dspex_dspy.wire import update_to_proto

pytestmark = pytest.mark.unit


def var(name: str, value: int, version: int = 1, var_id: str = "", created: float = 1.0) -> Variable:
    return Variable(
        id=var_id or f"var_{name}",
        name=name,
        type="integer",
        value=value,
        version=version,
        created_at=created,
        updated_at=created,
    )


def message(v: Variable, kind: str = "value_change") -> pb.VariableUpdate:
    return update_to_proto(VariableUpdate(v.id, v, kind, "orchestrator", {}, 2.0))


HEARTBEAT = pb.VariableUpdate(update_type="heartbeat")


def test_the_cache_feed_asks_for_a_listing_on_the_first_message_and_serves_after_it() -> None:
    cache = VariableCache()
    feed = CacheFeed(cache, "s")
    feed.opened()
    assert cache.state == CacheState.SYNCING
    call = feed.on_message(message(var("a", 1), "initial_value"))
    assert call is not None and call.rpc == "ListVariables"
    assert cache.lookup("a") is None
    feed.on_listing(([var("a", 1)], []))
    assert cache.state == CacheState.SYNCED
    assert cache.lookup("a") == var("a", 1)
    # The next version of a variable is in write order: applied at once, no listing.
    assert feed.on_message(message(var("a", 2, version=2))) is None
    assert cache.lookup("a").value == 2  # type: ignore[union-attr]
    # A version that skips one may have overtaken other writes: a listing first.
    skipped = feed.on_message(message(var("a", 4, version=4)))
    assert skipped is not None and skipped.rpc == "ListVariables"
    assert cache.lookup("a").value == 2  # type: ignore[union-attr]
    feed.on_listing(([var("a", 4, version=4), var("b", 9)], []))
    assert cache.lookup("a").value == 4 and cache.lookup("b").value == 9  # type: ignore[union-attr]


def test_the_cache_feed_marks_the_cache_down_and_warns_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dspex_dspy.client")
    cache = VariableCache()
    feed = CacheFeed(cache, "s")
    feed.opened()
    assert feed.on_message(HEARTBEAT) is not None
    feed.on_listing(([var("a", 1)], []))
    assert cache.state == CacheState.SYNCED
    delays = [feed.on_end(BridgeUnavailableError("gone"), closed=False) for _ in range(3)]
    assert delays == sorted(delays) and 0 < delays[0] <= delays[-1] <= 2.5
    assert cache.state == CacheState.DOWN and cache.lookup("a") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the cache of session s is down" in warnings[0].getMessage()
    # An unexpected exception is logged with its traceback, and the feed still goes on.
    assert feed.on_end(RuntimeError("bug"), closed=False) > 0
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    feed.opened()
    assert feed.on_message(HEARTBEAT) is not None
    feed.on_listing(([var("a", 1)], []))
    assert cache.state == CacheState.SYNCED
    assert any("synced again" in r.getMessage() for r in caplog.records)


def test_a_stream_watch_of_a_name_follows_it_across_deletion_and_re_creation() -> None:
    watch = StreamWatch("s", ["a"], include_initial=True, reconnect_timeout=None)
    check = watch.opened()
    assert check is not None and check.rpc == "GetVariables"
    watch.checked(([var("a", 1)], []))
    events, listing = watch.on_message(message(var("a", 1), "initial_value"))
    assert [(e.name, e.value) for e in events] == [("a", 1)] and listing is not None
    assert watch.on_listing(([var("a", 1)], [])) == []
    assert watch.on_message(message(var("b", 5)))[0] == []  # another variable of the stream
    deleted, _ = watch.on_message(message(var("a", 1), "deleted"))
    assert [e.update_type for e in deleted] == ["deleted"]
    again, _ = watch.on_message(message(var("a", 7, var_id="var_a_2", created=3.0), "value_change"))
    assert [(e.name, e.value, e.version) for e in again] == [("a", 7, 1)]


def test_a_stream_watch_of_an_unknown_name_fails_at_once() -> None:
    watch = StreamWatch("s", ["a", "nope"], include_initial=True, reconnect_timeout=None)
    assert watch.opened() is not None
    with pytest.raises(VariableNotFoundError, match="nope"):
        watch.checked(([var("a", 1)], ["nope"]))


def test_the_reconnect_policy_ends_on_fatal_errors_and_after_its_timeout() -> None:
    policy = Reconnect("s", ["a"], timeout=5.0)
    with pytest.raises(SessionNotFoundError):
        policy.failed(SessionNotFoundError("s"), live=False)  # never connected: a wrong id
    policy.connected()
    assert policy.failed(SessionNotFoundError("s"), live=False, now=100.0) > 0  # may be re-created
    assert policy.failed(BridgeUnavailableError("down"), live=False, now=104.0) > 0
    with pytest.raises(BridgeUnavailableError, match="down"):
        policy.failed(BridgeUnavailableError("down"), live=False, now=106.0)


def test_silence_counts_from_the_last_message() -> None:
    assert not Silence(None).dead() and Silence(None).left() is None
    silence = Silence(30.0)
    silence.heard(now=0.0)
    assert silence.left(now=10.0) == 20.0
    with pytest.raises(ValueError, match="silence_timeout"):
        Silence(0)
