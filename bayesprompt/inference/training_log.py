"""Training logs of a run folder: `metrics.jsonl`, TensorBoard events and the loss curve.

`metrics.jsonl` holds one JSON object per line: a "step" row every `log_every` SVI steps and an
"epoch" row after every epoch. A row averages the steps since the previous row (step rows) or
the epoch (epoch rows), each step weighted by its images:

    kind              "step" or "epoch"
    epoch             the epoch the steps belong to (1 = the first)
    step              SVI steps taken since the start of training (global)
    images            training images seen since the start of training
    loss              the objective minimised, per image; = nll + kl + sum(factors)
    nll               expected negative log-likelihood of the labels (the `y` site)
    kl                the latent sites' term as it enters the loss (ELBO: E_q[log q - log p],
                      -log prior for a point estimate; --objective paper: 0.001 * KL; other
                      --elbo choices: `elbos.split_terms`, NaN where there is no split)
    factors           {name: term} of each `pyro.factor` of the model, as it enters the loss
                      (0 in steps where the model did not add it)
    lr                the learning rate of the reference SGD (None if it holds no parameter)
    group_lr          {prefix: learning rate} of each optimizer group (e.g. E2MIM's critic)
    latent            ELBO: {site: {kl_prior, contraction}}: the site's share of `kl` (its
                      KL to the prior per image) and the guide's sd / the prior's sd, mean
    posterior_scale   {site: {mean, min, max}} of the guide's standard deviation over the
                      steps, particles, images and dimensions (non-Delta guides only)
    seconds           since the start of training (a resumed run continues the count)
    interval_seconds  the time the row's steps took

Values accumulate as tensors on the training device; they are copied to the host only when a
row is written. Under torchrun every rank adds its share-weighted terms and rank 0 writes.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bayesprompt import distributed
from bayesprompt.errors import UserError
from bayesprompt.files import atomic_write

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from bayesprompt.inference.objectives import ObjectiveTerms

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
#: The statistics of `latent`, in the order of `ObjectiveTerms.latent`.
LATENT_STATISTICS = ("kl_prior", "contraction")
#: The statistics of `posterior_scale`, in the order of `ObjectiveTerms.posterior_scale`.
SCALE_STATISTICS = ("mean", "min", "max")


def check_tensorboard() -> None:
    """Refuse --tensorboard when the `tensorboard` package is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "--tensorboard needs the `tensorboard` package, which is not installed in this "
            "Python environment. Install it with `pip install tensorboard` (or "
            "`pip install 'bayesprompt[tensorboard]'`), or train without --tensorboard: "
            "metrics.jsonl in the run folder holds the same values."
        )


