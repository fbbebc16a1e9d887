"""A trained run loaded from its folder: predict with it and draw from its posterior.

`LoadedRun.load(folder)` rebuilds a run from the folder `train_and_evaluate` wrote (its
config.json and checkpoint.pt); `bayesprompt.Run` (api.py) adds the analysis package's views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.data.datasets import Dataset, load_dataset
from bayesprompt.data.features import image_transform, load_image
from bayesprompt.errors import UserError
from bayesprompt.files import read_json
from bayesprompt.inference.predictive import posterior_draws, predictive_probs
from bayesprompt.inference.training_log import read_rows
from bayesprompt.program.base import PromptModel
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.evaluate import test_features
from bayesprompt.runs.folder import load_run

if TYPE_CHECKING:
    from bayesprompt.runs.posterior_check import CheckOptions

#: What results.json is, for the message about a damaged one.
RESULTS_FILE = "the run's test results as written at the end of training"


@dataclass
class LoadedRun:
    """A trained run: its folder, options, program (learned parameters restored), frozen CLIP
    and datasets (`base`: the training classes; `new`: the held-out classes, or None).
    `bayesprompt.Run` is this, with the analysis package's views of the posterior added."""

    folder: Path
    config: RunConfig
    program: PromptModel
    clip: FrozenCLIP
    base: Dataset
    new: Dataset | None

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> LoadedRun:
        """The run in `folder` (config.json, checkpoint.pt), on `device` (default: the run's)."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UserError(f"Run folder not found: {folder}. Pass a folder written by "
                            "bayesprompt.fit or svi_train.py (it holds config.json).")
        config, program, clip, base, new = load_run(folder, device)
        return cls(folder, config, program, clip, base, new)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.folder)!r}, model={self.config.model!r}, "
                f"dataset={self.config.dataset!r}, classes={len(self.classnames)})")

    @property
    def results(self) -> dict:
        """results.json: accuracies, calibration, training curves (see README, "Results")."""
        path = self.folder / "results.json"
        if not path.is_file():
            raise UserError(f"{self.folder} has no results.json: its training has not finished. "
                            "Resume it (svi_train.py --out FOLDER --resume, or "
                            "bayesprompt.fit(..., out=FOLDER, resume=True)).")
        return read_json(path, RESULTS_FILE)

    @property
    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl, the training log (README, "Training logs")."""
        return read_rows(self.folder / "metrics.jsonl")

    @property
    def classnames(self) -> list[str]:
        """The classes `predict` scores, in order (the training classes until `set_classes`)."""
        return self.program.classnames

    def set_classes(self, classnames: Sequence[str]) -> None:
        """Score these classes from now on (the learned prompts are kept)."""
        self.program.set_classes(list(classnames))

    def dataset(self, split: str) -> Dataset:
        """'base', 'new', or a dataset name (all its classes) from the run's data root."""
        if split == "base":
            return self.base
        if split == "new":
            if self.new is None:
                raise UserError(f"{self.folder} was trained on all classes: it has no 'new' "
                                "split. Use 'base' or a dataset name.")
            return self.new
        return load_dataset(split, Path(self.config.root).expanduser())

    def test_features(self, split: str = "base") -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (N, D) and labels (N,) of a split's test images (cached on disk)."""
        return test_features(self.clip, self.dataset(split), self.config)

    @torch.no_grad()
    def image_features(self, images: Sequence[str | Path | Image.Image],
                       batch_size: int = 64) -> torch.Tensor:
        """Features (N, D) of image files or PIL images, with the test transform."""
        transform = image_transform(self.clip, augment=False)
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([
                transform(image if isinstance(image, Image.Image) else load_image(Path(image)))
                for image in images[start:start + batch_size]])
            chunks.append(self.clip.encode_images(pixels.to(self.clip.device)))
        return torch.cat(chunks)

    def predict(self, image_features: torch.Tensor, num_samples: int | None = None,
                seed: int | None = None) -> torch.Tensor:
        """Class probabilities (S, N, C) of image features (N, D) under S posterior draws
        (default: the run's eval_samples and eval_seed, as results.json); their mean over S
        is the posterior predictive. Point-estimate models give S = 1."""
        probs = predictive_probs(self.program, image_features.to(self.clip.device),
                                 self._num_samples(num_samples), self.config.eval_batch_size,
                                 self.config.eval_seed if seed is None else seed)
        return probs.cpu()

    def posterior_samples(self, num_samples: int | None = None,
                          image_features: torch.Tensor | None = None,
                          seed: int | None = None) -> dict[str, torch.Tensor]:
        """Draws of the latent sites from the guide: site -> (S, *event) for global sites,
        (S, N, *event) for per-image sites, which need `image_features` (N, D)."""
        blank = image_features is None
        features = torch.zeros(1, self.clip.feature_dim) if blank else image_features
        draws = posterior_draws(self.program, features.to(self.clip.device),
                                self._num_samples(num_samples),
                                self.config.eval_seed if seed is None else seed)
        if blank and draws.per_image:
            raise UserError(f"The latents {list(draws.per_image)} of {self.config.model} are "
                            "drawn per image: pass image_features (N, D), e.g. from "
                            "run.test_features(split).")
        return {site: value.cpu() for site, value in draws.latents.items()}

    def check_posterior(self, options: CheckOptions | None = None, out: str | Path | None = None,
                        progress: bool = True) -> dict:
        """The guide against a gold standard (NUTS for global latents, importance sampling
        for per-image ones): writes RUN/posterior_check/ (json and plot) and returns the
        json's dict (`runs/posterior_check.py`)."""
        from bayesprompt.runs.posterior_check import check_posterior  # it imports this module
        return check_posterior(self, options, None if out is None else Path(out), progress)

    def _num_samples(self, num_samples: int | None) -> int:
        if num_samples is None:
            return self.config.eval_samples
        if num_samples < 1:
            raise UserError(f"num_samples must be 1 or more, got {num_samples}.")
        return num_samples
