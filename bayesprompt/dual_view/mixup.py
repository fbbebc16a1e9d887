"""Class-wise Mixup of visual features (Zhang et al., 2018, applied between classes).

Every image of a batch (the anchor) that has an image of another class in the batch is paired
with one of them (the partner), drawn uniformly with the torch RNG; the mixed feature
normalize(lam f_anchor + (1 - lam) f_partner) is a new unit-norm image feature, lam ~ Beta(a, a).
Labels of the M mixed images (M <= B):

- "soft":  lam e_anchor + (1 - lam) e_partner, the usual Mixup target;
- "mixed": 0.5 e_anchor + 0.5 e_partner, whose support is the *mixed class* {anchor, partner}
  ("class 1&2" of E2MIM's figure), scored by the probability of either class (see e2mim.py).

Mixed images only augment training; prediction is over the original classes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from bayesprompt.errors import UserError

LABELS = ("soft", "mixed")


class Mixup(NamedTuple):
    """M mixed images: features (M, D), targets (M, C), batch indices anchor and partner (M,),
    mixing coefficients lam (M,)."""

    features: torch.Tensor
    targets: torch.Tensor
    anchor: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor

    def blend(self, values: torch.Tensor) -> torch.Tensor:
        """Mix per-image values like the features: (..., B, K) -> (..., M, K)."""
        lam = self.lam.unsqueeze(-1)
        return lam * values[..., self.anchor, :] + (1 - lam) * values[..., self.partner, :]

    def per_image(self, values: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Per-mix values (..., M) -> per-anchor values (..., B), zero for unpaired images."""
        out = values.new_zeros(*values.shape[:-1], batch_size)
        return out.index_add(-1, self.anchor, values)


def class_mixup(features: torch.Tensor, labels: torch.Tensor, n_classes: int,
                alpha: float = 1.0, label: str = "soft") -> Mixup:
    """Mix each image (B, D) with a random image of another class; see the module docstring."""
    if label not in LABELS:
        raise UserError(f"Unknown mixup label '{label}'; choose one of {', '.join(LABELS)}.")
    different = labels.unsqueeze(-1) != labels.unsqueeze(-2)                     # (B, B)
    draw = torch.rand(different.shape, device=features.device).masked_fill(~different, -1.0)
    anchor = different.any(-1).nonzero().squeeze(-1)                            # (M,)
    partner = draw.argmax(-1)[anchor]                                           # (M,)
    beta = torch.distributions.Beta(features.new_tensor(alpha), features.new_tensor(alpha))
    lam = beta.sample(anchor.shape)                                             # (M,)
    mixed = F.normalize(lam.unsqueeze(-1) * features[anchor]
                        + (1 - lam.unsqueeze(-1)) * features[partner], dim=-1)
    weight = lam if label == "soft" else torch.full_like(lam, 0.5)
    targets = (weight.unsqueeze(-1) * F.one_hot(labels[anchor], n_classes)
               + (1 - weight.unsqueeze(-1)) * F.one_hot(labels[partner], n_classes))
    return Mixup(mixed, targets, anchor, partner, lam)
