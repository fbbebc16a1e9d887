"""The posterior check against known answers: a likelihood that ignores r (the posterior is the
prior) and linear-Gaussian programs (closed-form posteriors and evidence)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import TESTS

from bayesprompt.errors import UserError
from bayesprompt.inference.gold_standard import (
    DiagonalGaussian,
    compare,
    fit_elbo,
    gaussian_elbos,
    gaussian_kl,
    guide_gaussian,
    image_posteriors,
    prior_gaussian,
    run_nuts,
)
from bayesprompt.program import PromptConfig
from bayesprompt.runs.model_files import load_model_class

NOISE = 0.8  # the linear-Gaussian programs' observation sd


class LinearGaussian:
    """r ~ N(0, I_D); y_i ~ N(x_i . r, NOISE^2); guide N(loc, diag(scale^2)) (fixed values).

    `per_image`: r_i per image inside the images plate, else one global r."""

    stochastic = True
    latent_sites = ("r",)

    def __init__(self, dim: int, per_image: bool, loc: torch.Tensor, scale: torch.Tensor
                 ) -> None:
        self.dim, self.per_image, self.loc, self.scale = dim, per_image, loc, scale

    def _plate(self, features: torch.Tensor, dataset_size: int | None) -> pyro.plate:
        batch = features.shape[0]
        return pyro.plate("images", dataset_size or batch, subsample=torch.arange(batch), dim=-1)

    def model(self, features, labels=None, dataset_size=None):
        prior = dist.Normal(torch.zeros(self.dim), 1.0).to_event(1)
        if not self.per_image:
            r = pyro.sample("r", prior)                                     # (..., 1, D) / (D,)
        with self._plate(features, dataset_size):
            if self.per_image:
                r = pyro.sample("r", prior)                                 # (..., B, D)
            pyro.sample("y", dist.Normal((features * r).sum(-1), NOISE), obs=labels)

    def guide(self, features, labels=None, dataset_size=None):
        q = dist.Normal(self.loc, self.scale).to_event(1)
        if self.per_image:
            with self._plate(features, dataset_size):
                pyro.sample("r", q.expand([features.shape[0]]))
        else:
            pyro.sample("r", q)


def linear_data(views: int, n: int, dim: int, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(views, n, dim, generator=generator)
    truth = torch.randn(dim, generator=generator)
    labels = (features[0] @ truth) + NOISE * torch.randn(n, generator=generator)
    return features, labels


def test_nuts_finds_the_closed_form_posterior_of_a_global_linear_gaussian() -> None:
    """Posterior of log p(r) + mean_v sum_i log N(y_i; x_vi . r, s^2): precision
    I + mean_v X_v^T X_v / s^2, mean Sigma mean_v X_v^T y / s^2."""
    dim = 3
    features, labels = linear_data(views=2, n=12, dim=dim)
    precision = torch.eye(dim) + torch.einsum("vni,vnj->ij", features, features) / (2 * NOISE**2)
    sigma = torch.linalg.inv(precision)
    mean = sigma @ torch.einsum("vni,n->i", features, labels) / (2 * NOISE**2)
    exact = DiagonalGaussian(mean.double(), sigma.diagonal().sqrt().double())
    guide = DiagonalGaussian(torch.full((dim,), 0.1).double(), torch.full((dim,), 0.5).double())
    program = LinearGaussian(dim, False, guide.mean.float(), guide.sd.float())
    initial = {"r": torch.randn(2, dim, generator=torch.Generator().manual_seed(0))}
    result = run_nuts(program, features, labels, ("r",), initial, num_samples=400, warmup=300,
                      seed=0, progress=False)
    assert result.samples["r"].shape == (2, 400, dim)
    assert result.rhat_max < 1.05 and result.ess_bulk_min > 200
    gold = result.fit("r")
    # Monte Carlo error of a mean: sd / sqrt(ESS); 4.5 of them, with ESS >= 200
    assert ((gold.mean - exact.mean).abs() / exact.sd).max() < 4.5 / math.sqrt(200)
    assert ((gold.sd / exact.sd) - 1).abs().max() < 0.15
    # the comparison's KL is the closed-form KL of two diagonal Gaussians, here of the guide to
    # the NUTS fit (checked against the exact posterior above). The KL of this far guide
    # (about 10 nats) amplifies the fit's sd error: with sds within 15%, it moved by 1.6-1.7
    # nats between NUTS seeds, so it is not compared with the exact posterior's KL.
    report = compare(guide, gold, prior_gaussian(program, features[0], "r"))
    assert report["kl_guide_gold"] == pytest.approx(float(gaussian_kl(guide, gold)), rel=1e-6)
    assert report["kl_guide_gold"] == pytest.approx(float(gaussian_kl(guide, exact)), rel=0.25)
    assert report["contraction"]["median"] < 0.6  # the data inform r: sd well below 1


def test_importance_sampling_finds_closed_form_per_image_posteriors() -> None:
    """Per image: r_i | y_i ~ N(Sigma x y / s^2, Sigma), Sigma = I - x x^T / (s^2 + |x|^2);
    p(y_i | x_i) = N(0, s^2 + |x|^2)."""
    dim, k = 2, 5
    features, labels = linear_data(views=1, n=k, dim=dim, seed=1)
    x = features[0]
    norms = (x**2).sum(-1)
    sigmas = torch.eye(dim) - torch.einsum("ki,kj->kij", x, x) / (NOISE**2 + norms)[:, None, None]
    means = torch.einsum("kij,kj->ki", sigmas, x) * (labels / NOISE**2)[:, None]
    evidence = dist.Normal(0.0, (NOISE**2 + norms).sqrt()).log_prob(labels)
    program = LinearGaussian(dim, True, torch.zeros(dim), torch.ones(dim))
    check = image_posteriors(program, x, labels, "r", num_draws=20000, seed=0, progress=False)
    exact_sd = sigmas.diagonal(dim1=-2, dim2=-1).sqrt()
    assert check.gold.mean.shape == (k, dim)
    assert ((check.gold.mean - means).abs() / exact_sd).max() < 0.1
    assert ((check.gold.sd / exact_sd) - 1).abs().max() < 0.1
    assert (check.log_evidence - evidence).abs().max() < 0.05
    # the guide here is the prior: its ELBO is log p(y) - KL(prior || posterior) < log p(y)
    gap = check.log_evidence - check.guide_elbo
    kl_prior_posterior = torch.stack([torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(torch.zeros(dim), torch.eye(dim)),
        torch.distributions.MultivariateNormal(means[i], sigmas[i])) for i in range(k)])
    assert (gap.float() - kl_prior_posterior).abs().max() < 0.05 + 0.05 * kl_prior_posterior.max()


def test_the_elbo_of_the_exact_posterior_is_the_evidence() -> None:
    """In one dimension the per-image posterior is Gaussian: log p(y, r) - log q(r) = log p(y)
    for every draw of q = the posterior, so fit_elbo returns the evidence exactly."""
    features, labels = linear_data(views=1, n=4, dim=1, seed=2)
    x = features[0]
    variance = 1 / (1 + x[:, 0] ** 2 / NOISE**2)
    exact = DiagonalGaussian((variance * x[:, 0] * labels / NOISE**2)[:, None].double(),
                             variance.sqrt()[:, None].double())
    evidence = dist.Normal(0.0, (NOISE**2 + x[:, 0] ** 2).sqrt()).log_prob(labels)
    program = LinearGaussian(1, True, torch.zeros(1), torch.ones(1))
    elbo = fit_elbo(program, x, labels, "r", exact, num_draws=50)
    assert torch.allclose(elbo.float(), evidence, atol=1e-4)
    # and a wrong fit has a lower ELBO
    wrong = DiagonalGaussian(exact.mean + 0.5, exact.sd)
    assert (fit_elbo(program, x, labels, "r", wrong, num_draws=2000) < elbo - 0.01).all()


def test_a_kl_weight_tempers_the_likelihood_not_the_prior() -> None:
    """With --kl-weight b the objective's optimum is p(r) p(y | r)^(1/b): in one dimension a
    Gaussian of precision 1 + x^2 / (b s^2), and log p(r) + log p(y | r) / b - log q(r) of
    that Gaussian is the same for every draw, log Z_b = log N(y; 0, b s^2 + x^2)
    + log (2 pi b s^2)^(1/2) - log (2 pi s^2)^(1/(2b))."""
    b = 2.0
    features, labels = linear_data(views=1, n=4, dim=1, seed=3)
    x = features[0]
    variance = 1 / (1 + x[:, 0] ** 2 / (b * NOISE**2))
    mean = variance * x[:, 0] * labels / (b * NOISE**2)
    program = LinearGaussian(1, True, torch.zeros(1), torch.ones(1))
    program.config = PromptConfig(kl_weight=b)
    check = image_posteriors(program, x, labels, "r", num_draws=20000, seed=0, progress=False)
    assert ((check.gold.mean[:, 0] - mean).abs() / variance.sqrt()).max() < 0.1
    assert ((check.gold.sd[:, 0] / variance.sqrt()) - 1).abs().max() < 0.1
    tempered = DiagonalGaussian(mean[:, None].double(), variance.sqrt()[:, None].double())
    log_z = (dist.Normal(0.0, (b * NOISE**2 + x[:, 0] ** 2).sqrt()).log_prob(labels)
             + 0.5 * math.log(2 * math.pi * b * NOISE**2)
             - math.log(2 * math.pi * NOISE**2) / (2 * b))
    elbo = fit_elbo(program, x, labels, "r", tempered, num_draws=50)
    assert torch.allclose(elbo.float(), log_z, atol=1e-4)


def test_the_elbo_of_the_exact_global_posterior_is_the_evidence() -> None:
    """One global r, one view: the posterior is N(sigma^2 x.y / s^2, sigma^2) with
    sigma^-2 = 1 + |x|^2 / s^2, its ELBO is log N(y; 0, s^2 I + x x^T) with every draw, and
    a shifted Gaussian's ELBO is lower by its KL to the posterior."""
    features, labels = linear_data(views=1, n=6, dim=1, seed=4)
    x = features[0, :, 0]
    variance = 1 / (1 + (x**2).sum() / NOISE**2)
    exact = DiagonalGaussian((variance * (x * labels).sum() / NOISE**2).reshape(1).double(),
                             variance.sqrt().reshape(1).double())
    shifted = DiagonalGaussian(exact.mean + exact.sd, exact.sd)
    evidence = dist.MultivariateNormal(torch.zeros(6), NOISE**2 * torch.eye(6)
                                       + torch.outer(x, x)).log_prob(labels)
    program = LinearGaussian(1, False, torch.zeros(1), torch.ones(1))
    elbos = gaussian_elbos(program, features, labels,
                           {"exact": {"r": exact}, "shifted": {"r": shifted}}, num_draws=100)
    assert elbos["exact"][0] == pytest.approx(float(evidence), abs=1e-4)
    assert elbos["exact"][1] < 1e-4
    # KL(shifted || exact) = 1/2 (one sd); 100 draws estimate it to a few hundredths
    assert elbos["exact"][0] - elbos["shifted"][0] == pytest.approx(0.5, abs=0.1)


