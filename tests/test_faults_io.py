"""Faults of files, caches and inputs: full or read-only disks, concurrent first use, damaged
caches and config files, bad datasets and backbones. Each ends in a correct result or one clear
message (exit code 2 on the command line), never a traceback and never a silent wrong result.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bayesprompt.analysis.inference_data import (
    load_inference_data,
    save_inference_data,
    to_inference_data,
)
from conftest import TINY_BACKBONE
from PIL import Image

import bayesprompt.commands.analyze
import bayesprompt.commands.train
import bayesprompt.files as files
from bayesprompt.clip.factory import load_clip
from bayesprompt.commands.cli import run_main
from bayesprompt.data.datasets import load_dataset
from bayesprompt.data.features import cache_key, cached_features, checksum
from bayesprompt.errors import UserError
from bayesprompt.files import atomic_write, read_json, write_json

REPO = Path(__file__).resolve().parent.parent
svi_train = vars(bayesprompt.commands.train)
analyze = vars(bayesprompt.commands.analyze)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def small_inference_data(n_images: int = 4):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(2, n_images))
    return to_inference_data({"ctx": rng.normal(size=(2, 2, 4))}, probs.argmax(-1), probs,
                             np.arange(n_images) % 3, ["a", "b", "c"], held_out=False)


# --- the atomic writer ---------------------------------------------------------------------

def test_disk_full_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    monkeypatch.setattr(files.os, "fsync", enospc)
    with pytest.raises(UserError, match=f"No space left.*{target}.*intact"):
        write_json(target, {"accuracy": 0.9})

    def half_then_full(temporary: Path) -> None:
        temporary.write_text('{"accur')
        enospc()

    with pytest.raises(UserError, match="No space left"):
        atomic_write(target, half_then_full)
    assert read_json(target, "metrics") == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_unwritable_folder_is_a_user_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match="Cannot write .*--out, --cache-dir or --root"):
        write_json(tmp_path / "results.json", {})
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_with_delayed_renames_both_succeed(tmp_path, monkeypatch):
    replace = os.replace

    def slow_replace(source, destination):
        time.sleep(0.2)  # both temporaries exist at once before either is renamed
        replace(source, destination)

    monkeypatch.setattr(files.os, "replace", slow_replace)
    target, errors = tmp_path / "features.pt", []

    def write(payload: bytes) -> None:
        try:
            files.write_bytes(target, payload)
        except Exception as error:  # noqa: BLE001 - the test reports any failure
            errors.append(error)

    threads = [threading.Thread(target=write, args=(bytes([i]) * 4096,)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in (bytes([1]) * 4096, bytes([2]) * 4096)
    assert [p.name for p in tmp_path.iterdir()] == ["features.pt"]


def test_written_files_follow_the_umask(tmp_path, umask_022):
    write_json(tmp_path / "a.json", {})
    save_inference_data(small_inference_data(), tmp_path / "posterior.nc")
    assert mode(tmp_path / "a.json") == 0o644
    assert mode(tmp_path / "posterior.nc") == 0o644


def test_netcdf_on_a_full_disk_is_a_user_error_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "posterior_base.nc"
    save_inference_data(small_inference_data(4), target)
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: free._replace(free=1000))
    with pytest.raises(UserError, match=f"No space left.*{target}"):
        save_inference_data(small_inference_data(6), target)
    monkeypatch.undo()
    monkeypatch.setattr(type(small_inference_data()), "to_netcdf", enospc)
    with pytest.raises(UserError, match="No space left"):
        save_inference_data(small_inference_data(6), target)
    assert load_inference_data(target).observed_data["y"].sizes["image"] == 4
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# --- the feature cache ---------------------------------------------------------------------

def test_feature_cache_key_covers_the_backbone_config_content(eurosat_root, tmp_path):
    config = json.loads(Path(TINY_BACKBONE).read_text())
    wider = {**config, "text_cfg": {**config["text_cfg"], "layers": 1}}
    for folder, content in (("a", config), ("b", wider)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tiny.json").write_text(json.dumps(content))
    same_name = [load_clip(str(tmp_path / folder / "tiny.json")) for folder in ("a", "b")]
    items = load_dataset("eurosat", eurosat_root).test[:2]
    keys = {cache_key(clip, items, 0, 0, 0.08) for clip in same_name}
    assert len(keys) == 2


def test_feature_cache_key_covers_the_precision(tiny_clip, eurosat_root):
    items = load_dataset("eurosat", eurosat_root).test[:2]
    in_bf16 = SimpleNamespace(identity=tiny_clip.identity, precision="bf16",
                              image_stats=tiny_clip.image_stats)
    assert tiny_clip.precision == "fp32"
    assert cache_key(in_bf16, items, 0, 0, 0.08) != cache_key(tiny_clip, items, 0, 0, 0.08)


@pytest.mark.parametrize("damage", ["zeroed middle", "truncated", "wrong values",
                                    "wrong shape", "garbage"])
def test_damaged_feature_cache_is_detected_and_rebuilt(damage, tiny_clip, eurosat_root,
                                                       tmp_path, caplog):
    items = load_dataset("eurosat", eurosat_root).train[:12]
    expected = cached_features(tiny_clip, items, [0], tmp_path)
    (path,) = tmp_path.iterdir()
    data = bytearray(path.read_bytes())
    if damage == "zeroed middle":
        data[len(data) // 4: 3 * len(data) // 4] = bytes(len(data) // 2)
        path.write_bytes(data)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a tensor file\n" * 100)
    else:  # a file that loads, with a valid-looking checksum of the original features
        wrong = expected[0] + 0.1 if damage == "wrong values" else expected[0, :5]
        torch.save({"features": wrong, "sha256": checksum(expected[0])}, path)
    with caplog.at_level("WARNING"):
        again = cached_features(tiny_clip, items, [0], tmp_path)
    assert "is damaged" in caplog.text and str(path) in caplog.text
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    caplog.clear()
    with caplog.at_level("WARNING"):
        cached_features(tiny_clip, items, [0], tmp_path)  # the rebuilt file is sound
    assert caplog.text == ""


CONCURRENT_FIRST_USE = """
import os, sys, time
from pathlib import Path
os.umask(0o022)
from bayesprompt.world import downstream as offline_world
offline_world.SPLIT_SIZES = {"train": 2, "val": 1, "test": 1}  # small: only the write path
rename, replace = os.rename, os.replace
def slow(move):
    def moved(*args):
        time.sleep(0.3)  # widen the window in which both processes write at once
        return move(*args)
    return moved
