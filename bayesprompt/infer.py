"""Inference: objectives, the SVI loop with checkpoints and resume, the posterior predictive.

Training minimises a per-image objective with a PyTorch SGD optimiser over Pyro's param store
(Pyro's custom-objective pattern: `Trace_ELBO.differentiable_loss` + `loss.backward()`), so the
optimiser and its schedule are exactly the reference's and checkpoint/resume is plain torch.
The frozen CLIP is never registered in the param store; only guide/prompt parameters are.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import pyro.util
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from bayesprompt import distributed
from bayesprompt.errors import UserError, first_line
from bayesprompt.files import save_torch
from bayesprompt.prompt_model import OptimizerGroup, PromptModel, in_param_scope
from bayesprompt.training_log import TrainingLog

#: Weight of the KL term of the reference implementation's objective.
PAPER_KL_WEIGHT = 1e-3
OBJECTIVES = ("elbo", "paper")
GROUP_OPTIMIZERS = ("adam", "sgd")
#: A step whose loss exceeds this many times the first step's (at least 1 in size) diverged.
DIVERGENCE_FACTOR = 1e4
#: Keys every checkpoint holds.
CHECKPOINT_KEYS = ("epoch", "history", "identity", "train_config", "param_store", "optimizer",
                   "group_optimizers", "rng", "cuda_rng", "reference_loss")

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


@dataclass
class TrainHistory:
    """Per-epoch training curves: the mean objective per image, and the mean value of each
    `pyro.factor` term of the model (e.g. E2MIM's "mi"; None in epochs where it was absent)."""

    loss: list[float] = field(default_factory=list)
    factors: dict[str, list[float | None]] = field(default_factory=dict)


def is_factor_site(name: str, site: dict) -> bool:
    """An observed sample site other than the label `y`: a `pyro.factor` term."""
    return site["type"] == "sample" and site["is_observed"] and name != "y"


@dataclass
class ObjectiveTerms:
    """What one evaluation of a per-image objective is made of (detached scalar tensors).

    `loss = nll + kl + sum(factors.values())` up to float rounding, each as it enters the loss:
    `nll` the expected negative log-likelihood of the labels (the `y` site), `kl` the latent
    sites' term (ELBO: the Monte Carlo estimate of E_q[log q - log p] with its scaling, for a
    Delta guide -log prior; "paper": 0.001 * KL), `factors` each `pyro.factor` term.
    `factor_means`: each factor's unscaled value, its mean over particles and images (the
    factor history). `posterior_scale`: site -> (3,) mean, min and max of the guide's scale
    (standard deviation) over particles, images and dimensions, for each non-Delta latent site.
    """

    nll: torch.Tensor
    kl: torch.Tensor
    factors: dict[str, torch.Tensor]
    factor_means: dict[str, torch.Tensor]
    posterior_scale: dict[str, torch.Tensor]


class Objective:
    """A per-image training objective: `objective(features (B, D), labels (B,), N)` is the
    scalar loss of a batch from a dataset of N images; `terms` holds what the last call's loss
    is made of, read from the traces that computed it (no further pass)."""

    def __init__(self, evaluate: Callable[[torch.Tensor, torch.Tensor, int],
                                          tuple[torch.Tensor, ObjectiveTerms]]) -> None:
        self._evaluate = evaluate
        self.terms: ObjectiveTerms | None = None

    def __call__(self, features: torch.Tensor, labels: torch.Tensor, dataset_size: int
                 ) -> torch.Tensor:
        loss, self.terms = self._evaluate(features, labels, dataset_size)
        return loss


def factor_means(model_trace: poutine.Trace) -> dict[str, torch.Tensor]:
    """The mean (over particles and images) of every factor term's unscaled value."""
    return {name: site["fn"].log_prob(site["value"]).detach().mean()
            for name, site in model_trace.nodes.items() if is_factor_site(name, site)}


def posterior_scales(program: PromptModel, guide_trace: poutine.Trace
                     ) -> dict[str, torch.Tensor]:
    """site -> (3,) mean, min, max of the guide distribution's standard deviation, for every
    latent site whose guide is not a point (Delta) and has one."""
    scales = {}
    for name in program.latent_sites:
        posterior = guide_trace.nodes[name]["fn"]
        if isinstance(posterior, pyro.distributions.Delta):
            continue
        try:
            scale = posterior.stddev.detach()
        except NotImplementedError:
            continue
        scales[name] = torch.stack([scale.mean(), scale.min(), scale.max()])
    return scales


def particle_traces(program: PromptModel, num_particles: int, *args
                    ) -> tuple[poutine.Trace, poutine.Trace]:
    """Guide and replayed model traces with `num_particles` vectorized samples (dim -2)."""
    particles = pyro.plate("particles", num_particles, dim=-2)
    guide_trace = poutine.trace(particles(program.guide)).get_trace(*args)
    model = poutine.replay(particles(program.model), trace=guide_trace)
    return guide_trace, poutine.trace(model).get_trace(*args)


class _TraceKeepingELBO(Trace_ELBO):
    """Trace_ELBO that keeps the (model, guide) traces of its last estimate (one pair with
    vectorized particles), with the log-probabilities it computed on them."""

    traces: tuple[poutine.Trace, poutine.Trace] | None = None

    def _get_traces(self, model, guide, args, kwargs):
        for traces in super()._get_traces(model, guide, args, kwargs):
            self.traces = traces
            yield traces


def elbo_terms(program: PromptModel, model_trace: poutine.Trace, guide_trace: poutine.Trace,
               normaliser: float, device: torch.device) -> ObjectiveTerms:
    """The negative ELBO's split, from Trace_ELBO's traces: every sample site's (scaled)
    `log_prob_sum`, divided by `normaliser` (particles x N), as Trace_ELBO sums them."""
    zero = torch.zeros((), device=device)
    nll, kl, factors = zero, zero, {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        term = -site["log_prob_sum"].detach() / normaliser
        if name == "y":
            nll = nll + term
        elif site["is_observed"]:
            factors[name] = term
        else:
            kl = kl + term
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            kl = kl + site["log_prob_sum"].detach() / normaliser
    return ObjectiveTerms(nll, kl, factors, factor_means(model_trace),
                          posterior_scales(program, guide_trace))


def elbo_objective(program: PromptModel, num_particles: int) -> Objective:
    """Negative ELBO per training image, by `Trace_ELBO` with vectorized particles.

    The KL weight enters through `poutine.scale` on the latent sites of the model file.
    """
    elbo = _TraceKeepingELBO(num_particles=num_particles, vectorize_particles=True,
                             max_plate_nesting=1)

    def evaluate(features: torch.Tensor, labels: torch.Tensor, dataset_size: int
                 ) -> tuple[torch.Tensor, ObjectiveTerms]:
        loss = elbo.differentiable_loss(program.model, program.guide, features, labels,
                                        dataset_size) / dataset_size
        model_trace, guide_trace = elbo.traces
        return loss, elbo_terms(program, model_trace, guide_trace, num_particles * dataset_size,
                                features.device)

    return Objective(evaluate)


def paper_objective(program: PromptModel, num_particles: int) -> Objective:
    """The reference implementation's loss, averaged over the images of a batch.

    Per image: -(logsumexp_l log p(y | x, r_l) - log L) + 0.001 * KL(q || p) averaged over the
    context dimension. Point-estimate (Delta) sites add no KL term, as in CoOp's cross-entropy.
    Other observed sites (`pyro.factor` terms of a model file, e.g. E2MIM's) enter with their
    mean over particles and images.
    """

    def evaluate(features: torch.Tensor, labels: torch.Tensor, dataset_size: int
                 ) -> tuple[torch.Tensor, ObjectiveTerms]:
        guide_trace, model_trace = particle_traces(program, num_particles, features, labels,
                                                   dataset_size)
        y = model_trace.nodes["y"]
        log_lik = y["fn"].log_prob(y["value"])                           # (L, B)
        nll = -(torch.logsumexp(log_lik, dim=0) - math.log(num_particles)).mean()
        kl = torch.zeros((), device=features.device)
        for name in program.latent_sites:
            posterior = guide_trace.nodes[name]["fn"]
            if isinstance(posterior, pyro.distributions.Delta):
                continue
            prior = model_trace.nodes[name]["fn"]
            kl = kl + (kl_divergence(posterior, prior) / posterior.event_shape.numel()).mean()
        factors = {name: -site["fn"].log_prob(site["value"]).mean()
                   for name, site in model_trace.nodes.items() if is_factor_site(name, site)}
        loss = nll + PAPER_KL_WEIGHT * kl + sum(factors.values(),
                                                torch.zeros((), device=features.device))
        terms = ObjectiveTerms(nll.detach(), PAPER_KL_WEIGHT * kl.detach(),
                               {name: term.detach() for name, term in factors.items()},
                               factor_means(model_trace), posterior_scales(program, guide_trace))
        return loss, terms

    return Objective(evaluate)


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


class Diverged(UserError):
    """Training stopped because the loss or the parameters stopped being finite or exploded."""


def _corrupt(path: Path, problem: str) -> UserError:
    return UserError(
        f"The checkpoint {path} cannot be used: {problem}. It may have been cut short by a full "
        "disk or a copy that did not finish. Restore it from a backup, or delete it (and the "
        "run folder's results) and train again."
    )


def load_checkpoint(path: Path, identity: dict, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint (tensors and plain containers only: `weights_only=True`), check it
    belongs to this run (`identity`) and restore the values of the param store, on `device`.

    Run it inside the program's `param_scope()`, whose store must already hold the program's
    parameters (`PromptModel.initialize_parameters`), so that their constraints come from the
    program, not from the file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # torch names a refused class or function
            raise _corrupt(path, "it is truncated, corrupt or not a checkpoint "
                           f"({first_line(error)})") from None
        raise UserError(
            f"The checkpoint {path} is refused: besides tensors it holds pickled Python objects, "
            "and loading those could run code from the file. The checkpoints this project "
            "writes hold tensors and plain containers only, so this one was written by other "
            "code or altered. Use a run folder from a source you trust, or delete the "
            "checkpoint (and the run folder's results) and train again.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise _corrupt(path, f"it is truncated, corrupt or not a checkpoint ({error})") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise _corrupt(path, f"it lacks some of {', '.join(CHECKPOINT_KEYS)}")
    mismatched = [key for key in identity if state["identity"].get(key) != identity[key]]
    if mismatched:
        details = "; ".join(f"{k}: checkpoint has {state['identity'].get(k)!r}, "
                            f"this run has {identity[k]!r}" for k in mismatched)
        raise UserError(
            f"The checkpoint {path} belongs to another run ({details}). Use a new --out "
            "folder, or the options the checkpoint was trained with."
        )
    store = pyro.get_param_store()
    current = store.get_state()
    saved = state["param_store"]
    if set(saved) != set(current["params"]):
        raise UserError(
            f"The checkpoint {path} holds the parameters {sorted(saved)}, but this model has "
            f"{sorted(current['params'])}: it was written by another version of the model "
            "file. Use a new --out folder, or the model file it was trained with."
        )
    params = {name: value.detach().to(device).requires_grad_(True)
              for name, value in saved.items()}
    store.set_state({"params": params, "constraints": current["constraints"]})
    return state


def _rng_state(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU RNG state, and the states of every CUDA device when training on CUDA."""
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return torch.get_rng_state(), cuda


def _set_rng_state(cpu: torch.Tensor, cuda: list[torch.Tensor]) -> None:
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def _diverged(epoch: int, step: int, what: str, checkpoint: Path | None,
              saved_epoch: int, lr: float) -> Diverged:
    kept = (f"The last good checkpoint (epoch {saved_epoch}) is kept in {checkpoint}. "
            if checkpoint is not None and saved_epoch else "No epoch had finished, so there "
            "is no checkpoint. ")
    return Diverged(
        f"Training diverged at epoch {epoch + 1}, step {step + 1}: {what}. {kept}"
        f"Lower --lr (it is {lr:g}) and start a new run in another --out folder."
    )


def _parameters_finite(parameters: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in parameters)


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


def _learning_rates(sgd: torch.optim.Optimizer | None, groups: dict[str, torch.optim.Optimizer]
                    ) -> tuple[float | None, dict[str, float]]:
    """The reference SGD's learning rate (None without one) and each group's."""
    return (sgd.param_groups[0]["lr"] if sgd is not None else None,
            {prefix: optimizer.param_groups[0]["lr"] for prefix, optimizer in groups.items()})


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
    gradients are summed over ranks before the step; rank 0 alone writes the checkpoint. The
    divergence check reads the loss summed over ranks, so every rank stops at the same step.
    The factor history is each rank's own (rank 0's is the one written).
    Training starts from new parameters, in the program's own param store (`param_scope`).
    `log` receives every step's loss and terms (`Objective.terms`) and writes its rows
    (metrics.jsonl: every `log.log_every` steps and after each epoch, before the checkpoint).
    """
    views, dataset_size, _ = features.shape
    identity = identity or {}
    pyro.clear_param_store()  # the program's store, inside its param_scope
    torch.manual_seed(config.seed)
    objective = make_objective(program, config)
    first = slice(0, config.batch_size)  # a whole batch: parameters of batch-wise terms too
    objective(features[0, first], labels[first], dataset_size)  # creates the parameters
    names = set(pyro.get_param_store().keys())
    parameters = [p for _, p in pyro.get_param_store().named_parameters()]
    if not parameters or config.epochs == 0:
        return TrainHistory()
    distributed.broadcast_parameters(parameters)

    history = TrainHistory()
    start_epoch, reference = 0, None
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, identity, features.device)
        start_epoch, history = state["epoch"], TrainHistory(**state["history"])
        reference = state["reference_loss"]
    named = dict(pyro.get_param_store().named_parameters())
    parameters = list(named.values())
    sgd, groups = group_optimizers(named, program.optimizer_groups, config)
    if start_epoch:
        if sgd is not None:
            sgd.load_state_dict(state["optimizer"])
        for prefix, optimizer in groups.items():
            optimizer.load_state_dict(state["group_optimizers"][prefix])
        _set_rng_state(state["rng"], state["cuda_rng"])
    optimizers = [o for o in (sgd, *groups.values()) if o is not None]

    steps = math.ceil(dataset_size / config.batch_size)
    if log is not None:
        log.start(start_epoch, steps, dataset_size)
    stepped = start_epoch > 0
    progress = tqdm(total=config.epochs * steps, initial=start_epoch * steps, desc="SVI",
                    unit="step", dynamic_ncols=True, disable=not distributed.is_main_process())
    try:
        for epoch in range(start_epoch, config.epochs):
            distributed.seed_rank_stream(config.seed, epoch)
            for group in sgd.param_groups if sgd is not None else []:
                group["lr"] = learning_rate(epoch, config)
            order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            permutation = torch.randperm(dataset_size, generator=order)
            view_of_image = torch.randint(views, (dataset_size,), generator=order)
            total = 0.0
            factor_totals: dict[str, torch.Tensor] = {}      # name -> sum of value * images
            factor_images: dict[str, int] = {}                # name -> images of those steps
            for step in range(steps):
                index = permutation[step * config.batch_size:(step + 1) * config.batch_size]
                local, share = distributed.shard(index)
                batch = features[view_of_image[local], local]
                for optimizer in optimizers:
                    optimizer.zero_grad()
                try:
                    batch_loss = objective(batch, labels[local], dataset_size)
                    loss = share * batch_loss
                except ValueError as error:  # a distribution refused the parameters
                    if not stepped:  # before any update: the model file's own fault
                        raise
                    what = ("a distribution got invalid parameters: "
                            f"{str(error).splitlines()[0]}")
                    raise _diverged(epoch, step, what, checkpoint, len(history.loss),
                                    config.lr) from None
                loss.backward()
                loss = distributed.all_reduce_gradients(parameters, loss)
                value = loss.item()
                reference = value if reference is None else reference
                if not math.isfinite(value) or abs(value) > DIVERGENCE_FACTOR * max(abs(reference),
                                                                                     1.0):
                    what = (f"the loss is {value:.4g} (non-finite, or more than "
                            f"{DIVERGENCE_FACTOR:g} times the first step's)")
                    raise _diverged(epoch, step, what, checkpoint, len(history.loss), config.lr)
                for optimizer in optimizers:
                    optimizer.step()
                stepped = True
                grown = set(pyro.get_param_store().keys()) - names
                if grown:
                    raise UserError(
                        f"The model created the parameters {sorted(grown)} after its first call, "
                        "so the optimiser would never update them. Create every pyro.param and "
                        "pyro.module in the first call of model and guide (on a batch of "
                        f"{config.batch_size} images)."
                    )
                total += value * len(index)
                for name, factor in objective.terms.factor_means.items():
                    factor_totals[name] = factor_totals.get(name, 0.0) + factor * len(local)
                    factor_images[name] = factor_images.get(name, 0) + len(local)
                if log is not None:
                    log.add(batch_loss, objective.terms, share, len(index))
                    if log.step_row_due():
                        log.write("step", epoch + 1, *_learning_rates(sgd, groups))
                progress.update()
                progress.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")
            if not _parameters_finite(parameters):
                raise _diverged(epoch, steps - 1, "the parameters are no longer finite", checkpoint,
                                len(history.loss), config.lr)
            history.loss.append(total / dataset_size)
            for name in sorted(factor_totals.keys() | history.factors.keys()):
                curve = history.factors.setdefault(name, [None] * epoch)
                curve.append(float(factor_totals[name] / factor_images[name])
                             if name in factor_totals else None)
            if log is not None:
                log.write("epoch", epoch + 1, *_learning_rates(sgd, groups))
            if checkpoint is not None and distributed.is_main_process():
                cpu_rng, cuda_rng = _rng_state(features.device)
                params = {name: value.detach().cpu()
                          for name, value in pyro.get_param_store().get_state()["params"].items()}
                save_torch(checkpoint, {
                    "epoch": epoch + 1, "history": asdict(history), "identity": identity,
                    "train_config": asdict(config), "param_store": params,
                    "optimizer": sgd.state_dict() if sgd is not None else None,
                    "group_optimizers": {k: o.state_dict() for k, o in groups.items()},
                    "rng": cpu_rng, "cuda_rng": cuda_rng, "reference_loss": reference})
    finally:
        progress.close()
        if log is not None:
            log.close()
    return history


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with Pyro's RNGs (torch, random, numpy) seeded by `seed`; afterwards the
    caller's states are back, so an evaluation never shifts what comes after it."""
    state = pyro.util.get_rng_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        pyro.set_rng_seed(seed)
        try:
            yield
        finally:
            pyro.util.set_rng_state(state)


def per_image_sites(program: PromptModel, features: torch.Tensor) -> tuple[str, ...]:
    """Latent sites of the model that sit inside the `images` plate (one value per image)."""
    trace = poutine.trace(program.model).get_trace(features[:1])
    return tuple(name for name in program.latent_sites
                 if any(f.name == "images" for f in trace.nodes[name]["cond_indep_stack"]))


@torch.no_grad()
def guide_samples(program: PromptModel, features: torch.Tensor, num_samples: int
                  ) -> dict[str, torch.Tensor]:
    """Latent samples from the guide on features (N, D): site -> (S, *value shape)."""
    if not program.latent_sites:
        return {}
    predictive = Predictive(program.guide, num_samples=num_samples, parallel=True,
                            return_sites=list(program.latent_sites))
    return {k: v.detach() for k, v in predictive(features).items()}


@dataclass
class PosteriorDraws:
    """S posterior draws of the latents for N images.

    `latents`: site -> (S, *event) for global sites, (S, N, *event) for per-image sites.
    S is 1 for point-estimate models (all their draws would be the same).
    """

    latents: dict[str, torch.Tensor]
    per_image: tuple[str, ...]
    num_samples: int

    def batch(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The draws of images start..stop: per-image sites sliced, global ones shared."""
        return {k: v[:, start:stop] if k in self.per_image else v
                for k, v in self.latents.items()}


def posterior_draws(program: PromptModel, features: torch.Tensor, num_samples: int, seed: int,
                    shared: dict[str, torch.Tensor] | None = None) -> PosteriorDraws:
    """The one posterior predictive's draws on features (N, D), the same for any batching.

    All N images are drawn at once under `seeded(seed)`, so a per-image latent depends on its
    image and the seed only. Global latents are taken from `shared` when it holds them and
    put there otherwise: one evaluation of several splits (base, new, other datasets) shares
    S global draws. Memory: S x N x event size for per-image sites.
    """
    draws = num_samples if program.stochastic else 1
    with seeded(seed):
        per_image = per_image_sites(program, features)
        latents = guide_samples(program, features, draws)
    if shared is not None:
        for site in latents:
            if site not in per_image:
                latents[site] = shared.setdefault(site, latents[site])
    return PosteriorDraws(latents, per_image, draws)


def replay_model(program: PromptModel, features: torch.Tensor,
                 latents: dict[str, torch.Tensor], per_image: tuple[str, ...],
                 num_samples: int) -> poutine.Trace:
    """The model's trace on features (B, D) with its latents set to S draws (plate dim -2).

    Global latents (S, *event) get a size-1 image dim; per-image ones are (S, B, *event). The
    `y` site's distribution holds the class probabilities (S, B, C); its value is a sampled
    label per draw and image.
    """
    conditioned = {k: v if k in per_image else v.unsqueeze(1) for k, v in latents.items()}
    with pyro.plate("particles", num_samples, dim=-2):
        return poutine.trace(poutine.condition(program.model, data=conditioned)
                             ).get_trace(features)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches of N images with no batch of one image (unless N = 1), so a
    text feature batch dim of 1 always means a prompt shared by the whole batch."""
    starts = list(range(0, n, max(batch_size, 2)))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n], strict=True))


@torch.no_grad()
def predictive_probs(program: PromptModel, features: torch.Tensor, num_samples: int,
                     batch_size: int = 64, seed: int = 0,
                     shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Class probabilities under S posterior draws: features (N, D) -> (S, N, C).

    The draws come from `posterior_draws` (seeded, independent of `batch_size`, global latents
    shared through `shared`); S is 1 for point-estimate models. The posterior predictive is
    the mean over S. At most `batch_size` images a batch, fewer where their S * C prompts
    exceed the text budget (`FrozenCLIP.images_per_batch`).
    """
    draws = posterior_draws(program, features, num_samples, seed, shared)
    batch_size = min(batch_size, program.clip.images_per_batch(
        draws.num_samples * len(program.classnames)))
    chunks = []
    with seeded(seed):  # the replay samples labels too: keep the caller's RNG untouched
        for start, stop in batch_bounds(features.shape[0], batch_size):
            trace = replay_model(program, features[start:stop], draws.batch(start, stop),
                                 draws.per_image, draws.num_samples)
            chunks.append(trace.nodes["y"]["fn"].probs.expand(draws.num_samples, stop - start,
                                                              -1))
    return torch.cat(chunks, dim=1)
