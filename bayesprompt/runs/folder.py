"""The run folder: whether one holds a run, which options a resume may not change, and a
trained program rebuilt from its config.json and checkpoint.pt."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.data.datasets import Dataset
from bayesprompt.errors import UserError, first_line
from bayesprompt.files import read_json
from bayesprompt.inference.checkpoint import load_checkpoint
from bayesprompt.program.base import PromptModel
from bayesprompt.runs.config import EXECUTION_OPTIONS, UNRECORDED_VALUES, RunConfig
from bayesprompt.runs.inputs import load_run_clip, run_identity, split_datasets
from bayesprompt.runs.model_files import build_program
from bayesprompt.runs.trust import model_to_load

#: What a run folder's config.json holds, for the message about a damaged one.
RUN_CONFIG_FILE = ("the run's options as written by svi_train.py; restore the file, or train "
                   "the run again into a new --out folder")


def holds_run(out: Path) -> bool:
    """True when `out` holds (part of) a run: its config, checkpoint or results."""
    try:
        return any((out / name).exists() for name in ("config.json", "checkpoint.pt",
                                                      "results.json"))
    except OSError as error:
        raise UserError(f"Cannot look into the run folder {out} ({first_line(error)}). Make it "
                        "readable, or pass another --out.") from None


def changed_options(saved: dict, config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """name -> (value in `saved`, value in `config`) of every option in which a run folder's
    config.json differs from `config`. `out` (spelled differently, or the folder moved) and the
    EXECUTION_OPTIONS do not count; an option a run of an older version did not record counts
    as its default (or as what runs before it did: UNRECORDED_VALUES)."""
    requested = json.loads(json.dumps(asdict(config)))
    defaults = {**json.loads(json.dumps(asdict(RunConfig()))), **UNRECORDED_VALUES}
    values = {k: (saved.get(k, defaults.get(k)), requested.get(k))
              for k in sorted(saved.keys() | requested.keys())
              if k not in ("out", *EXECUTION_OPTIONS)}
    return {k: pair for k, pair in values.items() if pair[0] != pair[1]}


def check_resume(config: RunConfig, out: Path) -> None:
    """A run folder is resumed only with the options it was started with (`changed_options`)."""
    config_file = out / "config.json"
    if not config_file.is_file():
        return
    changed = changed_options(read_json(config_file, RUN_CONFIG_FILE), config)
    if changed:
        details = "; ".join(f"{k}: run has {there!r}, now {now!r}"
                            for k, (there, now) in changed.items())
        raise UserError(f"--resume with other options than the run in {out} ({details}). "
                        "Resume with the run's options, or start a new run with another --out.")


def load_run(run_dir: Path, device: str | None = None, model: str | None = None,
             trust_model_file: bool = False
             ) -> tuple[RunConfig, PromptModel, FrozenCLIP, Dataset, Dataset | None]:
    """Rebuild a trained run: its config, program (parameters restored), CLIP and datasets.
    The model is chosen by `trust.model_to_load`: a model file the run folder names is
    imported only when passed as `model` or with `trust_model_file`."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run folder: no config.json there.")
    saved = read_json(config_file, RUN_CONFIG_FILE)
    saved["model"] = model_to_load(run_dir, str(saved.get("model", RunConfig.model)), model,
                                   trust_model_file)
    config = RunConfig(**{**UNRECORDED_VALUES,
                          **{f.name: saved[f.name] for f in fields(RunConfig) if f.name in saved}})
    config = config.resolved()  # fills options that runs of older versions did not record
    if device:
        config.device = device
    base, new, _ = split_datasets(config)
    clip = load_run_clip(config)
    program = build_program(config, clip, base.classnames, base.template)
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        program.initialize_parameters()
        with program.param_scope():
            state = load_checkpoint(checkpoint, run_identity(config, clip, base.classnames),
                                    clip.device)
        program.load_guide_buffers(state.get("guide_buffers", {}))
    return config, program, clip, base, new
