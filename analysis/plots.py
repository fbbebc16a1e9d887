"""Matplotlib PNG figures for the analysis. Each function takes data and an output path.

Figures are ``matplotlib.figure.Figure`` objects drawn on the Agg canvas, never registered with
pyplot: nothing to close, and importing this module leaves the user's pyplot backend alone
(e.g. inline plots in a notebook). ArviZ plots are drawn into axes we create.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import arviz as az
import matplotlib
import numpy as np
from bayesprompt.analysis.inference_data import ARVIZ_1
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from bayesprompt.figures import DPI, new_figure, save_figure
from bayesprompt.metrics import aurc, selective_risk, to_numpy


def plot_reliability_diagram(
    report: Mapping[str, Mapping[str, Any]], path: str | os.PathLike
) -> None:
    """Reliability diagram per split: accuracy vs confidence bars, the diagonal, bin counts.

    Args:
        report: output of :func:`analysis.calibration.calibration_report` (or a subset of its
            entries), split name -> metrics with ``reliability`` and ``ece``.
        path: PNG file to write.
    """
    names = list(report)
    fig = new_figure(figsize=(3.6 * len(names), 4.6), layout="tight")
    axes = fig.subplots(
        2, len(names), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    for col, name in enumerate(names):
        bins = report[name]["reliability"]
        centres = (bins.edges[:-1] + bins.edges[1:]) / 2
        width = np.diff(bins.edges)
        top, bottom = axes[0, col], axes[1, col]
        top.bar(
            centres,
            np.nan_to_num(bins.accuracy),
            width,
            edgecolor="black",
            color="tab:blue",
            label="accuracy",
        )
        top.plot(centres, bins.confidence, "o", ms=3, color="tab:red", label="mean confidence")
        top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}  (ECE {report[name]['ece']:.3f})")
        bottom.bar(centres, bins.count, width, edgecolor="black", color="lightgrey")
        bottom.set(xlabel="confidence", yscale="log")
        bottom.yaxis.set_minor_formatter(NullFormatter())  # no crowded labels within a decade
        if col == 0:
            top.set_ylabel("accuracy")
            bottom.set_ylabel("images (log)")
            top.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def plot_uncertainty_histograms(
    uncertainties: Mapping[str, Any],
    split: Sequence[str],
    path: str | os.PathLike,
    groups: Sequence[str] = ("base", "new"),
    bins: int = 30,
) -> None:
    """Histograms of each uncertainty measure, one panel per measure, groups overlaid.

    Args:
        uncertainties: measure name -> (N,) values in nats, e.g. ``{"entropy": ..., "MI": ...}``.
        split: (N,) split name of each image.
        path: PNG file to write.
        groups: split names to compare.
        bins: number of histogram bins, shared by the groups of a panel.
    """
    split = np.asarray(split, dtype=str)
    fig = new_figure(figsize=(4.2 * len(uncertainties), 3.2), layout="tight")
    axes = fig.subplots(1, len(uncertainties), squeeze=False)[0]
    for ax, (name, values) in zip(axes, uncertainties.items(), strict=True):
        values = to_numpy(values)
        edges = np.histogram_bin_edges(values[np.isin(split, groups)], bins=bins)
        for group in groups:
            v = values[split == group]
            ax.hist(v, edges, density=True, alpha=0.5, label=f"{group} (n={len(v)})")
        ax.set(xlabel=f"{name} (nats)", ylabel="density", title=name)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_selective_prediction(
    correct: Any, uncertainties: Mapping[str, Any], path: str | os.PathLike
) -> None:
    """Accuracy vs coverage when rejecting the most uncertain images first, one curve per
    uncertainty measure, plus the oracle that rejects errors first. Legend shows AURC.

    Args:
        correct: (N,) bool, whether each prediction is right.
        uncertainties: measure name -> (N,) scores, larger = less certain.
        path: PNG file to write.
    """
    correct = to_numpy(correct).astype(bool)
    curves = dict(uncertainties)
    curves["oracle"] = ~correct
    fig = new_figure(figsize=(4.8, 3.6), layout="tight")
    ax = fig.subplots()
    for name, uncertainty in curves.items():
        coverage, risk = selective_risk(correct, uncertainty)
        style = {"color": "black", "ls": ":"} if name == "oracle" else {}
        label = f"{name} (AURC {aurc(correct, uncertainty):.3f})"
        ax.plot(coverage, 1 - risk, label=label, **style)
    ax.set(
        xlabel="coverage (fraction of images kept)",
        ylabel="accuracy on kept images",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        title="Selective prediction",
    )
    ax.legend(fontsize=8, loc="lower left")
    save_figure(fig, path)


def principal_components(points: np.ndarray, k: int = 2
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of points (M, D): their mean (D,), the first k components (k, D) with a fixed sign
    (largest entry positive) and the fraction of the variance each explains (k,)."""
    mean = points.mean(axis=0)
    _, singular, vt = np.linalg.svd(points - mean, full_matrices=False)
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])[:, None]
    return mean, vt[:k], singular[:k] ** 2 / (singular**2).sum()


