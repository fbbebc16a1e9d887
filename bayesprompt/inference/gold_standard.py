"""Is the guide a posterior? A gold standard for a trained program's latent sites.

Global latent sites (vpt's residual `r`, (W,)): Pyro's NUTS on the exact log density that the
training's objective approximates, given the learned point parameters (ctx, ...): every cached
view of every training image in one batch, the data plate scaled as in training (N / (V N), so
the likelihood is the mean over views of the full-data likelihood), divided by the KL weight
(the ELBO with weight b on the latent sites is maximised by q ∝ p(r) p(y | r)^(1/b)).
Per-image latent sites (vpt_cond's `r_i`): for a random subset of (image, view) pairs, the exact
posterior p(r_i | x_i, y_i) by importance sampling from the prior (the likelihood of one label
is at most 1, so the weights are bounded; their Pareto k-hat is reported).

Compared with the guide, per site: the contraction (gold sd / prior sd), KL(guide || gold
diagonal Gaussian fit), the sd ratio (guide sd / gold sd), the error of the guide's mean in gold
sd, and the Pareto k-hat of the guide as an importance proposal for the posterior (Yao et al.,
2018, "Yes, but did it work?"; ArviZ `psislw`). The shapes: W latent width, V views, N
training images, K checked images, M draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from bayesprompt.errors import UserError
from bayesprompt.inference.objectives import particle_traces
from bayesprompt.inference.predictive import per_image_sites, seeded

#: r_hat above this, or a bulk or tail ESS below ESS_PER_CHAIN per chain: not converged
#: (Vehtari et al., 2021).
RHAT_LIMIT = 1.01
ESS_PER_CHAIN = 100
#: Pareto k-hat above this: the guide is not a usable importance proposal (Yao et al., 2018).
KHAT_LIMIT = 0.7


@dataclass
class DiagonalGaussian:
    """Per-dimension mean and standard deviation: (*event) for a global site, (K, *event)
    for a per-image site (K images)."""

    mean: torch.Tensor
    sd: torch.Tensor


def kl_weight(program: object) -> float:
    """The KL weight b of a program (1 when it has none). The objective weighs the latent sites
    by b on both sides, so its optimum is the tempered posterior p(z) p(y | z)^(1/b): the gold
    standard's log density is the latents' log prior plus the observations' log likelihood
    divided by b (`tempered_log_prob`)."""
    weight = float(getattr(getattr(program, "config", None), "kl_weight", 1.0))
    if weight <= 0:
        raise UserError("The posterior check needs a positive --kl-weight: with weight 0 the "
                        "objective has no posterior to compare the guide with.")
    return weight


def tempered_log_prob(node: dict, weight: float, latents: Iterable[str]) -> torch.Tensor:
    """A model trace's sample site's scaled log density, divided by the KL weight b where the
    site is observed data (the likelihood), as is where it is one of the `latents` (the prior;
    also when `poutine.condition` set its value)."""
    log_prob = node["fn"].log_prob(node["value"]) * node["scale"]
    return log_prob / weight if node["is_observed"] and node["name"] not in latents else log_prob


def checked_sites(program: object, features: torch.Tensor) -> tuple[tuple[str, ...],
                                                                     tuple[str, ...]]:
    """(global sites, per-image sites) of a program's latent sites, refusing programs with no
    random latent (point estimates) and latents that are not real-valued."""
    sites = tuple(getattr(program, "latent_sites", ()))
    name = type(program).__name__
    if not sites or not getattr(program, "stochastic", True):
        raise UserError(f"The model {name} has no random latent sites (a point estimate or a "
                        "zero-shot model): there is no posterior to check. Check a run of a "
                        "Bayesian model such as vpt or vpt_cond.")
    trace = poutine.trace(program.model).get_trace(features[:2])
    guide_trace = poutine.trace(program.guide).get_trace(features[:2])
    for site in sites:
        support = trace.nodes[site]["fn"].support
        if isinstance(guide_trace.nodes[site]["fn"], dist.Delta):
            raise UserError(f"The latent site '{site}' of {name} has a point-estimate (Delta) "
                            "guide: there is no posterior approximation to check.")
        if support is not dist.constraints.real and not (
                isinstance(support, dist.constraints.independent)
                and support.base_constraint is dist.constraints.real):
            raise UserError(f"The latent site '{site}' of {name} is not real-valued ({support}); "
                            "the posterior check handles real-valued latents only.")
    per_image = per_image_sites(program, features)
    return tuple(s for s in sites if s not in per_image), per_image


def flat_views(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor,
                                                                    torch.Tensor]:
    """Training features (V, N, D) and labels (N,) -> one batch (V N, D), labels (V N,)."""
    views, n, dim = features.shape
    return features.reshape(views * n, dim), labels.repeat(views)


def global_potential(program: object, features: torch.Tensor, labels: torch.Tensor
                     ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The negative log density of the global latents ({site: (*event)} -> scalar) that the
    objective approximates: features (V, N, D), labels (N,); every view in one batch with the
    data plate of N images (scale 1 / V), the likelihood tempered by the KL weight."""
    flat, flat_labels = flat_views(features, labels)
    size, weight = features.shape[1], kl_weight(program)

    def potential(latents: dict[str, torch.Tensor]) -> torch.Tensor:
        trace = poutine.trace(poutine.condition(program.model, data=latents)).get_trace(
            flat, flat_labels, size)
        return -sum(tempered_log_prob(node, weight, latents).sum() for node in
                    prune_subsample_sites(trace).nodes.values() if node["type"] == "sample")

    return potential


