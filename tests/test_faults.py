"""Fault injection: svi_train.py processes killed (SIGKILL) mid-epoch or in the middle of a
checkpoint write, or stopped by Ctrl-C (SIGINT), then resumed, end with the parameters and
results of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

#: Runs svi_train.py with a fault: argv = FAULT N SVI_TRAIN_ARGS... FAULT is "step" (signal
#: SIGKILL before the N-th optimiser step), "save" (the N-th checkpoint write stops half-way
#: through bayesprompt.files' temporary file, then SIGKILL), "interrupt" (SIGINT before the
#: N-th step, as Ctrl-C).
DRIVER = r"""
import os, runpy, signal, sys
import torch
# Ctrl-C as in a terminal's foreground job, also when pytest runs as a background job (`&` in
# a script), whose processes inherit SIGINT ignored: the SIGINT below was then lost
signal.signal(signal.SIGINT, signal.default_int_handler)
fault, n = sys.argv[1], int(sys.argv[2])
sys.argv = ["svi_train.py", *sys.argv[3:]]
calls = []
if fault in ("step", "interrupt"):
    step = torch.optim.SGD.step
    def faulty_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL if fault == "step" else signal.SIGINT)
        return step(self, *args, **kwargs)
    torch.optim.SGD.step = faulty_step
else:
    import bayesprompt.files as files
    write_bytes = files.write_bytes
    def faulty_write_bytes(path, data):
        if "checkpoint" in str(path):
            calls.append(1)
            if len(calls) == n:
                def half_then_kill(temporary):
                    with open(temporary, "wb") as file:
                        file.write(data[: len(data) // 2])
                        file.flush()
                        os.fsync(file.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                files.atomic_write(path, half_then_kill)
        return write_bytes(path, data)
    files.write_bytes = faulty_write_bytes
runpy.run_path("experiments/svi_train.py", run_name="__main__")
"""


def svi_train(args: list[str], fault: tuple[str, int] | None = None
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "experiments/svi_train.py", *args] if fault is None else \
        [sys.executable, "-c", DRIVER, fault[0], str(fault[1]), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def fault_args(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A vpt run of 3 epochs of 5 steps; features cached once for every process."""
    from conftest import TINY_BACKBONE
    cache = tmp_path_factory.mktemp("cache")
    return ["--dataset", "eurosat", "--root", str(eurosat_root), "--backbone", TINY_BACKBONE,
            "--pretrained", "", "--model", "vpt", "--shots", "4", "--epochs", "3",
            "--num-particles", "3", "--batch-size", "4", "--views", "2",
            "--cache-dir", str(cache), "--device", "cpu"]


@pytest.fixture(scope="module")
def uninterrupted(fault_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    done = svi_train([*fault_args, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    """Same parameters (bit for bit), loss history and accuracies."""
    params = torch.load(run / "checkpoint.pt", weights_only=True)["param_store"]
    expected = torch.load(reference / "checkpoint.pt", weights_only=True)["param_store"]
    assert params.keys() == expected.keys()
    for name in params:
        assert torch.equal(params[name], expected[name]), name
    results = json.loads((run / "results.json").read_text())
    reference_results = json.loads((reference / "results.json").read_text())
    for key in ("base_acc", "new_acc", "hm", "loss_history"):
        assert results[key] == reference_results[key], key


@pytest.mark.parametrize("fault, n, exit_code", [
    ("step", 2, -9),        # first epoch: no checkpoint yet
    ("step", 8, -9),        # mid second epoch: resumes from epoch 1's checkpoint
    ("save", 2, -9),        # the second checkpoint write is cut in half
    ("interrupt", 12, 130),  # Ctrl-C in the third epoch
])
def test_killed_run_resumes_to_the_uninterrupted_result(fault: str, n: int, exit_code: int,
                                                        fault_args: list[str],
                                                        uninterrupted: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = svi_train([*fault_args, "--out", str(out)], (fault, n))
    assert killed.returncode == exit_code, killed.stderr
    assert not (out / "results.json").exists()
    if fault == "save":  # the cut write never reached checkpoint.pt: the previous epoch's is whole
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == n - 1
    if fault == "interrupt":  # stopped in the third epoch: the second's checkpoint is the last
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
        assert "Traceback" not in killed.stderr
        assert "Interrupted" in killed.stderr and "--resume" in killed.stderr
    resumed = svi_train([*fault_args, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, uninterrupted)
