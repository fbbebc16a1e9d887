"""CoOp-format datasets: registry, splits, few-shot sampling, user folders, feature cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EUROSAT_FOLDERS

from bayesprompt.data.datasets import REGISTRY, Dataset, load_dataset
from bayesprompt.data.features import cached_features, load_image
from bayesprompt.data.splits import subsample_classes
from bayesprompt.errors import UserError

COOP_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
                 "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
                 "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def test_registry_covers_the_literature() -> None:
    assert set(COOP_DATASETS) <= set(REGISTRY)
    assert REGISTRY["eurosat"].template == "a centered satellite photo of {}."


def test_eurosat_is_read_in_coop_layout(eurosat_root: Path) -> None:
    dataset = load_dataset("eurosat", eurosat_root)
    assert dataset.classnames[0] == "Annual Crop Land"
    assert dataset.classnames[-1] == "Sea or Lake"
    assert len(dataset.classnames) == 10
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (60, 20, 30)
    assert dataset.train[0].path == eurosat_root / "eurosat/2750/AnnualCrop/AnnualCrop_0.jpg"


def test_base_new_split_relabels_like_coop(eurosat_root: Path) -> None:
    dataset = load_dataset("eurosat", eurosat_root)
    base, new = subsample_classes(dataset, "base"), subsample_classes(dataset, "new")
    assert base.classnames == dataset.classnames[:5]
    assert new.classnames == dataset.classnames[5:]
    for split in (new.train, new.val, new.test):
        assert sorted({i.label for i in split}) == [0, 1, 2, 3, 4]
        assert all(new.classnames[i.label] == i.classname for i in split)
    odd = Dataset("odd", list("abcde"), "{}", dataset.train[:0], [], [], dataset.folder)
    odd.test = [type(dataset.test[0])(Path("x"), label, "abcde"[label]) for label in range(5)]
    assert subsample_classes(odd, "base").classnames == ["a", "b", "c"]  # ceil(5 / 2)


def test_user_folder_with_and_without_split(tmp_path: Path, eurosat_root: Path) -> None:
    folder = tmp_path / "my_data"
    shutil.copytree(eurosat_root / "eurosat/2750", folder / "images")
    plain = load_dataset(str(folder), tmp_path)
    assert plain.classnames == EUROSAT_FOLDERS
    assert len(plain.train) + len(plain.val) + len(plain.test) == 110
    split = json.loads((eurosat_root / "eurosat/split_zhou_EuroSAT.json").read_text())
    (folder / "split.json").write_text(json.dumps(split))
    (folder / "dataset.json").write_text(json.dumps({"template": "a satellite view of {}."}))
    with_split = load_dataset(str(folder), tmp_path)
    assert with_split.template == "a satellite view of {}."
    assert with_split.classnames[0] == "Annual Crop Land"
    assert len(with_split.train) == 60


def test_missing_root_and_split_file_are_explained(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"looked for the folder .*eurosat.*2750.*DATASETS\.md"):
        load_dataset("eurosat", tmp_path)
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(UserError, match="split_zhou_EuroSAT.json"):
        load_dataset("eurosat", tmp_path)
    with pytest.raises(UserError, match="Unknown dataset 'nope'. Known datasets: .*eurosat"):
        load_dataset("nope", tmp_path)


def test_fgvc_reader(tmp_path: Path, eurosat_root: Path) -> None:
    folder = tmp_path / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("707-320\nA300B4\n")
    image = eurosat_root / "eurosat/2750/Forest/Forest_0.jpg"
    for split in ("train", "val", "test"):
        lines = []
        for k, variant in enumerate(["707-320", "A300B4"]):
            shutil.copy(image, folder / "images" / f"{split}{k}.jpg")
            lines.append(f"{split}{k} {variant}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines))
    dataset = load_dataset("fgvc_aircraft", tmp_path)
    assert dataset.classnames == ["707-320", "A300B4"]
    assert [i.label for i in dataset.test] == [0, 1]


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        load_image(broken)


def test_feature_cache_is_hit_on_second_run(tiny_clip, eurosat_root: Path, tmp_path: Path,
                                            monkeypatch) -> None:
    items = load_dataset("eurosat", eurosat_root).train[:7]
    first = cached_features(tiny_clip, items, [0, 1, 2], tmp_path, seed=3)
    assert first.shape == (3, 7, tiny_clip.feature_dim)
    assert not torch.allclose(first[1], first[2])  # augmented views differ
    monkeypatch.setattr(type(tiny_clip), "encode_images",
                        lambda *_: pytest.fail("the image tower ran again"))
    again = cached_features(tiny_clip, items, [0, 1, 2], tmp_path, seed=3)
    torch.testing.assert_close(again, first)


def test_imagenet_family_readers(tmp_path: Path, eurosat_root: Path) -> None:
    image = eurosat_root / "eurosat/2750/Forest/Forest_0.jpg"
    names = "n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537", "n01484850"):
            (tmp_path / "imagenet/images" / split / wnid).mkdir(parents=True)
            shutil.copy(image, tmp_path / "imagenet/images" / split / wnid / "a.jpg")
    (tmp_path / "imagenet/classnames.txt").write_text(names)
    imagenet = load_dataset("imagenet", tmp_path)
    assert imagenet.classnames == ["tench", "goldfish", "great white shark"]
    assert imagenet.test == imagenet.val and len(imagenet.train) == 3

    for label in ("0", "2"):  # ImageNetV2 folders are label indices
        (tmp_path / "imagenetv2/imagenetv2-matched-frequency-format-val" / label).mkdir(
            parents=True)
        shutil.copy(image, tmp_path / "imagenetv2/imagenetv2-matched-frequency-format-val" /
                    label / "a.jpeg")
    (tmp_path / "imagenetv2/classnames.txt").write_text(names)
    assert load_dataset("imagenetv2", tmp_path).classnames == ["tench", "great white shark"]

    (tmp_path / "imagenet-adversarial/imagenet-a/n01443537").mkdir(parents=True)
    shutil.copy(image, tmp_path / "imagenet-adversarial/imagenet-a/n01443537/a.jpg")
    (tmp_path / "imagenet-adversarial/imagenet-a/README.txt").write_text("ignored")
    (tmp_path / "imagenet-adversarial/classnames.txt").write_text(names)
    adversarial = load_dataset("imagenet_a", tmp_path)
    assert adversarial.classnames == ["goldfish"] and adversarial.test[0].label == 0
