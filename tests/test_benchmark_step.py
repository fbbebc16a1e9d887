"""experiments/benchmark_step.py runs end to end on the tiny backbone (its figures are
measurements, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY_BACKBONE

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "benchmark_step.py"


def test_benchmark_step_times_both_steps_and_writes_its_figures(tmp_path: Path) -> None:
    figures = tmp_path / "step.json"
    subprocess.run([sys.executable, str(SCRIPT), "--backbone", TINY_BACKBONE, "--pretrained", "",
                    "--model", "vpt_cond", "--num-particles", "2", "--num-classes", "3",
                    "--repeats", "1", "--rounds", "1", "--reference-repeats", "1",
                    "--skip-flops", "--device", "cpu", "--json", str(figures)],
                   check=True, capture_output=True, text=True)
    results = json.loads(figures.read_text())
    assert results["ours"]["images_per_s"] > 0 and results["ours"]["prompts_per_s"] > 0
    assert results["speedup_per_image"]["median"] > 0
