"""Guide building blocks: networks and parameterisations that model files combine."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


def elu_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear, ELU, Linear, ELU, Linear: the inference block of Bayesian Prompt Learning."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ELU(),
        nn.Linear(hidden_dim, hidden_dim), nn.ELU(),
        nn.Linear(hidden_dim, out_dim),
    )


class AmortizedGaussian(nn.Module):
    """q(r | f) = N(mean(f), exp(log_var(f))): image feature (B, D) -> r's loc, scale (B, W)."""

    def __init__(self, feature_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mean = elu_mlp(feature_dim, feature_dim // 2, out_dim)
        self.log_var = elu_mlp(feature_dim, feature_dim // 2, out_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(features), torch.exp(0.5 * self.log_var(features))


def diagonal_normal(loc: torch.Tensor, log_var: torch.Tensor, event_dims: int
                    ) -> dist.Distribution:
    """N(loc, diag(exp(log_var))) with the last `event_dims` dimensions as one event."""
    return dist.Normal(loc, torch.exp(0.5 * log_var)).to_event(event_dims)
