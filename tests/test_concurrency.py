"""Two processes meet in one run folder: the run folder lock (`bayesprompt/runs/lock.py`).

Deterministic under any load: the first process is paused at a known point (just before it
writes config.json, with the folder's lock held) until the second one has finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bayesprompt.runs.lock import RunFolderLock

REPO = Path(__file__).resolve().parent.parent

#: svi_train.py, paused before it writes config.json: argv = PAUSE_DIR SVI_TRAIN_ARGS...
#: It writes PAUSE_DIR/ready, then waits for PAUSE_DIR/go.
PAUSED = r"""
import runpy, sys, time
from pathlib import Path
pause = Path(sys.argv[1])
sys.argv = ["svi_train.py", *sys.argv[2:]]
import bayesprompt.runs.train as runs
write_json = runs.write_json
def paused_write_json(path, obj, *args, **kwargs):
    if Path(path).name == "config.json":
        (pause / "ready").write_text("")
        while not (pause / "go").exists():
            time.sleep(0.05)
    return write_json(path, obj, *args, **kwargs)
runs.write_json = paused_write_json
runpy.run_path("experiments/svi_train.py", run_name="__main__")
"""

#: svi_train.py killed (SIGKILL) before its N-th optimiser step: argv = N SVI_TRAIN_ARGS...
KILLED = r"""
import os, runpy, signal, sys
import torch
n = int(sys.argv[1])
sys.argv = ["svi_train.py", *sys.argv[2:]]
calls = []
step = torch.optim.SGD.step
def faulty_step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)
torch.optim.SGD.step = faulty_step
runpy.run_path("experiments/svi_train.py", run_name="__main__")
"""

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
#: Generous: the wait for the paused process under heavy load, not a timing assumption.
WAIT_SECONDS = 600


def start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def svi_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "experiments/svi_train.py", *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True)


def wait_for(path: Path, process: subprocess.Popen) -> None:
    """Until `path` exists; fails at once if `process` ended instead."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the paused process ended early:\n{process.communicate()[1]}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def args(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A vpt run of 3 epochs of 5 steps, one row per epoch in metrics.jsonl."""
    from conftest import TINY_BACKBONE
    cache = tmp_path_factory.mktemp("cache")
    return ["--dataset", "eurosat", "--root", str(eurosat_root), "--backbone", TINY_BACKBONE,
            "--pretrained", "", "--model", "vpt", "--shots", "4", "--epochs", "3",
            "--num-particles", "2", "--batch-size", "4", "--views", "1", "--log-every", "0",
            "--cache-dir", str(cache), "--device", "cpu"]


def test_two_runs_started_at_once_into_one_folder(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    pause = tmp_path / "pause"
    pause.mkdir()
    first = start(PAUSED, str(pause), *args, "--seed", "1", "--out", str(out))
    wait_for(pause / "ready", first)  # the first holds the lock, config.json not yet written
    second = svi_train(*args, "--seed", "2", "--out", str(out))
    (pause / "go").write_text("")
    stdout, stderr = first.communicate(timeout=WAIT_SECONDS)
    assert first.returncode == 0, stderr
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    message = second.stderr.strip().splitlines()[-1]  # after the tiny backbone's warnings
    assert message.startswith("error: ") and second.stderr.count("error: ") == 1
    assert str(out) in message and f"PID {first.pid}" in message
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 1 and len(results["loss_history"]) == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]


def test_two_resumes_at_once_write_each_row_once(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED, "8", *args, "--out", str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr  # mid epoch 2: epoch 1's checkpoint is kept
    pause = tmp_path / "pause"
    pause.mkdir()
    first = start(PAUSED, str(pause), *args, "--out", str(out), "--resume")
    wait_for(pause / "ready", first)
    second = svi_train(*args, "--out", str(out), "--resume")
    (pause / "go").write_text("")
    _, stderr = first.communicate(timeout=WAIT_SECONDS)
    assert first.returncode == 0, stderr
    assert second.returncode == 2 and f"PID {first.pid}" in second.stderr, second.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]


def test_a_held_folder_is_refused_and_a_dead_holders_lock_is_gone(args: list[str],
                                                                  tmp_path: Path) -> None:
    """The lock is the kernel's: held by this process, the run is refused before anything is
    written; a process killed while holding it (the first run of the resume test above, and
    here a killed run) never blocks the next one."""
    out = tmp_path / "run"
    with RunFolderLock() as lock:
        lock.hold(out)
        refused = svi_train(*args, "--out", str(out))
    assert refused.returncode == 2 and f"PID {os.getpid()}" in refused.stderr, refused.stderr
    assert not (out / "config.json").exists()
    killed = subprocess.run([sys.executable, "-c", KILLED, "8", *args, "--out", str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    stale = out / ".loss_curve.png.k1ll3d_x.tmp"  # as a killed atomic write leaves it
    stale.write_bytes(b"half a png")
    resumed = svi_train(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not stale.exists() and (out / "loss_curve.png").is_file()
    assert not list(out.glob(".*.tmp"))


def test_a_sweep_run_whose_folder_is_held_fails_alone(eurosat_root: Path, tmp_path: Path,
                                                      capsys) -> None:
    """A sweep's run takes its folder's lock like any run: held elsewhere, that run is reported
    failed with the holder's PID, and the sweep reports it (exit code 1), writing nothing there."""
    from conftest import TINY_BACKBONE

    from bayesprompt.commands import benchmark
    from bayesprompt.commands.cli import run_main
    settings = [f"root={eurosat_root}", f"backbone={TINY_BACKBONE}", "pretrained=none",
                "shots=4", "epochs=1", "num_particles=2", "batch_size=4", "views=1",
                f"cache_dir={tmp_path / 'cache'}"]
    args = ["--protocol", "base2new", "--datasets", "eurosat", "--models", "coop", "--seeds",
            "1", *[arg for pair in settings for arg in ("--set", pair)], "--device", "cpu",
            "--executor", "none", "--out", str(tmp_path / "sweep")]
    run = tmp_path / "sweep/eurosat/coop/seed1"
    with RunFolderLock() as lock, pytest.raises(SystemExit) as exit_info:
        lock.hold(run)
        run_main(benchmark.main, args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"{run}: UserError: {run} is in use by another process (PID {os.getpid()})" in err
    assert not (run / "config.json").exists()
