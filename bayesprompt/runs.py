"""One training run, from options to a run folder, and back from a run folder to a model.

A run folder holds `config.json` (every resolved option), `fewshot.json` (the exact few-shot
train and val lists), `checkpoint.pt` (param store, optimiser and RNG states, written
atomically after every epoch), `metrics.jsonl` (training curves, `training_log.py`),
`loss_curve.png`, `tensorboard/` (with --tensorboard) and `results.json`. Under torchrun,
rank 0 alone writes them (and the data and feature caches, before the other ranks read them)
and evaluates.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

import bayesprompt.models
from bayesprompt import distributed
from bayesprompt.clip import FrozenCLIP, load_clip
from bayesprompt.data.datasets import Dataset, known_datasets, load_dataset
from bayesprompt.data.features import cached_features
from bayesprompt.data.offline_world import DATASETS as OFFLINE_DATASETS
from bayesprompt.data.offline_world import default_data_root
from bayesprompt.data.splits import SUBSAMPLES, FewShot, few_shot, subsample_classes
from bayesprompt.errors import RunInterrupted, UserError, first_line
from bayesprompt.files import read_json, write_json
from bayesprompt.infer import (
    OBJECTIVES,
    TrainConfig,
    load_checkpoint,
    predictive_probs,
    train,
)
from bayesprompt.miniclip import cache_dir
from bayesprompt.prompt_model import PromptConfig, PromptModel
from bayesprompt.run_lock import RunFolderLock
from bayesprompt.text_tower import TextBudget
from bayesprompt.training_log import TrainingLog, check_tensorboard, write_loss_curve
from bayesprompt.trust import check_model_file, model_to_load, record_model_file

#: The model files shipped with the package (`models/` of the source tree).
MODELS_DIR = Path(bayesprompt.models.__file__).resolve().parent
#: Options that change how fast and in how much memory a run goes, not its results: a run may
#: be resumed with other values.
EXECUTION_OPTIONS = ("prompt_chunk", "text_memory_gb", "grad_checkpointing", "loader_workers",
                     "log_every", "tensorboard")

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
    option is declared; `bayesprompt.cli.add_config_arguments` makes the flags from these."""
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
    root: str = option(str(default_data_root()), "folder holding the datasets")
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
    lr: float | None = option(None, "SGD learning rate (default: the dataset's; reference: "
                              "0.002)")
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
    cache_dir: str = option(str(cache_dir()), "feature and few-shot cache")
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
        ("--subsample", config.subsample, config.subsample in SUBSAMPLES,
         f"one of {', '.join(SUBSAMPLES)}"),
    ]
    bad = [f"{option} must be {meaning}, got {value!r}" for option, value, ok, meaning in rules
           if not ok]
    if bad:
        raise UserError(f"Bad option value: {'; '.join(bad)}. Fix it and run again.")


def load_model_class(name: str) -> type[PromptModel]:
    """`models/<name>.py`, or any model file by path; its module attribute `Model`."""
    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"Model file not found: {path}.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        _import_model_file(path, lambda: spec.loader.exec_module(module))
    elif (MODELS_DIR / f"{name}.py").is_file():
        module = _import_model_file(MODELS_DIR / f"{name}.py",
                                    lambda: importlib.import_module(f"bayesprompt.models.{name}"))
    else:
        raise UserError(
            f"Unknown model '{name}'. Known models: {', '.join(known_models())}; or pass the "
            "path of a model file (a .py defining `Model`, a PromptModel subclass)."
        )
    model_class = getattr(module, "Model", None)
    if not (isinstance(model_class, type) and issubclass(model_class, PromptModel)):
        raise UserError(f"The model file of '{name}' defines no `Model` (a PromptModel class).")
    return model_class


