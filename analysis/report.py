"""From posterior samples to ``RUN_DIR/analysis/``: netCDF files, metrics.json and figures.

See docs/ANALYSIS.md for what each metric and figure means. The entry point is
:func:`write_analysis`; the other functions are its steps, usable one by one (as the notebook
analysis/notebooks/posterior_diagnostics.ipynb does).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import torch
from bayesprompt.analysis.calibration import calibration_report
from bayesprompt.analysis.coverage import prompt_spread, template_coverage, template_distances
from bayesprompt.analysis.inference_data import held_out_elpd, save_inference_data
from bayesprompt.analysis.plots import (
    plot_feature_projection,
    plot_latent_forest,
    plot_latent_posterior,
    plot_reliability_diagram,
    plot_selective_prediction,
    plot_uncertainty_histograms,
)
from bayesprompt.analysis.posterior import RunPosterior, SplitSamples, template_features
from bayesprompt.analysis.uncertainty import separation_auroc, uncertainty_decomposition

from bayesprompt.files import make_folder, write_json
from bayesprompt.metrics import aurc

#: Pareto k above which ArviZ calls an image's importance-sampling LOO estimate unreliable.
PARETO_K_LIMIT = 0.7

#: Credible level of the template-coverage region, and its PCA dimension.
CREDIBLE_LEVEL = 0.9
CREDIBLE_DIMS = 2


def measures(probs: torch.Tensor, deterministic: bool) -> dict[str, np.ndarray]:
    """Uncertainty decomposition (N,) per measure; a point-estimate model has no epistemic
    part (its value would be floating-point noise of identical samples), so it is left out."""
    uncertainty = uncertainty_decomposition(probs.double())
    if deterministic:
        del uncertainty["epistemic"]
    return uncertainty


def split_metrics(samples: SplitSamples, deterministic: bool) -> dict[str, Any]:
    """Accuracy, ECE, NLL, Brier, mean uncertainties and AURCs of one split."""
    report = calibration_report(samples.probs, samples.labels)["all"]
    uncertainty = measures(samples.probs, deterministic)
    correct = samples.probs.mean(0).argmax(-1).numpy() == samples.labels.numpy()
    return {
        **{k: report[k] for k in ("n", "accuracy", "ece", "nll", "brier")},
        "mean_uncertainty": {k: float(v.mean()) for k, v in uncertainty.items()},
        "aurc": {k: aurc(correct, v) for k, v in uncertainty.items()},
    }


def coverage_metrics(samples: SplitSamples, templates: np.ndarray,
                     deterministic: bool) -> dict[str, Any] | None:
    """Prompt spread, distance to template features and template coverage, class means.

    Args:
        samples: a split with sampled text features (S, C, D) or (S, M, C, D).
        templates: (K, C, D) template features of the split's classes.
        deterministic: point-estimate model; its credible region is undefined (None), as it
            is with S <= CREDIBLE_DIMS samples.

    Returns:
        None when the model has no prompts (zeroshot).
    """
    if samples.text_features is None:
        return None
    text = samples.text_features.double()
    spread = prompt_spread(text)
    distances = template_distances(text, templates)                           # (C, K)
    fraction = None
    if not deterministic and text.shape[0] > CREDIBLE_DIMS:
        fraction = float(template_coverage(text, templates, CREDIBLE_LEVEL,
                                           CREDIBLE_DIMS).mean())
    return {
        "prompt_spread": float(spread["mean_distance"].mean()),
        "total_variance": float(spread["total_variance"].mean()),
        "template_distance": float(distances.mean()),
        "nearest_template_distance": float(distances.min(axis=1).mean()),
        "template_fraction_in_credible_region": fraction,
    }


def loo_metrics(idata: Any, split: str) -> dict[str, Any]:
    """PSIS-LOO (``az.loo``) of the data the posterior was conditioned on (the ``train`` file):
    elpd_loo, p_loo and the images whose Pareto k exceeds 0.7; a warning says when LOO is
    unreliable (docs/ANALYSIS.md: how many draws it needs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's own warning about k; ours says what to do
        loo = az.loo(idata, pointwise=True)
    k = np.asarray(loo.pareto_k).reshape(-1)
    unreliable = int((k > PARETO_K_LIMIT).sum())
    if unreliable:
        warnings.warn(
            f"LOO on '{split}' is unreliable: {unreliable} of {k.size} images have Pareto k > "
            f"{PARETO_K_LIMIT} with {idata.posterior.sizes['draw']} draws. Draw more "
            "(--num-samples; docs/ANALYSIS.md, 'Comparing runs: loo') before comparing runs "
            "by elpd_loo.", stacklevel=2)
    return {"elpd_loo": float(loo.elpd_loo), "p_loo": float(loo.p_loo),
            "pareto_k_max": float(k.max()), "pareto_k_above_0.7": unreliable}


def pooled_uncertainty(posterior: RunPosterior) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Uncertainties (N_all,) of all splits' images concatenated, and their split names."""
    parts = [measures(s.probs, posterior.deterministic) for s in posterior.splits.values()]
    split = np.concatenate([[s.name] * len(s.labels) for s in posterior.splits.values()])
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, split


def separation_metrics(posterior: RunPosterior) -> dict[str, dict[str, float]]:
    """AUROC of each uncertainty for new vs base and for each domain vs base."""
    uncertainty, split = pooled_uncertainty(posterior)
    others = [name for name in posterior.splits if name != "base"]
    if "base" not in posterior.splits:
        return {}
    return {f"{name}_vs_base": separation_auroc(uncertainty, split, name, "base")
            for name in others}


def write_plots(posterior: RunPosterior, idata: dict[str, Any],
                templates: dict[str, np.ndarray], out: Path) -> list[str]:
    """Write every figure into ``out``; returns the file names."""
    files = []

    def path(name: str) -> Path:
        files.append(name)
        return out / name

    splits = posterior.splits
    report = {name: calibration_report(s.probs, s.labels)["all"] for name, s in splits.items()}
    plot_reliability_diagram(report, path("reliability.png"))
    uncertainty, split = pooled_uncertainty(posterior)
    plot_uncertainty_histograms(uncertainty, split, path("uncertainty_histograms.png"),
                                groups=list(splits))
    for name, s in splits.items():
        correct = s.probs.mean(0).argmax(-1).numpy() == s.labels.numpy()
        plot_selective_prediction(correct, measures(s.probs, posterior.deterministic),
                                  path(f"selective_prediction_{name}.png"))
        if s.text_features is not None:
            plot_feature_projection(s.text_features, templates[name], s.features, s.labels,
                                    s.classnames, path(f"prompt_projection_{name}.png"))
    base = idata.get("base")
    if base is not None and not posterior.deterministic:
        for site in posterior.program.latent_sites:
            plot_latent_posterior(base, path(f"posterior_{site}.png"), var_name=site)
            plot_latent_forest(base, path(f"forest_{site}.png"), var_name=site)
    return files


def conditioned_loo(posterior: RunPosterior, conditioned: dict[str, Any]
                    ) -> dict[str, dict[str, Any]]:
    """:func:`loo_metrics` per InferenceData of conditioned data (``train``) of a stochastic
    model with S >= 2 draws; {} otherwise (a point-estimate model's file still gives ``az.loo``,
    p_loo 0, but its Pareto k are meaningless)."""
    if posterior.deterministic or posterior.num_samples < 2:
        return {}
    return {name: loo_metrics(data, name) for name, data in conditioned.items()}


def write_analysis(posterior: RunPosterior, out: Path | None = None) -> dict[str, Any]:
    """Write netCDF files, figures and metrics.json into ``out`` (default RUN_DIR/analysis).

    Returns:
        The metrics written to metrics.json.
    """
    out = Path(out or posterior.run_dir / "analysis")
    make_folder(out)
    idata = {name: s.inference_data() for name, s in posterior.splits.items()}
    train = {} if posterior.train is None else {
        posterior.train.name: posterior.train.inference_data()}
    files = []
    for name, data in {**idata, **train}.items():
        save_inference_data(data, out / f"posterior_{name}.nc")
        files.append(f"posterior_{name}.nc")
    templates, by_classes = {}, {}  # split -> (K, C, D); domains reuse the base classes'
    for name, s in posterior.splits.items():
        if s.text_features is not None:
            key = tuple(s.classnames)
            if key not in by_classes:
                by_classes[key] = template_features(posterior.clip, s.classnames).numpy()
            templates[name] = by_classes[key]
    metrics = {
        "run_dir": str(posterior.run_dir),
        "model": posterior.config.model,
        "dataset": posterior.config.dataset,
        "num_samples": posterior.num_samples,
        "seed": posterior.seed,
        "deterministic": posterior.deterministic,
        "splits": {},
        "auroc": separation_metrics(posterior),
        "loo": conditioned_loo(posterior, train),
    }
    if posterior.deterministic:
        metrics["note"] = (f"'{posterior.config.model}' is a point-estimate model: its "
                           f"{posterior.num_samples} samples are identical, so epistemic "
                           "uncertainty is 0 (left out) and the credible region is undefined.")
    for name, s in posterior.splits.items():
        metrics["splits"][name] = split_metrics(s, posterior.deterministic)
        metrics["splits"][name]["elpd_test"] = held_out_elpd(idata[name])
        metrics["splits"][name]["coverage"] = coverage_metrics(
            s, templates.get(name), posterior.deterministic)
    files += write_plots(posterior, idata, templates, out)
    metrics["files"] = files + ["metrics.json"]
    write_json(out / "metrics.json", metrics)
    return metrics


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """A few human-readable lines about the metrics, for the console."""
    lines = []
    if metrics["deterministic"]:
        lines.append(f"note: {metrics['note']}")
    for name, m in metrics["splits"].items():
        lines.append(f"{name:>12}: accuracy {100 * m['accuracy']:.1f}%  ECE {m['ece']:.3f}  "
                     f"NLL {m['nll']:.3f}  Brier {m['brier']:.3f}  "
                     f"AURC {m['aurc']['total']:.3f}  elpd_test {m['elpd_test']:.2f}  "
                     f"(n={m['n']})")
    for name, values in metrics["auroc"].items():
        lines.append(f"AUROC {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    for name, loo in metrics["loo"].items():
        lines.append(f"PSIS-LOO on '{name}': elpd_loo {loo['elpd_loo']:.2f}  "
                     f"p_loo {loo['p_loo']:.2f}  max Pareto k {loo['pareto_k_max']:.2f}")
    return lines
