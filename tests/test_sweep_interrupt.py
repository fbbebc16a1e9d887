"""Ctrl-C on a local sweep (benchmark.py --executor local): the terminal sends SIGINT to the
whole foreground process group, the sweep, submitit's job controllers and the jobs; the
terminal shows the sweep's one line, no traceback, and the jobs stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY_BACKBONE

REPO = Path(__file__).resolve().parent.parent
#: Generous: how long the job may take to start training under heavy load.
WAIT_SECONDS = 600


def test_ctrl_c_on_a_local_sweep_prints_one_line(eurosat_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    settings = [f"root={eurosat_root}", f"backbone={TINY_BACKBONE}", "pretrained=none",
                "shots=4", "epochs=100000", "num_particles=2", "batch_size=4", "views=1",
                f"cache_dir={tmp_path / 'cache'}"]
    command = [sys.executable, "experiments/benchmark.py", "--protocol", "base2new",
               "--datasets", "eurosat", "--models", "coop", "--seeds", "1",
               *[arg for pair in settings for arg in ("--set", pair)],
               "--device", "cpu", "--executor", "local", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # a session of its own, like a shell's foreground job: Ctrl-C signals the whole group
    sweep = subprocess.Popen(command, cwd=REPO, env=env, text=True, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not list(out.glob("**/metrics.jsonl")):  # the job is training
            assert sweep.poll() is None, sweep.communicate()
            assert time.monotonic() < deadline, "the sweep's job did not start"
            time.sleep(0.1)
        os.killpg(sweep.pid, signal.SIGINT)
        _, err = sweep.communicate(timeout=WAIT_SECONDS)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "Interrupted." in err and "run the same command again" in err
    assert not list(out.glob("**/results.json"))
