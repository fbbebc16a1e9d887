"""Check the CUDA paths in one command, the day a GPU is there (about 5 minutes on one H100).

    python experiments/gpu_check.py --out gpu_check
    python experiments/gpu_check.py --out /tmp/check --dry-run   # the same sections on the CPU

Writes OUT/gpu_check.json and the table OUT/gpu_check.md; each section's output goes to
OUT/logs/SECTION.log. Every section reports pass, fail or skipped with its reason, and a
failing section does not stop the others:

- agreement: CUDA and the CPU give the same loss and gradients of a vpt_cond step (the
  reference's objective) on identical weights and Monte Carlo noise: fp32 to 1e-5, bf16 and
  fp16 to the tolerances in TOLERANCES (against the CPU in fp32);
- resume: a 2-epoch vpt_cond run on a generated CoOp-format EuroSAT tree, stopped after epoch 1
  and resumed, ends with the parameters of an uninterrupted run, bit for bit;
- step: our step against the reference-style step (experiments/benchmark_step.py; ViT-B/16
  random init, L = 20, C = 5 and 100, bf16 and fp16): step time, images/s, peak GPU memory;
- imagenet_memory: the peak GPU memory of a 1000-class vpt_cond step (L = 10, ImageNet's
  default) with the default text budget;
- nccl: svi_train.py under torchrun with 2 NCCL processes (2 GPUs; with one GPU, whether the
  driver lets two NCCL ranks share it);
- sweep: benchmark.py's local executor, a grid of two runs pinned to the GPU.

`--dry-run` runs every section on the CPU with tiny shapes (gloo instead of NCCL), to check
the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.distributions.normal
from tqdm import tqdm

import bayesprompt.commands.benchmark
import bayesprompt.commands.train
import bayesprompt.inference.checkpoint as checkpoint
from bayesprompt.clip.factory import load_clip
from bayesprompt.commands.cli import run_main
from bayesprompt.data.datasets import EUROSAT_NAMES
from bayesprompt.data.fixtures import TINY_BACKBONE, write_eurosat
from bayesprompt.errors import UserError
from bayesprompt.files import write_json, write_text
from bayesprompt.inference.objectives import make_objective
from bayesprompt.program.base import PromptConfig
from bayesprompt.runs.model_files import load_model_class

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_step  # noqa: E402  (experiments/benchmark_step.py, this script's sibling)

REPO = Path(__file__).resolve().parent.parent
#: Largest normwise relative error of the loss and of each gradient against the CPU in fp32.
#: bf16 keeps 8 significant bits (2^-8 = 0.4% per rounding), fp16 11 bits; errors add up
#: over the 12 layers of the text tower, so 3% and 1%; fp32 on the GPU differs by the order
#: of its sums only.
TOLERANCES = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 1e-2}


@dataclass(frozen=True)
class Setting:
    """Where and at what size the sections run: on CUDA, or the tiny shapes of --dry-run."""

    device: str
    backbone: str
    dry_run: bool

    @property
    def pretrained(self) -> str:
        return ""  # random init, seeded: every process and device builds the same weights


def cpu_noise(seed: int) -> contextlib.AbstractContextManager:
    """Normal draws (Pyro's and torch's reparameterised samples) taken from a CPU generator
    and moved to their device: identical noise on every device."""
    generator = torch.Generator().manual_seed(seed)

    def standard_normal(shape, dtype, device):
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)

    return mock.patch.object(torch.distributions.normal, "_standard_normal", standard_normal)


def loss_and_gradients(setting: Setting, device: str, precision: str
                       ) -> tuple[float, dict[str, torch.Tensor]]:
    """A vpt_cond step's loss and the gradients of its parameters (on the CPU), `paper`
    objective, L = 4, B = 2, EuroSAT's 5 base classes; weights and noise seeded."""
    clip = load_clip(setting.backbone, setting.pretrained, device, precision)
    torch.manual_seed(1)  # the posterior network's initial weights, drawn on the CPU
    program = load_model_class("vpt_cond")(clip, list(EUROSAT_NAMES.values())[:5],
                                           PromptConfig(n_ctx=4)).to(clip.device)
    features = torch.nn.functional.normalize(
        torch.randn(2, clip.feature_dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    labels = torch.tensor([0, 3])
    objective = make_objective(program, "paper", 4)
    with cpu_noise(3):
        loss = objective(features.to(clip.device), labels.to(clip.device), 80)
        loss.backward()
    return float(loss.detach()), {name: value.grad.detach().cpu()
                         for name, value in program.learned_parameters().items()}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference||."""
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def check_agreement(setting: Setting, folder: Path) -> dict:
    """The device's loss and gradients against the CPU's fp32, per precision."""
    loss, gradients = loss_and_gradients(setting, "cpu", "fp32")
    rows, failed, skipped = {}, [], []
    for precision in ("fp32", "bf16", "fp16"):
        if precision == "fp16" and setting.device == "cpu":
            skipped.append("fp16 (a CUDA precision)")
            continue
        other_loss, other = loss_and_gradients(setting, setting.device, precision)
        errors = {"loss": abs(other_loss - loss) / abs(loss)}
        errors.update({name: relative_error(other[name], gradients[name]) for name in other})
        worst = max(errors.values())
        rows[precision] = {"tolerance": TOLERANCES[precision], "worst": worst, **errors}
        if not worst <= TOLERANCES[precision]:
            failed.append(f"{precision}: {worst:.1e} > {TOLERANCES[precision]:.0e}")
    summary = ", ".join(f"{p} {row['worst']:.1e} (tol {row['tolerance']:.0e})"
                        for p, row in rows.items())
    if skipped:
        summary += f"; skipped {', '.join(skipped)}"
    return {"status": "fail" if failed else "pass", "detail": summary, "errors": rows,
            "reason": "; ".join(failed) or None}


def fixture_run_args(setting: Setting, folder: Path) -> list[str]:
    """svi_train.py options of a small vpt_cond run on a generated EuroSAT tree."""
    root = folder / "data"
    if not (root / "eurosat").exists():
        write_eurosat(root, per_class=(4, 1, 2))
    return ["--dataset", "eurosat", "--root", str(root), "--backbone", TINY_BACKBONE,
            "--pretrained", "", "--model", "vpt_cond", "--shots", "4", "--epochs", "2",
            "--num-particles", "3", "--batch-size", "4", "--views", "2",
            "--cache-dir", str(folder / "cache"), "--device", setting.device,
            "--loader-workers", "0"]


def check_resume(setting: Setting, folder: Path) -> dict:
    """A run stopped after epoch 1 and resumed equals an uninterrupted run, bit for bit."""
    args = fixture_run_args(setting, folder)
    train = vars(bayesprompt.commands.train)["main"]
    run_main(train, [*args, "--out", str(folder / "whole")])
    save = checkpoint.save_torch

    def save_then_stop(path: Path, state: dict) -> None:
        save(path, state)
        raise KeyboardInterrupt

    with mock.patch.object(checkpoint, "save_torch", save_then_stop), \
            contextlib.suppress(SystemExit):  # Ctrl-C after the first checkpoint: exit 130
        run_main(train, [*args, "--out", str(folder / "resumed")])
    stopped_at = torch.load(folder / "resumed" / "checkpoint.pt", weights_only=True)["epoch"]
    run_main(train, [*args, "--out", str(folder / "resumed"), "--resume"])
    whole, resumed = (torch.load(folder / run / "checkpoint.pt", weights_only=True)
                      for run in ("whole", "resumed"))
    differences = {name: float((resumed["param_store"][name] - value).abs().max())
                   for name, value in whole["param_store"].items()}
    results = [json.loads((folder / run / "results.json").read_text())
               for run in ("whole", "resumed")]
    same_results = all(results[0][key] == results[1][key]
                       for key in ("base_acc", "new_acc", "loss_history"))
    exact = all(value == 0 for value in differences.values()) and same_results
    detail = (f"stopped after epoch {stopped_at}, resumed to epoch {resumed['epoch']}; "
              f"largest parameter difference {max(differences.values()):.1e}")
    return {"status": "pass" if exact and stopped_at == 1 else "fail", "detail": detail,
            "parameter_differences": differences, "same_results": same_results,
            "reason": None if exact else "the resumed run differs from the uninterrupted one"}


def step_runs(setting: Setting) -> list[tuple[int, str]]:
    """(C, precision) of the step comparisons."""
    if setting.dry_run:
        return [(3, "bf16")]
    return [(classes, precision) for classes in (5, 100) for precision in ("bf16", "fp16")]


def check_step(setting: Setting, folder: Path) -> dict:
    """benchmark_step.py's figures: our step against the reference-style step."""
    particles = 2 if setting.dry_run else 20
    rows = []
    for classes, precision in step_runs(setting):
        figures = folder / f"step_C{classes}_{precision}.json"
        benchmark_step.main(["--backbone", setting.backbone, "--pretrained", "",
                             "--model", "vpt_cond", "--num-particles", str(particles),
                             "--num-classes", str(classes), "--repeats", "3", "--rounds", "2",
                             "--precision", precision, "--device", setting.device,
                             "--json", str(figures)])
        result = json.loads(figures.read_text())
        reference = result.get("reference_style") or {}
        rows.append({
            "num_classes": classes, "num_particles": particles, "precision": precision,
            "our_step_s": result["ours"]["step_s"],
            "our_images_per_s": result["ours"]["images_per_s"],
            "our_peak_gib": result["our_peak_gib"],
            "reference_step_s": reference.get("step_s"),
            "reference_images_per_s": reference.get("images_per_s"),
            "reference_peak_gib": reference.get("peak_gib"),
            "reference_particles_run": reference.get("particles_run"),
            "reference_note": result["reference_note"],
            "speedup_per_image": (result.get("speedup_per_image") or {}).get("median")})
    detail = "; ".join(
        f"C={row['num_classes']} {row['precision']}: ours {1000 * row['our_step_s']:.1f} ms, "
        f"{row['our_peak_gib']:.2f} GiB; reference-style "
        + (f"{1000 * row['reference_step_s']:.0f} ms"
           + (" (extrapolated)" if row["reference_particles_run"] != particles else "")
           + f", {row['speedup_per_image']:.1f}x" if row["reference_step_s"] else "skipped")
        for row in rows)
    return {"status": "pass", "detail": detail, "rows": rows, "reason": None}


def check_imagenet_memory(setting: Setting, folder: Path) -> dict:
    """Peak memory of a 1000-class vpt_cond step (L = 10) with the default text budget."""
    classes, particles = (20, 2) if setting.dry_run else (1000, 10)
    figures = folder / "imagenet.json"
    benchmark_step.main(["--backbone", setting.backbone, "--pretrained", "", "--model",
                         "vpt_cond", "--num-particles", str(particles), "--num-classes",
                         str(classes), "--no-reference", "--skip-flops", "--repeats", "1",
                         "--device", setting.device, "--json", str(figures)])
    result = json.loads(figures.read_text())
    detail = (f"C={classes}, L={particles}: {result['ours']['step_s']:.2f} s per step, peak "
              f"{result['our_peak_gib']:.2f} GiB, text budget {result['text_budget_gib']:.1f} "
              "GiB")
    return {"status": "pass", "detail": detail, "step_s": result["ours"]["step_s"],
            "peak_gib": result["our_peak_gib"], "text_budget_gib": result["text_budget_gib"],
            "num_classes": classes, "num_particles": particles, "reason": None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Two processes, one all-reduce over NCCL on GPU 0: does the driver let two ranks share it?
SHARED_GPU_PROBE = """
import torch, torch.distributed as dist
dist.init_process_group("nccl")
torch.cuda.set_device(0)
x = torch.ones(1, device="cuda:0") * (dist.get_rank() + 1)
dist.all_reduce(x)
assert x.item() == 3, x.item()
dist.destroy_process_group()
"""


def torchrun(args: list[str], folder: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), *args],
                          capture_output=True, text=True, cwd=folder, env=env, timeout=timeout)


def check_nccl(setting: Setting, folder: Path) -> dict:
    """svi_train.py under torchrun with 2 processes: NCCL on 2 GPUs (gloo in --dry-run)."""
    if setting.device == "cuda" and torch.cuda.device_count() < 2:
        probe = folder / "probe.py"
        probe.write_text(SHARED_GPU_PROBE)
        done = torchrun([str(probe)], folder, timeout=120)
        shared = "allows" if done.returncode == 0 else "refuses"
        tail = "" if done.returncode == 0 else f" ({_last_error(done.stderr)})"
        return {"status": "skipped", "detail": f"one GPU; the driver {shared} two NCCL ranks "
                f"on it{tail}", "reason": "one GPU: svi_train.py gives each process the GPU "
                "of its LOCAL_RANK, so 2 NCCL processes need 2 GPUs",
                "shared_gpu_all_reduce": done.returncode == 0}
    args = [*fixture_run_args(setting, folder), "--out", str(folder / "run")]
    done = torchrun([str(REPO / "experiments" / "svi_train.py"), *args], folder, timeout=300)
    print(done.stdout, done.stderr, sep="\n")
    backend = "gloo" if setting.device == "cpu" else "nccl"
    if done.returncode != 0:
        return {"status": "fail", "detail": f"{backend}: exit code {done.returncode}",
                "reason": _last_error(done.stderr)}
    results = json.loads((folder / "run" / "results.json").read_text())
    return {"status": "pass" if results["world_size"] == 2 else "fail",
            "detail": f"{backend}, 2 processes: HM {results['hm']:.2f}",
            "world_size": results["world_size"], "reason": None}


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "Error" in line or "error" in line]
    return (lines or stderr.splitlines() or ["no output"])[-1].strip()[:300]


