"""Which model code a run folder may make us import.

A run's `config.json` names its model: a built-in name (`bayesprompt/models/NAME.py`, shipped
with the package) or the path of a model file, which is Python code. A folder from elsewhere
is data: loading it (`Run.load`, `bayesprompt-analyze`, `--config`) imports a built-in model
only, unless the caller names the model file (`model=` / `--model PATH`) or says that the
file the folder names is trusted (`trust_model_file=True` / `--trust-model-file`). A run
records the SHA-256 of its model file in `model_file.json`; a file whose content changed
since is refused, whoever passed it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from bayesprompt.errors import UserError, first_line
from bayesprompt.files import read_json, write_json

#: The record of a run's model file, in its run folder.
MODEL_RECORD = "model_file.json"
#: What a built-in model name looks like (a module of bayesprompt.models).
BUILT_IN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_model_file(model: str) -> bool:
    """Whether a model option names a file (a path ending in .py) rather than a built-in."""
    return model.endswith(".py")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), or a UserError naming the unreadable file."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise UserError(f"Cannot read the model file {path} ({first_line(error)}).") from None


def record_model_file(folder: Path, model: str) -> None:
    """Write `folder/model_file.json` with the path and SHA-256 of a model file; nothing for a
    built-in model."""
    if is_model_file(model):
        write_json(folder / MODEL_RECORD, {"model": model, "sha256": file_sha256(Path(model))})


def check_model_file(folder: Path, model: str) -> None:
    """Refuse a model file whose content differs from the one the run in `folder` recorded
    (a folder without a record, or a built-in model, passes)."""
    record_file = folder / MODEL_RECORD
    if not is_model_file(model) or not record_file.is_file():
        return
    record = read_json(record_file, "the path and SHA-256 of the run's model file, as written "
                       "when the run started")
    digest = file_sha256(Path(model))
    if digest != record.get("sha256"):
        raise UserError(
            f"The model file {model} is not the one the run in {folder} was trained with: its "
            f"SHA-256 is {digest}, the run recorded {record.get('sha256')} (for "
            f"{record.get('model')}). Pass the model file the run was trained with, or start a "
            "new run with another --out.")


def model_to_load(folder: Path, saved: str, model: str | None = None,
                  trust_model_file: bool = False) -> str:
    """The model to import for the run folder `folder`, whose config.json names `saved`.

    `model` (the caller's own choice, a name or a file path) wins; else a built-in `saved`
    name; else the file `saved` names only with `trust_model_file`. Any model file is checked
    against the run's recorded SHA-256 (`check_model_file`). Nothing is imported here.
    """
    chosen = saved if model is None else model
    if is_model_file(chosen):
        if model is None and not trust_model_file:
            raise UserError(
                f"The run in {folder} names the model file {saved}: loading it would run the "
                "Python code in that file, and a run folder from elsewhere is not trusted to "
                "choose code. Read the file, then pass it yourself (model=PATH, or --model "
                "PATH), or pass trust_model_file=True (--trust-model-file).")
        path = Path(chosen).expanduser()
        if not path.is_absolute():
            path = (folder / path) if model is None else path.resolve()
        chosen = str(path)
        check_model_file(folder, chosen)
    elif not BUILT_IN_NAME.match(chosen):
        raise UserError(f"The run in {folder} names the model {chosen!r}, which is neither a "
                        "built-in model name nor a .py model file.")
    return chosen


def config_folder(config_file: str | Path) -> Path:
    """The folder of a `--config` argument (a config.json, or a run folder)."""
    path = Path(config_file).expanduser()
    return path if path.is_dir() else path.parent
