"""Pyro's ELBOs as training objectives, and what the objective does to model and guide.

`--elbo NAME` (or a model file's `elbo = TraceGraph_ELBO`) picks the estimator of the negative
ELBO; every one runs with vectorized particles (dim -2) and `max_plate_nesting=1`. ELBOs with
`differentiable_loss` give the loss tensor directly; the others (TraceGraph_ELBO, RenyiELBO)
compute their gradients with `loss_and_grads`, and `elbo_loss` turns them into a tensor whose
value is the loss and whose gradient is theirs, so the training loop treats every ELBO alike.
`--kl-weight` w multiplies the log-density of every latent (unobserved) sample site of model
and guide alike (`scale_latents`), so the ELBO's latent term is w E_q[log q - log p].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from bayesprompt.errors import UserError
from bayesprompt.program.base import PromptModel

#: The ELBOs `--elbo` takes, by class name.
ELBOS: dict[str, type[ELBO]] = {cls.__name__: cls for cls in (
    Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO, RenyiELBO, TraceEnum_ELBO,
    JitTrace_ELBO, JitTraceMeanField_ELBO, JitTraceGraph_ELBO, JitTraceEnum_ELBO)}
#: Pyro losses that cannot train a run, and why.
REFUSED = {
    "TraceTailAdaptive_ELBO": "its loss is not a loss (Pyro returns inf by design; only its "
                              "gradient is meaningful), so divergence checks and logs cannot "
                              "work",
    "Trace_MMD": "it is not an ELBO (it needs a kernel and a prior sample of its own)",
    "TraceTMC_ELBO": "it needs a guide written for tensor Monte Carlo",
    "ReweightedWakeSleep": "it trains model and guide with separate losses",
}
#: ELBOs whose loss is exactly the sum of the sites' Monte Carlo terms (nll + kl + factors).
EXACT_SPLIT = ("Trace_ELBO", "TraceGraph_ELBO", "TraceEnum_ELBO")


def elbo_class(name: str) -> type[ELBO]:
    """The Pyro ELBO class called `name`; a UserError for others."""
    if name in REFUSED:
        raise UserError(f"--elbo {name} cannot train a run: {REFUSED[name]}. Choose one of "
                        f"{', '.join(ELBOS)}.")
    if name not in ELBOS:
        raise UserError(f"Unknown ELBO '{name}'; choose one of {', '.join(ELBOS)}.")
    return ELBOS[name]


def default_elbo(program: type[PromptModel] | PromptModel) -> str:
    """The ELBO a model file names (`elbo = TraceEnum_ELBO`, a class or its name), else
    Trace_ELBO."""
    named = getattr(program, "elbo", None)
    if named is None:
        return "Trace_ELBO"
    name = named if isinstance(named, str) else getattr(named, "__name__", repr(named))
    elbo_class(name)
    return name


def keeping_traces(cls: type[ELBO]) -> type[ELBO]:
    """`cls` that keeps the (model, guide) traces of its last estimate (one pair with
    vectorized particles) in `traces`, with the log-probabilities it computed on them."""
    class Keeping(cls):
        traces: tuple[poutine.Trace, poutine.Trace] | None = None

        def _get_traces(self, model, guide, args, kwargs):
            for traces in super()._get_traces(model, guide, args, kwargs):
                self.traces = traces
                yield traces

    Keeping.__name__ = Keeping.__qualname__ = cls.__name__
    return Keeping


def make_elbo(name: str, num_particles: int) -> ELBO:
    """An instance of ELBO `name` with vectorized particles (dim -2) that keeps its traces."""
    return keeping_traces(elbo_class(name))(num_particles=num_particles,
                                            vectorize_particles=True, max_plate_nesting=1)


class LatentScale(Messenger):
    """Multiplies the scale of every unobserved sample site by `scale` (0 allowed, unlike
    `poutine.scale`)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.scale * msg["scale"]


def scale_latents(fn: Callable, scale: float) -> Callable:
    """`fn` with its latent sites scaled by `scale` (`fn` itself when the scale is 1)."""
    return fn if scale == 1 else LatentScale(scale)(fn)


