"""Bayesian Prompt Learning, unconditional ("coopvpt"; Derakhshani et al., 2023).

One residual r shifts every context token; its posterior is a global diagonal Gaussian.
ctx    : learned base context, a parameter                   (n_ctx, W)
r      ~ N(0, I)                                             (W,)
y_i    ~ Categorical(softmax(tau * f_i . g_c(ctx + s r)))   s = residual_scale (1: reference)
guide  : r ~ N(r_loc, exp(r_log_var)), r_loc = 0 and r_log_var ~ U(0, 1) at start (as the
         reference implementation).
"""

import pyro
import pyro.distributions as dist
import torch

from bayesprompt.program.base import PromptModel
from bayesprompt.program.guides import diagonal_normal
from bayesprompt.program.priors import standard_normal


class VPT(PromptModel):
    latent_sites = ("r",)

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())                  # (n_ctx, W)
        r = pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))  # (..., W)
        text = self.text_features(ctx + self.residual(r))               # (..., C, D)
        logits = self.class_logits(image_features, text)                 # (..., B, C)
        with self.images(image_features, dataset_size):
            y = dist.Categorical(logits=logits)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)

    def guide(self, image_features, labels=None, dataset_size=None):
        device = self.init_ctx.device
        r_loc = pyro.param("r_loc", torch.zeros(self.ctx_dim, device=device))
        r_log_var = pyro.param("r_log_var", torch.rand(self.ctx_dim, device=device))
        pyro.sample("r", diagonal_normal(r_loc, r_log_var, 1))


Model = VPT
