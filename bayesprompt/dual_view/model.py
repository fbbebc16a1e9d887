"""E2MIM's shared machinery: two text views of the classes, Mixup, and an MI-maximising likelihood.

After "Generalizable Prompt Tuning for Vision-Language Models" (Zhang, 2024). Only its abstract
and figure captions were available; every equation below is ours (docs/E2MIM.md lists them).

View A, hand-crafted: frozen text features of the dataset's template (or a template ensemble).
View B, learnable: soft-prompt text features, given by the model file.
For real and mixed images x, each view gives class probabilities p_A(x), p_B(x) (C,).
The per-image objective (minimised) of training image i is

    -log p_train(y_i | x_i)                             the `y` site
    + mixup_weight * loss(p_train(x_mix_i), t_mix_i)    factor "mixup", if image i anchors a mix
    - mi_weight * I_hat(p_A; p_B)                       factor "mi", the batch's MI bound

p_train is p_B (or the fused view with `fused_training`); I_hat is the critic objective over the
pooled real and mixed images of the batch, maximised by the critic and by the prompts alike
(InfoMax); the critic has its own optimiser (`critic_optimizer`, constant `critic_lr`).
Prediction samples `y` from the fused view w p_A + (1 - w) p_B, w = `fusion_weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.dual_view.mi_bounds import BOUNDS, Critic, critic_objective
from bayesprompt.dual_view.mixup import LABELS, Mixup, class_mixup
from bayesprompt.errors import UserError
from bayesprompt.options import check_field_value
from bayesprompt.program import GROUP_OPTIMIZERS, OptimizerGroup, PromptConfig, PromptModel
from bayesprompt.program.templates import ENSEMBLE_TEMPLATES, zero_shot_classifier

TEMPLATES = ("dataset", "ensemble")


@dataclass(frozen=True)
class E2MIMOptions:
    """The `--set KEY=VALUE` options of the E2MIM models (defaults are ours, untuned)."""

    mi_weight: float = 1.0
    mi_bound: str = "jsd"
    mixup: bool = True
    mixup_alpha: float = 1.0
    mixup_label: str = "soft"
    mixup_weight: float = 1.0
    handcrafted: bool = True
    fusion_weight: float = 0.5
    fused_training: bool = False
    templates: str = "dataset"
    critic_hidden: int = 64
    critic_optimizer: str = "adam"
    critic_lr: float = 0.01

    @classmethod
    def parse(cls, options: dict) -> E2MIMOptions:
        """Options dict -> checked E2MIMOptions, or a UserError naming the bad option."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise UserError(f"Unknown E2MIM option(s) {unknown}; known: {', '.join(names)}.")
        try:
            parsed = cls(**{k: check_field_value(cls, k, v) for k, v in options.items()})
        except ValueError as error:
            raise UserError(f"--set {error}.") from None
        choices = {"mi_bound": BOUNDS, "mixup_label": LABELS, "templates": TEMPLATES,
                   "critic_optimizer": GROUP_OPTIMIZERS}
        for key, allowed in choices.items():
            if getattr(parsed, key) not in allowed:
                raise UserError(f"--set {key}= must be one of {', '.join(allowed)}.")
        if not 0.0 <= parsed.fusion_weight <= 1.0:
            raise UserError("--set fusion_weight= must lie in [0, 1].")
        if parsed.mixup_alpha <= 0:
            raise UserError("--set mixup_alpha= must be positive.")
        if parsed.critic_lr <= 0:
            raise UserError("--set critic_lr= must be positive.")
        return parsed


def with_mixed(values: torch.Tensor, mix: Mixup | None) -> torch.Tensor:
    """Per-image values (..., B, K) followed by the mixed images' blend (..., B + M, K)."""
    return values if mix is None else torch.cat([values, mix.blend(values)], dim=-2)


def with_mixed_features(image_features: torch.Tensor, mix: Mixup | None) -> torch.Tensor:
    """Image features (B, D) followed by the unit-norm mixed features: (B + M, D)."""
    return image_features if mix is None else torch.cat([image_features, mix.features])


def critic_input(logits: torch.Tensor) -> torch.Tensor:
    """A view's class logits (..., N, C) standardised over the classes of each image.

    A fixed function of the view's probabilities (log-probs up to a per-image offset and
    scale), so by data processing the MI bound on it also bounds I(p_A; p_B); unlike the raw
    probabilities it has unit scale whatever the logit scale of the backbone.
    """
    return F.layer_norm(logits, logits.shape[-1:])


