"""E2MIM (Zhang, 2024), MAP: CoOp's learned context as one view, hand-crafted prompts as the other.

ctx ~ N(0, prior_scale^2 I)                                        (n_ctx, W)
p_B(x) = softmax(tau * x . g_c(ctx)),  p_A(x) = softmax(tau * x . t_c)   (t_c: template text)
x ranges over the B real images and M class-wise Mixup images of the batch.
training: y_i ~ Categorical(p_B(x_i)); factors: Mixup loss of p_B on the mix anchored at x_i,
          mi_weight * JSD/InfoNCE bound between p_A and p_B (critic trained jointly);
predict:  y_i ~ Categorical(w p_A(x_i) + (1 - w) p_B(x_i)),  w = fusion_weight.
guide: ctx = ctx_map, a point (Delta), initialised from the words of `ctx_init`.
Options (--set): see bayesprompt.e2mim.E2MIMOptions and docs/E2MIM.md.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from bayesprompt.e2mim import DualViewModel, with_mixed_features
from bayesprompt.priors import isotropic_normal


class E2MIM(DualViewModel):
    stochastic = False
    latent_sites = ("ctx",)

    def model(self, image_features, labels=None, dataset_size=None):
        prior = isotropic_normal(torch.zeros_like(self.init_ctx), self.config.prior_scale, 2)
        with poutine.scale(scale=self.config.kl_weight):
            ctx = pyro.sample("ctx", prior)                               # (n_ctx, W)
        mix = self.mix(image_features, labels)                            # M mixes, or None
        features = with_mixed_features(image_features, mix)               # (B + M, D)
        logits = self.class_logits(features, self.text_features(ctx))     # (B + M, C)
        with self.images(image_features, dataset_size):
            self.observe(features, labels, logits, mix)

    def guide(self, image_features, labels=None, dataset_size=None):
        ctx_map = pyro.param("ctx_map", self.init_ctx.clone())
        with poutine.scale(scale=self.config.kl_weight):
            pyro.sample("ctx", dist.Delta(ctx_map, event_dim=2))


Model = E2MIM
