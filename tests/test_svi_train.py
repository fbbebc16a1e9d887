"""experiments/svi_train.py end to end, and its answers to bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_eurosat

import bayesprompt.commands.train
from bayesprompt.commands.cli import run_main
from bayesprompt.inference import checkpoint
from bayesprompt.runs.evaluate import new_class_metrics

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "svi_train.py"
svi_train = vars(bayesprompt.commands.train)


def run_cli(args: list[str]) -> None:
    run_main(svi_train["main"], args)


@pytest.mark.parametrize("model", ["zeroshot", "coop", "cocoop", "vpt", "vpt_cond"])
def test_every_model_runs_end_to_end(model: str, run_args: list[str], tmp_path: Path,
                                     capsys) -> None:
    run_cli([*run_args, "--model", model])
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    for key in ("base_acc", "new_acc", "hm"):
        assert 0.0 <= results[key] <= 100.0
    assert 0.0 <= results["new_ece"] <= 1.0 and results["new_nll"] > 0.0
    stochastic = model in ("vpt", "vpt_cond")
    assert (results["mi_auroc_new_vs_base"] is not None) == stochastic
    if stochastic:
        assert 0.0 <= results["mi_auroc_new_vs_base"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == model and config["epochs"] == 2 and config["num_particles"] == 3
    assert (out / "checkpoint.pt").exists() == (model != "zeroshot")
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("base ") and "new " in last_line and "harmonic mean" in last_line


def test_memory_options_change_no_result(run_args: list[str], tmp_path: Path) -> None:
    args = [*run_args, "--model", "vpt_cond", "--precision", "fp32"]
    run_cli([*args, "--out", str(tmp_path / "plain")])
    run_cli([*args, "--out", str(tmp_path / "chunked"), "--prompt-chunk", "2",
             "--grad-checkpointing"])
    plain, chunked = (json.loads((tmp_path / name / "results.json").read_text())
                      for name in ("plain", "chunked"))
    assert chunked["loss_history"] == pytest.approx(plain["loss_history"], rel=1e-5)
    for key in ("base_acc", "new_acc"):
        assert chunked[key] == plain[key]
    config = json.loads((tmp_path / "chunked/config.json").read_text())
    assert config["prompt_chunk"] == 2 and config["grad_checkpointing"] is True


def test_all_classes_has_no_new_split(run_args: list[str], tmp_path: Path) -> None:
    run_cli([*run_args, "--model", "coop", "--subsample", "all"])
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["new_acc"] is None and results["hm"] is None


def test_resume_continues_to_the_same_result(run_args: list[str], tmp_path: Path,
                                             monkeypatch, capsys) -> None:
    args = [*run_args, "--model", "vpt", "--epochs", "3"]
    run_cli([*args, "--out", str(tmp_path / "full")])
    full = json.loads((tmp_path / "full/results.json").read_text())
    with pytest.raises(SystemExit) as exit_info:  # refuses to overwrite a run
        run_cli([*args, "--out", str(tmp_path / "full")])
    assert exit_info.value.code == 2

    save, saved = checkpoint.save_torch, []

    def save_then_stop(path, state):
        save(path, state)
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt  # the run is stopped after its second epoch

    monkeypatch.setattr(checkpoint, "save_torch", save_then_stop)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "Interrupted" in err and "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "run/results.json").exists()
    monkeypatch.setattr(checkpoint, "save_torch", save)
    run_cli([*args, "--resume"])
    resumed = json.loads((tmp_path / "run/results.json").read_text())
    assert resumed["loss_history"] == full["loss_history"]
    for key in ("base_acc", "new_acc", "hm"):
        assert resumed[key] == pytest.approx(full[key])


def bad_input_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    return {
        "missing root": (["--root", str(root / "nowhere")], "looked for the folder"),
        "unknown model": (["--model", "nope"],
                          "Unknown model 'nope'. Known models: cocoop, coop, coop_laplace, e2mim"),
        "unknown dataset": (["--dataset", "nope"], "Unknown dataset 'nope'"),
        "weights offline": (["--backbone", "RN50", "--pretrained", "openai"],
                            "pass --pretrained /path/to/checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing root", "unknown model", "unknown dataset",
                                  "weights offline"])
def test_bad_input_exits_2_with_a_message(case: str, run_args: list[str], tmp_path: Path,
                                          capsys) -> None:
    extra, message = bad_input_cases(tmp_path)[case]
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*run_args, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_split_file_and_corrupt_image(run_args: list[str], tmp_path: Path,
                                              capsys) -> None:
    root = write_eurosat(tmp_path / "data", per_class=(2, 1, 1))
    args = [*run_args, "--root", str(root), "--shots", "0"]
    (root / "eurosat/2750/Forest/Forest_0.jpg").write_bytes(b"broken")
    with pytest.raises(SystemExit):
        run_cli(args)
    assert "Forest_0.jpg" in capsys.readouterr().err
    (root / "eurosat/split_zhou_EuroSAT.json").unlink()
    with pytest.raises(SystemExit):
        run_cli(args)
    assert "split_zhou_EuroSAT.json" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused(run_args: list[str], tmp_path: Path,
                                                capsys) -> None:
    run_cli([*run_args, "--model", "vpt"])
    config = json.loads((tmp_path / "run/config.json").read_text())
    config["model"] = "vpt_cond"
    (tmp_path / "run/config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*run_args, "--model", "vpt_cond", "--resume"])
    assert exit_info.value.code == 2
    assert "belongs to another run" in capsys.readouterr().err


def test_real_process_exit_code_and_no_traceback(run_args: list[str]) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *run_args, "--model", "nope"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert "Unknown model 'nope'" in done.stderr and "Traceback" not in done.stderr


def test_cross_dataset_and_domain_evaluation(run_args: list[str], tmp_path: Path,
                                             eurosat_root: Path, capsys) -> None:
    target = tmp_path / "target"
    shutil.copytree(eurosat_root / "eurosat/2750", target / "images")
    run_cli([*run_args, "--model", "coop", "--subsample", "all", "--eval-on", str(target)])
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert set(results["transfer_acc"]) == {str(target)}
    assert 0.0 <= results["transfer_acc"][str(target)] <= 100.0
    assert f"{target}: " in capsys.readouterr().out


def test_new_class_metrics_of_known_probabilities() -> None:
    # base images: identical samples (no mutual information); new: samples that disagree
    base = torch.tensor([[[0.9, 0.1]], [[0.9, 0.1]]]).expand(2, 3, 2)          # (S, N, C)
    new = torch.tensor([[[0.8, 0.2], [0.2, 0.8]], [[0.6, 0.4], [0.4, 0.6]]])    # (S=2, N=2, C)
    labels = torch.tensor([0, 0])
    program = SimpleNamespace(stochastic=True)
    metrics = new_class_metrics(program, base, new, labels)
    # predictive mean on new: [0.7, 0.3] (right, confidence 0.7), [0.3, 0.7] (wrong, 0.7)
    assert metrics["new_nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert metrics["new_ece"] == pytest.approx(abs(0.5 - 0.7))
    assert metrics["mi_auroc_new_vs_base"] == pytest.approx(1.0)
    program.stochastic = False
    assert new_class_metrics(program, base, new, labels)["mi_auroc_new_vs_base"] is None
