"""What a run is built from: its datasets (few-shot training set, base and new classes), its
frozen CLIP and the identity a checkpoint must match."""

from __future__ import annotations

from pathlib import Path

from bayesprompt.clip.factory import load_clip
from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.clip.text_tower import TextBudget
from bayesprompt.data.datasets import Dataset, load_dataset
from bayesprompt.data.splits import FewShot, few_shot, subsample_classes
from bayesprompt.runs.config import RunConfig


def split_datasets(config: RunConfig) -> tuple[Dataset, Dataset | None, FewShot]:
    """The training classes' dataset (few-shot), the held-out new classes if any, and the
    few-shot selection before the base/new subsample."""
    root = Path(config.root).expanduser()
    selection = few_shot(load_dataset(config.dataset, root), config.shots, config.seed,
                         Path(config.cache_dir).expanduser() / "split_fewshot")
    dataset = selection.dataset
    if config.subsample == "all":
        return dataset, None, selection
    return subsample_classes(dataset, "base"), subsample_classes(dataset, "new"), selection


def load_run_clip(config: RunConfig, device: str | None = None) -> FrozenCLIP:
    """The run's frozen CLIP (on `device`, default the run's), with its memory options."""
    return load_clip(config.backbone, config.pretrained, device or config.device,
                     config.precision,
                     text_budget=TextBudget(config.prompt_chunk, config.text_memory_gb),
                     grad_checkpointing=config.grad_checkpointing)


def run_identity(config: RunConfig, clip: FrozenCLIP, classnames: list[str]) -> dict:
    """What a checkpoint must match to be resumed or loaded into this run."""
    return {"model": config.model, "backbone": clip.identity, "classnames": classnames,
            "n_ctx": config.n_ctx}