def elbo_loss(elbo: ELBO, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
    """The ELBO's loss as a tensor that backpropagates its gradient into the param store
    (non-tensor arguments go in `kwargs`: JIT ELBOs trace only the positional ones).

    With `differentiable_loss` that is the loss itself. Otherwise `loss_and_grads` computes
    the gradients (into `.grad`, which is put back as it was), and the loss is returned as
    `value + sum(p * g) - sum(p * g).detach()`: its value is the loss, its gradient g.
    """
    if hasattr(elbo, "differentiable_loss"):
        return elbo.differentiable_loss(model, guide, *args, **kwargs)
    store = pyro.get_param_store()
    before = {p: p.grad for _, p in store.named_parameters()}
    for parameter in before:
        parameter.grad = None
    value = elbo.loss_and_grads(model, guide, *args, **kwargs)
    surrogate = None
    for _, parameter in store.named_parameters():
        if parameter.grad is not None:
            term = (parameter * parameter.grad).sum()
            surrogate = term if surrogate is None else surrogate + term
        parameter.grad = before.get(parameter)
    device = next((p.device for _, p in store.named_parameters()), None)
    loss = torch.tensor(float(value), device=device)
    return loss if surrogate is None else loss + surrogate - surrogate.detach()


def split_terms(name: str, model_trace: poutine.Trace, loss: torch.Tensor, nll: torch.Tensor,
                kl: torch.Tensor, factors: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll, kl) of the loss split for ELBO `name`, from the sites' Monte Carlo terms.

    Trace_ELBO, TraceGraph_ELBO and TraceEnum_ELBO without enumerated sites: the terms
    themselves. TraceMeanField_ELBO (analytic KL where it exists) and RenyiELBO (not a sum
    over sites): kl is the remainder loss - nll - factors. JIT ELBOs (their traces are those
    of the compiling call) and enumerated models: NaN, the split is not available.
    """
    enumerated = any(site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
                     for site in model_trace.nodes.values())
    if name.startswith("Jit") or enumerated:
        nan = torch.full((), math.nan, device=loss.device)
        return nan, nan
    if name in EXACT_SPLIT:
        return nll, kl
    return nll, loss.detach() - nll - sum(factors.values(), torch.zeros_like(nll))


def auxiliary_sites(guide_trace: poutine.Trace) -> list[str]:
    """Auxiliary sample sites of the guide that draw several latents jointly (an
    autoguide's joint latent, e.g. `_AutoDiagonalNormal_latent`); not AutoNormal's per-site
    `<site>_unconstrained`."""
    return [name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and site["infer"].get("is_auxiliary")
            and not site["is_observed"] and not (name.endswith("_unconstrained")
                     and name.removesuffix("_unconstrained") in guide_trace.nodes)]


def is_real(support: constraints.Constraint) -> bool:
    """True for the real line, or real vectors and matrices (independent real)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def site_posterior(guide_trace: poutine.Trace, name: str,
                   prior: dist.Distribution | None = None) -> dist.Distribution | None:
    """The guide's distribution of latent `name`; None for a point estimate (Delta). An
    autoguide's Delta site drawn through its own `<name>_unconstrained` (AutoNormal) has that
    distribution when the site is real (the `prior`'s support, if given); through a joint
    auxiliary site (AutoContinuous), None as well: it has no distribution of its own."""
    posterior = guide_trace.nodes[name]["fn"]
    if not isinstance(posterior, dist.Delta):
        return posterior
    own = guide_trace.nodes.get(f"{name}_unconstrained")
    if own is not None and (prior is None or is_real(prior.support)):
        return own["fn"]
    return None


def per_image_parameters(guide_trace: poutine.Trace) -> list[str]:
    """Parameters of the guide that hold a row per dataset image (subsampled by `images`)."""
    return [name for name, site in guide_trace.nodes.items()
            if site["type"] == "param" and site["kwargs"].get("event_dim") is not None
            and any(frame.name == "images" for frame in site["cond_indep_stack"])]


def refuse_per_image_rows(program: PromptModel, guide_trace: poutine.Trace) -> None:
    """A UserError when the guide (its trace) holds a parameter row per training image."""
    rows = per_image_parameters(guide_trace)
    if rows:
        raise UserError(
            f"The guide of {type(program).__name__} holds a parameter row per training image "
            f"({', '.join(rows)}): it has no posterior for the test images a run is evaluated "
            "on. Use a guide amortized on the image feature, as models/vpt_cond.py does "
            "(--model vpt_cond), or a global latent (models/vpt_autoguide.py).")


def check_evaluable(program: PromptModel, features: torch.Tensor) -> None:
    """Refuse to predict with a guide that has a parameter row per training image (one guide
    call on the first image, the RNG left as it was)."""
    try:
        with torch.random.fork_rng(devices=[]), program.param_scope():
            guide_trace = poutine.trace(program.guide).get_trace(features[:1])
    except ValueError as error:  # Pyro: a per-image table does not fit this data plate
        if "invalid shape of pyro.param" not in str(error):
            raise
        raise UserError(
            f"The guide of {type(program).__name__} holds a parameter row per training image "
            f"(Pyro: {str(error).splitlines()[0]}): it has no posterior for other images. Use a "
            "guide amortized on the image feature, as models/vpt_cond.py does "
            "(--model vpt_cond).") from None
    refuse_per_image_rows(program, guide_trace)


def check_program(program: PromptModel, objective: str, elbo: str, dataset_size: int) -> None:
    """Refuse, before training, what cannot train or be evaluated: an unknown or refused ELBO;
    `--objective paper` with a guide that draws the latents through an auxiliary site or a
    latent without an analytic KL; a guide with a parameter row per training image (nothing
    to evaluate on unseen images with). Uses two blank images; the program is left without
    parameters and the RNG as it was."""
    elbo_class(elbo)
    features = torch.zeros(2, program.clip.feature_dim, device=program.init_ctx.device)
    labels = torch.arange(2, device=features.device) % len(program.classnames)
    with torch.random.fork_rng(devices=[]), program.param_scope(), \
            program.batch_indices(torch.arange(2, device=features.device)):
        guide_trace = poutine.trace(program.guide).get_trace(features, labels, dataset_size)
        model_trace = poutine.trace(poutine.replay(program.model, trace=guide_trace)
                                    ).get_trace(features, labels, dataset_size)
    program.clear_parameters()
    per_image = [name for name in program.latent_sites
                 if any(f.name == "images" for f in model_trace.nodes[name]["cond_indep_stack"])]
    if isinstance(program.autoguide, AutoContinuous) and per_image:
        raise UserError(
            f"{type(program.autoguide).__name__} packs all latents into one vector of a fixed "
            f"size, so it cannot hold the per-image latents {per_image} of a data plate whose "
            "batches vary. Use a guide amortized on the image feature, as models/vpt_cond.py "
            "does (--model vpt_cond).")
    refuse_per_image_rows(program, guide_trace)
    if objective != "paper":
        return
    auxiliary = auxiliary_sites(guide_trace)
    if auxiliary:
        raise UserError(
            f"--objective paper needs each latent's posterior as a distribution of its own, but "
            f"the guide draws them jointly through {', '.join(auxiliary)} (an autoguide such as "
            "AutoDiagonalNormal): its KL would be taken as 0. Use --objective elbo, or a guide "
            "with a distribution per site (AutoNormal, or a guide method).")
    for name in program.latent_sites:
        prior = model_trace.nodes[name]["fn"]
        if f"{name}_unconstrained" in guide_trace.nodes and not is_real(prior.support):
            raise UserError(
                f"--objective paper with an autoguide needs real-valued latents, but "
                f"'{name}' has support {prior.support}: its KL would be that of the "
                "unconstrained value. Use --objective elbo.")
        posterior = site_posterior(guide_trace, name, prior)
        if posterior is None:
            continue
        try:
            kl_divergence(posterior, prior)
        except NotImplementedError:
            raise UserError(
                f"--objective paper needs KL(q || p) in closed form, and torch has none for "
                f"the latent '{name}' ({type(posterior).__name__} guide, "
                f"{type(prior).__name__} prior). Use --objective elbo (any prior), or a prior "
                "with an analytic KL.") from None


def joint_posterior_scales(program: PromptModel, guide_trace: poutine.Trace
                           ) -> dict[str, torch.Tensor]:
    """site -> standard deviation of each latent (unconstrained), for an autoguide that draws
    them jointly (AutoContinuous: the Delta sites' scale is its joint posterior's marginal);
    {} for other guides, or when the joint posterior has no `stddev` (AutoIAFNormal)."""
    guide = program.autoguide
    auxiliary = auxiliary_sites(guide_trace)
    if not isinstance(guide, AutoContinuous) or len(auxiliary) != 1:
        return {}
    try:
        stddev = guide_trace.nodes[auxiliary[0]]["fn"].stddev.detach()
    except NotImplementedError:
        return {}
    return {site["name"]: value for site, value in guide._unpack_latent(stddev)}
