"""Selective prediction and error detection: how well a model's uncertainty ranks its own errors.

For class probabilities p_s (S, N, C) of S posterior draws and labels (N,), the prediction is
the argmax of the predictive mean p̄ = mean_s p_s, and each image gets an uncertainty score
(larger = less certain):

- ``msp``:     1 - max_c p̄_c               (maximum softmax probability, Hendrycks & Gimpel)
- ``entropy``: H[p̄]                        (predictive entropy, nats)
- ``mi``:      H[p̄] - mean_s H[p_s]        (mutual information; only where S > 1)

Per score: AURC, the area under the risk-coverage curve (Geifman et al., 2019; lower is
better; `analysis.uncertainty.aurc`, ties by expectation), the misclassification-detection
AUROC (errors are the positives: P(score of an error > score of a correct prediction), ties
1/2; 0.5 is no signal, None when every prediction is right or every one wrong), and the
risk-coverage curve at up to `CURVE_POINTS` coverages k/N, k = ceil(j N / CURVE_POINTS): the
same grid for every run on the same test set, so curves average over seeds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bayesprompt.metrics import (
    aurc,
    auroc,
    expected_calibration_error,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    selective_risk,
)

#: Most points of a risk-coverage curve kept in results.json.
CURVE_POINTS = 200
#: The scores, in table order.
SCORES = ("msp", "entropy", "mi")


def uncertainty_scores(probs: torch.Tensor) -> dict[str, np.ndarray]:
    """Scores (N,) of probabilities (S, N, C): msp and entropy, and mi when S > 1."""
    probs = probs.double()
    scores = {"msp": 1.0 - probs.mean(0).max(-1).values.numpy(),
              "entropy": predictive_entropy(probs)}
    if probs.shape[0] > 1:
        scores["mi"] = mutual_information(probs)
    return scores


def misclassification_auroc(correct: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC of `score` (N,) for telling errors from correct predictions (correct: (N,) bool);
    None when there are no errors or no correct predictions."""
    errors = ~np.asarray(correct, bool)
    if errors.all() or not errors.any():
        return None
    return auroc(score, errors)


def curve_indices(n: int, points: int = CURVE_POINTS) -> np.ndarray:
    """Indices k - 1 of the kept points k = ceil(j n / points), j = 1..points (all if n <=
    points)."""
    kept = {math.ceil(j * n / points) for j in range(1, points + 1)}
    return np.array(sorted(kept)) - 1


def risk_coverage(correct: np.ndarray, scores: dict[str, np.ndarray],
                  points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """{"coverage": [...], score: [risk, ...]} on the `curve_indices` grid."""
    index = curve_indices(len(correct), points)
    curve = {"coverage": [float(c) for c in (index + 1) / len(correct)]}
    for name, score in scores.items():
        curve[name] = [float(r) for r in selective_risk(correct, score)[1][index]]
    return curve


def split_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, ECE, NLL, AURC and misclassification AUROC per score, and the risk-coverage
    curve of one split's probabilities (S, N, C) and labels (N,)."""
    mean = probs.double().mean(0)
    correct = (mean.argmax(-1) == labels).numpy()
    scores = uncertainty_scores(probs)
    return {"accuracy": float(correct.mean()),
            "ece": expected_calibration_error(mean, labels),
            "nll": negative_log_likelihood(mean, labels),
            "aurc": {name: aurc(correct, score) for name, score in scores.items()},
            "misclassification_auroc": {name: misclassification_auroc(correct, score)
                                        for name, score in scores.items()},
            "risk_coverage": risk_coverage(correct, scores)}


def results_entries(splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict]:
    """The results.json keys of these metrics: split name -> (probs (S, N, C), labels (N,)) ->
    {"ece": {split: x}, "nll": ..., "aurc": {split: {score: x}}, "misclassification_auroc":
    ..., "risk_coverage": {split: curve}}."""
    metrics = {name: split_metrics(probs, labels) for name, (probs, labels) in splits.items()}
    return {key: {name: m[key] for name, m in metrics.items()}
            for key in ("ece", "nll", "aurc", "misclassification_auroc", "risk_coverage")}
