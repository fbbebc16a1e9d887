"""Predictive uncertainty from posterior samples, selective prediction and separation AUROC.

For samples p_s (S, N, C) of the class probabilities, per image:

- total     = H[mean_s p_s]          (entropy of the posterior-predictive mean)
- aleatoric = mean_s H[p_s]          (expected entropy)
- epistemic = total - aleatoric      (mutual information between label and prompt posterior)

All in nats.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from bayesprompt.analysis._arrays import to_numpy
from scipy.stats import rankdata


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


def uncertainty_decomposition(probs: Any) -> dict[str, np.ndarray]:
    """``{"total", "aleatoric", "epistemic"}`` -> (N,) arrays from (S, N, C) samples."""
    total, aleatoric = predictive_entropy(probs), expected_entropy(probs)
    return {"total": total, "aleatoric": aleatoric, "epistemic": np.maximum(total - aleatoric, 0)}


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


def separation_auroc(
    uncertainties: dict[str, Any], split: Sequence[str], positive: str, negative: str
) -> dict[str, float]:
    """AUROC of each uncertainty for telling ``positive`` images from ``negative`` ones.

    E.g. ``positive="new", negative="base"`` (unseen classes), or ``"sketch"`` vs
    ``"in_domain"``; 1.0 means every positive image is more uncertain than every negative.
    Images of other splits are ignored.

    Args:
        uncertainties: name -> (N,) scores, e.g. from :func:`uncertainty_decomposition`.
        split: (N,) split names.
    """
    split = np.asarray(split, dtype=str)
    keep = (split == positive) | (split == negative)
    return {
        name: auroc(to_numpy(u)[keep], split[keep] == positive) for name, u in uncertainties.items()
    }