class RunningMeans:
    """Image-weighted sums of a span of steps' named scalars, kept as tensors on their device
    (no host synchronisation until `summary`), with the minima and maxima of `min`/`max`
    statistics."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.minima: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.images = 0

    def add(self, loss: torch.Tensor, terms: ObjectiveTerms, share: float, images: int
            ) -> None:
        """One step: this rank's loss and terms on its part of a global batch of `images`
        images, weighted by its `share` of the batch (1 in one process)."""
        weight = share * images
        values = {"loss": loss, "nll": terms.nll, "kl": terms.kl,
                  **{f"factors/{name}": value for name, value in terms.factors.items()},
                  **{f"posterior_scale/{site}/mean": scale[0]
                     for site, scale in terms.posterior_scale.items()},
                  **{f"latent/{site}/{name}": value[i]
                     for site, value in terms.latent.items()
                     for i, name in enumerate(LATENT_STATISTICS)}}
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + weight * value.detach().double()
        if share > 0:  # a rank left without an image ran on a stand-in image
            for site, scale in terms.posterior_scale.items():
                low, high = f"posterior_scale/{site}/min", f"posterior_scale/{site}/max"
                self.minima[low] = torch.minimum(self.minima.get(low, scale[1]), scale[1])
                self.maxima[high] = torch.maximum(self.maxima.get(high, scale[2]), scale[2])
        self.images += images

    def summary(self) -> dict[str, float]:
        """name -> mean (sums) or extreme over the span and every rank; collective under
        torchrun (call on every rank)."""
        sums = distributed.reduce_named(self.sums, "sum")
        minima = distributed.reduce_named(self.minima, "min")
        maxima = distributed.reduce_named(self.maxima, "max")
        names = [*sums, *minima, *maxima]
        if not names:
            return {}
        values = [*(v / max(self.images, 1) for v in sums.values()), *minima.values(),
                  *maxima.values()]
        host = torch.stack([v.to(torch.float64) for v in values]).cpu()  # one copy
        return dict(zip(names, host.tolist(), strict=True))


def row_from_summary(summary: dict[str, float]) -> dict[str, Any]:
    """The nested loss, nll, kl, factors and posterior_scale fields of a row."""
    row: dict[str, Any] = {"loss": summary["loss"], "nll": summary["nll"], "kl": summary["kl"],
                           "factors": {}, "posterior_scale": {}, "latent": {}}
    for name, value in sorted(summary.items()):
        group, _, rest = name.partition("/")
        if group == "factors":
            row["factors"][rest] = value
        elif group == "latent":
            site, statistic = rest.rsplit("/", 1)
            row["latent"].setdefault(site, {})[statistic] = value
        elif group == "posterior_scale":
            site, statistic = rest.rsplit("/", 1)
            row["posterior_scale"].setdefault(site, {})[statistic] = value
    for site, statistics in row["posterior_scale"].items():
        row["posterior_scale"][site] = {k: statistics[k] for k in SCALE_STATISTICS}
    return row


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a metrics.jsonl, in order; a torn last line (a crash while it was
    written) and anything after it are left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def scalar_tags(row: dict) -> dict[str, float]:
    """A row's scalars as TensorBoard tags: `<kind>/loss`, `<kind>/factors/mi`,
    `<kind>/posterior_scale/r/mean`, `<kind>/lr`, `<kind>/lr/critic`, ..."""
    kind = row["kind"]
    tags = {f"{kind}/{name}": row[name] for name in ("loss", "nll", "kl")}
    tags.update({f"{kind}/factors/{name}": v for name, v in row["factors"].items()})
    if row["lr"] is not None:
        tags[f"{kind}/lr"] = row["lr"]
    tags.update({f"{kind}/lr/{prefix}": v for prefix, v in row["group_lr"].items()})
    tags.update({f"{kind}/latent/{site}/{k}": v for site, statistics in
                 row.get("latent", {}).items() for k, v in statistics.items()})
    tags.update({f"{kind}/posterior_scale/{site}/{k}": v
                 for site, statistics in row["posterior_scale"].items()
                 for k, v in statistics.items()})
    return tags


class TrainingLog:
    """The metrics.jsonl (and, with `tensorboard`, the TensorBoard events) of a run folder.

    `infer.train` calls `start` once, `add` after every step, `write` for each row and
    `close` at the end; every rank calls them (rows are collective under torchrun), rank 0
    alone writes files. `log_every` 0: epoch rows only.
    """

    def __init__(self, folder: Path | str, log_every: int = 50, tensorboard: bool = False
                 ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / METRICS_FILE
        self.log_every = log_every
        self.tensorboard = tensorboard
        self.writer: SummaryWriter | None = None
        self.interval = RunningMeans()
        self.epoch = RunningMeans()
        self.step = 0
        self.images = 0
        self.seconds_before = 0.0
        self.started = self.interval_started = self.epoch_started = time.perf_counter()

    def start(self, finished_epochs: int, steps_per_epoch: int, dataset_size: int) -> None:
        """Begin a new log, or continue one after `finished_epochs` epochs (resume): rows of
        later epochs, written before an interruption, are dropped (the file rewritten
        atomically) and the seconds count continues from the last row kept."""
        self.step = finished_epochs * steps_per_epoch
        self.images = finished_epochs * dataset_size
        if distributed.is_main_process():
            kept = [row for row in read_rows(self.path) if row.get("epoch", 0) <= finished_epochs
                    ] if finished_epochs else []
            text = "".join(json.dumps(row) + "\n" for row in kept)
            atomic_write(self.path, lambda temporary: temporary.write_text(text))
            self.seconds_before = kept[-1].get("seconds", 0.0) if kept else 0.0
            if self.tensorboard:
                check_tensorboard()
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.folder / TENSORBOARD_FOLDER),
                                            purge_step=self.step + 1 if self.step else None)
        self.started = self.interval_started = self.epoch_started = time.perf_counter()

    def add(self, loss: torch.Tensor, terms: ObjectiveTerms, share: float, images: int
            ) -> None:
        """One SVI step of a global batch of `images` images: this rank's loss and terms on
        its slice, and the slice's share of the batch."""
        self.step += 1
        self.images += images
        self.interval.add(loss, terms, share, images)
        self.epoch.add(loss, terms, share, images)

    def step_row_due(self) -> bool:
        return self.log_every > 0 and self.step % self.log_every == 0

    def write(self, kind: str, epoch: int, lr: float | None, group_lr: dict[str, float]
              ) -> None:
        """Write a "step" row (the steps since the previous row) or an "epoch" row (the epoch
        `epoch`, 1-based) with the learning rates in effect; collective under torchrun."""
        span = self.interval if kind == "step" else self.epoch
        since = self.interval_started if kind == "step" else self.epoch_started
        summary = span.summary()
        now = time.perf_counter()
        self.interval, self.interval_started = RunningMeans(), now
        if kind == "epoch":
            self.epoch, self.epoch_started = RunningMeans(), now
        if not distributed.is_main_process() or not summary:
            return
        row = {"kind": kind, "epoch": epoch, "step": self.step, "images": self.images,
               **row_from_summary(summary), "lr": lr, "group_lr": dict(group_lr),
               "seconds": round(self.seconds_before + now - self.started, 3),
               "interval_seconds": round(now - since, 3)}
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for tag, value in scalar_tags(row).items():
                self.writer.add_scalar(tag, value, self.step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