os.rename, os.replace = slow(rename), slow(replace)
from bayesprompt.clip import load_clip
from bayesprompt.data.datasets import load_dataset
from bayesprompt.data.features import cached_features, checksum
root, cache, backbone = (Path(a) for a in sys.argv[1:4])
dataset = load_dataset("miniworld", root)
features = cached_features(load_clip(str(backbone)), dataset.train, [0, 1], cache)
print(checksum(features))
"""


def test_two_processes_first_use_of_offline_world_and_feature_cache(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    command = [sys.executable, "-c", CONCURRENT_FIRST_USE, str(root), str(cache), TINY_BACKBONE]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    assert outputs[0][0] == outputs[1][0]
    assert [p.name for p in root.iterdir()] == ["miniworld"]  # no temporary folder left
    folder = root / "miniworld"
    assert mode(folder) == 0o755 and mode(folder / "split.json") == 0o644
    split = json.loads((folder / "split.json").read_text())
    assert all((folder / "images" / entry[0]).is_file() for part in split.values()
               for entry in part)
    cache_files = list(cache.iterdir())
    assert len(cache_files) == 2 and all(p.suffix == ".pt" for p in cache_files)
    for path in cache_files:
        stored = torch.load(path, weights_only=True)
        assert checksum(stored["features"]) == stored["sha256"]
        assert mode(path) == 0o644


# --- damaged run files, bad options --------------------------------------------------------

def train_args(root: Path, out: Path, cache: Path) -> list[str]:
    """svi_train.py arguments of a one-epoch CoOp run on the EuroSAT fixture."""
    return ["--dataset", "eurosat", "--root", str(root), "--backbone", TINY_BACKBONE,
            "--pretrained", "", "--model", "coop", "--shots", "2", "--epochs", "1",
            "--batch-size", "4", "--views", "1", "--cache-dir", str(cache), "--out", str(out),
            "--device", "cpu"]


@pytest.fixture(scope="module")
def trained_run(eurosat_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults_run")
    run_main(svi_train["main"], train_args(eurosat_root, folder / "run", folder / "cache"))
    return folder / "run"


def exit_message(main, args: list[str], capsys) -> str:
    """Run a command line that must fail with exit code 2; return what it printed."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("content", ['{"model": "coop", "dataset', "[1, 2]", "\x00\x01"])
