"""What a person sees: readable reprs, Jupyter HTML, records and DataFrames for every record type."""

from __future__ import annotations

import dspy
import pandas as pd
import pytest
from support.recording_lm import RecordingEngine, recording_lm

from dspex_dspy import Context, SessionContext, VariableAwarePredict, Variables
from dspex_dspy.display import History, Provenance, VariableList, format_value
from dspex_dspy.modules import get_provenance

pytestmark = pytest.mark.integration


@pytest.fixture
def ctx() -> Context:
    ctx = Context("ctx_display")
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(ctx, "note", "string", "<script>alert(1)</script>", metadata={"owner": "ops"})
    Variables.defvariable(ctx, "weights", "tensor", [[1, 2], [3, 4]])
    Variables.set(ctx, "temperature", 0.9, metadata={"reason": "warmer"})
    return ctx


def test_a_variable_list_is_a_table(ctx: Context) -> None:
    variables = Variables.list(ctx)
    assert isinstance(variables, VariableList) and isinstance(variables, list)
    lines = repr(variables).splitlines()
    assert lines[0].split() == ["name", "type", "value", "version", "updated", "by"]
    assert lines[1].split()[:4] == ["temperature", "float", "0.9", "2"]
    assert lines[3].split()[:3] == ["weights", "tensor", "tensor[2x2]"]
    html = variables._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("<tr>") == 4


def test_records_and_dataframes(ctx: Context) -> None:
    records = Variables.list(ctx).to_records()
    assert records[0]["name"] == "temperature" and records[0]["value"] == 0.9
    assert records[0]["updated_at"].endswith("+00:00")
    assert records[1]["metadata"] == {"owner": "ops", "source": "orchestrator", "backend": "local"}
    frame = Variables.list(ctx).to_dataframe()
    assert list(frame["name"]) == ["temperature", "note", "weights"]
    assert pd.api.types.is_datetime64_any_dtype(frame["updated_at"])
    assert ctx.to_records() == records
    assert list(ctx.to_dataframe()["version"]) == [2, 1, 1]
    assert Variables.get_variable(ctx, "temperature").to_record() == records[0]


def test_history_shows_each_writes_metadata(ctx: Context) -> None:
    history = Variables.history(ctx, "temperature")
    assert isinstance(history, History) and history.name == "temperature"
    text = repr(history)
    assert text.startswith("History of 'temperature' (2 writes, newest first)")
    assert "reason=warmer" in text.splitlines()[2]
    assert "history of temperature" in history._repr_html_()
    records = history.to_records()
    assert [(r["name"], r["version"], r["value"]) for r in records] == [
        ("temperature", 2, 0.9),
        ("temperature", 1, 0.7),
    ]
    frame = history.to_dataframe()
    assert list(frame["version"]) == [2, 1]
    assert pd.api.types.is_datetime64_any_dtype(frame["timestamp"])


@pytest.mark.parametrize("backend", ["local", "bridged"])
def test_a_secret_variables_history_never_shows_its_values(backend: str) -> None:
    ctx = Context(backend=backend)
    try:
        Variables.defvariable(ctx, "api_key", "string", "sk-first-0001", metadata={"secret": "true"})
        Variables.set(ctx, "api_key", "sk-second-0002")
        history = Variables.history(ctx, "api_key")
        assert history.secret
        # The entries keep the real values (a rollback needs them); nothing shown contains them.
        assert [e.value for e in history] == ["sk-second-0002", "sk-first-0001"]
        shown = [repr(history), history._repr_html_(), repr(history.to_records()), history.to_dataframe().to_string()]
        for text in shown:
            assert "sk-first" not in text and "sk-second" not in text, text
            assert "<secret>" in text or "&lt;secret&gt;" in text, text
        assert Variables.history(ctx, "api_key", limit=1).to_records()[0]["version"] == 2
        # A variable that is not secret shows its values.
        Variables.defvariable(ctx, "model", "string", "small")
        assert not Variables.history(ctx, "model").secret
        assert "small" in repr(Variables.history(ctx, "model"))
    finally:
        ctx.stop()


