"""The SVI loop: per-image objective, the reference's optimiser and schedule, checkpoints.

Training minimises a per-image objective (`objectives.py`) with a PyTorch SGD optimiser over
Pyro's param store (Pyro's custom-objective pattern: an ELBO's `differentiable_loss` +
`loss.backward()`; any Pyro ELBO, `inference.elbos`), so the optimiser and its schedule are
exactly the reference's and checkpoint/resume is plain torch. The frozen CLIP is never
registered in the param store; only guide/prompt parameters are. `train` reads as its outline:
create the parameters, restore, then per epoch `svi_step` for every batch and `end_of_epoch`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from bayesprompt import distributed
from bayesprompt.errors import UserError
from bayesprompt.inference.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from bayesprompt.inference.objectives import Objective, make_objective
from bayesprompt.inference.training_log import TrainingLog
from bayesprompt.inference.variational import (
    GUIDE_GROUP,
    guide_optimizer,
    guide_parameter_names,
)
from bayesprompt.program.base import GROUP_OPTIMIZERS, OptimizerGroup, PromptModel, in_param_scope

#: A step whose loss exceeds this many times the first step's (at least 1 in size) diverged.
DIVERGENCE_FACTOR = 1e4


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are the reference's (Dassl SGD, cosine, warm-up)."""

    epochs: int = 10
    batch_size: int = 1
    num_particles: int = 10
    objective: str = "elbo"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = 1
    #: "adam": the guide's variational parameters get Adam at guide_lr on the same schedule
    #: (inference/variational.py); "sgd": the reference SGD like every other parameter.
    guide_optimizer: str = "sgd"
    guide_lr: float = 0.01
    elbo: str = "Trace_ELBO"


@dataclass
class TrainHistory:
    """Per-epoch training curves: the mean objective per image, and the mean value of each
    `pyro.factor` term of the model (e.g. E2MIM's "mi"; None in epochs where it was absent)."""

    loss: list[float] = field(default_factory=list)
    factors: dict[str, list[float | None]] = field(default_factory=dict)


