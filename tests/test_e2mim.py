"""E2MIM: MI bounds on Gaussians of known MI, class-wise Mixup, the two model files end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pytest
import torch

from bayesprompt.clip.factory import load_clip
from bayesprompt.dual_view.mi_bounds import Critic, critic_objective, infonce_terms, mi_lower_bound
from bayesprompt.dual_view.mixup import class_mixup
from bayesprompt.dual_view.model import E2MIMOptions, critic_input, mixup_nll
from bayesprompt.errors import UserError
from bayesprompt.inference.objectives import elbo_objective
from bayesprompt.inference.predictive import predictive_probs
from bayesprompt.inference.svi import TrainConfig, train
from bayesprompt.program.base import PromptConfig
from bayesprompt.program.priors import isotropic_normal
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.model_files import load_model_class
from bayesprompt.runs.train import train_and_evaluate
from tests.conftest import TINY_BACKBONE

DIM, BATCH, EVAL_BATCHES = 2, 32, 30


def gaussian_pairs(n: int, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with per-dimension correlation rho: MI = -0.5 * DIM * log(1 - rho^2) nats."""
    a = torch.randn(n, DIM)
    return a, rho * a + math.sqrt(1 - rho ** 2) * torch.randn(n, DIM)


def trained_estimate(bound: str, rho: float) -> tuple[float, float]:
    """Train a critic briefly, then the bound's mean and standard error over fresh batches."""
    torch.manual_seed(0)
    critic = Critic(DIM, DIM, hidden_dim=32)
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for _ in range(150):
        loss = -critic_objective(critic, *gaussian_pairs(BATCH, rho), bound).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimates = torch.stack([mi_lower_bound(critic, *gaussian_pairs(BATCH, rho), bound)
                                 for _ in range(EVAL_BATCHES)])
    return estimates.mean().item(), estimates.std().item() / math.sqrt(EVAL_BATCHES)


@pytest.mark.parametrize("bound", ["jsd", "infonce"])
def test_mi_bound_is_a_lower_bound_on_gaussians(bound):
    # For a fixed critic, each bound's expectation is at most the true MI; the estimate is a
    # mean of independent batch estimates, so it may exceed the truth by Monte Carlo error only:
    # 3 standard errors (the RNG is seeded, so the test is deterministic).
    results = {}
    for rho in (0.5, 0.8):
        true_mi = -0.5 * DIM * math.log(1 - rho ** 2)
        mean, stderr = trained_estimate(bound, rho)
        assert mean - 3 * stderr > 0, (rho, mean, stderr)
        assert mean < true_mi + 3 * stderr, (rho, mean, stderr, true_mi)
        results[rho] = mean
    assert results[0.8] > results[0.5]


def test_infonce_never_exceeds_log_batch_size():
    scores = 10 * torch.randn(3, 16, 16)
    assert (infonce_terms(scores) <= math.log(16) + 1e-5).all()


