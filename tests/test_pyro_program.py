"""A model file is a Pyro program: autoguides, per-image plates with real indices, any ELBO,
exact restore (issue 17)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, autoguide
from test_models import CLASSES, separable_features
from test_run_safety import exits_2, run_cli

import bayesprompt
from bayesprompt.errors import UserError
from bayesprompt.inference import checkpoint, predictive
from bayesprompt.inference.checkpoint import load_checkpoint
from bayesprompt.inference.objectives import Objective, make_objective
from bayesprompt.inference.svi import TrainConfig, train
from bayesprompt.program import PromptConfig, PromptModel
from bayesprompt.program.priors import standard_normal
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.model_files import load_model_class

AUTOGUIDES = ["AutoDelta", "AutoNormal", "AutoDiagonalNormal", "AutoLowRankMultivariateNormal",
              "AutoMultivariateNormal", "AutoIAFNormal"]
CONFIG = TrainConfig(epochs=3, batch_size=6, num_particles=2, lr=0.5, warmup_epochs=0, seed=3)


class GlobalResidual(PromptModel):
    """vpt's model: one residual r (W,) for all images; no guide of its own."""

    latent_sites = ("r",)

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())
        r = pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))
        logits = self.class_logits(image_features, self.text_features(ctx + self.residual(r)))
        with self.images(image_features, dataset_size):
            pyro.sample("y", dist.Categorical(logits=logits), obs=labels)


class PerImageResidual(PromptModel):
    """vpt_cond's model: a residual r_i (W,) per image, in the data plate; no guide."""

    latent_sites = ("r",)

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())
        with self.images(image_features, dataset_size):
            r = pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))
            text = self.text_features(ctx + self.residual(r))
            pyro.sample("y", dist.Categorical(logits=self.class_logits(image_features, text)),
                        obs=labels)


def with_autoguide(base: type[PromptModel], name: str, idiom: str) -> type[PromptModel]:
    """`base` whose guide is autoguide `name`: named as a class attribute, or set in __init__."""
    guide_class = getattr(autoguide, name)
    if idiom == "class":
        return type(f"{name}Program", (base,), {"guide": guide_class})

    def __init__(self, clip, classnames, config):
        base.__init__(self, clip, classnames, config)
        self.guide = guide_class(self.model)

    return type(f"{name}Program", (base,), {"__init__": __init__})


def objective_of(program: PromptModel, config: TrainConfig) -> Objective:
    """The objective `train` builds for `config`."""
    return make_objective(program, config.objective, config.num_particles, config.elbo)


def program_of(model_class: type[PromptModel], clip, **config) -> PromptModel:
    torch.manual_seed(0)
    return model_class(clip, CLASSES, PromptConfig(residual_scale=0.5, **config))


def features_and_labels(tiny_clip) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = separable_features(tiny_clip, per_class=3)      # 12 images
    return torch.cat([features, features + 0.01]), labels              # two views


def test_a_program_without_a_guide_says_how_to_write_one(tiny_clip) -> None:
    program = program_of(GlobalResidual, tiny_clip)
    with pytest.raises(NotImplementedError, match="self.guide = AutoNormal"):
        program.initialize_parameters()


@pytest.mark.parametrize("idiom", ["class", "init"])
@pytest.mark.parametrize("name", AUTOGUIDES)
def test_every_autoguide_trains_checkpoints_and_resumes(name, idiom, tiny_clip, tmp_path,
                                                        monkeypatch) -> None:
    model_class = with_autoguide(GlobalResidual, name, idiom)
    features, labels = features_and_labels(tiny_clip)
    program = program_of(model_class, tiny_clip)
    uninterrupted = train(program, features, labels, CONFIG, tmp_path / "a.pt")
    expected = program.prompt_state()
    assert any(key.startswith(name) for key in expected)
    initial = program_of(model_class, tiny_clip)
    initial.initialize_parameters()
    moved = [k for k, v in initial.prompt_state().items() if not torch.equal(v, expected[k])]
    assert sorted(moved) == sorted(expected)           # every parameter trained, ctx too

    save, calls = checkpoint.save_torch, []

    def save_then_crash(path, state):
        save(path, state)
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_torch", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(program_of(model_class, tiny_clip), features, labels, CONFIG, tmp_path / "b.pt")
    resumed_program = program_of(model_class, tiny_clip)
    resumed = train(resumed_program, features, labels, CONFIG, tmp_path / "b.pt", resume=True)
    assert resumed.loss == uninterrupted.loss
    for key, value in resumed_program.prompt_state().items():
        assert torch.equal(value, expected[key]), key

    loaded = program_of(model_class, tiny_clip)          # fresh initial values, then restored
    loaded.load_prompt_state(expected)
    torch.testing.assert_close(predictive.predictive_probs(loaded, features[0], 4, seed=5),
                               predictive.predictive_probs(program, features[0], 4, seed=5),
                               rtol=0, atol=0)


