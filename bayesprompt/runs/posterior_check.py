"""A run's guide against the gold standard: `bayesprompt-check-posterior RUN` and
`Run.check_posterior()`. Writes RUN/posterior_check/posterior_check.json and
posterior_check.png; the methods are in `inference/gold_standard.py`.

Everything runs in fp32 (a bf16 text tower makes the log density jitter by about 0.08 nats,
enough to stall NUTS), on the run's cached training views and test features.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro import poutine
from tqdm.auto import tqdm

from bayesprompt.data.features import cached_features
from bayesprompt.errors import UserError
from bayesprompt.figures import new_figure, save_figure
from bayesprompt.files import make_folder, write_json
from bayesprompt.inference.gold_standard import (
    KHAT_LIMIT,
    DiagonalGaussian,
    ImageCheck,
    NutsResult,
    checked_sites,
    compare,
    fit_elbo,
    gaussian_elbos,
    gaussian_kl,
    global_khat,
    guide_gaussian,
    image_posteriors,
    pareto_khat,
    particle_log_weights,
    prior_gaussian,
    run_nuts,
    spread,
)
from bayesprompt.inference.predictive import (
    PosteriorDraws,
    guide_samples,
    predictive_probs,
    replayed_batches,
    seeded,
)
from bayesprompt.metrics import accuracy
from bayesprompt.program import PromptModel
from bayesprompt.runs.evaluate import new_class_metrics

if TYPE_CHECKING:
    from bayesprompt.runs.loaded_run import LoadedRun as Run

CHECK_FOLDER = "posterior_check"
CHECK_FILE = "posterior_check.json"
PLOT_FILE = "posterior_check.png"
#: Marginals shown in the plot.
PLOT_PANELS = 6


@dataclass
class CheckOptions:
    """How hard the check works. NUTS: `chains` chains of `warmup` + `samples` iterations;
    per-image sites: `images` random (image, view) pairs, `draws` importance draws each;
    `khat_draws` guide draws for the global k-hat; the predictive uses `predictive_samples`
    draws of each distribution; `seed` seeds every random choice."""

    chains: int = 2
    warmup: int = 300
    samples: int = 300
    images: int = 16
    draws: int = 2000
    khat_draws: int = 200
    predictive_samples: int = 50
    seed: int = 0

    def check(self) -> None:
        bad = [f"{name} must be {'2' if name == 'chains' else '1'} or more, got {value}"
               for name, value in asdict(self).items()
               if name != "seed" and value < (2 if name == "chains" else 1)]
        if bad:
            raise UserError(f"Bad posterior-check option: {'; '.join(bad)}.")


@contextmanager
def fp32(run: Run) -> Iterator[None]:
    """The run's CLIP in fp32 for the block (its precision is back afterwards)."""
    precision = run.clip.precision
    run.clip.precision = "fp32"
    try:
        yield
    finally:
        run.clip.precision = precision


