"""What a newcomer runs first, run for real: the quickstart notebook, every example and the demo.

The notebook is executed by nbclient on a kernel pinned to this interpreter; examples and the demo
run as subprocesses of this interpreter, once on the embedded bridge and once against a standalone
``dspex-bridge serve``. Everything runs offline: provider keys and bridge addresses from the
caller's environment are removed, so the offline LM answers and the embedded bridge is used
unless a test names a bridge itself. Assertions are on what each prints, never on how long it took.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO_ROOT / "notebooks" / "quickstart.ipynb"
EXAMPLES_DIR = REPO_ROOT / "examples"
SUBPROCESS_TIMEOUT_S = 180
CELL_TIMEOUT_S = 120
# Set in a developer's shell, these would send the runs to a real provider or to another bridge.
DROPPED_ENV = ("OPENAI_API_KEY", "DSPEX_BRIDGE_ADDRESS", "DSPEX_DEMO_BRIDGE")

# Lines each known example must print (regular expressions, searched in its stdout).
EXAMPLE_LINES: dict[str, tuple[str, ...]] = {
    "llm_config_workflow.py": (
        r"rejected: .*temperature: 3\.5 is above the maximum 2\.0",
        r"final configuration \(local\): \{'model': 'gpt-4', 'temperature': 0\.8, 'max_tokens': 1024, 'top_p': 0\.95\}",
        r"after registering a DSPy program \(bridged at 127\.0\.0\.1:\d+\): "
        r"\{'model': 'gpt-4', 'temperature': 0\.8, 'max_tokens': 1024, 'top_p': 0\.95\}",
    ),
    "multi_stage_pipeline.py": (
        r"stage 1 on local: 'PROCESS THIS TEXT'",
        r"stage 2 registered a Python component: backend bridged, switches 1",
        r"stage 3: all variables coexist: \['input_text', 'preprocessing_done', 'analysis_complete', 'results'\]",
    ),
    "live_tuning.py": (
        r"bridged at 127\.0\.0\.1:\d+",
        r"worker call 1 used temperature 0\.7 \(v1\)",
        r"orchestrator set temperature = 1\.2 \(v2\)",
        r"worker call 2 used temperature 1\.2 \(v2\)",
    ),
    "optimizer_loop.py": (
        r"worker-1 serves: max_tokens 64 \(v1\), model offline/small \(v1\), temperature 1\.2 \(v1\)",
        r"searching temperature \(float \[0\.0, 1\.5\]\), max_tokens \(int \[16, 4096\]\), model \(one of",
        r"during the search: model is held by optimizer example-tuner",
        r"best trial \d+: score 0\.9[5-9]\d* with .*'model': 'offline/large'",
        r"published v2 of \['max_tokens', 'model', 'temperature'\] by example-tuner",
        r"worker-1 switched: max_tokens 64 \(v1\) -> \d+ \(v2\), model offline/small \(v1\) -> offline/large \(v2\)",
        r"worker-2 switched: max_tokens 64 \(v1\) -> \d+ \(v2\), model offline/small \(v1\) -> offline/large \(v2\)",
    ),
}
FOUND_EXAMPLES = {p.name for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_")}


def offline_env() -> dict[str, str]:
    """This process's environment without provider keys or bridge addresses, output unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with ``args`` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=offline_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


# ---------------------------------------------------------------------------------------------
# The quickstart notebook
# ---------------------------------------------------------------------------------------------


def _outputs(cell: Any) -> list[str]:
    texts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            texts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data"):
            texts.extend(str(v) for v in output["data"].values())
    return texts


@pytest.fixture(scope="module")
def executed_notebook(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The quickstart, executed cell by cell, plus one extra cell reporting the kernel's interpreter."""
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "stored with outputs"
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint('kernel interpreter:', sys.executable)"))

    # A kernelspec of our own, so that a user-level "python3" spec cannot point the kernel at another Python.
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / "python3")
    manager = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = NotebookClient(
        notebook,
        km=manager,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute(env=offline_env())
    return notebook


def test_notebook_runs_without_errors_on_this_interpreter(executed_notebook: Any) -> None:
    errors = [
        f"cell {i}: {o['ename']}: {o['evalue']}"
        for i, cell in enumerate(executed_notebook.cells)
        for o in cell.get("outputs", [])
        if o["output_type"] == "error"
    ]
    assert errors == []
    last = "".join(_outputs(executed_notebook.cells[-1]))
    assert f"kernel interpreter: {sys.executable}" in last


def test_notebook_shows_the_rejected_write(executed_notebook: Any) -> None:
    text = "".join(t for cell in executed_notebook.cells for t in _outputs(cell))
    assert re.search(r"rejected: temperature: 2\.5 is above the maximum 2\.0", text), text
    assert "temperature is still 0.7 (v1)" in text


def _html_outputs(notebook: Any) -> list[str]:
    return [
        output["data"]["text/html"]
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output["output_type"] in ("display_data", "execute_result") and "text/html" in output.get("data", {})
    ]


def _rows(table: str) -> list[list[str]]:
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)
    return [
        [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r, re.S)]
        for r in rows
    ]


def test_notebook_table_shows_calls_before_and_after_the_change(executed_notebook: Any) -> None:
    frames = [html for html in _html_outputs(executed_notebook) if 'class="dataframe' in html]
    assert len(frames) == 1
    body = [row for row in _rows(frames[0]) if row and row[0].isdigit()]
    assert [row[:3] for row in body] == [
        ["1", "0.7 (v1)", "gpt-4o-mini (v1)"],
        ["2", "0.7 (v1)", "gpt-4o-mini (v1)"],
        ["3", "0.2 (v2)", "gpt-4o (v2)"],
        ["4", "0.2 (v2)", "gpt-4o (v2)"],
    ]
    # The answers come from the LM, which states the settings it was called with.
    assert all("model=gpt-4o-mini temperature=0.7 " in row[3] for row in body[:2])
    assert all("model=gpt-4o temperature=0.2 " in row[3] for row in body[2:])


