"""One training run, from options to a run folder, and back from a run folder to a model.

A run folder holds `config.json` (every resolved option), `fewshot.json` (the exact few-shot
train and val lists), `checkpoint.pt` (param store, optimiser and RNG states, written
atomically after every epoch), `metrics.jsonl` (training curves, `training_log.py`),
`loss_curve.png`, `tensorboard/` (with --tensorboard) and `results.json`. Under torchrun,
rank 0 alone writes them (and the data and feature caches, before the other ranks read them)
and evaluates.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import pyro
import torch

from bayesprompt import distributed
from bayesprompt.data.datasets import load_dataset
from bayesprompt.data.features import cached_features
from bayesprompt.errors import RunInterrupted, UserError
from bayesprompt.files import write_json
from bayesprompt.inference.elbos import check_program, default_elbo
from bayesprompt.inference.loss_curve import write_loss_curve
from bayesprompt.inference.svi import TrainConfig, train
from bayesprompt.inference.training_log import TrainingLog, check_tensorboard
from bayesprompt.metrics import harmonic_mean
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.evaluate import evaluate, new_class_metrics
from bayesprompt.runs.folder import check_resume, holds_run
from bayesprompt.runs.inputs import load_run_clip, run_identity, split_datasets
from bayesprompt.runs.lock import RunFolderLock
from bayesprompt.runs.model_files import build_program, load_model_class
from bayesprompt.runs.trust import check_model_file, record_model_file
from bayesprompt.selective import results_entries


def train_and_evaluate(config: RunConfig, resume: bool = False) -> dict | None:
    """Train on the base (or all) classes, evaluate base and new; write the run folder.

    `eval_on` datasets are evaluated on all their classes (cross-dataset transfer, or domain
    generalisation for a dataset with the same classes), as `transfer_acc`. Under torchrun
    every rank trains; rank 0 evaluates and returns the results, the other ranks return None.
    Ctrl-C becomes `RunInterrupted`, which says how to continue. The run folder is locked
    (`runs/lock.py`) from its first write to the end.
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
    elbo = config.elbo or default_elbo(program)
    check_program(program, config.objective, elbo, len(base.train))
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
                               config.objective, config.lr, seed=config.seed, elbo=elbo,
                               guide_optimizer=(config.guide_optimizer
                                                if config.objective == "elbo" else "sgd"),
                               guide_lr=config.guide_lr)
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
    base_acc, base_probs, base_labels = evaluate(program, clip, base, config, shared)
    splits = {"base": (base_probs, base_labels)}  # split -> (probs, labels) for selective.py
    new_acc, metrics = None, {"new_ece": None, "new_nll": None, "mi_auroc_new_vs_base": None}
    if new is not None:
        new_acc, new_probs, new_labels = evaluate(program, clip, new, config, shared)
        metrics = new_class_metrics(program, base_probs, new_probs, new_labels)
        splits["new"] = (new_probs, new_labels)
    transfer = {}
    for name, dataset in transfer_sets.items():
        transfer[name], probs, labels = evaluate(program, clip, dataset, config, shared)
        splits[name] = (probs, labels)
    results = {
        "base_acc": base_acc, "new_acc": new_acc,
        "hm": harmonic_mean(base_acc, new_acc) if new_acc is not None else None,
        **metrics, "transfer_acc": transfer, **results_entries(splits),
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


