"""Frozen image features, computed once per (image, augmentation view) and cached on disk.

View 0 is the test transform (resize, centre crop). Views 1..K are the reference's training
augmentation (random resized crop with scale (min_scale, 1), min_scale 0.08 in the reference,
and a horizontal flip), each drawn from its own seed so a view is the same image every time.

Images are decoded and transformed by a torch DataLoader with `workers` processes and batched
to the image tower. The random crops and flips of a view are drawn first, in the main process,
from one generator seeded by (seed, view), image after image, as the transform itself draws
them (only the image sizes are read for that); workers apply the drawn crops. So the features
do not depend on the number of workers or their scheduling, and equal those of the serial
implementation before the DataLoader, whose cache files stay valid.

The cache key covers the backbone (its model config's content), its weights and the precision
features are computed in, the transform, the dataset and the exact list of images. Each file
carries the SHA-256 of its features and is checked against it and against the expected shape
when read: a damaged file is reported and computed again, never used. Files are written with
`bayesprompt.files` (atomic, unique temporary names), so processes that fill the same cache at
once all succeed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.data.datasets import Item
from bayesprompt.errors import UserError, first_line
from bayesprompt.files import make_folder, save_torch

#: Bumped when the layout of a cache file changes, so that older files are not read.
CACHE_FORMAT = 2


def image_transform(clip: FrozenCLIP, augment: bool, min_scale: float = 0.08) -> v2.Compose:
    """PIL image -> normalised (3, S, S) tensor; with `augment`, the training augmentation.

    The test transform follows the backbone's resize mode (`clip.ImageStats.resize_mode`).
    """
    stats = clip.image_stats
    interpolation = v2.InterpolationMode(stats.interpolation)
    if augment:
        geometry = [v2.RandomResizedCrop(stats.size, scale=(min_scale, 1.0),
                                         interpolation=interpolation),
                    v2.RandomHorizontalFlip()]
    elif stats.resize_mode == "squash":
        geometry = [v2.Resize((stats.size, stats.size), interpolation=interpolation)]
    elif stats.resize_mode == "longest":
        geometry = [v2.Resize(None, max_size=stats.size, interpolation=interpolation),
                    v2.CenterCrop(stats.size)]  # pads the short side with zeros
    else:
        geometry = [v2.Resize(stats.size, interpolation=interpolation),
                    v2.CenterCrop(stats.size)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(stats.mean, stats.std)])


def load_image(path: Path) -> Image.Image:
    """An RGB image, or a UserError naming the file that could not be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise UserError(too_large_image(path, error)) from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(unreadable_image(path, error)) from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except Image.DecompressionBombError as error:
        raise UserError(too_large_image(path, error)) from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(unreadable_image(path, error)) from None


