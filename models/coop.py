"""CoOp (Zhou et al., 2022): learned context as a point estimate (MAP with a Delta guide).

ctx ~ N(0, prior_scale^2 I)                 (n_ctx, W)
y_i ~ Categorical(softmax(tau * f_i . g_c(ctx)))   for each image i
guide: ctx = ctx_map, a point (Delta), initialised from the words of `ctx_init`.
"""

import pyro
import pyro.distributions as dist
import torch

from bayesprompt.program.base import PromptModel
from bayesprompt.program.guides import point_context
from bayesprompt.program.priors import isotropic_normal


class CoOp(PromptModel):
    stochastic = False
    latent_sites = ("ctx",)

    def model(self, image_features, labels=None, dataset_size=None):
        prior = isotropic_normal(torch.zeros_like(self.init_ctx), self.config.prior_scale, 2)
        ctx = pyro.sample("ctx", prior)                               # (n_ctx, W)
        logits = self.class_logits(image_features, self.text_features(ctx))  # (B, C)
        with self.images(image_features, dataset_size):
            y = dist.Categorical(logits=logits)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)

    def guide(self, image_features, labels=None, dataset_size=None):
        point_context(self)                                              # ctx ~ Delta(ctx_map)


Model = CoOp
