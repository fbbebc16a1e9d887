"""The command line generated from RunConfig: every field is an option, --config re-runs a
saved run, and bad values or files exit with code 2 and one clear message."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

import bayesprompt.commands.train
from bayesprompt.commands.cli import flag, run_main
from bayesprompt.options import field_type
from bayesprompt.runs.config import RunConfig

svi_train = vars(bayesprompt.commands.train)
parse_args = svi_train["parse_args"]


def other_value(name: str) -> tuple[list[str], object]:
    """Command-line arguments that set field `name` to a value other than its default, and
    that value."""
    item = next(f for f in fields(RunConfig) if f.name == name)
    kind, _ = field_type(RunConfig, name)
    choices = item.metadata.get("choices")
    if choices:
        value = next(c for c in choices if c != item.default)
        return [flag(name), value], value
    if kind is bool:
        return [flag(name)], True
    if kind is list:
        return [flag(name), "first", "second item"], ["first", "second item"]
    if kind is dict:
        return ["--set", "alpha=1", "--set", "beta=text"], {"alpha": 1, "beta": "text"}
    value = {str: f"value of {name}", int: 7, float: 0.25}[kind]
    return [flag(name), str(value)], value


@pytest.mark.parametrize("name", [f.name for f in fields(RunConfig)])
def test_every_field_is_an_option_that_lands_in_the_config(name: str) -> None:
    args, value = other_value(name)
    config, resume = parse_args(args)
    assert getattr(config, name) == value and not resume
    default, _ = parse_args([])
    assert getattr(default, name) != value
    others = [f.name for f in fields(RunConfig) if f.name not in (name, "precision")]
    assert all(getattr(config, n) == getattr(default, n) for n in others)


def test_every_field_has_help_and_optional_ones_say_their_default(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for item in fields(RunConfig):
        assert item.metadata["help"], item.name
        spelling = "--set KEY=VALUE" if item.name == "options" else flag(item.name)
        assert spelling in text
        if field_type(RunConfig, item.name)[1]:
            assert "default" in item.metadata["help"], item.name
    assert "--grad-checkpointing, --no-grad-checkpointing" in text
    assert "one of " in text and "vpt_cond" in text and "eurosat" in text  # filled lists


def test_none_and_flags_and_lists() -> None:
    config, _ = parse_args(["--epochs", "none", "--pretrained", "none", "--eval-on"])
    assert config.epochs is None and config.pretrained is None and config.eval_on == []
    config, _ = parse_args(["--grad-checkpointing", "--no-grad-checkpointing"])
    assert config.grad_checkpointing is False


@pytest.mark.parametrize("args, message", [
    (["--epochs", "many"], "argument --epochs: epochs takes an integer (or none, for the "
                           "default), not 'many'"),
    (["--lr", "fast"], "argument --lr: lr takes a number"),
    (["--objective", "mle"], "argument --objective: invalid choice: 'mle'"),
    (["--num-part", "3"], "unrecognized arguments: --num-part"),
])
def test_bad_values_exit_2(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_main(svi_train["main"], args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def exit_message(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_main(svi_train["main"], args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_saved_run_is_re_run_from_its_config(run_args: list[str], tmp_path: Path) -> None:
    run_main(svi_train["main"], [*run_args, "--model", "vpt", "--eval-samples", "5"])
    first = tmp_path / "run"
    config_file = first / "config.json"
    run_main(svi_train["main"], ["--config", str(config_file), "--out", str(tmp_path / "again")])
    results = [json.loads((folder / "results.json").read_text())
               for folder in (first, tmp_path / "again")]
    for key in ("base_acc", "new_acc", "new_ece", "new_nll", "loss_history"):
        assert results[1][key] == results[0][key]
    saved = json.loads(config_file.read_text())
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: v for k, v in again.items() if k != "out"} == \
        {k: v for k, v in saved.items() if k != "out"}

    # flags override the file; values equal to their default there follow the flags again
    config, _ = parse_args(["--config", str(first), "--seed", "2", "--epochs", "3"])
    assert config.seed == 2 and config.epochs == 3 and config.model == "vpt"
    assert config.eval_seed is None and config.eval_samples == 5  # 5 was chosen, not derived
    assert config.num_particles == 3 and config.out == str(first)  # --out was given there
    assert config.resolved().eval_seed == 2


def test_bad_config_files_are_refused(run_args: list[str], tmp_path: Path, capsys) -> None:
    saved = {"dataset": "eurosat", "epochs": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**saved, "learning_rate": 0.1, "warmup": 2}))
    err = exit_message(["--config", str(path)], capsys)
    assert f"{path} has keys that are not options of this version" in err
    assert "learning_rate, warmup" in err
    path.write_text(json.dumps({**saved, "epochs": "two"}))
    assert "epochs takes an integer or null, not \"two\"" in exit_message(
        ["--config", str(path)], capsys)
    path.write_text('{"dataset": ')
    assert f"Cannot read {path}" in exit_message(["--config", str(path)], capsys)
    missing = tmp_path / "nowhere" / "config.json"
    assert f"{missing} does not exist" in exit_message(["--config", str(missing)], capsys)
