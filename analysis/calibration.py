"""Calibration of the posterior-predictive mean: ECE, NLL, Brier score, reliability bins.

All metrics act on the posterior-predictive mean ``p̄ = mean_s p_s`` of shape (N, C).
Confidence is ``max_c p̄[n, c]`` and the prediction is its argmax.

Bin convention (ECE and reliability diagram): ``n_bins`` equal-width bins on [0, 1]; bin b is
``(b / n_bins, (b + 1) / n_bins]``, and the first bin also holds confidence 0. So a confidence
of exactly 1.0 falls in the last bin. ``torchmetrics`` bins as ``[lo, hi)`` and gives
confidence 1.0 a bin of its own; the two agree whenever no confidence sits exactly on a bin
edge (true for continuous scores almost surely), which the tests check.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from bayesprompt.metrics import (
    N_BINS,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    predictive_mean,
    reliability_bins,
    to_numpy,
)


def calibration_report(
    probs: Any, labels: Any, split: Sequence[str] | None = None, n_bins: int = N_BINS
) -> dict[str, dict[str, Any]]:
    """Accuracy, ECE, NLL, Brier and reliability bins of the predictive mean, per split.

    Args:
        probs: (S, N, C) class probabilities per posterior sample.
        labels: (N,) true labels.
        split: optional (N,) split names; each distinct value gets its own entry (sorted).
        n_bins: number of ECE bins.

    Returns:
        ``{"all": metrics, <split>: metrics, ...}`` where metrics holds ``n``, ``accuracy``,
        ``ece``, ``nll``, ``brier`` (floats) and ``reliability`` (:class:`ReliabilityBins`).
    """
    mean_probs, labels = predictive_mean(probs), to_numpy(labels)
    groups = {"all": np.ones(len(labels), dtype=bool)}
    if split is not None:
        split = np.asarray(split, dtype=str)
        groups.update({name: split == name for name in sorted(set(split))})
    report = {}
    for name, mask in groups.items():
        p, y = mean_probs[mask], labels[mask]
        report[name] = {
            "n": int(mask.sum()),
            "accuracy": float((p.argmax(axis=1) == y).mean()),
            "ece": expected_calibration_error(p, y, n_bins),
            "nll": negative_log_likelihood(p, y),
            "brier": brier_score(p, y),
            "reliability": reliability_bins(p, y, n_bins),
        }
    return report
