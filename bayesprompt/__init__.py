"""bayesprompt: Bayesian prompt learning on a frozen CLIP likelihood with Pyro.

    import bayesprompt
    run = bayesprompt.fit(dataset="miniworld", model="vpt_cond")   # or bayesprompt.Run.load(folder)

`fit` and `Run` (bayesprompt/api.py) are imported on first use, so that `bayesprompt.errors`
and the other light modules load without torch, Pyro and open_clip.
"""

from pathlib import Path

from bayesprompt.errors import UserError

__all__ = ["Ensemble", "Run", "UserError", "fit"]

# Installed, models/ and analysis/ are bayesprompt/models and bayesprompt/analysis. Imported
# from a source checkout (the repository root on sys.path: `python -m pytest`, a notebook
# started there), they sit next to this folder: look for subpackages there too.
_SOURCE_TREE = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "models").is_dir() and \
        (_SOURCE_TREE / "models" / "__init__.py").is_file():
    __path__.append(str(_SOURCE_TREE))


def __getattr__(name: str) -> object:
    if name in ("Run", "fit"):
        from bayesprompt import api
        return getattr(api, name)
    if name == "Ensemble":
        from bayesprompt.ensemble import Ensemble
        return Ensemble
    raise AttributeError(f"module 'bayesprompt' has no attribute {name!r}")
