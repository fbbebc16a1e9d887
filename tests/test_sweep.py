"""bayesprompt/sweep.py through benchmark.py: local processes equal the sequential sweep, a
failed run is reported and resumed, a SLURM array is submitted (a fake sbatch) and collected,
and --protocol grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE

import bayesprompt.commands.benchmark
import bayesprompt.runs.sweep
from bayesprompt.commands.cli import run_main
from bayesprompt.options import field_type
from bayesprompt.runs import protocols
from bayesprompt.runs.config import RunConfig

benchmark = vars(bayesprompt.commands.benchmark)

#: A CoOp model file that raises in a training step once FLAG exists next to it (model calls
#: counted per process: one to create the parameters, five steps per epoch on the fixture).
FAILING_MODEL = '''
import os
from pathlib import Path

from bayesprompt.models.coop import Model as CoOp

FLAG = Path(__file__).with_name("FAIL")
Path(__file__).with_name(f"gpus-{os.getpid()}").write_text(
    os.environ.get("CUDA_VISIBLE_DEVICES", "not set"))


class Model(CoOp):
    calls = 0

    def model(self, image_features, labels=None, dataset_size=None):
        Model.calls += 1
        if Model.calls == 8 and FLAG.exists():
            raise RuntimeError("injected failure in the 8th model call")
        return super().model(image_features, labels, dataset_size)
'''


def run_cli(args: list[str]) -> int:
    """benchmark.py's exit code."""
    try:
        run_main(benchmark["main"], args)
    except SystemExit as exit_info:
        return exit_info.code
    return 0


