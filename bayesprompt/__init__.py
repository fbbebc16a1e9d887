"""bayesprompt: Bayesian prompt learning on a frozen CLIP likelihood with Pyro."""

from bayesprompt.errors import UserError

__all__ = ["UserError"]