@dataclass
class NutsResult:
    """NUTS draws per global site, (chains, draws, *event), and ArviZ's diagnostics."""

    samples: dict[str, torch.Tensor]
    rhat_max: float
    ess_bulk_min: float
    ess_tail_min: float
    seconds: float

    @property
    def converged(self) -> bool:
        chains = next(iter(self.samples.values())).shape[0]
        return (self.rhat_max <= RHAT_LIMIT and self.ess_bulk_min >= ESS_PER_CHAIN * chains
                and self.ess_tail_min >= ESS_PER_CHAIN * chains)

    def fit(self, site: str) -> DiagonalGaussian:
        """The diagonal Gaussian fit (mean and sd over all chains and draws) of a site."""
        draws = self.samples[site].flatten(0, 1).double()
        return DiagonalGaussian(draws.mean(0), draws.std(0))


def rhat_ess(samples: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """ArviZ's rank-normalised split r_hat (max) and bulk and tail ESS (min) over every
    dimension of draws (chains, draws, *event)."""
    import arviz as az

    data = az.convert_to_dataset({k: v.double().cpu().numpy() for k, v in samples.items()})
    rhat = az.rhat(data)
    bulk, tail = az.ess(data, method="bulk"), az.ess(data, method="tail")

    def extreme(values, reduce) -> float:
        return float(reduce([float(reduce(values[k].values)) for k in samples]))

    return extreme(rhat, np.max), extreme(bulk, np.min), extreme(tail, np.min)


def run_nuts(program: object, features: torch.Tensor, labels: torch.Tensor,
             sites: tuple[str, ...], initial: dict[str, torch.Tensor], num_samples: int,
             warmup: int, seed: int, progress: bool = True) -> NutsResult:
    """NUTS (diagonal mass matrix, adapted) on `global_potential`, one chain per row of the
    initial values {site: (chains, *event)}, run one after another (chain c seeded seed + c)."""
    import time

    potential = global_potential(program, features, labels)
    chains = next(iter(initial.values())).shape[0]
    started = time.perf_counter()
    runs = []
    for chain in range(chains):  # in this process: Pyro's parallel chains would fork it
        kernel = NUTS(potential_fn=potential, adapt_step_size=True, adapt_mass_matrix=True,
                      full_mass=False, target_accept_prob=0.8)
        with seeded(seed + chain):
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup,
                        initial_params={k: v[chain].detach() for k, v in initial.items()},
                        disable_progbar=not progress)
            mcmc.run()
        runs.append(mcmc.get_samples())
    samples = {k: torch.stack([run[k].detach() for run in runs]) for k in sites}
    return NutsResult(samples, *rhat_ess(samples), time.perf_counter() - started)


@torch.no_grad()
def gaussian_elbos(program: object, features: torch.Tensor, labels: torch.Tensor,
                   fits: dict[str, dict[str, DiagonalGaussian]], num_draws: int = 200,
                   seed: int = 0) -> dict[str, tuple[float, float]]:
    """ELBO of diagonal Gaussians over the global sites, E_q[-U - log q] with U the
    `global_potential` (features (V, N, D), labels (N,)): {name: (ELBO, its standard error)}
    for each named fit {site: Gaussian}. Every fit uses the same standard-normal draws, so the
    difference of two ELBOs, their difference in KL to the exact posterior, is sharper than
    either standard error says."""
    potential = global_potential(program, features, labels)
    generator = torch.Generator().manual_seed(seed)
    first = next(iter(fits.values()))
    noise = {site: torch.randn(num_draws, *fit.mean.shape, generator=generator,
                               dtype=torch.float64) for site, fit in first.items()}
    elbos = {}
    for name, fit in fits.items():
        draws = {site: g.mean + g.sd * noise[site] for site, g in fit.items()}  # (M, *event)
        log_q = sum(dist.Normal(g.mean, g.sd).log_prob(draws[site]).flatten(1).sum(1)
                    for site, g in fit.items())
        energies = torch.stack([potential({site: value[m].float().to(features.device)
                                           for site, value in draws.items()})
                                for m in range(num_draws)]).double().cpu()
        log_weights = -energies - log_q.cpu()          # log p(z, data) - log q(z), (M,)
        elbos[name] = (float(log_weights.mean()),
                       float(log_weights.std() / math.sqrt(num_draws)))
    return elbos