def learning_rate(epoch: int, config: TrainConfig) -> float:
    """Constant warm-up at `warmup_lr`, then cosine from `lr` over all epochs (Dassl)."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    return 0.5 * config.lr * (1 + math.cos(math.pi * epoch / config.epochs))


class Diverged(UserError):
    """Training stopped because the loss or the parameters stopped being finite or exploded."""


def _diverged(epoch: int, step: int, what: str, checkpoint: Path | None,
              saved_epoch: int, lr: float) -> Diverged:
    kept = (f"The last good checkpoint (epoch {saved_epoch}) is kept in {checkpoint}. "
            if checkpoint is not None and saved_epoch else "No epoch had finished, so there "
            "is no checkpoint. ")
    return Diverged(
        f"Training diverged at epoch {epoch + 1}, step {step + 1}: {what}. {kept}"
        f"Lower --lr (it is {lr:g}) and start a new run in another --out folder."
    )


def group_optimizers(named: dict[str, torch.nn.Parameter], groups: tuple[OptimizerGroup, ...],
                     config: TrainConfig
                     ) -> tuple[torch.optim.Optimizer | None, dict[str, torch.optim.Optimizer]]:
    """The reference SGD over the parameters of no group, and one optimiser per group that
    holds parameters (a parameter belongs to the first group whose prefix its name has)."""
    members: dict[str, list[torch.nn.Parameter]] = {group.prefix: [] for group in groups}
    rest = []
    for name, parameter in named.items():
        prefix = next((g.prefix for g in groups if name.startswith(g.prefix)), None)
        (rest if prefix is None else members[prefix]).append(parameter)
    sgd = None
    if rest:
        sgd = torch.optim.SGD(rest, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    optimizers = {}
    for group in groups:
        if group.optimizer not in GROUP_OPTIMIZERS:
            raise UserError(f"Unknown optimiser '{group.optimizer}' for the parameters "
                            f"'{group.prefix}*'; choose one of {', '.join(GROUP_OPTIMIZERS)}.")
        if not members[group.prefix]:
            continue
        if group.optimizer == "adam":
            optimizers[group.prefix] = torch.optim.Adam(members[group.prefix], lr=group.lr)
        else:
            optimizers[group.prefix] = torch.optim.SGD(members[group.prefix], lr=group.lr,
                                                       momentum=config.momentum)
    return sgd, optimizers


class Optimizers:
    """The reference SGD (warm-up + cosine) over the parameters of no group, the optimisers of
    the model's `optimizer_groups` (constant rates) and, for the parameters named in
    `variational`, the guide's Adam on the same schedule scaled to `guide_lr`
    (inference/variational.py)."""

    def __init__(self, named: dict[str, torch.nn.Parameter],
                 groups: tuple[OptimizerGroup, ...], config: TrainConfig,
                 variational: set[str]) -> None:
        self.sgd, self.groups = group_optimizers(
            {k: v for k, v in named.items() if k not in variational}, groups, config)
        if variational:
            self.groups[GUIDE_GROUP] = guide_optimizer(named, variational, config.guide_lr)
        self.all = [o for o in (self.sgd, *self.groups.values()) if o is not None]

    def set_epoch(self, epoch: int, config: TrainConfig) -> None:
        for group in self.sgd.param_groups if self.sgd is not None else []:
            group["lr"] = learning_rate(epoch, config)
        guide = self.groups.get(GUIDE_GROUP)
        for group in guide.param_groups if guide is not None else []:
            group["lr"] = learning_rate(epoch, config) * config.guide_lr / config.lr

    def learning_rates(self) -> tuple[float | None, dict[str, float]]:
        """The reference SGD's learning rate (None without one) and each group's."""
        return (self.sgd.param_groups[0]["lr"] if self.sgd is not None else None,
                {prefix: o.param_groups[0]["lr"] for prefix, o in self.groups.items()})

    def state(self) -> dict:
        return {"optimizer": self.sgd.state_dict() if self.sgd is not None else None,
                "group_optimizers": {k: o.state_dict() for k, o in self.groups.items()}}

    def load_state(self, state: dict) -> None:
        if self.sgd is not None:
            self.sgd.load_state_dict(state["optimizer"])
        for prefix, optimizer in self.groups.items():
            optimizer.load_state_dict(state["group_optimizers"][prefix])


@dataclass
class EpochTotals:
    """Image-weighted sums of one epoch: the loss, and each factor's mean value."""

    loss: float = 0.0
    factors: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> sum of value * images
    factor_images: dict[str, int] = field(default_factory=dict)      # name -> images of those steps

    def add(self, loss: float, images: int, factor_means: dict[str, torch.Tensor],
            local_images: int) -> None:
        self.loss += loss * images
        for name, factor in factor_means.items():
            self.factors[name] = self.factors.get(name, 0.0) + factor * local_images
            self.factor_images[name] = self.factor_images.get(name, 0) + local_images


@dataclass
class Progress:
    """Where training stands: finished epochs' curves, the first step's loss (the divergence
    reference) and whether any update was made."""

    history: TrainHistory
    start_epoch: int = 0
    reference: float | None = None
    stepped: bool = False


def create_parameters(program: PromptModel, objective: Objective, features: torch.Tensor,
                      labels: torch.Tensor, config: TrainConfig) -> list[torch.Tensor]:
    """Call the objective once on a whole first batch (its dataset indices as the data plate's
    subsample), so that every parameter exists (those of batch-wise terms too); the parameters
    it created."""
    first = slice(0, config.batch_size)
    with program.batch_indices(torch.arange(features.shape[1], device=features.device)[first]):
        objective(features[0, first], labels[first], features.shape[1])
    return [p for _, p in pyro.get_param_store().named_parameters()]


def restore(program: PromptModel, checkpoint: Path | None, identity: dict, resume: bool,
            device: torch.device) -> tuple[Progress, dict | None]:
    """Where to start: from scratch, or (`resume` and a checkpoint exists) the checkpoint's
    epoch, whose parameters are copied into the store's (and an autoguide's buffers into its
    own). Also returns the checkpoint's state."""
    if not (resume and checkpoint is not None and checkpoint.exists()):
        return Progress(TrainHistory()), None
    state = load_checkpoint(checkpoint, identity, device)
    program.load_guide_buffers(state.get("guide_buffers", {}))
    return Progress(TrainHistory(**state["history"]), state["epoch"], state["reference_loss"],
                    stepped=state["epoch"] > 0), state


