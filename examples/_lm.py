"""The LM the examples use: a real OpenAI model when ``OPENAI_API_KEY`` is set, else the offline one.

The same example code runs either way; only this choice differs.
"""

from __future__ import annotations

import os
from typing import Any


def example_lm() -> Any:
    """``dspy.LM("openai/<model>")`` with a key (``DSPEX_EXAMPLE_MODEL``, default gpt-4o-mini), else offline."""
    if os.environ.get("OPENAI_API_KEY"):
        import dspy

        return dspy.LM("openai/" + os.environ.get("DSPEX_EXAMPLE_MODEL", "gpt-4o-mini"))
    from dspex_dspy.offline import offline_lm

    return offline_lm("offline/gpt-4o-mini")
