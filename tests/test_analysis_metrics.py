"""Unit tests of the analysis metrics against hand-computed values and torchmetrics."""

import math

import numpy as np
import pytest
import torch
from bayesprompt.analysis.calibration import calibration_report
from bayesprompt.analysis.coverage import (
    credible_region_mask,
    prompt_spread,
    template_coverage,
    template_distances,
)
from bayesprompt.analysis.inference_data import (
    load_inference_data,
    save_inference_data,
    to_inference_data,
)
from bayesprompt.analysis.uncertainty import separation_auroc, uncertainty_decomposition
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from bayesprompt.metrics import (
    aurc,
    auroc,
    brier_score,
    expected_calibration_error,
    mutual_information,
    negative_log_likelihood,
    reliability_bins,
    selective_risk,
)
from bayesprompt.program.templates import IMAGENET_TEMPLATES


def two_class(confidences, predictions):
    """(N, 2) probabilities with the given top-class confidence on the given class."""
    conf = np.asarray(confidences, dtype=float)
    p = np.stack([conf, 1 - conf], axis=1)
    return np.where(np.asarray(predictions)[:, None] == 0, p, p[:, ::-1])


# --- calibration ---------------------------------------------------------------------------


def test_ece_hand_example():
    # Confidences 0.95 and 0.94 share bin (14/15, 1]: acc 1/2, conf 0.945, gap 0.445.
    # 0.75 (correct) and 0.65 (correct) sit alone: gaps 0.25 and 0.35.
    p = two_class([0.95, 0.94, 0.75, 0.65], [0, 0, 1, 1])
    labels = np.array([0, 1, 1, 1])
    expected = (2 * 0.445 + 0.25 + 0.35) / 4
    assert expected_calibration_error(p, labels) == pytest.approx(expected)


def test_bin_edges_are_left_open_right_closed():
    p = two_class([0.75, 1.0, 0.5], [0, 0, 0])  # 4 bins with exact edges 0, .25, .5, .75, 1
    bins = reliability_bins(p, np.zeros(3, dtype=int), n_bins=4)
    assert bins.count.tolist() == [0, 1, 1, 1]  # 0.5 -> (.25, .5], 0.75 -> (.5, .75], 1 -> last
    assert np.isnan(bins.accuracy[0]) and bins.confidence[3] == 1.0


def test_ece_matches_torchmetrics_on_random_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(2000, 10))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=2000)
    reference = multiclass_calibration_error(
        torch.tensor(p), torch.tensor(labels), num_classes=10, n_bins=15, norm="l1"
    )
    assert expected_calibration_error(p, labels) == pytest.approx(reference.item(), abs=1e-6)


def test_nll_and_brier_hand_values():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1])
    assert negative_log_likelihood(p, labels) == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)
    # (0.25 + 0.0625 + 0.0625 + 0.01 + 0.04 + 0.01) / 2
    assert brier_score(p, labels) == pytest.approx(0.2175)


def test_calibration_report_uses_predictive_mean_per_split():
    samples = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (S=2, N=2, C=2)
    report = calibration_report(samples, labels=[0, 1], split=["base", "new"])
    assert set(report) == {"all", "base", "new"}
    assert report["base"]["nll"] == pytest.approx(math.log(2))  # mean prob 0.5 on the true class
    assert report["new"]["brier"] == pytest.approx(0.0)
    assert report["all"]["n"] == 2


# --- uncertainty ---------------------------------------------------------------------------


def test_identical_samples_have_zero_mutual_information():
    p = np.tile(np.array([[0.2, 0.3, 0.5]]), (5, 4, 1))  # (S=5, N=4, C=3)
    parts = uncertainty_decomposition(p)
    assert np.allclose(parts["epistemic"], 0.0)
    assert np.allclose(parts["total"], parts["aleatoric"])


def test_disagreeing_one_hot_samples_have_mutual_information_log2():
    p = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, N=1, C=2)
    assert mutual_information(p) == pytest.approx([math.log(2)])
    assert uncertainty_decomposition(p)["aleatoric"] == pytest.approx([0.0])


def test_aurc_hand_ranking():
    # Most certain first: correct, correct, wrong, correct -> risks 0, 0, 1/3, 1/4.
    correct = np.array([True, True, False, True])
    uncertainty = np.array([0.1, 0.2, 0.3, 0.4])
    coverage, risk = selective_risk(correct, uncertainty)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0, 0, 1 / 3, 1 / 4])
    assert aurc(correct, uncertainty) == pytest.approx((1 / 3 + 1 / 4) / 4)


def test_aurc_ties_use_expected_order():
    assert aurc([True, False], [0.5, 0.5]) == pytest.approx(0.5)


def test_auroc_perfect_reversed_and_tied():
    positive = np.array([False, False, True, True])
    assert auroc([0.1, 0.2, 0.8, 0.9], positive) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], positive) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], positive) == 0.5


