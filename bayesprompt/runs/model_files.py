"""Model files: `--model NAME` (a file of models/, installed as bayesprompt.models) or a path;
its `Model` class built into a program for a run's CLIP and classes."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import bayesprompt.models
from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.errors import UserError
from bayesprompt.program.base import PromptConfig, PromptModel
from bayesprompt.runs.config import RunConfig

#: The model files shipped with the package (`models/` of the source tree).
MODELS_DIR = Path(bayesprompt.models.__file__).resolve().parent


def load_model_class(name: str) -> type[PromptModel]:
    """`models/<name>.py`, or any model file by path; its module attribute `Model`."""
    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"Model file not found: {path}.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        _import_model_file(path, lambda: spec.loader.exec_module(module))
    elif (MODELS_DIR / f"{name}.py").is_file():
        module = _import_model_file(MODELS_DIR / f"{name}.py",
                                    lambda: importlib.import_module(f"bayesprompt.models.{name}"))
    else:
        raise UserError(
            f"Unknown model '{name}'. Known models: {', '.join(known_models())}; or pass the "
            "path of a model file (a .py defining `Model`, a PromptModel subclass)."
        )
    model_class = getattr(module, "Model", None)
    if not (isinstance(model_class, type) and issubclass(model_class, PromptModel)):
        raise UserError(f"The model file of '{name}' defines no `Model` (a PromptModel class).")
    return model_class


def _import_model_file(path: Path, load: Callable[[], object]) -> object:
    """Run `load` (the import of a model file); its failure becomes one clear UserError."""
    try:
        return load()
    except Exception as error:  # a model file is user code: any error it raises is reported
        where = f" (line {error.lineno})" if isinstance(error, SyntaxError) else ""
        raise UserError(
            f"The model file {path} could not be loaded{where}: {type(error).__name__}: "
            f"{error}. Fix the file (run `python {path}` to see the full error)."
        ) from None


def known_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.py") if not p.stem.startswith("_"))


def build_program(config: RunConfig, clip: FrozenCLIP, classnames: list[str],
                  template: str) -> PromptModel:
    prompt_config = PromptConfig(config.n_ctx, config.ctx_init, config.kl_weight,
                                 config.prior_scale, config.residual_scale, template,
                                 dict(config.options), config.learn_residual_scale)
    return load_model_class(config.model)(clip, classnames, prompt_config).to(clip.device)
