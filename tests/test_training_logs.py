"""Training logs: the split of the objective, metrics.jsonl, TensorBoard events, loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_models import CLASSES, separable_features
from test_svi_train import run_cli

import bayesprompt.inference.loss_curve as loss_curve
import bayesprompt.inference.training_log as training_log
from bayesprompt.dual_view import E2MIMOptions
from bayesprompt.inference.objectives import make_objective
from bayesprompt.program.base import PromptConfig
from bayesprompt.program.priors import isotropic_normal
from bayesprompt.runs.model_files import load_model_class

SECONDS = ("seconds", "interval_seconds")


def rows_of(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in SECONDS} for row in rows]


@pytest.mark.parametrize("objective", ["elbo", "paper"])
@pytest.mark.parametrize("model", ["vpt", "vpt_cond", "coop", "e2mim"])
def test_the_terms_add_up_to_the_loss_of_the_step(model, objective, tiny_clip) -> None:
    torch.manual_seed(0)
    program = load_model_class(model)(tiny_clip, CLASSES, PromptConfig())
    features, labels = separable_features(tiny_clip, per_class=2)
    loss_of = make_objective(program, objective, 3)
    loss = loss_of(features[0], labels, 50)
    terms = loss_of.terms
    total = terms.nll + terms.kl + sum(terms.factors.values())
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-6)
    assert terms.nll > 0
    assert set(terms.factors) == ({"mi", "mixup"} if model == "e2mim" else set())
    assert set(terms.posterior_scale) == ({"r"} if model.startswith("vpt") else set())
    if model == "vpt":  # the guide's scale exp(0.5 r_log_var), the same for every particle
        scale = torch.exp(0.5 * program.learned_parameters()["r_log_var"]).detach()
        torch.testing.assert_close(terms.posterior_scale["r"],
                                   torch.stack([scale.mean(), scale.min(), scale.max()]))
    if model == "coop":  # the MAP regulariser -log p(ctx) / N, or no KL term in "paper"
        prior = isotropic_normal(torch.zeros_like(program.init_ctx), 1.0, 2)
        expected = -prior.log_prob(program.learned_parameters()["ctx_map"]).detach() / 50
        torch.testing.assert_close(terms.kl, expected if objective == "elbo"
                                   else torch.zeros(()))


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> (step, value) of every scalar event TensorBoard reads from RUN/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def assert_events_hold_the_rows(run: Path, rows: list[dict]) -> None:
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in training_log.scalar_tags(row).items():
            expected.setdefault(tag, []).append((row["step"], value))
    logged = tensorboard_scalars(run)
    assert logged.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in logged[tag]] == [step for step, _ in points], tag
        assert [value for _, value in logged[tag]] == pytest.approx(
            [value for _, value in points], rel=1e-6), tag


def test_an_interrupted_run_resumes_to_the_same_metrics(run_args: list[str], tmp_path: Path,
                                                        monkeypatch) -> None:
    # 20 images in batches of 4: 5 steps an epoch; a step row every 2 steps, so step rows
    # start after epoch rows and an epoch's last step is in its epoch row only
    args = [*run_args, "--model", "vpt", "--epochs", "3", "--log-every", "2", "--tensorboard"]
    run_cli([*args, "--out", str(tmp_path / "full")])
    full = rows_of(tmp_path / "full")
    results = json.loads((tmp_path / "full/results.json").read_text())
    assert [(row["kind"], row["epoch"], row["step"]) for row in full[:5]] == [
        ("step", 1, 2), ("step", 1, 4), ("epoch", 1, 5), ("step", 2, 6), ("step", 2, 8)]
    epochs = [row for row in full if row["kind"] == "epoch"]
    assert [row["loss"] for row in epochs] == pytest.approx(results["loss_history"], rel=1e-6)
    assert [row["images"] for row in epochs] == [20, 40, 60]
    for row in full:
        assert row["loss"] == pytest.approx(row["nll"] + row["kl"], rel=1e-5)
        scale = row["posterior_scale"]["r"]
        assert 0 < scale["min"] <= scale["mean"] <= scale["max"]
    assert epochs[0]["lr"] == 1e-5 and epochs[1]["lr"] > epochs[2]["lr"] > 0  # warm-up, cosine
    assert all(b["seconds"] >= a["seconds"] for a, b in zip(full, full[1:], strict=False))

    write = training_log.TrainingLog.write

    def write_then_stop(self, kind, epoch, *rates):
        write(self, kind, epoch, *rates)
        if (kind, epoch) == ("step", 2):
            raise KeyboardInterrupt  # in epoch 2, after its first step row

    monkeypatch.setattr(training_log.TrainingLog, "write", write_then_stop)
    with pytest.raises(SystemExit):
        run_cli(args)
    written = rows_of(tmp_path / "run")
    assert written[-1]["epoch"] == 2  # a row of the unfinished epoch, to be dropped
    with (tmp_path / "run/metrics.jsonl").open("a") as file:
        file.write('{"kind": "step", "epo')  # and a line torn by a crash
    monkeypatch.setattr(training_log.TrainingLog, "write", write)
    run_cli([*args, "--resume"])
    resumed = rows_of(tmp_path / "run")
    assert without_seconds(resumed) == without_seconds(full)
    assert_events_hold_the_rows(tmp_path / "run", resumed)  # epoch 2's first events purged
    assert resumed[3]["seconds"] >= resumed[2]["seconds"]  # the count continues
    assert (tmp_path / "run/loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_hold_the_rows(run_args: list[str], tmp_path: Path) -> None:
    run_cli([*run_args, "--model", "e2mim", "--log-every", "1", "--tensorboard"])
    rows = rows_of(tmp_path / "run")
    results = json.loads((tmp_path / "run/results.json").read_text())
    epochs = [row for row in rows if row["kind"] == "epoch"]
    for number, row in enumerate(epochs):
        steps = [r for r in rows if r["kind"] == "step" and r["epoch"] == row["epoch"]]
        images = [r["images"] - (number * 20 if i == 0 else steps[i - 1]["images"])
                  for i, r in enumerate(steps)]
        for key in ("loss", "nll", "kl"):  # the epoch row: images-weighted mean of its steps
            mean = sum(n * r[key] for n, r in zip(images, steps, strict=True)) / sum(images)
            assert row[key] == pytest.approx(mean, rel=1e-5)
        # each factor enters the loss as minus its mean value (factor_history)
        for name in ("mi", "mixup"):
            assert row["factors"][name] == pytest.approx(
                -results["factor_history"][name][number], rel=1e-5, abs=1e-7)
        assert row["loss"] == pytest.approx(
            row["nll"] + row["kl"] + sum(row["factors"].values()), rel=1e-5)
        assert row["group_lr"] == {"critic": E2MIMOptions().critic_lr}
        assert row["posterior_scale"] == {}

    assert {"step/loss", "step/nll", "step/kl", "step/factors/mi", "step/factors/mixup",
            "step/lr", "step/lr/critic", "epoch/loss", "epoch/factors/mi"} <= \
        tensorboard_scalars(tmp_path / "run").keys()
    assert_events_hold_the_rows(tmp_path / "run", rows)


def test_tensorboard_without_the_package_says_how_to_install_it(run_args: list[str],
                                                                monkeypatch, capsys) -> None:
    find_spec = training_log.importlib.util.find_spec
    monkeypatch.setattr(training_log.importlib.util, "find_spec",
                        lambda name: None if name == "tensorboard" else find_spec(name))
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*run_args, "--tensorboard"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install tensorboard" in err and "Traceback" not in err


def test_log_every_must_not_be_negative(run_args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*run_args, "--log-every", "-1"])
    assert exit_info.value.code == 2
    assert "--log-every must be 0" in capsys.readouterr().err


@pytest.mark.parametrize("kinds", [("step",) * 3, ("epoch",) * 3])
def test_the_loss_curve_of_one_kind_of_row(kinds, tmp_path: Path) -> None:
    # step rows only: a crash in the first epoch; epoch rows only: --log-every 0
    rows = [{"kind": kind, "epoch": 1 + i * (kind == "epoch"), "step": 2 * (i + 1),
             "images": 8 * (i + 1), "loss": 2.0 - i, "nll": 1.5 - i, "kl": 0.5, "factors": {},
             "lr": 0.01, "group_lr": {}, "posterior_scale": {"r": {"mean": 1, "min": 0.5,
                                                                  "max": 2}}}
            for i, kind in enumerate(kinds)]
    (tmp_path / training_log.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert loss_curve.write_loss_curve(tmp_path) == tmp_path / loss_curve.LOSS_CURVE_FILE
    assert (tmp_path / loss_curve.LOSS_CURVE_FILE).read_bytes()[:4] == b"\x89PNG"
    (tmp_path / training_log.METRICS_FILE).write_text("")
    assert loss_curve.write_loss_curve(tmp_path) is None  # no rows, no curve