@pytest.fixture(scope="module")
def tiny(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """--set options of fast runs on the tiny backbone."""
    cache = tmp_path_factory.mktemp("cache")
    return [arg for pair in [f"root={eurosat_root}", f"backbone={TINY_BACKBONE}",
                             "pretrained=none", "shots=4", "epochs=1", "num_particles=2",
                             "batch_size=4", "views=2", f"cache_dir={cache}"]
            for arg in ("--set", pair)] + ["--device", "cpu"]


def entries(folder: Path) -> list[dict]:
    """table.json's entries without the timing."""
    table = json.loads((folder / "table.json").read_text())["entries"]
    return [{k: v for k, v in entry.items() if k != "train_seconds"} for entry in table]


def test_local_processes_give_the_sequential_table(tiny: list[str], tmp_path: Path,
                                                   monkeypatch) -> None:
    args = ["--protocol", "base2new", "--datasets", "eurosat", "--models", "coop", "vpt",
            "--seeds", "1", "2", *tiny]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 local workers on "2 cores" below
    try:
        assert run_cli([*args, "--executor", "none", "--out", str(tmp_path / "none")]) == 0
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(bayesprompt.runs.sweep, "cpu_cores", lambda: 2)
    assert run_cli([*args, "--executor", "local", "--workers", "2",
                    "--out", str(tmp_path / "local")]) == 0
    assert entries(tmp_path / "local") == entries(tmp_path / "none")  # exactly, every float
    assert len(entries(tmp_path / "local")) == 2 and entries(tmp_path / "local")[1]["seeds"] == 2
    logs = sorted((tmp_path / "local" / "submitit").glob("*_0_log.err"))
    assert len(logs) == 4 and all("Job completed successfully" in log.read_text()
                                  for log in logs)


def test_a_failed_run_is_reported_the_others_finish_and_the_sweep_resumes(
        tiny: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    # two GPUs as far as the sweep knows: each job is pinned to one (the runs use the CPU)
    monkeypatch.setattr(bayesprompt.runs.sweep, "local_gpus", lambda configs: ([0, 1], True))
    model_file = tmp_path / "failing.py"
    model_file.write_text(FAILING_MODEL)
    (tmp_path / "FAIL").touch()
    out = tmp_path / "bench"
    args = ["--protocol", "base2new", "--datasets", "eurosat", "--models", "coop",
            str(model_file), "--seeds", "1", *tiny, "--set", "epochs=2", "--out", str(out)]
    assert run_cli([*args, "--executor", "local", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    failed_run = out / "eurosat" / "failing" / "seed1"
    assert "1 of 2 runs failed" in err
    assert f"{failed_run}: RuntimeError: injected failure in the 8th model call" in err
    log = err.split(f"{failed_run}: ")[1].split("(log: ")[1].split(")")[0]
    assert "injected failure" in Path(log).read_text()
    assert "Run the same command again" in err and "Traceback" not in err
    table = {entry["model"]: entry for entry in entries(out)}
    assert table["coop"]["failed"] == 0 and table["coop"]["base_acc"] is not None
    assert table["failing"]["failed"] == 1 and table["failing"]["base_acc"] is None
    assert "| failing (FAILED: 1 of 1 runs) | n/a |" in (out / "table.md").read_text()
    assert (failed_run / "checkpoint.pt").exists() and not (failed_run / "results.json").exists()
    seen = {path.read_text() for path in tmp_path.glob("gpus-*")}  # the parent's import: unset
    assert seen - {os.environ.get("CUDA_VISIBLE_DEVICES", "not set")} <= {"0", "1"}
    assert seen & {"0", "1"}  # the job saw exactly one of the two

    (tmp_path / "FAIL").unlink()
    assert run_cli([*args, "--executor", "none"]) == 0
    err = capsys.readouterr().err
    assert f"reused {out / 'eurosat' / 'coop' / 'seed1'}" in err and f"resuming {failed_run}" in err
    table = {entry["model"]: entry for entry in entries(out)}
    results = json.loads((failed_run / "results.json").read_text())
    assert table["failing"]["failed"] == 0
    assert table["failing"]["base_acc"]["mean"] == results["base_acc"]
    assert len(results["loss_history"]) == 2


FAKE_SLURM = {
    "sbatch": '#!/bin/sh\ncp "$1" "$FAKE_SLURM/sbatch.sh"\necho "Submitted batch job 4242"\n',
    "srun": "#!/bin/sh\nexit 0\n",  # submitit looks for srun to know it is on a cluster
    "squeue": '#!/bin/sh\necho "$@" >> "$FAKE_SLURM/squeue_args"\n'
              'cat "$FAKE_SLURM/queue" 2>/dev/null\n',
}


def test_slurm_job_array_is_submitted_and_collected(tiny: list[str], tmp_path: Path,
                                                    monkeypatch, capsys) -> None:
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    for name, script in FAKE_SLURM.items():
        (bin_folder / name).write_text(script)
        (bin_folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
    out = tmp_path / "bench"
    args = ["--protocol", "base2new", "--datasets", "eurosat", "--models", "zeroshot",
            "--seeds", "1", "2", *tiny, "--executor", "slurm", "--partition", "gpu-a100",
            "--gpus-per-job", "1", "--time-min", "90", "--array-parallelism", "1",
            "--cpus-per-job", "4", "--mem-gb", "16", "--out", str(out)]
    assert run_cli(args) == 0
    err = capsys.readouterr().err
    sbatch = (tmp_path / "sbatch.sh").read_text()
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --array=0-1%1",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --time=90",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16GB",
                 "export OMP_NUM_THREADS=4"):
        assert line in sbatch
    submitit_folder = out / "submitit"
    assert "Submitted 2 runs as SLURM job array 4242" in err
    assert f"Logs: {submitit_folder / '4242'}_TASK_0_log.out" in err
    assert "run this same command again" in err and not (out / "table.json").exists()

    (tmp_path / "queue").write_text("4242_1\n")  # task 1 still queued: nothing resubmitted
    (tmp_path / "sbatch.sh").unlink()
    assert run_cli(args) == 2
    assert "still queued or running in SLURM job 4242" in capsys.readouterr().err
    assert not (tmp_path / "sbatch.sh").exists()
    assert "-j 4242" in (tmp_path / "squeue_args").read_text()

    (tmp_path / "queue").unlink()
    for task in (0, 1):  # what SLURM would run: submitit's job runner on each array task
        slurm_env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": f"50{task}",
                     "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(task),
                     "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
                     "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
        subprocess.run([sys.executable, "-m", "submitit.core._submit", str(submitit_folder)],
                       env={**os.environ, **slurm_env}, check=True, capture_output=True)
    assert run_cli(args) == 0
    err = capsys.readouterr().err
    assert err.count("reused ") == 2 and not (tmp_path / "sbatch.sh").exists()
    (entry,) = entries(out)
    assert entry["seeds"] == 2 and entry["failed"] == 0 and entry["base_acc"]["n"] == 2


def test_grid_of_any_fields(tiny: list[str], tmp_path: Path) -> None:
    out = tmp_path / "grid"
    assert run_cli(["--protocol", "grid", "--grid", "model=coop,zeroshot",
                    "--grid", "grad_checkpointing=false,true", "--set", "dataset=eurosat",
                    *tiny, "--executor", "none", "--out", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["axes"] == {"model": ["coop", "zeroshot"], "grad_checkpointing": [False, True]}
    runs = [entry["run"] for entry in table["entries"]]
    assert runs == ["model=coop,grad_checkpointing=False", "model=coop,grad_checkpointing=True",
                    "model=zeroshot,grad_checkpointing=False",
                    "model=zeroshot,grad_checkpointing=True"]
    for entry in table["entries"]:
        config = json.loads((out / entry["run"] / "config.json").read_text())
        results = json.loads((out / entry["run"] / "results.json").read_text())
        assert config["grad_checkpointing"] is entry["grad_checkpointing"]
        assert config["model"] == entry["model"] and config["dataset"] == "eurosat"
        assert entry["base_acc"] == results["base_acc"] and entry["hm"] == results["hm"]
    coop = [e for e in table["entries"] if e["model"] == "coop"]
    assert coop[0]["base_acc"] == coop[1]["base_acc"]  # checkpointing changes no result
    lines = (out / "table.md").read_text().splitlines()
    assert "| model | grad_checkpointing | base | new | HM |" in "\n".join(lines)
    assert (out / "table.csv").read_text().splitlines()[0].startswith(
        "run,model,grad_checkpointing,failed,base_acc")


@pytest.mark.parametrize("args, message", [
    (["--protocol", "grid"], "needs at least one --grid"),
    (["--protocol", "grid", "--grid", "lr=0.1", "--seeds", "1"], "not from --seeds"),
    (["--protocol", "grid", "--grid", "lr=fast"], "lr takes a number"),
    (["--protocol", "grid", "--grid", "out=a,b"], "out is chosen by --out"),
    (["--protocol", "grid", "--grid", "lr=0.1", "--set", "lr=0.2"], "both set"),
    (["--protocol", "base2new", "--grid", "lr=0.1"], "--grid sets the axes"),
    (["--protocol", "base2new", "--set", "grad_checkpointing=maybe"],
     "grad_checkpointing takes true or false"),
    (["--protocol", "base2new", "--executor", "slurm"], "needs --partition"),
    (["--protocol", "base2new", "--executor", "local", "--workers", "0"],
     "--workers must be 1 or more"),
])
def test_bad_sweep_arguments_exit_2(args: list[str], message: str, tmp_path: Path,
                                    capsys) -> None:
    assert run_cli([*args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_list_and_flag_values_of_a_sweep() -> None:
    parse_settings = protocols.parse_settings
    settings, _ = parse_settings(["grad_checkpointing=true", "pretrained=none"], "--set")
    assert settings == {"grad_checkpointing": True, "pretrained": None}
    settings, _ = parse_settings(["eval_on=dtd+eurosat"], "--grid", chosen={})
    assert settings == {"eval_on": ["dtd", "eurosat"]}


@pytest.mark.parametrize("item", [f for f in fields(RunConfig) if f.name not in
                                  protocols.GRID_CHOSEN], ids=lambda f: f.name)
def test_a_sweep_can_vary_every_field(item) -> None:
    kind, _ = field_type(RunConfig, item.name)
    text, value = {str: ("text", "text"), int: ("7", 7), float: ("0.25", 0.25),
                   bool: ("true", True), list: ("a+b", ["a", "b"])}[kind]
    if item.metadata.get("choices"):
        text = value = item.metadata["choices"][-1]
    axes = protocols.grid_axes([f"{item.name}={text}"])
    assert axes == {item.name: [value]}


def test_ctrl_c_in_a_sequential_sweep_says_how_to_go_on(tmp_path, monkeypatch) -> None:
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(bayesprompt.runs.sweep, "run_job", interrupted)
    config = RunConfig(out=str(tmp_path / "run")).resolved()
    options = bayesprompt.runs.sweep.SweepOptions(executor="none")
    with pytest.raises(bayesprompt.runs.sweep.RunInterrupted, match="run the same command again"):
        bayesprompt.runs.sweep.run_sweep([config], tmp_path, options, print)
