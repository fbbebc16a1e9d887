"""Objectives and checkpoints: the paper objective, batching, resume."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from test_models import CLASSES, separable_features

from bayesprompt.errors import UserError
from bayesprompt.inference import checkpoint, objectives, predictive, svi
from bayesprompt.inference.objectives import paper_objective
from bayesprompt.inference.svi import TrainConfig, train
from bayesprompt.program.base import PromptConfig
from bayesprompt.program.priors import isotropic_normal
from bayesprompt.runs.model_files import load_model_class


def test_paper_objective_equals_direct_computation(tiny_clip) -> None:
    program = load_model_class("vpt_cond")(tiny_clip, CLASSES, PromptConfig())
    features, labels = separable_features(tiny_clip, per_class=2)
    features = features[0]
    particles = 5
    torch.manual_seed(3)
    loss = paper_objective(program, particles)(features, labels, 100)
    torch.manual_seed(3)
    with pyro.plate("particles", particles, dim=-2):
        guide_trace = poutine.trace(program.guide).get_trace(features, labels, 100)
    fixed_r = guide_trace.nodes["r"]["value"]                         # (L, B, W)

    loc, scale = program.posterior_net(features)                      # (B, W)
    ctx = program.learned_parameters()["ctx"]
    text = tiny_clip.encode_prompts(program.prompts.splice(ctx + fixed_r.unsqueeze(-2)),
                                    program.prompts.eot_index)        # (L, B, C, D)
    logits = tiny_clip.logit_scale * torch.einsum("lbcd,bd->lbc", text, features)
    log_lik = torch.log_softmax(logits, -1).gather(-1, labels.expand(particles, -1)[..., None])
    per_image = -(torch.logsumexp(log_lik[..., 0], 0) - math.log(particles))
    kl = 0.5 * (scale**2 + loc**2 - 1 - torch.log(scale**2))          # N(loc, scale) || N(0, 1)
    expected = per_image.mean() + 1e-3 * kl.mean(-1).mean()
    torch.testing.assert_close(loss, expected)


def test_batched_elbo_is_the_mean_of_single_image_objectives(tiny_clip) -> None:
    program = load_model_class("coop")(tiny_clip, CLASSES, PromptConfig())
    features, labels = separable_features(tiny_clip, per_class=2)
    objective = objectives.make_objective(program, "elbo", 1)
    batched = objective(features[0], labels, 50)
    singles = [objective(features[0, i:i + 1], labels[i:i + 1], 50) for i in range(len(labels))]
    # the per-image objective is (prior term)/N + mean NLL: single-image calls agree on average
    torch.testing.assert_close(batched, torch.stack(singles).mean())


def test_unknown_objective() -> None:
    with pytest.raises(UserError, match="Unknown objective 'mle'"):
        objectives.make_objective(None, "mle", 1)


@pytest.mark.parametrize("model", ["vpt_cond", "e2mim"])  # e2mim: a critic with its own Adam
def test_resume_gives_the_same_parameters(model, tiny_clip, tmp_path, monkeypatch) -> None:
    features, labels = separable_features(tiny_clip)
    features = torch.cat([features, features + 0.01])                # two views
    config = TrainConfig(epochs=4, batch_size=5, num_particles=3, lr=0.1, seed=7)
    identity = {"model": model, "classnames": CLASSES}

    def fresh_program():
        torch.manual_seed(0)
        return load_model_class(model)(tiny_clip, CLASSES, PromptConfig())

    program = fresh_program()
    uninterrupted = train(program, features, labels, config, tmp_path / "a.pt", identity)
    expected = program.prompt_state()

    save = checkpoint.save_torch
    calls = []

    def save_then_crash(path, state):
        save(path, state)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_torch", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(fresh_program(), features, labels, config, tmp_path / "b.pt", identity)
    interrupted = torch.load(tmp_path / "b.pt", weights_only=True)
    assert interrupted["epoch"] == 2
    assert set(interrupted["group_optimizers"]) == ({"critic"} if model == "e2mim" else set())
    monkeypatch.setattr(checkpoint, "save_torch", save)
    program = fresh_program()
    resumed = train(program, features, labels, config, tmp_path / "b.pt", identity, resume=True)
    assert resumed.loss == pytest.approx(uninterrupted.loss)
    assert resumed.factors.keys() == uninterrupted.factors.keys()
    for name, curve in resumed.factors.items():
        assert curve == pytest.approx(uninterrupted.factors[name])
    assert ("mi" in resumed.factors) == (model == "e2mim")
    for name, value in program.learned_parameters().items():
        torch.testing.assert_close(value, expected[name])

    with pytest.raises(UserError, match="belongs to another run.*classnames"):
        train(fresh_program(), features, labels, config, tmp_path / "b.pt",
              {"model": model, "classnames": ["a", "b", "c", "d"]}, resume=True)


def test_optimizer_groups_get_their_own_optimiser(tiny_clip) -> None:
    # The prompts' SGD at learning rate 0 leaves ctx where it starts; only the critic's Adam
    # (critic_lr) moves its parameters.
    features, labels = separable_features(tiny_clip)
    torch.manual_seed(0)
    program = load_model_class("e2mim")(tiny_clip, CLASSES, PromptConfig())
    config = TrainConfig(epochs=2, batch_size=6, num_particles=1, lr=0.0, warmup_epochs=0)
    objective = objectives.make_objective(program, config.objective, config.num_particles)
    objective(features[0, :6], labels[:6], 24)
    before = program.prompt_state()
    train(program, features, labels, config)
    after = program.learned_parameters()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("critic$$$") for k in moved)
    assert "ctx_map" in before and "ctx_map" not in moved


def test_factor_history_is_each_factors_mean_per_epoch(tiny_clip) -> None:
    # a factor worth the first feature of each image: its epoch mean is that of all images
    coop = load_model_class("coop")

    class WithFeatureFactor(coop):
        def model(self, image_features, labels=None, dataset_size=None):
            ctx = pyro.sample("ctx", isotropic_normal(torch.zeros_like(self.init_ctx), 1.0, 2))
            logits = self.class_logits(image_features, self.text_features(ctx))
            with self.images(image_features, dataset_size):
                pyro.sample("y", pyro.distributions.Categorical(logits=logits), obs=labels)
                pyro.factor("first", image_features[:, 0])

    features, labels = separable_features(tiny_clip)
    torch.manual_seed(0)
    history = train(WithFeatureFactor(tiny_clip, CLASSES, PromptConfig()), features, labels,
                    TrainConfig(epochs=3, batch_size=5, num_particles=2))
    assert len(history.loss) == 3
    assert history.factors["first"] == pytest.approx([features[0, :, 0].mean().item()] * 3)


def test_paper_objective_keeps_factor_terms(tiny_clip) -> None:
    coop = load_model_class("coop")
    features, labels = separable_features(tiny_clip, per_class=2)

    class WithBonus(coop):
        def model(self, image_features, labels=None, dataset_size=None):
            ctx = pyro.sample("ctx", isotropic_normal(torch.zeros_like(self.init_ctx), 1.0, 2))
            logits = self.class_logits(image_features, self.text_features(ctx))
            with self.images(image_features, dataset_size):
                pyro.sample("y", pyro.distributions.Categorical(logits=logits), obs=labels)
                pyro.factor("bonus", torch.full((image_features.shape[0],), 0.25))

    plain = paper_objective(coop(tiny_clip, CLASSES, PromptConfig()), 1)
    bonus = paper_objective(WithBonus(tiny_clip, CLASSES, PromptConfig()), 1)
    torch.testing.assert_close(bonus(features[0], labels, 100),
                               plain(features[0], labels, 100) - 0.25)


def trained_briefly(name: str, tiny_clip, **options) -> tuple:
    torch.manual_seed(0)
    program = load_model_class(name)(tiny_clip, CLASSES, PromptConfig())
    features, labels = separable_features(tiny_clip)
    config = TrainConfig(epochs=2, batch_size=6, num_particles=2, lr=0.05, warmup_epochs=0,
                         **options)
    return program, features, labels, config


@pytest.mark.parametrize("name", ["vpt", "vpt_cond"])
def test_predictive_does_not_depend_on_the_evaluation_batch_size(name: str, tiny_clip) -> None:
    program, features, labels, config = trained_briefly(name, tiny_clip)
    train(program, features, labels, config)
    torch.manual_seed(123)  # the caller's RNG state must not matter either
    reference = predictive.predictive_probs(program, features[0], 7, batch_size=64, seed=5)
    state = torch.get_rng_state()
    for batch_size in (1, 3, 5, 24):
        probs = predictive.predictive_probs(program, features[0], 7, batch_size=batch_size, seed=5)
        torch.testing.assert_close(probs, reference)
        assert torch.equal(probs.mean(0).argmax(-1), reference.mean(0).argmax(-1))
    assert torch.equal(torch.get_rng_state(), state)  # evaluation leaves the caller's RNG alone
    other_seed = predictive.predictive_probs(program, features[0], 7, seed=6)
    assert not torch.allclose(other_seed, reference)


def test_global_draws_are_shared_by_the_splits_of_one_evaluation(tiny_clip) -> None:
    program, features, labels, config = trained_briefly("vpt", tiny_clip)
    train(program, features, labels, config)
    shared: dict = {}
    first = predictive.posterior_draws(program, features[0, :10], 4, seed=1, shared=shared)
    second = predictive.posterior_draws(program, features[0, 10:], 4, seed=2, shared=shared)
    assert second.latents["r"] is first.latents["r"] and first.latents["r"].shape[0] == 4


def test_checkpoint_holds_only_safe_types_and_corruption_is_explained(tiny_clip,
                                                                       tmp_path) -> None:
    program, features, labels, config = trained_briefly("vpt_cond", tiny_clip)
    train(program, features, labels, config, tmp_path / "c.pt", {"model": "vpt_cond"})
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["epoch"] == 2 and state["cuda_rng"] == [] and state["rng"].dtype == torch.uint8
    data = (tmp_path / "c.pt").read_bytes()
    for broken in (data[: len(data) // 2], b"", b"\x00" * 100):
        (tmp_path / "bad.pt").write_bytes(broken)
        with pytest.raises(UserError, match="truncated, corrupt or not a checkpoint"):
            checkpoint.load_checkpoint(tmp_path / "bad.pt", {"model": "vpt_cond"})
    torch.save({"epoch": 1}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="lacks some of"):
        checkpoint.load_checkpoint(tmp_path / "old.pt", {})


def test_cuda_rng_states_are_saved_and_restored(monkeypatch) -> None:
    """The CUDA branch with a stand-in torch.cuda (no GPU here): all devices' states."""
    states = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cpu, cuda = checkpoint.rng_state(torch.device("cuda", 0))
    assert cuda == states
    assert checkpoint.rng_state(torch.device("cpu"))[1] == []
    checkpoint.set_rng_state(cpu, cuda)
    assert restored == states


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(tiny_clip,
                                                                       tmp_path) -> None:
    program, features, labels, config = trained_briefly("coop", tiny_clip, seed=1)
    good = train(program, features, labels, config, tmp_path / "c.pt", {"model": "coop"})
    before = (tmp_path / "c.pt").read_bytes()
    config.epochs, config.lr, config.warmup_epochs = 4, 1e9, 2
    with pytest.raises(svi.Diverged, match=r"diverged at epoch 3.*epoch 2.*Lower --lr"):
        train(program, features, labels, config, tmp_path / "c.pt", {"model": "coop"},
              resume=True)
    assert (tmp_path / "c.pt").read_bytes() == before and len(good.loss) == 2
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 2


def test_an_invalid_distribution_after_a_step_is_divergence(tiny_clip) -> None:
    """vpt_cond with a huge learning rate: its guide's scale leaves (0, inf) or the loss
    explodes; either way a Diverged message, never Pyro's dump of the distribution."""
    program, features, labels, config = trained_briefly("vpt_cond", tiny_clip, seed=1)
    config.lr, config.epochs = 1e6, 6
    with pytest.raises(svi.Diverged, match="Lower --lr"):
        train(program, features, labels, config)


def test_a_parameter_created_after_the_first_step_is_refused(tiny_clip) -> None:
    coop = load_model_class("coop")

    class Late(coop):
        calls = 0

        def guide(self, image_features, labels=None, dataset_size=None):
            Late.calls += 1
            if Late.calls > 2:
                pyro.param("late", torch.zeros(()))
            super().guide(image_features, labels, dataset_size)

    program = Late(tiny_clip, CLASSES, PromptConfig())
    features, labels = separable_features(tiny_clip)
    config = TrainConfig(epochs=1, batch_size=6, num_particles=1)
    with pytest.raises(UserError, match=r"parameters \['late'\] after its first call"):
        train(program, features, labels, config)
