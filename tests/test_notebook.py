"""The posterior-diagnostics notebook runs end to end on the EuroSAT fixture (tiny backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from conftest import TINY_BACKBONE
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "analysis" / "notebooks" / "posterior_diagnostics.ipynb"


def fixture_parameters(run_dir: Path, root: Path, cache: Path) -> str:
    """Source of the parameters cell: a one-epoch vpt_cond run on the fixture."""
    values = {"RUN_DIR": str(run_dir), "DATASET": "eurosat", "ROOT": str(root),
              "BACKBONE": TINY_BACKBONE, "PRETRAINED": None, "MODEL": "vpt_cond", "SHOTS": 2,
              "EPOCHS": 1, "NUM_PARTICLES": 2, "VIEWS": 1, "BATCH_SIZE": 4,
              "CACHE_DIR": str(cache), "NUM_SAMPLES": 6, "DOMAINS": ["eurosat"],
              "DEVICE": "cpu"}
    return "\n".join(f"{name} = {value!r}" for name, value in values.items())


def test_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_executes_on_the_fixture(eurosat_root: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this tree
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    run_dir = tmp_path / "run"
    parameters[0].source = fixture_parameters(run_dir, eurosat_root, tmp_path / "cache")
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    metrics = json.loads((run_dir / "analysis" / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"base", "new", "eurosat"}
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) >= 5  # reliability, histograms, selective, projection, r posterior
