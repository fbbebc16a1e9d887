"""The guide's own optimiser under the ELBO: Adam on the variational parameters.

Under the per-image ELBO the reference SGD (lr 0.032 on the world, weight decay 5e-4) barely
moves the guide's scale: the KL's gradient is divided by N and weight decay pulls a
log-variance to 0, i.e. the scale to the prior's. The variational parameters (those the guide
creates and the model does not use) get Adam instead, on the same warm-up and cosine schedule
scaled to `guide_lr` (docs/EVIDENCE.md, "Is the posterior a posterior?").
"""

from __future__ import annotations

import torch
from pyro import poutine

from bayesprompt.program import PromptModel

#: The key of the guide's optimiser among the optimizer groups (checkpoint, metrics.jsonl).
GUIDE_GROUP = "guide"
GUIDE_OPTIMIZERS = ("adam", "sgd")


def guide_parameter_names(program: PromptModel, features: torch.Tensor, labels: torch.Tensor,
                          dataset_size: int) -> set[str]:
    """Pyro parameters of the guide that the model does not use and no optimizer group of the
    model claims: the variational parameters (e.g. r_loc, r_log_var, posterior_net$$$...).
    Empty for point-estimate programs (`stochastic` False: CoOp's MAP context keeps the
    reference SGD)."""
    if not program.stochastic:
        return set()
    guide_trace = poutine.trace(program.guide).get_trace(features, labels, dataset_size)
    model_trace = poutine.trace(poutine.replay(program.model, trace=guide_trace)).get_trace(
        features, labels, dataset_size)

    def params(trace: poutine.Trace) -> set[str]:
        return {name for name, site in trace.nodes.items() if site["type"] == "param"}

    claimed = tuple(group.prefix for group in program.optimizer_groups)
    return {name for name in params(guide_trace) - params(model_trace)
            if not name.startswith(claimed)}


def guide_optimizer(named: dict[str, torch.nn.Parameter], names: set[str], lr: float
                    ) -> torch.optim.Optimizer | None:
    """Adam over the parameters `names` of `named` (None when there are none)."""
    members = [parameter for name, parameter in named.items() if name in names]
    return torch.optim.Adam(members, lr=lr) if members else None