def test_notebook_shows_variables_bindings_provenance_and_history_as_tables(executed_notebook: Any) -> None:
    captioned = [
        (re.search(r"<caption[^>]*>(.*?)</caption>", h).group(1), h)
        for h in _html_outputs(executed_notebook)
        if "<caption" in h
    ]
    tables = dict(captioned)
    variables = _rows(tables["3 variable(s)"])
    assert [r[:4] for r in variables[1:]] == [
        ["temperature", "float", "0.7", "1"],
        ["max_tokens", "integer", "256", "1"],
        ["model", "string", '"gpt-4o-mini"', "1"],
    ]
    bindings = {r[0]: r for r in _rows(tables["VariableAwarePredict: bound variables"])[1:]}
    assert bindings["temperature"][1:] == ["temperature", "0.7", "1"]
    assert bindings["model"][1:] == ["model", '"gpt-4o-mini"', "1"]
    provenance = {r[0]: r for r in _rows(tables["provenance of one call"])[1:]}
    assert provenance["temperature"][1:4] == ["temperature", "0.7", "1"]
    history = [h for caption, h in captioned if caption.startswith("history of temperature")]
    assert [r[:2] for r in _rows(history[0])[1:]] == [["2", "0.2"], ["1", "0.7"]]
    assert [r[:2] for r in _rows(history[1])[1:]] == [["3", "0.7"], ["2", "0.2"]]
    assert "rolled_back_to=1" in _rows(history[1])[1][4]
    bridged = [
        h for caption, h in tables.items() if caption.startswith("context ctx_") and "bridged at 127.0.0.1:" in caption
    ]
    assert len(bridged) == 1


def test_notebook_draws_the_history_plot(executed_notebook: Any) -> None:
    images = [
        output["data"]["image/png"]
        for cell in executed_notebook.cells
        for output in cell.get("outputs", [])
        if output["output_type"] == "display_data" and "image/png" in output.get("data", {})
    ]
    assert len(images) == 1
    assert len(images[0]) > 1000  # a real picture (base64 PNG), not an empty canvas


def test_notebook_rolls_back(executed_notebook: Any) -> None:
    text = "".join(t for cell in executed_notebook.cells for t in _outputs(cell))
    assert "temperature rolled back to 0.7 (v3)" in text


def test_notebook_prints_the_bridge_address(executed_notebook: Any) -> None:
    text = "".join(t for cell in executed_notebook.cells for t in _outputs(cell))
    assert "backend: bridged" in text
    assert re.search(r"bridge address: 127\.0\.0\.1:\d+", text), text


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FOUND_EXAMPLES | set(EXAMPLE_LINES)))
def test_example_runs(name: str) -> None:
    path = EXAMPLES_DIR / name
    assert path.is_file(), f"examples/{name} is missing"
    result = run_python(str(path))
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip(), describe(result)
    for pattern in EXAMPLE_LINES.get(name, ()):
        assert re.search(pattern, result.stdout), f"no line matching {pattern!r}\n{describe(result)}"


# ---------------------------------------------------------------------------------------------
# The demo (make demo)
# ---------------------------------------------------------------------------------------------

TABLE_COLUMNS = ["who", "call", "temperature", "max_tokens", "model", "answer"]


def provenance_table(stdout: str) -> list[dict[str, str]]:
    """The rows of the provenance table the demo prints (columns separated by two or more spaces)."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if re.split(r"\s{2,}", line.strip()) == TABLE_COLUMNS), None)
    assert start is not None, f"no provenance table in the output:\n{stdout}"
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(dict(zip(TABLE_COLUMNS, re.split(r"\s{2,}", line.strip()), strict=True)))
    return rows


def check_demo(result: subprocess.CompletedProcess[str]) -> str:
    """Assert what every demo run must show; return the bridge address it switched to."""
    out = result.stdout
    assert result.returncode == 0, describe(result)
    assert re.search(r"rejected as expected: .*temperature: 3\.5 is above the maximum 2\.0", out), describe(result)
    switched = re.search(r"registered a DSPy program: switched to bridged at (\S+:\d+)", out)
    assert switched, describe(result)

    rows = provenance_table(out)
    assert {r["who"] for r in rows} == {"orchestrator", "worker-1", "worker-2"}, out
    for who in ("orchestrator", "worker-1", "worker-2"):
        used = [r["temperature"] for r in rows if r["who"] == who]
        assert "0.8 (v3)" in used and "0.2 (v4)" in used, f"{who}: {used}\n{out}"
    for row in rows:
        temperature = row["temperature"].split()[0]
        model = row["model"].split()[0]
        assert f"model={model} temperature={temperature} " in row["answer"], row
    return switched.group(1)


def test_demo_on_the_embedded_bridge() -> None:
    result = run_python("-m", "dspex_dspy.demo")
    address = check_demo(result)
    assert address.startswith("127.0.0.1:")


def test_demo_against_a_standalone_bridge(spawn_bridge: Callable[..., Any]) -> None:
    bridge = spawn_bridge()
    try:
        result = run_python("-m", "dspex_dspy.demo", "--bridge", bridge.address)
    finally:
        bridge.stop()
    assert check_demo(result) == bridge.address
