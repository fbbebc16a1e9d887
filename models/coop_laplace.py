"""CoOp with a Laplace approximation of its context (MacKay, 1992; "Laplace Redux", Daxberger
et al., 2021): the MAP of coop.py, then a post-hoc Gaussian posterior around it.

ctx ~ N(0, prior_scale^2 I)                                 (n_ctx, W), P = n_ctx W numbers
y_i ~ Categorical(softmax(tau * f_i . g_c(ctx)))            for each image i
training: ctx* = ctx_map, a point (Delta guide) under the same loss as coop.py.
after the last epoch (`after_training`): q(ctx) = N(ctx*, H^-1),
    H = sum_i mean_v GGN(f_iv) + delta I                          (P, P)
    GGN(f) = J^T (diag p - p p^T) J,  J = d logits(f) / d ctx (C, P),  p = softmax(logits)
  over the N training images, averaged over their V cached augmented views (training draws
  one view per image and epoch); H^-1 = L L^T, L = ctx_scale_tril. The prior precision delta
  (`--set prior_precision=`): "marglik" (default) maximises the Laplace evidence at ctx*
  over delta, as laplace-torch recommends; "model" is the model's kl_weight / prior_scale^2
  (1 by default: in the hundreds of context directions the data do not inform, the
  posterior is then the N(0, I) prior, 50 times a token embedding's scale).
guide: Delta(ctx_map) until L is set (its diagonal is 0 before), then N(ctx_map, L L^T).

Where this differs from laplace-torch's defaults: the curvature is the full GGN over the
context (no KFAC or diagonal: P is 384 for MiniCLIP, 2,048 for ViT-B/16), the evidence is
maximised over a grid at the fixed MAP (not by gradient steps), and the predictive samples
contexts through the text encoder (Monte Carlo over the network, S draws) rather than
linearising it. Train and predict options are CoOp's (the world's defaults).
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions.transforms import ReshapeTransform

from bayesprompt.errors import UserError
from bayesprompt.program import PromptModel
from bayesprompt.program.laplace import (
    covariance_scale_tril,
    jacobian,
    marginal_likelihood_precision,
    softmax_ggn,
)
from bayesprompt.program.priors import isotropic_normal


class CoOpLaplace(PromptModel):
    latent_sites = ("ctx",)

    def check_options(self, options):
        unknown = sorted(set(options) - {"prior_precision"})
        precision = options.get("prior_precision", "marglik")
        if unknown or precision not in ("marglik", "model"):
            raise UserError(f"coop_laplace takes one option, prior_precision=marglik|model; "
                            f"got {options}.")
        self.prior_precision = precision

    @property
    def stochastic(self) -> bool:
        """A point (one particle) while training; the Laplace posterior once it is set."""
        with self.param_scope():
            store = pyro.get_param_store()
            return "ctx_scale_tril" in store and bool(
                store["ctx_scale_tril"].diagonal().gt(0).all())

    def model(self, image_features, labels=None, dataset_size=None):
        prior = isotropic_normal(torch.zeros_like(self.init_ctx), self.config.prior_scale, 2)
        ctx = pyro.sample("ctx", prior)                               # (n_ctx, W)
        logits = self.class_logits(image_features, self.text_features(ctx))  # (B, C)
        with self.images(image_features, dataset_size):
            y = dist.Categorical(logits=logits)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)

    def guide(self, image_features, labels=None, dataset_size=None):
        ctx_map = pyro.param("ctx_map", self.init_ctx.clone())            # (n_ctx, W)
        size = ctx_map.numel()
        scale_tril = pyro.param("ctx_scale_tril", torch.zeros(size, size, device=ctx_map.device))
        posterior = dist.Delta(ctx_map, event_dim=2)
        if self.stochastic:
            flat = dist.MultivariateNormal(ctx_map.reshape(-1), scale_tril=scale_tril)
            posterior = dist.TransformedDistribution(
                flat, ReshapeTransform((size,), tuple(ctx_map.shape)))
        pyro.sample("ctx", posterior)

    def after_training(self, features, labels):
        ctx_map = pyro.param("ctx_map").detach()                          # (n_ctx, W)
        views, n_images, dim = features.shape
        x = features.reshape(views * n_images, dim)                       # (V N, D)
        with torch.no_grad():
            logits = self.clip.logit_scale * x @ self.text_features(ctx_map).T  # (V N, C)
        text_jacobian = jacobian(lambda flat: self.text_features(flat.view_as(ctx_map)),
                                 ctx_map.reshape(-1))                     # (C, D, P)
        ggn = softmax_ggn(x, text_jacobian, logits, float(self.clip.logit_scale)) / views
        prior = (marginal_likelihood_precision(ggn, ctx_map.reshape(-1))
                 if self.prior_precision == "marglik"
                 else self.config.kl_weight / self.config.prior_scale ** 2)
        precision = ggn + prior * torch.eye(len(ggn), dtype=ggn.dtype, device=ggn.device)
        with torch.no_grad():
            pyro.param("ctx_scale_tril").copy_(covariance_scale_tril(precision))


Model = CoOpLaplace
