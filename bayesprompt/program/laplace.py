"""Laplace approximation kernels: a Gaussian N(theta*, H^-1) around a MAP theta* (P,).

H is the negative log joint's curvature at theta*: here the generalised Gauss-Newton matrix
(GGN) of the softmax likelihood plus the prior's precision, the default of laplace-torch and
of "Laplace Redux" (Daxberger et al., 2021). The GGN is positive semi-definite everywhere, so H
is positive definite even where SGD stopped short of the exact mode; for logits linear in
theta it equals the exact Hessian of the negative log-likelihood.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

#: Most entries (images x classes x parameters) of one chunk of the GGN's Jacobian rows.
CHUNK_ENTRIES = 2 ** 24


def softmax_ggn(features: torch.Tensor, jacobian: torch.Tensor, logits: torch.Tensor,
                scale: float) -> torch.Tensor:
    """GGN sum_m J_m^T (diag p_m - p_m p_m^T) J_m of the softmax cross-entropy of M images.

    The logits are `scale * x_m . w_c(theta)`: features x (M, D), logits (M, C), and the
    Jacobian of the class weights w (C, D) with respect to theta, `jacobian` (C, D, P); so
    J_m = scale * x_m^T jacobian (C, P). Computed in chunks of images (CHUNK_ENTRIES).
    Returns (P, P), float64.
    """
    n_classes, _, n_params = jacobian.shape
    jacobian = jacobian.double()
    ggn = torch.zeros(n_params, n_params, dtype=torch.float64, device=jacobian.device)
    step = max(1, CHUNK_ENTRIES // (n_classes * n_params))
    for start in range(0, features.shape[0], step):
        x = features[start:start + step].double()
        probs = torch.softmax(logits[start:start + step].double(), dim=-1)        # (m, C)
        rows = scale * torch.einsum("md,cdp->mcp", x, jacobian)                  # (m, C, P)
        weighted = (probs.sqrt().unsqueeze(-1) * rows).reshape(-1, n_params)      # (m C, P)
        mean = torch.einsum("mc,mcp->mp", probs, rows)                           # (m, P)
        ggn += weighted.T @ weighted - mean.T @ mean
    return ggn


def covariance_scale_tril(precision: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor L of the covariance precision^-1 (L L^T = precision^-1), for a
    symmetric positive definite precision (P, P); float64."""
    precision = precision.double()
    covariance = torch.cholesky_inverse(torch.linalg.cholesky(0.5 * (precision + precision.T)))
    return torch.linalg.cholesky(covariance)


def marginal_likelihood_precision(ggn: torch.Tensor, theta: torch.Tensor) -> float:
    """The isotropic prior precision delta that maximises the Laplace approximation of the
    evidence at a fixed MAP theta (P,) (MacKay, 1992; laplace-torch's `marglik`): as a
    function of delta, log Z = P/2 log delta - delta/2 |theta|^2 - 1/2 log det(GGN + delta I)
    + const. Maximised over a grid of 2,001 values of log10 delta in [-6, 6] (from the GGN's
    eigenvalues; resolution 0.006 in log10)."""
    eigenvalues = torch.linalg.eigvalsh(0.5 * (ggn + ggn.T).double()).clamp(min=0)     # (P,)
    deltas = torch.logspace(-6, 6, 2001, dtype=torch.float64, device=ggn.device)       # (G,)
    squared = theta.double().pow(2).sum()
    evidence = (0.5 * theta.numel() * deltas.log() - 0.5 * deltas * squared
                - 0.5 * torch.log(eigenvalues + deltas[:, None]).sum(-1))
    return float(deltas[evidence.argmax()])


def jacobian(function: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor,
             chunk_size: int = 64) -> torch.Tensor:
    """d function(theta) / d theta: output (*out) for theta (P,) -> (*out, P), by forward mode
    (one Jacobian-vector product per parameter, `chunk_size` at a time). Attention runs on
    PyTorch's math kernel, which forward mode and vmap support on every device."""
    basis = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)

    def column(direction: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(function, (theta,), (direction,))[1]

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        columns = torch.func.vmap(column, chunk_size=chunk_size)(basis)          # (P, *out)
    return columns.movedim(0, -1)
