"""Run many runs: a list of resolved RunConfigs, one run folder each, on submitit.

Executors:
  none   in this process, one run after another.
  local  submitit's LocalExecutor: one process per run on this machine, at most `workers` at
         once (default: one per visible CUDA GPU, each run pinned to its own GPU through
         CUDA_VISIBLE_DEVICES; one on the CPU), each with cores / workers threads.
  slurm  one SLURM job array (submitit's SlurmExecutor), at most `array_parallelism` tasks at
         once; the command returns after `sbatch`, and running it again once the jobs have
         finished collects their run folders.

A run folder whose config.json equals the requested configuration is reused when it holds
results.json, and resumed from its checkpoint otherwise, so running a sweep again finishes
what failed or was cut off. A failed run does not stop the others: it is reported with its
error and log file (`Outcome`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bayesprompt.errors import RunInterrupted, UserError
from bayesprompt.files import make_folder, read_json, write_json
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.folder import changed_options
from bayesprompt.runs.train import train_and_evaluate

EXECUTORS = ("local", "slurm", "none")
#: Seconds between two looks at the running local jobs.
POLL_SECONDS = 0.5
#: Local jobs have no time limit of their own: submitit's (2 minutes by default) is set to a year.
LOCAL_TIMEOUT_MIN = 60 * 24 * 365
#: The standard error of submitit's local job controllers, in the sweep's submitit folder.
CONTROLLER_LOG = "controllers.log"
#: The record of submitted SLURM arrays, in the sweep's submitit folder.
SLURM_RECORD = "slurm_jobs.json"


@dataclass
class SweepOptions:
    """Where and how the runs of a sweep execute (see the module docstring)."""

    executor: str = "local"
    workers: int | None = None
    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    time_min: int = 24 * 60
    array_parallelism: int | None = None


@dataclass
class Outcome:
    """What became of one run: its results, or the error and the log that tells more."""

    config: RunConfig
    results: dict | None = None
    error: str | None = None
    log: str | None = None

    @property
    def failed(self) -> bool:
        return self.results is None


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """--executor and its options."""
    group = parser.add_argument_group("where the runs execute (submitit)")
    group.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="local: parallel processes on this machine; slurm: one SLURM job "
                       "array; none: one after another in this process (default: local)")
    group.add_argument("--workers", type=int,
                       help="local: runs at once (default: one per visible CUDA GPU, each on "
                       "its own GPU; 1 on the CPU)")
    group.add_argument("--partition", help="slurm: the partition (required with --executor "
                       "slurm)")
    group.add_argument("--gpus-per-job", type=int, default=1, help="slurm: GPUs of each run "
                       "(default: 1, and --device then defaults to cuda; 0 for CPU runs)")
    group.add_argument("--cpus-per-job", type=int, help="slurm: CPU cores of each run (sets "
                       "its threads; default: the partition's)")
    group.add_argument("--mem-gb", type=float, help="slurm: memory of each run in GB "
                       "(default: the partition's)")
    group.add_argument("--time-min", type=int, default=24 * 60,
                       help="slurm: time limit of each run in minutes (default: 1440)")
    group.add_argument("--array-parallelism", type=int,
                       help="slurm: most runs of the array at once (default: all)")


def sweep_options(arguments: argparse.Namespace) -> SweepOptions:
    """The parsed --executor options, checked (a UserError names a bad one)."""
    options = SweepOptions(arguments.executor, arguments.workers, arguments.partition,
                           arguments.gpus_per_job, arguments.cpus_per_job, arguments.mem_gb,
                           arguments.time_min, arguments.array_parallelism)
    positive = {"--workers": options.workers, "--cpus-per-job": options.cpus_per_job,
                "--mem-gb": options.mem_gb, "--time-min": options.time_min,
                "--array-parallelism": options.array_parallelism}
    bad = [f"{name} must be 1 or more, got {value}" for name, value in positive.items()
           if value is not None and value <= 0]
    if options.gpus_per_job < 0:
        bad.append(f"--gpus-per-job must be 0 or more, got {options.gpus_per_job}")
    if options.executor == "slurm" and not options.partition:
        bad.append("--executor slurm needs --partition P (sinfo lists the partitions)")
    if bad:
        raise UserError(f"Bad sweep option: {'; '.join(bad)}.")
    return options


def read_record(path: Path) -> dict:
    """A run folder's JSON record, or a UserError saying how to recover from a corrupt one."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path} is not valid JSON ({error}); the run folder {path.parent} is damaged. "
            "Delete that folder to run it again; the other runs are kept.") from None


