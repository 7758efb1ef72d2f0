"""How variables, histories, watch events and provenance look to people: text, HTML and records.

One place renders every record the package hands to a person: ``__repr__`` text for terminals,
``_repr_html_`` tables for Jupyter, ``to_records()`` (plain dicts with ISO-8601 UTC times, the
shape the CLI's ``--json`` prints) and ``to_dataframe()`` when pandas is installed.
:class:`VariableList` and :class:`History` are ``list`` subclasses, so code that expects a list
keeps working. Values are shortened for display only; records keep them whole.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from typing import Any

from dspex_dspy.records import HistoryEntry
from dspex_dspy.types import Variable, is_secret

__all__ = [
    "HISTORY_HEADERS",
    "SECRET",
    "History",
    "Provenance",
    "VariableList",
    "event_record",
    "format_time",
    "format_value",
    "history_record",
    "history_row",
    "html_table",
    "records_to_dataframe",
    "shown",
    "text_table",
    "variable_record",
]

MAX_WIDTH = 48


def format_time(seconds: float | None) -> str:
    """Seconds since the epoch as ``YYYY-MM-DD HH:MM:SS.ffffffZ`` (UTC); empty when unknown."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds <= 0:
        return ""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%fZ")


def iso_time(seconds: float | None) -> str | None:
    """Seconds since the epoch as ISO-8601 UTC, or None when unknown."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds <= 0:
        return None
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()


def format_value(value: Any, width: int = MAX_WIDTH) -> str:
    """A value as one short line: strings quoted, tensors as ``tensor[2x2]``, long text cut."""
    if isinstance(value, dict) and set(value) == {"shape", "data"}:
        text = "tensor[" + "x".join(str(d) for d in value["shape"]) + "]"
    elif isinstance(value, list):
        text = json.dumps(value if len(value) <= 8 else [*value[:8], "..."])
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


SECRET = "<secret>"


def shown(var: Variable, width: int = MAX_WIDTH) -> str:
    """A variable's value for display: ``<secret>`` when its metadata marks it secret."""
    return SECRET if is_secret(var.metadata) else format_value(var.value, width)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def variable_record(var: Variable) -> dict[str, Any]:
    """A variable as a plain dict (JSON-ready; times as ISO-8601 UTC)."""
    return {
        "name": var.name,
        "type": var.type,
        "value": SECRET if is_secret(var.metadata) else _plain(var.value),
        "version": var.version,
        "constraints": _plain(var.constraints),
        "description": var.description,
        "metadata": dict(var.metadata),
        "source": var.source,
        "id": var.id,
        "created_at": iso_time(var.created_at),
        "updated_at": iso_time(var.updated_at),
    }


def history_record(entry: HistoryEntry, name: str | None = None, *, secret: bool = False) -> dict[str, Any]:
    """One history entry as a plain dict (with the variable's name when given; ``<secret>`` for
    the value of a secret variable)."""
    record: dict[str, Any] = {} if name is None else {"name": name}
    record.update(
        {
            "version": entry.version,
            "value": SECRET if secret or is_secret(entry.metadata) else _plain(entry.value),
            "timestamp": iso_time(entry.timestamp),
            "changed_by": entry.changed_by,
            "metadata": dict(entry.metadata),
        }
    )
    return record


def event_record(event: Any, *, secret: bool = False) -> dict[str, Any]:
    """A watch event as a plain dict (``<secret>`` for the value of a secret variable)."""
    return {
        "name": event.name,
        "value": SECRET if secret else _plain(event.value),
        "version": event.version,
        "update_type": event.update_type,
        "source": event.source,
        "timestamp": iso_time(event.timestamp),
        "metadata": dict(event.metadata),
    }