def test_restore_copies_into_the_parameters_optimisers_hold(tiny_clip, tmp_path) -> None:
    features, labels = features_and_labels(tiny_clip)
    config = TrainConfig(epochs=1, batch_size=6, num_particles=2, lr=0.5, warmup_epochs=0)
    for program in (program_of(load_model_class("vpt"), tiny_clip),
                    program_of(with_autoguide(GlobalResidual, "AutoNormal", "init"), tiny_clip)):
        train(program, features, labels, config, tmp_path / "c.pt")
        trained = program.prompt_state()
        fresh = program_of(type(program), tiny_clip)
        fresh.initialize_parameters()
        held = fresh.learned_parameters()
        with fresh.param_scope():
            load_checkpoint(tmp_path / "c.pt", {})
        for name, value in fresh.learned_parameters().items():
            assert value is held[name] and torch.equal(value, trained[name]), name
        fresh.load_prompt_state({k: v + 1 for k, v in trained.items()})
        for name, value in fresh.learned_parameters().items():
            assert value is held[name] and torch.equal(value, trained[name] + 1), name


@pytest.mark.parametrize("model", ["vpt", "vpt_cond", "autoguide"])
def test_kl_weight_scales_model_and_guide(model, tiny_clip) -> None:
    model_class = (with_autoguide(GlobalResidual, "AutoNormal", "class") if model == "autoguide"
                   else load_model_class(model))
    features, labels = features_and_labels(tiny_clip)
    kls = {}
    for weight in (1.0, 0.1, 0.0):
        program = program_of(model_class, tiny_clip, kl_weight=weight)
        objective = objective_of(program, TrainConfig(num_particles=3))
        torch.manual_seed(1)
        loss = objective(features[0], labels, 12)
        terms = objective.terms
        torch.testing.assert_close(loss.detach(), terms.nll + terms.kl)
        kls[weight] = terms.kl
    torch.testing.assert_close(kls[0.1], 0.1 * kls[1.0])
    assert kls[0.0] == 0 and kls[1.0] > 0


