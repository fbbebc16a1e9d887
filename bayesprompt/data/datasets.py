"""Datasets in CoOp's format: a registry of the prompt-learning benchmarks and user folders.

Every dataset becomes a `Dataset`: class names in label order, the prompt template, and
train/val/test lists of `Item(path, label, classname)`. Most CoOp datasets ship a split JSON
`{"train"|"val"|"test": [[relative_path, label, classname], ...]}`; FGVC-Aircraft and the
ImageNet family are read from their own files, as CoOp does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bayesprompt.errors import UserError
from bayesprompt.files import read_json
from bayesprompt.world.downstream import DATASETS as OFFLINE_DATASETS
from bayesprompt.world.downstream import write_offline_dataset

SPLITS = ("train", "val", "test")
#: CoOp's folder of few-shot pickles inside a dataset folder; never a class folder.
FEWSHOT_DIR = "split_fewshot"
COOP_DATA_DOCS = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class Item:
    path: Path
    label: int
    classname: str


@dataclass
class Dataset:
    name: str
    classnames: list[str]
    template: str
    train: list[Item]
    val: list[Item]
    test: list[Item]
    folder: Path
    image_root: Path | None = None

    @property
    def images_folder(self) -> Path:
        """The folder the split file's relative image paths start from."""
        return self.image_root or self.folder


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset lives under ROOT and how to read it."""

    folder: str
    image_dir: str
    template: str
    split_file: str | None = None
    renames: dict[str, str] = field(default_factory=dict)
    reader: str = "split_json"
    ignored: tuple[str, ...] = ()


EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
    "River": "River", "SeaLake": "Sea or Lake",
}

REGISTRY: dict[str, DatasetLayout] = {
    "imagenet": DatasetLayout("imagenet", "images", "a photo of a {}.", reader="imagenet"),
    "caltech101": DatasetLayout(
        "caltech-101", "101_ObjectCategories", "a photo of a {}.", "split_zhou_Caltech101.json",
        {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
         "Motorbikes": "motorbike"}),
    "oxford_pets": DatasetLayout("oxford_pets", "images", "a photo of a {}, a type of pet.",
                               "split_zhou_OxfordPets.json"),
    "stanford_cars": DatasetLayout("stanford_cars", "", "a photo of a {}.",
                                 "split_zhou_StanfordCars.json"),
    "oxford_flowers": DatasetLayout("oxford_flowers", "jpg", "a photo of a {}, a type of flower.",
                                  "split_zhou_OxfordFlowers.json"),
    "food101": DatasetLayout("food-101", "images", "a photo of {}, a type of food.",
                           "split_zhou_Food101.json"),
    "fgvc_aircraft": DatasetLayout("fgvc_aircraft", "images",
                                 "a photo of a {}, a type of aircraft.", reader="fgvc"),
    "sun397": DatasetLayout("sun397", "SUN397", "a photo of a {}.", "split_zhou_SUN397.json"),
    "dtd": DatasetLayout("dtd", "images", "{} texture.", "split_zhou_DescribableTextures.json"),
    "eurosat": DatasetLayout("eurosat", "2750", "a centered satellite photo of {}.",
                           "split_zhou_EuroSAT.json", EUROSAT_NAMES),
    "ucf101": DatasetLayout("ucf101", "UCF-101-midframes", "a photo of a person doing {}.",
                          "split_zhou_UCF101.json"),
    "imagenetv2": DatasetLayout("imagenetv2", "imagenetv2-matched-frequency-format-val",
                              "a photo of a {}.", reader="imagenet_variant"),
    "imagenet_sketch": DatasetLayout("imagenet-sketch", "images", "a photo of a {}.",
                                   reader="imagenet_variant"),
    "imagenet_a": DatasetLayout("imagenet-adversarial", "imagenet-a", "a photo of a {}.",
                              reader="imagenet_variant", ignored=("README.txt",)),
    "imagenet_r": DatasetLayout("imagenet-rendition", "imagenet-r", "a photo of a {}.",
                              reader="imagenet_variant", ignored=("README.txt",)),
}

#: Datasets the project generates itself on first use (the offline world): name -> writer.
GENERATED: dict[str, Callable[[Path], Path]] = {
    name: partial(write_offline_dataset, name) for name in OFFLINE_DATASETS
}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DATASET_META_HELP = ('the dataset\'s description, a JSON object {"template": "a photo of a {}.", '
                     '"classnames": [name of label 0, name of label 1, ...]} (both optional)')


def register_dataset(name: str, spec: DatasetLayout) -> None:
    """Add a dataset to the registry (e.g. from a notebook) so `--dataset name` finds it."""
    REGISTRY[name] = spec


def known_datasets() -> list[str]:
    return sorted({*REGISTRY, *GENERATED})


def load_dataset(name: str, root: Path) -> Dataset:
    """A registered dataset under `root`, or a user dataset folder given by its path.

    A user folder holds class subfolders of images (in `images/` or at its top) and optionally
    `split.json` (CoOp format) and `dataset.json` (`template`, `classnames`).
    """
    return _checked(_read_dataset(name, root))


def _read_dataset(name: str, root: Path) -> Dataset:
    """The dataset `name` (registered, generated or a folder path) as its files describe it."""
    if name in GENERATED:
        return read_user_folder(GENERATED[name](root), name)
    if name in REGISTRY:
        spec = REGISTRY[name]
        folder = root / spec.folder
        if not folder.is_dir():
            raise UserError(
                f"Dataset '{name}' not found: looked for the folder {folder}. Expected CoOp's "
                f"layout, {folder}/{spec.image_dir or '.'}/... with "
                f"{spec.split_file or 'its list files'}; see {COOP_DATA_DOCS} for where to "
                "download it, and pass --root to the folder that holds it."
            )
        readers = {"split_json": _read_split_json, "fgvc": _read_fgvc,
                   "imagenet": _read_imagenet, "imagenet_variant": _read_imagenet_variant}
        splits = readers[spec.reader](spec, folder)
        classnames = _classnames(splits["test"] or splits["train"])
        return Dataset(name, classnames, spec.template, *(splits[s] for s in SPLITS), folder,
                       folder / spec.image_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        return read_user_folder(path, path.name)
    raise UserError(
        f"Unknown dataset '{name}'. Known datasets: {', '.join(known_datasets())}. "
        "Or pass the path of a folder of class subfolders (optionally with split.json)."
    )


def read_user_folder(folder: Path, name: str) -> Dataset:
    """A folder of class subfolders, with optional `split.json` and `dataset.json`."""
    meta_file = folder / "dataset.json"
    meta = read_json(meta_file, DATASET_META_HELP) if meta_file.is_file() else {}
    image_root = folder / "images" if (folder / "images").is_dir() else folder
    split_file = folder / "split.json"
    if split_file.is_file():
        splits = _read_split_file(split_file, image_root, {})
    else:
        splits = _split_class_folders(image_root)
    counts = {split: len(items) for split, items in splits.items()}
    if any(counts.values()) and not (counts["train"] and counts["test"]):
        raise UserError(
            f"The dataset folder {folder} has too few images to train and test: the split "
            f"gives {counts['train']} training, {counts['val']} validation and "
            f"{counts['test']} test images. Class folders without split.json are split "
            "50/20/30 per class, so every class needs at least 2 images (better 10 or more); "
            "add images, or list train and test images in a split.json (CoOp format)."
        )
    if not splits["train"] or not splits["test"]:
        raise UserError(
            f"The dataset folder {folder} has no images: expected class subfolders of images "
            f"in {image_root} (or a split.json listing them)."
        )
    classnames = meta.get("classnames") or _classnames(splits["train"] + splits["test"])
    template = meta.get("template", "a photo of a {}.")
    if not (isinstance(classnames, list) and all(isinstance(c, str) for c in classnames)
            and isinstance(template, str)):
        raise UserError(f"{meta_file} has a malformed 'classnames' (a list of strings) or "
                        f"'template' (a string with '{{}}'): it should hold {DATASET_META_HELP}.")
    if len(classnames) < 2:
        raise UserError(
            f"The dataset folder {folder} has {len(classnames)} class ({', '.join(classnames)}): "
            "prompt learning classifies among classes, so it needs at least two. Add class "
            "folders (or entries in split.json) for the other classes."
        )
    return Dataset(name, classnames, template, *(splits[s] for s in SPLITS), folder,
                   image_root)


def _checked(dataset: Dataset) -> Dataset:
    """`dataset`, if it has a class name for every label and a template with '{}'."""
    where = f"dataset '{dataset.name}' in {dataset.folder}"
    labels = {item.label for split in SPLITS for item in getattr(dataset, split)}
    unnamed = sorted(label for label in labels if not 0 <= label < len(dataset.classnames))
    if unnamed:
        raise UserError(
            f"The {where} has images with labels {unnamed[:5]} but only "
            f"{len(dataset.classnames)} class names (labels 0..{len(dataset.classnames) - 1}). "
            "Give one class name per label, in label order, in its dataset.json 'classnames', "
            "or fix the labels of its split file."
        )
    if "{}" not in dataset.template:
        raise UserError(f"The prompt template '{dataset.template}' of {where} has no '{{}}' "
                        "for the class name; put '{}' where the class name goes in 'template' "
                        "in its dataset.json.")
    return dataset


def _classnames(items: list[Item]) -> list[str]:
    names = {item.label: item.classname for item in items}
    return [names[label] for label in sorted(names)]


def _read_split_file(split_file: Path, image_root: Path, renames: dict[str, str]
                     ) -> dict[str, list[Item]]:
    try:
        raw = json.loads(split_file.read_text())
        return {split: [Item(image_root / path, int(label), renames.get(name, name))
                        for path, label, name in raw.get(split, [])] for split in SPLITS}
    except (OSError, ValueError, TypeError) as error:
        raise UserError(
            f"Cannot read the split file {split_file} ({error}). Expected CoOp's JSON: "
            '{"train": [[relative_path, label, classname], ...], "val": [...], "test": [...]}.'
        ) from None


def _read_split_json(spec: DatasetLayout, folder: Path) -> dict[str, list[Item]]:
    split_file = folder / spec.split_file
    if not split_file.is_file():
        raise UserError(
            f"Split file not found: {split_file}. CoOp's split files (e.g. "
            f"{spec.split_file}) come with the dataset instructions at {COOP_DATA_DOCS}; "
            f"put it in {folder}."
        )
    return _read_split_file(split_file, folder / spec.image_dir, spec.renames)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} not found: {path}. See {COOP_DATA_DOCS} for the layout.")
    return path


def _read_fgvc(spec: DatasetLayout, folder: Path) -> dict[str, list[Item]]:
    """FGVC-Aircraft: variants.txt gives the classes, images_variant_<split>.txt the items."""
    variants = _require(folder / "variants.txt", "FGVC-Aircraft class list")
    classnames = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    label_of = {name: label for label, name in enumerate(classnames)}
    splits = {}
    for split in SPLITS:
        listing = _require(folder / f"images_variant_{split}.txt", "FGVC-Aircraft list")
        splits[split] = [
            Item(folder / spec.image_dir / f"{image}.jpg", label_of[variant], variant)
            for image, variant in (line.strip().split(" ", 1)
                                   for line in listing.read_text().splitlines() if line.strip())
        ]
    return splits


def _imagenet_classnames(folder: Path) -> dict[str, str]:
    """classnames.txt: one 'wnid class name' per line."""
    text = _require(folder / "classnames.txt", "ImageNet class-name file").read_text()
    return dict(line.strip().split(" ", 1) for line in text.splitlines() if line.strip())


def _images_by_class(image_root: Path, folders: list[str], names: list[str]) -> list[Item]:
    return [Item(path, label, name)
            for label, (sub, name) in enumerate(zip(folders, names, strict=True))
            for path in sorted((image_root / sub).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES]


def _read_imagenet(spec: DatasetLayout, folder: Path) -> dict[str, list[Item]]:
    """ImageNet: images/train/<wnid>/, images/val/<wnid>/; val doubles as test (as CoOp)."""
    names = _imagenet_classnames(folder)
    wnids = sorted(names)
    read = {split: _images_by_class(_require(folder / spec.image_dir / split, "ImageNet split"),
                                    wnids, [names[w] for w in wnids]) for split in ("train", "val")}
    return {"train": read["train"], "val": read["val"], "test": read["val"]}


def _read_imagenet_variant(spec: DatasetLayout, folder: Path) -> dict[str, list[Item]]:
    """Test-only ImageNet variants: class folders named by wnid, or by label index (V2)."""
    names = _imagenet_classnames(folder)
    image_root = _require(folder / spec.image_dir, "image folder")
    present = [p.name for p in image_root.iterdir() if p.is_dir() and p.name not in spec.ignored]
    if all(name.isdigit() for name in present):  # ImageNetV2: folder i is class i of the file
        present.sort(key=int)
        classnames = [list(names.values())[int(n)] for n in present]
    else:
        present.sort()
        classnames = [names[n] for n in present]
    items = _images_by_class(image_root, present, classnames)
    return {"train": items, "val": items, "test": items}


def _split_class_folders(image_root: Path, train: float = 0.5, val: float = 0.2,
                         seed: int = 1) -> dict[str, list[Item]]:
    """Split each class folder 50/20/30 with a fixed seed (CoOp's read_and_split_data)."""
    folders = sorted(p for p in image_root.iterdir() if p.is_dir() and p.name != FEWSHOT_DIR
                     and not p.name.startswith(".")) if image_root.is_dir() else []
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    rng = random.Random(seed)
    for label, sub in enumerate(folders):
        paths = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(
                f"The class folder {sub} holds no images (looked for files ending in "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}). Add its images, or remove the folder "
                "if it is not a class."
            )
        rng.shuffle(paths)
        n_train, n_val = round(len(paths) * train), round(len(paths) * val)
        parts = {"train": paths[:n_train], "val": paths[n_train:n_train + n_val],
                 "test": paths[n_train + n_val:]}
        for split, chosen in parts.items():
            splits[split] += [Item(p, label, sub.name) for p in chosen]
    return splits
