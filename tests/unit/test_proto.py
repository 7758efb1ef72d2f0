"""The generated stubs match the .proto, and the .proto matches the shared wire contract.

Workers written for the Elixir snakepit bridge only interoperate with us if every package, service, RPC,
field name, number and type is exactly the one in PROTOCOL.md. When that file is present (it lives in
``shared/`` beside the repository root) every row of its tables is checked against the compiled
descriptor; when it is absent an embedded subset of key fields is checked instead, and the 23 RPC
signatures are always checked from an embedded table.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from dspex_dspy._proto import snakepit_bridge_pb2

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
STUB_DIR = REPO_ROOT / "dspex_dspy" / "_proto"
PACKAGE = "snakepit.bridge"
SERVICE = snakepit_bridge_pb2.DESCRIPTOR.services_by_name["BridgeService"]


def _find_protocol() -> Path | None:
    for shared in (Path(__file__).resolve().parents[3] / "shared", REPO_ROOT / "shared"):
        if (shared / "PROTOCOL.md").is_file():
            return shared / "PROTOCOL.md"
    return None


PROTOCOL_MD = _find_protocol()


class FieldRow(NamedTuple):
    message: str
    number: int
    name: str
    type: str


class RpcRow(NamedTuple):
    name: str
    request: str
    response: str
    server_streaming: bool


# Always checked, whether or not PROTOCOL.md is around: the whole service.
EMBEDDED_RPCS = (
    RpcRow("Ping", "PingRequest", "PingResponse", False),
    RpcRow("InitializeSession", "InitializeSessionRequest", "InitializeSessionResponse", False),
    RpcRow("CleanupSession", "CleanupSessionRequest", "CleanupSessionResponse", False),
    RpcRow("GetSession", "GetSessionRequest", "GetSessionResponse", False),
    RpcRow("Heartbeat", "HeartbeatRequest", "HeartbeatResponse", False),
    RpcRow("GetVariable", "GetVariableRequest", "GetVariableResponse", False),
    RpcRow("SetVariable", "SetVariableRequest", "SetVariableResponse", False),
    RpcRow("GetVariables", "BatchGetVariablesRequest", "BatchGetVariablesResponse", False),
    RpcRow("SetVariables", "BatchSetVariablesRequest", "BatchSetVariablesResponse", False),
    RpcRow("RegisterVariable", "RegisterVariableRequest", "RegisterVariableResponse", False),
    RpcRow("ListVariables", "ListVariablesRequest", "ListVariablesResponse", False),
    RpcRow("DeleteVariable", "DeleteVariableRequest", "DeleteVariableResponse", False),
    RpcRow("ExecuteTool", "ExecuteToolRequest", "ExecuteToolResponse", False),
    RpcRow("ExecuteStreamingTool", "ExecuteToolRequest", "ToolChunk", True),
    RpcRow("RegisterTools", "RegisterToolsRequest", "RegisterToolsResponse", False),
    RpcRow("GetExposedElixirTools", "GetExposedElixirToolsRequest", "GetExposedElixirToolsResponse", False),
    RpcRow("ExecuteElixirTool", "ExecuteElixirToolRequest", "ExecuteElixirToolResponse", False),
    RpcRow("WatchVariables", "WatchVariablesRequest", "VariableUpdate", True),
    RpcRow("AddDependency", "AddDependencyRequest", "AddDependencyResponse", False),
    RpcRow("StartOptimization", "StartOptimizationRequest", "StartOptimizationResponse", False),
    RpcRow("StopOptimization", "StopOptimizationRequest", "StopOptimizationResponse", False),
    RpcRow("GetVariableHistory", "GetVariableHistoryRequest", "GetVariableHistoryResponse", False),
    RpcRow("RollbackVariable", "RollbackVariableRequest", "RollbackVariableResponse", False),
)

# Fallback when PROTOCOL.md is not beside the checkout: the fields the server and workers lean on most.
EMBEDDED_FIELDS = (
    FieldRow("PingResponse", 2, "server_time", "google.protobuf.Timestamp"),
    FieldRow("InitializeSessionRequest", 2, "metadata", "map<string, string>"),
    FieldRow("InitializeSessionResponse", 4, "initial_variables", "map<string, Variable>"),
    FieldRow("Variable", 1, "id", "string"),
    FieldRow("Variable", 2, "name", "string"),
    FieldRow("Variable", 3, "type", "string"),
    FieldRow("Variable", 4, "value", "google.protobuf.Any"),
    FieldRow("Variable", 5, "constraints_json", "string"),
    FieldRow("Variable", 6, "metadata", "map<string, string>"),
    FieldRow("Variable", 7, "source", "Source"),
    FieldRow("Variable", 8, "last_updated_at", "google.protobuf.Timestamp"),
    FieldRow("Variable", 9, "version", "int32"),
    FieldRow("Variable", 12, "binary_value", "bytes"),
    FieldRow("RegisterVariableRequest", 4, "initial_value", "google.protobuf.Any"),
    FieldRow("SetVariableRequest", 5, "expected_version", "int32"),
    FieldRow("SetVariableResponse", 3, "new_version", "int32"),
    FieldRow("BatchGetVariablesRequest", 2, "variable_identifiers", "repeated string"),
    FieldRow("BatchSetVariablesRequest", 2, "updates", "map<string, google.protobuf.Any>"),
    FieldRow("BatchSetVariablesResponse", 3, "new_versions", "map<string, int32>"),
    FieldRow("ListVariablesResponse", 1, "variables", "repeated Variable"),
    FieldRow("ExecuteToolResponse", 5, "execution_time_ms", "int64"),
    FieldRow("WatchVariablesRequest", 3, "include_initial_values", "bool"),
    FieldRow("VariableUpdate", 2, "variable", "Variable"),
    FieldRow("VariableUpdate", 6, "update_type", "string"),
    FieldRow("GetVariableHistoryResponse", 1, "entries", "repeated VariableHistoryEntry"),
    FieldRow("RollbackVariableRequest", 3, "target_version", "int32"),
    FieldRow("GetSessionResponse", 3, "created_at", "google.protobuf.Timestamp"),
)

# Fields we add beyond the contract (allowed: new numbers only). Anything else in the .proto is a mistake.
EXTENSION_FIELDS = (
    FieldRow("Variable", 13, "description", "string"),
    FieldRow("Variable", 14, "created_at", "google.protobuf.Timestamp"),
    FieldRow("RegisterVariableRequest", 8, "description", "string"),
    FieldRow("RegisterVariableRequest", 9, "initial_version", "int32"),
    FieldRow("RegisterVariableRequest", 10, "created_at", "google.protobuf.Timestamp"),
    FieldRow("GetSessionResponse", 20, "ttl_seconds", "double"),
    FieldRow("GetSessionResponse", 21, "expires_in_seconds", "double"),
    FieldRow("ImportVariablesRequest", 1, "session_id", "string"),
    FieldRow("ImportVariablesRequest", 2, "variables", "repeated RegisterVariableRequest"),
    FieldRow("ImportVariablesResponse", 1, "variable_ids", "repeated string"),
)

# RPCs (and their messages) we add beyond the contract; peers without them answer UNIMPLEMENTED.
EXTENSION_RPCS = (RpcRow("ImportVariables", "ImportVariablesRequest", "ImportVariablesResponse", False),)
EXTENSION_MESSAGES = frozenset({"ImportVariablesRequest", "ImportVariablesResponse"})

_TABLE_ROW = re.compile(r"^\|(.+)\|\s*$")


def _table_rows(markdown: str, section: str) -> list[list[str]]:
    """Return the cells of the table rows under the ``## {section}`` heading, header and rule excluded."""
    match = re.search(rf"^## {re.escape(section)}[^\n]*$(.*?)(?=^## |\Z)", markdown, re.MULTILINE | re.DOTALL)
    assert match, f"PROTOCOL.md has no '## {section}' section"
    rows = [
        [cell.strip() for cell in m.group(1).split("|")]
        for m in map(_TABLE_ROW.match, match.group(1).splitlines())
        if m
    ]
    return [row for row in rows[1:] if not set("".join(row)) <= set("-: ")]


