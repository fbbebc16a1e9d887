"""The wheel: models/ and analysis/ inside the bayesprompt package, data files and console
scripts included, and the installed package working away from the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"  # setuptools builds in the tree: keep build/ out of the repo
    anywhere = shutil.ignore_patterns(".git", ".venv*", "*.egg-info", "__pycache__", ".*_cache")

    def ignore(folder: str, names: list[str]) -> set[str]:  # run folders, builds: top level
        top = {"runs", "build"} & set(names) if Path(folder) == REPO else set()
        return set(anywhere(folder, names)) | top

    shutil.copytree(REPO, source, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(folder), str(source)],
                   check=True, capture_output=True)
    (path,) = folder.glob("bayesprompt-*.whl")
    return path


def test_the_wheel_holds_one_top_level_package_with_models_analysis_and_data(wheel) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"bayesprompt",
                                                       f"{wheel.name.split('-py')[0]}.dist-info"}
    for path in ("bayesprompt/models/vpt_cond.py", "bayesprompt/analysis/posterior.py",
                 "bayesprompt/commands/train.py", "bayesprompt/clip/weights/miniclip.pt",
                 "bayesprompt/clip/configs/MiniCLIP.json",
                 "bayesprompt/clip/configs/tiny_clip.json",
                 "bayesprompt/analysis/notebooks/posterior_diagnostics.ipynb"):
        assert path in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("bayesprompt-train", "bayesprompt-analyze", "bayesprompt-benchmark"):
        assert f"{script} = bayesprompt.commands." in entry_points


def test_the_installed_package_finds_its_models_without_the_source_tree(wheel,
                                                                      tmp_path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(wheel)], check=True, capture_output=True)
    probe = ("import importlib.util, bayesprompt.runs.model_files as runs\n"
             "print(runs.MODELS_DIR)\n"
             "print(runs.load_model_class('vpt_cond').__module__)\n"
             "print(importlib.util.find_spec('models'), importlib.util.find_spec('analysis'))\n")
    environment = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, check=True)
    models_dir, module, specs = result.stdout.splitlines()
    assert Path(models_dir) == target / "bayesprompt" / "models"
    assert module == "bayesprompt.models.vpt_cond"
    assert specs == "None None"
    help_text = subprocess.run(
        [sys.executable, "-c", "from bayesprompt.commands.train import cli; cli()", "--help"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, check=True).stdout
    assert "--model" in help_text and "vpt_cond" in help_text
