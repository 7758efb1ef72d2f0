"""The generated stubs match the .proto, and the .proto matches the wire contract.

Workers written for the Elixir snakepit bridge only interoperate with us if every package, service, RPC,
field name, number and type is exactly the one in the contract, ``bridge/PROTOCOL.md`` (vendored in
the repository). Every row of its tables, and of its *Extension fields* table (the only fields we may
add), is checked against the compiled descriptor; the 23 RPC signatures are also checked from an
embedded table. When the product's shared copy of the contract sits beside the checkout, the vendored
copy must repeat it verbatim.
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


PROTOCOL_MD = REPO_ROOT / "bridge" / "PROTOCOL.md"
EXTENSIONS_HEADING = "## Extension fields"


def _find_shared_protocol() -> Path | None:
    for shared in (REPO_ROOT.parent / "shared", REPO_ROOT / "shared"):
        if (shared / "PROTOCOL.md").is_file():
            return shared / "PROTOCOL.md"
    return None


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


def _contract_fields(markdown: str, section: str = "Messages") -> tuple[list[FieldRow], dict[str, dict[str, int]]]:
    fields: list[FieldRow] = []
    enums: dict[str, dict[str, int]] = {}
    for message, number, name, type_ in _table_rows(markdown, section):
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


_MARKDOWN = PROTOCOL_MD.read_text(encoding="utf-8")
CONTRACT_FIELDS, CONTRACT_ENUMS = _contract_fields(_MARKDOWN)
CONTRACT_RPCS = _contract_rpcs(_MARKDOWN)
# Fields we add beyond the contract (new numbers only), as documented in the vendored contract.
EXTENSION_FIELDS, _ = _contract_fields(_MARKDOWN, EXTENSIONS_HEADING.removeprefix("## "))
# RPCs we add beyond the contract (peers without them answer UNIMPLEMENTED), and their messages.
EXTENSION_RPCS = [
    RpcRow(name, request, response, False) for name, request, response in _table_rows(_MARKDOWN, "Extension RPCs")
]
EXTENSION_MESSAGES = {row.message for row in EXTENSION_FIELDS} - {row.message for row in CONTRACT_FIELDS}

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
    assert len(CONTRACT_FIELDS) >= 150
    assert "Variable.Source" in CONTRACT_ENUMS
    assert len(EXTENSION_FIELDS) >= 6


def test_embedded_rpc_table_agrees_with_the_contract() -> None:
    assert sorted(CONTRACT_RPCS) == sorted(EMBEDDED_RPCS)


@pytest.mark.parametrize("rpc", EMBEDDED_RPCS, ids=lambda rpc: rpc.name)
def test_rpc_signature(rpc: RpcRow) -> None:
    assert rpc.name in SERVICE.methods_by_name, f"RPC {rpc.name} is missing from BridgeService"
    method = SERVICE.methods_by_name[rpc.name]
    assert method.input_type.full_name == f"{PACKAGE}.{rpc.request}"
    assert method.output_type.full_name == f"{PACKAGE}.{rpc.response}"
    assert method.server_streaming is rpc.server_streaming
    assert method.client_streaming is False


@pytest.mark.parametrize("rpc", EXTENSION_RPCS, ids=lambda rpc: rpc.name)
def test_extension_rpc_signature(rpc: RpcRow) -> None:
    method = SERVICE.methods_by_name[rpc.name]
    assert method.input_type.full_name == f"{PACKAGE}.{rpc.request}"
    assert method.output_type.full_name == f"{PACKAGE}.{rpc.response}"
    assert not method.server_streaming and not method.client_streaming


def test_service_has_no_rpcs_beyond_the_contract_and_documented_extensions() -> None:
    assert EXTENSION_RPCS, "the 'Extension RPCs' table of bridge/PROTOCOL.md was not read"
    expected = [rpc.name for rpc in EMBEDDED_RPCS] + [rpc.name for rpc in EXTENSION_RPCS]
    assert sorted(SERVICE.methods_by_name) == sorted(expected)


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


def test_no_fields_beyond_the_contract_and_documented_extensions() -> None:
    allowed = {(row.message, row.number) for row in [*CONTRACT_FIELDS, *EXTENSION_FIELDS]}
    contract_messages = {row.message for row in CONTRACT_FIELDS}
    assert set(snakepit_bridge_pb2.DESCRIPTOR.message_types_by_name) == contract_messages | EXTENSION_MESSAGES
    actual = {
        (message.name, field.number)
        for message in snakepit_bridge_pb2.DESCRIPTOR.message_types_by_name.values()
        for field in message.fields
    }
    assert actual - allowed == set(), "undocumented fields; add them to 'Extension fields' in bridge/PROTOCOL.md"


def test_extensions_use_new_numbers_only() -> None:
    contract = {(row.message, row.number) for row in CONTRACT_FIELDS}
    assert not contract & {(row.message, row.number) for row in EXTENSION_FIELDS}


def test_the_vendored_contract_repeats_the_shared_one_verbatim() -> None:
    shared = _find_shared_protocol()
    if shared is None:
        pytest.skip("no shared copy of the contract beside this checkout: the vendored copy is the contract")
    contract_part = _MARKDOWN.split(f"\n{EXTENSIONS_HEADING}\n", 1)[0]
    assert contract_part.rstrip("\n") == shared.read_text(encoding="utf-8").rstrip("\n")
