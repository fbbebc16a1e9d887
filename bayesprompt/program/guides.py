"""Guide building blocks: networks and parameterisations that model files combine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
from torch import nn

if TYPE_CHECKING:
    from bayesprompt.program.base import PromptModel


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


def point_context(program: PromptModel) -> torch.Tensor:
    """The MAP guide of a context site: "ctx" ~ Delta(ctx_map), the parameter "ctx_map"
    (n_ctx, W) starting at the initial context. (The objective applies --kl-weight to it, as
    to the prior it stands for.)"""
    ctx_map = pyro.param("ctx_map", program.init_ctx.clone())
    return pyro.sample("ctx", dist.Delta(ctx_map, event_dim=2))


def amortized_residual(program: PromptModel, image_features: torch.Tensor,
                       dataset_size: int | None) -> torch.Tensor:
    """The amortized guide of a per-image residual: r_i ~ N(mean(f_i), exp(log_var(f_i))) in
    the images plate, from the program's `posterior_net` (an AmortizedGaussian); (B, W)."""
    posterior_net = pyro.module("posterior_net", program.posterior_net,
                                update_module_params=True)
    r_loc, r_scale = posterior_net(image_features)                      # (B, W) each
    with program.images(image_features, dataset_size):
        return pyro.sample("r", dist.Normal(r_loc, r_scale).to_event(1))