def guide_gaussian(program: object, features: torch.Tensor, labels: torch.Tensor | None,
                   dataset_size: int | None, site: str) -> DiagonalGaussian:
    """The guide's mean and sd of a site on features (B, D): (*event) for a global site (its
    image dim dropped), (B, *event) for a per-image site."""
    with torch.no_grad():
        fn = poutine.trace(program.guide).get_trace(features, labels, dataset_size
                                                    ).nodes[site]["fn"]
        return DiagonalGaussian(fn.mean.detach().double(), fn.stddev.detach().double())


def prior_gaussian(program: object, features: torch.Tensor, site: str) -> DiagonalGaussian:
    """The prior's mean and sd of a site on features (B, D), shaped as `guide_gaussian`."""
    with torch.no_grad():
        fn = poutine.trace(program.model).get_trace(features).nodes[site]["fn"]
        return DiagonalGaussian(fn.mean.detach().double(), fn.stddev.detach().double())


def gaussian_kl(q: DiagonalGaussian, p: DiagonalGaussian, per_image: bool = False
                ) -> torch.Tensor:
    """KL(q || p) of diagonal Gaussians in nats: summed over every dim (scalar), or over all
    but the first (K,) for a per-image site."""
    var_ratio = (q.sd / p.sd) ** 2
    terms = 0.5 * (var_ratio + ((q.mean - p.mean) / p.sd) ** 2 - 1 - torch.log(var_ratio))
    return terms.flatten(1).sum(-1) if per_image else terms.sum()


def pareto_khat(log_weights: torch.Tensor) -> float:
    """ArviZ's PSIS k-hat of M log importance weights (M,)."""
    import arviz as az

    _, khat = az.psislw(log_weights.double().cpu().numpy())
    return float(khat)


def particle_log_weights(program: object, num_draws: int, features: torch.Tensor,
                         labels: torch.Tensor, dataset_size: int | None, per_image: bool
                         ) -> torch.Tensor:
    """log p(latents) + log p(data | latents) / b - log q(latents) of M guide draws: (M,)
    summed over the batch for global sites, (M, B) per image for per-image sites (b: the KL
    weight, `tempered_log_prob`)."""
    guide_trace, model_trace = particle_traces(program, num_draws, features, labels,
                                               dataset_size)
    weight = kl_weight(program)
    total = torch.zeros((), dtype=torch.float64)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in prune_subsample_sites(trace).nodes.values():
            if site["type"] != "sample":
                continue
            log_prob = tempered_log_prob(site, weight, ()).double()
            log_prob = log_prob if per_image else log_prob.reshape(num_draws, -1).sum(-1)
            total = total + sign * log_prob
    return total


@torch.no_grad()
def global_khat(program: object, features: torch.Tensor, labels: torch.Tensor,
                num_draws: int = 200, seed: int = 0, chunk: int = 50) -> float:
    """k-hat of the guide as importance proposal for the full-data posterior of the global
    latents: M guide draws, features (V, N, D) and labels (N,) as in `global_potential`."""
    flat, flat_labels = flat_views(features, labels)
    parts = []
    with seeded(seed):
        for start in range(0, num_draws, chunk):
            parts.append(particle_log_weights(program, min(chunk, num_draws - start), flat,
                                              flat_labels, features.shape[1], False))
    return pareto_khat(torch.cat(parts))


@dataclass
class ImageCheck:
    """Per-image gold standard of K (image, view) pairs: the importance-sampling fit, its
    effective sample size and k-hat per image (K,), log p(y_i | x_i) (K,), the guide's fit."""

    gold: DiagonalGaussian
    ess: torch.Tensor
    gold_khat: torch.Tensor
    log_evidence: torch.Tensor
    guide: DiagonalGaussian
    prior: DiagonalGaussian
    guide_log_weights: torch.Tensor  # (M, K) log p(r, y | x) - log q(r | x), guide draws

    @property
    def guide_elbo(self) -> torch.Tensor:
        """The ELBO of each image's guide (K,), by its M draws."""
        return self.guide_log_weights.mean(0)


