"""A watch read without blocking: the waker, batches offered whole and taken whole."""

from __future__ import annotations

from dspex_dspy.store import SessionStore, UpdateType, VariableUpdate, Watch
from dspex_dspy.types import BATCH_METADATA_KEY, Variable


def _update(name: str, version: int) -> VariableUpdate:
    var = Variable(id=f"var_{name}", name=name, type="integer", value=version, version=version)
    return VariableUpdate(var.id, var, UpdateType.VALUE_CHANGE, "worker", {}, 0.0)


def test_the_waker_fires_on_an_update_to_an_empty_queue_and_on_close() -> None:
    watch = Watch("s", None)
    wakes: list[int] = []
    watch.set_waker(lambda: wakes.append(1))
    assert wakes == []
    watch.offer(_update("a", 1))
    watch.offer(_update("b", 1))  # the queue was not empty: the reader was woken already
    assert len(wakes) == 1
    assert [u.name for u in watch.take_all()] == ["a", "b"]
    assert watch.take_all() == []
    watch.offer(_update("a", 2))
    assert len(wakes) == 2
    watch.close()
    assert len(wakes) == 3
    watch.close()
    assert len(wakes) == 3


def test_a_waker_set_on_a_pending_queue_fires_at_once() -> None:
    watch = Watch("s", None)
    watch.offer(_update("a", 1))
    wakes: list[int] = []
    watch.set_waker(lambda: wakes.append(1))
    assert wakes == [1]


def test_a_batch_is_offered_whole_and_coalesces_whole() -> None:
    watch = Watch("s", None)
    watch.offer_all([_update("a", 1), _update("b", 1)])
    watch.offer(_update("c", 1))
    watch.offer_all([_update("a", 2), _update("b", 2)])
    taken = watch.take_all()
    assert [(u.name, u.variable.version) for u in taken if u.variable] == [("c", 1), ("a", 2), ("b", 2)]
    assert watch.coalesced == 2


def test_the_store_offers_an_atomic_batch_to_its_watchers_at_once() -> None:
    store = SessionStore()
    try:
        store.create_session("s")
        store.register_variable("s", "a", "integer", 0)
        store.register_variable("s", "b", "integer", 0)
        everything = store.watch("s", None)
        only_b = store.watch("s", ["b"])
        store.set_variables("s", {"a": 1, "b": 1}, atomic=True)
        taken = everything.take_all()
        assert [u.name for u in taken] == ["a", "b"]
        assert len({u.metadata[BATCH_METADATA_KEY] for u in taken}) == 1
        assert [u.name for u in only_b.take_all()] == ["b"]
    finally:
        store.close()
