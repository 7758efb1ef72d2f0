"""Name patterns for listings: shell-style globs matched in linear time, with a bounded cache.

``ListVariables`` filters names with a glob matched against the whole name: ``*`` (any run of
characters), ``?`` (one character), ``[abc]`` / ``[a-z]`` (one of a set) and ``[!abc]`` (one not in
it); any other character, including an unclosed ``[``, stands for itself. A pattern is translated
into a regular expression for pydantic-core's Rust regex engine (the one constraint patterns use),
whose matching time is linear in the name's length whatever the pattern (Python's ``fnmatch``
backtracks and can take seconds on a hostile pattern).
Patterns longer than :data:`MAX_GLOB_LENGTH` characters are refused, and at most
:data:`GLOB_CACHE_SIZE` compiled patterns are kept.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from pydantic_core import SchemaValidator, core_schema

from dspex_dspy.errors import ValidationError

__all__ = ["GLOB_CACHE_SIZE", "MAX_GLOB_LENGTH", "compile_glob", "glob_match", "glob_to_regex"]

MAX_GLOB_LENGTH: Final = 1024
"""Longest pattern accepted (a name is at most 128 characters, so longer ones could only be abuse)."""

GLOB_CACHE_SIZE: Final = 64
"""Compiled patterns remembered (least recently used first out)."""


def _literal(ch: str) -> str:
    # Every character as a code point escape: nothing in it is special, in a class or out of it.
    return f"\\x{{{ord(ch):X}}}"


class _Never:
    """The matcher of a glob that matches no name (it has an empty set)."""

    @staticmethod
    def match(name: str) -> None:
        return None


def glob_to_regex(pattern: str) -> str | None:
    """Translate a glob into a Rust-regex expression that matches the whole name.

    Returns None for a glob that can match no name (an empty set such as ``[z-a]``).

    Example:
        >>> glob_to_regex("t*")
        '\\\\A(?s:\\\\x{74}.*)\\\\z'
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
                        parts.append(f"{_literal(lo)}-{_literal(hi)}")
                    k += 3
                else:
                    parts.append(_literal(body[k]))
                    k += 1
            if not parts:
                # An empty (or all-empty-range) set matches nothing; its negation matches anything.
                if not negate:
                    return None
                out.append(".")
            else:
                out.append(("[^" if negate else "[") + "".join(parts) + "]")
        else:
            out.append(_literal(ch))
    return "\\A(?s:" + "".join(out) + ")\\z"


class _Matcher:
    """A compiled glob: ``match(name)`` is truthy when the whole name matches."""

    def __init__(self, regex: str) -> None:
        self._validator = SchemaValidator(core_schema.str_schema(pattern=regex, regex_engine="rust-regex"))

    def match(self, name: str) -> bool | None:
        return True if self._validator.isinstance_python(name) else None


@functools.lru_cache(maxsize=GLOB_CACHE_SIZE)
def _compiled(pattern: str) -> Any:
    regex = glob_to_regex(pattern)
    return _Never() if regex is None else _Matcher(regex)


def compile_glob(pattern: str) -> Any:
    """Return the compiled matcher of ``pattern`` (``.match(name)`` on the whole name), from a bounded cache.

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
    except Exception as exc:  # pydantic-core's SchemaError, for a character the engine refuses
        raise ValidationError("", "pattern", None, f"the pattern cannot be used: {str(exc)[:200]}") from None


def glob_match(name: str, pattern: str) -> bool:
    """Whether ``name`` matches the glob ``pattern`` as a whole (case-sensitive).

    Example:
        >>> glob_match("temperature", "temp*"), glob_match("top_k", "t?p_[!a-j]")
        (True, True)
    """
    return compile_glob(pattern).match(name) is not None
