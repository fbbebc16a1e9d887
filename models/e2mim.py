"""E2MIM (Zhang, 2024), MAP: CoOp's learned context as one view, hand-crafted prompts as the other.

ctx ~ N(0, prior_scale^2 I)                                        (n_ctx, W)
p_B(x) = softmax(tau * x . g_c(ctx)),  p_A(x) = softmax(tau * x . t_c)   (t_c: template text)
x ranges over the B real images and M class-wise Mixup images of the batch (ours: each image
is mixed with a random other-class image of the batch, lam ~ Beta(mixup_alpha, mixup_alpha)).
training: y_i ~ Categorical(p_B(x_i)); per-image factors in the data plate:
          - mixup_weight * (soft-label CE, or -log p(class 1 or 2)) on the mix anchored at x_i,
          + mi_weight * batch JSD/InfoNCE bound between p_A and p_B over real + mixed images;
          the critic (a pyro.module, own Adam optimiser) and the prompts both
          maximise the bound (InfoMax).
predict:  y_i ~ Categorical(w p_A(x_i) + (1 - w) p_B(x_i)),  w = fusion_weight.
guide: ctx = ctx_map, a point (Delta), initialised from the words of `ctx_init`.
Needs --batch-size >= 2 for Mixup and MI. Options (--set) and which choices are ours, not the
paper's: bayesprompt.dual_view.E2MIMOptions and docs/E2MIM.md.
"""

import pyro
import torch

from bayesprompt.dual_view import DualViewModel, with_mixed_features
from bayesprompt.program.guides import point_context
from bayesprompt.program.priors import isotropic_normal


class E2MIM(DualViewModel):
    stochastic = False
    latent_sites = ("ctx",)

    def model(self, image_features, labels=None, dataset_size=None):
        prior = isotropic_normal(torch.zeros_like(self.init_ctx), self.config.prior_scale, 2)
        ctx = pyro.sample("ctx", prior)                               # (n_ctx, W)
        mix = self.mix(image_features, labels)                            # M mixes, or None
        features = with_mixed_features(image_features, mix)               # (B + M, D)
        logits = self.class_logits(features, self.text_features(ctx))     # (B + M, C)
        with self.images(image_features, dataset_size):
            self.observe(features, labels, logits, mix)

    def guide(self, image_features, labels=None, dataset_size=None):
        point_context(self)                                              # ctx ~ Delta(ctx_map)


Model = E2MIM
