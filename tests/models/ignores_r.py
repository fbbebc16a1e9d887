"""A vpt model file whose likelihood ignores its residual r: the posterior of r is its prior
(tests/test_posterior_check.py checks that the gold standard returns it)."""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from bayesprompt.program import PromptModel
from bayesprompt.program.guides import diagonal_normal
from bayesprompt.program.priors import standard_normal


class IgnoresResidual(PromptModel):
    latent_sites = ("r",)

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())                  # (n_ctx, W)
        with poutine.scale(scale=self.config.kl_weight):
            pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))  # (..., W), unused
        logits = self.class_logits(image_features, self.text_features(ctx))  # (B, C)
        with self.images(image_features, dataset_size):
            pyro.sample("y", dist.Categorical(logits=logits), obs=labels)

    def guide(self, image_features, labels=None, dataset_size=None):
        device = self.init_ctx.device
        r_loc = pyro.param("r_loc", torch.zeros(self.ctx_dim, device=device))
        r_log_var = pyro.param("r_log_var", torch.zeros(self.ctx_dim, device=device))
        with poutine.scale(scale=self.config.kl_weight):
            pyro.sample("r", diagonal_normal(r_loc, r_log_var, 1))


Model = IgnoresResidual
