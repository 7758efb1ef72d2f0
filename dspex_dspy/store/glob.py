"""Name patterns for listings: shell-style globs matched in linear time, with a bounded cache.

``ListVariables`` filters names with a glob matched against the whole name: ``*`` (any run of
characters), ``?`` (one character), ``[abc]`` / ``[a-z]`` (one of a set) and ``[!abc]`` (one not in
it); any other character, including an unclosed ``[``, stands for itself. A pattern is translated
into a regular expression for RE2, an engine whose matching time is linear in the name's length
whatever the pattern (Python's ``fnmatch`` backtracks and can take seconds on a hostile pattern).
Patterns longer than :data:`MAX_GLOB_LENGTH` characters are refused, and at most
:data:`GLOB_CACHE_SIZE` compiled patterns are kept.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import re2

from dspex_dspy.errors import ValidationError

__all__ = ["GLOB_CACHE_SIZE", "MAX_GLOB_LENGTH", "compile_glob", "glob_match", "glob_to_regex"]

MAX_GLOB_LENGTH: Final = 1024
"""Longest pattern accepted (a name is at most 128 characters, so longer ones could only be abuse)."""

GLOB_CACHE_SIZE: Final = 64
"""Compiled patterns remembered (least recently used first out)."""

_SPECIAL: Final = frozenset("\\.^$|?*+()[]{}-/&~#")


def _escape(ch: str) -> str:
    return "\\" + ch if ch in _SPECIAL else ch


def _class_char(ch: str) -> str:
    # Inside a character class only these are special to RE2.
    return "\\" + ch if ch in "\\]^-[" else ch


def glob_to_regex(pattern: str) -> str:
    """Translate a glob into an RE2 expression that matches the whole name.

    Example:
        >>> glob_to_regex("temp*")
        '(?s:temp.*)\\\\z'
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            close = pattern.find("]", j)
            if close < 0:
                out.append("\\[")
                continue
            body = pattern[i:close]
            i = close + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            parts: list[str] = []
            k = 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    lo, hi = body[k], body[k + 2]
                    if lo <= hi:
                        parts.append(f"{_class_char(lo)}-{_class_char(hi)}")
                    k += 3
                else:
                    parts.append(_class_char(body[k]))
                    k += 1
            if not parts:
                # An empty (or all-empty-range) set matches nothing; its negation matches anything.
                out.append("." if negate else "[^\\x00-\\x{10FFFF}]")
            else:
                out.append(("[^" if negate else "[") + "".join(parts) + "]")
        else:
            out.append(_escape(ch))
    return "(?s:" + "".join(out) + ")\\z"


@functools.lru_cache(maxsize=GLOB_CACHE_SIZE)
def _compiled(pattern: str) -> Any:
    return re2.compile(glob_to_regex(pattern))


def compile_glob(pattern: str) -> Any:
    """Return the compiled matcher of ``pattern`` (``.fullmatch(name)``), from a bounded cache.

    Raises:
        ValidationError: the pattern is not a string or is longer than :data:`MAX_GLOB_LENGTH`.
    """
    if not isinstance(pattern, str):
        raise ValidationError("", "pattern", pattern, f"a pattern must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_GLOB_LENGTH:
        raise ValidationError(
            "",
            "pattern",
            None,
            f"a pattern of {len(pattern)} characters is longer than the {MAX_GLOB_LENGTH} allowed",
        )
    try:
        return _compiled(pattern)
    except Exception as exc:  # re2 raises its own error type
        raise ValidationError("", "pattern", None, f"the pattern cannot be used: {str(exc)[:200]}") from None


def glob_match(name: str, pattern: str) -> bool:
    """Whether ``name`` matches the glob ``pattern`` as a whole (case-sensitive).

    Example:
        >>> glob_match("temperature", "temp*"), glob_match("top_k", "t?p_[!a-j]")
        (True, True)
    """
    return compile_glob(pattern).match(name) is not None