def test_damaged_config_json_on_resume_and_analyze(content, trained_run, eurosat_root, tmp_path,
                                                   capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    (copy / "config.json").write_text(content)
    resumed = [*train_args(eurosat_root, copy, tmp_path / "cache"), "--resume"]
    assert str(copy / "config.json") in exit_message(svi_train["main"], resumed, capsys)
    message = exit_message(analyze["main"], [str(copy), "--num-samples", "2"], capsys)
    assert str(copy / "config.json") in message and "run's options" in message


def test_analyze_num_samples_zero_writes_nothing(trained_run, tmp_path, capsys):
    out = tmp_path / "analysis"
    args = [str(trained_run), "--num-samples", "0", "--out", str(out)]
    message = exit_message(analyze["main"], args, capsys)
    assert "--num-samples must be 1 or more" in message
    assert not out.exists()


@pytest.mark.parametrize("option", ["out", "cache", "root"])
def test_read_only_out_cache_dir_or_root_is_exit_2(option, eurosat_root, tmp_path, monkeypatch,
                                                   capsys):
    read_only = tmp_path / "read_only"
    mkstemp, mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def refusing(make):
        def make_unless_read_only(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's name
            if dir is not None and str(dir).startswith(str(read_only)):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return make(*args, dir=dir, **kwargs)
        return make_unless_read_only

    monkeypatch.setattr(files.tempfile, "mkstemp", refusing(mkstemp))
    monkeypatch.setattr(files.tempfile, "mkdtemp", refusing(mkdtemp))
    folders = {"out": tmp_path / "run", "cache": tmp_path / "cache", "root": eurosat_root,
               option: read_only}
    args = train_args(folders["root"], folders["out"], folders["cache"])
    if option == "root":
        args[args.index("eurosat")] = "miniworld"  # generated on first use: written to --root
    message = exit_message(svi_train["main"], args, capsys)
    assert f"Cannot write {read_only}" in message


# --- bad datasets and backbones -------------------------------------------------------------

def image_folder(root: Path, classes: dict[str, int]) -> Path:
    """ROOT/<class>/<i>.png, `count` small images per class."""
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_dataset_folder_without_classes_of_its_own(tmp_path):
    folder = image_folder(tmp_path / "ds", {"cat": 4, "dog": 4})
    (folder / "split_fewshot").mkdir()
    (folder / "split_fewshot" / "shot_1-seed_1.json").write_text("{}")
    assert load_dataset(str(folder), tmp_path).classnames == ["cat", "dog"]


@pytest.mark.parametrize(("case", "message"), [
    ("one class", "has 1 class \\(cat\\).*at least two"),
    ("empty class folder", "class folder .*/ds/empty holds no images"),
    ("malformed dataset.json", "Cannot read .*dataset.json.*classnames"),
    ("classnames not a list", "malformed 'classnames'"),
    ("too few class names", "labels \\[2\\] but only 2 class names"),
    ("template without {}", "template 'a photo' .*has no '\\{\\}'"),
])
def test_bad_dataset_folders(case, message, tmp_path):
    classes = {"cat": 4} if case == "one class" else {"cat": 4, "dog": 4, "eel": 4}
    folder = image_folder(tmp_path / "ds", classes)
    meta = {
        "empty class folder": None, "one class": None,
        "malformed dataset.json": '{"classnames": ["cat", ',
        "classnames not a list": json.dumps({"classnames": "cat dog eel"}),
        "too few class names": json.dumps({"classnames": ["cat", "dog"]}),
        "template without {}": json.dumps({"template": "a photo"}),
    }[case]
    if meta is not None:
        (folder / "dataset.json").write_text(meta)
    if case == "empty class folder":
        (folder / "empty").mkdir()
    with pytest.raises(UserError, match=message):
        load_dataset(str(folder), tmp_path)


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("other")
    config = json.loads(Path(TINY_BACKBONE).read_text())
    (folder / "wide.json").write_text(json.dumps({**config, "embed_dim": 48}))
    torch.save(load_clip(str(folder / "wide.json")).model.state_dict(), folder / "wide.pt")
    return folder / "wide.pt"


@pytest.mark.parametrize(("case", "message"), [
    ("malformed json", "Cannot read .*bad.json.*open_clip model config"),
    ("missing fields", "bad.json is incomplete \\(missing vision_cfg, text_cfg\\)"),
    ("wrong field values", "Could not build the model bad from its config"),
    ("not a checkpoint", "not a PyTorch checkpoint that can be read"),
    ("another architecture", "weights of another architecture than tiny_clip.*text_projection"),
])
def test_bad_backbones_and_checkpoints(case, message, tmp_path, other_architecture, capsys):
    config = json.loads(Path(TINY_BACKBONE).read_text())
    backbone, pretrained = str(tmp_path / "bad.json"), ""
    if case == "malformed json":
        Path(backbone).write_text('{"embed_dim": 32,')
    elif case == "missing fields":
        Path(backbone).write_text('{"embed_dim": 32}')
    elif case == "wrong field values":
        Path(backbone).write_text(json.dumps({**config, "vision_cfg": {"layers": "one"}}))
    else:
        backbone = TINY_BACKBONE
        pretrained = str(other_architecture)
        if case == "not a checkpoint":
            pretrained = str(tmp_path / "notes.pt")
            Path(pretrained).write_text("meeting notes\n" * 100)
    with pytest.raises(UserError, match=message) as error:
        load_clip(backbone, pretrained)
    assert len(str(error.value)) < 600  # one paragraph, not a list of every parameter
    load_clip(TINY_BACKBONE)  # a bad config leaves open_clip's registry usable