def check_sweep(setting: Setting, folder: Path) -> dict:
    """benchmark.py --executor local: a grid of two seeds, each run pinned to a GPU."""
    root = fixture_run_args(setting, folder)[3]
    sets = ["dataset=eurosat", f"root={root}", f"backbone={TINY_BACKBONE}",
            "pretrained=none", "model=vpt_cond", "shots=4", "epochs=1", "num_particles=2",
            "batch_size=4", "views=1", f"cache_dir={folder / 'cache'}"]
    args = ["--protocol", "grid", "--grid", "seed=1,2", "--executor", "local",
            "--device", setting.device, "--out", str(folder / "sweep"),
            *[arg for item in sets for arg in ("--set", item)]]
    code = 0
    try:
        run_main(vars(bayesprompt.commands.benchmark)["main"], args)
    except SystemExit as stop:
        code = stop.code
    table = folder / "sweep" / "table.json"
    entries = json.loads(table.read_text())["entries"] if table.exists() else []
    devices = sorted({json.loads(path.read_text()).get("device", "?")
                      for path in (folder / "sweep").rglob("config.json")})
    ok = code == 0 and len(entries) == 2
    return {"status": "pass" if ok else "fail",
            "detail": f"{len(entries)} of 2 runs finished (exit code {code}), device "
                      f"{', '.join(devices)}", "runs": len(entries),
            "reason": None if ok else f"benchmark.py exited with {code}"}


