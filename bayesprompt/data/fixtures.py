"""Small generated inputs for checks: a tiny random-init open_clip backbone and a CoOp-format
EuroSAT tree. The test suite (tests/conftest.py) and experiments/gpu_check.py use them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from bayesprompt.data.datasets import EUROSAT_NAMES

#: An open_clip model config of a 2-layer, width-64 text tower and a 1-layer image tower.
TINY_BACKBONE = str(Path(__file__).resolve().parent.parent / "clip" / "configs" / "tiny_clip.json")
EUROSAT_FOLDERS = sorted(EUROSAT_NAMES)


def write_eurosat(root: Path, per_class: tuple[int, int, int] = (6, 2, 3)) -> Path:
    """ROOT/eurosat/2750/<Folder>/<Folder>_<i>.jpg (40 x 40 noisy single-colour images) and
    split_zhou_EuroSAT.json with `per_class` train, val and test images (CoOp's names)."""
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
