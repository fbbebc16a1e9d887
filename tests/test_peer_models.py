"""The peers of the Bayesian prompts (kgcoop, proda, coop_laplace): each trains end to end on
the EuroSAT fixture, and each one's defining term is checked against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import pyro
import pytest
import torch
from conftest import TINY_BACKBONE
from pyro import poutine
from test_models import CLASSES, separable_features
from torch.nn.attention import SDPBackend, sdpa_kernel

import bayesprompt
from bayesprompt.errors import UserError
from bayesprompt.inference.predictive import predictive_probs
from bayesprompt.inference.svi import TrainConfig, train
from bayesprompt.program import PromptConfig
from bayesprompt.program.laplace import (
    covariance_scale_tril,
    marginal_likelihood_precision,
    softmax_ggn,
)
from bayesprompt.runs.model_files import load_model_class


@pytest.mark.parametrize("model", ["kgcoop", "proda", "coop_laplace"])
def test_each_peer_trains_on_the_eurosat_fixture(model: str, eurosat_root: Path,
                                                 tmp_path: Path) -> None:
    options = {"n_prompts": 3} if model == "proda" else {}
    run = bayesprompt.fit(dataset="eurosat", root=str(eurosat_root), model=model,
                          backbone=TINY_BACKBONE, pretrained="", shots=4, epochs=2,
                          num_particles=3, batch_size=4, views=2, device="cpu",
                          options=options, cache_dir=str(tmp_path / "cache"),
                          out=str(tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["base_acc"] <= 100 and 0 <= results["new_acc"] <= 100
    laplace = model == "coop_laplace"
    assert run.program.stochastic == laplace
    assert (results["mi_auroc_new_vs_base"] is not None) == laplace
    for split in ("base", "new"):
        assert ("mi" in results["aurc"][split]) == laplace
        assert 0 <= results["aurc"][split]["msp"] <= 1
        assert len(results["risk_coverage"][split]["msp"]) == len(run.dataset(split).test)
    if model != "coop_laplace":
        factor = {"kgcoop": "kg", "proda": "variance"}[model]
        assert len(results["factor_history"][factor]) == 2
    features, labels = run.test_features("new")
    run.set_classes(run.new.classnames)
    probs = run.predict(features)
    assert probs.shape[0] == (run.config.eval_samples if laplace else 1)
    accuracy = 100 * (probs.mean(0).argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(results["new_acc"])


def trace_of(program, features, labels, ctx=None):
    """The model's trace on a batch, its latent `ctx` from the guide or set to `ctx`."""
    with program.param_scope():
        guide = poutine.trace(program.guide).get_trace(features, labels, len(labels))
        if ctx is not None:
            guide.nodes["ctx"]["value"] = ctx
        return poutine.trace(poutine.replay(program.model, trace=guide)).get_trace(
            features, labels, len(labels))


def test_kgcoop_penalty_is_zero_at_the_handcrafted_features(tiny_clip) -> None:
    config = PromptConfig(ctx_init="a photo of a", template="a photo of a {}.")
    program = load_model_class("kgcoop")(tiny_clip, CLASSES, config)
    features, labels = separable_features(tiny_clip)
    at_init = trace_of(program, features[0], labels).nodes["kg"]
    assert at_init["fn"].log_prob(at_init["value"]).abs().max() < 1e-5
    moved = program.init_ctx + 0.05 * torch.randn(program.init_ctx.shape,
                                                  generator=torch.Generator().manual_seed(0))
    text = tiny_clip.encode_texts([f"a photo of a {c}." for c in CLASSES])    # (C, D)
    learned = torch.nn.functional.normalize(program.text_features(moved), dim=-1)
    direct = 8.0 * (1 - (learned * text).sum(-1).mean())                     # the paper's W = 8
    node = trace_of(program, features[0], labels, moved).nodes["kg"]
    factor = node["fn"].log_prob(node["value"])                               # (1, N)
    assert direct > 1e-3
    torch.testing.assert_close(factor, -direct.expand_as(factor), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="kg_weight"):
        load_model_class("kgcoop")(tiny_clip, CLASSES, PromptConfig(options={"kg_weight": -1}))