def training_data(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's cached training views (V, N, D) and labels (N,), as training saw them."""
    config = run.config
    views = list(range(1, config.views + 1)) if config.views > 0 else [0]
    features = cached_features(run.clip, run.base.train, views,
                               Path(config.cache_dir).expanduser() / "features", config.seed,
                               config.crop_min_scale, config.loader_workers)
    labels = torch.tensor([item.label for item in run.base.train], device=run.clip.device)
    return features.to(run.clip.device), labels


@torch.no_grad()
def probs_given(program: PromptModel, features: torch.Tensor, latents: dict[str, torch.Tensor],
                per_image: tuple[str, ...], batch_size: int) -> torch.Tensor:
    """Class probabilities (S, N, C) on features (N, D) with the latents set to draws: global
    (S, *event), per-image (S, N, *event)."""
    draws = PosteriorDraws(latents, per_image, next(iter(latents.values())).shape[0])
    return torch.cat([trace.nodes["y"]["fn"].probs.expand(draws.num_samples, stop - start, -1)
                      for start, stop, trace in replayed_batches(program, features, draws,
                                                                 batch_size)], dim=1)


@torch.no_grad()
def prior_draws(program: PromptModel, features: torch.Tensor, sites: tuple[str, ...],
                per_image: tuple[str, ...], num: int) -> dict[str, torch.Tensor]:
    """S prior draws of each site: global (S, *event), per-image (S, N, *event) for features
    (N, D). The prior of a per-image site is taken not to depend on the image (as in every
    shipped model)."""
    trace = poutine.trace(program.model).get_trace(features[:1])
    draws = {}
    for site in sites:
        fn = trace.nodes[site]["fn"]
        draws[site] = (fn.sample((num, features.shape[0])).squeeze(2) if site in per_image
                       else fn.sample((num,)))
    return draws


def predictive_metrics(program: PromptModel, probs: dict[str, torch.Tensor],
                       labels: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Accuracy of base and new (percent), NLL and ECE of the new classes' predictive mean and
    the MI AUROC (new vs base) from probabilities (S, N, C) per split."""
    result: dict[str, float | None] = {"base": accuracy(probs["base"], labels["base"])}
    if "new" in probs:
        result["new"] = accuracy(probs["new"], labels["new"])
        metrics = new_class_metrics(program, probs["base"], probs["new"], labels["new"])
        result.update(nll=metrics["new_nll"], ece=metrics["new_ece"],
                      mi_auroc=metrics["mi_auroc_new_vs_base"])
    return result


def predictive(run: Run, sites: tuple[str, ...], per_image: tuple[str, ...],
               gold: dict[str, torch.Tensor], options: CheckOptions, progress: bool
               ) -> dict[str, dict]:
    """The predictive from the guide, the gold standard (S global NUTS draws; for a per-image
    site the prior: an unlabelled test image leaves r_i at its prior), the prior and the point
    latents = 0, on the run's base and new test images."""
    program, config, num = run.program, run.config, options.predictive_samples
    splits = ["base"] + (["new"] if run.new is not None else [])
    sources = ("guide", "gold", "prior", "point")
    probs: dict[str, dict[str, torch.Tensor]] = {s: {} for s in sources}
    labels, shared, priors = {}, {}, {}
    bar = tqdm(total=len(splits) * len(sources), desc="predictive", unit="set",
               disable=not progress, leave=False)
    for split in splits:
        program.set_classes(run.dataset(split).classnames)
        features, labels[split] = run.test_features(split)
        labels[split] = labels[split].cpu()
        probs["guide"][split] = predictive_probs(program, features, num, config.eval_batch_size,
                                                 options.seed, shared).cpu()
        bar.update()
        with seeded(options.seed):
            drawn = prior_draws(program, features, sites, per_image, num)
        for site in sites:  # global prior draws are shared by the splits
            if site not in per_image:
                drawn[site] = priors.setdefault(site, drawn[site])
        probs["prior"][split] = probs_given(program, features, drawn, per_image,
                                            config.eval_batch_size).cpu()
        bar.update()
        if gold:
            gold_latents = {k: gold.get(k, drawn[k]) for k in sites}
            probs["gold"][split] = probs_given(program, features, gold_latents, per_image,
                                               config.eval_batch_size).cpu()
        else:  # per-image sites only: the gold predictive is the prior's
            probs["gold"][split] = probs["prior"][split]
        bar.update()
        zeros = {k: torch.zeros_like(v[:1]) for k, v in drawn.items()}
        probs["point"][split] = probs_given(program, features, zeros, per_image,
                                            config.eval_batch_size).cpu()
        bar.update()
    bar.close()
    program.set_classes(run.base.classnames)
    return {source: predictive_metrics(program, probs[source], labels) for source in sources}


def check_global(run: Run, features: torch.Tensor, labels: torch.Tensor,
                 sites: tuple[str, ...], options: CheckOptions, progress: bool
                 ) -> tuple[dict, dict, NutsResult]:
    """NUTS on the global sites: (per-site reports, diagnostics, the NUTS result)."""
    program = run.program
    with seeded(options.seed):  # dispersed starts: draws of the guide
        initial, _ = guide_samples(program, features[0, :2], options.chains)
    initial = {k: v for k, v in initial.items() if k in sites}
    nuts = run_nuts(program, features, labels, sites, initial, options.samples, options.warmup,
                    options.seed, progress)
    khat = global_khat(program, features, labels, options.khat_draws, options.seed)
    size = features.shape[1]
    guides = {site: guide_gaussian(program, features[0, :2], labels[:2], size, site)
              for site in sites}
    golds = {site: nuts.fit(site) for site in sites}
    elbos = gaussian_elbos(program, features, labels, {"guide": guides, "gold_fit": golds},
                           options.khat_draws, options.seed)
    reports = {}
    for site in sites:
        report = compare(guides[site], golds[site],
                         prior_gaussian(program, features[0, :2], site))
        chain_fits = [DiagonalGaussian(c.double().mean(0), c.double().std(0))
                      for c in nuts.samples[site]]
        report.update(method="nuts", khat=khat,
                      kl_between_chains=float(gaussian_kl(chain_fits[0], chain_fits[1])))
        reports[site] = report
    diagnostics = {"elbo_guide": elbos["guide"][0], "elbo_gold_fit": elbos["gold_fit"][0],
                   "elbo_standard_error": max(elbos["guide"][1], elbos["gold_fit"][1]),
                   "rhat_max": nuts.rhat_max, "ess_bulk_min": nuts.ess_bulk_min,
                   "ess_tail_min": nuts.ess_tail_min, "converged": nuts.converged,
                   "chains": options.chains, "warmup": options.warmup,
                   "samples": options.samples, "seconds": round(nuts.seconds, 1)}
    return reports, diagnostics, nuts


def check_per_image(run: Run, features: torch.Tensor, labels: torch.Tensor, site: str,
                    options: CheckOptions, progress: bool) -> tuple[dict, ImageCheck]:
    """Importance-sampled exact posteriors of a per-image site on random (image, view)
    pairs, the guide against them, and the amortization gap."""
    views, size, _ = features.shape
    generator = torch.Generator().manual_seed(options.seed)
    chosen = torch.randperm(size, generator=generator)[:options.images]
    view = torch.randint(views, (len(chosen),), generator=generator)
    images, image_labels = features[view, chosen], labels[chosen]
    check = image_posteriors(run.program, images, image_labels, site, options.draws,
                             options.seed, progress=progress)
    gold_elbo = fit_elbo(run.program, images, image_labels, site, check.gold, options.draws,
                         options.seed)
    report = compare(check.guide, check.gold, check.prior, per_image=True)
    per_image_khat = torch.tensor([pareto_khat(check.guide_log_weights[:, k])
                                   for k in range(len(chosen))])
    report.update(
        method="importance sampling from the prior",
        khat=pareto_khat(check.guide_log_weights.sum(1)),
        khat_per_image=spread(per_image_khat),
        images=len(chosen), draws=options.draws,
        gold_ess=spread(check.ess), gold_khat_max=float(check.gold_khat.max()),
        log_evidence=float(check.log_evidence.mean()),
        elbo_guide=float(check.guide_elbo.mean()),
        elbo_gold_fit=float(gold_elbo.mean()),
        inference_gap=float((check.log_evidence - check.guide_elbo).mean()),
        amortization_gap=float((gold_elbo - check.guide_elbo).mean()))
    return report, check


def normal_density(grid: np.ndarray, mean: float, sd: float) -> np.ndarray:
    return np.exp(-0.5 * ((grid - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def plot_check(path: Path, nuts: NutsResult | None, global_reports: dict,
               images: dict[str, ImageCheck], guides: dict[str, DiagonalGaussian],
               priors: dict[str, DiagonalGaussian]) -> None:
    """Marginals of the guide against the gold standard for the most constrained dimensions
    (smallest gold sd / prior sd): NUTS histograms for global sites, importance-sampling
    Gaussian fits for per-image sites (one image each)."""

    panels = []  # (title, gold draws or None, gold fit, guide, prior) per dimension
    for site in global_reports:
        fit, guide, prior = nuts.fit(site), guides[site], priors[site]
        ratio = (fit.sd / prior.sd).flatten()
        for index in ratio.argsort()[:PLOT_PANELS].tolist():
            panels.append((f"{site}[{index}] (NUTS)", nuts.samples[site].flatten(0, 1)
                           .flatten(1)[:, index].cpu().numpy(),
                           *(float(v.flatten()[index]) for v in (fit.mean, fit.sd, guide.mean,
                                                                 guide.sd, prior.mean,
                                                                 prior.sd))))
    for site, check in images.items():
        ratio = (check.gold.sd / check.prior.sd).flatten(1)
        best = ratio.min(1)
        for image in best.values.argsort()[:PLOT_PANELS].tolist():
            index = int(best.indices[image])
            panels.append((f"{site}[{index}], image {image} (IS)", None,
                           *(float(v[image].flatten()[index]) for v in (
                               check.gold.mean, check.gold.sd, check.guide.mean,
                               check.guide.sd, check.prior.mean, check.prior.sd))))
    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig = new_figure(figsize=(4 * columns, 2.8 * rows))
    for number, (title, draws, *moments) in enumerate(panels):
        gold_mean, gold_sd, guide_mean, guide_sd, prior_mean, prior_sd = moments
        ax = fig.add_subplot(rows, columns, number + 1)
        low = min(gold_mean - 4 * gold_sd, guide_mean - 4 * guide_sd)
        high = max(gold_mean + 4 * gold_sd, guide_mean + 4 * guide_sd)
        grid = np.linspace(low, high, 200)

        if draws is not None:
            ax.hist(draws, bins=40, density=True, color="0.75", label="NUTS draws")
        ax.plot(grid, normal_density(grid, gold_mean, gold_sd), "k-", label="gold (Gaussian fit)")
        ax.plot(grid, normal_density(grid, guide_mean, guide_sd), "C0-", label="guide")
        ax.plot(grid, normal_density(grid, prior_mean, prior_sd), "C1--", label="prior")
        ax.set_title(f"{title}: sd {gold_sd:.2f} vs prior {prior_sd:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
        if number == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Guide against the gold standard: the most constrained dimensions")
    fig.tight_layout()
    save_figure(fig, path)


def check_posterior(run: Run, options: CheckOptions | None = None, out: Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Check a run's guide against the gold standard; write posterior_check.json and
    posterior_check.png into `out` (default RUN/posterior_check) and return the json's dict."""
    options = options or CheckOptions()
    options.check()
    if not (run.folder / "checkpoint.pt").is_file():
        raise UserError(f"{run.folder} holds no checkpoint.pt: the run has not finished an "
                        "epoch of training, so it has no guide to check. Train it first.")
    started = time.perf_counter()
    program = run.program
    with fp32(run):
        program.set_classes(run.base.classnames)
        features, labels = training_data(run)
        global_sites, per_image = checked_sites(program, features[0])
        sites = (*global_sites, *per_image)
        reports, diagnostics, nuts, checks, gold = {}, {}, None, {}, {}
        guides, priors = {}, {}
        if global_sites:
            global_reports, diagnostics, nuts = check_global(run, features, labels,
                                                             global_sites, options, progress)
            reports.update(global_reports)
            generator = torch.Generator().manual_seed(options.seed)
            for site in global_sites:
                flat = nuts.samples[site].flatten(0, 1)
                pick = torch.randperm(flat.shape[0], generator=generator)
                gold[site] = flat[pick[:options.predictive_samples]]
                guides[site] = guide_gaussian(program, features[0, :2], labels[:2],
                                              features.shape[1], site)
                priors[site] = prior_gaussian(program, features[0, :2], site)
        for site in per_image:
            reports[site], checks[site] = check_per_image(run, features, labels, site, options,
                                                          progress)
        predictions = predictive(run, sites, per_image, gold, options, progress)
    warnings = check_warnings(reports, diagnostics, per_image)
    result = {
        "run_dir": str(run.folder), "model": run.config.model,
        "residual_scale": run.config.residual_scale, "objective": run.config.objective,
        "kl_weight": run.config.kl_weight, "sites": reports, "nuts": diagnostics or None,
        "predictive": predictions,
        "notes": ([f"per-image sites {list(per_image)}: the gold predictive is the prior's, "
                   "since an unlabelled test image leaves r_i at its prior"]
                  if per_image else []),
        "warnings": warnings, "options": asdict(options),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out) if out is not None else run.folder / CHECK_FOLDER
    make_folder(out)
    plot_check(out / PLOT_FILE, nuts, {s: reports[s] for s in global_sites}, checks, guides,
               priors)
    write_json(out / CHECK_FILE, result)
    return result


def check_warnings(reports: dict, diagnostics: dict, per_image: tuple[str, ...]) -> list[str]:
    """Plain-language warnings: unconverged NUTS, an unreliable importance sampler, a guide
    that is no usable importance proposal."""
    warnings = []
    if diagnostics and not diagnostics["converged"]:
        warnings.append(
            f"NUTS has not converged (r_hat max {diagnostics['rhat_max']:.3f}, bulk ESS min "
            f"{diagnostics['ess_bulk_min']:.0f}, tail ESS min {diagnostics['ess_tail_min']:.0f}"
            "): the gold standard is approximate. Run more --warmup/--samples or --chains.")
    for site in per_image:
        if reports[site]["gold_khat_max"] > KHAT_LIMIT:
            warnings.append(f"'{site}': the prior is a poor importance proposal for some "
                            f"images (k-hat {reports[site]['gold_khat_max']:.2f} > "
                            f"{KHAT_LIMIT}); raise --draws.")
    for site in per_image:
        if reports[site]["amortization_gap"] < 0:
            warnings.append(f"'{site}': the moment-matched fit of the exact posteriors has a "
                            "lower ELBO than the guide (its sds are noisy at this many draws): "
                            "the amortization gap is not usable; raise --draws.")
    for site, report in reports.items():
        if report["khat"] > KHAT_LIMIT:
            warnings.append(f"'{site}': the guide is not a usable importance proposal for the "
                            f"posterior (Pareto k-hat {report['khat']:.2f} > {KHAT_LIMIT}).")
    return warnings


def guide_khat(run: Run, draws: int = 200, images: int = 16, seed: int = 0
               ) -> dict[str, float] | None:
    """The Pareto k-hat of the guide as importance proposal for the posterior, per latent
    site (cheap: no MCMC): global sites on the full training data with `draws` guide draws;
    per-image sites jointly over `images` random (image, view) pairs. None for a model
    without random latents."""
    if not run.program.latent_sites or not run.program.stochastic:
        return None
    with fp32(run):
        run.program.set_classes(run.base.classnames)
        features, labels = training_data(run)
        global_sites, per_image = checked_sites(run.program, features[0])
        result = {}
        if global_sites:
            khat = global_khat(run.program, features, labels, draws, seed)
            result.update({site: khat for site in global_sites})
        if per_image:
            generator = torch.Generator().manual_seed(seed)
            chosen = torch.randperm(features.shape[1], generator=generator)[:images]
            view = torch.randint(features.shape[0], (len(chosen),), generator=generator)
            with torch.no_grad(), seeded(seed):
                weights = particle_log_weights(run.program, draws, features[view, chosen],
                                               labels[chosen], None, True)
            result.update({site: pareto_khat(weights.sum(1)) for site in per_image})
    return result