def svi_step(objective: Objective, optimizers: Optimizers, parameters: list[torch.Tensor],
             batch: torch.Tensor, labels: torch.Tensor, dataset_size: int, share: float,
             where: tuple[int, int], progress: Progress, checkpoint: Path | None,
             lr: float) -> tuple[torch.Tensor, float]:
    """One gradient step on a batch (B, D) of a dataset of `dataset_size` (run it inside the
    program's `batch_indices` of the batch, as `train` does): this rank's batch
    loss before the step, and the loss summed over ranks (a float). Raises `Diverged` where
    that loss stops being finite or explodes, so every rank stops at the same step."""
    epoch, step = where
    for optimizer in optimizers.all:
        optimizer.zero_grad()
    try:
        batch_loss = objective(batch, labels, dataset_size)
    except ValueError as error:  # a distribution refused the parameters
        if not progress.stepped:  # before any update: the model file's own fault
            raise
        what = f"a distribution got invalid parameters: {str(error).splitlines()[0]}"
        raise _diverged(epoch, step, what, checkpoint, len(progress.history.loss), lr) from None
    loss = share * batch_loss
    loss.backward()
    loss = distributed.all_reduce_gradients(parameters, loss)
    value = loss.item()
    progress.reference = value if progress.reference is None else progress.reference
    if not math.isfinite(value) or abs(value) > DIVERGENCE_FACTOR * max(abs(progress.reference),
                                                                         1.0):
        what = (f"the loss is {value:.4g} (non-finite, or more than {DIVERGENCE_FACTOR:g} "
                "times the first step's)")
        raise _diverged(epoch, step, what, checkpoint, len(progress.history.loss), lr)
    for optimizer in optimizers.all:
        optimizer.step()
    progress.stepped = True
    return batch_loss, value


def check_no_new_parameters(names: set[str], batch_size: int) -> None:
    """Refuse parameters created after the first call: the optimisers would never see them."""
    grown = set(pyro.get_param_store().keys()) - names
    if grown:
        raise UserError(
            f"The model created the parameters {sorted(grown)} after its first call, so the "
            "optimiser would never update them. Create every pyro.param and pyro.module in the "
            f"first call of model and guide (on a batch of {batch_size} images)."
        )


def end_of_epoch(program: PromptModel, epoch: int, totals: EpochTotals, features: torch.Tensor,
                 labels: torch.Tensor, progress: Progress, parameters: list[torch.Tensor],
                 optimizers: Optimizers, config: TrainConfig, checkpoint: Path | None,
                 identity: dict, log: TrainingLog | None) -> None:
    """Check the parameters, append the epoch's curves, after the last epoch let the program
    finish its training (`PromptModel.after_training`), write the epoch's log row and (rank 0)
    the checkpoint."""
    dataset_size = features.shape[1]
    history = progress.history
    if not all(bool(torch.isfinite(p).all()) for p in parameters):
        raise _diverged(epoch, math.ceil(dataset_size / config.batch_size) - 1,
                        "the parameters are no longer finite", checkpoint, len(history.loss),
                        config.lr)
    history.loss.append(totals.loss / dataset_size)
    for name in sorted(totals.factors.keys() | history.factors.keys()):
        curve = history.factors.setdefault(name, [None] * epoch)
        curve.append(float(totals.factors[name] / totals.factor_images[name])
                     if name in totals.factors else None)
    if epoch + 1 == config.epochs:
        program.after_training(features, labels)
    if log is not None:
        log.write("epoch", epoch + 1, *optimizers.learning_rates())
    if checkpoint is not None and distributed.is_main_process():
        save_checkpoint(checkpoint, {
            "epoch": epoch + 1, "history": asdict(history), "identity": identity,
            "train_config": asdict(config), **optimizers.state(),
            "reference_loss": progress.reference,
            "guide_buffers": {name: value.cpu()
                              for name, value in program.guide_buffers().items()}},
            features.device)


