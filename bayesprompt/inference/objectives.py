"""Per-image training objectives, each with the split of its loss (NLL, KL, factor terms).

`make_objective` builds the negative ELBO (any Pyro ELBO, `inference.elbos`; vectorized
particles) or the reference implementation's loss; an `Objective` keeps what its last loss is
made of (`ObjectiveTerms`), read from the traces that computed it, for the training log.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from bayesprompt.errors import UserError
from bayesprompt.inference import elbos
from bayesprompt.program.base import PromptModel

#: Weight of the KL term of the reference implementation's objective.
PAPER_KL_WEIGHT = 1e-3


OBJECTIVES = ("elbo", "paper")


def is_deterministic(site: dict) -> bool:
    """A `pyro.deterministic` site: a recorded value (e.g. "text_features"), no term of any
    objective."""
    return site["type"] == "sample" and site["infer"].get("_deterministic", False)


def is_factor_site(name: str, site: dict) -> bool:
    """An observed sample site other than the label `y` and recorded values: a `pyro.factor`
    term."""
    return (site["type"] == "sample" and site["is_observed"] and name != "y"
            and not is_deterministic(site))


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
    #: ELBO only: site -> (2,) its share of `kl` (E_q[log q - log p] per image) and the mean
    #: contraction, guide sd / prior sd (non-Delta sites with a standard deviation)
    latent: dict[str, torch.Tensor] = field(default_factory=dict)


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
    latent site whose guide is not a point (Delta) and has one; an autoguide's joint posterior
    gives its sites' scales (`elbos.joint_posterior_scales`)."""
    scales = {}
    joint = elbos.joint_posterior_scales(program, guide_trace)
    for name in program.latent_sites:
        posterior = elbos.site_posterior(guide_trace, name)
        if name in joint:
            scale = joint[name]
        elif posterior is None:
            continue
        else:
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


def elbo_terms(program: PromptModel, model_trace: poutine.Trace, guide_trace: poutine.Trace,
               normaliser: float, device: torch.device) -> ObjectiveTerms:
    """The negative ELBO's split, from Trace_ELBO's traces: every sample site's (scaled)
    `log_prob_sum`, divided by `normaliser` (particles x N), as Trace_ELBO sums them."""
    zero = torch.zeros((), device=device)
    nll, kl, factors = zero, zero, {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or is_deterministic(site):
            continue
        term = -site["log_prob_sum"].detach() / normaliser
        if name == "y":
            nll = nll + term
        elif is_factor_site(name, site):
            factors[name] = term
        elif site["is_observed"]:  # a pyro.deterministic site
            continue
        else:
            kl = kl + term
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            kl = kl + site["log_prob_sum"].detach() / normaliser
    scales = posterior_scales(program, guide_trace)
    latent = {}
    for name in scales:
        guide_site, prior = guide_trace.nodes[name], model_trace.nodes[name]
        if isinstance(guide_site["fn"], pyro.distributions.Delta):  # an autoguide's joint
            continue                                                  # posterior: no site KL
        site_kl = (guide_site["log_prob_sum"] - prior["log_prob_sum"]).detach() / normaliser
        ratio = guide_site["fn"].stddev.detach() / prior["fn"].stddev.detach()
        latent[name] = torch.stack([site_kl, ratio.mean()])
    return ObjectiveTerms(nll, kl, factors, factor_means(model_trace), scales, latent)


def elbo_objective(program: PromptModel, num_particles: int, elbo: str = "Trace_ELBO"
                   ) -> Objective:
    """Negative ELBO per training image, by the Pyro ELBO `elbo` with vectorized particles
    (`bayesprompt.inference.elbos`).

    The KL weight scales the latent sites of model and guide (`elbos.scale_latents`). One
    estimator per batch size: a JIT ELBO compiles for the shapes of its first call.
    """
    estimators: dict[int, pyro.infer.ELBO] = {}
    model = elbos.scale_latents(program.model, program.config.kl_weight)
    guide = elbos.scale_latents(program.guide, program.config.kl_weight)

    def evaluate(features: torch.Tensor, labels: torch.Tensor, dataset_size: int
                 ) -> tuple[torch.Tensor, ObjectiveTerms]:
        estimator = estimators.get(len(features))
        if estimator is None:
            estimator = estimators[len(features)] = elbos.make_elbo(elbo, num_particles)
        loss = elbos.elbo_loss(estimator, model, guide, features, labels,
                               dataset_size=dataset_size) / dataset_size
        model_trace, guide_trace = estimator.traces
        terms = elbo_terms(program, model_trace, guide_trace, num_particles * dataset_size,
                           features.device)
        terms.nll, terms.kl = elbos.split_terms(elbo, model_trace, loss, terms.nll, terms.kl,
                                                terms.factors)
        return loss, terms

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
            prior = model_trace.nodes[name]["fn"]
            posterior = elbos.site_posterior(guide_trace, name, prior)
            if posterior is None:
                continue
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


def make_objective(program: PromptModel, objective: str, num_particles: int,
                   elbo: str = "Trace_ELBO") -> Objective:
    """The objective named `objective` ("elbo", estimated by the Pyro ELBO `elbo`, or "paper")
    with `num_particles` samples (one for point-estimate programs, whose particles would all be
    the same)."""
    if objective not in OBJECTIVES:
        raise UserError(f"Unknown objective '{objective}'; choose one of {OBJECTIVES}.")
    particles = num_particles if program.stochastic else 1
    if objective == "elbo":
        return elbo_objective(program, particles, elbo)
    return paper_objective(program, particles)