def test_auroc_matches_torchmetrics():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=500), 1)  # rounding creates ties
    positive = rng.random(500) < 0.3
    reference = binary_auroc(torch.tensor(scores), torch.tensor(positive).long())
    assert auroc(scores, positive) == pytest.approx(reference.item(), abs=1e-6)


def test_separation_auroc_ignores_other_splits():
    split = np.array(["base", "new", "sketch", "base", "new"])
    result = separation_auroc({"mi": [0.1, 0.9, 5.0, 0.2, 0.8]}, split, "new", "base")
    assert result == {"mi": 1.0}


# --- prompt-space coverage -----------------------------------------------------------------


def test_credible_region_holds_level_of_the_same_gaussian():
    # 4000 test points: binomial standard error sqrt(0.9 * 0.1 / 4000) = 0.0047; allow 4 SE.
    # Estimating the mean and covariance from 4000 samples moves coverage by O(k / S) only.
    rng = np.random.default_rng(2)
    dim, n = 8, 4000
    scales = np.array([3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1])
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    draw = lambda: (rng.normal(size=(n, dim)) * scales) @ rotation.T + 1.0  # noqa: E731
    inside = credible_region_mask(draw(), draw(), level=0.9, k=2, shrinkage=0.0)
    assert abs(inside.mean() - 0.9) < 4 * math.sqrt(0.9 * 0.1 / n)


def test_template_coverage_and_spread_shapes():
    rng = np.random.default_rng(3)
    samples = rng.normal(size=(50, 4, 3, 16))  # amortized: (S, N, C, D)
    centre = samples.mean(axis=(0, 1))[None]  # (1, C, D)
    templates = np.concatenate([centre, centre + 100.0])  # (K=2, C, D): at the mean, far away
    assert template_coverage(samples, templates).tolist() == [0.5, 0.5, 0.5]
    spread = prompt_spread(samples)
    assert spread["total_variance"] == pytest.approx([16.0] * 3, rel=0.1)


def test_template_distances_match_direct_computation():
    rng = np.random.default_rng(5)
    samples, templates = rng.normal(size=(7, 3, 5)), rng.normal(size=(4, 3, 5))
    direct = np.linalg.norm(samples[:, None] - templates[None], axis=-1).mean(axis=0).T
    np.testing.assert_allclose(template_distances(samples, templates), direct, rtol=1e-10)


def test_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


# --- ArviZ adapter -------------------------------------------------------------------------


@pytest.mark.parametrize("held_out", [False, True])
def test_inference_data_round_trips_through_netcdf(tmp_path, held_out):
    """Conditioned data: posterior_predictive, log_likelihood, observed_data; held-out images:
    predictions (with the log density) and predictions_constant_data (issue 17)."""
    rng = np.random.default_rng(4)
    S, N, C, W = 6, 5, 3, 4
    probs = rng.dirichlet(np.ones(C), size=(S, N))
    labels = rng.integers(0, C, size=N)
    idata = to_inference_data(
        latents={"r": rng.normal(size=(S, N, W)), "ctx": torch.zeros(S, 2, W)},
        predicted_labels=probs.argmax(-1),
        probs=probs,
        labels=labels,
        classnames=["cat", "dog", "bird"],
        split=["base", "base", "new", "new", "sketch"],
        dims={"r": ["image", "ctx_dim"]},
        held_out=held_out,
    )
    path = tmp_path / "sub" / "idata.nc"
    save_inference_data(idata, path)
    assert [p.name for p in path.parent.iterdir()] == ["idata.nc"]  # no temp file left
    back = load_inference_data(path)

    predictive, log_density, observed = (
        ("predictions", ("predictions", "log_density"), "predictions_constant_data")
        if held_out else
        ("posterior_predictive", ("log_likelihood", "y"), "observed_data"))
    assert set(back.groups()) == {"posterior", predictive, log_density[0], observed}
    group, name = log_density
    np.testing.assert_array_equal(back[group][name].values, idata[group][name].values)
    np.testing.assert_allclose(back[group][name].values[0],
                               np.log(probs[:, np.arange(N), labels]))
    assert back.posterior["r"].dims == ("chain", "draw", "image", "ctx_dim")
    assert back.posterior["ctx"].dims == ("chain", "draw", "ctx_dim_0", "ctx_dim_1")
    assert back[predictive]["probs"].dims == ("chain", "draw", "image", "class")
    assert back[predictive]["y"].dims == ("chain", "draw", "image")
    assert back[observed]["y"].dims == ("image",)
    np.testing.assert_array_equal(back[observed]["y"].values, labels)
    assert back[predictive]["class"].values.tolist() == ["cat", "dog", "bird"]
    assert back[observed]["split"].values.tolist() == ["base", "base", "new", "new", "sketch"]
    np.testing.assert_allclose(back[predictive]["probs"].values[0], probs)
