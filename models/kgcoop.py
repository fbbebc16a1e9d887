"""KgCoOp (Yao et al., CVPR 2023): CoOp plus a penalty that keeps the learned class text
features close to the hand-crafted ones.

ctx ~ N(0, prior_scale^2 I)                                  (n_ctx, W)
y_i ~ Categorical(softmax(tau * f_i . g_c(ctx)))              for each image i
training, per image: factor "kg" = -kg_weight * (1 - mean_c cos(g_c(ctx), t_c))
    t_c = text feature of the dataset's template with class c (hand-crafted, frozen)
    1 - cos = ||g_c - t_c||^2 / 2 for unit vectors: the paper's L_kg, mean over classes.
guide: ctx = ctx_map, a point (Delta), initialised from the words of `ctx_init`.

The per-image objective is CoOp's cross-entropy + kg_weight * (1 - mean cos), as the
reference code (trainers/kgcoop.py, `1 - mean(cos)` with weight TRAINER.COOP.W, 8.0 in its
base-to-new scripts): `--set kg_weight=8.0` is the default. The reference trains 100 epochs at
batch 128 (ViT-B/16, lr 0.002, n_ctx 4 "a photo of a"); the world keeps its own defaults
(30 epochs, batch 16, lr 0.032). The penalty is a training term: prediction is CoOp's.
"""

import pyro
import pyro.distributions as dist
import torch

from bayesprompt.options import numeric_options
from bayesprompt.program import PromptModel
from bayesprompt.program.priors import isotropic_normal
from bayesprompt.program.templates import zero_shot_classifier

DEFAULTS = {"kg_weight": 8.0}


class KgCoOp(PromptModel):
    stochastic = False
    latent_sites = ("ctx",)

    def check_options(self, options):
        self.options = numeric_options("kgcoop", options, DEFAULTS, {"kg_weight": 0.0})

    def set_classes(self, classnames):
        super().set_classes(classnames)
        self.handcrafted = zero_shot_classifier(self.clip, classnames,
                                                [self.config.template])  # (C, D), unit norm

    def penalty(self, text):
        """1 - mean_c cos(g_c, t_c) of text features (..., C, D) -> (...)."""
        return 1 - torch.cosine_similarity(text, self.handcrafted, dim=-1).mean(-1)

    def model(self, image_features, labels=None, dataset_size=None):
        prior = isotropic_normal(torch.zeros_like(self.init_ctx), self.config.prior_scale, 2)
        ctx = pyro.sample("ctx", prior)                               # (n_ctx, W)
        text = self.text_features(ctx)                                   # (..., C, D)
        logits = self.class_logits(image_features, text)                  # (..., B, C)
        with self.images(image_features, dataset_size):
            y = dist.Categorical(logits=logits)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)
            if labels is not None:
                kg = self.options["kg_weight"] * self.penalty(text)     # per sample of ctx
                pyro.factor("kg", -kg.expand(logits.shape[:-1]))        # (..., B)

    def guide(self, image_features, labels=None, dataset_size=None):
        ctx_map = pyro.param("ctx_map", self.init_ctx.clone())
        pyro.sample("ctx", dist.Delta(ctx_map, event_dim=2))


Model = KgCoOp
