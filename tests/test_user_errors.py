"""Inputs that used to end in a traceback or a misleading message: a decompression bomb, an
--out that cannot be looked into or is a file, a pickled checkpoint, a non-finite --set
value; and the few-shot source a resumed run reports."""

from __future__ import annotations

import errno
import io
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, write_eurosat
from PIL import Image

import bayesprompt.commands.train
from bayesprompt.commands.cli import run_main
from bayesprompt.data.datasets import load_dataset
from bayesprompt.data.splits import few_shot
from bayesprompt.dual_view import E2MIMOptions
from bayesprompt.errors import UserError
from bayesprompt.inference.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


def train_args(root: Path, out: Path, cache: Path) -> list[str]:
    return ["--dataset", "eurosat", "--root", str(root), "--backbone", TINY_BACKBONE,
            "--pretrained", "", "--shots", "4", "--epochs", "1", "--num-particles", "2",
            "--batch-size", "4", "--views", "1", "--cache-dir", str(cache), "--out", str(out),
            "--device", "cpu", "--precision", "fp32"]


def exit_message(args: list[str], capsys) -> str:
    """svi_train.py's message for arguments that must fail with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(bayesprompt.commands.train.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    return err


def test_a_decompression_bomb_is_one_message(tmp_path: Path) -> None:
    """A 14000 x 14000 image (a 1-bit PNG: 24 MB decoded, small on disk) over Pillow's limit,
    which stays on; in a subprocess, as a user runs it (image workers included)."""
    root = write_eurosat(tmp_path / "data")
    bombs = sorted((root / "eurosat/2750/AnnualCrop").iterdir())
    Image.new("1", (14000, 14000)).save(bombs[0], format="PNG")
    for path in bombs[1:]:
        shutil.copyfile(bombs[0], path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "experiments/svi_train.py",
                           *train_args(root, tmp_path / "run", tmp_path / "cache")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert str(root / "eurosat/2750/AnnualCrop") in message
    assert "Image.MAX_IMAGE_PIXELS" in message
    assert not (tmp_path / "run/config.json").exists()


def test_out_in_a_folder_that_cannot_be_looked_into(eurosat_root: Path, tmp_path: Path,
                                                    monkeypatch, capsys) -> None:
    """As `stat` fails in a folder without search permission (root reads everything, so the
    refusal is simulated)."""
    hidden = tmp_path / "hidden"
    exists = pathlib.Path.exists

    def refusing_exists(self: Path, *args, **kwargs) -> bool:
        if str(self).startswith(str(hidden)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return exists(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "exists", refusing_exists)
    message = exit_message(train_args(eurosat_root, hidden / "run", tmp_path / "cache"), capsys)
    assert str(hidden / "run") in message and "Permission denied" in message


def test_out_in_a_folder_that_cannot_be_written(eurosat_root: Path, tmp_path: Path,
                                                monkeypatch, capsys) -> None:
    locked = tmp_path / "locked"
    mkdir = pathlib.Path.mkdir

    def refusing_mkdir(self: Path, *args, **kwargs) -> None:
        if str(self).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", refusing_mkdir)
    message = exit_message(train_args(eurosat_root, locked / "run", tmp_path / "cache"), capsys)
    assert f"Cannot write {locked / 'run'}" in message


@pytest.mark.parametrize("below", ["", "run"])
def test_out_naming_a_file(below: str, eurosat_root: Path, tmp_path: Path, capsys) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    message = exit_message(train_args(eurosat_root, file / below, tmp_path / "cache"), capsys)
    assert str(file / below) in message and "is an existing file" in message
    assert file.read_text() == "not a folder"


class Payload:
    """Anything that is not a tensor or a plain container."""


class Command:
    """A payload that calls a function when unpickled."""

    def __reduce__(self) -> tuple:
        return (os.system, ("true",))


@pytest.mark.parametrize("payload", [Payload, Command])
def test_a_pickled_checkpoint_is_refused_in_one_paragraph(payload: type, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "payload": payload()}, buffer)
    (tmp_path / "checkpoint.pt").write_bytes(buffer.getvalue())
    with pytest.raises(UserError) as refused:
        load_checkpoint(tmp_path / "checkpoint.pt", {})
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "could run code" in message
    assert "weights_only" not in message and "add_safe_globals" not in message


@pytest.mark.parametrize("value", ["nan", "NaN", float("nan"), float("inf"), "-inf", 10**400])
def test_a_non_finite_float_option_says_it_must_be_finite(value) -> None:
    with pytest.raises(UserError, match="mi_weight= must be a finite number"):
        E2MIMOptions.parse({"mi_weight": value})


def test_the_few_shot_source_is_how_the_set_was_sampled_also_from_the_cache(
        eurosat_root: Path, tmp_path: Path) -> None:
    dataset = load_dataset("eurosat", eurosat_root)
    drawn = few_shot(dataset, 4, 1, tmp_path / "cache")
    again = few_shot(dataset, 4, 1, tmp_path / "cache")
    assert again.source == drawn.source and again.source.startswith("sampled (")
