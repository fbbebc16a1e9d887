"""Bayesian Prompt Learning, unconditional, with a Pyro autoguide (a worked example).

The model is vpt's; the guide is `AutoLowRankMultivariateNormal`, built by Pyro from the model:
a Gaussian over r with a rank-8 covariance (correlations vpt's diagonal guide cannot hold).
ctx    : learned base context, a parameter                   (n_ctx, W)
r      ~ N(0, I)                                             (W,)
y_i    ~ Categorical(softmax(tau * f_i . g_c(ctx + s r)))   s = residual_scale
guide  : r ~ N(loc, D + U U^T), U (W, 8), from r's prior median (0) and init_scale 0.1.
Any autoguide works the same way: `self.guide = AutoNormal(self.model)`, or name the class
(`guide = AutoDiagonalNormal`). `elbo = TraceMeanField_ELBO` would pick the model's ELBO.
"""

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoLowRankMultivariateNormal

from bayesprompt.program.base import PromptModel
from bayesprompt.program.priors import standard_normal


class AutoguideVPT(PromptModel):
    latent_sites = ("r",)

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        self.guide = AutoLowRankMultivariateNormal(self.model, rank=8, init_scale=0.1)

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())                  # (n_ctx, W)
        r = pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))      # (..., W)
        text = self.text_features(ctx + self.residual(r))               # (..., C, D)
        logits = self.class_logits(image_features, text)                 # (..., B, C)
        with self.images(image_features, dataset_size):
            y = dist.Categorical(logits=logits)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)


Model = AutoguideVPT