def test_a_variable_and_a_context_read_well(ctx: Context) -> None:
    var = Variables.get_variable(ctx, "temperature")
    assert repr(var).startswith("Variable(temperature: float = 0.9, v2, updated 20")
    assert "<caption style='text-align:left'>variable temperature</caption>" in var._repr_html_()
    text = repr(ctx)
    assert text.startswith("Context ctx_display (local, 3 variable(s))")
    assert "temperature" in text.splitlines()[2]
    assert "context ctx_display (local, 3 variable(s))" in ctx._repr_html_()
    ctx.stop()
    assert repr(ctx) == "Context(id='ctx_display', stopped)"


def test_a_bound_module_shows_its_bindings_and_provenance(ctx: Context) -> None:
    qa = VariableAwarePredict("question -> answer", session_context=ctx)
    qa.bind_to_variable("instructions", "note")
    text = repr(qa)
    assert text.startswith("VariableAwarePredict(")
    rows = [line.split() for line in text.splitlines() if line.startswith("  ")]
    assert ["temperature", "temperature", "0.9", "2"] in rows
    assert qa.to_records()[0] == {"attribute": "temperature", "variable": "temperature", "value": 0.9, "version": 2}
    assert "&lt;script&gt;" in qa._repr_html_()
    with dspy.context(lm=recording_lm(RecordingEngine())):
        prediction = qa(question="hi")
    provenance = get_provenance(prediction)
    assert isinstance(provenance, Provenance) and isinstance(provenance, dict)
    assert provenance["temperature"].version == 2
    assert repr(provenance).splitlines()[0] == "Provenance"
    assert {"attribute": "temperature", "variable": "temperature", "value": 0.9, "version": 2, "applied": True} in (
        provenance.to_records()
    )
    assert list(provenance.to_dataframe()["attribute"]) == list(provenance)
    assert isinstance(qa.last_provenance, Provenance)
    Variables.delete(ctx, "note")
    assert "VariableNotFoundError" in qa.to_records()[1]["error"]


def test_values_are_shortened_for_display_only() -> None:
    assert format_value("x" * 100).endswith("…") and len(format_value("x" * 100)) == 48
    assert format_value(list(range(20))).endswith('"..."]')
    assert format_value(True) == "true"


def test_a_watch_event_is_a_record(ctx: Context) -> None:
    with Variables.watch(ctx, ["temperature"]) as events:  # type: ignore[attr-defined]
        record = next(events).to_record()
    assert (record["name"], record["value"], record["version"], record["update_type"]) == (
        "temperature",
        0.9,
        2,
        "initial_value",
    )
    assert record["timestamp"].endswith("+00:00")


def test_a_history_entry_written_as_secret_stays_hidden() -> None:
    # Metadata of the write itself marks it secret, even if the variable is no longer marked so.
    from dspex_dspy.records import HistoryEntry

    history = History(
        [
            HistoryEntry(2, "public", 2.0, "orchestrator", {}),
            HistoryEntry(1, "sk-hidden", 1.0, "orchestrator", {"secret": "true"}),
        ],
        "key",
    )
    assert "sk-hidden" not in repr(history) and "public" in repr(history)
    assert [r["value"] for r in history.to_records()] == ["public", "<secret>"]


@pytest.mark.parametrize("backend", ["local", "bridged"])
def test_a_secret_variables_watch_events_never_show_its_value(backend: str) -> None:
    ctx = Context(backend=backend)
    try:
        Variables.defvariable(ctx, "api_key", "string", "sk-first-0001", metadata={"secret": "true"})
        Variables.defvariable(ctx, "model", "string", "small")
        with Variables.watch(ctx, ["api_key", "model"]) as events:
            first = [next(events), next(events)]
            Variables.set(ctx, "api_key", "sk-second-0002")
            change = next(events)
        secret = next(e for e in first if e.name == "api_key")
        public = next(e for e in first if e.name == "model")
        assert secret.secret and change.secret and not public.secret
        assert (secret.value, change.value) == ("sk-first-0001", "sk-second-0002")  # the program sees it
        for event in (secret, change):
            assert "sk-" not in repr(event) and "sk-" not in repr(event.to_record())
            assert event.to_record()["value"] == "<secret>"
        assert "small" in repr(public) and public.to_record()["value"] == "small"
        if backend == "bridged":  # a worker's watch (fed by its cache) marks the event the same way
            assert ctx.bridge_address is not None
            with SessionContext.connect(ctx.bridge_address, ctx.id) as worker:
                watch = worker.watch_variables(["api_key"])
                seen = next(watch)
                watch.close()
            assert seen.secret and seen.value == "sk-second-0002" and "sk-" not in repr(seen)
    finally:
        ctx.stop()
