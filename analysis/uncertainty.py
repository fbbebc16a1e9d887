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

from bayesprompt.metrics import auroc, expected_entropy, predictive_entropy, to_numpy


def uncertainty_decomposition(probs: Any) -> dict[str, np.ndarray]:
    """``{"total", "aleatoric", "epistemic"}`` -> (N,) arrays from (S, N, C) samples."""
    total, aleatoric = predictive_entropy(probs), expected_entropy(probs)
    return {"total": total, "aleatoric": aleatoric, "epistemic": np.maximum(total - aleatoric, 0)}


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
