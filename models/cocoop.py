"""CoCoOp (Zhou et al., 2022): point-estimate context shifted by a meta-net of the image.

ctx ~ N(0, prior_scale^2 I)                                  (n_ctx, W)
ctx_i = ctx + meta_net(f_i)      meta_net: Linear(D, D/16), ReLU, Linear(D/16, W)
y_i ~ Categorical(softmax(tau * f_i . g_c(ctx_i)))
guide: ctx = ctx_map (Delta); the meta-net is a likelihood parameter (`pyro.module`).
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from bayesprompt.program.base import PromptModel
from bayesprompt.program.guides import point_context
from bayesprompt.program.priors import isotropic_normal


class CoCoOp(PromptModel):
    stochastic = False
    latent_sites = ("ctx",)

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        hidden = clip.feature_dim // 16
        self.meta_net = nn.Sequential(
            nn.Linear(clip.feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, self.ctx_dim))

    def model(self, image_features, labels=None, dataset_size=None):
        meta_net = pyro.module("meta_net", self.meta_net, update_module_params=True)
        prior = isotropic_normal(torch.zeros_like(self.init_ctx), self.config.prior_scale, 2)
        ctx = pyro.sample("ctx", prior)                               # (n_ctx, W)
        shift = meta_net(image_features).unsqueeze(-2)                    # (B, 1, W)
        text = self.text_features(ctx + shift)                           # (..., B, C, D)
        logits = self.class_logits(image_features, text)                 # (..., B, C)
        with self.images(image_features, dataset_size):
            y = dist.Categorical(logits=logits)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)

    def guide(self, image_features, labels=None, dataset_size=None):
        point_context(self)                                              # ctx ~ Delta(ctx_map)


Model = CoCoOp
