"""svi_train.py's answers to options, folders and interruptions that used to give silent wrong
numbers, overwritten runs or tracebacks (the fault campaign of issue 10)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import bayesprompt.commands.train
from bayesprompt.clip.factory import load_clip
from bayesprompt.commands.cli import run_main
from bayesprompt.data.datasets import load_dataset
from bayesprompt.data.splits import few_shot
from bayesprompt.runs.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
svi_train = vars(bayesprompt.commands.train)


def run_cli(args: list[str]) -> None:
    run_main(svi_train["main"], args)


def exits_2(args: list[str], capsys) -> str:
    """Run the CLI, check exit code 2 without a traceback, return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


def test_none_means_default_and_zero_is_a_value() -> None:
    config = RunConfig(dataset="miniworld", residual_scale=0.0, epochs=0).resolved()
    assert config.residual_scale == 0.0 and config.epochs == 0
    default = RunConfig(dataset="miniworld").resolved()
    assert default.residual_scale == 0.02 and default.lr == 0.032 and default.batch_size == 16
    assert default.eval_samples == default.num_particles and default.eval_seed == default.seed


@pytest.mark.parametrize("extra, message", [
    (["--shots", "-1"], "--shots must be 0 (all images) or more, got -1"),
    (["--epochs", "-1"], "--epochs must be"),
    (["--batch-size", "-1"], "--batch-size must be 1 or more, got -1"),
    (["--batch-size", "0"], "--batch-size must be 1 or more, got 0"),
    (["--num-particles", "0"], "--num-particles must be 1 or more, got 0"),
    (["--num-particles", "-1"], "--num-particles must be 1 or more, got -1"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--n-ctx", "-3", "--ctx-init", ""], "--n-ctx must be 1 or more, got -3"),
    (["--n-ctx", "100", "--ctx-init", ""], "--n-ctx 100 does not fit"),
    (["--set", "foo=1"], "takes no --set options, got foo"),
])
def test_bad_numbers_and_options_are_refused(extra: list[str], message: str,
                                             run_args: list[str], tmp_path: Path,
                                             capsys) -> None:
    err = exits_2([*run_args, "--model", "coop", *extra], capsys)
    assert message in err
    assert not (tmp_path / "run").exists()


def test_broken_model_files_are_reported(run_args: list[str], tmp_path: Path, capsys) -> None:
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def model(:\n")
    err = exits_2([*run_args, "--model", str(syntax)], capsys)
    assert "syntax.py could not be loaded (line 1): SyntaxError" in err
    failing = tmp_path / "failing.py"
    failing.write_text("import no_such_package_here\n")
    err = exits_2([*run_args, "--model", str(failing)], capsys)
    assert "ModuleNotFoundError" in err and "no_such_package_here" in err


def test_empty_pretrained_means_random_init_on_miniclip() -> None:
    config, _ = svi_train["parse_args"](["--pretrained", ""])
    assert config.pretrained == ""
    assert load_clip("MiniCLIP", config.pretrained).identity.endswith("random-init")
    assert svi_train["parse_args"]([])[0].pretrained is None  # the embedded weights


def test_a_finished_run_without_checkpoint_is_not_overwritten(run_args: list[str],
                                                              tmp_path: Path, capsys) -> None:
    run_cli([*run_args, "--model", "zeroshot"])
    results = (tmp_path / "run/results.json").read_text()
    err = exits_2([*run_args, "--model", "zeroshot"], capsys)
    assert "already holds a run" in err
    exits_2([*run_args, "--model", "coop", "--epochs", "0"], capsys)
    assert (tmp_path / "run/results.json").read_text() == results


def test_resume_accepts_the_same_folder_spelled_differently_or_moved(
        run_args: list[str], tmp_path: Path, capsys) -> None:
    args = [*run_args, "--model", "coop", "--epochs", "1"]
    run_cli(args)
    first = json.loads((tmp_path / "run/results.json").read_text())
    run_cli([*args, "--out", str(tmp_path / "run/../run"), "--resume"])
    shutil.move(tmp_path / "run", tmp_path / "moved")
    run_cli([*args, "--out", str(tmp_path / "moved"), "--resume"])
    moved = json.loads((tmp_path / "moved/results.json").read_text())
    assert moved["base_acc"] == first["base_acc"]
    err = exits_2([*args, "--out", str(tmp_path / "moved"), "--resume", "--seed", "2"], capsys)
    assert "seed: run has 1, now 2" in err


def test_eval_on_typo_is_caught_before_training(run_args: list[str], tmp_path: Path,
                                                capsys) -> None:
    err = exits_2([*run_args, "--model", "coop", "--eval-on", "eurosatt"], capsys)
    assert "Unknown dataset 'eurosatt'" in err
    assert not (tmp_path / "run").exists()


def test_run_folder_records_the_few_shot_lists(run_args: list[str], tmp_path: Path,
                                               eurosat_root: Path) -> None:
    run_cli([*run_args, "--model", "zeroshot", "--shots", "2", "--seed", "3"])
    recorded = json.loads((tmp_path / "run/fewshot.json").read_text())
    expected = few_shot(load_dataset("eurosat", eurosat_root), 2, 3).record()
    assert recorded == expected
    assert len(recorded["train"]) == 20  # all 10 classes: before the base/new subsample
    assert recorded["train"][0][0].count("/") == 1  # as in the split file: Class/file.jpg
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert "sampled" in results["fewshot_source"]


def test_lr_10_with_vpt_cond_stops_with_a_message(run_args: list[str], tmp_path: Path,
                                                  capsys) -> None:
    err = exits_2([*run_args, "--model", "vpt_cond", "--lr", "10"], capsys)
    assert "Training diverged" in err and "(epoch 1) is kept" in err
    assert (tmp_path / "run/checkpoint.pt").is_file()


def test_divergence_through_the_command_line(run_args: list[str], tmp_path: Path,
                                             capsys) -> None:
    err = exits_2([*run_args, "--model", "coop", "--lr", "10000", "--epochs", "4"], capsys)
    assert "diverged" in err and "Lower --lr" in err
    assert not (tmp_path / "run/results.json").exists()
