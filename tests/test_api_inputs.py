"""The Python API checks what it is given (`bayesprompt/runs/checks.py`): one UserError naming
the expected shape, dtype and device, never a torch or Pyro error from inside a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE

import bayesprompt
from bayesprompt.errors import UserError


@pytest.fixture(scope="module")
def runs(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, bayesprompt.Run]:
    """One-epoch vpt (Bayesian) and coop (a point estimate) runs."""
    folder = tmp_path_factory.mktemp("api_inputs")
    return {model: bayesprompt.fit(dataset="eurosat", root=str(eurosat_root), model=model,
                                   backbone=TINY_BACKBONE, pretrained="", shots=4, epochs=1,
                                   num_particles=2, batch_size=4, views=1, device="cpu",
                                   precision="fp32", cache_dir=str(folder / "cache"),
                                   out=str(folder / model))
            for model in ("vpt", "coop")}


@pytest.mark.parametrize("options, message", [
    ({"epochs": "one"}, "epochs takes an integer"),
    ({"lr": "0.1"}, "lr takes a number"),
    ({"eval_on": "eurosat"}, "eval_on takes a list"),
    ({"grad_checkpointing": 1}, "grad_checkpointing takes true or false"),
])
def test_fit_checks_values_as_config_files_are_checked(options: dict, message: str,
                                                       tmp_path: Path) -> None:
    """Checked first: an unchecked value would instead meet the unknown dataset (and never
    start a long default run)."""
    with pytest.raises(UserError, match=message):
        bayesprompt.fit(dataset="no_such_dataset", out=str(tmp_path / "run"), **options)
    assert not (tmp_path / "run").exists()


def test_predict_casts_float_tensors_and_arrays(runs) -> None:
    run = runs["vpt"]
    features, _ = run.test_features("base")
    expected = run.predict(features)
    assert torch.equal(run.predict(features.double()), expected)
    assert torch.equal(run.predict(features.numpy()), expected)
    assert torch.equal(run.predict(features.numpy().astype(np.float64)), expected)


@pytest.mark.parametrize("make, problem", [
    (lambda f: f[:, :-1], "shape"),
    (lambda f: f[0], "shape"),
    (lambda f: f[:0], "shape"),
    (lambda f: f.long(), "dtype int64"),
    (lambda f: f.numpy().astype(np.int32), "dtype int32"),
    (lambda f: f.tolist(), "a list"),
    (lambda f: torch.where(torch.arange(len(f))[:, None] == 1, float("nan"), f), "NaN"),
])
def test_predict_refuses_bad_features_with_the_expected_form(runs, make, problem) -> None:
    run = runs["vpt"]
    features, _ = run.test_features("base")
    width = run.clip.feature_dim
    with pytest.raises(UserError, match=problem) as refused:
        run.predict(make(features))
    assert f"(N, {width})" in str(refused.value) and "float32 on cpu" in str(refused.value)
    with pytest.raises(UserError, match=problem):
        run.posterior_samples(2, make(features))


def test_a_point_estimate_model_refuses_several_draws(runs) -> None:
    run = runs["coop"]
    features, _ = run.test_features("base")
    assert run.predict(features).shape[0] == 1
    assert run.predict(features, num_samples=1).shape[0] == 1
    with pytest.raises(UserError, match="point-estimate model.*num_samples must be 1"):
        run.predict(features, num_samples=2)
    assert runs["vpt"].predict(features, num_samples=2).shape[0] == 2
    with pytest.raises(UserError, match="1 or more"):
        runs["vpt"].predict(features, num_samples=0)


@pytest.mark.parametrize("classnames, message", [
    ([], "at least one class name"),
    ("cat", "a list of class names"),
    (["cat", ""], "non-empty text"),
])
def test_set_classes_refuses_no_classes(runs, classnames, message: str) -> None:
    run = runs["vpt"]
    before = run.classnames
    with pytest.raises(UserError, match=message):
        run.set_classes(classnames)
    assert run.classnames == before
