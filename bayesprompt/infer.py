"""Inference: objectives, the SVI loop with checkpoints and resume, the posterior predictive.

Training minimises a per-image objective with a PyTorch SGD optimiser over Pyro's param store
(Pyro's custom-objective pattern: `Trace_ELBO.differentiable_loss` + `loss.backward()`), so the
optimiser and its schedule are exactly the reference's and checkpoint/resume is plain torch.
The frozen CLIP is never registered in the param store; only guide/prompt parameters are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from bayesprompt import distributed
from bayesprompt.errors import UserError
from bayesprompt.prompt_model import PromptModel

#: Weight of the KL term of the reference implementation's objective.
PAPER_KL_WEIGHT = 1e-3
OBJECTIVES = ("elbo", "paper")

Objective = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


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


def particle_traces(program: PromptModel, num_particles: int, *args
                    ) -> tuple[poutine.Trace, poutine.Trace]:
    """Guide and replayed model traces with `num_particles` vectorized samples (dim -2)."""
    particles = pyro.plate("particles", num_particles, dim=-2)
    guide_trace = poutine.trace(particles(program.guide)).get_trace(*args)
    model = poutine.replay(particles(program.model), trace=guide_trace)
    return guide_trace, poutine.trace(model).get_trace(*args)


def elbo_objective(program: PromptModel, num_particles: int) -> Objective:
    """Negative ELBO per training image, by `Trace_ELBO` with vectorized particles.

    The KL weight enters through `poutine.scale` on the latent sites of the model file.
    """
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                      max_plate_nesting=1)

    def loss(features: torch.Tensor, labels: torch.Tensor, dataset_size: int) -> torch.Tensor:
        return elbo.differentiable_loss(program.model, program.guide, features, labels,
                                        dataset_size) / dataset_size

    return loss


def paper_objective(program: PromptModel, num_particles: int) -> Objective:
    """The reference implementation's loss, averaged over the images of a batch.

    Per image: -(logsumexp_l log p(y | x, r_l) - log L) + 0.001 * KL(q || p) averaged over the
    context dimension. Point-estimate (Delta) sites add no KL term, as in CoOp's cross-entropy.
    Other observed sites (`pyro.factor` terms of a model file, e.g. E2MIM's) enter with their
    mean over particles and images.
    """

    def loss(features: torch.Tensor, labels: torch.Tensor, dataset_size: int) -> torch.Tensor:
        guide_trace, model_trace = particle_traces(program, num_particles, features, labels,
                                                   dataset_size)
        y = model_trace.nodes["y"]
        log_lik = y["fn"].log_prob(y["value"])                           # (L, B)
        nll = -(torch.logsumexp(log_lik, dim=0) - math.log(num_particles))
        kl = torch.zeros((), device=features.device)
        for name in program.latent_sites:
            posterior = guide_trace.nodes[name]["fn"]
            if isinstance(posterior, pyro.distributions.Delta):
                continue
            prior = model_trace.nodes[name]["fn"]
            kl = kl + (kl_divergence(posterior, prior) / posterior.event_shape.numel()).mean()
        factors = sum((-site["fn"].log_prob(site["value"]).mean()
                       for name, site in model_trace.nodes.items()
                       if site["type"] == "sample" and site["is_observed"] and name != "y"),
                      torch.zeros((), device=features.device))
        return nll.mean() + PAPER_KL_WEIGHT * kl + factors

    return loss


def make_objective(program: PromptModel, config: TrainConfig) -> Objective:
    if config.objective not in OBJECTIVES:
        raise UserError(f"Unknown objective '{config.objective}'; choose one of {OBJECTIVES}.")
    particles = config.num_particles if program.stochastic else 1
    build = elbo_objective if config.objective == "elbo" else paper_objective
    return build(program, particles)


def learning_rate(epoch: int, config: TrainConfig) -> float:
    """Constant warm-up at `warmup_lr`, then cosine from `lr` over all epochs (Dassl)."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    return 0.5 * config.lr * (1 + math.cos(math.pi * epoch / config.epochs))


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, identity: dict, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint, check it belongs to this run (`identity`), restore the param store
    with its parameters on `device`."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    mismatched = [key for key in identity if state["identity"].get(key) != identity[key]]
    if mismatched:
        details = "; ".join(f"{k}: checkpoint has {state['identity'].get(k)!r}, "
                            f"this run has {identity[k]!r}" for k in mismatched)
        raise UserError(
            f"The checkpoint {path} belongs to another run ({details}). Use a new --out "
            "folder, or the options the checkpoint was trained with."
        )
    params = state["param_store"]["params"]
    for name, value in params.items():
        params[name] = value.detach().to(device).requires_grad_(value.requires_grad)
    pyro.get_param_store().set_state(state["param_store"])
    return state


def train(program: PromptModel, features: torch.Tensor, labels: torch.Tensor,
          config: TrainConfig, checkpoint: Path | None = None, identity: dict | None = None,
          resume: bool = False) -> list[float]:
    """SVI on cached features (V views, N images, D) with labels (N,); returns epoch losses.

    After every epoch the param store, optimiser and RNG state are written atomically to
    `checkpoint`; `resume=True` continues from it to the same result as an uninterrupted run.
    Under torchrun (`bayesprompt.distributed`) every rank starts from rank 0's parameters, takes
    its slice of each global batch of `config.batch_size` images, and the share-weighted
    gradients are summed over ranks before the step; rank 0 alone writes the checkpoint.
    """
    views, dataset_size, _ = features.shape
    identity = identity or {}
    pyro.clear_param_store()
    torch.manual_seed(config.seed)
    objective = make_objective(program, config)
    objective(features[0, :1], labels[:1], dataset_size)  # creates the parameters
    parameters = [p for _, p in pyro.get_param_store().named_parameters()]
    if not parameters or config.epochs == 0:
        return []
    distributed.broadcast_parameters(parameters)

    history: list[float] = []
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, identity, features.device)
        parameters = [p for _, p in pyro.get_param_store().named_parameters()]
        start_epoch, history = state["epoch"], state["history"]
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    if start_epoch:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])

    steps = math.ceil(dataset_size / config.batch_size)
    progress = tqdm(total=config.epochs * steps, initial=start_epoch * steps, desc="SVI",
                    unit="step", dynamic_ncols=True, disable=not distributed.is_main_process())
    for epoch in range(start_epoch, config.epochs):
        distributed.seed_rank_stream(config.seed, epoch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, config)
        order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        permutation = torch.randperm(dataset_size, generator=order)
        view_of_image = torch.randint(views, (dataset_size,), generator=order)
        total = 0.0
        for step in range(steps):
            index = permutation[step * config.batch_size:(step + 1) * config.batch_size]
            local, share = distributed.shard(index)
            batch = features[view_of_image[local], local]
            optimizer.zero_grad()
            loss = share * objective(batch, labels[local], dataset_size)
            loss.backward()
            loss = distributed.all_reduce_gradients(parameters, loss)
            optimizer.step()
            total += loss.item() * len(index)
            progress.update()
            progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
        history.append(total / dataset_size)
        if checkpoint is not None and distributed.is_main_process():
            save_atomic({"epoch": epoch + 1, "history": history, "identity": identity,
                         "train_config": asdict(config),
                         "param_store": pyro.get_param_store().get_state(),
                         "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
                        checkpoint)
    progress.close()
    return history


@torch.no_grad()
def predictive_probs(program: PromptModel, features: torch.Tensor, num_samples: int,
                     batch_size: int = 64) -> torch.Tensor:
    """Class probabilities under S guide samples: features (N, D) -> (S, N, C).

    S is 1 for point-estimate models; the posterior predictive is the mean over S. At most
    `batch_size` images a batch, fewer where their S * C prompts exceed the text budget.
    """
    samples = num_samples if program.stochastic else 1
    batch_size = min(batch_size, program.clip.images_per_batch(samples * len(program.classnames)))
    chunks = []
    for start in range(0, features.shape[0], batch_size):
        _, model_trace = particle_traces(program, samples, features[start:start + batch_size])
        chunks.append(model_trace.nodes["y"]["fn"].probs)
    return torch.cat(chunks, dim=1)
