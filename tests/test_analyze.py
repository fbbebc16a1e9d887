"""experiments/analyze.py on small runs of the EuroSAT fixture: files, groups, metrics, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch
import xarray as xr
from bayesprompt.analysis.inference_data import held_out_elpd, load_inference_data
from bayesprompt.analysis.posterior import batch_samples, posterior_samples
from bayesprompt.analysis.report import write_analysis
from conftest import TINY_BACKBONE

from bayesprompt.api import Run
from bayesprompt.commands import analyze
from bayesprompt.errors import UserError
from bayesprompt.inference.predictive import batch_bounds, replay_model
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.train import train_and_evaluate

REPO = Path(__file__).resolve().parent.parent

SPLIT_KEYS = {"n", "accuracy", "ece", "nll", "brier", "mean_uncertainty", "aurc", "coverage",
              "elpd_test"}
COVERAGE_KEYS = {"prompt_spread", "total_variance", "template_distance",
                 "nearest_template_distance", "template_fraction_in_credible_region"}


def train_run(model: str, root: Path, folder: Path, eval_batch_size: int = 64) -> Path:
    """A one-epoch run of `model` on the fixture, in `folder`."""
    config = RunConfig(dataset="eurosat", root=str(root), model=model, backbone=TINY_BACKBONE,
                       pretrained=None, shots=2, epochs=1, num_particles=2, batch_size=4,
                       views=1, cache_dir=str(folder / "cache"), out=str(folder / model),
                       eval_batch_size=eval_batch_size)
    train_and_evaluate(config)
    return folder / model


@pytest.fixture(scope="module")
def analyzed(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """vpt_cond and coop runs, analysed with 6 samples (vpt_cond also on a 'domain')."""
    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for model, extra in (("vpt_cond", ["--domains", "eurosat"]), ("coop", [])):
        run = train_run(model, eurosat_root, folder)
        analyze.main([str(run), "--num-samples", "6", "--device", "cpu", *extra])
        runs[model] = run / "analysis"
    return runs


def test_inference_data_groups_dims_and_coords(analyzed: dict[str, Path]) -> None:
    folder = analyzed["vpt_cond"]
    for split in ("base", "new", "eurosat"):
        idata = load_inference_data(folder / f"posterior_{split}.nc")
        assert set(idata.groups()) == {"posterior", "predictions", "predictions_constant_data"}
        r = idata.posterior["r"]
        n_images = idata.predictions_constant_data["y"].sizes["image"]
        assert r.dims == ("chain", "draw", "image", "r_dim_0")
        assert r.shape[:3] == (1, 6, n_images)
        probs = idata.predictions["probs"]
        assert probs.dims == ("chain", "draw", "image", "class")
        assert probs.sizes["class"] == 5
        assert set(probs["split"].values) == {split}
        assert idata.predictions["y"].shape == (1, 6, n_images)
        xr.testing.assert_allclose(probs.sum("class"), xr.ones_like(probs.sum("class")),
                                   atol=1e-5)
    base = load_inference_data(folder / "posterior_base.nc").predictions["class"]
    new = load_inference_data(folder / "posterior_new.nc").predictions["class"]
    assert not set(base.values) & set(new.values)


@pytest.mark.parametrize("model", ["vpt_cond", "coop"])
def test_train_file_holds_the_training_labels_and_their_log_likelihood(
        analyzed: dict[str, Path], model: str) -> None:
    """posterior_train.nc: the data the posterior was conditioned on, log p_s(y_i | x_i) of
    the training labels under the same draws as `Run.predict` (same S and seed)."""
    idata = load_inference_data(analyzed[model] / "posterior_train.nc")
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood",
                                   "observed_data"}
    run = Run.load(analyzed[model].parent, "cpu")
    features, labels = run.train_features()
    assert labels.tolist() == [item.label for item in run.base.train]
    np.testing.assert_array_equal(idata.observed_data["y"].values, labels.numpy())
    assert set(idata.observed_data["split"].values) == {"train"}
    probs = (run.predict(features, 6) if run.program.stochastic else run.predict(features)
             ).double().numpy()                          # (S, N, C); S = 1 for coop
    expected = np.log(probs[:, np.arange(len(labels)), labels.numpy()])
    log_likelihood = idata.log_likelihood["y"].values[0]   # (6, N)
    np.testing.assert_allclose(log_likelihood, np.broadcast_to(expected, log_likelihood.shape),
                               rtol=1e-5, atol=1e-6)
    if model == "vpt_cond":  # the amortized guide's draws for each training image
        assert idata.posterior["r"].dims[:3] == ("chain", "draw", "image")
        assert idata.posterior["r"].sizes["image"] == len(labels)


def test_test_files_hold_predictions_and_no_log_likelihood(analyzed: dict[str, Path]) -> None:
    """Test labels were never conditioned on: az.loo refuses the file; elpd_test = -N * nll."""
    for model, folder in analyzed.items():
        metrics = json.loads((folder / "metrics.json").read_text())
        for split, values in metrics["splits"].items():
            idata = load_inference_data(folder / f"posterior_{split}.nc")
            assert "log_likelihood" not in idata.groups() and "observed_data" not in idata.groups()
            with pytest.raises(TypeError, match="log likelihood not found"):
                az.loo(idata)
            probs = idata.predictions["probs"].values[0]
            labels = idata.predictions_constant_data["y"].values
            np.testing.assert_allclose(idata.predictions["log_density"].values[0],
                                       np.log(probs[:, np.arange(len(labels)), labels]),
                                       rtol=1e-6)
            assert values["elpd_test"] == pytest.approx(held_out_elpd(idata), rel=1e-9)
            assert values["elpd_test"] == pytest.approx(-values["n"] * values["nll"], rel=1e-6)
            assert "loo" not in values, (model, split)


def test_runs_compare_with_loo_on_the_training_data(analyzed: dict[str, Path]) -> None:
    """metrics.json's loo is az.loo of posterior_train.nc; az.compare ranks the train files of
    runs trained on the same data; a point-estimate model's loo is its log-likelihood."""
    runs = {model: load_inference_data(folder / "posterior_train.nc")
            for model, folder in analyzed.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto k of 6 draws, and coop's equal weights
        table = az.compare(runs)
        loo = {model: az.loo(idata) for model, idata in runs.items()}
    assert set(table.index) == {"vpt_cond", "coop"}
    vpt_cond = json.loads((analyzed["vpt_cond"] / "metrics.json").read_text())["loo"]
    assert set(vpt_cond) == {"train"}
    assert vpt_cond["train"]["elpd_loo"] == pytest.approx(float(loo["vpt_cond"].elpd_loo))
    assert vpt_cond["train"]["p_loo"] == pytest.approx(float(loo["vpt_cond"].p_loo))
    assert json.loads((analyzed["coop"] / "metrics.json").read_text())["loo"] == {}
    coop_log_likelihood = runs["coop"].log_likelihood["y"].isel(chain=0, draw=0).sum()
    assert float(loo["coop"].elpd_loo) == pytest.approx(float(coop_log_likelihood), rel=1e-6)
    assert float(loo["coop"].p_loo) == pytest.approx(0.0, abs=1e-9)


def test_loo_warns_when_the_training_data_pareto_k_is_large(analyzed: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """6 draws are too few for PSIS (docs/ANALYSIS.md): the analysis says so, for 'train'."""
    posterior = posterior_samples(analyzed["vpt_cond"].parent, 6, splits=("base",))
    with pytest.warns(UserWarning, match=r"LOO on 'train' is unreliable: \d+ of \d+ images"):
        metrics = write_analysis(posterior, tmp_path)
    assert set(metrics["loo"]) == {"train"}
    assert metrics["loo"]["train"]["pareto_k_above_0.7"] > 0


def test_zeroshot_has_no_train_file_and_no_loo(eurosat_root: Path, tmp_path: Path) -> None:
    run = train_run("zeroshot", eurosat_root, tmp_path)
    analyze.main([str(run), "--num-samples", "2", "--device", "cpu"])
    metrics = json.loads((run / "analysis/metrics.json").read_text())
    assert metrics["loo"] == {}
    assert not (run / "analysis/posterior_train.nc").exists()
    assert metrics["splits"]["base"]["elpd_test"] == pytest.approx(
        -metrics["splits"]["base"]["n"] * metrics["splits"]["base"]["nll"], rel=1e-6)
    with pytest.raises(UserError, match="no 'train' split"):
        Run.load(run, "cpu").to_inference_data("train")


def test_metrics_and_figures(analyzed: dict[str, Path]) -> None:
    metrics = json.loads((analyzed["vpt_cond"] / "metrics.json").read_text())
    assert metrics["deterministic"] is False
    assert set(metrics["splits"]) == {"base", "new", "eurosat"}
    for values in metrics["splits"].values():
        assert SPLIT_KEYS <= set(values)
        assert set(values["coverage"]) == COVERAGE_KEYS
        assert 0 <= values["coverage"]["template_fraction_in_credible_region"] <= 1
        assert set(values["aurc"]) == {"total", "aleatoric", "epistemic"}
    assert set(metrics["auroc"]) == {"new_vs_base", "eurosat_vs_base"}
    assert {f"posterior_{split}.nc" for split in ("base", "new", "eurosat", "train")} <= set(
        metrics["files"])
    for name in metrics["files"]:
        assert (analyzed["vpt_cond"] / name).is_file(), name
    pngs = {p.name for p in analyzed["vpt_cond"].glob("*.png")}
    assert {"reliability.png", "uncertainty_histograms.png", "selective_prediction_base.png",
            "prompt_projection_base.png", "posterior_r.png", "forest_r.png"} <= pngs


def test_point_estimate_model_is_flagged_deterministic(analyzed: dict[str, Path]) -> None:
    metrics = json.loads((analyzed["coop"] / "metrics.json").read_text())
    assert metrics["deterministic"] is True
    assert "identical" in metrics["note"]
    base = metrics["splits"]["base"]
    assert base["coverage"]["prompt_spread"] == pytest.approx(0.0, abs=1e-9)
    assert base["coverage"]["template_fraction_in_credible_region"] is None
    assert "epistemic" not in base["aurc"]
    ctx = load_inference_data(analyzed["coop"] / "posterior_base.nc").posterior["ctx"]
    assert bool((ctx == ctx.isel(draw=0)).all())
    assert not list(analyzed["coop"].glob("posterior_ctx.png"))


def test_bad_run_dir_exits_2_with_a_message(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "analyze.py"),
                             str(tmp_path / "missing")], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "Run folder not found" in result.stderr
    assert "Traceback" not in result.stderr



def test_probabilities_and_text_features_do_not_depend_on_batching(
        analyzed: dict[str, Path]) -> None:
    """Given the latent samples, batches of 4, 4, 4 and 3 images give what one batch gives."""
    posterior = posterior_samples(analyzed["vpt_cond"].parent, 3, splits=("base",))
    base, program = posterior.splits["base"], posterior.program
    probs, texts = [], []
    for start, stop in batch_bounds(len(base.labels), 4):
        batch = {"r": base.latents["r"][:, start:stop]}
        trace = replay_model(program, base.features[start:stop], batch, ("r",), 3)
        _, p, text = batch_samples(trace, 3, stop - start)
        probs.append(p)
        texts.append(text)
    torch.testing.assert_close(torch.cat(probs, dim=1), base.probs)
    torch.testing.assert_close(torch.cat(texts, dim=1), base.text_features)


@pytest.mark.parametrize("model", ["vpt", "vpt_cond"])
def test_results_and_analysis_report_one_accuracy(model: str, eurosat_root: Path,
                                                  tmp_path: Path) -> None:
    """The same S and seed (the run's, by default) give analyze.py results.json's accuracies,
    whatever the evaluation batch size."""
    run = train_run(model, eurosat_root, tmp_path, eval_batch_size=3)
    results = json.loads((run / "results.json").read_text())
    assert (results["eval_samples"], results["eval_seed"]) == (2, 1)
    analyze.main([str(run), "--device", "cpu"])
    metrics = json.loads((run / "analysis/metrics.json").read_text())
    assert (metrics["num_samples"], metrics["seed"]) == (2, 1)
    for split, key in (("base", "base_acc"), ("new", "new_acc")):
        assert 100 * metrics["splits"][split]["accuracy"] == pytest.approx(results[key])