def any_record(item: Any) -> dict[str, Any]:
    """A record of anything this package displays (variables, history entries, events, dataclasses)."""
    if isinstance(item, Variable):
        return variable_record(item)
    if isinstance(item, HistoryEntry):
        return history_record(item)
    if hasattr(item, "to_record"):
        record: dict[str, Any] = item.to_record()
        return record
    if hasattr(item, "update_type") and hasattr(item, "name"):
        return event_record(item)
    if is_dataclass(item) and not isinstance(item, type):
        return _plain(asdict(item))  # type: ignore[no-any-return]
    if isinstance(item, Mapping):
        return dict(item)
    return {"value": item}


def records_to_dataframe(records: Sequence[Mapping[str, Any]]) -> Any:
    """A pandas DataFrame of records (ISO times become timestamps).

    Raises:
        ImportError: pandas is not installed (``pip install pandas``).
    """
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - pandas is a dev dependency
        raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
    frame = pd.DataFrame(list(records))
    for column in ("created_at", "updated_at", "timestamp"):
        if column in frame.columns:
            frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return frame


def text_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """Rows as an aligned plain-text table with a header line."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def html_table(rows: Sequence[Sequence[str]], headers: Sequence[str], caption: str = "") -> str:
    """Rows as an HTML table (every cell escaped)."""
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'><code>{html.escape(c)}</code></td>" for c in row) + "</tr>"
        for row in rows
    )
    cap = f"<caption style='text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    return f"<table class='dspex'>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_VAR_HEADERS = ("name", "type", "value", "version", "updated", "by")


def _variable_row(var: Variable) -> list[str]:
    return [var.name, var.type, shown(var), str(var.version), format_time(var.updated_at), var.source]


class VariableList(list[Variable]):
    """A list of :class:`~dspex_dspy.types.Variable` that shows itself as a table.

    Example:
        >>> from dspex_dspy import Context, Variables
        >>> ctx = Context()
        >>> _ = Variables.defvariable(ctx, "temperature", "float", 0.7)
        >>> print(repr(Variables.list(ctx)).splitlines()[0])
        name         type   value  version  updated                     by
    """

    def __repr__(self) -> str:
        if not self:
            return "VariableList([])"
        return text_table([_variable_row(v) for v in self], _VAR_HEADERS)

    def _repr_html_(self) -> str:
        return html_table([_variable_row(v) for v in self], _VAR_HEADERS, f"{len(self)} variable(s)")

    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per variable (see :func:`variable_record`)."""
        return [variable_record(v) for v in self]

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per variable (needs pandas)."""
        return records_to_dataframe(self.to_records())


HISTORY_HEADERS = ("version", "value", "at", "by", "metadata")


def history_row(entry: HistoryEntry, secret: bool = False) -> list[str]:
    """One history entry as table cells (``<secret>`` for a secret variable's value)."""
    meta = ", ".join(f"{k}={v}" for k, v in sorted(entry.metadata.items()))
    value = SECRET if secret or is_secret(entry.metadata) else format_value(entry.value)
    return [str(entry.version), value, format_time(entry.timestamp), entry.changed_by, meta]


class History(list[HistoryEntry]):
    """A variable's remembered writes, newest first, that shows itself as a table.

    The entries hold the real values; what it shows (its repr, HTML, records and DataFrame) hides
    them as ``<secret>`` when the variable is secret, as a :class:`Variable` does.

    Attributes:
        name: the variable's name.
        secret: the variable is secret.
    """

    def __init__(self, entries: Iterable[HistoryEntry] = (), name: str = "", *, secret: bool = False) -> None:
        super().__init__(entries)
        self.name = name
        self.secret = secret

    def __repr__(self) -> str:
        title = f"History of {self.name!r}" if self.name else "History"
        if not self:
            return f"{title}: empty"
        return f"{title} ({len(self)} writes, newest first)\n" + text_table(
            [history_row(e, self.secret) for e in self], HISTORY_HEADERS
        )

    def _repr_html_(self) -> str:
        caption = f"history of {self.name} (newest first)" if self.name else "history (newest first)"
        return html_table([history_row(e, self.secret) for e in self], HISTORY_HEADERS, caption)

    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per write, newest first (see :func:`history_record`)."""
        return [history_record(e, self.name or None, secret=self.secret) for e in self]

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per write (needs pandas)."""
        return records_to_dataframe(self.to_records())


def variable_repr(var: Variable) -> str:
    """A readable one-line repr of a variable."""
    return (
        f"Variable({var.name}: {var.type} = {shown(var)}, v{var.version}, "
        f"updated {format_time(var.updated_at) or '?'} by {var.source or '?'})"
    )


def variable_html(var: Variable) -> str:
    """A variable as a small HTML table of its fields."""
    rows = [
        ["value", shown(var, 200)],
        ["type", var.type],
        ["version", str(var.version)],
        ["constraints", json.dumps(_plain(var.constraints))],
        ["description", var.description],
        ["metadata", json.dumps(dict(var.metadata))],
        ["updated", f"{format_time(var.updated_at)} by {var.source}"],
        ["created", format_time(var.created_at)],
        ["id", var.id],
    ]
    return html_table(rows, ("field", "value"), f"variable {var.name}")


_PROVENANCE_HEADERS = ("attribute", "variable", "value", "version", "applied")


class Provenance(dict[str, Any]):
    """Which variable values produced one module call: attribute -> ``BoundValue``.

    A ``dict`` (as :func:`dspex_dspy.modules.get_provenance` always returned) that shows itself as
    a table.
    """

    def _rows(self) -> list[list[str]]:
        return [
            [attr, str(b.variable), format_value(b.value), str(b.version), "yes" if b.applied else "no (overridden)"]
            for attr, b in self.items()
        ]

    def __repr__(self) -> str:
        if not self:
            return "Provenance({})"
        return "Provenance\n" + text_table(self._rows(), _PROVENANCE_HEADERS)

    def _repr_html_(self) -> str:
        return html_table(self._rows(), _PROVENANCE_HEADERS, "provenance of one call")

    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per bound attribute."""
        return [
            {
                "attribute": attr,
                "variable": b.variable,
                "value": _plain(b.value),
                "version": b.version,
                "applied": b.applied,
            }
            for attr, b in self.items()
        ]

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per bound attribute (needs pandas)."""
        return records_to_dataframe(self.to_records())


_BINDING_HEADERS = ("attribute", "variable", "current value", "version")


def bindings_rows(records: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Table rows for binding records (see :func:`bindings_text`)."""
    return [
        [
            str(r["attribute"]),
            str(r["variable"]),
            format_value(r["value"]) if r.get("error") is None else f"<{r['error']}>",
            "" if r.get("version") is None else str(r["version"]),
        ]
        for r in records
    ]


def bindings_text(title: str, records: Sequence[Mapping[str, Any]]) -> str:
    """A module's bindings as text: attribute, variable, current value, version."""
    if not records:
        return f"{title}\n  (no bound variables)"
    table = text_table(bindings_rows(records), _BINDING_HEADERS)
    return title + "\n" + "\n".join("  " + line for line in table.splitlines())


def bindings_html(title: str, records: Sequence[Mapping[str, Any]]) -> str:
    """A module's bindings as an HTML table."""
    return html_table(bindings_rows(records), _BINDING_HEADERS, title)


def context_text(ctx_id: str, backend: str, address: str | None, variables: Sequence[Variable]) -> str:
    """A context's summary line and its variables as text."""
    where = f" at {address}" if address else ""
    head = f"Context {ctx_id} ({backend}{where}, {len(variables)} variable(s))"
    if not variables:
        return head
    table = text_table([_variable_row(v) for v in variables], _VAR_HEADERS)
    return head + "\n" + "\n".join("  " + line for line in table.splitlines())


def context_html(ctx_id: str, backend: str, address: str | None, variables: Sequence[Variable]) -> str:
    """A context's summary and its variables as HTML."""
    where = f" at {address}" if address else ""
    caption = f"context {ctx_id} ({backend}{where}, {len(variables)} variable(s))"
    return html_table([_variable_row(v) for v in variables], _VAR_HEADERS, caption)