def test_mixup_pairs_different_classes_with_normalised_soft_labels():
    features = torch.nn.functional.normalize(torch.randn(8, 5), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    torch.manual_seed(0)
    mix = class_mixup(features, labels, n_classes=4, alpha=0.5, label="soft")
    assert len(mix.anchor) == 8
    assert (labels[mix.anchor] != labels[mix.partner]).all()
    torch.testing.assert_close(mix.targets.sum(-1), torch.ones(8))
    torch.testing.assert_close(mix.features.norm(dim=-1), torch.ones(8))
    expected = mix.lam[:, None] * features[mix.anchor] + (1 - mix.lam[:, None]) * features[
        mix.partner]
    torch.testing.assert_close(mix.features, torch.nn.functional.normalize(expected, dim=-1))
    assert (mix.targets > 0).sum(-1).max() <= 2

    torch.manual_seed(0)
    again = class_mixup(features, labels, n_classes=4, alpha=0.5, label="mixed")
    assert torch.equal(again.partner, mix.partner) and torch.equal(again.lam, mix.lam)
    torch.testing.assert_close(again.targets.sum(-1), torch.ones(8))
    assert set(again.targets.unique().tolist()) == {0.0, 0.5}


def test_mixup_of_one_class_mixes_nothing():
    mix = class_mixup(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 3)
    assert len(mix.anchor) == 0 and mix.targets.shape == (0, 3)


def test_mixed_class_is_scored_by_the_union_of_its_classes():
    log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    targets = torch.tensor([[0.5, 0.0, 0.5]])
    torch.testing.assert_close(mixup_nll(log_probs, targets, "mixed"), -torch.log(
        torch.tensor([0.7])))
    torch.testing.assert_close(mixup_nll(log_probs, targets, "soft"), -log_probs[:, [0, 2]].mean(
        -1))


@pytest.mark.parametrize("options", [{"bogus": 1}, {"mi_bound": "mine"}, {"mixup": "yes"},
                                     {"fusion_weight": 2}, {"mixup_label": "hard"},
                                     {"critic_optimizer": "rmsprop"}, {"critic_lr": 0}])
def test_bad_options_are_user_errors(options):
    with pytest.raises(UserError):
        E2MIMOptions.parse(options)


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(TINY_BACKBONE, None, "cpu")


def build(tiny_clip, model: str, options: dict):
    return load_model_class(model)(tiny_clip, ["a", "b", "c", "d"],
                                     PromptConfig(options=options))


@pytest.mark.parametrize("model", ["e2mim", "e2mim_vpt"])
def test_factors_are_per_image_like_the_label(tiny_clip, model):
    # The objective of a batch from a dataset of N images is G / N + (per-image terms), G the
    # prior term of the global latent (-log p(ctx) for e2mim; none for e2mim_vpt, whose latent
    # is per image): a factor left outside the data plate would add to G.
    program = build(tiny_clip, model, {"mi_bound": "infonce"})
    features = torch.nn.functional.normalize(torch.randn(4, tiny_clip.feature_dim), dim=-1)
    labels = torch.tensor([0, 1, 1, 3])
    totals = {}
    for dataset_size in (4, 40, 400):
        program.clear_parameters()
        pyro.set_rng_seed(0)
        loss = elbo_objective(program, 2)(features, labels, dataset_size).item()
        assert math.isfinite(loss)
        totals[dataset_size] = dataset_size * loss
    per_image = (totals[400] - totals[40]) / 360
    global_term = totals[4] - 4 * per_image
    expected = 0.0
    if model == "e2mim":
        prior = isotropic_normal(torch.zeros_like(program.init_ctx), 1.0, 2)
        expected = -prior.log_prob(program.init_ctx).item()
    assert global_term == pytest.approx(expected, rel=1e-4, abs=1e-2)


def test_per_image_objective_is_the_documented_one(tiny_clip):
    # CE(y_i) + mixup_weight * (mix loss of the mix anchored at i) - mi_weight * I_hat(batch).
    options = {"mi_weight": 0.7, "mixup_weight": 0.3}
    program = build(tiny_clip, "e2mim", options)
    torch.manual_seed(1)
    for parameter in program.critic.parameters():  # a critic whose bound is far from zero
        parameter.data.normal_()
    features = torch.nn.functional.normalize(torch.randn(4, tiny_clip.feature_dim), dim=-1)
    labels = torch.tensor([0, 1, 1, 3])
    totals = {}
    for dataset_size in (4, 40):
        program.clear_parameters()
        pyro.set_rng_seed(0)
        totals[dataset_size] = dataset_size * elbo_objective(program, 1)(
            features, labels, dataset_size).item()
    pyro.set_rng_seed(0)
    with torch.no_grad():
        mix = program.mix(features, labels)
        everything = torch.cat([features, mix.features])
        logits = program.class_logits(everything, program.text_features(program.init_ctx))
        ce = torch.nn.functional.cross_entropy(logits[:4], labels)
        mixup = mixup_nll(logits[4:].log_softmax(-1), mix.targets, "soft").sum() / 4
        views = program.class_logits(everything, program.handcrafted_text)
        bound = critic_objective(program.critic, critic_input(views), critic_input(logits),
                                 "jsd").mean()
    expected = ce + 0.3 * mixup - 0.7 * bound
    assert abs(bound.item()) > 0.05
    assert (totals[40] - totals[4]) / 36 == pytest.approx(expected.item(), rel=1e-4)


def test_fusion_weight_interpolates_the_two_views(tiny_clip):
    features = torch.nn.functional.normalize(torch.randn(3, tiny_clip.feature_dim), dim=-1)
    zero_shot = build(tiny_clip, "zeroshot", {})
    coop = build(tiny_clip, "coop", {})
    fused = {w: predictive_probs(build(tiny_clip, "e2mim", {"fusion_weight": w}), features, 1)
             for w in (0.0, 0.3, 1.0)}
    learnable = predictive_probs(coop, features, 1)  # the same `ctx_map` param as E2MIM's
    torch.testing.assert_close(fused[0.0], learnable)
    torch.testing.assert_close(fused[1.0], predictive_probs(zero_shot, features, 1))
    torch.testing.assert_close(fused[0.3], 0.3 * fused[1.0] + 0.7 * fused[0.0])
    without = build(tiny_clip, "e2mim", {"handcrafted": False, "fusion_weight": 1.0})
    torch.testing.assert_close(predictive_probs(without, features, 1), learnable)


def test_the_mi_estimate_rises_with_the_critics_own_optimiser(tiny_clip):
    # Classes separable in feature space: both views carry the class, so their MI is large.
    # A critic on SGD at the prompts' base rate 0.002 keeps the logged JSD bound within 0.02
    # of 0 for 45 steps; Adam at the default critic_lr lifts it to about 0.75 (measured).
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(6)
    centres = torch.randn(4, tiny_clip.feature_dim, generator=generator)
    noise = 0.3 * torch.randn(len(labels), tiny_clip.feature_dim, generator=generator)
    features = torch.nn.functional.normalize(centres[labels] + noise, dim=-1).unsqueeze(0)
    config = TrainConfig(epochs=15, batch_size=8, num_particles=1, lr=0.002)
    curves = {}
    for name, options in [("adam", {}), ("sgd", {"critic_optimizer": "sgd", "critic_lr": 0.002})]:
        torch.manual_seed(0)
        curves[name] = train(build(tiny_clip, "e2mim", options), features, labels,
                             config).factors["mi"]
    assert len(curves["adam"]) == 15 and curves["adam"][0] < 0.05
    assert sum(curves["adam"][-3:]) / 3 > 0.4
    assert max(abs(value) for value in curves["sgd"]) < 0.05


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("model, options", [
    ("e2mim", {}),
    ("e2mim_vpt", {}),
    ("e2mim", {"handcrafted": False}),
    ("e2mim", {"mixup": False, "mi_bound": "infonce"}),
    ("e2mim", {"mixup_label": "mixed", "fused_training": True, "templates": "ensemble"}),
    ("e2mim_vpt", {"handcrafted": False, "mixup": False}),
])
def test_trains_and_evaluates_on_eurosat(model, options, eurosat_root, cache_dir, tmp_path):
    config = RunConfig(dataset="eurosat", root=str(eurosat_root), model=model,
                       backbone=TINY_BACKBONE, pretrained=None, shots=4, epochs=2,
                       num_particles=2, batch_size=4, views=2, lr=0.01, options=options,
                       cache_dir=str(cache_dir), out=str(tmp_path / "run"))
    results = train_and_evaluate(config)
    assert len(results["loss_history"]) == 2
    assert all(math.isfinite(loss) for loss in results["loss_history"])
    assert 0 <= results["base_acc"] <= 100 and 0 <= results["new_acc"] <= 100


def test_without_mixup_mi_and_fusion_e2mim_is_coop(eurosat_root, tmp_path):
    results = {}
    for model, options in [("coop", {}),
                           ("e2mim", {"mixup": False, "mi_weight": 0, "fusion_weight": 0})]:
        torch.manual_seed(0)  # the tiny backbone's random weights come from the global RNG
        config = RunConfig(dataset="eurosat", root=str(eurosat_root), model=model,
                           backbone=TINY_BACKBONE, pretrained=None, shots=4, epochs=2,
                           num_particles=1, batch_size=4, views=2, lr=0.01, options=options,
                           cache_dir=str(tmp_path / "cache"), out=str(tmp_path / model))
        results[model] = train_and_evaluate(config)
    for key in ("loss_history", "base_acc", "new_acc"):
        assert results["e2mim"][key] == pytest.approx(results["coop"][key], rel=1e-5)
