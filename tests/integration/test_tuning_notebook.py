"""The tuning notebook, executed for real: the search, its history plot, its trials table, the publication."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO_ROOT / "notebooks" / "tuning.ipynb"
CELL_TIMEOUT_S = 180
DROPPED_ENV = ("OPENAI_API_KEY", "DSPEX_BRIDGE_ADDRESS", "DSPEX_DEMO_BRIDGE")


def _outputs(cell: Any, kind: str = "text/plain") -> list[str]:
    texts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream" and kind == "text/plain":
            texts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data") and kind in output["data"]:
            texts.append(str(output["data"][kind]))
    return texts


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "stored with outputs"
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
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    client.execute(env=env)
    return notebook


def test_the_notebook_runs_without_errors_or_warnings(executed: Any) -> None:
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    streams = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "Warning" not in streams, streams


def test_the_notebook_finds_the_optimum_and_plots_the_history(executed: Any) -> None:
    text = "".join(t for cell in executed.cells for t in _outputs(cell))
    assert "best trial" in text
    score = float(text.split("best trial", 1)[1].split("score ", 1)[1].split(":", 1)[0].split()[0])
    assert score >= 0.95
    assert "history plotted: 30 trials" in text
    images = [t for cell in executed.cells for t in _outputs(cell, "image/png")]
    assert len(images) == 1 and len(images[0]) > 1000


def test_the_notebook_shows_the_trials_table_and_the_publication(executed: Any) -> None:
    tables = [t for cell in executed.cells for t in _outputs(cell, "text/html")]
    assert any("max_tokens" in t and "duration_s" in t and t.count("<tr") >= 31 for t in tables)
    text = "".join(t for cell in executed.cells for t in _outputs(cell))
    assert "model = offline/large (v2) {'optimizer_id': 'notebook-tuner'" in text
    assert "lease: None" in text