def test_kl_weight_zero_trains(run_args, tmp_path) -> None:
    run_cli([*run_args, "--model", "vpt", "--kl-weight", "0"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(row["kl"] == 0 for row in rows)


def test_autoguide_logs_kl_and_posterior_scale(tiny_clip) -> None:
    for name in ("AutoNormal", "AutoDiagonalNormal", "AutoLowRankMultivariateNormal"):
        program = program_of(with_autoguide(GlobalResidual, name, "class"), tiny_clip)
        objective = objective_of(program, TrainConfig(num_particles=3))
        features, labels = features_and_labels(tiny_clip)
        objective(features[0], labels, 12)
        scale = objective.terms.posterior_scale["r"]                 # mean, min, max
        assert (scale > 0).all() and scale[1] <= scale[2]
        assert scale[1] - 1e-6 <= scale[0] <= scale[2] + 1e-6
        assert objective.terms.kl > 0


def write_model_file(folder: Path, name: str, source: str) -> str:
    path = folder / f"{name}.py"
    path.write_text(source)
    return str(path)


AUTOGUIDE_FILE = """
import pyro, pyro.distributions as dist
from pyro.infer.autoguide import {guide}
from bayesprompt.program import PromptModel
from bayesprompt.program.priors import standard_normal

class Model(PromptModel):
    latent_sites = ("r",)
    guide = {guide}

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())
        r = pyro.sample("r", {prior})
        logits = self.class_logits(image_features, self.text_features(ctx + self.residual(r)))
        with self.images(image_features, dataset_size):
            pyro.sample("y", dist.Categorical(logits=logits), obs=labels)
"""


@pytest.mark.parametrize("model", ["vpt_autoguide", "AutoDiagonalNormal"])
def test_a_loaded_autoguide_run_predicts_its_results(model, run_args, tmp_path) -> None:
    if model != "vpt_autoguide":
        model = write_model_file(tmp_path, "diag", AUTOGUIDE_FILE.format(
            guide=model, prior="standard_normal((self.ctx_dim,), ctx.device)"))
    run_cli([*run_args, "--model", model, "--lr", "0.5"])
    run = bayesprompt.Run.load(tmp_path / "run", model=model)  # a file: passed, so trusted
    features, labels = run.test_features("new")
    run.set_classes(run.new.classnames)
    mean = run.predict(features).double().mean(0)
    nll = -mean[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean().item()
    assert nll == pytest.approx(run.results["new_nll"], rel=1e-12)


def test_resumed_vpt_autoguide_run_equals_uninterrupted(run_args, tmp_path, monkeypatch) -> None:
    args = [*run_args, "--model", "vpt_autoguide", "--lr", "0.5", "--epochs", "3"]
    run_cli(args)
    expected = json.loads((tmp_path / "run" / "results.json").read_text())
    save, calls = checkpoint.save_torch, []

    def save_then_crash(path, state):
        save(path, state)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_torch", save_then_crash)
    again = [a if a != str(tmp_path / "run") else str(tmp_path / "again") for a in args]
    with pytest.raises(SystemExit):
        run_cli(again)
    monkeypatch.setattr(checkpoint, "save_torch", save)
    run_cli([*again, "--resume"])
    resumed = json.loads((tmp_path / "again" / "results.json").read_text())
    for key in ("base_acc", "new_acc", "new_nll", "new_ece", "loss_history"):
        assert resumed[key] == expected[key], key


def test_per_image_autoguide_trains_one_row_per_training_image(tiny_clip) -> None:
    for idiom in ("class", "init"):  # the init idiom has no create_plates: the program adds it
        model_class = with_autoguide(PerImageResidual, "AutoNormal", idiom)
        program = program_of(model_class, tiny_clip)
        features, labels = features_and_labels(tiny_clip)
        config = TrainConfig(epochs=1, batch_size=4, num_particles=2, lr=0.5, warmup_epochs=0)
        objective = objective_of(program, config)
        with program.param_scope():
            with program.batch_indices(torch.tensor([5, 7, 8])):
                objective(features[0, [5, 7, 8]], labels[[5, 7, 8]], 12)
            loc = pyro.get_param_store()["AutoNormal.locs.r"]
            assert loc.shape == (12, program.ctx_dim)
            before = loc.detach().clone()
            with program.batch_indices(torch.tensor([5, 7, 8])):
                loss = objective(features[0, [5, 7, 8]], labels[[5, 7, 8]], 12)
            loss.backward()
            params = [p for _, p in pyro.get_param_store().named_parameters()]
            torch.optim.SGD(params, lr=0.5).step()
            moved = (loc.detach() != before).any(-1).nonzero().flatten().tolist()
        assert moved == [5, 7, 8]

        train(program, features, labels, config)                # one epoch: every image once
        loc = program.learned_parameters()["AutoNormal.locs.r"]
        fresh = program_of(model_class, tiny_clip)
        with fresh.param_scope(), fresh.batch_indices(torch.arange(4)):
            objective_of(fresh, config)(features[0, :4], labels[:4], 12)
        start = fresh.learned_parameters()["AutoNormal.locs.r"]
        assert (loc != start).any(-1).all()                   # all 12 rows moved


def test_indices_leave_the_existing_models_unchanged(tiny_clip) -> None:
    features, labels = features_and_labels(tiny_clip)
    for name in ("vpt", "vpt_cond", "coop"):
        program = program_of(load_model_class(name), tiny_clip)
        objective = objective_of(program, TrainConfig(num_particles=2))
        torch.manual_seed(4)
        plain = objective(features[0, 3:9], labels[3:9], 12)
        torch.manual_seed(4)
        with program.batch_indices(torch.arange(3, 9)):
            indexed = objective(features[0, 3:9], labels[3:9], 12)
        assert torch.equal(plain, indexed), name


PER_IMAGE_FILE = """
import pyro, pyro.distributions as dist
from pyro.infer.autoguide import AutoNormal
from bayesprompt.program import PromptModel
from bayesprompt.program.priors import standard_normal

class Model(PromptModel):
    latent_sites = ("r",)
    guide = AutoNormal

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())
        with self.images(image_features, dataset_size):
            r = pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))
            text = self.text_features(ctx + self.residual(r))
            pyro.sample("y", dist.Categorical(logits=self.class_logits(image_features, text)),
                        obs=labels)
"""


def test_a_per_image_guide_is_refused_before_training(run_args, tmp_path, capsys) -> None:
    model = write_model_file(tmp_path, "per_image", PER_IMAGE_FILE)
    err = exits_2([*run_args, "--model", model], capsys)
    assert "row per training image" in err and "vpt_cond" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("elbo", ["TraceMeanField_ELBO", "TraceGraph_ELBO", "RenyiELBO",
                                  "JitTrace_ELBO", "TraceEnum_ELBO"])
def test_every_elbo_trains_vpt(elbo, tiny_clip) -> None:
    features, labels = features_and_labels(tiny_clip)
    program = program_of(load_model_class("vpt"), tiny_clip)
    config = TrainConfig(epochs=2, batch_size=6, num_particles=3, lr=0.5, warmup_epochs=0,
                         elbo=elbo)
    history = train(program, features, labels, config)
    assert len(history.loss) == 2 and all(torch.isfinite(torch.tensor(history.loss)))
    start = program_of(load_model_class("vpt"), tiny_clip)
    start.initialize_parameters()
    for name, value in start.prompt_state().items():
        assert not torch.equal(value, program.learned_parameters()[name]), name


def test_loss_and_grads_elbos_give_the_gradient_of_the_loss(tiny_clip) -> None:
    # every site of vpt is reparameterised: TraceGraph_ELBO's estimator is Trace_ELBO's
    features, labels = features_and_labels(tiny_clip)
    gradients = {}
    for elbo in ("Trace_ELBO", "TraceGraph_ELBO"):
        program = program_of(load_model_class("vpt"), tiny_clip)
        objective = objective_of(program, TrainConfig(num_particles=3, elbo=elbo))
        with program.param_scope():
            torch.manual_seed(2)
            objective(features[0], labels, 12)
            torch.manual_seed(2)
            loss = 0.5 * objective(features[0], labels, 12)
            loss.backward()
            named = pyro.get_param_store().named_parameters()
            gradients[elbo] = (loss.detach(), {k: p.grad.clone() for k, p in named})
    torch.testing.assert_close(gradients["TraceGraph_ELBO"][0], gradients["Trace_ELBO"][0])
    for name, grad in gradients["Trace_ELBO"][1].items():
        torch.testing.assert_close(gradients["TraceGraph_ELBO"][1][name], grad)


class MixturePrompt(PromptModel):
    """A discrete latent k_i per image picks one of two learned contexts; the guide has no k
    (TraceEnum_ELBO marginalises it)."""

    elbo = "TraceEnum_ELBO"
    stochastic = False

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", torch.stack([self.init_ctx, self.init_ctx + 0.1]))  # (2, n, W)
        text = self.text_features(ctx).unsqueeze(1)                              # (2, 1, C, D)
        logits = self.class_logits(image_features, text)                         # (2, B, C)
        with self.images(image_features, dataset_size):
            k = pyro.sample("k", dist.Categorical(logits=ctx.new_zeros(2)),
                            infer={"enumerate": "parallel"})                      # (...) or (B,)
            pick = torch.nn.functional.one_hot(k, 2).to(logits.dtype)
            pick = pick.expand(*pick.shape[:-2], len(image_features), 2)         # (..., B, 2)
            mixed = torch.einsum("...bk,kbc->...bc", pick, logits)
            pyro.sample("y", dist.Categorical(logits=mixed), obs=labels)

    def guide(self, image_features, labels=None, dataset_size=None):
        pass


def test_trace_enum_elbo_marginalises_an_enumerated_latent(tiny_clip) -> None:
    features, labels = features_and_labels(tiny_clip)
    program = program_of(MixturePrompt, tiny_clip)
    config = TrainConfig(num_particles=1, elbo="TraceEnum_ELBO")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = objective_of(program, config)(features[0], labels, 12)
    with program.param_scope():
        ctx = pyro.param("ctx")
        logits = program.class_logits(features[0], program.text_features(ctx).unsqueeze(1))
        log_lik = torch.log_softmax(logits, -1)[:, torch.arange(12), labels]          # (2, B)
        marginal = torch.logsumexp(log_lik + torch.log(torch.tensor(0.5)), 0)       # (B,)
    torch.testing.assert_close(loss, -marginal.mean())


def test_refused_objectives_exit_2_before_anything_is_written(run_args, tmp_path,
                                                              capsys) -> None:
    err = exits_2([*run_args, "--model", "vpt", "--elbo", "TraceTailAdaptive_ELBO"], capsys)
    assert "not a loss" in err
    err = exits_2([*run_args, "--model", "vpt", "--elbo", "Trace_Elbo"], capsys)
    assert "Unknown ELBO" in err and "TraceGraph_ELBO" in err
    student = write_model_file(tmp_path, "student", AUTOGUIDE_FILE.format(
        guide="AutoNormal", prior="dist.StudentT(3.0, ctx.new_zeros(self.ctx_dim), 1.0)"
                                 ".to_event(1)"))
    err = exits_2([*run_args, "--model", student, "--objective", "paper"], capsys)
    assert "closed form" in err and "r" in err
    diagonal = write_model_file(tmp_path, "diagonal", AUTOGUIDE_FILE.format(
        guide="AutoDiagonalNormal", prior="standard_normal((self.ctx_dim,), ctx.device)"))
    err = exits_2([*run_args, "--model", diagonal, "--objective", "paper"], capsys)
    assert "_AutoDiagonalNormal_latent" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="not a loss"):
        RunConfig(elbo="TraceTailAdaptive_ELBO").resolved()


def test_paper_objective_with_autonormal_has_its_kl(tiny_clip) -> None:
    program = program_of(with_autoguide(GlobalResidual, "AutoNormal", "class"), tiny_clip)
    objective = objective_of(program, TrainConfig(num_particles=3, objective="paper"))
    features, labels = features_and_labels(tiny_clip)
    objective(features[0], labels, 12)
    assert objective.terms.kl > 0


@pytest.mark.parametrize("model", ["vpt", "vpt_cond", "vpt_autoguide", "coop"])
def test_predictive_reproduces_run_predict(model, run_args, tmp_path) -> None:
    run_cli([*run_args, "--model", model])
    run = bayesprompt.Run.load(tmp_path / "run")
    features, _ = run.test_features("new")
    run.set_classes(run.new.classnames)
    draws = 4 if run.program.stochastic else None  # a point estimate has one draw (S = 1)
    expected = run.predict(features, num_samples=draws, seed=7)              # (S or 1, N, C)
    for parallel in (True, False):
        with run.program.param_scope():
            pyro.set_rng_seed(7)
            predictive = Predictive(run.program.model, guide=run.program.guide, num_samples=4,
                                    parallel=parallel)
            probs = predictive(features)["probs"]                            # (S, N, C)
        if parallel:  # fp32's own rounding: 4 draws batched against run.predict's 1 (coop)
            torch.testing.assert_close(probs, expected.expand_as(probs))
        elif model == "vpt_cond":  # vpt's guide draws its initial value at every call
            torch.testing.assert_close(probs, expected)


def test_the_probs_site_changes_no_loss_and_no_random_draw(tiny_clip) -> None:
    vpt = load_model_class("vpt")

    class WithoutProbs(vpt):  # vpt's model as it was before the `probs` site
        def model(self, image_features, labels=None, dataset_size=None):
            ctx = pyro.param("ctx", self.init_ctx.clone())
            r = pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))
            text = self.text_features(ctx + self.residual(r))
            with self.images(image_features, dataset_size):
                pyro.sample("y", dist.Categorical(logits=self.class_logits(image_features, text)),
                            obs=labels)

    features, labels = features_and_labels(tiny_clip)
    results = []
    for model_class in (vpt, WithoutProbs):
        program = program_of(model_class, tiny_clip)
        torch.manual_seed(5)
        history = train(program, features, labels, CONFIG)
        probs = predictive.predictive_probs(program, features[0], 3, seed=2)
        results.append((history.loss, program.prompt_state(), probs, torch.rand(3)))
    (loss, state, probs, after), (loss_0, state_0, probs_0, after_0) = results
    assert loss == loss_0 and torch.equal(probs, probs_0) and torch.equal(after, after_0)
    assert all(torch.equal(state[k], state_0[k]) for k in state)


def test_predicting_with_a_per_image_guide_is_refused(tiny_clip) -> None:
    program = program_of(with_autoguide(PerImageResidual, "AutoNormal", "class"), tiny_clip)
    features, labels = features_and_labels(tiny_clip)
    train(program, features, labels, TrainConfig(epochs=1, batch_size=4, num_particles=2))
    with pytest.raises(UserError, match="row per training image.*vpt_cond"):
        predictive.predictive_probs(program, features[0], 3)


def test_a_joint_autoguide_of_per_image_latents_is_refused(tiny_clip) -> None:
    from bayesprompt.inference.elbos import check_program
    program = program_of(with_autoguide(PerImageResidual, "AutoDiagonalNormal", "init"),
                         tiny_clip)
    with pytest.raises(UserError, match="AutoDiagonalNormal packs all latents.*vpt_cond"):
        check_program(program, "elbo", "Trace_ELBO", 12)