def too_large_image(path: Path, error: Exception) -> str:
    """The message about an image over Pillow's decompression-bomb limit (kept on: a huge
    image can exhaust the memory)."""
    return (f"The image {path} is too large to decode safely ({first_line(error)}): Pillow "
            f"refuses images of more than 2 x Image.MAX_IMAGE_PIXELS = "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels. Shrink or remove the image (or remove "
            "it from the split file); if you trust it, raise PIL.Image.MAX_IMAGE_PIXELS in your "
            "own script. Then run again.")


def unreadable_image(path: Path, error: Exception) -> str:
    """The message about an image file that cannot be read."""
    return (f"Cannot read the image {path} ({error}). Replace or remove the file, or remove "
            "it from the split file, then run again.")


def default_loader_workers() -> int:
    """Decoding processes when `loader_workers` is not given: min(4, CPU cores)."""
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class CropDraw:
    """The random choices of one augmented view of one image."""

    box: dict[str, int]  # top, left, height, width of the crop, in pixels
    flip: bool


def draw_crops(transform: v2.Compose, items: list[Item], generator_seed: int
               ) -> list[CropDraw]:
    """The crop and flip of every image, drawn as `transform` draws them image after image.

    The global torch generator is seeded with `generator_seed` (the caller's state is restored
    afterwards) and consumed exactly as `transform(image)` on each image in turn would consume
    it: torchvision's RandomResizedCrop.make_params on the image's size, then the flip's
    `torch.rand(1) < p`. Only image headers are read.
    """
    crop = next(step for step in transform.transforms if isinstance(step, v2.RandomResizedCrop))
    flip = next(step for step in transform.transforms
                if isinstance(step, v2.RandomHorizontalFlip))
    draws = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for item in items:
            shape = torch.zeros((), dtype=torch.uint8).expand(3, *image_size(item.path))
            box = crop.make_params([shape])
            draws.append(CropDraw(box, bool(torch.rand(1) < flip.p)))
    return draws


class TransformedImages(torch.utils.data.Dataset):
    """Item i: the image of `paths[i]` through `transform` -> ((3, S, S) pixels, problem).

    With `crops`, the random steps of `transform` apply the drawn crop and flip of image i
    instead of drawing their own. An unreadable image gives zero pixels and its message as
    `problem` ('' otherwise), so that the loading process raises one clear UserError.
    """

    def __init__(self, paths: list[Path], transform: v2.Compose, size: int,
                 crops: list[CropDraw] | None = None) -> None:
        self.paths, self.transform, self.size, self.crops = paths, transform, size, crops

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            image = load_image(self.paths[index])
        except UserError as error:
            return torch.zeros(3, self.size, self.size), str(error)
        if self.crops is None:
            return self.transform(image), ""
        draw = self.crops[index]
        for step in self.transform.transforms:
            if isinstance(step, v2.RandomResizedCrop):
                image = step.transform(image, draw.box)
            elif isinstance(step, v2.RandomHorizontalFlip):
                image = step.transform(image, {}) if draw.flip else image
            else:
                image = step(image)
        return image, ""


def cache_key(clip: FrozenCLIP, items: list[Item], view: int, seed: int, min_scale: float
              ) -> str:
    """A hash of everything the features depend on."""
    transform = image_transform(clip, view > 0, min_scale)
    description = {
        "format": CACHE_FORMAT, "clip": clip.identity, "precision": clip.precision,
        "transform": repr(transform),
        "view": view, "seed": seed,
        "images": hashlib.sha1("\n".join(_file_identity(i.path) for i in items).encode()
                               ).hexdigest(),
    }
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def _file_identity(path: Path) -> str:
    """Path, size and modification time: a rewritten image gets a new cache key."""
    try:
        stat = path.stat()
    except OSError:
        return str(path)  # reported by load_image when the features are computed
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def encode_items(clip: FrozenCLIP, items: list[Item], view: int, seed: int,
                 min_scale: float = 0.08, batch_size: int = 64, workers: int | None = None
                 ) -> torch.Tensor:
    """Image features (N, D) of `items` under view `view` (0: test transform).

    `workers` processes decode and transform the images (None: `default_loader_workers()`,
    0: this process; at most one per batch, none for a single batch); the augmented views'
    crops are drawn before, seeded by (seed, view).
    """
    transform = image_transform(clip, view > 0, min_scale)
    crops = draw_crops(transform, items, seed * 1000 + view) if view > 0 else None
    images = TransformedImages([item.path for item in items], transform, clip.image_stats.size,
                               crops)
    workers = default_loader_workers() if workers is None else workers
    batches = math.ceil(len(items) / batch_size)  # a worker takes whole batches; starting one
    workers = min(workers, batches) if batches > 1 else 0  # costs ~0.4 s (2-core machine)
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers,
                        pin_memory=clip.device.type == "cuda",
                        generator=torch.Generator())  # its worker seeds, not the caller's RNG
    chunks = []
    for pixels, problems in tqdm(loader, desc=f"image features, view {view}", unit="batch",
                                 leave=False):
        problem = next((text for text in problems if text), None)
        if problem is not None:
            raise UserError(problem)
        chunks.append(clip.encode_images(pixels).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, clip.feature_dim)


def cached_features(clip: FrozenCLIP, items: list[Item], views: list[int], cache_dir: Path,
                    seed: int = 0, min_scale: float = 0.08, workers: int | None = None
                    ) -> torch.Tensor:
    """Features (V, N, D) for the given views, read from `cache_dir` or computed and stored.

    `min_scale` is the smallest crop (fraction of the image area) of the augmented views;
    `workers` the image-decoding processes (None: min(4, CPU cores); results do not depend
    on it).
    """
    make_folder(cache_dir)
    result = []
    for view in views:
        path = cache_dir / f"{cache_key(clip, items, view, seed, min_scale)}.pt"
        features = read_cached(path, (len(items), clip.feature_dim))
        if features is None:
            features = encode_items(clip, items, view, seed, min_scale, workers=workers)
            save_torch(path, {"features": features, "sha256": checksum(features)})
        result.append(features)
    return torch.stack(result)


def checksum(features: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes."""
    return hashlib.sha256(features.contiguous().numpy().tobytes()).hexdigest()


def read_cached(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """The features (N, D) stored at `path`, or None when absent or damaged (with a warning)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features = stored["features"]
        problem = (f"shape {tuple(features.shape)} instead of {shape}"
                   if tuple(features.shape) != shape else
                   "checksum mismatch" if checksum(features) != stored["sha256"] else None)
    except (OSError, RuntimeError, EOFError, KeyError, IndexError, TypeError, ValueError,
            pickle.UnpicklingError, zipfile.BadZipFile) as error:
        problem = f"{type(error).__name__}: {first_line(error)}"
    if problem is None:
        return features
    logging.warning("The feature cache file %s is damaged (%s); computing these features "
                    "again and replacing it.", path, problem)
    return None
