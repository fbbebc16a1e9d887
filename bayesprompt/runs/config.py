"""A run's options: `RunConfig` (every option, declared once with its help), the per-dataset
defaults, the checks of numeric values and the library's device and precision defaults."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bayesprompt.data.datasets import known_datasets
from bayesprompt.data.splits import SUBSAMPLES
from bayesprompt.errors import UserError
from bayesprompt.inference.elbos import ELBOS, elbo_class
from bayesprompt.inference.objectives import OBJECTIVES
from bayesprompt.inference.variational import GUIDE_OPTIMIZERS
from bayesprompt.paths import cache_root, data_root
from bayesprompt.world.downstream import DATASETS as OFFLINE_DATASETS

#: Options that change how fast and in how much memory a run goes, not its results: a run may
#: be resumed with other values.
EXECUTION_OPTIONS = ("prompt_chunk", "text_memory_gb", "grad_checkpointing", "loader_workers",
                     "log_every", "tensorboard")
#: Options whose default changed when they were added: what a run folder that does not record
#: them was trained with (runs before --guide-optimizer trained the guide with the SGD).
UNRECORDED_VALUES = {"guide_optimizer": "sgd"}


@dataclass(frozen=True)
class DatasetDefaults:
    """Per-dataset defaults: Monte Carlo samples L, epochs, batch size, learning rate, the
    smallest random-resized-crop scale of the augmented views and the scale s of the vpt
    residual (context = ctx + s r, r ~ N(0, I)).

    s = 0.02, a token embedding's scale, for every dataset: with the ELBO, the reference's
    s = 1 makes the summed KL dominate and the posterior does not leave the prior; with
    `--objective paper` s = 1 trains, but worse on the offline world (docs/EVIDENCE.md).
    `--objective paper --residual-scale 1` is the reference exactly."""

    num_particles: int
    epochs: int
    batch_size: int = 1
    lr: float = 0.002
    crop_min_scale: float = 0.08
    residual_scale: float = 0.02


#: The reference run scripts of Bayesian Prompt Learning (batch size 1).
DATASET_DEFAULTS: dict[str, DatasetDefaults] = {
    name: DatasetDefaults(particles, epochs) for name, (particles, epochs) in {
        "caltech101": (20, 20), "oxford_pets": (40, 20), "stanford_cars": (20, 40),
        "oxford_flowers": (10, 40), "food101": (20, 20), "fgvc_aircraft": (10, 10),
        "sun397": (20, 10), "dtd": (40, 10), "eurosat": (20, 60), "ucf101": (5, 20),
        "imagenet": (10, 10),
    }.items()
}


#: The offline world: 30 epochs, long enough for CoOp to converge on miniworld's base classes;
#: batches of 16 with the learning rate scaled by 16 (linear scaling), so the default run takes
#: minutes on two CPU cores; milder crops, since 32-pixel images of one
#: object lose the object in a crop of 8% of the area.
DATASET_DEFAULTS.update({name: DatasetDefaults(10, 30, 16, 0.032, 0.5)
                         for name in OFFLINE_DATASETS})
FALLBACK_DEFAULTS = DatasetDefaults(10, 10)


def option(default: Any = None, help: str = "", choices: tuple | None = None,
           factory: Callable[[], Any] | None = None) -> Any:
    """A RunConfig field with its command-line help (and allowed values): the one place an
    option is declared; `commands.cli.add_config_arguments` makes the flags from these."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Every option of a run; None means 'the dataset's or model's default'.

    Each field is a command-line option (`--field-name`, help from its metadata) of
    svi_train.py, a key of `--config`'s config.json and of benchmark.py's `--set`/`--variant`.
    """

    dataset: str = option("miniworld", "one of {datasets}, or a dataset folder")
    root: str = option(str(data_root()), "folder holding the datasets")
    model: str = option("vpt_cond", "one of {models}, or a model file path")
    backbone: str = option("MiniCLIP", "open_clip model name, model-config JSON file, or "
                           "hf-hub:org/repo (an open_clip model on the Hugging Face Hub)")
    pretrained: str | None = option(
        None, "open_clip pretrained tag or checkpoint file ('' for random init; default: "
        "MiniCLIP's own weights, none for other backbones)")
    shots: int = option(16, "images per class (0: all)")
    seed: int = option(1, "seed of the few-shot selection, the initialisation and the SVI noise")
    subsample: str = option("base", "train on the base half of the classes, or on all",
                            choices=SUBSAMPLES[:2])
    epochs: int | None = option(None, "passes over the training images (default: the "
                                "dataset's reference value)")
    num_particles: int | None = option(None, "Monte Carlo samples L (default: the dataset's "
                                       "reference value)")
    batch_size: int | None = option(None, "images per SVI step (default: the dataset's; "
                                    "reference: 1)")
    objective: str = option("elbo", "the loss: the ELBO, or the reference's 'paper' loss",
                            choices=OBJECTIVES)
    elbo: str | None = option(
        None, f"the Pyro ELBO of --objective elbo: one of {', '.join(ELBOS)} (default: the "
        "model file's `elbo` attribute, else Trace_ELBO)")
    lr: float | None = option(None, "SGD learning rate (default: the dataset's; reference: "
                              "0.002)")
    guide_optimizer: str = option(
        "sgd", "optimiser of the guide's variational parameters under --objective elbo: "
        "Adam at --guide-lr on the warm-up and cosine schedule, or the reference SGD "
        "(--objective paper always uses the reference SGD)", choices=GUIDE_OPTIMIZERS)
    guide_lr: float = option(0.01, "peak learning rate of the guide's Adam (--guide-optimizer "
                             "adam)")
    views: int = option(8, "cached augmented views per training image (0: no augmentation)")
    crop_min_scale: float | None = option(
        None, "smallest random crop, fraction of the area (default: the dataset's; reference: "
        "0.08)")
    n_ctx: int = option(4, "context tokens of the prompt")
    ctx_init: str = option("a photo of a", "words that initialise the context ('' for "
                           "N(0, 0.02))")
    kl_weight: float = option(1.0, "weight of the KL term (scales the latent sites)")
    prior_scale: float = option(1.0, "scale of the N(0, s^2 I) prior of point-estimate "
                                "contexts")
    residual_scale: float | None = option(
        None, "residual = s * r, r ~ N(0, I), in vpt models (default: the dataset's, 0.02, a "
        "token embedding's scale; the reference: 1 with --objective paper)")
    learn_residual_scale: bool = option(
        False, "empirical Bayes: learn the residual scale s, starting at --residual-scale, as "
        "a parameter that maximises the ELBO (type-II maximum likelihood)")
    options: dict = option(help="a model file's own option (repeatable)", factory=dict)
    device: str = option("cpu", "cpu or cuda[:N] (the scripts' default: cuda when present)")
    precision: str = option("fp32", "autocast precision: fp16 or bf16 on CUDA, bf16 on CPUs "
                            "with bf16 matrix units (the scripts' default: bf16 on CUDA and on "
                            "such CPUs, else fp32)", choices=("fp32", "fp16", "bf16"))
    eval_batch_size: int = option(64, "most test images per forward pass, fewer when their "
                                  "S x C prompts exceed the text memory budget (does not change "
                                  "the accuracy)")
    eval_samples: int | None = option(None, "posterior draws S of the evaluation (default: "
                                      "--num-particles)")
    eval_seed: int | None = option(None, "seed of the evaluation's posterior draws (default: "
                                   "--seed)")
    prompt_chunk: int | None = option(
        None, "prompts the text tower encodes at once (default: as many as fit "
        "--text-memory-gb); with gradients, chunks are recomputed in backward")
    text_memory_gb: float | None = option(
        None, "memory budget of prompt encoding (default: a quarter of the free RAM on the "
        "CPU, half the free GPU memory on CUDA)")
    grad_checkpointing: bool = option(False, "recompute each text-tower layer in the backward "
                                      "pass (less memory, more time)")
    loader_workers: int | None = option(
        None, "processes that decode images for the feature cache (default: min(4, CPU "
        "cores); 0: this process); the features do not depend on it")
    log_every: int = option(50, "a metrics.jsonl row every N SVI steps (0: one per epoch "
                            "only)")
    tensorboard: bool = option(False, "also write TensorBoard events into RUN/tensorboard "
                               "(needs the tensorboard package)")
    eval_on: list[str] = option(
        help="also evaluate on these datasets, all their classes (cross-dataset transfer, "
        "domain generalisation; use with --subsample all)", factory=list)
    cache_dir: str = option(str(cache_root()), "feature and few-shot cache")
    out: str | None = option(None, "run folder (default: runs/DATASET/MODEL/"
                             "SUBSAMPLE_shotsK_seedS)")

    def resolved(self) -> RunConfig:
        """A checked copy with defaults filled in (None means default; 0 is a value), paths
        made absolute and the run folder named."""
        defaults = DATASET_DEFAULTS.get(self.dataset, FALLBACK_DEFAULTS)
        config = RunConfig(**asdict(self))
        for name in ("num_particles", "epochs", "batch_size", "lr", "crop_min_scale",
                     "residual_scale"):
            if getattr(self, name) is None:
                setattr(config, name, getattr(defaults, name))
        config.eval_samples = config.num_particles if self.eval_samples is None \
            else self.eval_samples
        config.eval_seed = self.seed if self.eval_seed is None else self.eval_seed
        config.root, config.cache_dir = absolute(self.root), absolute(self.cache_dir)
        config.dataset = dataset_option(self.dataset)
        config.eval_on = [dataset_option(name) for name in self.eval_on]
        if self.elbo is not None:
            elbo_class(self.elbo)
        if self.model.endswith(".py"):
            config.model = absolute(self.model)
        if self.backbone.endswith(".json"):
            config.backbone = absolute(self.backbone)
        if self.pretrained and Path(self.pretrained).expanduser().is_file():
            config.pretrained = absolute(self.pretrained)
        dataset_name = Path(self.dataset).name
        model_name = Path(self.model).stem
        config.out = absolute(self.out or str(
            Path("runs") / dataset_name / model_name /
            f"{self.subsample}_shots{self.shots}_seed{self.seed}"))
        check_numbers(config)
        return config


def absolute(path: str) -> str:
    """A path option as an absolute path without `..` or links, so that one folder has one
    spelling in config.json."""
    return str(Path(path).expanduser().resolve())


def dataset_option(name: str) -> str:
    """A dataset name as it is; a dataset folder as an absolute path."""
    if name in known_datasets() or not Path(name).expanduser().exists():
        return name
    return absolute(name)


def check_numbers(config: RunConfig) -> None:
    """Refuse numeric options outside their meaning (a UserError naming every bad one)."""
    def finite(value: float) -> bool:
        return math.isfinite(value)

    rules = [
        ("--shots", config.shots, config.shots >= 0, "0 (all images) or more"),
        ("--epochs", config.epochs, config.epochs >= 0, "0 (no training) or more"),
        ("--batch-size", config.batch_size, config.batch_size >= 1, "1 or more"),
        ("--num-particles", config.num_particles, config.num_particles >= 1, "1 or more"),
        ("--eval-samples", config.eval_samples, config.eval_samples >= 1, "1 or more"),
        ("--eval-batch-size", config.eval_batch_size, config.eval_batch_size >= 1, "1 or more"),
        ("--log-every", config.log_every, config.log_every >= 0,
         "0 (a row per epoch only) or more"),
        ("--lr", config.lr, finite(config.lr) and config.lr > 0, "a positive finite number"),
        ("--guide-lr", config.guide_lr, finite(config.guide_lr) and config.guide_lr > 0,
         "a positive finite number"),
        ("--views", config.views, config.views >= 0, "0 (no augmentation) or more"),
        ("--loader-workers", config.loader_workers,
         config.loader_workers is None or config.loader_workers >= 0,
         "0 (decode in this process) or more"),
        ("--n-ctx", config.n_ctx, config.n_ctx >= 1, "1 or more"),
        ("--crop-min-scale", config.crop_min_scale, 0 < config.crop_min_scale <= 1,
         "a fraction in (0, 1]"),
        ("--kl-weight", config.kl_weight, finite(config.kl_weight) and config.kl_weight >= 0,
         "a finite number, 0 or more"),
        ("--prior-scale", config.prior_scale,
         finite(config.prior_scale) and config.prior_scale > 0, "a positive finite number"),
        ("--residual-scale", config.residual_scale,
         finite(config.residual_scale) and config.residual_scale >= 0,
         "a finite number, 0 (no residual) or more"),
        ("--residual-scale (the start of --learn-residual-scale)", config.residual_scale,
         not config.learn_residual_scale or config.residual_scale > 0, "positive"),
        ("--subsample", config.subsample, config.subsample in SUBSAMPLES,
         f"one of {', '.join(SUBSAMPLES)}"),
    ]
    bad = [f"{option} must be {meaning}, got {value!r}" for option, value, ok, meaning in rules
           if not ok]
    if bad:
        raise UserError(f"Bad option value: {'; '.join(bad)}. Fix it and run again.")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX).

    oneDNN also "supports" bf16 on plain AVX512 by emulation, which is 3-4x slower than fp32
    (measured on an Ice Lake Xeon: 57 against 209 GFLOP/s), so its own flag is not asked.
    """
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


def default_precision(device: str) -> str:
    """bf16 on CUDA and on CPUs with bf16 matrix units (1.5-2.5x faster, same accuracy on the
    offline world; README, "Speed and memory"), else fp32."""
    if device.startswith("cuda") or (device == "cpu" and cpu_has_bf16_matmul()):
        return "bf16"
    return "fp32"
