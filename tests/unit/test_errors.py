"""The error hierarchy: every error is a DSPexError and the builtin a user would catch first."""

from __future__ import annotations

import pytest

from dspex_dspy import errors
from dspex_dspy.errors import (
    AuthenticationError,
    BatchUpdateError,
    BridgeError,
    BridgeUnavailableError,
    DSPexError,
    LimitExceededError,
    PermissionDeniedError,
    RateLimitError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
    VariableExistsError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)

pytestmark = pytest.mark.unit

EXAMPLES: list[tuple[DSPexError, type[Exception]]] = [
    (ValidationError("temperature", "max", 2.5, "2.5 is above the maximum 2.0"), ValueError),
    (BatchUpdateError({"a": ValidationError("a", "min", -1, "-1 is below the minimum 0")}), ValueError),
    (VariableNotFoundError("temperature", "s1"), KeyError),
    (VariableExistsError("temperature", "s1"), ValueError),
    (VersionConflictError("temperature", 3, 4), RuntimeError),
    (SessionNotFoundError("s1"), KeyError),
    (SessionExistsError("s1"), ValueError),
    (LimitExceededError("sessions", 11, 10), RuntimeError),
    (VariableLockedError("temperature", "tuner-1"), RuntimeError),
    (BridgeUnavailableError("the session store is closed"), ConnectionError),
    (RateLimitError("worker-1", 0.25), RuntimeError),
    (AuthenticationError("the token has expired"), PermissionError),
    (PermissionDeniedError("SetVariable needs the 'write' permission"), PermissionError),
    (BridgeError("UNIMPLEMENTED: ExecuteTool is not implemented", code="UNIMPLEMENTED"), RuntimeError),
]
IDS = [type(error).__name__ for error, _ in EXAMPLES]


def test_public_names_are_exactly_the_hierarchy() -> None:
    assert set(errors.__all__) == {type(e).__name__ for e, _ in EXAMPLES} | {"DSPexError"}


@pytest.mark.parametrize(("error", "builtin"), EXAMPLES, ids=IDS)
def test_each_error_is_a_dspex_error_and_its_builtin(error: DSPexError, builtin: type[Exception]) -> None:
    assert isinstance(error, DSPexError)
    assert isinstance(error, builtin)
    with pytest.raises(builtin):
        raise error
    with pytest.raises(DSPexError):
        raise error


@pytest.mark.parametrize(("error", "builtin"), EXAMPLES, ids=IDS)
def test_str_is_the_plain_message(error: DSPexError, builtin: type[Exception]) -> None:
    text = str(error)
    assert text == error.message
    assert not text.startswith(("'", '"'))
    assert text == error.args[0]


def test_key_errors_are_not_quoted() -> None:
    error = VariableNotFoundError("temperature")
    assert str(error) == "Variable not found: temperature"
    assert str(SessionNotFoundError("s1")) == "Session not found: s1"


def test_not_found_names_the_session_when_known() -> None:
    error = VariableNotFoundError("temperature", "ctx_1")
    assert "temperature" in str(error)
    assert "ctx_1" in str(error)
    assert error.identifier == "temperature"
    assert error.session_id == "ctx_1"


def test_validation_error_names_variable_rule_and_value() -> None:
    error = ValidationError("temperature", "max", 2.5, "2.5 is above the maximum 2.0")
    assert str(error).startswith("temperature: 2.5 is above the maximum 2.0")
    assert "max" in str(error)
    assert (error.variable, error.rule, error.value) == ("temperature", "max", 2.5)


def test_validation_error_without_variable_has_no_prefix() -> None:
    error = ValidationError("", "encoding", "x", "'x' is not a number")
    assert str(error).startswith("'x' is not a number")


def test_version_conflict_reports_both_versions() -> None:
    error = VersionConflictError("counter", 3, 5)
    assert (error.name, error.expected, error.actual) == ("counter", 3, 5)
    assert "counter" in str(error)
    assert "3" in str(error)
    assert "5" in str(error)


def test_limit_exceeded_reports_value_and_maximum() -> None:
    error = LimitExceededError("variables per session", 11, 10)
    assert (error.limit, error.value, error.maximum) == ("variables per session", 11, 10)
    assert str(error) == "variables per session: 11 exceeds the limit 10"


def test_batch_error_atomic_says_nothing_applied() -> None:
    inner = ValidationError("a", "min", -1, "-1 is below the minimum 0")
    error = BatchUpdateError({"a": inner})
    assert error.errors == {"a": inner}
    assert error.new_versions == {}
    assert "nothing was applied" in str(error)
    assert str(inner) in str(error)


def test_batch_error_partial_lists_applied_versions() -> None:
    inner = VariableNotFoundError("missing")
    error = BatchUpdateError({"missing": inner}, {"a": 2, "b": 5})
    assert error.new_versions == {"a": 2, "b": 5}
    assert "2 other write(s) were applied" in str(error)
    assert "missing" in str(error)


def test_every_error_can_be_caught_by_the_base_class_only() -> None:
    caught = []
    for error, _ in EXAMPLES:
        try:
            raise error
        except DSPexError as exc:
            caught.append(type(exc))
    assert len(caught) == len(EXAMPLES)


def test_module_docstring_draws_the_hierarchy() -> None:
    doc = errors.__doc__ or ""
    for error, builtin in EXAMPLES:
        assert type(error).__name__ in doc
        assert builtin.__name__ in doc


def test_a_locked_batch_names_every_held_variable_without_a_cycle() -> None:
    model = VariableLockedError("model", "tuner-2")
    first = VariableLockedError("temperature", "tuner-1", others=[model])
    assert VariableLockedError("x", "tuner-1").others == ()
    assert first.others == (model,)
    assert {locked.name: locked.optimizer_id for locked in (first, *first.others)} == {
        "temperature": "tuner-1",
        "model": "tuner-2",
    }
    assert all(first not in locked.others for locked in first.others)
