"""The Python API: train a run or load one, then predict with it and study its posterior.

    import bayesprompt
    run = bayesprompt.fit(dataset="miniworld", model="vpt_cond", epochs=5)
    features, labels = run.test_features("new")
    run.set_classes(run.new.classnames)
    probs = run.predict(features, num_samples=20)           # (S, N, C)
    idata = run.to_inference_data("new")                     # ArviZ, held-out predictions
    train = run.to_inference_data("train")                   # log_likelihood: az.loo(train)

`fit` is `svi_train.py` as a function and writes the same run folder; `Run.load(folder)`
rebuilds a run from that folder, so a fitted run and a loaded one are the same thing. Each
program keeps its parameters in its own param store, so runs live side by side in a notebook.
`Run` is `runs.loaded_run.LoadedRun` (prediction, posterior draws, the datasets) with the
analysis package's views added; this module is the only one below the commands that imports
`bayesprompt.analysis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bayesprompt.errors import UserError
from bayesprompt.runs import checks as api_checks
from bayesprompt.runs.config import RunConfig, default_device, default_precision
from bayesprompt.runs.loaded_run import LoadedRun
from bayesprompt.runs.train import train_and_evaluate

if TYPE_CHECKING:  # the analysis package imports ArviZ (seconds): only when asked for
    from bayesprompt.analysis.posterior import RunPosterior


class Run(LoadedRun):
    """A trained run (see `LoadedRun`), with its posterior as analysis data."""

    def posterior(self, num_samples: int | None = None, splits: Sequence[str] = ("base", "new"),
                  domains: Sequence[str] = (), seed: int | None = None,
                  train: bool = True) -> RunPosterior:
        """Posterior samples on test splits and (`train`) on the training images, the input of
        `bayesprompt.analysis.report`."""
        from bayesprompt.analysis.posterior import posterior_samples
        return posterior_samples(self, num_samples, splits, domains, seed=seed, train=train)


    def to_inference_data(self, split: str = "base", num_samples: int | None = None,
                          seed: int | None = None) -> Any:
        """ArviZ InferenceData of a split: 'train' (the training images the posterior was
        conditioned on, with `log_likelihood` for `az.loo`), or a test split with held-out
        `predictions`: 'base', 'new', or a domain dataset with the training classes
        (docs/ANALYSIS.md lists the groups)."""
        if split == "train":
            posterior = self.posterior(num_samples, [], [], seed, train=True)
            if posterior.train is None:
                raise UserError(f"{self.config.model} has no latent: its predictions were "
                                "conditioned on no training data, so it has no 'train' split.")
            return posterior.train.inference_data()
        own = split in ("base", "new")
        posterior = self.posterior(num_samples, [split] if own else [], [] if own else [split],
                                   seed, train=False)
        if split not in posterior.splits:
            raise UserError(f"{self.folder} has no '{split}' split (it was trained on all "
                            "classes).")
        return posterior.splits[split].inference_data()


def fit(resume: bool = False, **options: Any) -> Run | None:
    """Train and evaluate a run as `svi_train.py` does, and return it.

    `options` are the fields of `bayesprompt.runs.config.RunConfig` (dataset, root, model, backbone,
    pretrained, shots, seed, epochs, num_particles, batch_size, lr, device, out, ...); device
    and precision default as on the command line (CUDA when present; bf16 where it is fast).
    The run folder (`out`, default runs/DATASET/MODEL/...) must not hold a run, unless
    `resume=True` continues it. Under torchrun, ranks other than 0 return None.
    """
    options = api_checks.check_options(RunConfig, options, "bayesprompt.fit")
    options.setdefault("device", default_device())
    options.setdefault("precision", default_precision(options["device"]))
    config = RunConfig(**options).resolved()
    if train_and_evaluate(config, resume=resume) is None:
        return None
    return Run.load(config.out, model=config.model)  # the caller's own choice of model