def _import_model_file(path: Path, load: Callable[[], object]) -> object:
    """Run `load` (the import of a model file); its failure becomes one clear UserError."""
    try:
        return load()
    except Exception as error:  # a model file is user code: any error it raises is reported
        where = f" (line {error.lineno})" if isinstance(error, SyntaxError) else ""
        raise UserError(
            f"The model file {path} could not be loaded{where}: {type(error).__name__}: "
            f"{error}. Fix the file (run `python {path}` to see the full error)."
        ) from None


def known_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.py") if not p.stem.startswith("_"))


def build_program(config: RunConfig, clip: FrozenCLIP, classnames: list[str],
                  template: str) -> PromptModel:
    prompt_config = PromptConfig(config.n_ctx, config.ctx_init, config.kl_weight,
                                 config.prior_scale, config.residual_scale, template,
                                 dict(config.options))
    return load_model_class(config.model)(clip, classnames, prompt_config).to(clip.device)


def split_datasets(config: RunConfig) -> tuple[Dataset, Dataset | None, FewShot]:
    """The training classes' dataset (few-shot), the held-out new classes if any, and the
    few-shot selection before the base/new subsample."""
    root = Path(config.root).expanduser()
    selection = few_shot(load_dataset(config.dataset, root), config.shots, config.seed,
                         Path(config.cache_dir).expanduser() / "split_fewshot")
    dataset = selection.dataset
    if config.subsample == "all":
        return dataset, None, selection
    return subsample_classes(dataset, "base"), subsample_classes(dataset, "new"), selection


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of images whose posterior-predictive mean (S, N, C) argmax is the label (N,)."""
    return 100.0 * (probs.mean(0).argmax(-1) == labels).float().mean().item()


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def test_features(clip: FrozenCLIP, dataset: Dataset, config: RunConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features (N, D) of a dataset's test images on the CLIP's device (from the run's
    feature cache) and their labels (N,)."""
    cache = Path(config.cache_dir).expanduser() / "features"
    features = cached_features(clip, dataset.test, [0], cache, workers=config.loader_workers)[0]
    return features.to(clip.device), torch.tensor([item.label for item in dataset.test])


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


#: What a run folder's config.json holds, for the message about a damaged one.
RUN_CONFIG_FILE = ("the run's options as written by svi_train.py; restore the file, or train "
                   "the run again into a new --out folder")


def new_class_metrics(program: PromptModel, base_probs: torch.Tensor, new_probs: torch.Tensor,
                      new_labels: torch.Tensor) -> dict:
    """ECE and NLL of the predictive mean on the new classes' test images, and the AUROC of the
    mutual information for telling new-class from base-class images (None for point-estimate
    models). Probabilities (S, N, C) of each split; see docs/ANALYSIS.md for the metrics."""
    # analysis/__init__ imports ArviZ (seconds); only this function needs the analysis package
    from bayesprompt.analysis.calibration import expected_calibration_error, negative_log_likelihood
    from bayesprompt.analysis.uncertainty import auroc, mutual_information

    mean_probs = new_probs.double().mean(0)
    mi_auroc = None
    if program.stochastic:
        information = [mutual_information(p.double()) for p in (base_probs, new_probs)]
        is_new = [np.zeros(len(information[0]), bool), np.ones(len(information[1]), bool)]
        mi_auroc = auroc(np.concatenate(information), np.concatenate(is_new))
    return {"new_ece": expected_calibration_error(mean_probs, new_labels),
            "new_nll": negative_log_likelihood(mean_probs, new_labels),
            "mi_auroc_new_vs_base": mi_auroc}


def holds_run(out: Path) -> bool:
    """True when `out` holds (part of) a run: its config, checkpoint or results."""
    try:
        return any((out / name).exists() for name in ("config.json", "checkpoint.pt",
                                                      "results.json"))
    except OSError as error:
        raise UserError(f"Cannot look into the run folder {out} ({first_line(error)}). Make it "
                        "readable, or pass another --out.") from None


