"""Priors that model files combine."""

from __future__ import annotations

import pyro.distributions as dist
import torch


def isotropic_normal(loc: torch.Tensor, scale: float, event_dims: int) -> dist.Distribution:
    """N(loc, scale^2 I) whose last `event_dims` dimensions form one event."""
    return dist.Normal(loc, scale * torch.ones_like(loc)).to_event(event_dims)


def standard_normal(shape: tuple[int, ...], device: torch.device) -> dist.Distribution:
    """N(0, I) over a tensor of `shape`, one event."""
    return isotropic_normal(torch.zeros(shape, device=device), 1.0, len(shape))
