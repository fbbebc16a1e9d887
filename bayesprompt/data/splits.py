"""Few-shot sets exactly as CoOp's (Dassl's), and CoOp's base/new class split.

The few-shot train and val lists of a dataset, shots k and seed s come from, in this order:

1. `<dataset>/split_fewshot/shot_{k}-seed_{s}.pkl`, the file CoOp/Dassl wrote: read as it is
   with a restricted unpickler (no Dassl needed), its absolute paths mapped to this machine by
   their path below the dataset's image folder;
2. the project's JSON cache in `<cache_dir>/split_fewshot/`, keyed by a hash of everything that
   determines the selection (sampler, dataset name, train and val lists, k, s);
3. Dassl's `generate_fewshot_dataset`, restated: `random.seed(s)`, the train split with k per
   class, then the val split with min(k, 4) per class.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

from bayesprompt.data.datasets import FEWSHOT_DIR, Dataset, Item
from bayesprompt.errors import UserError
from bayesprompt.files import write_json

SUBSAMPLES = ("all", "base", "new")
#: Recorded in every JSON cache file: the algorithm that made the selection.
SAMPLER = "dassl.generate_fewshot_dataset(repeat=False), train then val with min(k, 4)"


def dassl_sample(items: list[Item], shots: int, rng: random.Random) -> list[Item]:
    """Dassl's `generate_fewshot_dataset(items, num_shots=shots)` as CoOp calls it.

    Labels are visited in order of first appearance; a label with at least `shots` items takes
    `rng.sample(items_of_label, shots)` (items in list order), one with fewer keeps them all
    (CoOp passes `repeat=False`, so `random.choices` is never reached and draws nothing).
    """
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    chosen: list[Item] = []
    for group in by_label.values():
        chosen += rng.sample(group, shots) if len(group) >= shots else group
    return chosen


def dassl_few_shot(dataset: Dataset, shots: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Train (k per class) and val (min(k, 4) per class) after `random.seed(seed)`, as CoOp."""
    rng = random.Random(seed)
    train = dassl_sample(dataset.train, shots, rng)
    val = dassl_sample(dataset.val, min(shots, 4), rng)
    return train, val


@dataclass
class FewShot:
    """A dataset restricted to its few-shot train and val lists, and where they came from."""

    dataset: Dataset
    source: str

    def record(self) -> dict[str, list]:
        """`{"train": [[path, label, classname], ...], "val": [...]}`, paths as in the split
        file (relative to the dataset's image folder): what a run folder's fewshot.json holds."""
        return selection_record(self.dataset)


def selection_record(dataset: Dataset) -> dict[str, list]:
    """Train and val lists of `dataset` as `[[path below the image folder, label, name], ...]`."""
    return {split: [_entry(item, dataset.images_folder) for item in getattr(dataset, split)]
            for split in ("train", "val")}


def few_shot(dataset: Dataset, shots: int, seed: int, cache_dir: Path | None = None) -> FewShot:
    """Train with `shots` per class and val with min(shots, 4), exactly as CoOp; test untouched.

    `shots` 0 keeps every image. See the module docstring for where the lists come from.
    """
    if shots < 0:
        raise UserError(f"--shots must be 0 (all images) or a positive number, got {shots}.")
    if shots == 0:
        return FewShot(dataset, "all images (shots 0)")
    pickled = dataset.folder / FEWSHOT_DIR / f"shot_{shots}-seed_{seed}.pkl"
    if pickled.is_file():
        train, val = read_dassl_pickle(pickled, dataset)
        return FewShot(replace(dataset, train=train, val=val), f"{pickled} (Dassl)")
    key = selection_key(dataset, shots, seed)
    cache_file = None
    if cache_dir is not None:
        cache_file = (cache_dir / _safe_name(dataset.name) /
                      f"shot_{shots}-seed_{seed}-{key}.json")
        cached = _read_cache(cache_file, key)
        if cached is not None:
            return FewShot(_with_selection(dataset, cached), sampled_source(cache_file))
    train, val = dassl_few_shot(dataset, shots, seed)
    chosen = replace(dataset, train=train, val=val)
    if cache_file is not None:
        _write_cache(cache_file, {"sampler": SAMPLER, "key": key, "dataset": dataset.name,
                                  "shots": shots, "seed": seed, **selection_record(chosen)})
    return FewShot(chosen, sampled_source(cache_file))