def changed_options(saved: dict, config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """name -> (value in `saved`, value in `config`) of every option in which a run folder's
    config.json differs from `config`. `out` (spelled differently, or the folder moved) and the
    EXECUTION_OPTIONS do not count; an option a run of an older version did not record counts
    as its default."""
    requested = json.loads(json.dumps(asdict(config)))
    defaults = json.loads(json.dumps(asdict(RunConfig())))
    values = {k: (saved.get(k, defaults.get(k)), requested.get(k))
              for k in sorted(saved.keys() | requested.keys())
              if k not in ("out", *EXECUTION_OPTIONS)}
    return {k: pair for k, pair in values.items() if pair[0] != pair[1]}


def check_resume(config: RunConfig, out: Path) -> None:
    """A run folder is resumed only with the options it was started with (`changed_options`)."""
    config_file = out / "config.json"
    if not config_file.is_file():
        return
    changed = changed_options(read_json(config_file, RUN_CONFIG_FILE), config)
    if changed:
        details = "; ".join(f"{k}: run has {there!r}, now {now!r}"
                            for k, (there, now) in changed.items())
        raise UserError(f"--resume with other options than the run in {out} ({details}). "
                        "Resume with the run's options, or start a new run with another --out.")


def train_and_evaluate(config: RunConfig, resume: bool = False) -> dict | None:
    """Train on the base (or all) classes, evaluate base and new; write the run folder.

    `eval_on` datasets are evaluated on all their classes (cross-dataset transfer, or domain
    generalisation for a dataset with the same classes), as `transfer_acc`. Under torchrun
    every rank trains; rank 0 evaluates and returns the results, the other ranks return None.
    Ctrl-C becomes `RunInterrupted`, which says how to continue. The run folder is locked
    (`bayesprompt.run_lock`) from its first write to the end.
    """
    with RunFolderLock() as lock:
        return _train_and_evaluate(config, resume, lock)


def _train_and_evaluate(config: RunConfig, resume: bool, lock: RunFolderLock) -> dict | None:
    config = config.resolved()
    if resume:  # a changed model file is refused before it is imported
        check_model_file(Path(config.out), config.model)
    load_model_class(config.model)  # an unknown model fails before anything is loaded
    distributed.check_batch_size(config.batch_size)
    out = Path(config.out)
    checkpoint = out / "checkpoint.pt"
    if holds_run(out) and not resume:
        raise UserError(
            f"{out} already holds a run. Pass --resume to continue it, or another --out."
        )
    if resume:
        check_resume(config, out)
    if config.tensorboard:
        check_tensorboard()
    root = Path(config.root).expanduser()
    with distributed.main_process_first():
        transfer_sets = {name: load_dataset(name, root) for name in config.eval_on}
        base, new, selection = split_datasets(config)
        clip = load_run_clip(config, distributed.rank_device(config.device))
    pyro.set_rng_seed(config.seed)
    program = build_program(config, clip, base.classnames, base.template)
    cache = Path(config.cache_dir).expanduser() / "features"
    views = list(range(1, config.views + 1)) if config.views > 0 else [0]
    with distributed.main_process_first():
        features = cached_features(clip, base.train, views, cache, config.seed,
                                   config.crop_min_scale, config.loader_workers).to(clip.device)
    if distributed.is_main_process():  # only now: bad input leaves no half-made run
        lock.hold(out)  # another process may have started a run there since the check above
        if holds_run(out) and not resume:
            raise UserError(f"{out} already holds a run (started by another process while "
                            "this one prepared). Pass --resume to continue it, or another --out.")
        record_model_file(out, config.model)
        write_json(out / "config.json", asdict(config))
        write_json(out / "fewshot.json", selection.record())
    labels = torch.tensor([item.label for item in base.train], device=clip.device)
    train_config = TrainConfig(config.epochs, config.batch_size, config.num_particles,
                               config.objective, config.lr, seed=config.seed)
    started = time.perf_counter()
    try:
        history = train(program, features, labels, train_config, checkpoint,
                        run_identity(config, clip, base.classnames), resume,
                        TrainingLog(out, config.log_every, config.tensorboard))
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"Interrupted. The run folder {out} keeps the last finished epoch; run the same "
            "command with --resume to continue it."
        ) from None
    train_seconds = time.perf_counter() - started
    if not distributed.is_main_process():
        return None
    write_loss_curve(out)

    shared: dict[str, torch.Tensor] = {}
    base_acc, base_probs, _ = evaluate(program, clip, base, config, shared)
    new_acc, metrics = None, {"new_ece": None, "new_nll": None, "mi_auroc_new_vs_base": None}
    if new is not None:
        new_acc, new_probs, new_labels = evaluate(program, clip, new, config, shared)
        metrics = new_class_metrics(program, base_probs, new_probs, new_labels)
    transfer = {name: evaluate(program, clip, dataset, config, shared)[0]
                for name, dataset in transfer_sets.items()}
    results = {
        "base_acc": base_acc, "new_acc": new_acc,
        "hm": harmonic_mean(base_acc, new_acc) if new_acc is not None else None,
        **metrics, "transfer_acc": transfer,
        "dataset": config.dataset, "model": config.model, "shots": config.shots,
        "seed": config.seed, "epochs": config.epochs, "num_particles": config.num_particles,
        "eval_samples": config.eval_samples, "eval_seed": config.eval_seed,
        "fewshot_source": selection.source,
        "train_images": len(base.train), "train_seconds": round(train_seconds, 2),
        "world_size": distributed.world_size(),
        "loss_history": history.loss, "factor_history": history.factors,
    }
    write_json(out / "results.json", results)
    return results