def _contract_fields(markdown: str) -> tuple[list[FieldRow], dict[str, dict[str, int]]]:
    fields: list[FieldRow] = []
    enums: dict[str, dict[str, int]] = {}
    for message, number, name, type_ in _table_rows(markdown, "Messages"):
        if name.startswith("enum "):
            values = dict(item.split("=") for item in type_.replace(" ", "").split(","))
            enums[f"{message}.{name.removeprefix('enum ')}"] = {key: int(value) for key, value in values.items()}
        else:
            fields.append(FieldRow(message, int(number), name, type_))
    return fields, enums


def _contract_rpcs(markdown: str) -> list[RpcRow]:
    rpcs = []
    for name, request, response in _table_rows(markdown, "Service `BridgeService`"):
        streaming = response.startswith("stream ")
        rpcs.append(RpcRow(name, request, response.removeprefix("stream "), streaming))
    return rpcs


if PROTOCOL_MD is not None:
    _MARKDOWN = PROTOCOL_MD.read_text(encoding="utf-8")
    CONTRACT_FIELDS, CONTRACT_ENUMS = _contract_fields(_MARKDOWN)
    CONTRACT_RPCS = _contract_rpcs(_MARKDOWN)
else:
    CONTRACT_FIELDS, CONTRACT_ENUMS = list(EMBEDDED_FIELDS), {"Variable.Source": {"ELIXIR": 0, "PYTHON": 1}}
    CONTRACT_RPCS = list(EMBEDDED_RPCS)

_SCALAR_NAMES = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SINT64: "sint64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
}


def _type_name(field: FieldDescriptor, scope: Descriptor) -> str:
    """Spell a field's type the way PROTOCOL.md does: ``int32``, ``Variable``, ``Source``, ``map<k, v>``."""
    named = field.message_type or field.enum_type
    if named is None:
        base = _SCALAR_NAMES[field.type]
    else:
        base = named.full_name.removeprefix(f"{scope.full_name}.").removeprefix(f"{PACKAGE}.")
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entry = field.message_type
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return f"map<{_type_name(key, scope)}, {_type_name(value, scope)}>"
    return f"repeated {base}" if field.is_repeated else base


