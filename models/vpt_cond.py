"""Bayesian Prompt Learning, conditional ("cocoopvpt"; Derakhshani et al., 2023).

Each image has its own residual r_i; the guide is amortized on the image feature.
ctx    : learned base context, a parameter                   (n_ctx, W)
r_i    ~ N(0, I)                                             (W,) per image, in the data plate
y_i    ~ Categorical(softmax(tau * f_i . g_c(ctx + s r_i)))  s = residual_scale (1: reference)
guide  : r_i ~ N(mean(f_i), exp(log_var(f_i))), each head Linear(D, D/2), ELU,
         Linear(D/2, D/2), ELU, Linear(D/2, W).
"""

import pyro
import pyro.distributions as dist

from bayesprompt.program.base import PromptModel
from bayesprompt.program.guides import AmortizedGaussian, amortized_residual
from bayesprompt.program.priors import standard_normal


class ConditionalVPT(PromptModel):
    latent_sites = ("r",)

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        self.posterior_net = AmortizedGaussian(clip.feature_dim, self.ctx_dim)

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())                  # (n_ctx, W)
        with self.images(image_features, dataset_size):
            r = pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))  # (..., B, W)
            text = self.text_features(ctx + self.residual(r))           # (..., B, C, D)
            logits = self.class_logits(image_features, text)             # (..., B, C)
            y = dist.Categorical(logits=logits)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)

    def guide(self, image_features, labels=None, dataset_size=None):
        amortized_residual(self, image_features, dataset_size)           # r_i ~ N(net(f_i))


Model = ConditionalVPT
