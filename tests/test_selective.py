"""bayesprompt/selective.py: AURC, risk-coverage and misclassification AUROC, by hand and
against torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from bayesprompt.selective import (
    curve_indices,
    misclassification_auroc,
    results_entries,
    risk_coverage,
    split_metrics,
    uncertainty_scores,
)


def test_aurc_and_the_curve_of_a_hand_computed_example() -> None:
    # Four images, max-softmax probabilities 0.9, 0.8, 0.7, 0.6 (most certain first) and
    # labels such that the 2nd and 4th are wrong. Keeping the k most certain images:
    # risks 0/1, 1/2, 1/3, 2/4; AURC is their mean, (0 + 0.5 + 1/3 + 0.5) / 4 = 1/3.
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]])   # (1, 4, 2)
    labels = torch.tensor([0, 1, 1, 1])
    metrics = split_metrics(probs, labels)
    assert metrics["accuracy"] == 0.5
    assert metrics["aurc"]["msp"] == pytest.approx(1 / 3)
    assert metrics["risk_coverage"]["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert metrics["risk_coverage"]["msp"] == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    # errors (0.8 and 0.6) against correct ones (0.9 and 0.7) by 1 - msp: pairs where the
    # error is less certain: (0.6 vs 0.9), (0.6 vs 0.7), (0.8 vs 0.9) -> 3 of 4.
    assert metrics["misclassification_auroc"]["msp"] == pytest.approx(0.75)
    assert "mi" not in metrics["aurc"]                      # one draw: no mutual information


def test_misclassification_auroc_equals_torchmetrics() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(6, 300, 5, generator=generator), -1)
    labels = torch.randint(5, (300,), generator=generator)
    correct = (probs.mean(0).argmax(-1) == labels).numpy()
    for name, score in uncertainty_scores(probs).items():
        expected = BinaryAUROC()(torch.tensor(score), torch.tensor(~correct).long()).item()
        assert misclassification_auroc(correct, score) == pytest.approx(expected, abs=1e-6), name


def test_degenerate_cases_and_the_curve_grid() -> None:
    assert misclassification_auroc(np.ones(5, bool), np.arange(5.0)) is None
    assert misclassification_auroc(np.zeros(5, bool), np.arange(5.0)) is None
    index = curve_indices(1000, 200)
    assert len(index) == 200 and index[0] == 4 and index[-1] == 999
    assert list(curve_indices(3, 200)) == [0, 1, 2]
    curve = risk_coverage(np.array([True, False, True]), {"msp": np.array([0.1, 0.3, 0.2])})
    assert curve == {"coverage": pytest.approx([1 / 3, 2 / 3, 1.0]),
                     "msp": pytest.approx([0.0, 0.0, 1 / 3])}


def test_results_entries_are_keyed_by_metric_then_split() -> None:
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, 40, 4, generator=generator), -1)
    labels = torch.randint(4, (40,), generator=generator)
    entries = results_entries({"base": (probs, labels), "new": (probs[:1], labels)})
    assert set(entries) == {"ece", "nll", "aurc", "misclassification_auroc", "risk_coverage"}
    assert set(entries["aurc"]["base"]) == {"msp", "entropy", "mi"}
    assert set(entries["aurc"]["new"]) == {"msp", "entropy"}
    assert 0 <= entries["ece"]["base"] <= 1 and entries["nll"]["new"] > 0
