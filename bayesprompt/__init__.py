"""bayesprompt: Bayesian prompt learning on a frozen CLIP likelihood with Pyro.

    import bayesprompt
    run = bayesprompt.fit(dataset="miniworld", model="vpt_cond")   # or bayesprompt.Run.load(folder)

`fit` and `Run` (bayesprompt/api.py) are imported on first use, so that `bayesprompt.errors`
and the other light modules load without torch, Pyro and open_clip.
"""

import importlib.machinery
import sys
from pathlib import Path

from bayesprompt.errors import UserError

__all__ = ["Ensemble", "Run", "UserError", "fit"]

#: The sub-packages that sit at the top of the source tree (the product's layout) and install
#: inside this package: `models/` -> bayesprompt.models, `analysis/` -> bayesprompt.analysis.
TOP_LEVEL_SUBPACKAGES = ("models", "analysis")


class _SourceTreeFinder:
    """Finds `bayesprompt.models` and `bayesprompt.analysis` (and their modules) in the
    repository's `models/` and `analysis/` folders when this package is imported from a source
    checkout, where they are not inside `bayesprompt/` as they are once installed. It finds
    nothing else, so no other folder of the repository becomes part of the package."""

    def __init__(self, root: Path) -> None:
        self.folders = {f"{__name__}.{name}": root / name for name in TOP_LEVEL_SUBPACKAGES}

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [str(folder.parent)]) \
            if (folder / "__init__.py").is_file() else None


_SOURCE_TREE = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "models").is_dir() and \
        (_SOURCE_TREE / "models" / "__init__.py").is_file() and \
        not any(isinstance(finder, _SourceTreeFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _SourceTreeFinder(_SOURCE_TREE))


def __getattr__(name: str) -> object:
    if name in ("Run", "fit"):
        from bayesprompt import api
        return getattr(api, name)
    if name == "Ensemble":
        from bayesprompt.runs.ensemble import Ensemble
        return Ensemble
    raise AttributeError(f"module 'bayesprompt' has no attribute {name!r}")
