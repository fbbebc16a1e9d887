"""One training run, from options to a run folder, and back from a run folder to a model.

A run folder holds `config.json` (every resolved option), `checkpoint.pt` (param store,
optimiser and RNG state, written atomically after every epoch) and `results.json`. Under
torchrun, rank 0 alone writes them (and the data and feature caches, before the other ranks
read them) and evaluates.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pyro
import torch

from bayesprompt import distributed
from bayesprompt.clip import FrozenCLIP, load_clip
from bayesprompt.data.datasets import Dataset, load_dataset
from bayesprompt.data.features import cached_features
from bayesprompt.data.offline_world import DATASETS as OFFLINE_DATASETS
from bayesprompt.data.offline_world import default_data_root
from bayesprompt.data.splits import few_shot, subsample_classes
from bayesprompt.errors import UserError
from bayesprompt.infer import TrainConfig, load_checkpoint, predictive_probs, train
from bayesprompt.miniclip import cache_dir
from bayesprompt.prompt_model import PromptConfig, PromptModel
from bayesprompt.text_tower import TextBudget

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
#: Options that change how fast and in how much memory a run goes, not its results: a run may
#: be resumed with other values.
EXECUTION_OPTIONS = ("prompt_chunk", "text_memory_gb", "grad_checkpointing")

@dataclass(frozen=True)
class DatasetDefaults:
    """Per-dataset defaults: Monte Carlo samples L, epochs, batch size, learning rate and the
    smallest random-resized-crop scale of the augmented views."""

    num_particles: int
    epochs: int
    batch_size: int = 1
    lr: float = 0.002
    crop_min_scale: float = 0.08
    residual_scale: float = 1.0


#: The reference run scripts of Bayesian Prompt Learning (batch size 1).
DATASET_DEFAULTS: dict[str, DatasetDefaults] = {
    name: DatasetDefaults(particles, epochs) for name, (particles, epochs) in {
        "caltech101": (20, 20), "oxford_pets": (40, 20), "stanford_cars": (20, 40),
        "oxford_flowers": (10, 40), "food101": (20, 20), "fgvc_aircraft": (10, 10),
        "sun397": (20, 10), "dtd": (40, 10), "eurosat": (20, 60), "ucf101": (5, 20),
        "imagenet": (10, 10),
    }.items()
}
#: The offline world: batches of 16 with the learning rate scaled by 16 (linear scaling), so
#: the default run takes minutes on two CPU cores; milder crops, since 32-pixel images of one
#: object lose the object in a crop of 8% of the area; residuals on the scale of a token
#: embedding (std 0.02) rather than the reference's N(0, I), about 50 times larger.
DATASET_DEFAULTS.update({name: DatasetDefaults(10, 10, 16, 0.032, 0.5, 0.02)
                         for name in OFFLINE_DATASETS})
FALLBACK_DEFAULTS = DatasetDefaults(10, 10)


@dataclass
class RunConfig:
    """Every option of a run; None means 'the dataset's or model's default'."""

    dataset: str = "miniworld"
    root: str = str(default_data_root())
    model: str = "vpt_cond"
    backbone: str = "MiniCLIP"
    pretrained: str | None = None
    shots: int = 16
    seed: int = 1
    subsample: str = "base"
    epochs: int | None = None
    num_particles: int | None = None
    batch_size: int | None = None
    objective: str = "elbo"
    lr: float | None = None
    views: int = 8
    crop_min_scale: float | None = None
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    kl_weight: float = 1.0
    prior_scale: float = 1.0
    residual_scale: float | None = None
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "fp32"
    eval_batch_size: int = 64
    prompt_chunk: int | None = None
    text_memory_gb: float | None = None
    grad_checkpointing: bool = False
    eval_on: list[str] = field(default_factory=list)
    cache_dir: str = str(cache_dir())
    out: str | None = None

    def resolved(self) -> RunConfig:
        """A copy with dataset defaults filled in and the run folder named."""
        defaults = DATASET_DEFAULTS.get(self.dataset, FALLBACK_DEFAULTS)
        config = RunConfig(**asdict(self))
        config.num_particles = self.num_particles or defaults.num_particles
        config.epochs = defaults.epochs if self.epochs is None else self.epochs
        config.batch_size = self.batch_size or defaults.batch_size
        config.lr = self.lr or defaults.lr
        config.crop_min_scale = self.crop_min_scale or defaults.crop_min_scale
        config.residual_scale = self.residual_scale or defaults.residual_scale
        dataset_name = Path(self.dataset).name
        model_name = Path(self.model).stem
        config.out = self.out or str(Path("runs") / dataset_name / model_name /
                                     f"{self.subsample}_shots{self.shots}_seed{self.seed}")
        return config


def load_model_class(name: str) -> type[PromptModel]:
    """`models/<name>.py`, or any model file by path; its module attribute `Model`."""
    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"Model file not found: {path}.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif (MODELS_DIR / f"{name}.py").is_file():
        module = importlib.import_module(f"models.{name}")
    else:
        raise UserError(
            f"Unknown model '{name}'. Known models: {', '.join(known_models())}; or pass the "
            "path of a model file (a .py defining `Model`, a PromptModel subclass)."
        )
    model_class = getattr(module, "Model", None)
    if not (isinstance(model_class, type) and issubclass(model_class, PromptModel)):
        raise UserError(f"The model file of '{name}' defines no `Model` (a PromptModel class).")
    return model_class


def known_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.py") if not p.stem.startswith("_"))


def build_program(config: RunConfig, clip: FrozenCLIP, classnames: list[str],
                  template: str) -> PromptModel:
    prompt_config = PromptConfig(config.n_ctx, config.ctx_init, config.kl_weight,
                                 config.prior_scale, config.residual_scale, template,
                                 dict(config.options))
    return load_model_class(config.model)(clip, classnames, prompt_config).to(clip.device)


def split_datasets(config: RunConfig) -> tuple[Dataset, Dataset | None]:
    """The training classes' dataset (few-shot) and the held-out new classes, if any."""
    root = Path(config.root).expanduser()
    dataset = few_shot(load_dataset(config.dataset, root), config.shots, config.seed,
                       Path(config.cache_dir).expanduser() / "split_fewshot")
    if config.subsample == "all":
        return dataset, None
    return subsample_classes(dataset, "base"), subsample_classes(dataset, "new")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of images whose posterior-predictive mean (S, N, C) argmax is the label (N,)."""
    return 100.0 * (probs.mean(0).argmax(-1) == labels).float().mean().item()


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def evaluate(program: PromptModel, clip: FrozenCLIP, dataset: Dataset, config: RunConfig
             ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Accuracy (percent), predictive probabilities (S, N, C) and labels on the test split."""
    program.set_classes(dataset.classnames)
    cache = Path(config.cache_dir).expanduser() / "features"
    features = cached_features(clip, dataset.test, [0], cache)[0].to(clip.device)
    labels = torch.tensor([item.label for item in dataset.test])
    probs = predictive_probs(program, features, config.num_particles,
                             config.eval_batch_size).cpu()
    return accuracy(probs, labels), probs, labels


