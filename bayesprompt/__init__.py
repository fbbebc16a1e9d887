"""bayesprompt: Bayesian prompt learning on a frozen CLIP likelihood with Pyro.

    import bayesprompt
    run = bayesprompt.fit(dataset="miniworld", model="vpt_cond")   # or bayesprompt.Run.load(folder)

`fit` and `Run` (bayesprompt/api.py) are imported on first use, so that `bayesprompt.errors`
and the other light modules load without torch, Pyro and open_clip.
"""

from bayesprompt.errors import UserError

__all__ = ["Run", "UserError", "fit"]


def __getattr__(name: str) -> object:
    if name in ("Run", "fit"):
        from bayesprompt import api
        return getattr(api, name)
    raise AttributeError(f"module 'bayesprompt' has no attribute {name!r}")
