"""Few-shot sets as CoOp's: Dassl's pickles read without Dassl, Dassl's sampler restated, the
content-keyed JSON cache, and class-folder datasets that hold a split_fewshot/ folder."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import write_eurosat

from bayesprompt.data.datasets import Item, load_dataset
from bayesprompt.data.splits import SAMPLER, dassl_few_shot, few_shot
from bayesprompt.errors import UserError


def dassl_reference(train: list, val: list, shots: int, seed: int) -> tuple[list, list]:
    """Dassl's generate_fewshot_dataset as CoOp's dataset files call it, on the global RNG."""
    state = random.getstate()
    random.seed(seed)
    output = []
    for source, k in ((train, shots), (val, min(shots, 4))):
        tracker = defaultdict(list)
        for item in source:
            tracker[item.label].append(item)
        sampled = []
        for items in tracker.values():
            sampled.extend(random.sample(items, k) if len(items) >= k else items)
        output.append(sampled)
    random.setstate(state)
    return output[0], output[1]


def test_sampler_equals_dassl_on_a_known_list() -> None:
    # labels appear out of order (3 first), one label has fewer items than the shots
    labels = [3, 0, 3, 1, 0, 3, 1, 0, 3, 1, 0, 3, 2, 0, 1, 3, 0, 1]
    train = [Item(Path(f"img_{i}.jpg"), label, f"class {label}") for i, label in
             enumerate(labels)]
    val = [Item(Path(f"val_{i}.jpg"), label, f"class {label}") for i, label in
           enumerate(labels[::-1] * 2)]
    dataset = types.SimpleNamespace(train=train, val=val)
    for shots, seed in [(1, 1), (2, 1), (4, 2), (5, 3), (16, 1)]:
        ours = dassl_few_shot(dataset, shots, seed)
        assert ours == dassl_reference(train, val, shots, seed)
    chosen, _ = dassl_few_shot(dataset, 2, 1)
    assert [item.label for item in chosen] == [3, 3, 0, 0, 1, 1, 2]  # first appearance order


def install_fake_dassl(monkeypatch: pytest.MonkeyPatch) -> type:
    """A stand-in `dassl.data.datasets.base_dataset.Datum`, importable while pickling only."""
    class Datum:
        def __init__(self, impath: str, label: int, classname: str) -> None:
            self._impath, self._label, self._domain, self._classname = \
                impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = "dassl.data.datasets.base_dataset", "Datum"
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].Datum = Datum
    return Datum


def write_dassl_pickle(monkeypatch: pytest.MonkeyPatch, path: Path, splits: dict) -> None:
    """Pickle {"train": [Datum], "val": [Datum]} as CoOp does; items are (impath, label, name)."""
    with monkeypatch.context() as patch:
        datum = install_fake_dassl(patch)
        data = {split: [datum(*entry) for entry in entries] for split, entries in splits.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    assert "dassl" not in sys.modules


def test_dassl_pickle_is_read_and_remapped(tmp_path: Path, monkeypatch) -> None:
    root = write_eurosat(tmp_path / "data", per_class=(3, 2, 1))
    dataset = load_dataset("eurosat", root)
    elsewhere = "/home/someone/CoOp/DATA/eurosat/2750"
    train = [dataset.train[i] for i in (7, 0, 29, 12)]
    val = [dataset.val[i] for i in (3, 19)]

    def entries(items: list[Item]) -> list[tuple]:
        return [(f"{elsewhere}/{item.path.parent.name}/{item.path.name}", item.label,
                 item.classname) for item in items]

    pickled = root / "eurosat/split_fewshot/shot_4-seed_1.pkl"
    write_dassl_pickle(monkeypatch, pickled, {"train": entries(train), "val": entries(val)})
    selection = few_shot(dataset, 4, 1, tmp_path / "cache")
    assert selection.dataset.train == train and selection.dataset.val == val
    assert all(item.path.is_relative_to(root) for item in selection.dataset.train)
    assert str(pickled) in selection.source
    record = selection.record()
    assert record["train"][0] == [f"{train[0].path.parent.name}/{train[0].path.name}",
                                  train[0].label, train[0].classname]

    wrong = entries(train)
    wrong[0] = (wrong[0][0], wrong[0][1] + 1, wrong[0][2])
    write_dassl_pickle(monkeypatch, pickled, {"train": wrong, "val": entries(val)})
    with pytest.raises(UserError, match="another split"):
        few_shot(dataset, 4, 1)
    write_dassl_pickle(monkeypatch, pickled, {"train": [("/x/nowhere.jpg", 0, "a")]})
    with pytest.raises(UserError, match="not in the train or val split"):
        few_shot(dataset, 4, 1)


class Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_dassl_pickle_refuses_other_globals(tmp_path: Path, capsys) -> None:
    root = write_eurosat(tmp_path / "data", per_class=(3, 2, 1))
    pickled = root / "eurosat/split_fewshot/shot_4-seed_1.pkl"
    pickled.parent.mkdir(parents=True)
    pickled.write_bytes(pickle.dumps({"train": [Exploit()]}))
    with pytest.raises(UserError, match="builtins.print"):
        few_shot(load_dataset("eurosat", root), 4, 1)
    assert "pickle code ran" not in capsys.readouterr().out
    pickled.write_bytes(b"\x80\x05garbage")
    with pytest.raises(UserError, match="not a readable Dassl pickle"):
        few_shot(load_dataset("eurosat", root), 4, 1)


def test_json_cache_is_keyed_by_content_and_records_its_sampler(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    root = write_eurosat(tmp_path / "data", per_class=(6, 2, 1))
    dataset = load_dataset("eurosat", root)
    first = few_shot(dataset, 3, 1, cache)
    assert len(first.dataset.train) == 30 and len(first.dataset.val) == 20
    assert (first.dataset.train, first.dataset.val) == dassl_few_shot(dataset, 3, 1)
    [cache_file] = (cache / "eurosat").glob("shot_3-seed_1-*.json")
    assert json.loads(cache_file.read_text())["sampler"] == SAMPLER
    assert not (root / "eurosat/split_fewshot").exists()  # the dataset folder is not written
    again = few_shot(dataset, 3, 1, cache)
    assert again.dataset.train == first.dataset.train and "cache" in again.source
    cache_file.write_text('{"train": [["garbage"')  # a broken cache is sampled again
    assert few_shot(dataset, 3, 1, cache).dataset.train == first.dataset.train
    assert few_shot(dataset, 3, 2, cache).dataset.train != first.dataset.train

    # the split changes (a class's images are relabelled): a new key, never the stale lists
    split_file = root / "eurosat/split_zhou_EuroSAT.json"
    split = json.loads(split_file.read_text())
    split["train"] = [[path, 9 if label == 0 else label, name]
                      for path, label, name in split["train"]]
    split_file.write_text(json.dumps(split))
    changed = few_shot(load_dataset("eurosat", root), 3, 1, cache)
    assert len(list((cache / "eurosat").glob("shot_3-seed_1-*.json"))) == 2
    assert {i.label for i in changed.dataset.train} == set(range(1, 10))


def test_datasets_of_one_name_do_not_share_a_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    small = write_eurosat(tmp_path / "a", per_class=(4, 2, 1))
    large = write_eurosat(tmp_path / "b", per_class=(5, 2, 1))
    first = few_shot(load_dataset("eurosat", small), 2, 1, cache)
    second = few_shot(load_dataset("eurosat", large), 2, 1, cache)
    assert all(item.path.is_relative_to(tmp_path / "b") for item in second.dataset.train)
    assert len(list((cache / "eurosat").glob("*.json"))) == 2
    assert first.dataset.train != second.dataset.train


def test_class_folders_ignore_split_fewshot_and_explain_too_few_images(
        tmp_path: Path, eurosat_root: Path) -> None:
    folder = tmp_path / "my_data"
    shutil.copytree(eurosat_root / "eurosat/2750", folder)
    before = load_dataset(str(folder), tmp_path)
    (folder / "split_fewshot").mkdir()
    (folder / "split_fewshot/shot_4-seed_1.json").write_text("{}")
    after = load_dataset(str(folder), tmp_path)
    assert after.classnames == before.classnames and after.train == before.train

    one_each = tmp_path / "one_each"
    for class_folder in ("a", "b"):
        (one_each / class_folder).mkdir(parents=True)
        shutil.copy(eurosat_root / "eurosat/2750/Forest/Forest_0.jpg", one_each / class_folder)
    with pytest.raises(UserError, match="too few images.*at least 2 images"):
        load_dataset(str(one_each), tmp_path)


def test_negative_shots_are_refused(eurosat_root: Path) -> None:
    with pytest.raises(UserError, match="--shots"):
        few_shot(load_dataset("eurosat", eurosat_root), -1, 1)
