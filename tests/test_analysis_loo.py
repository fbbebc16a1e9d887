"""The forest plot shows the most constrained dimensions; LOO warns when Pareto k says it is
unreliable (issue 17)."""

import numpy as np
import pytest
from bayesprompt.analysis import plots
from bayesprompt.analysis.inference_data import to_inference_data
from bayesprompt.analysis.report import loo_metrics


def idata_of(latent: np.ndarray, probs: np.ndarray, labels: np.ndarray):
    return to_inference_data({"r": latent}, probs.argmax(-1), probs, labels, ["a", "b", "c"],
                             held_out=False)


def test_forest_plot_shows_the_dimensions_of_smallest_posterior_sd(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    S, N, W = 50, 4, 12
    sd = np.ones(W)
    sd[[2, 5, 9]] = 0.05                                        # pinned down by the data
    latent = rng.normal(size=(S, N, W)) * sd
    probs = rng.dirichlet(np.ones(3), size=(S, N))
    idata = idata_of(latent, probs, rng.integers(0, 3, N))
    shown = []
    original = plots.az.plot_forest
    monkeypatch.setattr(plots.az, "plot_forest",
                        lambda data, **kw: shown.append(kw["coords"]) or original(data, **kw))
    plots.plot_latent_forest(idata, tmp_path / "forest.png", "r", max_dims=3, image=1)
    assert shown == [{"image": [1], "r_dim_1": [2, 5, 9]}]


def test_loo_warns_when_pareto_k_is_large():
    rng = np.random.default_rng(1)
    S, N = 100, 30
    labels = rng.integers(0, 3, N)
    logits = 0.01 * rng.normal(size=(S, N, 3))                 # the draws nearly agree
    steady = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    quiet = loo_metrics(idata_of(rng.normal(size=(S, 2)), steady, labels), "train")
    assert quiet["pareto_k_above_0.7"] == 0
    wild = rng.dirichlet(np.full(3, 0.05), size=(S, N))        # draws disagree wildly
    with pytest.warns(UserWarning, match=r"LOO on 'train' is unreliable: \d+ of 30 images"):
        metrics = loo_metrics(idata_of(rng.normal(size=(S, 2)), wild, labels), "train")
    assert metrics["pareto_k_above_0.7"] > 0
