"""Every notebook under notebooks/ runs top to bottom on CPU against the committed runs.

A failing cell fails the test. Notebooks are committed without outputs, so the committed file can
never disagree with the committed data. With no committed run at all (a checkout before the
reference runs landed) the notebooks run against a small gloo sweep made here instead, injected
after their parameter cell the way papermill does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COMMITTED_RUNS = sorted((ROOT / "results").glob("**/results.csv"))


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    stale = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not stale, f"{path.name}: cells {stale} carry outputs; clear them before committing"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), (
        f"{path.name}: no cell tagged 'parameters'"
    )


@pytest.fixture(scope="module")
def fallback_runs(tmp_path_factory) -> Path | None:
    """None when results/ holds committed runs; else a small sweep to run the notebooks on."""
    if COMMITTED_RUNS:
        return None
    out = tmp_path_factory.mktemp("runs") / "cpu-run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "sweep",
            "--world-size",
            "2",
            "--backends",
            "gloo",
            "-e",
            "64K",
            "-f",
            "4",
            "--iters",
            "5",
            "--warmup",
            "1",
            "--out",
            str(out),
            "--quiet",
        ],
        check=True,
        cwd=ROOT,
        timeout=240,
        stdout=subprocess.DEVNULL,
    )
    return out


def _inject(nb, runs: Path) -> None:
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(f"RUNS = {str(runs)!r}")
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path, fallback_runs: Path | None) -> None:
    nb = nbformat.read(path, as_version=4)
    if fallback_runs is not None:
        _inject(nb, fallback_runs)
    # "python3" is ipykernel's own kernel: jupyter_client starts it with this interpreter
    client = NotebookClient(
        nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    images = sum(
        "image/png" in out.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
    )
    # 01: latency, busbw, status per machine; 02: winners, gain, Pareto per machine at least
    assert images >= 3, f"{path.name} drew {images} figure(s), expected 3 or more"