def sampled_source(cache_file: Path | None) -> str:
    """How a sampled selection came about, the same whether it was just drawn or read back
    from its cache file (a resumed run's results.json equals an uninterrupted one's)."""
    return f"sampled ({SAMPLER})" + (f", cached in {cache_file}" if cache_file else "")


def selection_key(dataset: Dataset, shots: int, seed: int) -> str:
    """16 hex digits of a SHA-256 over the sampler, dataset name, train and val lists, k, s."""
    content = {"sampler": SAMPLER, "dataset": dataset.name, "shots": shots, "seed": seed,
               **selection_record(dataset)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name) or "dataset"


def _read_cache(path: Path, key: str) -> dict | None:
    """A cache file's selection, or None when it is absent, unreadable or of another key."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("key") != key or cached.get("sampler") != SAMPLER:
        return None
    return cached


def _write_cache(path: Path, selection: dict) -> None:
    """Write the JSON cache atomically; a cache that cannot be written is only skipped."""
    try:
        write_json(path, selection, indent=None)
    except (UserError, OSError):
        pass


def _entry(item: Item, folder: Path) -> list:
    """[path relative to `folder`, label, classname]."""
    return [Path(os.path.relpath(item.path, folder)).as_posix(), item.label, item.classname]


def _with_selection(dataset: Dataset, selection: dict[str, list]) -> Dataset:
    train, val = ([Item(dataset.images_folder / path, int(label), name)
                   for path, label, name in selection[split]] for split in ("train", "val"))
    return replace(dataset, train=train, val=val)


class _Datum:
    """Receives the state of a pickled `dassl.data.datasets.Datum` (`_impath`, `_label`, ...)."""


class _DasslUnpickler(pickle.Unpickler):
    """Unpickles containers of builtins and Dassl's `Datum`; refuses every other global."""

    def find_class(self, module: str, name: str) -> type:
        if name == "Datum" and module.split(".")[0] == "dassl":
            return _Datum
        raise pickle.UnpicklingError(f"the file refers to {module}.{name}, not a Dassl Datum")


def read_dassl_pickle(path: Path, dataset: Dataset) -> tuple[list[Item], list[Item]]:
    """Train and val of a Dassl few-shot pickle, mapped onto `dataset`'s own items.

    Each `Datum._impath` (an absolute path of the machine that wrote it) is matched to the
    dataset item whose path below the image folder is its longest suffix; its label must agree.
    A pickle without "val" (CoOp's ImageNet) keeps the dataset's val list.
    """
    def fail(problem: str) -> UserError:
        return UserError(
            f"Cannot use the few-shot split {path}: {problem}. It should be a CoOp/Dassl "
            f"few-shot file for the dataset in {dataset.folder}. Delete or move it to let "
            "the project sample the same images itself."
        )

    try:
        with path.open("rb") as file:
            data = _DasslUnpickler(file).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError,
            TypeError, IndexError) as error:
        raise fail(f"it is not a readable Dassl pickle ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        raise fail('it holds no dict with a "train" list')
    index = {PurePosixPath(os.path.relpath(item.path, dataset.images_folder)).parts: item
             for item in dataset.train + dataset.val}
    depth = max((len(parts) for parts in index), default=0)

    def local(datum: object) -> Item:
        impath, label = getattr(datum, "_impath", None), getattr(datum, "_label", None)
        if not isinstance(datum, _Datum) or not isinstance(impath, str):
            raise fail(f"it holds {type(datum).__name__} entries, not Dassl Datum objects")
        flavour = PureWindowsPath if "\\" in impath else PurePosixPath
        parts = flavour(impath).parts
        for length in range(min(depth, len(parts)), 0, -1):
            item = index.get(tuple(parts[-length:]))
            if item is not None:
                if item.label != label:
                    raise fail(f"{impath} has label {label} there, but {item.label} in this "
                               "dataset's split (the pickle was made from another split)")
                return item
        raise fail(f"its image {impath} is not in the train or val split of this dataset "
                   f"(looked for its path below {dataset.images_folder})")

    train = [local(datum) for datum in data["train"]]
    val = [local(datum) for datum in data["val"]] if isinstance(data.get("val"), list) \
        else dataset.val
    return train, val


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
    return replace(dataset, classnames=classnames, train=keep(dataset.train),
                   val=keep(dataset.val), test=keep(dataset.test))