def write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def train_and_evaluate(config: RunConfig, resume: bool = False) -> dict | None:
    """Train on the base (or all) classes, evaluate base and new; write the run folder.

    `eval_on` datasets are evaluated on all their classes (cross-dataset transfer, or domain
    generalisation for a dataset with the same classes), as `transfer_acc`. Under torchrun
    every rank trains; rank 0 evaluates and returns the results, the other ranks return None.
    """
    config = config.resolved()
    load_model_class(config.model)  # an unknown model fails before anything is loaded
    distributed.check_batch_size(config.batch_size)
    out = Path(config.out)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not resume:
        raise UserError(
            f"{out} already holds a run. Pass --resume to continue it, or another --out."
        )
    if resume and checkpoint.exists():
        saved = json.loads((out / "config.json").read_text())
        changed = sorted(k for k in saved.keys() | asdict(config).keys()
                         if k not in EXECUTION_OPTIONS and saved.get(k) != asdict(config).get(k))
        if changed:
            raise UserError(f"--resume with other options than the run in {out}: {changed}.")
    with distributed.main_process_first():
        base, new = split_datasets(config)
        clip = load_run_clip(config, distributed.rank_device(config.device))
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(asdict(config), out / "config.json")

    pyro.set_rng_seed(config.seed)
    program = build_program(config, clip, base.classnames, base.template)
    cache = Path(config.cache_dir).expanduser() / "features"
    views = list(range(1, config.views + 1)) if config.views > 0 else [0]
    with distributed.main_process_first():
        features = cached_features(clip, base.train, views, cache, config.seed,
                                   config.crop_min_scale).to(clip.device)
    labels = torch.tensor([item.label for item in base.train], device=clip.device)
    train_config = TrainConfig(config.epochs, config.batch_size, config.num_particles,
                               config.objective, config.lr, seed=config.seed)
    started = time.perf_counter()
    history = train(program, features, labels, train_config, checkpoint,
                    run_identity(config, clip, base.classnames), resume)
    train_seconds = time.perf_counter() - started
    if not distributed.is_main_process():
        return None

    base_acc, _, _ = evaluate(program, clip, base, config)
    new_acc = evaluate(program, clip, new, config)[0] if new is not None else None
    transfer = {name: evaluate(program, clip, load_dataset(name, Path(config.root).expanduser()),
                               config)[0] for name in config.eval_on}
    results = {
        "base_acc": base_acc, "new_acc": new_acc,
        "hm": harmonic_mean(base_acc, new_acc) if new_acc is not None else None,
        "transfer_acc": transfer,
        "dataset": config.dataset, "model": config.model, "shots": config.shots,
        "seed": config.seed, "epochs": config.epochs, "num_particles": config.num_particles,
        "train_images": len(base.train), "train_seconds": round(train_seconds, 2),
        "world_size": distributed.world_size(),
        "loss_history": history,
    }
    write_json_atomic(results, out / "results.json")
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


def load_run(run_dir: Path, device: str | None = None
             ) -> tuple[RunConfig, PromptModel, FrozenCLIP, Dataset, Dataset | None]:
    """Rebuild a trained run: its config, program (parameters restored), CLIP and datasets."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run folder: no config.json there.")
    saved = json.loads(config_file.read_text())
    config = RunConfig(**{f.name: saved[f.name] for f in fields(RunConfig) if f.name in saved})
    if device:
        config.device = device
    base, new = split_datasets(config)
    clip = load_run_clip(config)
    pyro.clear_param_store()
    program = build_program(config, clip, base.classnames, base.template)
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        load_checkpoint(checkpoint, run_identity(config, clip, base.classnames), clip.device)
    return config, program, clip, base, new


def summary_line(results: dict) -> str:
    """The last line a run prints."""
    def percent(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.2f}%"
    return (f"base {percent(results['base_acc'])}  new {percent(results['new_acc'])}  "
            f"harmonic mean {percent(results['hm'])}")
