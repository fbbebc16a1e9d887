"""Metric kernels on class probabilities: accuracy, harmonic mean, calibration (ECE, NLL,
Brier, reliability bins), predictive uncertainty (entropy, mutual information), selective
prediction (risk-coverage, AURC) and AUROC. numpy in, numbers or numpy arrays out; torch
tensors are accepted anywhere (`to_numpy`).

Calibration acts on the posterior-predictive mean p̄ = mean_s p_s of shape (N, C); confidence
is max_c p̄[n, c] and the prediction its argmax. Bin convention (ECE and reliability
diagram): `n_bins` equal-width bins on [0, 1]; bin b is (b / n_bins, (b + 1) / n_bins], and the
first bin also holds confidence 0, so a confidence of exactly 1.0 falls in the last bin.
`torchmetrics` bins as [lo, hi) and gives confidence 1.0 a bin of its own; the two agree
whenever no confidence sits exactly on a bin edge (true for continuous scores almost surely),
which the tests check. Uncertainties are in nats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


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


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy over the last axis, with 0 log 0 = 0."""
    return -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=-1)


def predictive_entropy(probs: Any) -> np.ndarray:
    """Total uncertainty H[mean_s p_s]: (S, N, C) -> (N,)."""
    return _entropy(to_numpy(probs).mean(axis=0))


def expected_entropy(probs: Any) -> np.ndarray:
    """Aleatoric uncertainty mean_s H[p_s]: (S, N, C) -> (N,)."""
    return _entropy(to_numpy(probs)).mean(axis=0)


def mutual_information(probs: Any) -> np.ndarray:
    """Epistemic uncertainty H[mean p] - mean H[p]: (S, N, C) -> (N,).

    Non-negative by Jensen's inequality; round-off below zero is clipped to 0.
    """
    return np.maximum(predictive_entropy(probs) - expected_entropy(probs), 0.0)


def selective_risk(correct: Any, uncertainty: Any) -> tuple[np.ndarray, np.ndarray]:
    """Risk (error rate) vs coverage when the most uncertain images are rejected first.

    Images are sorted by increasing uncertainty; point k (k = 1..N) keeps the k most certain,
    coverage k / N. Ties are resolved by expectation over random tie-breaking: inside a group
    of equal uncertainty each image counts as the group's mean error.

    Args:
        correct: (N,) bool, whether each prediction is right.
        uncertainty: (N,) score, larger = less certain.

    Returns:
        coverage (N,) and risk (N,); accuracy is ``1 - risk``.
    """
    errors = 1.0 - to_numpy(correct).astype(float)
    uncertainty = to_numpy(uncertainty).astype(float)
    order = np.argsort(uncertainty, kind="stable")
    errors, uncertainty = errors[order], uncertainty[order]
    _, group, group_size = np.unique(uncertainty, return_inverse=True, return_counts=True)
    group_errors = np.bincount(group, weights=errors) / group_size
    n = len(errors)
    kept = np.arange(1, n + 1)
    return kept / n, np.cumsum(group_errors[group]) / kept


def aurc(correct: Any, uncertainty: Any) -> float:
    """AURC: area under the risk (= error rate) vs coverage curve, ``mean_k risk_k``.

    This is the Riemann sum over the N coverage points of :func:`selective_risk`
    (Geifman et al., 2019); lower is better. The area under the accuracy-coverage curve
    is ``1 - aurc``.

    Args:
        correct: (N,) bool; uncertainty: (N,) score, larger = less certain.
    """
    return float(selective_risk(correct, uncertainty)[1].mean())


def auroc(scores: Any, positive: Any) -> float:
    """AUROC: P(score of a random positive > score of a random negative), ties count 1/2.

    Computed from the Mann-Whitney rank statistic with average ranks for ties.

    Args:
        scores: (N,) scores; positive: (N,) bool group membership.
    """
    scores, positive = to_numpy(scores).astype(float), to_numpy(positive).astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of images whose posterior-predictive mean (S, N, C) argmax is the label (N,)."""
    return 100.0 * (probs.mean(0).argmax(-1) == labels).float().mean().item()


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0
