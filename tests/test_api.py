"""The Python API: `bayesprompt.fit`, `Run.load`, predictions, posterior samples, saved prompts,
and several runs in one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from conftest import TINY_BACKBONE

import bayesprompt
from bayesprompt.errors import UserError
from bayesprompt.metrics import accuracy
from bayesprompt.runs.model_files import build_program


def fit(model: str, root: Path, folder: Path, **options) -> bayesprompt.Run:
    """A two-epoch run of `model` on the EuroSAT fixture, by the API."""
    return bayesprompt.fit(dataset="eurosat", root=str(root), model=model,
                           backbone=TINY_BACKBONE, pretrained="", shots=4, epochs=2,
                           num_particles=3, batch_size=4, views=2, device="cpu",
                           cache_dir=str(folder / "cache"), out=str(folder / model), **options)


@pytest.fixture(scope="module")
def runs(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, bayesprompt.Run]:
    """vpt, vpt_cond and coop, fitted one after another in this process."""
    folder = tmp_path_factory.mktemp("api")
    return {model: fit(model, eurosat_root, folder) for model in ("vpt", "vpt_cond", "coop")}


def test_fit_writes_the_run_folder_and_returns_its_results(runs) -> None:
    run = runs["vpt"]
    assert isinstance(run, bayesprompt.Run)
    assert run.results == json.loads((run.folder / "results.json").read_text())
    assert run.config.model == "vpt" and run.new is not None
    assert run.classnames == run.base.classnames
    epochs = [row for row in run.metrics if row["kind"] == "epoch"]
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert [row["loss"] for row in epochs] == pytest.approx(run.results["loss_history"])


@pytest.mark.parametrize("model", ["vpt", "vpt_cond", "coop"])
def test_predict_gives_the_accuracies_of_results_json(runs, model) -> None:
    # each run was fitted before the others: its parameters survived the later fits
    run = runs[model]
    features, labels = run.test_features("base")
    probs = run.predict(features)
    samples = run.config.eval_samples if run.program.stochastic else 1
    assert probs.shape == (samples, len(labels), len(run.base.classnames))
    assert accuracy(probs, labels) == run.results["base_acc"]
    run.set_classes(run.new.classnames)
    features, labels = run.test_features("new")
    assert accuracy(run.predict(features), labels) == run.results["new_acc"]
    run.set_classes(run.base.classnames)


def test_a_loaded_run_predicts_as_the_fitted_one(runs) -> None:
    fitted = runs["vpt_cond"]
    loaded = bayesprompt.Run.load(fitted.folder)
    features, _ = fitted.test_features("base")
    torch.testing.assert_close(loaded.predict(features, num_samples=4, seed=5),
                               fitted.predict(features, num_samples=4, seed=5), rtol=0, atol=0)
    assert loaded.predict(features, 4, seed=5).shape[0] == 4


def test_runs_keep_their_own_parameters(runs) -> None:
    names = {model: set(run.program.learned_parameters()) for model, run in runs.items()}
    assert "r_loc" in names["vpt"] and "ctx_map" in names["coop"]
    assert any(name.startswith("posterior_net$$$") for name in names["vpt_cond"])
    assert not names["coop"] & names["vpt"]
    assert not pyro.get_param_store().keys()  # nothing leaks into the global store


def test_the_state_dict_is_the_learned_prompts_and_restores_them(runs, tmp_path) -> None:
    run = runs["vpt_cond"]
    state = run.program.prompt_state()
    assert set(state) == set(run.program.learned_parameters())
    assert not any(name.startswith(("clip", "model.")) for name in state)
    torch.save(state, tmp_path / "prompts.pt")
    fresh = build_program(run.config, run.clip, run.base.classnames, run.base.template)
    features, _ = run.test_features("base")
    untrained = bayesprompt.Run(run.folder, run.config, fresh, run.clip, run.base, run.new)
    assert not torch.equal(untrained.predict(features, 3), run.predict(features, 3))
    fresh.load_prompt_state(torch.load(tmp_path / "prompts.pt", weights_only=True))
    torch.testing.assert_close(untrained.predict(features, 3), run.predict(features, 3),
                               rtol=0, atol=0)
    with pytest.raises(UserError, match="not this model's"):
        fresh.load_prompt_state(runs["coop"].program.prompt_state())


def test_posterior_samples_have_the_documented_shapes(runs) -> None:
    width = runs["vpt"].clip.embed_dim
    (r,) = runs["vpt"].posterior_samples(7).values()
    assert r.shape == (7, width)
    features, _ = runs["vpt_cond"].test_features("base")
    assert runs["vpt_cond"].posterior_samples(5, features)["r"].shape == (5, len(features),
                                                                           width)
    with pytest.raises(UserError, match="drawn per image"):
        runs["vpt_cond"].posterior_samples(5)


def test_to_inference_data_has_the_split_and_its_samples(runs) -> None:
    idata = runs["vpt"].to_inference_data("new", num_samples=4)
    assert idata.posterior.sizes["draw"] == 4
    assert list(idata.predictions["class"].values) == runs["vpt"].new.classnames
    assert runs["vpt"].classnames == runs["vpt"].base.classnames  # classes are put back
    train = runs["vpt"].to_inference_data("train", num_samples=4)
    np.testing.assert_array_equal(train.posterior["r"].values[0],  # global draws: any split
                                  idata.posterior["r"].values[0])
    assert train.observed_data["y"].values.tolist() == [
        item.label for item in runs["vpt"].base.train]
    assert train.log_likelihood["y"].shape == (1, 4, len(runs["vpt"].base.train))


def test_image_features_of_files_equal_the_cached_test_features(runs) -> None:
    run = runs["coop"]
    files = [item.path for item in run.base.test[:5]]
    features, _ = run.test_features("base")
    torch.testing.assert_close(run.image_features(files), features[:5], rtol=1e-5, atol=1e-5)


def test_bad_calls_get_clear_messages(runs, eurosat_root, tmp_path) -> None:
    with pytest.raises(UserError, match="Unknown option.*'epoch'"):
        bayesprompt.fit(epoch=3)
    with pytest.raises(UserError, match="already holds a run"):
        fit("coop", eurosat_root, runs["coop"].folder.parent)
    with pytest.raises(UserError, match="Run folder not found"):
        bayesprompt.Run.load(tmp_path / "nothing")
    with pytest.raises(UserError, match="num_samples must be 1 or more"):
        runs["vpt"].predict(torch.zeros(2, runs["vpt"].clip.feature_dim), num_samples=0)
