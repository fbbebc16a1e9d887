"""Posterior samples of a trained run on its test splits and its training images, as arrays and
as ArviZ InferenceData.

How the samples are drawn (S samples, N test images of a split, C classes, D feature width):
the one posterior predictive of ``bayesprompt.inference.predictive``, which also gives
results.json its accuracies, so that the same S and seed give the same accuracy here and
there.

1. Latents: ``predictive.posterior_draws``: ``pyro.infer.Predictive(program.guide, num_samples=S,
   parallel=True)`` on all N image features at once, seeded by the evaluation seed. Global
   latents (outside the ``images`` plate, e.g. ``r`` of vpt, ``ctx`` of coop) are drawn once
   per run and shared by every split, so draw s is the same prompt on base, new and shifted
   images. Per-image latents (e.g. ``r`` of vpt_cond) are drawn per image.
2. Labels and probabilities: ``predictive.replayed_batches``, the model replayed batch by batch
   with its latents set to the draws. The ``y`` site gives the class probabilities (S, B, C)
   and a sampled label per draw; the deterministic site ``text_features`` (recorded by
   ``PromptModel.text_features``) the class text features each sample produced.

Point-estimate models (coop, cocoop, zeroshot: ``program.stochastic`` is False) are sampled
once and the draw is repeated S times: their S samples are identical by construction.

Base and new classes are different class sets, so every split gets its own InferenceData with
its own ``class`` coordinate, stored as ``posterior_<split>.nc``. The training images (split
``train``: the run's few-shot training set, un-augmented view 0) are drawn last, with the same
S, seed and global draws: their labels are the data the posterior was conditioned on, so their
InferenceData holds ``log_likelihood`` for ``az.loo``; the test splits' hold ``predictions``
(``analysis/inference_data.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bayesprompt.analysis.inference_data import to_inference_data

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.data.datasets import Dataset, load_dataset
from bayesprompt.data.splits import subsample_classes
from bayesprompt.errors import UserError
from bayesprompt.inference.predictive import (
    posterior_draws,
    replayed_batches,
    seeded,
)
from bayesprompt.program.base import PromptModel
from bayesprompt.program.templates import IMAGENET_TEMPLATES, template_text_features
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.evaluate import test_features, train_features
from bayesprompt.runs.loaded_run import LoadedRun

#: The name of the split of the run's training images, the data the posterior is conditioned on.
TRAIN_SPLIT = "train"

#: Per-image text features (S, M, C, D) are kept for the first M images of a split only.
MAX_TEXT_IMAGES = 32


@dataclass
class SplitSamples:
    """Posterior samples on the images of one split: held-out test images, or (``held_out``
    False) the training images the posterior was conditioned on."""

    name: str
    classnames: list[str]
    features: torch.Tensor  # (N, D) image features
    labels: torch.Tensor  # (N,) true labels
    latents: dict[str, torch.Tensor]  # site -> (S, *event) global or (S, N, *event) per image
    per_image_sites: tuple[str, ...]  # latent sites inside the images plate
    predicted: torch.Tensor  # (S, N) sampled labels
    probs: torch.Tensor  # (S, N, C) class probabilities per sample
    text_features: torch.Tensor | None  # (S, C, D) global, (S, M, C, D) per image, None
    held_out: bool = True

    def inference_data(self) -> Any:
        """ArviZ InferenceData of this split (see :func:`to_inference_data`)."""
        dims = {}
        for name, value in self.latents.items():
            image = ["image"] if name in self.per_image_sites else []
            dims[name] = image + [f"{name}_dim_{i}" for i in range(value.dim() - 1 - len(image))]
        return to_inference_data(self.latents, self.predicted, self.probs, self.labels,
                                 self.classnames, [self.name] * len(self.labels), dims,
                                 held_out=self.held_out)


@dataclass
class RunPosterior:
    """A loaded run and its posterior samples per test split (base, new, domain names) and on
    its training images (``train``; None when not drawn or the model has no latent)."""

    run_dir: Path
    config: RunConfig
    program: PromptModel
    clip: FrozenCLIP
    splits: dict[str, SplitSamples]
    num_samples: int
    seed: int
    train: SplitSamples | None = None

    @property
    def deterministic(self) -> bool:
        """True for point-estimate models: all S samples are the same."""
        return not self.program.stochastic


def batch_samples(trace: Any, num_samples: int, images: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Labels (S, B), probabilities (S, B, C) and text features of a replayed batch's trace.

    Text features are (S, 1, C, D) for prompts shared by the batch, (S, B, C, D) for per-image
    prompts, None for a model without the "text_features" site.
    """
    shape = (num_samples, images)
    labels = trace.nodes["y"]["value"].expand(shape)                     # (S, B)
    probs = trace.nodes["y"]["fn"].probs.expand(*shape, -1)              # (S, B, C)
    site = trace.nodes.get("text_features")
    text = None if site is None else site["value"]
    if text is not None:
        text = text.expand(num_samples, *text.shape[-3:]) if text.dim() == 4 else \
            text.expand(num_samples, 1, *text.shape[-2:])
    return labels, probs, text


