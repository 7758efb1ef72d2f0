"""The install path: the wheel and sdist build, carry what they must, and install cleanly alone.

``python -m build`` makes a wheel and an sdist from this checkout; a fresh virtual environment
gets only the wheel (no extras, so no DSPy) and must import the package, run the CLI (serve, ping,
sessions) and answer an import of the DSPy modules with a message naming the ``[dspy]`` extra.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 600.0


def run(*args: str | Path, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=DEADLINE, cwd=cwd, env=env)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, REPO_ROOT)
    return out


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DSPEX_BRIDGE_ADDRESS")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def fresh_venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    venv = tmp_path_factory.mktemp("venv") / "env"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    run(python, "-m", "pip", "install", "--quiet", wheel, env=_clean_env())
    yield venv


def test_the_sdist_carries_the_proto_docs_and_license(dist: Path) -> None:
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for wanted in (
        "bridge/proto/snakepit_bridge.proto",
        "docs/modules.md",
        "LICENSE",
        "README.md",
        "dspex_dspy/py.typed",
        "notebooks/quickstart.ipynb",
    ):
        assert wanted in names, f"{wanted} missing from the sdist"


def test_the_wheel_metadata(dist: Path) -> None:
    wheel = next(dist.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "dspex_dspy/py.typed" in names
    assert "dspex_dspy/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert re.search(r"^License-Expression: MIT$", metadata, re.M)
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in metadata
    assert re.search(r"^Project-URL: Source, https://", metadata, re.M)
    assert "Provides-Extra: dspy" in metadata
    assert "dspex-bridge = dspex_dspy.cli:main" in entry_points


def test_a_fresh_install_without_extras_works_and_explains_the_dspy_extra(fresh_venv: Path, tmp_path: Path) -> None:
    python = fresh_venv / "bin" / "python"
    env = _clean_env()
    # Run from elsewhere, so the checkout is not importable: only the installed wheel is.
    out = run(
        python,
        "-c",
        "import sys, dspex_dspy; from dspex_dspy import Context, Variables;"
        "ctx = Context(); Variables.defvariable(ctx, 'x', 'float', 1.0); ctx.ensure_bridged();"
        "print(Variables.get(ctx, 'x'), ctx.get_backend().type, 'dspy' in sys.modules, dspex_dspy.__file__)",
        cwd=tmp_path,
        env=env,
    )
    value, backend, dspy_loaded, location = out.split()
    assert (value, backend, dspy_loaded) == ("1.0", "bridged", "False")
    assert str(fresh_venv) in location
    for statement in ("import dspex_dspy.modules", "from dspex_dspy import VariableAwarePredict"):
        result = subprocess.run(
            [str(python), "-c", statement], capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path, env=env
        )
        assert result.returncode == 1
        assert "ImportError" in result.stderr
        assert 'pip install "dspex-dspy[dspy]"' in result.stderr
        assert "ModuleNotFoundError: No module named 'dspy'" not in result.stderr


def test_the_installed_cli_serves_and_operates(fresh_venv: Path, tmp_path: Path) -> None:
    bridge = fresh_venv / "bin" / "dspex-bridge"
    env = _clean_env()
    assert "sessions" in run(bridge, "--help", cwd=tmp_path, env=env)
    assert "serve" in run(fresh_venv / "bin" / "python", "-m", "dspex_dspy", "--help", cwd=tmp_path, env=env)
    server = subprocess.Popen(
        [str(bridge), "serve", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"listening on (\S+:\d+)", line)
        assert match, line
        address = match.group(1)
        assert "pong" in run(bridge, "ping", address, cwd=tmp_path, env=env)
        assert run(bridge, "sessions", "--bridge", address, "--json", cwd=tmp_path, env=env).strip() == "[]"
        missing = subprocess.run(
            [str(bridge), "get", "nope", "x", "--bridge", address],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            cwd=tmp_path,
            env=env,
        )
        assert missing.returncode == 4 and "Session not found" in missing.stderr
        metrics = subprocess.run(
            [str(bridge), "serve", "--port", "0", "--metrics-port", "0"],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            cwd=tmp_path,
            env=env,
        )
        assert metrics.returncode == 1 and 'pip install "dspex-dspy[metrics]"' in metrics.stderr
    finally:
        server.terminate()
        assert server.wait(DEADLINE) == 0
        for pipe in (server.stdout, server.stderr):
            if pipe is not None:
                pipe.close()
