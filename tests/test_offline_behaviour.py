"""Behaviour on the offline world: MiniCLIP knows the classes, prompt learning adapts to a shift."""

from __future__ import annotations

from pathlib import Path

from bayesprompt.runs import RunConfig, train_and_evaluate


def run(model: str, dataset: str, root: Path, tmp_path: Path, **options) -> dict:
    config = RunConfig(dataset=dataset, model=model, root=str(root), views=2, device="cpu",
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / model), **options)
    return train_and_evaluate(config)


def test_defaults_are_the_offline_world() -> None:
    defaults = RunConfig().resolved()
    assert (defaults.dataset, defaults.backbone, defaults.pretrained) == ("miniworld",
                                                                         "MiniCLIP", None)
    assert defaults.model == "vpt_cond" and defaults.batch_size == 16


def test_prompt_learning_beats_zero_shot_on_a_shifted_dataset(offline_root: Path,
                                                               tmp_path: Path) -> None:
    zero_shot = run("zeroshot", "miniworld_sketch", offline_root, tmp_path)
    assert zero_shot["base_acc"] > 5 * 100 / 12 and zero_shot["new_acc"] > 5 * 100 / 12
    coop = run("coop", "miniworld_sketch", offline_root, tmp_path)
    assert coop["base_acc"] > zero_shot["base_acc"] + 2.0