def plot_feature_projection(
    text_samples: Any,
    template_features: Any,
    image_features: Any,
    labels: Any,
    classnames: Sequence[str],
    path: str | os.PathLike,
    classes: Sequence[int] | None = None,
    max_points: int = 300,
    seed: int = 0,
) -> None:
    """2D PCA of sampled prompt text features, template text features and image features.

    The PCA is fitted on all plotted points together. CLIP's image and text features occupy
    different regions (the modality gap), which usually shows up along the first component.

    Args:
        text_samples: (S, C, D) or (S, N, C, D) sampled class text features.
        template_features: (K, C, D) hand-crafted template features.
        image_features: (N, D) image features.
        labels: (N,) true labels of the images.
        classnames: C class names.
        path: PNG file to write.
        classes: class indices to show (default: the first min(C, 5)).
        max_points: at most this many sampled prompts and images per class (random subset).
        seed: seed of that subset.
    """
    samples = to_numpy(text_samples)
    samples = samples.reshape(-1, *samples.shape[-2:])  # (S', C, D)
    templates, images, labels = map(to_numpy, (template_features, image_features, labels))
    classes = list(range(min(len(classnames), 5))) if classes is None else list(classes)
    rng = np.random.default_rng(seed)

    def subset(x: np.ndarray) -> np.ndarray:
        return x[rng.permutation(len(x))[:max_points]]

    kinds = {  # marker, size, alpha; drawn in this order
        "prompt samples": ("o", 10, 0.35),
        "images": ("^", 16, 0.6),
        "templates": ("x", 30, 0.9),
    }
    per_kind = {
        "prompt samples": lambda c: subset(samples[:, c]),
        "images": lambda c: subset(images[labels == c]),
        "templates": lambda c: templates[:, c],
    }
    points = {(c, kind): per_kind[kind](c) for kind in kinds for c in classes}
    mean, components, explained = principal_components(np.concatenate(list(points.values())))

    fig = new_figure(figsize=(6.4, 5.0))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10"]
    for (c, kind), x in points.items():
        marker, size, alpha = kinds[kind]
        xy = (x - mean) @ components.T
        ax.scatter(xy[:, 0], xy[:, 1], s=size, marker=marker, alpha=alpha,
                   color=colours(classes.index(c) % 10), linewidths=1)
    class_handles = [
        Line2D([], [], ls="", marker="s", color=colours(i % 10), label=classnames[c])
        for i, c in enumerate(classes)
    ]
    kind_handles = [
        Line2D([], [], ls="", marker=m, color="grey", label=k) for k, (m, _, _) in kinds.items()
    ]
    legend = ax.legend(
        handles=class_handles,
        title="class",
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.add_artist(legend)
    ax.legend(
        handles=kind_handles, title="kind", fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0)
    )
    ax.set(
        xlabel=f"PC 1 ({explained[0]:.0%} of variance)",
        ylabel=f"PC 2 ({explained[1]:.0%} of variance)",
        title="Text and image features (PCA)",
    )
    save_figure(fig, path)


def _latent_coords(idata: Any, var_name: str, max_dims: int | None, image: int
                   ) -> dict[str, list]:
    """Selection of a few scalar components of ``var_name``: index ``image`` on the image dim,
    index 0 on other leading dims, the first ``max_dims`` entries of the last dim (all: None)."""
    da = idata["posterior"][var_name]
    event_dims = [d for d in da.dims if d not in ("chain", "draw")]
    coords = {d: [image if d == "image" else 0] for d in event_dims[:-1]}
    if event_dims:
        last = event_dims[-1]
        coords[last] = list(da[last].values[:max_dims])
    return coords


def _selection_title(var_name: str, coords: Mapping[str, list]) -> str:
    """E.g. ``r  (image = 0, ctx_dim = 0..3)``."""
    parts = [
        f"{dim} = {values[0]}" if len(values) == 1 else f"{dim} = {values[0]}..{values[-1]}"
        for dim, values in coords.items()
    ]
    return f"{var_name}  ({', '.join(parts)})"


def _save_arviz_1(plot: Any, path: str | os.PathLike) -> None:
    """Save an ArviZ 1.x PlotCollection (matplotlib backend) and close its pyplot figure.

    Not covered by the test suite (ArviZ 0.23); checked by hand with ArviZ 1.3.0.
    """
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(plt.gcf())


