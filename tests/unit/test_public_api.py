"""The public surface and the layering of the package: what users import, and what imports what."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dspex_dspy
from dspex_dspy import errors

pytestmark = pytest.mark.unit

PACKAGE = Path(dspex_dspy.__file__).parent

PUBLIC = {
    "AsyncSessionContext",
    "Context",
    "ModuleVariableResolver",
    "SessionContext",
    "Variable",
    "VariableAwareChainOfThought",
    "VariableAwarePredict",
    "VariableAwareProgramOfThought",
    "VariableAwareReAct",
    "VariableBindingMixin",
    "Variables",
    "create_variable_aware_program",
}

ERRORS = {
    "AuthenticationError",
    "BatchUpdateError",
    "BridgeError",
    "BridgeUnavailableError",
    "DSPexError",
    "LimitExceededError",
    "PermissionDeniedError",
    "RateLimitError",
    "SessionExistsError",
    "SessionNotFoundError",
    "ValidationError",
    "VariableExistsError",
    "VariableLockedError",
    "VariableNotFoundError",
    "VersionConflictError",
}

# Module -> the package modules it may import at module level (layers point one way, DESIGN.md).
# A lower layer importing a higher one is a design bug; function-level imports are listed apart.
ALLOWED = {
    "errors": set(),
    "_gc": set(),
    "types": {"errors"},
    "records": {"errors", "types"},
    "limits": {"errors"},
    "reader": set(),
    "leases": {"errors", "types"},
    "store": {"errors", "types", "records", "limits", "leases", "store"},
    "state": {"errors", "types", "records", "limits", "leases", "store", "state"},
    "context": {"errors", "types", "state", "display", "_gc"},
    "variables": {"errors", "types", "records", "leases", "context", "ops", "display"},
    "ops": {"errors", "types", "records", "display"},
    "wire_errors": {"errors"},
    "wire": {"errors", "types", "records", "wire_errors", "_proto"},
    "guard": {"errors", "types", "records", "store", "wire_errors", "_proto"},
    "tokens": {"errors"},
    "tls": {"errors"},
    "auth": {"errors", "tls", "tokens", "_proto"},
    "server": {
        "_gc",
        "errors",
        "types",
        "records",
        "leases",
        "store",
        "wire",
        "wire_errors",
        "guard",
        "auth",
        "tls",
        "admin",
        "_proto",
        "aio_server",
    },
    "aio_server": {"errors", "types", "records", "store", "wire", "wire_errors", "guard", "auth", "_proto", "server"},
    "admin": {"auth", "errors", "types", "records", "store", "remote", "wire", "wire_errors"},
    "remote": {"errors", "types", "records", "leases", "wire", "wire_errors", "remote", "tls", "_proto"},
    "client": {
        "errors",
        "types",
        "records",
        "leases",
        "wire",
        "wire_errors",
        "remote",
        "tls",
        "ops",
        "_proto",
        "client",
    },
    "modules": {"errors", "types", "reader", "modules", "context", "variables", "telemetry", "display"},
    "tune": {"errors", "types", "leases", "reader", "modules", "context", "variables", "tune"},
    "telemetry": set(),
    "cli": {
        "errors",
        "types",
        "records",
        "store",
        "server",
        "wire",
        "wire_errors",
        "auth",
        "tls",
        "tokens",
        "commands",
        "logs",
        "_proto",
    },
    "commands": {
        "errors",
        "types",
        "records",
        "wire",
        "wire_errors",
        "remote",
        "admin",
        "display",
        "ops",
        "tls",
        "_proto",
    },
    "metrics": {"errors", "types", "records", "store", "server", "wire"},
    "dashboard": {"errors", "types", "records", "admin", "commands", "remote", "tls", "wire", "_proto", "dashboard"},
    "logs": set(),
    "display": {"errors", "types", "records"},
    "__main__": {"cli"},
    "offline": set(),
    "demo": {"errors", "context", "variables"},
}
# The only lazy (function-level) edges from a lower layer: a context starts the embedded bridge or
# connects to a remote one only when it switches, so a purely local program never loads gRPC.
LAZY_ALLOWED = {
    ("context", "server"),
    ("context", "remote"),
    ("context", "tokens"),
    ("cli", "metrics"),
    ("cli", "dashboard"),
    ("types", "display"),
} | {("demo", n) for n in ("client", "modules", "offline")}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, function-level) dspex_dspy layers imported by a file."""
    source = path.read_text()
    try:
        tree = ast.parse(source)
    except SystemError:
        # CPython 3.11 can fail an AST build with "recursion depth mismatch" now and then
        # (python/cpython#106905): the interpreter's fault, not the file's; a second parse decides.
        tree = ast.parse(source)
    top: set[str] = set()
    nested: set[str] = set()

    def visit(node: ast.AST, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.module:
                names = [child.module]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            for name in names:
                if name.startswith("dspex_dspy."):
                    (nested if inner else top).add(name.split(".")[1])
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            visit(child, inner)

    visit(tree, 0)
    return top, nested


def test_public_names_are_exactly_the_intended_ones() -> None:
    assert set(dspex_dspy.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(dspex_dspy, name) is not None


def test_error_names_are_exactly_the_hierarchy() -> None:
    assert set(errors.__all__) == ERRORS
    for name in ERRORS:
        assert issubclass(getattr(errors, name), errors.DSPexError)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        dspex_dspy.Nope  # noqa: B018


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts), ids=str)
def test_layers_point_one_way(path: Path) -> None:
    layer = _layer(path)
    if layer == "__init__":
        return
    top, nested = _imports(path)
    assert top <= ALLOWED[layer], f"{path.name} ({layer}) imports {sorted(top - ALLOWED[layer])} at module level"
    upward = {n for n in nested - ALLOWED[layer] if (layer, n) not in LAZY_ALLOWED}
    assert not upward, f"{path.name} ({layer}) imports {sorted(upward)} inside functions"


def test_the_store_server_and_clients_import_without_dspy() -> None:
    code = (
        "import sys, dspex_dspy, dspex_dspy.store, dspex_dspy.server, dspex_dspy.client, dspex_dspy.cli;"
        "from dspex_dspy import Context, Variables;"
        "ctx = Context(); Variables.defvariable(ctx, 'x', 'float', 1.0); ctx.ensure_bridged(); ctx.stop();"
        "print('dspy' in sys.modules, 'grpc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_a_local_context_does_not_load_grpc() -> None:
    code = (
        "import sys; from dspex_dspy import Context, Variables;"
        "ctx = Context(); Variables.defvariable(ctx, 'x', 'float', 1.0); Variables.set(ctx, 'x', 2.0);"
        "print('grpc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
