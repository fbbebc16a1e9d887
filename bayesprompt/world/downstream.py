"""Downstream datasets of the procedural world, written to disk in CoOp's format.

Layout of each dataset NAME under a root folder::

    ROOT/NAME/images/<class_folder>/<file>.png
    ROOT/NAME/split.json    {"train": [[relative_path, label, classname], ...], "val", "test"}
    ROOT/NAME/dataset.json  {"name": NAME, "template": "a photo of a {}.", "classnames": [...]}

Datasets are generated deterministically on first use (a few seconds each) and written
atomically: a hidden temporary folder is filled, then renamed to ROOT/NAME, with the
permissions the umask gives (a data root shared by a lab stays readable). Processes that
generate the same dataset at once all succeed: the first rename wins, the others find it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from bayesprompt.files import current_umask, make_folder, write_error, write_json
from bayesprompt.paths import data_root
from bayesprompt.world import procedural as world

TEMPLATE = "a photo of a {}."
#: Bumped whenever the rendering of the downstream datasets changes: older copies are rebuilt.
WORLD_VERSION = 3
SPLIT_SIZES = {"train": 40, "val": 10, "test": 50}  # images per class


@dataclass(frozen=True)
class GeneratedDataset:
    """Classes as (colour, shape) pairs in label order, the nuisance domain and a seed."""

    classes: tuple[tuple[str, str], ...]
    domain: world.Domain
    seed: int


def _pairs(names: str) -> tuple[tuple[str, str], ...]:
    """'red circle, blue square' -> (('red', 'circle'), ('blue', 'square'))."""
    return tuple(tuple(name.split()) for name in names.split(", "))


# A fine-grained base-to-new split (world version 3). Base classes (the first half of the
# labels) are eight shapes in red and blue, told apart by shape, which MiniCLIP reads poorly
# under the downstream shift; new classes are two other shapes in eight colours, told apart
# mostly by colour, and share the colour words red and blue with the base classes. Learned
# context that sharpens the base shapes then shifts the new classes' text features in ways the
# new images do not follow: CoOp gains on base and loses on new (docs/OFFLINE_WORLD.md).
_BASE_SHAPES = ("circle", "square", "triangle", "diamond", "star", "heart", "cross", "ring")
_NEW_COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
MINIWORLD_CLASSES = tuple((color, shape) for shape in _BASE_SHAPES for color in ("red", "blue")) + \
    tuple((color, shape) for shape in ("crescent", "arrow") for color in _NEW_COLORS)
# Cross-dataset target: 20 classes that share no class with miniworld (two of them held out
# of pretraining: purple hexagon, green pentagon).
MINIWORLD_B_CLASSES = tuple(
    (color, shape)
    for shape in ("hexagon", "pentagon", "star", "heart")
    for color in ("purple", "brown", "green", "orange", "white")
)


def _styled(style: str) -> world.Domain:
    return replace(world.DOWNSTREAM_DOMAIN, style_probs=((style, 1.0),))


DATASETS: dict[str, GeneratedDataset] = {
    "miniworld": GeneratedDataset(MINIWORLD_CLASSES, world.DOWNSTREAM_DOMAIN, seed=100),
    "miniworld_b": GeneratedDataset(MINIWORLD_B_CLASSES, world.DOWNSTREAM_DOMAIN, seed=200),
    "miniworld_sketch": GeneratedDataset(MINIWORLD_CLASSES, _styled("sketch"), seed=300),
    "miniworld_noise": GeneratedDataset(MINIWORLD_CLASSES, _styled("noise"), seed=400),
    "miniworld_recolor": GeneratedDataset(MINIWORLD_CLASSES, _styled("recolor"), seed=500),
}

#: The datasets `experiments/benchmark.py` runs when no --datasets are given, per protocol:
#: base-to-new datasets; (source, targets) for cross-dataset transfer and for domain
#: generalisation.
BENCHMARK_DEFAULTS: dict[str, list[str] | tuple[str, list[str]]] = {
    "base2new": ["miniworld", "miniworld_recolor"],
    "cross_dataset": ("miniworld", ["miniworld_b"]),
    "domain_generalization": ("miniworld",
                              ["miniworld_sketch", "miniworld_noise", "miniworld_recolor"]),
}


def classnames(name: str) -> list[str]:
    """Class names of dataset `name` in label order, as they appear in prompts."""
    return [f"{color} {shape}" for color, shape in DATASETS[name].classes]


def _write_images(spec: GeneratedDataset, folder: Path) -> dict[str, list]:
    """Render every split into folder/images and return the split entries."""
    rng = np.random.default_rng(spec.seed)
    names = [f"{c} {s}" for c, s in spec.classes]
    for cname in names:
        (folder / "images" / cname.replace(" ", "_")).mkdir(parents=True)
    split = {}
    for part, per_class in SPLIT_SIZES.items():
        labels = np.repeat(np.arange(len(names)), per_class)
        scenes = world.sample_scenes(rng, len(labels), list(spec.classes), spec.domain, labels)
        images, _ = world.render(scenes, rng)
        entries = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            rel = f"{names[label].replace(' ', '_')}/{part}_{i:05d}.png"
            Image.fromarray(image).save(folder / "images" / rel)
            entries.append([rel, int(label), names[label]])
        split[part] = entries
    return split


def write_offline_dataset(name: str, root: Path | str | None = None) -> Path:
    """Write dataset `name` under root (data_root()) unless present; return its folder."""
    if name not in DATASETS:
        raise ValueError(f"unknown offline dataset {name!r}; choose from {sorted(DATASETS)}")
    root = Path(root) if root is not None else data_root()
    target = root / name
    if _version(target) == WORLD_VERSION:
        return target
    if target.exists():  # an older world: move it aside first, so no mix of versions is read
        _remove_stale(target)
    make_folder(root)
    try:
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    except OSError as error:
        raise write_error(error, root / name) from None
    try:
        split = _write_images(DATASETS[name], tmp)
        write_json(tmp / "split.json", split, indent=None)
        meta = {"name": name, "template": TEMPLATE, "classnames": classnames(name),
                "version": WORLD_VERSION}
        write_json(tmp / "dataset.json", meta, indent=1)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared root
        os.rename(tmp, target)
    except OSError as error:
        if _version(target) != WORLD_VERSION:  # not a concurrent writer that won
            raise write_error(error, target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale(target: Path) -> None:
    """Move an outdated dataset folder aside and delete it (another process may be first)."""
    try:
        stale = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-stale-"))
    except OSError as error:
        raise write_error(error, target) from None
    try:
        os.rename(target, stale / target.name)
    except FileNotFoundError:
        pass  # a concurrent writer moved it already
    except OSError as error:
        raise write_error(error, target) from None
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _version(folder: Path) -> int | None:
    """The world version a written dataset folder holds, None when absent or incomplete."""
    try:
        meta = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):  # absent, or damaged: written again
        return None
    return meta.get("version", 1) if isinstance(meta, dict) else None


def write_all_offline_datasets(root: Path | str | None = None) -> list[Path]:
    """Write every offline dataset (idempotent), with a progress bar."""
    return [write_offline_dataset(n, root) for n in tqdm(DATASETS, desc="offline datasets")]


def read_split(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and labels (N,) of one split of a written dataset."""
    entries = json.loads((folder / "split.json").read_text())[part]
    images = np.stack([np.asarray(Image.open(folder / "images" / rel)) for rel, _, _ in entries])
    return images, np.array([label for _, label, _ in entries])
