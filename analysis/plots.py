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
from bayesprompt.analysis._arrays import to_numpy
from bayesprompt.analysis.inference_data import ARVIZ_1
from bayesprompt.analysis.uncertainty import aurc, selective_risk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from bayesprompt.files import atomic_write

DPI = 150


def _figure(**kwargs: Any) -> Figure:
    """A pyplot-free figure on the Agg canvas."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """Save ``fig`` as PNG atomically, creating the folder. Every legend counts for the tight
    bounding box (by default a legend kept with ``ax.add_artist`` beside the axes is cut off)."""
    legends = [legend for ax in fig.axes for legend in ax.findobj(Legend)]
    extra = fig.get_default_bbox_extra_artists() + legends
    atomic_write(path, lambda temporary: fig.savefig(
        temporary, format="png", dpi=DPI, bbox_inches="tight", bbox_extra_artists=extra))


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
    fig = _figure(figsize=(3.6 * len(names), 4.6), layout="tight")
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
    _save(fig, path)


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
    fig = _figure(figsize=(4.2 * len(uncertainties), 3.2), layout="tight")
    axes = fig.subplots(1, len(uncertainties), squeeze=False)[0]
    for ax, (name, values) in zip(axes, uncertainties.items(), strict=True):
        values = to_numpy(values)
        edges = np.histogram_bin_edges(values[np.isin(split, groups)], bins=bins)
        for group in groups:
            v = values[split == group]
            ax.hist(v, edges, density=True, alpha=0.5, label=f"{group} (n={len(v)})")
        ax.set(xlabel=f"{name} (nats)", ylabel="density", title=name)
        ax.legend(fontsize=8)
    _save(fig, path)


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
    fig = _figure(figsize=(4.8, 3.6), layout="tight")
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
    _save(fig, path)


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
    stacked = np.concatenate(list(points.values()))
    mean = stacked.mean(axis=0)
    _, singular, vt = np.linalg.svd(stacked - mean, full_matrices=False)
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])[:, None]  # fix PC signs
    explained = singular[:2] ** 2 / (singular**2).sum()

    fig = _figure(figsize=(6.4, 5.0))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10"]
    for (c, kind), x in points.items():
        marker, size, alpha = kinds[kind]
        xy = (x - mean) @ vt[:2].T
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            s=size,
            marker=marker,
            alpha=alpha,
            color=colours(classes.index(c) % 10),
            linewidths=1,
        )
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
    _save(fig, path)


def _latent_coords(idata: Any, var_name: str, max_dims: int, image: int) -> dict[str, list]:
    """Selection of a few scalar components of ``var_name``: index ``image`` on the image dim,
    index 0 on other leading dims, the first ``max_dims`` entries of the last dim."""
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
    fig = _figure(figsize=(3.2 * n_panels, 3.6), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    az.plot_posterior(idata, var_names=[var_name], coords=coords, ax=axes, textsize=9)
    for ax in axes:  # ArviZ writes "mean=..." at 0.8 of the height, across the density peak
        top = ax.get_ylim()[1]
        ax.set_ylim(top=1.25 * top)
        for text in ax.texts:
            if text.get_text().startswith("mean="):
                text.set_y(1.12 * top)
    fig.suptitle(_selection_title(var_name, coords))
    _save(fig, path)


def plot_latent_forest(
    idata: Any, path: str | os.PathLike, var_name: str = "r", max_dims: int = 8, image: int = 0
) -> None:
    """ArviZ forest plot (94% HDI, interquartile range and mean) of a few components of a latent.

    Args: as :func:`plot_latent_posterior`.
    """
    coords = _latent_coords(idata, var_name, max_dims, image)
    if ARVIZ_1:
        plot = az.plot_forest(idata, var_names=[var_name], coords=coords, backend="matplotlib")
        _save_arviz_1(plot, path)
        return
    n_rows = int(np.prod([len(v) for v in coords.values()]))
    fig = _figure(figsize=(5.0, 0.45 * n_rows + 1.2), layout="constrained")
    ax = fig.subplots()
    az.plot_forest(idata, var_names=[var_name], coords=coords, combined=True, ax=ax, textsize=9)
    fig.suptitle(_selection_title(var_name, coords))
    _save(fig, path)


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
    fig = _figure(figsize=(max(6.0, 1.2 * n_groups * (0.5 + 0.25 * len(series))),
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
    _save(fig, path)


def _training_x(rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, str]:
    """Each row's position on the x axis, the middle of the steps it averages (a row covers
    the steps since the previous row, an epoch row its epoch): in epochs when an epoch row
    tells how many steps an epoch has, else in steps."""
    epoch_rows = [row for row in rows if row["kind"] == "epoch"]
    per_epoch = epoch_rows[0]["step"] / epoch_rows[0]["epoch"] if epoch_rows else None
    middles, previous = [], 0
    for row in rows:
        start = (row["epoch"] - 1) * per_epoch if row["kind"] == "epoch" and per_epoch \
            else previous
        middles.append((start + row["step"]) / 2)
        previous = row["step"]
    if per_epoch is None:
        return np.array(middles), "SVI step"
    return np.array(middles) / per_epoch, "epoch"


def plot_loss_curve(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Training curves from the rows of a run's metrics.jsonl (`bayesprompt.training_log`).

    Panels: the loss, its NLL and KL terms, the learning rates, the posterior scale (mean of
    each site with its min-max band) when the guide has one, and the factor terms when the
    model has any. Step rows are drawn faint, epoch rows bold with markers, each at the middle
    of the steps it averages.

    Args:
        rows: metrics.jsonl rows (dicts with kind, step, loss, nll, kl, factors, lr, group_lr,
            posterior_scale).
        path: PNG file to write.
    """
    x, xlabel = _training_x(rows)
    kinds = np.array([row["kind"] for row in rows])
    scale_sites = list(dict.fromkeys(s for row in rows for s in row["posterior_scale"]))
    factor_names = list(dict.fromkeys(f for row in rows for f in row["factors"]))
    panels = ["loss", "nll", "kl", "lr"] + (["scale"] if scale_sites else []) + \
        (["factors"] if factor_names else [])
    columns = 2
    fig = _figure(figsize=(9.0, 2.7 * math.ceil(len(panels) / columns)), layout="tight")
    axes = fig.subplots(math.ceil(len(panels) / columns), columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    colours = matplotlib.colormaps["tab10"]

    has_epochs = bool((kinds == "epoch").any())
    padding = 0.03 * max(float(x.max() - x.min()), 1e-9)

    def curve(ax: Any, values: Sequence[float | None], colour: Any, label: str | None,
              drawstyle: str = "default") -> None:
        """Step rows faint, epoch rows bold; per epoch constant values (drawn as steps) from
        epoch rows alone when there are any."""
        values = np.array([np.nan if v is None else v for v in values], dtype=float)
        for kind, style in (("step", {"alpha": 0.35, "lw": 0.9}),
                            ("epoch", {"lw": 1.8, "marker": "o", "ms": 3})):
            chosen = kinds == kind
            if kind == "step" and drawstyle == "steps-mid" and has_epochs:
                continue
            if chosen.any():
                ax.plot(x[chosen], values[chosen], color=colour, drawstyle=drawstyle,
                        label=label if kind == "epoch" or not has_epochs else None,
                        **style)

    titles = {"loss": "loss (objective per image)", "nll": "expected NLL of the labels",
              "kl": "KL term (as in the loss)", "lr": "learning rate",
              "scale": "posterior scale (guide std)", "factors": "factor terms (as in the loss)"}
    for ax, panel in zip(axes, panels, strict=False):
        if panel in ("loss", "nll", "kl"):
            curve(ax, [row[panel] for row in rows], colours(["loss", "nll", "kl"].index(panel)),
                  None)
        elif panel == "lr":
            groups = list(dict.fromkeys(g for row in rows for g in row["group_lr"]))
            ax.set_yscale("log")
            if any(row["lr"] is not None for row in rows):
                curve(ax, [row["lr"] for row in rows], colours(0), "SGD" if groups else None,
                      "steps-mid")
            for k, group in enumerate(groups):
                curve(ax, [row["group_lr"].get(group) for row in rows], colours(k + 1), group,
                      "steps-mid")
            if groups:
                ax.legend(fontsize=7)
        elif panel == "scale":
            for k, site in enumerate(scale_sites):
                statistics = [row["posterior_scale"].get(site, {}) for row in rows]
                curve(ax, [s.get("mean") for s in statistics], colours(k), f"{site} mean")
                epoch = kinds == "epoch"
                if epoch.any():
                    low = np.array([s.get("min", np.nan) for s in statistics], dtype=float)
                    high = np.array([s.get("max", np.nan) for s in statistics], dtype=float)
                    ax.fill_between(x[epoch], low[epoch], high[epoch], color=colours(k),
                                    alpha=0.15, label=f"{site} min-max (epoch)")
            ax.legend(fontsize=7)
        else:
            for k, name in enumerate(factor_names):
                curve(ax, [row["factors"].get(name) for row in rows], colours(k), name)
            ax.legend(fontsize=7)
        ax.set_xlim(x.min() - padding, x.max() + padding)  # the same range in every panel
        ax.set_title(titles[panel], fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _save(fig, path)
