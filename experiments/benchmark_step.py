"""Time one SVI step of a model on a backbone (random init costs what pretrained weights cost).

    python experiments/benchmark_step.py --backbone ViT-B-16 --model vpt_cond --device cuda

Prints the median step time, peak memory and the time of the text encoder on the truncated
prompts against the full 77-token sequence. Features are random unit vectors: this measures
the text tower and Pyro machinery, which dominate training once image features are cached.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

from bayesprompt.cli import add_common_arguments, run_main
from bayesprompt.clip import load_clip
from bayesprompt.data.datasets import EUROSAT_NAMES
from bayesprompt.infer import TrainConfig, make_objective
from bayesprompt.prompt_model import PromptConfig
from bayesprompt.runs import load_model_class


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, repeats: int) -> float:
    """Median seconds of `step()` over `repeats` runs after two warm-up runs."""
    times = []
    for index in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--model", default="vpt_cond")
    parser.add_argument("--num-particles", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    clip = load_clip(args.backbone, None, args.device, precision)
    classnames = list(EUROSAT_NAMES.values())[:5]  # EuroSAT base classes
    program = load_model_class(args.model)(clip, classnames, PromptConfig()).to(clip.device)
    features = F.normalize(torch.randn(args.batch_size, clip.feature_dim, device=clip.device),
                           dim=-1)
    labels = torch.zeros(args.batch_size, dtype=torch.long, device=clip.device)
    pyro.clear_param_store()
    objective = make_objective(program, TrainConfig(num_particles=args.num_particles))
    objective(features, labels, 80)
    optimizer = torch.optim.SGD([p for _, p in pyro.get_param_store().named_parameters()],
                                lr=0.002)
    if clip.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(clip.device)

    def svi_step() -> None:
        optimizer.zero_grad()
        objective(features, labels, 80).backward()
        optimizer.step()

    step_seconds = timed(svi_step, clip.device, args.repeats)
    if clip.device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(clip.device) / 2**30:.2f} GiB on the GPU"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"

    prompts = [f"X X X X {name}." for name in classnames] * args.num_particles
    ids = clip.tokenize(prompts)
    eot = ids.argmax(-1)
    length = int(eot.max()) + 1
    with torch.no_grad():
        short = clip.token_embeddings(ids[:, :length])
        full = clip.token_embeddings(ids)
        truncated = timed(lambda: clip.encode_prompts(short, eot), clip.device, args.repeats)
        untruncated = timed(lambda: clip.encode_prompts(full, eot), clip.device, args.repeats)
    print(f"{args.model} on {args.backbone} ({args.device}, {precision}), L={args.num_particles},"
          f" batch {args.batch_size}: SVI step {1000 * step_seconds:.1f} ms, peak {peak}; "
          f"text encoder on {len(prompts)} prompts: {1000 * truncated:.1f} ms at T={length} vs "
          f"{1000 * untruncated:.1f} ms at T={ids.shape[1]}")


if __name__ == "__main__":
    run_main(main)
