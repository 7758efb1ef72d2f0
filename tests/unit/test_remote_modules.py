"""The remote package: RPC descriptions, channels and RemoteStore in their own modules, same names."""

from __future__ import annotations

import pytest

import dspex_dspy.remote as remote
from dspex_dspy import wire, wire_errors
from dspex_dspy.errors import ValidationError
from dspex_dspy.remote import calls, channel, store
from dspex_dspy.types import TYPE_URL_PREFIX

pytestmark = pytest.mark.unit

HOMES = {
    "BridgeCall": calls,
    "BridgeCalls": calls,
    "encode_write": calls,
    "infer_type": calls,
    "registered_variable": calls,
    "BALANCE_ENV": channel,
    "CHANNEL_OPTIONS": channel,
    "channel_args": channel,
    "DEFAULT_CALL_TIMEOUT": channel,
    "open_channel": channel,
    "IMPORT_WINDOW": store,
    "RemoteStore": store,
}


def test_the_package_keeps_its_public_names() -> None:
    assert set(remote.__all__) == set(HOMES)
    for name, home in HOMES.items():
        assert getattr(remote, name) is getattr(home, name), name


def test_no_error_is_rebuilt_from_text() -> None:
    assert not hasattr(remote, "error_from_text")
    assert not any(hasattr(module, "error_from_text") for module in (calls, channel, store, wire, wire_errors))


def test_wire_still_offers_the_error_mapping() -> None:
    assert wire.error_from_rpc is wire_errors.error_from_rpc
    assert wire.status_for is wire_errors.status_for


def test_a_write_of_a_known_type_travels_as_that_type() -> None:
    assert calls.encode_write("t", 3, "float").type_url == TYPE_URL_PREFIX + "float"
    assert calls.encode_write("t", 3, "float").value == b"3.0"
    assert calls.encode_write("t", "true", "boolean").value == b"true"
    assert calls.encode_write("t", [[1, 2]], "tensor").value == b'{"shape":[1,2],"data":[1.0,2.0]}'


def test_a_write_of_an_unknown_type_travels_as_its_natural_type() -> None:
    assert calls.encode_write("t", 3, None).type_url == TYPE_URL_PREFIX + "integer"
    assert calls.encode_write("t", [1.0, 2.0], None).type_url == TYPE_URL_PREFIX + "embedding"


def test_a_value_that_does_not_fit_its_known_type_is_left_for_the_server_to_judge() -> None:
    # The server knows the variable's current definition and reports the rejection with its rule.
    assert calls.encode_write("t", "abc", "float").type_url == TYPE_URL_PREFIX + "string"
    ragged = calls.encode_write("t", [[1.0], [2.0, 3.0]], "tensor")
    assert (ragged.type_url, ragged.value) == (TYPE_URL_PREFIX + "tensor", b"[[1.0],[2.0,3.0]]")


def test_a_value_that_is_not_json_cannot_be_sent() -> None:
    with pytest.raises(ValidationError) as info:
        calls.encode_write("t", object(), "string")
    assert (info.value.variable, info.value.rule) == ("t", "type")


def test_only_a_write_that_names_a_writer_other_than_a_worker_sends_call_metadata() -> None:
    # A bridge records a write that claims no writer as a worker's: a worker's write need not say so.
    def sent(source: str) -> object:
        return calls.BridgeCalls.set_variable("s", "x", 1, source=source).metadata

    assert sent("worker") is None
    assert sent("orchestrator") == (("source", "orchestrator"),)
    assert sent("elixir") == (("source", "elixir"),)
    assert calls.BridgeCalls.get_variable("s", "x").metadata is None
