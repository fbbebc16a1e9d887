"""E2MIM with the conditional residual of Bayesian Prompt Learning (vpt_cond): ours.

ctx    : learned base context, a parameter                                (n_ctx, W)
r_i    ~ N(0, I)                                                          (W,) per image
p_B(x_i) = softmax(tau * x_i . g_c(ctx + r_i)),  p_A(x) = softmax(tau * x . t_c)
A Mixup image lam x_i + (1 - lam) x_j (renormalised) takes the residual lam r_i + (1 - lam) r_j.
training: y_i ~ Categorical(p_B(x_i)); factors: Mixup loss and mi_weight * MI bound (e2mim.py);
predict:  y_i ~ Categorical(w p_A(x_i) + (1 - w) p_B(x_i)),  w = fusion_weight.
guide  : r_i ~ N(mean(f_i), exp(log_var(f_i))), amortized on the real image feature f_i.
Needs --batch-size >= 2 for Mixup and MI. Options (--set): bayesprompt.dual_view.E2MIMOptions
and docs/E2MIM.md.
"""

import pyro

from bayesprompt.dual_view import DualViewModel, with_mixed, with_mixed_features
from bayesprompt.program.guides import AmortizedGaussian, amortized_residual
from bayesprompt.program.priors import standard_normal


class E2MIMVPT(DualViewModel):
    latent_sites = ("r",)

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        self.posterior_net = AmortizedGaussian(clip.feature_dim, self.ctx_dim)

    def model(self, image_features, labels=None, dataset_size=None):
        ctx = pyro.param("ctx", self.init_ctx.clone())                  # (n_ctx, W)
        mix = self.mix(image_features, labels)                          # M mixes, or None
        features = with_mixed_features(image_features, mix)             # (B + M, D)
        with self.images(image_features, dataset_size):
            r = pyro.sample("r", standard_normal((self.ctx_dim,), ctx.device))  # (..., B, W)
            text = self.text_features(ctx + self.residual(with_mixed(r, mix)))  # (..., B+M, C, D)
            logits = self.class_logits(features, text)                  # (..., B + M, C)
            self.observe(features, labels, logits, mix)

    def guide(self, image_features, labels=None, dataset_size=None):
        amortized_residual(self, image_features, dataset_size)           # r_i ~ N(net(f_i))


Model = E2MIMVPT