@pytest.fixture(scope="module")
def ignores_r(tiny_clip):
    model_class = load_model_class(str(TESTS / "models" / "ignores_r.py"))
    torch.manual_seed(0)
    program = model_class(tiny_clip, ["cat", "dog", "tree"], PromptConfig(residual_scale=1.0))
    program.initialize_parameters()
    return program


def test_a_likelihood_that_ignores_r_gives_the_prior(ignores_r, tiny_clip) -> None:
    width = ignores_r.ctx_dim
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(2, 6, tiny_clip.feature_dim, generator=generator), dim=-1)
    labels = torch.arange(6) % 3
    initial = {"r": 2 * torch.randn(2, width, generator=generator)}  # dispersed starts
    result = run_nuts(ignores_r, features, labels, ("r",), initial, num_samples=150,
                      warmup=60, seed=0, progress=False)
    assert result.rhat_max < 1.05 and result.ess_bulk_min > 100
    gold = result.fit("r")
    prior = prior_gaussian(ignores_r, features[0], "r")
    assert torch.equal(prior.mean, torch.zeros(width).double())
    # mean: 4.5 Monte Carlo errors (sd 1 / sqrt(ESS)) in every dimension; sd: its error is
    # about 1 / sqrt(2 ESS of r^2), and NUTS's ESS of r^2 is far below that of r
    assert gold.mean.abs().max() < 4.5 / math.sqrt(result.ess_bulk_min)
    assert (gold.sd - 1).abs().median() < 0.1 and (gold.sd - 1).abs().max() < 0.3
    report = compare(guide_gaussian(ignores_r, features[0], labels, 6, "r"), gold, prior)
    assert abs(report["contraction"]["median"] - 1) < 0.1
    assert report["kl_gold_prior"] < 1.0  # sampling noise alone: W = 64 dims, a few tenths


