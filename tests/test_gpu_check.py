"""experiments/gpu_check.py: its --dry-run on the CPU, and its sections on CUDA (`pytest -m
cuda`, skipped without a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "gpu_check.py"
SECTIONS = ["agreement", "resume", "step", "imagenet_memory", "nccl", "sweep"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load_script():
    """experiments/gpu_check.py as the module `gpu_check` (its dataclass needs the name)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def test_dry_run_exercises_every_section_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == SECTIONS
    failed = {name: section for name, section in report["sections"].items()
              if section["status"] != "pass"}
    assert not failed
    agreement = report["sections"]["agreement"]["errors"]
    assert agreement["fp32"]["worst"] <= 1e-5 and 0 < agreement["bf16"]["worst"] <= 3e-2
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | pass |" in table for name in SECTIONS)


def test_without_a_gpu_it_asks_for_dry_run(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "Pass --dry-run" in done.stderr and "Traceback" not in done.stderr


def test_noise_is_drawn_on_the_cpu_from_the_seed() -> None:
    with load_script().cpu_noise(3):
        draw = dist.Normal(torch.zeros(2, 3), 1.0).rsample()
    torch.testing.assert_close(draw, torch.randn(2, 3, generator=torch.Generator().manual_seed(3)),
                               atol=0, rtol=0)


def test_a_failing_section_is_reported_and_the_others_go_on(tmp_path: Path, monkeypatch
                                                            ) -> None:
    script = load_script()

    def broken(setting, folder):
        raise RuntimeError("injected")

    monkeypatch.setitem(script.SECTIONS, "agreement", broken)
    monkeypatch.setitem(script.SECTIONS, "step", lambda setting, folder: {
        "status": "pass", "detail": "ran", "reason": None})
    script.main(["--dry-run", "--out", str(tmp_path), "--sections", "agreement", "step"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert report["agreement"]["status"] == "fail" and "injected" in report["agreement"]["detail"]
    assert report["step"]["status"] == "pass"
    assert "RuntimeError: injected" in (tmp_path / "logs" / "agreement.log").read_text()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("section", SECTIONS)
def test_cuda_section(section: str, tmp_path: Path) -> None:
    """Each section of the GPU check on the GPU (NCCL with one GPU: skipped, with its reason)."""
    script = load_script()
    setting = script.Setting("cuda", "ViT-B-16", False)
    result = script.run_section(section, setting, tmp_path)
    allowed = ("pass", "skipped") if section == "nccl" else ("pass",)
    assert result["status"] in allowed, result
