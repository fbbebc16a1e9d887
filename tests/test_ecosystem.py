"""Ecosystem details: the log_likelihood group for az.loo / az.compare (more tests below)."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pytest
from bayesprompt.analysis.inference_data import (
    load_inference_data,
    save_inference_data,
    to_inference_data,
)

CLASSNAMES = ["cat", "dog", "bird", "fish"]


def sampled_probs(rng: np.random.Generator, labels: np.ndarray, signal: float,
                  num_samples: int = 40, spread: float = 0.1) -> np.ndarray:
    """(S, N, C) probabilities: a per-image logit vector favouring the true class by `signal`,
    plus small posterior noise shared by every image of a draw."""
    n_images = len(labels)
    logits = rng.normal(size=(n_images, len(CLASSNAMES)))
    logits[np.arange(n_images), labels] += signal
    draws = logits + spread * rng.normal(size=(num_samples, 1, len(CLASSNAMES)))
    probs = np.exp(draws - draws.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def build(probs: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    return to_inference_data({"ctx": rng.normal(size=(len(probs), 2, 3))}, probs.argmax(-1),
                             probs, labels, CLASSNAMES)


def test_log_likelihood_is_the_log_probability_of_the_true_label() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=30)
    probs = sampled_probs(rng, labels, 2.0, num_samples=5)
    probs[0, 0] = 0.0  # a zero probability of the true label is floored, not -inf
    idata = build(probs, labels, rng)

    log_lik = idata.log_likelihood["y"]
    assert log_lik.dims == ("chain", "draw", "image")
    with np.errstate(divide="ignore"):
        expected = np.log(probs[:, np.arange(30), labels])
    np.testing.assert_array_equal(log_lik.values[0, :, 1:], expected[:, 1:])
    np.testing.assert_array_equal(log_lik.values[0, 1:, 0], expected[1:, 0])
    assert log_lik.values[0, 0, 0] == pytest.approx(np.log(1e-12))
    assert set(idata.log_likelihood.data_vars) == set(idata.observed_data.data_vars)


def test_loo_and_compare_rank_the_better_model_first(tmp_path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=60)
    good = build(sampled_probs(rng, labels, 3.0), labels, rng)
    poor = build(sampled_probs(rng, labels, 0.2), labels, rng)
    save_inference_data(good, tmp_path / "good.nc")
    good = load_inference_data(tmp_path / "good.nc")  # the group survives the netCDF file

    loo = az.loo(good, pointwise=True)
    direct = good.log_likelihood["y"].values[0]  # (S, N)
    # small posterior noise: leave-one-out is close to the log of the mean likelihood
    mean_log_lik = np.log(np.exp(direct).mean(0))
    np.testing.assert_allclose(loo.loo_i.values, mean_log_lik, atol=0.02)
    assert float(loo.elpd_loo) == pytest.approx(mean_log_lik.sum(), abs=0.3)

    table = az.compare({"poor": poor, "good": good})
    assert table.index.tolist() == ["good", "poor"]
    assert table.loc["good", "elpd_loo"] > table.loc["poor", "elpd_loo"] + 10


def test_loo_of_a_point_estimate_is_the_test_log_likelihood() -> None:
    """Point-estimate models repeat one draw: equal weights, p_loo = 0."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=25)
    probs = np.repeat(sampled_probs(rng, labels, 1.0, num_samples=1), 3, axis=0)
    idata = build(probs, labels, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about Pareto k of constant weights
        loo = az.loo(idata)
    test_log_likelihood = np.log(probs[0, np.arange(25), labels]).sum()
    assert float(loo.elpd_loo) == pytest.approx(test_log_likelihood, rel=1e-9)
    assert float(loo.p_loo) == pytest.approx(0.0, abs=1e-9)


def test_labels_outside_the_classes_are_refused() -> None:
    probs = np.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        to_inference_data({}, probs.argmax(-1), probs, np.array([0, 1, 4]), CLASSNAMES)