@torch.no_grad()
def image_posteriors(program: object, features: torch.Tensor, labels: torch.Tensor, site: str,
                     num_draws: int = 2000, seed: int = 0, chunk: int = 500,
                     progress: bool = True) -> ImageCheck:
    """Exact posteriors of a per-image site for K images, features (K, D), labels (K,): M
    draws from the prior weighted by p(y_i | x_i, r)^(1/b) (self-normalised importance
    sampling), and M guide draws for the guide's ELBO and k-hat."""
    weight = kl_weight(program)
    sums = {"log_lik": [], "r": []}
    guide_parts = []
    bar = tqdm(total=2 * num_draws, desc="per-image posteriors", unit="draw",
               disable=not progress, leave=False)
    with seeded(seed):
        for start in range(0, num_draws, chunk):
            m = min(chunk, num_draws - start)
            with pyro.plate("particles", m, dim=-2):
                trace = poutine.trace(program.model).get_trace(features, labels)
            log_lik = sum(tempered_log_prob(node, weight, ()) for node in trace.nodes.values()
                          if node["type"] == "sample" and node["is_observed"])
            sums["log_lik"].append(log_lik.double())                             # (m, K)
            sums["r"].append(trace.nodes[site]["value"].double())                 # (m, K, *e)
            bar.update(m)
        for start in range(0, num_draws, chunk):
            m = min(chunk, num_draws - start)
            guide_parts.append(particle_log_weights(program, m, features, labels, None, True))
            bar.update(m)
    bar.close()
    log_lik = torch.cat(sums["log_lik"])                                           # (M, K)
    draws = torch.cat(sums["r"])                                                   # (M, K, *e)
    normalised = torch.softmax(log_lik, dim=0)
    shape = (*normalised.shape, *([1] * (draws.dim() - 2)))
    w = normalised.reshape(shape)
    mean = (w * draws).sum(0)
    sd = ((w * (draws - mean) ** 2).sum(0) * num_draws / (num_draws - 1)).sqrt()
    ess = 1.0 / (normalised ** 2).sum(0)
    khat = torch.tensor([pareto_khat(log_lik[:, k]) for k in range(log_lik.shape[1])])
    evidence = torch.logsumexp(log_lik, 0) - math.log(num_draws)
    return ImageCheck(DiagonalGaussian(mean, sd), ess, khat, evidence,
                      guide_gaussian(program, features, labels, None, site),
                      prior_gaussian(program, features, site), torch.cat(guide_parts))


def fit_elbo(program: object, features: torch.Tensor, labels: torch.Tensor, site: str,
             fit: DiagonalGaussian, num_draws: int = 2000, seed: int = 0) -> torch.Tensor:
    """The ELBO (K,) of a diagonal Gaussian fit (K, *event) of each image's latent, by M
    draws: E_q[log p(r) + log p(y_i | x_i, r) / b - log q(r)] as in `particle_log_weights`."""
    weight = kl_weight(program)
    q = dist.Normal(fit.mean.float(), fit.sd.float()).to_event(fit.mean.dim() - 1)
    with torch.no_grad(), seeded(seed):
        draws = q.sample((num_draws,))                                            # (M, K, W)
        with pyro.plate("particles", num_draws, dim=-2):
            trace = poutine.trace(poutine.condition(program.model, data={site: draws})
                                  ).get_trace(features, labels)
        total = sum(tempered_log_prob(node, weight, (site,)).double()
                    for node in prune_subsample_sites(trace).nodes.values()
                    if node["type"] == "sample")
        return (total - q.log_prob(draws).double()).mean(0)


def spread(values: torch.Tensor) -> dict[str, float]:
    """Median, 5th and 95th percentiles of a tensor's values."""
    flat = values.double().flatten().cpu().numpy()
    return {"median": float(np.median(flat)), "p5": float(np.percentile(flat, 5)),
            "p95": float(np.percentile(flat, 95))}


def compare(guide: DiagonalGaussian, gold: DiagonalGaussian, prior: DiagonalGaussian,
            per_image: bool = False) -> dict[str, object]:
    """The per-site comparison: contraction (gold sd / prior sd), KL(guide || gold fit), sd
    ratio (guide sd / gold sd), mean error (|guide - gold| / gold sd), KL of each to the prior
    (nats; the mean over images for per-image sites)."""
    error = ((guide.mean - gold.mean) / gold.sd).abs()
    return {
        "contraction": spread(gold.sd / prior.sd),
        "kl_guide_gold": float(gaussian_kl(guide, gold, per_image).mean()),
        "sd_ratio": spread(guide.sd / gold.sd),
        "mean_error": {"rms": float(error.pow(2).mean().sqrt()), "max": float(error.max())},
        "kl_gold_prior": float(gaussian_kl(gold, prior, per_image).mean()),
        "kl_guide_prior": float(gaussian_kl(guide, prior, per_image).mean()),
    }
