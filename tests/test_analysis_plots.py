"""Smoke tests: every plot function writes a PNG from small synthetic inputs."""

import numpy as np
from bayesprompt.analysis import plots
from bayesprompt.analysis.calibration import calibration_report
from bayesprompt.analysis.inference_data import to_inference_data
from bayesprompt.analysis.uncertainty import uncertainty_decomposition


def test_every_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    S, N, C, D, K, W = 8, 40, 4, 6, 3, 5
    probs = rng.dirichlet(np.ones(C), size=(S, N))
    labels = rng.integers(0, C, size=N)
    split = np.where(labels < 2, "base", "new")
    names = ["cat", "dog", "bird", "fish"]
    u = uncertainty_decomposition(probs)
    correct = probs.mean(0).argmax(-1) == labels
    idata = to_inference_data(
        {"r": rng.normal(size=(S, N, W))}, probs.argmax(-1), probs, labels, names, split,
        held_out=True,
    )
    paths = {
        name: tmp_path / f"{name}.png"
        for name in ["reliability", "hist", "selective", "projection", "posterior", "forest"]
    }

    plots.plot_reliability_diagram(calibration_report(probs, labels, split), paths["reliability"])
    plots.plot_uncertainty_histograms(
        {"entropy": u["total"], "MI": u["epistemic"]}, split, paths["hist"]
    )
    plots.plot_selective_prediction(correct, {"entropy": u["total"]}, paths["selective"])
    plots.plot_feature_projection(
        rng.normal(size=(S, C, D)),
        rng.normal(size=(K, C, D)),
        rng.normal(size=(N, D)),
        labels,
        names,
        paths["projection"],
    )
    plots.plot_latent_posterior(idata, paths["posterior"], "r", max_dims=2)
    plots.plot_latent_forest(idata, paths["forest"], "r", max_dims=3)

    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
