"""Behaviour on the offline world: MiniCLIP knows the classes; CoOp over-fits its base classes."""

from __future__ import annotations

from pathlib import Path

from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.train import train_and_evaluate


def run(model: str, dataset: str, root: Path, tmp_path: Path, **options) -> dict:
    config = RunConfig(dataset=dataset, model=model, root=str(root), views=2, device="cpu",
                       cache_dir=str(tmp_path / "cache"), out=str(tmp_path / model), **options)
    return train_and_evaluate(config)


def test_defaults_are_the_offline_world() -> None:
    defaults = RunConfig().resolved()
    assert (defaults.dataset, defaults.backbone, defaults.pretrained) == ("miniworld",
                                                                         "MiniCLIP", None)
    assert defaults.model == "vpt_cond" and defaults.batch_size == 16


def test_real_datasets_default_to_the_elbo_with_a_token_scale_residual() -> None:
    """The defaults docs/EVIDENCE.md chose; the reference's optimiser settings stay."""
    eurosat = RunConfig(dataset="eurosat").resolved()
    assert (eurosat.objective, eurosat.residual_scale, eurosat.kl_weight) == ("elbo", 0.02, 1.0)
    assert (eurosat.batch_size, eurosat.lr, eurosat.num_particles, eurosat.epochs) == (
        1, 0.002, 20, 60)


def test_coop_gains_on_base_and_loses_on_new_classes(offline_root: Path, tmp_path: Path) -> None:
    """The world's defining property (docs/OFFLINE_WORLD.md), at one seed and the defaults."""
    zero_shot = run("zeroshot", "miniworld", offline_root, tmp_path)
    chance = 100 / 16
    assert zero_shot["base_acc"] > 4 * chance and zero_shot["new_acc"] > 4 * chance
    coop = run("coop", "miniworld", offline_root, tmp_path)
    assert coop["base_acc"] > zero_shot["base_acc"] + 3.0
    assert coop["new_acc"] < zero_shot["new_acc"] - 2.0
