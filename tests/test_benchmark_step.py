"""experiments/benchmark_step.py runs end to end on the tiny backbone (its figures are
measurements, not asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE

from bayesprompt.clip.factory import load_clip

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


def load_script():
    """experiments/benchmark_step.py as a module, to call `main` with patched memory."""
    spec = importlib.util.spec_from_file_location("benchmark_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_RUN = ["--backbone", TINY_BACKBONE, "--pretrained", "", "--model", "vpt_cond",
            "--num-particles", "3", "--num-classes", "2", "--repeats", "1", "--device", "cpu"]


def test_a_reference_step_that_does_not_fit_runs_smaller_and_is_extrapolated_by_flops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    script = load_script()
    whole, limited = tmp_path / "whole.json", tmp_path / "limited.json"
    script.main([*TINY_RUN, "--json", str(whole)])
    per_particle = script.reference_step_bytes(load_clip(TINY_BACKBONE, ""), 2)
    # room for one particle of the three, whatever this machine's memory
    monkeypatch.setattr(script, "free_memory_bytes",
                        lambda device: int(1.5 * per_particle / script.REFERENCE_MEMORY_SHARE))
    script.main([*TINY_RUN, "--json", str(limited)])
    assert "it runs with 1 particles" in capsys.readouterr().out
    full, extrapolated = (json.loads(path.read_text()) for path in (whole, limited))
    assert full["reference_note"] is None and full["reference_style"]["particles_run"] == 3
    reference = extrapolated["reference_style"]
    assert reference["particles_run"] == 1 and reference["extrapolated"]
    # FLOPs are linear in L x C: the extrapolation gives the count of the full step
    assert reference["gflop_per_step"] == pytest.approx(
        full["reference_style"]["gflop_per_step"], rel=1e-6)
    assert reference["prompts_per_s"] * reference["step_s"] == pytest.approx(6)


def test_what_does_not_fit_is_skipped_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    script = load_script()
    monkeypatch.setattr(script, "free_memory_bytes", lambda device: 1024)
    figures = tmp_path / "step.json"
    script.main([*TINY_RUN, "--json", str(figures)])
    out = capsys.readouterr().out
    assert "full-length prompts need about" in out and "skipped" in out
    assert "FLOPs of our step not counted" in out  # counting would keep every prompt's memory
    results = json.loads(figures.read_text())
    assert "reference_style" not in results and "skipped" in results["reference_note"]
    assert results["ours"]["step_s"] > 0 and results["ours"]["gflop_per_step"] is None


def test_the_reference_step_estimate_grows_with_its_prompts() -> None:
    """77-token prompts with gradients through ViT-B/16's text tower: tens of MB each, so
    C = 500, L = 20 asks for hundreds of GiB (the step the OOM killer stopped)."""
    script = load_script()
    clip = load_clip("ViT-B-16", "")
    one = script.reference_step_bytes(clip, 1)
    assert 20 * 2**20 < one < 80 * 2**20
    assert script.reference_step_bytes(clip, 500 * 20) == 10_000 * one
