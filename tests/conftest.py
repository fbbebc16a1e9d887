"""Fixtures: a tiny random-init open_clip backbone and a generated CoOp-format EuroSAT tree
(bayesprompt.data.fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub

from bayesprompt.data.fixtures import EUROSAT_FOLDERS, TINY_BACKBONE, write_eurosat  # noqa: E402

#: This folder (test model files live in TESTS/models).
TESTS = Path(__file__).resolve().parent

__all__ = ["EUROSAT_FOLDERS", "TESTS", "TINY_BACKBONE", "write_eurosat"]


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
