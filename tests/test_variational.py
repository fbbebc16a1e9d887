"""The guide's own optimiser under the ELBO (inference/variational.py): which parameters it
holds, and that --objective paper keeps the reference SGD for every parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE

import bayesprompt
from bayesprompt.inference.variational import guide_parameter_names
from bayesprompt.program import PromptConfig
from bayesprompt.runs.model_files import load_model_class


@pytest.mark.parametrize("model, expected", [
    ("vpt", {"r_loc", "r_log_var"}), ("coop", set()), ("zeroshot", set())])
def test_the_variational_parameters_are_the_guides_own(tiny_clip, model, expected) -> None:
    program = load_model_class(model)(tiny_clip, ["cat", "dog"], PromptConfig())
    program.initialize_parameters()
    features = torch.zeros(2, tiny_clip.feature_dim)
    with program.param_scope():
        names = guide_parameter_names(program, features, torch.tensor([0, 1]), 2)
    assert names == expected


def test_vpt_conds_posterior_net_is_variational(tiny_clip) -> None:
    program = load_model_class("vpt_cond")(tiny_clip, ["cat", "dog"], PromptConfig())
    program.initialize_parameters()
    with program.param_scope():
        names = guide_parameter_names(program, torch.zeros(2, tiny_clip.feature_dim),
                                      torch.tensor([0, 1]), 2)
    assert names and all(name.startswith("posterior_net") for name in names)


@pytest.mark.parametrize("objective, optimizer, groups", [
    ("elbo", "adam", {"guide"}), ("paper", "adam", set()), ("elbo", "sgd", set())])
def test_the_guide_group_is_the_elbos_only(eurosat_root: Path, tmp_path: Path, objective,
                                           optimizer, groups) -> None:
    """--guide-optimizer adam gives the ELBO's guide its own Adam; the reference's objective
    and the default (sgd) keep every parameter on the reference SGD."""
    run = bayesprompt.fit(dataset="eurosat", root=str(eurosat_root), model="vpt",
                          backbone=TINY_BACKBONE, pretrained="", shots=4, epochs=2,
                          num_particles=2, batch_size=4, views=1, device="cpu",
                          objective=objective, residual_scale=1.0, guide_optimizer=optimizer,
                          cache_dir=str(tmp_path / "cache"),
                          out=str(tmp_path / f"{objective}-{optimizer}"))
    rows = [json.loads(line) for line in (run.folder / "metrics.jsonl").open()]
    assert set(rows[-1]["group_lr"]) == groups
    if groups:  # the schedule: warm-up ratio, then the cosine scaled to guide_lr
        assert rows[-1]["group_lr"]["guide"] == pytest.approx(rows[-1]["lr"] * 0.01 / run.config.lr)
        latent = rows[-1]["latent"]["r"]
        assert latent["kl_prior"] > 0 and latent["contraction"] > 0
    elif objective == "paper":
        assert rows[-1]["latent"] == {}