def reusable_results(config: RunConfig, say: Callable[[str], None]) -> dict | None:
    """The results of a finished run of `config` (resolved) in its folder, or None when it is
    to be run: absent, or started and to be resumed from its checkpoint. A folder holding a
    run with other options (`runs.changed_options`: a moved sweep folder is reused) is a
    UserError, and so is a damaged record."""
    out = Path(config.out)
    if (out / "config.json").is_file():
        changed = changed_options(read_record(out / "config.json"), config)
        if changed:
            details = "; ".join(f"{k}: {there!r} there, {now!r} now"
                                for k, (there, now) in changed.items())
            raise UserError(
                f"{out} holds a run with other options ({details}). It is neither reused nor "
                "overwritten: delete that folder to re-run it, or pass another --out.")
        if (out / "results.json").is_file():
            say(f"reused {out} (its config.json equals the requested one)")
            return read_record(out / "results.json")
        say(f"resuming {out}")
    elif (out / "checkpoint.pt").exists():
        raise UserError(f"{out} holds a checkpoint but no config.json, so it cannot be "
                        "checked against the requested options. Delete that folder to re-run.")
    return None


def run_job(config: RunConfig) -> dict:
    """One run of a sweep (in a submitit process, or here): trained, or resumed from its
    checkpoint. Errors come back as {"error": "Type: message"}, the traceback on stderr."""
    try:
        return {"results": train_and_evaluate(config, resume=True)}
    except (KeyboardInterrupt, RunInterrupted):
        raise
    except Exception as error:  # a run's failure must not stop the sweep
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def run_sweep(configs: list[RunConfig], folder: Path, options: SweepOptions,
              say: Callable[[str], None]) -> list[Outcome] | None:
    """The outcome of each resolved config, in order, after running those not finished yet;
    None when they were submitted to SLURM (the command is run again to collect them).
    Submitit's files and the jobs' logs go to FOLDER/submitit."""
    outcomes = [Outcome(config) for config in configs]
    todo = []
    for outcome in outcomes:
        outcome.results = reusable_results(outcome.config, say)
        if outcome.results is None:
            todo.append(outcome)
    if not todo:
        return outcomes
    if options.executor == "slurm":
        submit_slurm(todo, folder / "submitit", options, say)
        return None
    progress = tqdm(total=len(outcomes), initial=len(outcomes) - len(todo), unit="run",
                    desc="runs", dynamic_ncols=True)
    try:
        if options.executor == "local":
            run_local(todo, folder / "submitit", options, progress)
        else:
            for outcome in todo:
                progress.set_postfix_str(Path(outcome.config.out).name)
                record(outcome, run_job(outcome.config), None)
                progress.update()
    except (KeyboardInterrupt, RunInterrupted):
        raise RunInterrupted(
            "Interrupted. Finished runs are kept; run the same command again to go on (an "
            "interrupted run resumes from its last finished epoch).") from None
    finally:
        progress.close()
    return outcomes


def record(outcome: Outcome, answer: dict, log: str | None) -> None:
    outcome.results, outcome.error, outcome.log = answer.get("results"), answer.get("error"), log


def local_gpus(configs: list[RunConfig]) -> tuple[list[int], bool]:
    """The CUDA GPUs the local jobs may see, and whether each job is pinned to one of them
    (when every run asks for plain `cuda`; `cuda:N` jobs see every GPU)."""
    if not torch.cuda.is_available() or all(c.device == "cpu" for c in configs):
        return [], False
    return list(range(torch.cuda.device_count())), all(c.device == "cuda" for c in configs)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_local(todo: list[Outcome], folder: Path, options: SweepOptions, progress: tqdm) -> None:
    """The runs as submitit LocalExecutor jobs, at most `workers` alive at once (submitit would
    start them all), each pinned to the least busy GPU when pinned."""
    import submitit

    gpus, pinned = local_gpus([outcome.config for outcome in todo])
    workers = options.workers or (len(gpus) if pinned else 1)
    threads = max(1, cpu_cores() // workers)
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    waiting = list(todo)
    running: dict = {}  # job -> (outcome, gpu)
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                outcome = waiting.pop(0)
                gpu = None
                if pinned:
                    busy = [g for _, g in running.values()]
                    gpu = min(gpus, key=busy.count)
                    executor.update_parameters(gpus_per_node=1, visible_gpus=[gpu])
                else:
                    executor.update_parameters(gpus_per_node=len(gpus), visible_gpus=gpus)
                with environment(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)), \
                        stderr_into(folder / CONTROLLER_LOG):
                    running[executor.submit(run_job, outcome.config)] = (outcome, gpu)
            time.sleep(POLL_SECONDS)
            for job in [job for job in running if job.done()]:
                outcome, _ = running.pop(job)
                record(outcome, job_answer(job), str(job.paths.stderr))
                progress.update()
    except BaseException:
        for job in running:
            job.cancel(check=False)
        raise


@contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Environment variables set for a block (a local job inherits them when submitted).
    Not submitit's `setup` lines: they put a shell between the job and the signal with which
    `job.cancel` stops it, so a cancelled job would go on running."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


@contextmanager
def stderr_into(path: Path) -> Iterator[None]:
    """This process's standard error (file descriptor 2) appended to `path` for a block, so
    that the processes it starts write theirs there: submitit's local job controllers, whose
    KeyboardInterrupt tracebacks on Ctrl-C would otherwise fill the terminal."""
    make_folder(path.parent)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def job_answer(job) -> dict:
    """What a finished submitit job returned, or its failure (a crash, a kill)."""
    try:
        return job.result()
    except Exception as error:  # submitit's FailedJobError, UncompletedJobError
        lines = [line for line in str(error).splitlines() if line.strip()]
        return {"error": f"{type(error).__name__}: {lines[0] if lines else error}"}


def submit_slurm(todo: list[Outcome], folder: Path, options: SweepOptions,
                 say: Callable[[str], None]) -> None:
    """The runs as one SLURM job array; refuses to submit a run that a recorded array still
    holds (queued or running), so that running the command again early starts no twin."""
    import submitit

    active = active_slurm_runs(folder)
    waiting = [outcome.config.out for outcome in todo if outcome.config.out in active]
    if waiting:
        job_ids = sorted({active[out] for out in waiting})
        raise UserError(
            f"{len(waiting)} of the unfinished runs are still queued or running in SLURM job "
            f"{', '.join(job_ids)} (squeue -j {','.join(job_ids)}). Run this command again when "
            "they have finished; it then reuses their run folders and writes the table.")
    executor = submitit.SlurmExecutor(folder=folder)
    parameters = {"partition": options.partition, "time": options.time_min,
                  "gpus_per_node": options.gpus_per_job, "ntasks_per_node": 1,
                  "array_parallelism": options.array_parallelism or len(todo),
                  "job_name": "bayesprompt-sweep"}
    if options.cpus_per_job:
        parameters["cpus_per_task"] = options.cpus_per_job
        parameters["setup"] = [f"export OMP_NUM_THREADS={options.cpus_per_job}"]
    if options.mem_gb:
        parameters["mem"] = f"{options.mem_gb:g}GB"
    executor.update_parameters(**parameters)
    try:
        with executor.batch():
            jobs = [executor.submit(run_job, outcome.config) for outcome in todo]
    except submitit.core.utils.FailedJobError as error:
        raise UserError(f"sbatch refused the job array: {error}") from None
    job_id = jobs[0].job_id.split("_")[0]
    records = slurm_records(folder)
    records.append({"job_id": job_id, "tasks": [job.job_id for job in jobs],
                    "runs": [outcome.config.out for outcome in todo]})
    write_json(folder / SLURM_RECORD, records)
    logs = (f"{folder / job_id}_TASK_0_log.out and .err, TASK = 0..{len(todo) - 1} in the "
            "order of the runs" if len(jobs) > 1 else f"{folder / job_id}_0_log.out and .err")
    say(f"Submitted {len(todo)} runs as SLURM job array {job_id} (partition "
        f"{options.partition}, at most {parameters['array_parallelism']} at once). Logs: "
        f"{logs}; squeue -j {job_id} shows the queue. "
        "When the jobs have finished, run this same command again: it reuses their run "
        "folders, resubmits failed or cut-off runs (they resume from their checkpoints) and "
        "writes the table.")


def slurm_records(folder: Path) -> list[dict]:
    path = folder / SLURM_RECORD
    if not path.is_file():
        return []
    return read_json(path, "the SLURM job arrays this sweep submitted", list)


def active_slurm_runs(folder: Path) -> dict[str, str]:
    """Run folder -> job id, for runs of recorded arrays that squeue still lists."""
    records = slurm_records(folder)
    if not records or shutil.which("squeue") is None:
        return {}
    job_ids = [record["job_id"] for record in records]
    listed = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(job_ids)],
                            capture_output=True, text=True, check=False).stdout.split()
    return {out: record["job_id"] for record in records
            for task, out in zip(record["tasks"], record["runs"], strict=True)
            if task in listed or record["job_id"] in listed}


def failure_report(outcomes: list[Outcome]) -> str:
    """One paragraph per failed run, and how to resume."""
    failed = [outcome for outcome in outcomes if outcome.failed]
    lines = [f"{len(failed)} of {len(outcomes)} runs failed:"]
    for outcome in failed:
        log = f" (log: {outcome.log})" if outcome.log else " (traceback above)"
        lines.append(f"  {outcome.config.out}: {outcome.error}{log}")
    lines.append("The table holds the runs that finished; failed cells are marked. Run the same "
                 "command again to finish the sweep: finished runs are reused and failed or "
                 "interrupted ones resume from their checkpoints.")
    return "\n".join(lines)
