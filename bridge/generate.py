"""Generate the Python gRPC stubs for the bridge contract.

Runs ``grpc_tools.protoc`` in-process on ``bridge/proto/snakepit_bridge.proto`` and writes
``snakepit_bridge_pb2.py``, ``snakepit_bridge_pb2.pyi`` and ``snakepit_bridge_pb2_grpc.py`` into
``dspex_dspy/_proto/``. protoc emits a top-level ``import snakepit_bridge_pb2`` in the gRPC module,
which only works when ``_proto`` itself is on ``sys.path``; it is rewritten into an absolute import
from the package. The output depends only on the ``.proto`` file and the pinned grpcio-tools version,
so ``tests/unit/test_proto.py`` can regenerate into a temporary directory and compare byte for byte.

Usage (from the repository root)::

    python -m bridge.generate            # or: make proto
    python -m bridge.generate --out-dir /tmp/stubs
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import grpc_tools  # type: ignore[import-untyped]
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO_ROOT / "bridge" / "proto"
PROTO_FILE = PROTO_DIR / "snakepit_bridge.proto"
DEFAULT_OUT_DIR = REPO_ROOT / "dspex_dspy" / "_proto"
STUB_PACKAGE = "dspex_dspy._proto"
GENERATED_FILES = ("snakepit_bridge_pb2.py", "snakepit_bridge_pb2.pyi", "snakepit_bridge_pb2_grpc.py")

_BARE_PB2_IMPORT = re.compile(r"^import snakepit_bridge_pb2 as (\w+)$", re.MULTILINE)


def _well_known_types_dir() -> Path:
    """Return the include directory bundled with grpcio-tools that holds ``google/protobuf/*.proto``."""
    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def _make_grpc_import_package_relative(source: str) -> str:
    """Rewrite the bare ``import snakepit_bridge_pb2 as X`` that protoc emits into an import from the package.

    Args:
        source: Text of the generated ``snakepit_bridge_pb2_grpc.py``.

    Returns:
        The same text with the import rewritten.

    Raises:
        RuntimeError: If protoc's output no longer contains exactly one such import, so a changed
            generator cannot silently leave a broken import behind.
    """
    rewritten, count = _BARE_PB2_IMPORT.subn(rf"from {STUB_PACKAGE} import snakepit_bridge_pb2 as \1", source)
    if count != 1:
        raise RuntimeError(f"expected exactly one 'import snakepit_bridge_pb2 as ...' in the gRPC stub, found {count}")
    return rewritten


def generate(out_dir: Path) -> None:
    """Generate the three stub files for ``snakepit_bridge.proto`` into ``out_dir``.

    Existing stub files in ``out_dir`` are overwritten; nothing else there is touched.

    Args:
        out_dir: Directory to write ``snakepit_bridge_pb2.py``, ``.pyi`` and ``_pb2_grpc.py`` into.
            Created if missing.

    Raises:
        RuntimeError: If protoc fails or its output is not what the rewrite expects.

    Example:
        >>> generate(Path("/tmp/stubs"))  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc writes into a scratch directory first so a failed run never leaves half-written stubs.
    with tempfile.TemporaryDirectory(prefix="bridge-proto-") as scratch:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--proto_path={_well_known_types_dir()}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            str(PROTO_FILE),
        ]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed with exit status {status} on {PROTO_FILE}")
        scratch_dir = Path(scratch)
        contents = {name: (scratch_dir / name).read_text(encoding="utf-8") for name in GENERATED_FILES}
    grpc_name = "snakepit_bridge_pb2_grpc.py"
    contents[grpc_name] = _make_grpc_import_package_relative(contents[grpc_name])
    for name, text in contents.items():
        (out_dir / name).write_bytes(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m bridge.generate [--out-dir DIR]``.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    parser = argparse.ArgumentParser(description="Generate Python gRPC stubs from bridge/proto/snakepit_bridge.proto.")
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"where to write the stubs (default: {DEFAULT_OUT_DIR})"
    )
    args = parser.parse_args(argv)
    generate(args.out_dir)
    print(f"generated {', '.join(GENERATED_FILES)} in {args.out_dir}")


if __name__ == "__main__":
    main()
