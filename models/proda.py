"""ProDA, prompt distribution learning (Lu et al., CVPR 2022): K learned prompts, a Gaussian over
the class text features they give, and the paper's surrogate loss.

ctx_k ~ N(0, prior_scale^2 I), k = 1..K                       (K, n_ctx, W)
w_kc = g_c(ctx_k) (unit norm);  l_kic = tau f_i . w_kc        per-prompt logits (K, B, C)
Gaussian over the class weights: mean mu_c = mean_k w_kc, covariance the sample covariance
of the K prompts, so z_ic = tau f_i . mu_c = mean_k l_kic and
    A_ic = tau^2 f_i^T (S_cc + S_yy - S_cy - S_yc) f_i = var_k(l_kic - l_kiy),  y = y_i.
training, per image (the surrogate loss, an upper bound of E_w[cross-entropy]):
    -log softmax(z_i + A_i / 2)_y = -log softmax(z_i)_y           the `y` site
                                  + [logsumexp(z_i + A_i / 2) - logsumexp(z_i)]   factor "variance"
predict: y_i ~ Categorical(softmax(z_i)), the mean classifier (as the paper).
guide: ctx = ctx_map, a point (Delta) over all K prompts; prompt k starts from the words of
`ctx_init` plus N(0, 0.02^2) noise (the paper starts from random vectors), so they differ.

The paper (as we read it; its full text and the authors' code were not available to check
here): K = 32 prompts (`--set n_prompts=32`, the default), 16 context tokens, the class name
at the end, middle or front of the prompt. Here: n_ctx and the class position are the
world's (4 tokens, class at the end), A uses the full sample covariance of the K prompts
(unbiased, K - 1); a third-party implementation we read instead uses a covariance diagonal in
the feature dimension (divided by K + 1) and adds an orthogonality loss between class-less
prompts, which is not here. Optimiser and epochs are the world's defaults.
"""

import pyro
import pyro.distributions as dist
import torch

from bayesprompt.options import numeric_options
from bayesprompt.program import PromptModel
from bayesprompt.program.priors import isotropic_normal

DEFAULTS = {"n_prompts": 32}


def surrogate_terms(per_prompt: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt logits (..., K, B, C) and labels (B,) -> mean logits z (..., B, C) and the
    variance factor logsumexp(z + A / 2) - logsumexp(z) (..., B)."""
    z = per_prompt.mean(-3)
    index = labels.view(-1, 1).expand(*per_prompt.shape[:-1], 1)
    spread = (per_prompt - per_prompt.gather(-1, index)).var(-3)        # A, (..., B, C)
    return z, torch.logsumexp(z + spread / 2, -1) - torch.logsumexp(z, -1)


class ProDA(PromptModel):
    stochastic = False
    latent_sites = ("ctx",)

    def check_options(self, options):
        self.options = numeric_options("proda", options, DEFAULTS, {"n_prompts": 2})

    def model(self, image_features, labels=None, dataset_size=None):
        n_prompts = self.options["n_prompts"]
        loc = torch.zeros(n_prompts, *self.init_ctx.shape, device=self.init_ctx.device)
        ctx = pyro.sample("ctx", isotropic_normal(loc, self.config.prior_scale, 3))
        text = self.text_features(ctx)                                   # (..., K, C, D)
        per_prompt = self.clip.logit_scale * torch.einsum("...kcd,bd->...kbc", text,
                                                          image_features)
        batch, classes = per_prompt.shape[-2:]
        per_prompt = per_prompt.reshape(-1, n_prompts, batch, classes)   # (particles, K, B, C)
        with self.images(image_features, dataset_size):
            if labels is None:
                y = dist.Categorical(logits=per_prompt.mean(-3))
                pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
                pyro.sample("y", y)
                return
            z, variance = surrogate_terms(per_prompt, labels)
            y = dist.Categorical(logits=z)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)
            pyro.factor("variance", -variance)

    def guide(self, image_features, labels=None, dataset_size=None):
        n_prompts = self.options["n_prompts"]
        ctx_map = pyro.param("ctx_map", lambda: self.init_ctx + 0.02 * torch.randn(
            n_prompts, *self.init_ctx.shape, device=self.init_ctx.device))
        pyro.sample("ctx", dist.Delta(ctx_map, event_dim=3))


Model = ProDA