def sample_split(program: PromptModel, name: str, classnames: list[str],
                 data: tuple[torch.Tensor, torch.Tensor], num_samples: int,
                 global_latents: dict[str, torch.Tensor], seed: int, batch_size: int = 64,
                 held_out: bool = True) -> SplitSamples:
    """Draw S posterior samples on the images of a split: ``data`` = features (N, D), labels (N,).

    ``global_latents`` holds the run's shared draws of the global sites; it is filled on the
    first call. Point-estimate models draw once and repeat the draw S times.
    """
    features, true_labels = data
    program.set_classes(classnames)
    draws = posterior_draws(program, features, num_samples, seed, global_latents)
    labels, probs, texts = [], [], []
    with torch.no_grad():
        for start, stop, trace in replayed_batches(program, features, draws, batch_size,
                                                   desc=f"posterior samples ({name})"):
            y, p, text = batch_samples(trace, draws.num_samples, stop - start)
            labels.append(y)
            probs.append(p)
            if text is not None and start < MAX_TEXT_IMAGES:
                texts.append(text)
    text_features = None
    if texts and all(t.shape[1] == 1 for t in texts):  # one prompt per class for all images
        text_features = texts[0][:, 0]                                       # (S, C, D)
    elif texts:
        text_features = torch.cat(texts, dim=1)[:, :MAX_TEXT_IMAGES]         # (S, M, C, D)

    def repeat(x: torch.Tensor) -> torch.Tensor:
        return x.expand(num_samples, *x.shape[1:]).clone()

    return SplitSamples(
        name=name, classnames=list(classnames), features=features.cpu(),
        labels=true_labels.cpu(),
        latents={k: repeat(v).cpu() for k, v in draws.latents.items()},
        per_image_sites=draws.per_image,
        predicted=repeat(torch.cat(labels, dim=1)).cpu(),
        probs=repeat(torch.cat(probs, dim=1)).cpu(),
        text_features=None if text_features is None else repeat(text_features).cpu(),
        held_out=held_out)


def domain_dataset(config: RunConfig, name: str, classnames: list[str]) -> Dataset:
    """The run's class subsample of dataset ``name`` (a domain-shifted variant of its data)."""
    dataset = load_dataset(name, Path(config.root).expanduser())
    subsample = "base" if config.subsample == "base" else "all"
    dataset = subsample_classes(dataset, subsample)
    if dataset.classnames != classnames:
        raise UserError(
            f"The domain dataset '{name}' has other classes than the run's training classes "
            f"({len(dataset.classnames)} vs {len(classnames)}; e.g. {dataset.classnames[:3]} vs "
            f"{classnames[:3]}). A domain variant must have the same classes in the same order."
        )
    return dataset


def chosen_splits(run: LoadedRun, splits: Sequence[str], domains: Sequence[str]
                  ) -> dict[str, Dataset]:
    """Split name -> dataset of the chosen test splits (see :func:`posterior_samples`)."""
    own = {"base": run.base, "new": run.new}
    chosen = {}
    for split in splits:
        if split not in own:
            raise UserError(f"Unknown split '{split}'; choose from base, new (the training "
                            "images are drawn with train=True).")
        if own[split] is not None:
            chosen[split] = own[split]
    for name in domains:
        chosen[name] = domain_dataset(run.config, name, run.base.classnames)
    return chosen


def posterior_samples(run: LoadedRun | str | Path, num_samples: int | None = None,
                      splits: Sequence[str] = ("base", "new"), domains: Sequence[str] = (),
                      device: str | None = None, seed: int | None = None,
                      train: bool = True) -> RunPosterior:
    """Draw S posterior samples of a run on each test split and on its training images.

    Args:
        run: a loaded run (``bayesprompt.Run``), or a run folder (config.json,
            checkpoint.pt) to load.
        num_samples: S (default: the run's `eval_samples`, as results.json).
        splits: which of the run's own test splits: "base" (training classes; all classes
            for a run with subsample "all") and "new" (held-out classes, if any).
        domains: names of datasets with the run's classes (e.g. "miniworld_sketch"); each is
            evaluated on the training classes and becomes a split named after it.
        device: overrides the run's device (when ``run`` is a folder).
        seed: seed of the draws (default: the run's `eval_seed`). With the run's S and seed,
            the accuracies equal results.json's.
        train: also draw on the training images (``RunPosterior.train``, split "train"),
            after the test splits; not for a model without latents (zeroshot).

    Returns:
        :class:`RunPosterior` with one :class:`SplitSamples` per split.
    """
    if num_samples is not None and num_samples < 1:
        raise UserError(f"--num-samples must be 1 or more (got {num_samples}): it is the number "
                        "S of posterior samples drawn per test image (default: the run's).")
    if not isinstance(run, LoadedRun):
        run = LoadedRun.load(run, device)
    config, program, clip = run.config, run.program, run.clip
    if program.latent_sites and not (run.folder / "checkpoint.pt").is_file():
        raise UserError(f"{run.folder} holds no checkpoint.pt: the run has not finished an "
                        "epoch of training. Train it (svi_train.py --out RUN_DIR [--resume]) "
                        "first.")
    chosen = chosen_splits(run, splits, domains)
    num_samples = config.eval_samples if num_samples is None else num_samples
    seed = config.eval_seed if seed is None else seed
    classnames = program.classnames
    global_latents: dict[str, torch.Tensor] = {}
    samples, train_samples = {}, None
    with seeded(seed):  # the sampled labels; the caller's RNG states are kept
        for name, dataset in chosen.items():
            samples[name] = sample_split(program, name, dataset.classnames,
                                         test_features(clip, dataset, config), num_samples,
                                         global_latents, seed, config.eval_batch_size)
        if train and program.latent_sites:
            train_samples = sample_split(program, TRAIN_SPLIT, run.base.classnames,
                                         train_features(clip, run.base, config), num_samples,
                                         global_latents, seed, config.eval_batch_size,
                                         held_out=False)
    program.set_classes(classnames)
    return RunPosterior(run.folder, config, program, clip, samples, num_samples, seed,
                        train_samples)


def template_features(clip: FrozenCLIP, classnames: list[str],
                      templates: Sequence[str] = IMAGENET_TEMPLATES) -> torch.Tensor:
    """Text features of hand-written templates for each class, on the CPU: (K, C, D)."""
    return template_text_features(clip, classnames, list(templates)).cpu()