def plot_latent_posterior(
    idata: Any, path: str | os.PathLike, var_name: str = "r", max_dims: int = 4, image: int = 0
) -> None:
    """ArviZ posterior densities (mean and 94% HDI) of a few components of a latent.

    Args:
        idata: output of :func:`analysis.inference_data.to_inference_data`.
        path: PNG file to write.
        var_name: latent site, e.g. ``r`` (per-image residuals) or ``ctx``.
        max_dims: number of components of the last dim to show.
        image: image index for per-image latents.
    """
    coords = _latent_coords(idata, var_name, max_dims, image)
    if ARVIZ_1:
        plot = az.plot_dist(idata, var_names=[var_name], coords=coords, backend="matplotlib")
        _save_arviz_1(plot, path)
        return
    n_panels = int(np.prod([len(v) for v in coords.values()]))
    fig = new_figure(figsize=(3.2 * n_panels, 3.6), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    az.plot_posterior(idata, var_names=[var_name], coords=coords, ax=axes, textsize=9)
    for ax in axes:  # ArviZ writes "mean=..." at 0.8 of the height, across the density peak
        top = ax.get_ylim()[1]
        ax.set_ylim(top=1.25 * top)
        for text in ax.texts:
            if text.get_text().startswith("mean="):
                text.set_y(1.12 * top)
    fig.suptitle(_selection_title(var_name, coords))
    save_figure(fig, path)


def plot_latent_forest(
    idata: Any, path: str | os.PathLike, var_name: str = "r", max_dims: int = 8, image: int = 0
) -> None:
    """ArviZ forest plot (94% HDI, interquartile range and mean) of the ``max_dims`` most
    constrained components of a latent: those of smallest posterior standard deviation (over
    the draws), i.e. relative to the N(0, I) prior of the residuals, the ones the data pinned
    down most (image ``image`` for per-image latents).

    Args: as :func:`plot_latent_posterior`.
    """
    coords = _most_constrained(idata, var_name, _latent_coords(idata, var_name, None, image),
                               max_dims)
    if ARVIZ_1:
        plot = az.plot_forest(idata, var_names=[var_name], coords=coords, backend="matplotlib")
        _save_arviz_1(plot, path)
        return
    n_rows = int(np.prod([len(v) for v in coords.values()]))
    fig = new_figure(figsize=(5.0, 0.45 * n_rows + 1.2), layout="constrained")
    ax = fig.subplots()
    az.plot_forest(idata, var_names=[var_name], coords=coords, combined=True, ax=ax, textsize=9)
    last = list(coords)[-1] if coords else None
    fixed = {d: v for d, v in coords.items() if d != last}
    fig.suptitle(f"{_selection_title(var_name, fixed)}: the {len(coords.get(last, []))} "
                 "components of smallest posterior sd" if last else var_name)
    save_figure(fig, path)


def _most_constrained(idata: Any, var_name: str, coords: dict[str, list], max_dims: int
                      ) -> dict[str, list]:
    """``coords`` with the entries of the last dim cut to the ``max_dims`` of smallest
    posterior standard deviation (in the order of the dim)."""
    if not coords:
        return coords
    da = idata["posterior"][var_name]
    *leading, last = coords
    sd = da.isel({d: coords[d][0] for d in leading}).std(("chain", "draw")).values   # (K,)
    chosen = np.sort(np.argsort(sd, kind="stable")[:max_dims])
    return {**{d: coords[d] for d in leading}, last: list(da[last].values[chosen])}


def plot_grouped_bars(
    panels: Mapping[str, Mapping[str, Mapping[str, tuple[float | None, float | None]]]],
    path: str | os.PathLike,
    ylabel: str = "accuracy (%)",
) -> None:
    """Grouped bar charts, one panel per entry: groups on the x axis, one bar per series.

    Args:
        panels: panel title -> group label -> series name -> (mean, std); a None mean draws no
            bar, a None std no error bar. Series are coloured alike in every panel. The y axis
            starts at the multiple of 10 at least 5 below the lowest mean - std (or at 0).
        path: PNG file to write.
        ylabel: label of the y axis.
    """
    series = list(dict.fromkeys(s for groups in panels.values() for bars in groups.values()
                                for s in bars))
    n_groups = max(len(groups) for groups in panels.values())
    width = 0.8 / len(series)
    fig = new_figure(figsize=(max(6.0, 1.2 * n_groups * (0.5 + 0.25 * len(series))),
                           3.2 * len(panels)), layout="tight")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    colours = matplotlib.colormaps["tab10"]
    for ax, (title, groups) in zip(axes, panels.items(), strict=True):
        x = np.arange(len(groups))
        for k, name in enumerate(series):
            values = [groups[g].get(name, (None, None)) for g in groups]
            means = np.array([np.nan if m is None else m for m, _ in values])
            stds = np.array([np.nan if s is None else s for _, s in values])
            ax.bar(x + (k - (len(series) - 1) / 2) * width, means, width, yerr=stds,
                   capsize=2, color=colours(k), label=name, error_kw={"elinewidth": 0.8})
        lows = [m - (s or 0) for bars in groups.values() for m, s in bars.values()
                if m is not None]
        ax.set_ylim(bottom=max(0.0, 10 * math.floor((min(lows, default=0) - 5) / 10)))
        ax.set_xticks(x, list(groups), rotation=30, ha="right", fontsize=8)
        ax.set(title=title, ylabel=ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


