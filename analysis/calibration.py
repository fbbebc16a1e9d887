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
from dataclasses import dataclass
from typing import Any

import numpy as np
from bayesprompt.analysis._arrays import to_numpy

N_BINS = 15
EPS = 1e-12


@dataclass
class ReliabilityBins:
    """Per-bin statistics for a reliability diagram; empty bins have NaN accuracy/confidence.

    Attributes:
        edges: (B + 1,) bin edges from 0 to 1.
        accuracy: (B,) fraction of correct predictions in each bin.
        confidence: (B,) mean confidence in each bin.
        count: (B,) number of images in each bin.
    """

    edges: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    count: np.ndarray


def predictive_mean(probs: Any) -> np.ndarray:
    """Posterior-predictive mean probabilities: (S, N, C) -> (N, C)."""
    return to_numpy(probs).mean(axis=0)


def reliability_bins(mean_probs: Any, labels: Any, n_bins: int = N_BINS) -> ReliabilityBins:
    """Bin images by confidence (see module docstring for the edge convention).

    Args:
        mean_probs: (N, C) posterior-predictive mean probabilities.
        labels: (N,) true labels.
        n_bins: number of equal-width bins.
    """
    mean_probs, labels = to_numpy(mean_probs), to_numpy(labels)
    confidence = mean_probs.max(axis=1)
    correct = (mean_probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" gives the index b with edges[b-1] < conf <= edges[b], i.e. bins (lo, hi].
    bin_index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bin_index, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(bin_index, weights=confidence, minlength=n_bins) / count
    return ReliabilityBins(edges, accuracy, mean_conf, count)


def expected_calibration_error(mean_probs: Any, labels: Any, n_bins: int = N_BINS) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over non-empty bins.

    Args:
        mean_probs: (N, C) posterior-predictive mean probabilities.
        labels: (N,) true labels.
    """
    bins = reliability_bins(mean_probs, labels, n_bins)
    filled = bins.count > 0
    gap = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(bins.count[filled] * gap) / bins.count.sum())


def negative_log_likelihood(mean_probs: Any, labels: Any) -> float:
    """Mean over images of ``-log p̄[n, y_n]`` (probabilities floored at 1e-12).

    Args:
        mean_probs: (N, C); labels: (N,).
    """
    mean_probs, labels = to_numpy(mean_probs), to_numpy(labels)
    p_true = mean_probs[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(p_true, EPS)).mean())


def brier_score(mean_probs: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over images of ``sum_c (p̄[n, c] - 1[c = y_n])^2``, in [0, 2].

    Args:
        mean_probs: (N, C); labels: (N,).
    """
    mean_probs, labels = to_numpy(mean_probs), to_numpy(labels)
    one_hot = np.eye(mean_probs.shape[1])[labels]
    return float(((mean_probs - one_hot) ** 2).sum(axis=1).mean())


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
