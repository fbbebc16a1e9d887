"""Learnable mutual-information lower bounds on paired samples (a_i, b_i), i = 1..N.

A critic T(a, b) scores every pair of a batch: `scores[..., i, j] = T(a_i, b_j)`; the diagonal
holds samples of the joint p(a, b), the off-diagonal ones samples of the product p(a) p(b).
Bounds (Poole et al., 2019, "On variational bounds of mutual information"):

- InfoNCE (van den Oord et al., 2018): I >= log N + mean_i [T_ii - logsumexp_j T_ij];
  a lower bound for every critic, and never above log N.
- Jensen-Shannon (f-GAN, Nowozin et al., 2016; Deep InfoMax, Hjelm et al., 2019): the critic is
  trained on log 4 + E_joint[-softplus(-T)] - E_product[softplus(T)], a lower bound on
  2 JSD(p(a, b) || p(a) p(b)), not on the MI (0 for T = 0). Its optimum is
  T = log p(a, b) / p(a) p(b), so the MI in nats is read with the NWJ bound at T + 1:
  I >= 1 + E_joint[T] - E_product[exp T] (Poole et al.'s "JS" estimator; valid for every T).

Per-sample terms have shape (..., N); their mean over N is the estimate. Leading dimensions
(e.g. Pyro particles) broadcast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bayesprompt.errors import UserError

BOUNDS = ("jsd", "infonce")


class Critic(nn.Module):
    """T(a, b) = MLP([a, b]) on all N x N pairs: a (..., N, da), b (..., N, db) -> (..., N, N)."""

    def __init__(self, a_dim: int, b_dim: int, hidden_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(a_dim + b_dim, hidden_dim), nn.ELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ELU(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        n = a.shape[-2]
        a = a.expand(*lead, *a.shape[-2:]).unsqueeze(-2).expand(*lead, n, n, a.shape[-1])
        b = b.expand(*lead, *b.shape[-2:]).unsqueeze(-3).expand(*lead, n, n, b.shape[-1])
        return self.net(torch.cat([a, b], dim=-1)).squeeze(-1)


def _off_diagonal_mean(values: torch.Tensor) -> torch.Tensor:
    """(..., N, N) -> (..., N): row means over j != i."""
    n = values.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=values.device)
    return (values * off).sum(-1) / (n - 1)


def infonce_terms(scores: torch.Tensor) -> torch.Tensor:
    """Scores (..., N, N) -> per-sample InfoNCE terms (..., N), in nats."""
    n = scores.shape[-1]
    return math.log(n) + scores.diagonal(dim1=-2, dim2=-1) - scores.logsumexp(-1)


def jsd_terms(scores: torch.Tensor) -> torch.Tensor:
    """Scores (..., N, N) -> per-sample terms of the bound on 2 JSD (..., N); not MI nats."""
    joint = -F.softplus(-scores.diagonal(dim1=-2, dim2=-1))
    return math.log(4) + joint - _off_diagonal_mean(F.softplus(scores))


def nwj_terms(scores: torch.Tensor) -> torch.Tensor:
    """Scores (..., N, N) -> per-sample NWJ terms at T + 1 (..., N), in nats."""
    return 1 + scores.diagonal(dim1=-2, dim2=-1) - _off_diagonal_mean(scores.exp())


def check_bound(bound: str) -> None:
    if bound not in BOUNDS:
        raise UserError(f"Unknown MI bound '{bound}'; choose one of {', '.join(BOUNDS)}.")


def critic_objective(critic: Critic, a: torch.Tensor, b: torch.Tensor, bound: str
                     ) -> torch.Tensor:
    """What critic (and encoders) maximise: a (..., N, da), b (..., N, db) -> (..., N) terms."""
    check_bound(bound)
    scores = critic(a, b)
    return infonce_terms(scores) if bound == "infonce" else jsd_terms(scores)


def mi_lower_bound(critic: Critic, a: torch.Tensor, b: torch.Tensor, bound: str
                   ) -> torch.Tensor:
    """The MI estimate in nats of a critic trained with `bound`: (..., N, d) pairs -> (...)."""
    check_bound(bound)
    scores = critic(a, b)
    terms = infonce_terms(scores) if bound == "infonce" else nwj_terms(scores)
    return terms.mean(-1)