def load_run_clip(config: RunConfig, device: str | None = None) -> FrozenCLIP:
    """The run's frozen CLIP (on `device`, default the run's), with its memory options."""
    return load_clip(config.backbone, config.pretrained, device or config.device,
                     config.precision,
                     text_budget=TextBudget(config.prompt_chunk, config.text_memory_gb),
                     grad_checkpointing=config.grad_checkpointing)


def run_identity(config: RunConfig, clip: FrozenCLIP, classnames: list[str]) -> dict:
    """What a checkpoint must match to be resumed or loaded into this run."""
    return {"model": config.model, "backbone": clip.identity, "classnames": classnames,
            "n_ctx": config.n_ctx}


def load_run(run_dir: Path, device: str | None = None, model: str | None = None,
             trust_model_file: bool = False
             ) -> tuple[RunConfig, PromptModel, FrozenCLIP, Dataset, Dataset | None]:
    """Rebuild a trained run: its config, program (parameters restored), CLIP and datasets.
    The model is chosen by `trust.model_to_load`: a model file the run folder names is
    imported only when passed as `model` or with `trust_model_file`."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run folder: no config.json there.")
    saved = read_json(config_file, RUN_CONFIG_FILE)
    saved["model"] = model_to_load(run_dir, str(saved.get("model", RunConfig.model)), model,
                                   trust_model_file)
    config = RunConfig(**{f.name: saved[f.name] for f in fields(RunConfig) if f.name in saved})
    config = config.resolved()  # fills options that runs of older versions did not record
    if device:
        config.device = device
    base, new, _ = split_datasets(config)
    clip = load_run_clip(config)
    program = build_program(config, clip, base.classnames, base.template)
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        program.initialize_parameters()
        with program.param_scope():
            load_checkpoint(checkpoint, run_identity(config, clip, base.classnames), clip.device)
    return config, program, clip, base, new


def summary_line(results: dict) -> str:
    """The last line a run prints."""
    def percent(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.2f}%"
    return (f"base {percent(results['base_acc'])}  new {percent(results['new_acc'])}  "
            f"harmonic mean {percent(results['hm'])}")