def test_the_per_image_gold_standard_of_an_ignored_likelihood_is_the_prior() -> None:
    """With a likelihood that does not depend on r_i the importance weights are equal."""
    program = LinearGaussian(3, True, torch.zeros(3), torch.ones(3))
    features = torch.zeros(4, 3)  # x = 0: y_i ~ N(0, s^2) whatever r_i
    check = image_posteriors(program, features, torch.ones(4), "r", num_draws=4000, seed=0,
                             progress=False)
    assert torch.allclose(check.ess, torch.full((4,), 4000.0).double())
    assert check.gold.mean.abs().max() < 4.5 / math.sqrt(4000)
    assert (check.gold.sd - 1).abs().max() < 0.05


def test_point_estimates_are_refused(tiny_clip) -> None:
    from bayesprompt.inference.gold_standard import checked_sites

    program = load_model_class("coop")(tiny_clip, ["cat", "dog"], PromptConfig())
    with pytest.raises(UserError, match="no random latent"):
        checked_sites(program, torch.zeros(2, tiny_clip.feature_dim))


def test_a_learned_residual_scale_is_a_positive_parameter_the_elbo_moves(tiny_clip) -> None:
    """--learn-residual-scale: s is the parameter "residual_scale", starting at the given
    scale, and the ELBO's gradient reaches it (empirical Bayes)."""
    from bayesprompt.inference.objectives import make_objective

    program = load_model_class("vpt")(tiny_clip, ["cat", "dog"], PromptConfig(
        residual_scale=0.5, learn_residual_scale=True))
    features = torch.nn.functional.normalize(torch.randn(4, tiny_clip.feature_dim), dim=-1)
    with program.param_scope():
        pyro.clear_param_store()
        loss = make_objective(program, "elbo", 3, "Trace_ELBO")(features, torch.tensor(
            [0, 1, 0, 1]), 4)
        store = pyro.get_param_store()
        assert float(store["residual_scale"]) == pytest.approx(0.5)
        loss.backward()
        gradient = store.get_param("residual_scale").unconstrained().grad
        assert gradient is not None and torch.isfinite(gradient) and gradient != 0
    fixed = load_model_class("vpt")(tiny_clip, ["cat"], PromptConfig(residual_scale=0.5))
    with fixed.param_scope():
        pyro.clear_param_store()
        fixed.model(features[:1])
        assert "residual_scale" not in pyro.get_param_store()
