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
from bayesprompt.runs import checks as api_checks
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.evaluate import test_features, train_features
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
    def load(cls, folder: str | Path, device: str | None = None, model: str | None = None,
             trust_model_file: bool = False) -> LoadedRun:
        """The run in `folder` (config.json, checkpoint.pt), on `device` (default: the run's).

        A model file (.py) that the folder's config.json names is Python code: it is imported
        only when passed here as `model` or with `trust_model_file=True`; built-in models load
        by name. A model file whose SHA-256 differs from the one the run recorded is refused.
        """
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UserError(f"Run folder not found: {folder}. Pass a folder written by "
                            "bayesprompt.fit or svi_train.py (it holds config.json).")
        config, program, clip, base, new = load_run(folder, device, model, trust_model_file)
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
        """Score these classes from now on (the learned prompts are kept); at least one."""
        self.program.set_classes(api_checks.class_names(classnames))

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

    def train_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (N, D) and labels (N,) of the training images, un-augmented (view 0):
        the images the posterior was conditioned on (cached on disk)."""
        return train_features(self.clip, self.base, self.config)

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
        is the posterior predictive. Features may be a float tensor or NumPy array (cast to
        float32 on the run's device). Point-estimate models give S = 1 and refuse another
        `num_samples`."""
        image_features = api_checks.image_features(image_features, self.clip.feature_dim,
                                                   self.clip.device)
        probs = predictive_probs(self.program, image_features,
                                 self._num_samples(num_samples), self.config.eval_batch_size,
                                 self.config.eval_seed if seed is None else seed)
        return probs.cpu()

    def posterior_samples(self, num_samples: int | None = None,
                          image_features: torch.Tensor | None = None,
                          seed: int | None = None) -> dict[str, torch.Tensor]:
        """Draws of the latent sites from the guide: site -> (S, *event) for global sites,
        (S, N, *event) for per-image sites, which need `image_features` (N, D)."""
        blank = image_features is None
        features = torch.zeros(1, self.clip.feature_dim) if blank else \
            api_checks.image_features(image_features, self.clip.feature_dim, self.clip.device)
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
        return api_checks.num_samples(num_samples, self.program.stochastic, self.config.model)