def _message(name: str) -> Descriptor:
    messages = snakepit_bridge_pb2.DESCRIPTOR.message_types_by_name
    assert name in messages, f"message {name} is missing from snakepit_bridge.proto"
    return messages[name]


def _load_generator() -> ModuleType:
    # Loaded by path so the test does not depend on the repository root being on sys.path.
    spec = importlib.util.spec_from_file_location("_bridge_generate_under_test", REPO_ROOT / "bridge" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    generator = _load_generator()
    generator.generate(tmp_path)
    for name in generator.GENERATED_FILES:
        fresh, committed = (tmp_path / name).read_bytes(), (STUB_DIR / name).read_bytes()
        assert fresh == committed, f"dspex_dspy/_proto/{name} is stale or hand-edited; run `make proto`"


def test_grpc_stub_imports_messages_from_the_package() -> None:
    source = (STUB_DIR / "snakepit_bridge_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from dspex_dspy._proto import snakepit_bridge_pb2 as" in source
    assert not re.search(r"^import snakepit_bridge_pb2\b", source, re.MULTILINE)


def test_package_and_service_names() -> None:
    assert snakepit_bridge_pb2.DESCRIPTOR.package == PACKAGE
    file_proto = descriptor_pb2.FileDescriptorProto()
    snakepit_bridge_pb2.DESCRIPTOR.CopyToProto(file_proto)
    assert file_proto.syntax == "proto3"
    assert SERVICE.full_name == "snakepit.bridge.BridgeService"
    imports = {dep.name for dep in snakepit_bridge_pb2.DESCRIPTOR.dependencies}
    assert imports == {"google/protobuf/any.proto", "google/protobuf/timestamp.proto"}


def test_contract_tables_were_read() -> None:
    # Guards against a parser that silently finds nothing and lets every parametrized case vanish.
    assert len(CONTRACT_RPCS) == 23
    assert len(CONTRACT_FIELDS) >= (150 if PROTOCOL_MD is not None else len(EMBEDDED_FIELDS))
    assert "Variable.Source" in CONTRACT_ENUMS


def test_embedded_rpc_table_agrees_with_the_contract() -> None:
    assert sorted(CONTRACT_RPCS) == sorted(EMBEDDED_RPCS)


@pytest.mark.parametrize("rpc", [*EMBEDDED_RPCS, *EXTENSION_RPCS], ids=lambda rpc: rpc.name)
def test_rpc_signature(rpc: RpcRow) -> None:
    assert rpc.name in SERVICE.methods_by_name, f"RPC {rpc.name} is missing from BridgeService"
    method = SERVICE.methods_by_name[rpc.name]
    assert method.input_type.full_name == f"{PACKAGE}.{rpc.request}"
    assert method.output_type.full_name == f"{PACKAGE}.{rpc.response}"
    assert method.server_streaming is rpc.server_streaming
    assert method.client_streaming is False


def test_service_has_no_rpcs_beyond_the_contract() -> None:
    assert sorted(SERVICE.methods_by_name) == sorted(rpc.name for rpc in [*EMBEDDED_RPCS, *EXTENSION_RPCS])


@pytest.mark.parametrize(
    "row", [*CONTRACT_FIELDS, *EXTENSION_FIELDS], ids=lambda row: f"{row.message}.{row.number}.{row.name}"
)
def test_field_matches_the_contract(row: FieldRow) -> None:
    message = _message(row.message)
    assert row.number in message.fields_by_number, f"{row.message} has no field number {row.number}"
    field = message.fields_by_number[row.number]
    assert field.name == row.name, f"{row.message} field {row.number} is {field.name!r}, contract says {row.name!r}"
    assert _type_name(field, message) == row.type, f"{row.message}.{row.name} has the wrong type"


@pytest.mark.parametrize("enum_name", sorted(CONTRACT_ENUMS))
def test_enum_matches_the_contract(enum_name: str) -> None:
    message_name, _, enum = enum_name.partition(".")
    values = _message(message_name).enum_types_by_name[enum].values_by_name
    assert {name: value.number for name, value in values.items()} == CONTRACT_ENUMS[enum_name]


@pytest.mark.skipif(PROTOCOL_MD is None, reason="needs the full message table of PROTOCOL.md")
def test_no_fields_beyond_the_contract_and_documented_extensions() -> None:
    allowed = {(row.message, row.number) for row in [*CONTRACT_FIELDS, *EXTENSION_FIELDS]}
    contract_messages = {row.message for row in CONTRACT_FIELDS}
    assert set(snakepit_bridge_pb2.DESCRIPTOR.message_types_by_name) == contract_messages | EXTENSION_MESSAGES
    actual = {
        (message.name, field.number)
        for message in snakepit_bridge_pb2.DESCRIPTOR.message_types_by_name.values()
        for field in message.fields
    }
    assert actual - allowed == set(), "undocumented fields; add them to EXTENSION_FIELDS and bridge/README.md"
