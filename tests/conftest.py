"""Fixtures: a tiny random-init open_clip backbone and a generated CoOp-format EuroSAT tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub

from bayesprompt.data.datasets import EUROSAT_NAMES  # noqa: E402

TESTS = Path(__file__).resolve().parent
TINY_BACKBONE = str(TESTS / "tiny_clip.json")
EUROSAT_FOLDERS = sorted(EUROSAT_NAMES)


def write_eurosat(root: Path, per_class: tuple[int, int, int] = (6, 2, 3)) -> Path:
    """ROOT/eurosat/2750/<Folder>/<Folder>_<i>.jpg and split_zhou_EuroSAT.json (CoOp names)."""
    folder = root / "eurosat"
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label, class_folder in enumerate(EUROSAT_FOLDERS):
        (folder / "2750" / class_folder).mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 255, size=3)
        index = 0
        for name, count in zip(split, per_class, strict=True):
            for _ in range(count):
                pixels = np.clip(colour + rng.normal(0, 30, (40, 40, 3)), 0, 255)
                relative = f"{class_folder}/{class_folder}_{index}.jpg"
                Image.fromarray(pixels.astype(np.uint8)).save(folder / "2750" / relative)
                split[name].append([relative, label, EUROSAT_NAMES[class_folder]])
                index += 1
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return root


@pytest.fixture(scope="session")
def eurosat_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eurosat(tmp_path_factory.mktemp("data"))


@pytest.fixture
def run_args(eurosat_root: Path, tmp_path: Path) -> list[str]:
    """svi_train.py arguments for a fast CPU run on the tiny EuroSAT tree."""
    return ["--dataset", "eurosat", "--root", str(eurosat_root), "--backbone", TINY_BACKBONE,
            "--pretrained", "", "--shots", "4", "--epochs", "2", "--num-particles", "3",
            "--batch-size", "4", "--views", "2", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "run"), "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_clip():
    from bayesprompt.clip.factory import load_clip
    return load_clip(TINY_BACKBONE)


@pytest.fixture(scope="session")
def offline_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dataset of the offline world, generated once per test session."""
    from bayesprompt.world.downstream import write_all_offline_datasets
    root = tmp_path_factory.mktemp("offline")
    write_all_offline_datasets(root)
    return root