def test_proda_loss_equals_the_surrogate_computed_directly(tiny_clip) -> None:
    torch.manual_seed(0)
    program = load_model_class("proda")(tiny_clip, CLASSES, PromptConfig(options={"n_prompts": 5}))
    features, labels = separable_features(tiny_clip, per_class=2)
    f = features[0]                                                           # (N, D)
    trace = trace_of(program, f, labels)
    trace.compute_log_prob()
    loss = -(trace.nodes["y"]["log_prob"] + trace.nodes["variance"]["log_prob"])  # (1, N)
    # Directly: the Gaussian of the class weights w (C D numbers) from the K prompts: mean and
    # sample covariance; A_ic = tau^2 f^T (S_cc + S_yy - S_cy - S_yc) f.
    weights = program.text_features(trace.nodes["ctx"]["value"].reshape(5, *program.init_ctx.shape))
    flat = weights.reshape(5, -1).double()                                    # (K, C D)
    covariance = torch.cov(flat.T)                                            # (C D, C D)
    n_classes, dim = weights.shape[1:]
    blocks = covariance.reshape(n_classes, dim, n_classes, dim)
    tau = float(tiny_clip.logit_scale)
    expected = []
    for x, y in zip(f.double(), labels, strict=True):
        z = tau * weights.double().mean(0) @ x                                # (C,)
        spread = torch.stack([x @ (blocks[c, :, c] + blocks[y, :, y] - blocks[c, :, y]
                                   - blocks[y, :, c]) @ x for c in range(n_classes)])
        expected.append(-torch.log_softmax(z + tau ** 2 * spread / 2, -1)[y])
    torch.testing.assert_close(loss[0].double(), torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert (trace.nodes["variance"]["log_prob"] <= 1e-6).all()   # the bound is above the CE


def test_laplace_covariance_is_the_inverse_hessian_of_a_linear_softmax_toy() -> None:
    # Logits tau * x . w_c(theta) with w linear in theta: the GGN is the exact Hessian of the
    # negative log-likelihood, so (GGN + prior I)^-1 must be the inverse Hessian of the
    # negative log joint, which autograd computes on its own.
    generator = torch.Generator().manual_seed(0)
    n, classes, dim, params, tau = 30, 3, 4, 5, 2.5
    basis = torch.randn(classes, dim, params, generator=generator, dtype=torch.float64)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(classes, (n,), generator=generator)
    theta = torch.randn(params, generator=generator, dtype=torch.float64)

    def neg_log_joint(t: torch.Tensor) -> torch.Tensor:
        logits = tau * x @ (basis @ t).T
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum") + 0.5 * t @ t

    hessian = torch.autograd.functional.hessian(neg_log_joint, theta)
    logits = tau * x @ (basis @ theta).T
    precision = softmax_ggn(x, basis, logits, tau) + torch.eye(params, dtype=torch.float64)
    torch.testing.assert_close(precision, hessian)
    scale_tril = covariance_scale_tril(precision)
    torch.testing.assert_close(scale_tril @ scale_tril.T, torch.linalg.inv(hessian))
    assert torch.equal(scale_tril, scale_tril.tril())


def test_coop_laplace_posterior_is_the_inverse_ggn_of_its_training_data(tiny_clip) -> None:
    torch.manual_seed(0)
    config = PromptConfig(prior_scale=2.0, options={"prior_precision": "model"})
    program = load_model_class("coop_laplace")(tiny_clip, CLASSES, config)
    features, labels = separable_features(tiny_clip, per_class=3)
    views = torch.cat([features, torch.nn.functional.normalize(
        features + 0.1 * torch.randn(features.shape), dim=-1)])               # (2, N, D)
    assert not program.stochastic
    train(program, views, labels, TrainConfig(epochs=3, batch_size=12, lr=0.02, warmup_epochs=0))
    assert program.stochastic
    state = program.prompt_state()
    ctx = state["ctx_map"]
    # The GGN by another path: the Jacobian of every logit in reverse mode.
    x = views.reshape(-1, views.shape[-1])

    def logits_of(flat: torch.Tensor) -> torch.Tensor:
        return tiny_clip.logit_scale * x @ program.text_features(flat.view_as(ctx)).T

    with sdpa_kernel(SDPBackend.MATH):
        jac = torch.autograd.functional.jacobian(logits_of, ctx.reshape(-1)).double()  # (M, C, P)
    probs = torch.softmax(logits_of(ctx.reshape(-1)).double(), -1)
    ggn = sum(j.T @ (torch.diag(p) - torch.outer(p, p)) @ j for j, p in zip(jac, probs,
                                                                         strict=True))
    precision = ggn / 2 + torch.eye(ctx.numel(), dtype=torch.float64) / 2.0 ** 2
    covariance = state["ctx_scale_tril"].double() @ state["ctx_scale_tril"].double().T
    expected = torch.linalg.inv(precision)
    # L is stored in float32: entries of L L^T carry rounding of ~1e-7 of the largest entry
    torch.testing.assert_close(covariance, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert expected.abs().max() > 1e-3 and not torch.allclose(expected, expected.diag().diag())
    probs = predictive_probs(program, features[0], num_samples=4)
    assert probs.shape == (4, len(labels), len(CLASSES)) and probs.std(0).max() > 0
    with program.param_scope():
        draws = pyro.get_param_store()["ctx_scale_tril"]
    assert torch.equal(draws, state["ctx_scale_tril"])


def test_marglik_prior_precision_is_mackays_fixed_point() -> None:
    # At the evidence's maximum, delta = gamma / |theta|^2 with gamma = sum_i l_i / (l_i + delta)
    # (the effective number of parameters; MacKay, 1992), up to the grid's resolution.
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    spread = torch.logspace(-1, 1, 12, dtype=torch.float64)
    ggn = spread[:, None] * (factor.T @ factor) * spread                       # PSD, symmetric
    theta = 0.3 * torch.randn(12, generator=generator, dtype=torch.float64)
    delta = marginal_likelihood_precision(ggn, theta)
    eigenvalues = torch.linalg.eigvalsh(ggn)
    gamma = (eigenvalues / (eigenvalues + delta)).sum()
    assert delta == pytest.approx(float(gamma / theta.pow(2).sum()), rel=0.03)
    assert 1e-6 < delta < 1e6
    with pytest.raises(UserError, match="prior_precision"):
        load_model_class("coop_laplace")(None, CLASSES, PromptConfig(
            options={"prior_precision": "tuned"}))