@in_param_scope
def train(program: PromptModel, features: torch.Tensor, labels: torch.Tensor,
          config: TrainConfig, checkpoint: Path | None = None, identity: dict | None = None,
          resume: bool = False, log: TrainingLog | None = None) -> TrainHistory:
    """SVI on cached features (V views, N images, D) with labels (N,); returns the curves.

    Parameters of the model's `optimizer_groups` get their own optimiser at a constant rate;
    all others the reference SGD with warm-up and cosine schedule. After every epoch the param
    store, every optimiser's state and the RNG states (CPU, and every CUDA device when training
    on CUDA) are written atomically to `checkpoint`; `resume=True` continues from it to the
    same result as an uninterrupted run. A non-finite or exploding loss stops training with
    `Diverged`, leaving the last good checkpoint in place.
    Under torchrun (`bayesprompt.distributed`) every rank starts from rank 0's parameters, takes
    its slice of each global batch of `config.batch_size` images, and the share-weighted
    gradients are summed over ranks before the step; rank 0 alone writes the checkpoint.
    The factor history is each rank's own (rank 0's is the one written).
    Training starts from new parameters, in the program's own param store (`param_scope`).
    `log` receives every step's loss and terms (`Objective.terms`) and writes its rows
    (metrics.jsonl: every `log.log_every` steps and after each epoch, before the checkpoint).
    """
    views, dataset_size, _ = features.shape
    identity = identity or {}
    pyro.clear_param_store()  # the program's store, inside its param_scope
    program.reset_autoguide()
    torch.manual_seed(config.seed)
    objective = make_objective(program, config.objective, config.num_particles, config.elbo)
    parameters = create_parameters(program, objective, features, labels, config)
    names = set(pyro.get_param_store().keys())
    if not parameters or config.epochs == 0:
        return TrainHistory()
    distributed.broadcast_parameters(parameters)
    progress, state = restore(program, checkpoint, identity, resume, features.device)
    named = dict(pyro.get_param_store().named_parameters())
    parameters = list(named.values())
    first = slice(0, config.batch_size)
    variational = (guide_parameter_names(program, features[0, first], labels[first],
                                         dataset_size)
                   if config.guide_optimizer == "adam" else set())
    optimizers = Optimizers(named, program.optimizer_groups, config, variational)
    if progress.start_epoch:
        optimizers.load_state(state)
        set_rng_state(state["rng"], state["cuda_rng"])

    steps = math.ceil(dataset_size / config.batch_size)
    if log is not None:
        log.start(progress.start_epoch, steps, dataset_size)
    bar = tqdm(total=config.epochs * steps, initial=progress.start_epoch * steps, desc="SVI",
               unit="step", dynamic_ncols=True, disable=not distributed.is_main_process())
    try:
        for epoch in range(progress.start_epoch, config.epochs):
            distributed.seed_rank_stream(config.seed, epoch)
            optimizers.set_epoch(epoch, config)
            order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            permutation = torch.randperm(dataset_size, generator=order)
            view_of_image = torch.randint(views, (dataset_size,), generator=order)
            totals = EpochTotals()
            for step in range(steps):
                index = permutation[step * config.batch_size:(step + 1) * config.batch_size]
                local, share = distributed.shard(index)
                with program.batch_indices(local.to(features.device)):
                    batch_loss, value = svi_step(
                        objective, optimizers, parameters, features[view_of_image[local], local],
                        labels[local], dataset_size, share, (epoch, step), progress, checkpoint,
                        config.lr)
                check_no_new_parameters(names, config.batch_size)
                totals.add(value, len(index), objective.terms.factor_means, len(local))
                if log is not None:
                    log.add(batch_loss, objective.terms, share, len(index))
                    if log.step_row_due():
                        log.write("step", epoch + 1, *optimizers.learning_rates())
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")
            end_of_epoch(program, epoch, totals, features, labels, progress, parameters,
                         optimizers, config, checkpoint, identity, log)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return progress.history
