"""A run's evaluation: the image features of its test (and training) images, the posterior
predictive on each test split, its accuracy and the new-class metrics of results.json (ECE,
NLL, MI AUROC), and the summary line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.data.datasets import Dataset
from bayesprompt.data.features import cached_features
from bayesprompt.inference.predictive import predictive_probs
from bayesprompt.metrics import (
    accuracy,
    auroc,
    expected_calibration_error,
    mutual_information,
    negative_log_likelihood,
)
from bayesprompt.program.base import PromptModel
from bayesprompt.runs.config import RunConfig


def test_features(clip: FrozenCLIP, dataset: Dataset, config: RunConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features (N, D) of a dataset's test images on the CLIP's device (from the run's
    feature cache) and their labels (N,)."""
    cache = Path(config.cache_dir).expanduser() / "features"
    features = cached_features(clip, dataset.test, [0], cache, workers=config.loader_workers)[0]
    return features.to(clip.device), torch.tensor([item.label for item in dataset.test])


def train_features(clip: FrozenCLIP, dataset: Dataset, config: RunConfig
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features (N, D) of a dataset's (few-shot) training images, un-augmented (view 0,
    from the run's feature cache), on the CLIP's device, and their labels (N,)."""
    cache = Path(config.cache_dir).expanduser() / "features"
    features = cached_features(clip, dataset.train, [0], cache, config.seed,
                               config.crop_min_scale, config.loader_workers)[0]
    return features.to(clip.device), torch.tensor([item.label for item in dataset.train])


def evaluate(program: PromptModel, clip: FrozenCLIP, dataset: Dataset, config: RunConfig,
             shared: dict[str, torch.Tensor] | None = None
             ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Accuracy (percent), predictive probabilities (S, N, C) and labels on the test split.

    S = `eval_samples` draws seeded by `eval_seed` (`infer.posterior_draws`); pass the same
    `shared` dict to every split of one evaluation so that they share the global draws.
    """
    program.set_classes(dataset.classnames)
    features, labels = test_features(clip, dataset, config)
    probs = predictive_probs(program, features, config.eval_samples, config.eval_batch_size,
                             config.eval_seed, shared).cpu()
    return accuracy(probs, labels), probs, labels


def new_class_metrics(program: PromptModel, base_probs: torch.Tensor, new_probs: torch.Tensor,
                      new_labels: torch.Tensor) -> dict:
    """ECE and NLL of the predictive mean on the new classes' test images, and the AUROC of the
    mutual information for telling new-class from base-class images (None for point-estimate
    models). Probabilities (S, N, C) of each split; see docs/ANALYSIS.md for the metrics."""

    mean_probs = new_probs.double().mean(0)
    mi_auroc = None
    if program.stochastic:
        information = [mutual_information(p.double()) for p in (base_probs, new_probs)]
        is_new = [np.zeros(len(information[0]), bool), np.ones(len(information[1]), bool)]
        mi_auroc = auroc(np.concatenate(information), np.concatenate(is_new))
    return {"new_ece": expected_calibration_error(mean_probs, new_labels),
            "new_nll": negative_log_likelihood(mean_probs, new_labels),
            "mi_auroc_new_vs_base": mi_auroc}


def summary_line(results: dict) -> str:
    """The last line a run prints."""
    def percent(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.2f}%"
    return (f"base {percent(results['base_acc'])}  new {percent(results['new_acc'])}  "
            f"harmonic mean {percent(results['hm'])}")
