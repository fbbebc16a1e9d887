"""`loss_curve.png`: the training curves of a run folder's metrics.jsonl, drawn at the end of
training."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from bayesprompt.figures import new_figure, save_figure
from bayesprompt.inference.training_log import METRICS_FILE, read_rows

LOSS_CURVE_FILE = "loss_curve.png"


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
    """Training curves from the rows of a run's metrics.jsonl (`inference/training_log.py`).

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
    fig = new_figure(figsize=(9.0, 2.7 * math.ceil(len(panels) / columns)), layout="tight")
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
    save_figure(fig, path)


def write_loss_curve(folder: Path | str) -> Path | None:
    """`loss_curve.png` of a run folder from its metrics.jsonl (None when it has no rows)."""
    folder = Path(folder)
    rows = read_rows(folder / METRICS_FILE)
    if not rows:
        return None
    plot_loss_curve(rows, folder / LOSS_CURVE_FILE)
    return folder / LOSS_CURVE_FILE