def mixup_nll(log_probs: torch.Tensor, targets: torch.Tensor, label: str) -> torch.Tensor:
    """Loss of M mixed images: log-probs (..., M, C), targets (M, C) -> (..., M).

    "soft": cross-entropy with the soft target; "mixed": -log p(mixed class), the probability
    of the union of the target's classes.
    """
    if label == "soft":
        return -(targets * log_probs).sum(-1)
    return -log_probs.masked_fill(targets == 0, -math.inf).logsumexp(-1)


class DualViewModel(PromptModel):
    """A PromptModel with E2MIM's hand-crafted view, Mixup and MI likelihood (`observe`).

    A model file computes the learnable view's logits on `with_mixed_features(...)` and calls
    `observe` inside the data plate.
    """

    def __init__(self, clip: FrozenCLIP, classnames: list[str], config: PromptConfig) -> None:
        super().__init__(clip, classnames, config)
        options = self.options
        self.critic = None
        if options.handcrafted and options.mi_weight > 0:
            n_classes = len(classnames)
            self.critic = Critic(n_classes, n_classes, options.critic_hidden).to(clip.device)

    def check_options(self, options: dict) -> None:
        E2MIMOptions.parse(options)

    @cached_property
    def options(self) -> E2MIMOptions:
        """The checked `--set` options, parsed once."""
        return E2MIMOptions.parse(self.config.options)

    @property
    def optimizer_groups(self) -> tuple[OptimizerGroup, ...]:
        """The critic trains with its own optimiser and constant learning rate."""
        options = self.options
        return (OptimizerGroup("critic", options.critic_optimizer, options.critic_lr),)

    def set_classes(self, classnames: list[str]) -> None:
        super().set_classes(classnames)
        templates = [self.config.template]
        if self.options.templates == "ensemble":
            templates += [t for t in ENSEMBLE_TEMPLATES if t != self.config.template]
        self.handcrafted_text = zero_shot_classifier(self.clip, classnames, templates)

    def mix(self, image_features: torch.Tensor, labels: torch.Tensor | None) -> Mixup | None:
        """Class-wise Mixup of a training batch (B, D); None when predicting, off or no pair."""
        options = self.options
        if labels is None or not options.mixup:
            return None
        mix = class_mixup(image_features, labels, len(self.classnames), options.mixup_alpha,
                          options.mixup_label)
        return mix if len(mix.anchor) else None

    def fused_log_probs(self, logits: torch.Tensor, handcrafted: torch.Tensor | None
                        ) -> torch.Tensor:
        """log(w p_A + (1 - w) p_B): logits of views B (..., N, C) and A (N, C) or None."""
        log_b = logits.log_softmax(-1)
        if handcrafted is None:
            return log_b
        w = torch.tensor(self.options.fusion_weight, device=logits.device)
        return torch.logaddexp(w.log() + handcrafted.log_softmax(-1),
                               (1 - w).log() + log_b)

    def observe(self, features: torch.Tensor, labels: torch.Tensor | None,
                logits: torch.Tensor, mix: Mixup | None) -> None:
        """The likelihood, inside the data plate: features (B + M, D) of the real images then
        the mixed ones, learnable-view logits (..., B + M, C), labels (B,) or None (predict).
        """
        options = self.options
        b = features.shape[0] - (0 if mix is None else len(mix.anchor))     # B real images
        batch = logits.shape[:-2] + (b,)
        handcrafted = None
        if options.handcrafted:
            handcrafted = self.class_logits(features, self.handcrafted_text)   # (B + M, C)
        fused = self.fused_log_probs(logits, handcrafted)                        # (..., B + M, C)
        if labels is None:
            y = dist.Categorical(probs=fused[..., :b, :].exp())
            pyro.deterministic("probs", y.probs, event_dim=1)                 # (..., B, C)
            pyro.sample("y", y)
            return
        train = fused if options.fused_training else logits.log_softmax(-1)
        y = dist.Categorical(logits=train[..., :b, :])
        pyro.deterministic("probs", y.probs, event_dim=1)                     # (..., B, C)
        pyro.sample("y", y, obs=labels)
        if mix is not None:
            nll = mixup_nll(train[..., b:, :], mix.targets, options.mixup_label)  # (..., M)
            pyro.factor("mixup", -options.mixup_weight * mix.per_image(nll, b).expand(batch))
        if self.critic is not None:
            critic = pyro.module("critic", self.critic, update_module_params=True)
            if features.shape[0] > 1:
                terms = critic_objective(critic, critic_input(handcrafted), critic_input(logits),
                                         options.mi_bound)                  # (..., B + M)
                bound = terms.mean(-1, keepdim=True)
                pyro.factor("mi", options.mi_weight * bound.expand(batch))
