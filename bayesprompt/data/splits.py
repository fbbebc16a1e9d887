"""Few-shot sampling and CoOp's base/new class split."""

from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict
from pathlib import Path

from bayesprompt.data.datasets import Dataset, Item

SUBSAMPLES = ("all", "base", "new")


def sample_few_shot(items: list[Item], shots: int, seed: int) -> list[Item]:
    """`shots` items per class (all of a class that has fewer), chosen by `seed`."""
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    chosen: list[Item] = []
    for label in sorted(by_label):
        group = by_label[label]
        chosen += group if len(group) <= shots else rng.sample(group, shots)
    return chosen


def few_shot(dataset: Dataset, shots: int, seed: int, cache_dir: Path | None = None
             ) -> Dataset:
    """Train with `shots` per class and val with min(shots, 4), as CoOp; test untouched.

    The selection is cached as JSON in `<dataset>/split_fewshot/` (or `cache_dir` when the
    dataset folder is read-only), so the same seed always gives the same images.
    """
    if shots <= 0:
        return dataset
    name = f"shot_{shots}-seed_{seed}.json"
    candidates = [dataset.folder / "split_fewshot", *([cache_dir] if cache_dir else [])]
    for folder in candidates:
        if (folder / name).is_file():
            return _with_splits(dataset, json.loads((folder / name).read_text()))
    selection = {
        "train": [_entry(i, dataset.folder) for i in sample_few_shot(dataset.train, shots, seed)],
        "val": [_entry(i, dataset.folder)
                for i in sample_few_shot(dataset.val, min(shots, 4), seed)],
    }
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / (name + ".tmp")
            tmp.write_text(json.dumps(selection))
            os.replace(tmp, folder / name)
            break
        except OSError:
            continue
    return _with_splits(dataset, selection)


def _entry(item: Item, folder: Path) -> list:
    """[path relative to the dataset folder, label, classname]."""
    return [os.path.relpath(item.path, folder), item.label, item.classname]


def _with_splits(dataset: Dataset, selection: dict[str, list]) -> Dataset:
    train, val = ([Item(dataset.folder / path, int(label), name)
                   for path, label, name in selection[split]] for split in ("train", "val"))
    return Dataset(dataset.name, dataset.classnames, dataset.template, train, val,
                   dataset.test, dataset.folder)


def subsample_classes(dataset: Dataset, subsample: str) -> Dataset:
    """CoOp's base/new split: sorted labels, the first ceil(n/2) are base, the rest new.

    Labels of the kept classes are remapped to 0..k-1 in train, val and test.
    """
    if subsample == "all":
        return dataset
    labels = sorted({item.label for item in dataset.train + dataset.test})
    half = math.ceil(len(labels) / 2)
    kept = labels[:half] if subsample == "base" else labels[half:]
    relabel = {old: new for new, old in enumerate(kept)}

    def keep(items: list[Item]) -> list[Item]:
        return [Item(i.path, relabel[i.label], i.classname) for i in items if i.label in relabel]

    classnames = [dataset.classnames[label] for label in kept]
    return Dataset(dataset.name, classnames, dataset.template, keep(dataset.train),
                   keep(dataset.val), keep(dataset.test), dataset.folder)
