"""Deep ensembles (Lakshminarayanan et al., 2017): M finished runs as one predictive.

    ensemble = bayesprompt.Ensemble.load(["runs/.../seed1", "runs/.../seed4", ...])
    features, labels = ensemble.test_features("new")
    ensemble.set_classes(ensemble.new.classnames)
    probs = ensemble.predict(features)          # (S, N, C), S = M for point-estimate members

Each member predicts as `Run.predict` (its own eval_samples and eval_seed); the draws are
concatenated, so the predictive mean is the uniform mixture of the members when they give the
same S. The members must be runs of one dataset, class split and backbone; in the benchmark
(`--ensemble M`) they differ in their seed, which also draws their few-shot images: an
ensemble of M members has seen up to M times as many training images as one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bayesprompt.data.datasets import Dataset
from bayesprompt.errors import UserError
from bayesprompt.files import read_json
from bayesprompt.metrics import accuracy, harmonic_mean
from bayesprompt.runs.evaluate import new_class_metrics
from bayesprompt.runs.loaded_run import LoadedRun
from bayesprompt.selective import results_entries


class Ensemble:
    """Runs of one dataset and backbone, predicting together; the API of `Run.predict`."""

    def __init__(self, runs: Sequence[LoadedRun]) -> None:
        if not runs:
            raise UserError("An ensemble needs at least one run.")
        first = runs[0]
        for run in runs[1:]:
            same = (run.config.dataset == first.config.dataset
                    and run.base.classnames == first.base.classnames
                    and run.clip.identity == first.clip.identity)
            if not same:
                raise UserError(f"{run.folder} is not a run of the dataset, classes and backbone "
                                f"of {first.folder}: an ensemble combines runs of one setting.")
        self.runs = list(runs)

    @classmethod
    def load(cls, folders: Sequence[str | Path], device: str | None = None) -> Ensemble:
        """The runs in `folders`, each as `Run.load`."""
        return cls([LoadedRun.load(folder, device) for folder in folders])

    @classmethod
    def load_folder(cls, folder: str | Path, device: str | None = None) -> Ensemble:
        """The ensemble whose results.json (written by benchmark.py --ensemble) is in
        `folder`: its `members`."""
        results = read_json(Path(folder) / "results.json", "an ensemble's results")
        if "members" not in results:
            raise UserError(f"{folder} holds no ensemble: its results.json lists no members.")
        return cls.load(results["members"], device)

    def __repr__(self) -> str:
        return f"Ensemble({len(self.runs)} runs of {self.runs[0].config.model!r})"

    @property
    def stochastic(self) -> bool:
        """More than one draw per image: several members (or stochastic ones)."""
        return len(self.runs) > 1 or self.runs[0].program.stochastic

    @property
    def base(self) -> Dataset:
        return self.runs[0].base

    @property
    def new(self) -> Dataset | None:
        return self.runs[0].new

    @property
    def classnames(self) -> list[str]:
        return self.runs[0].classnames

    def dataset(self, split: str) -> Dataset:
        """'base', 'new', or a dataset name (as `Run.dataset`)."""
        return self.runs[0].dataset(split)

    def set_classes(self, classnames: Sequence[str]) -> None:
        for run in self.runs:
            run.set_classes(classnames)

    def test_features(self, split: str = "base") -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (N, D) and labels (N,) of a split (one backbone: the first run's)."""
        return self.runs[0].test_features(split)

    def predict(self, image_features: torch.Tensor, num_samples: int | None = None,
                seed: int | None = None) -> torch.Tensor:
        """Class probabilities (sum_m S_m, N, C): each member's `Run.predict`, concatenated."""
        return torch.cat([run.predict(image_features, num_samples, seed) for run in self.runs])


def ensemble_results(folders: Sequence[str | Path], device: str | None = None) -> dict:
    """results.json's evaluation keys for the ensemble of the runs in `folders`: base and new
    accuracy, HM, the new-class metrics, `transfer_acc` on the members' eval_on datasets, the
    selective-prediction metrics (bayesprompt.selective), `train_seconds` (summed over the
    members) and `members`."""
    ensemble = Ensemble.load(folders, device)
    first = ensemble.runs[0]

    def evaluate(split: str) -> tuple[float, torch.Tensor, torch.Tensor]:
        ensemble.set_classes(first.dataset(split).classnames)
        features, labels = ensemble.test_features(split)
        probs = ensemble.predict(features)
        return accuracy(probs, labels), probs, labels

    base_acc, base_probs, base_labels = evaluate("base")
    splits = {"base": (base_probs, base_labels)}
    new_acc, metrics = None, {"new_ece": None, "new_nll": None, "mi_auroc_new_vs_base": None}
    if ensemble.new is not None:
        new_acc, new_probs, new_labels = evaluate("new")
        metrics = new_class_metrics(ensemble, base_probs, new_probs, new_labels)
        splits["new"] = (new_probs, new_labels)
    transfer = {}
    for name in first.config.eval_on:
        transfer[name], probs, labels = evaluate(name)
        splits[name] = (probs, labels)
    members = [run.results for run in ensemble.runs]
    return {"base_acc": base_acc, "new_acc": new_acc,
            "hm": harmonic_mean(base_acc, new_acc) if new_acc is not None else None,
            **metrics, "transfer_acc": transfer, **results_entries(splits),
            "dataset": first.config.dataset, "model": first.config.model,
            "seed": first.config.seed, "ensemble_size": len(ensemble.runs),
            "members": [str(run.folder) for run in ensemble.runs],
            "train_seconds": round(sum(r["train_seconds"] for r in members), 2)}