SECTIONS: dict[str, Callable[[Setting, Path], dict]] = {
    "agreement": check_agreement, "resume": check_resume, "step": check_step,
    "imagenet_memory": check_imagenet_memory, "nccl": check_nccl, "sweep": check_sweep}


@contextlib.contextmanager
def logged(path: Path) -> Iterator[None]:
    """stdout and stderr of the block into `path`."""
    with open(path, "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        yield


def run_section(name: str, setting: Setting, out: Path) -> dict:
    """One section, its failure caught: {'status', 'detail', 'reason', 'seconds', ...}."""
    folder = out / "work" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    with logged(out / "logs" / f"{name}.log"):
        try:
            result = SECTIONS[name](setting, folder)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - reported, the others go on
            traceback.print_exc()
            result = {"status": "fail", "detail": f"{type(error).__name__}: {error}"[:300],
                      "reason": f"raised {type(error).__name__} (see logs/{name}.log)"}
    result["seconds"] = time.perf_counter() - start
    return result


def environment(setting: Setting) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": setting.device, "dry_run": setting.dry_run, "backbone": setting.backbone,
            "cpu_threads": torch.get_num_threads()}
    if setting.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda, nccl=str(torch.cuda.nccl.version()))
    return info


def markdown(report: dict) -> str:
    env = report["environment"]
    where = env.get("gpu", "CPU (--dry-run)")
    lines = [f"GPU check on {where}, torch {env['torch']}"
             + (f", CUDA {env['cuda']}" if "cuda" in env else ""), "",
             "| section | status | seconds | result |", "|---|---|---|---|"]
    for name, result in report["sections"].items():
        reason = result.get("reason")
        text = result["detail"] + (f" ({reason})" if reason and result["status"] != "pass"
                                   else "")
        lines.append(f"| {name} | {result['status']} | {result['seconds']:.0f} | "
                     f"{text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder of the report")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every section on the CPU with tiny shapes")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise UserError("No CUDA GPU is visible (torch.cuda.is_available() is False): this "
                        "check needs one. Pass --dry-run to exercise the script on the CPU.")
    setting = (Setting("cpu", TINY_BACKBONE, True) if args.dry_run
               else Setting("cuda", "ViT-B-16", False))
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(setting), "tolerances": TOLERANCES, "sections": {}}
    progress = tqdm(args.sections, desc="gpu check", unit="section")
    for name in progress:
        progress.set_postfix_str(name)
        result = run_section(name, setting, args.out)
        report["sections"][name] = result
        progress.write(f"{name}: {result['status']} ({result['seconds']:.0f} s) "
                       f"{result['detail']}")
        write_json(args.out / "gpu_check.json", report)  # what is done so far, kept
    write_text(args.out / "gpu_check.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    run_main(main)
