"""Several runs side by side: risk-coverage curves and reliability diagrams, one PNG each.

    bayesprompt-analyze RUN_A RUN_B ... --out DIR      (experiments/analyze.py)

A run is a `bayesprompt.Run` or a `bayesprompt.Ensemble`; each predicts with its defaults (the
draws of results.json), so the curves match results.json's `risk_coverage` and `aurc`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from bayesprompt.analysis.calibration import calibration_report
from bayesprompt.analysis.plots import plot_reliability_diagram

from bayesprompt.figures import new_figure, save_figure
from bayesprompt.files import make_folder
from bayesprompt.metrics import aurc, selective_risk
from bayesprompt.selective import uncertainty_scores


def plot_risk_coverage(panels: Mapping[str, Mapping[str, tuple[Any, Any]]],
                       path: str | os.PathLike, ylabel: str = "risk (error rate) on kept images"
                       ) -> None:
    """Risk-coverage curves, one panel per entry, one line per run (coloured alike in every
    panel), AURC (mean risk over the curve's points) in the legend.

    Args:
        panels: panel title -> run label -> (coverage (K,), risk (K,)).
        path: PNG file to write.
    """
    labels = list(dict.fromkeys(label for curves in panels.values() for label in curves))
    colours = matplotlib.colormaps["tab20" if len(labels) > 10 else "tab10"]
    fig = new_figure(figsize=(5.6 * len(panels), 4.2), layout="tight")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, curves) in zip(axes, panels.items(), strict=True):
        for label, (coverage, risk) in curves.items():
            risk = np.asarray(risk, float)
            ax.plot(coverage, risk, color=colours(labels.index(label)),
                    label=f"{label} (AURC {risk.mean():.3f})")
        ax.set(xlabel="coverage (fraction of images kept, most certain first)", ylabel=ylabel,
               xlim=(0, 1), title=title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


def compare_runs(runs: Mapping[str, Any], splits: Sequence[str], out: Path) -> dict[str, Any]:
    """For each split: `risk_coverage_<split>.png` (max-softmax score; and predictive entropy
    and mutual information in panels of their own) and `reliability_<split>.png` (one panel per
    run). Returns split -> run -> {"accuracy", "ece", "aurc": {score: x}}."""
    make_folder(out)
    summary: dict[str, Any] = {}
    for split in splits:
        curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        reports, summary[split] = {}, {}
        for label, run in runs.items():
            run.set_classes(run.dataset(split).classnames)
            features, labels = run.test_features(split)
            probs = run.predict(features)
            correct = (probs.mean(0).argmax(-1) == labels).numpy()
            scores = uncertainty_scores(probs)
            for score, values in scores.items():
                curves.setdefault(f"{split}: {score}", {})[label] = selective_risk(correct,
                                                                                   values)
            reports[label] = calibration_report(probs, labels)["all"]
            summary[split][label] = {"accuracy": reports[label]["accuracy"],
                                     "ece": reports[label]["ece"],
                                     "aurc": {s: aurc(correct, v) for s, v in scores.items()}}
        plot_risk_coverage(curves, out / f"risk_coverage_{split}.png")
        plot_reliability_diagram(reports, out / f"reliability_{split}.png")
    return summary
