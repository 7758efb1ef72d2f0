"""Rules for the records of recent module calls a session keeps (their provenance).

A worker reports, per call of a variable-aware module, which variable versions it used. The store
keeps the newest :data:`MAX_CALLS_KEPT` records of each session in its storage engine (so every
bridge node sees them) and drops them with the session. This module checks a report and turns
records into the compact JSON text the engines keep, and back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from dspex_dspy.errors import ValidationError

__all__ = ["MAX_CALLS_KEPT", "MAX_CALLS_PER_REPORT", "MAX_CALL_BYTES", "decode_calls", "encode_calls"]

MAX_CALLS_KEPT: Final = 50
"""Call records a session keeps (older ones are dropped)."""

MAX_CALL_BYTES: Final = 8 * 1024
"""The largest call record accepted, as UTF-8 JSON."""

MAX_CALLS_PER_REPORT: Final = 100
"""The most call records one report may carry."""

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def encode_calls(calls: Sequence[Mapping[str, Any]]) -> list[str]:
    """Check a report and encode each record as JSON text, in the order given.

    Raises:
        ValidationError: ``calls`` is not a sequence of at most :data:`MAX_CALLS_PER_REPORT`
            mappings, or a record is not JSON (string keys; no NaN or infinities) or is larger
            than :data:`MAX_CALL_BYTES` encoded. The error names the first bad record.
    """
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise ValidationError("", "calls", calls, "calls must be a list of call records (mappings)")
    if len(calls) > MAX_CALLS_PER_REPORT:
        raise ValidationError(
            "", "calls", len(calls), f"a report carries at most {MAX_CALLS_PER_REPORT} calls, got {len(calls)}"
        )
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise ValidationError("", "calls", call, f"call {i} must be a mapping, got {type(call).__name__}")
        try:
            text = _ENCODER.encode(dict(call))
        except (TypeError, ValueError) as exc:
            raise ValidationError("", "calls", call, f"call {i} is not JSON: {exc}") from None
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_CALL_BYTES:
            raise ValidationError("", "calls", size, f"call {i} is {size} bytes as JSON; the most is {MAX_CALL_BYTES}")
        out.append(text)
    return out


def decode_calls(texts: Sequence[str]) -> list[dict[str, Any]]:
    """The records kept as JSON text (see :func:`encode_calls`)."""
    return [json.loads(text) for text in texts]
