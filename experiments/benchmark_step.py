"""Time one SVI step of a model, and a reference-style step, side by side in one process.

    python experiments/benchmark_step.py --backbone ViT-B-16 --model vpt_cond \\
        --num-particles 20 --num-classes 5 --rounds 3

Our step: cached image features (random unit vectors: random init costs what pretrained
weights cost), the model file's Pyro program, the objective, backward, SGD; the text tower
shares the [SOS] + context prefix over classes and stops at the longest EOT.
The reference-style step is Bayesian Prompt Learning's conditional step (cocoopvpt) as the
reference code runs it: batch 1, the image tower in every step, L x C prompts of the full 77
tokens through open_clip's transformer, no prefix sharing, fp32. Rounds alternate the two, so
the ratio is taken under the same load; the spread over rounds shows the noise of a shared
machine. FLOPs are counted by `torch.utils.flop_counter` (matrix products; attention scores,
1-3% of the work here, are not counted on the CPU) and set against a matmul of the same
precision timed in the same run. `--no-reference` measures our step alone, e.g. its peak
memory (the process's peak RSS, or the CUDA allocator's peak). The reference-style step's
memory is estimated first; when its L x C full-length prompts would not fit the available
memory, it runs with as many particles as fit and its time and FLOPs are extrapolated to L by
its FLOPs (linear in L x C), or, when not one particle fits, it is skipped; either way one line
says so.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bayesprompt.clip.factory import load_clip
from bayesprompt.clip.model import PRECISIONS, FrozenCLIP
from bayesprompt.clip.text_tower import (
    TextBudget,
    causal_text_features,
    free_memory_bytes,
    sequence_bytes,
)
from bayesprompt.commands.cli import add_common_arguments, run_main
from bayesprompt.data.datasets import EUROSAT_NAMES
from bayesprompt.files import write_json
from bayesprompt.inference.objectives import OBJECTIVES, PAPER_KL_WEIGHT, make_objective
from bayesprompt.program.base import PromptConfig, PromptModel
from bayesprompt.program.guides import AmortizedGaussian
from bayesprompt.program.prompts import initial_context, prompt_classname
from bayesprompt.runs.config import default_precision
from bayesprompt.runs.model_files import load_model_class

#: Share of the available memory (RAM, or free GPU memory) a reference-style step may take.
REFERENCE_MEMORY_SHARE = 0.8


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1
          ) -> float:
    """Median seconds of `step()` over `repeats` runs after `warmup` runs."""
    times = []
    for index in range(repeats + warmup):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def counted_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one `step()`, forward and backward."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, repeats: int = 5
                            ) -> float:
    """This machine's throughput on a (2048 x 512) @ (512 x 2048) matmul, FLOP/s."""
    a = torch.randn(2048, 512, device=device, dtype=dtype)
    b = torch.randn(512, 2048, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats, warmup=2)
    return 2 * 2048 * 512 * 2048 / seconds


def benchmark_classnames(count: int) -> list[str]:
    """EuroSAT's class names (base classes first), repeated to `count` names."""
    names = list(EUROSAT_NAMES.values())
    return [names[i % len(names)] for i in range(count)]


class OurStep:
    """One SVI step of a model file on cached features: objective, backward, SGD."""

    def __init__(self, clip: FrozenCLIP, program: PromptModel, objective: str,
                 num_particles: int, batch_size: int) -> None:
        self.clip = clip
        self.program = program
        self.features = F.normalize(torch.randn(batch_size, clip.feature_dim,
                                                device=clip.device), dim=-1)
        self.labels = torch.zeros(batch_size, dtype=torch.long, device=clip.device)
        program.clear_parameters()
        self.objective = make_objective(program, objective, num_particles)
        self.objective(self.features, self.labels, 80)  # creates the program's parameters
        self.optimizer = torch.optim.SGD(program.learned_parameters().values(), lr=0.002,
                                         momentum=0.9)
        self.prompt_tokens = 0
        self.prompts = 0

    def __call__(self) -> None:
        self.optimizer.zero_grad()
        self.objective(self.features, self.labels, 80).backward()
        self.optimizer.step()

    def count_prompts(self) -> None:
        """Run one step and count the prompts and the token rows the text tower ran."""
        encode = self.clip.encode_shared_prefix

        def counting(prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor
                     ) -> torch.Tensor:
            groups = prefix[..., 0, 0].numel()
            n_classes, suffix_len = suffix.shape[-3:-1]
            self.prompts += groups * n_classes
            self.prompt_tokens += groups * (prefix.shape[-2] + n_classes * suffix_len)
            return encode(prefix, suffix, eot)

        self.clip.encode_shared_prefix = counting
        try:
            self()
        finally:
            del self.clip.encode_shared_prefix


class ReferenceStyleStep:
    """Bayesian Prompt Learning's conditional step as the reference code runs it, in fp32.

    Batch 1: the image tower on a 3 x size x size image, the amortized residual r ~ q(r | f)
    drawn L times, L x C prompts of the full context length through open_clip's transformer,
    the reference loss (-log mean_l p(y | r_l) + 0.001 KL), backward, SGD.
    """

    def __init__(self, clip: FrozenCLIP, classnames: list[str], n_ctx: int,
                 num_particles: int) -> None:
        self.clip = clip
        self.num_particles = num_particles
        placeholder = " ".join(["X"] * n_ctx)
        ids = clip.tokenize([f"{placeholder} {prompt_classname(c)}." for c in classnames])
        embeddings = clip.token_embeddings(ids)                                # (C, 77, W)
        self.sos, self.suffix = embeddings[:, :1], embeddings[:, 1 + n_ctx:]
        self.eot = ids.argmax(-1).repeat(num_particles)                       # (L C,)
        self.ctx = torch.nn.Parameter(initial_context(clip, n_ctx, "a photo of a"))
        self.posterior = AmortizedGaussian(clip.feature_dim, clip.embed_dim).to(clip.device)
        self.optimizer = torch.optim.SGD([self.ctx, *self.posterior.parameters()], lr=0.002,
                                         momentum=0.9)
        size = clip.image_stats.size
        self.image = torch.randn(1, 3, size, size, device=clip.device)
        self.prompt_tokens = num_particles * embeddings.shape[0] * embeddings.shape[1]
        self.prompts = num_particles * embeddings.shape[0]

    def __call__(self) -> None:
        clip = self.clip
        with torch.no_grad():
            image = F.normalize(clip.model.encode_image(self.image), dim=-1)[0]   # (D,)
        loc, scale = self.posterior(image[None])                                # (1, W) each
        r = loc + scale * torch.randn(self.num_particles, loc.shape[-1], device=loc.device)
        context = (self.ctx + r[:, None]).unsqueeze(1)                          # (L, 1, n, W)
        n_classes = self.sos.shape[0]
        prompts = torch.cat([self.sos.expand(self.num_particles, -1, -1, -1),
                             context.expand(-1, n_classes, -1, -1),
                             self.suffix.expand(self.num_particles, -1, -1, -1)], dim=-2)
        text = causal_text_features(clip.text, prompts.flatten(0, 1), self.eot)
        text = F.normalize(text, dim=-1).unflatten(0, (self.num_particles, n_classes))
        log_lik = torch.log_softmax(clip.logit_scale * text @ image, dim=-1)[:, 0]   # (L,)
        nll = -(torch.logsumexp(log_lik, dim=0) - math.log(self.num_particles))
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)).mean()
        self.optimizer.zero_grad()
        (nll + PAPER_KL_WEIGHT * kl).backward()
        self.optimizer.step()


def reference_step_bytes(clip: FrozenCLIP, num_prompts: int) -> int:
    """Estimated peak memory of a reference-style step of `num_prompts` (L x C) prompts: the
    text tower's activations of full-length fp32 sequences kept for the backward pass."""
    length = clip.text.positional_embedding.shape[0]
    return num_prompts * sequence_bytes(clip.text, length, length, torch.float32, True)


def reference_particles(clip: FrozenCLIP, num_classes: int, num_particles: int
                        ) -> tuple[int, str | None]:
    """Particles of the reference-style step that fit the available memory, at most
    `num_particles` (0: not one), and the line that says why, when fewer than asked."""
    if clip.device.type == "cuda":  # blocks our step's allocator keeps count as free
        torch.cuda.empty_cache()
    available = free_memory_bytes(clip.device)
    per_particle = reference_step_bytes(clip, num_classes)
    fitting = min(num_particles, int(REFERENCE_MEMORY_SHARE * available // per_particle))
    if fitting == num_particles:
        return fitting, None
    need = (f"the reference-style step's {num_particles} x {num_classes} full-length prompts "
            f"need about {num_particles * per_particle / 2**30:.1f} GiB for the backward pass, "
            f"more than {REFERENCE_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB "
            f"available on {clip.device}")
    if fitting == 0:
        return 0, f"{need}, and one particle needs {per_particle / 2**30:.1f} GiB: skipped."
    return fitting, (f"{need}: it runs with {fitting} particles, its time and FLOPs "
                     f"extrapolated to {num_particles} by FLOPs (linear in L x C).")


def flop_counting_note(clip: FrozenCLIP, program: PromptModel, sequences: int,
                       precision: str) -> str | None:
    """Why our step's FLOPs cannot be counted here (the counter keeps the activations of all
    `sequences` = L x B x C prompts alive, recomputed chunks too), or None when they fit."""
    suffix_len, prefix_len = program.prompts.suffix.shape[-2], 1 + program.config.n_ctx
    need = sequences * sequence_bytes(clip.text, suffix_len, prefix_len + suffix_len,
                                      PRECISIONS[precision], True)
    available = free_memory_bytes(clip.device)
    if need <= REFERENCE_MEMORY_SHARE * available:
        return None
    return (f"FLOPs of our step not counted: the counter keeps the activations of all "
            f"{sequences} prompts, about {need / 2**30:.1f} GiB, more than "
            f"{REFERENCE_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available "
            "(--skip-flops says so up front).")


def reference_flops_per_prompts(clip: FrozenCLIP, classname: str, n_ctx: int
                                ) -> tuple[int, int]:
    """(K, f): a reference-style step of P = L x C prompts does K + P f FLOPs (K: the image
    tower and the posterior; f: one full-length prompt), from steps of one and two prompts."""
    one, two = (counted_flops(ReferenceStyleStep(clip, [classname] * n, n_ctx, 1))
                for n in (1, 2))
    return 2 * one - two, two - one


def figures(seconds: float, flops: int | None, images: int, prompts: int, tokens: int,
            machine_flops: float) -> dict:
    """Per-step figures of a timed step (FLOP figures None when not counted)."""
    row = {"step_s": seconds, "images_per_s": images / seconds,
           "prompts_per_s": prompts / seconds, "tokens_per_s": tokens / seconds,
           "gflop_per_step": None, "gflop_per_s": None, "of_matmul": None}
    if flops is not None:
        row.update(gflop_per_step=flops / 1e9, gflop_per_s=flops / seconds / 1e9,
                   of_matmul=flops / seconds / machine_flops)
    return row


def describe(name: str, row: dict) -> str:
    text = (f"{name:<16} {row['step_s'] * 1000:9.1f} ms  {row['images_per_s']:8.2f} img/s  "
            f"{row['prompts_per_s']:9.0f} prompts/s  {row['tokens_per_s']:10.0f} tokens/s")
    if row["gflop_per_step"] is None:
        return text
    return (f"{text}  {row['gflop_per_step']:8.1f} GFLOP  {row['gflop_per_s']:6.1f} GFLOP/s "
            f"({100 * row['of_matmul']:.0f}% of matmul)")


def peak_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak since its last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: torch.device) -> str:
    where = "allocated on the GPU" if device.type == "cuda" else "peak RSS"
    return f"{peak_bytes(device) / 2**30:.2f} GiB {where}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--pretrained", default=None,
                        help="weights (default: the backbone's embedded ones, else random init)")
    parser.add_argument("--model", default="vpt_cond")
    parser.add_argument("--objective", default="paper", choices=OBJECTIVES)
    parser.add_argument("--num-particles", type=int, default=20, help="L")
    parser.add_argument("--batch-size", type=int, default=1, help="B, images per step")
    parser.add_argument("--num-classes", type=int, default=5,
                        help="C (EuroSAT's names, repeated; default: its 5 base classes)")
    parser.add_argument("--n-ctx", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternations of our step and the reference-style step")
    parser.add_argument("--reference-repeats", type=int, default=1,
                        help="timed reference-style steps per round")
    parser.add_argument("--no-reference", action="store_true",
                        help="time our step only (e.g. to measure its peak memory)")
    parser.add_argument("--prompt-chunk", type=int, help="prompts per text-tower chunk")
    parser.add_argument("--text-memory-gb", type=float,
                        help="memory budget of the text tower (default: a share of free memory)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute each text layer in the backward pass")
    parser.add_argument("--skip-flops", action="store_true",
                        help="do not count FLOPs (the counter keeps the activations of "
                        "recomputed chunks alive: a memory run of many prompts needs this)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    precision = args.precision or default_precision(args.device)
    torch.manual_seed(0)
    clip = load_clip(args.backbone, args.pretrained, args.device, precision,
                     text_budget=TextBudget(args.prompt_chunk, args.text_memory_gb),
                     grad_checkpointing=args.grad_checkpointing)
    device = clip.device
    classnames = benchmark_classnames(args.num_classes)
    program = load_model_class(args.model)(clip, classnames, PromptConfig(n_ctx=args.n_ctx))
    ours = OurStep(clip, program.to(device), args.objective, args.num_particles,
                   args.batch_size)
    ours.count_prompts()  # also the warm-up step
    machine = {name: matmul_flops_per_second(device, PRECISIONS[name])
               for name in dict.fromkeys(["fp32", precision])}
    reference = reference_flops = reference_note = None
    scale = 1.0  # the reference-style step's FLOPs at L over those of the step that runs
    rounds = []
    for index in range(args.rounds):
        our_seconds = timed(ours, device, args.repeats, warmup=0)
        if index == 0:  # our peak, before FLOP counting and the reference-style step
            our_peak, our_peak_bytes = peak_memory(device), peak_bytes(device)
            if device.type == "cuda":  # the reference-style step's own peak from here on
                torch.cuda.reset_peak_memory_stats(device)
            counting_note = None if args.skip_flops else flop_counting_note(
                clip, program, args.num_particles * args.batch_size * len(classnames),
                precision)
            if counting_note:
                print(counting_note)
            our_flops = None if args.skip_flops or counting_note else counted_flops(ours)
            if not args.no_reference:
                particles, reference_note = reference_particles(clip, len(classnames),
                                                                args.num_particles)
                if reference_note:
                    print(reference_note)
                if particles:
                    reference = ReferenceStyleStep(clip, classnames, args.n_ctx, particles)
                    reference_flops = counted_flops(reference)  # also its warm-up step
                if 0 < particles < args.num_particles:
                    fixed, per_prompt = reference_flops_per_prompts(clip, classnames[0],
                                                                    args.n_ctx)
                    full = fixed + per_prompt * args.num_particles * len(classnames)
                    scale, reference_flops = full / reference_flops, full
                    reference.prompts = args.num_particles * len(classnames)
                    reference.prompt_tokens = reference.prompt_tokens * args.num_particles \
                        // particles
        reference_seconds = None if reference is None else scale * timed(
            reference, device, args.reference_repeats, warmup=0)
        rounds.append((our_seconds, reference_seconds))
    our_seconds = statistics.median(r[0] for r in rounds)
    results = {
        "backbone": args.backbone, "model": args.model, "objective": args.objective,
        "device": str(device), "precision": precision, "num_particles": args.num_particles,
        "batch_size": args.batch_size, "num_classes": args.num_classes,
        "torch_threads": torch.get_num_threads(),
        "matmul_gflop_per_s": {name: value / 1e9 for name, value in machine.items()},
        "ours": figures(our_seconds, our_flops, args.batch_size, ours.prompts,
                        ours.prompt_tokens, machine[precision]),
        "our_peak_memory": our_peak, "our_peak_gib": our_peak_bytes / 2**30,
        "reference_note": reference_note,
        "text_budget_gib": clip.text_budget.memory_bytes(device) / 2**30,
        "prompt_chunk": args.prompt_chunk,
    }
    print(f"{args.model} on {args.backbone} ({device}, {precision}, "
          f"{torch.get_num_threads()} threads): L={args.num_particles}, "
          f"B={args.batch_size}, C={args.num_classes}, objective {args.objective}")
    print("matmul throughput: " + ", ".join(f"{name} {value / 1e9:.0f} GFLOP/s"
                                            for name, value in machine.items()))
    print(describe("ours", results["ours"]))
    if reference is not None:
        reference_seconds = statistics.median(r[1] for r in rounds)
        ratios = [r[1] / r[0] for r in rounds]
        results["reference_style"] = figures(reference_seconds, reference_flops, 1,
                                             reference.prompts, reference.prompt_tokens,
                                             machine["fp32"])
        results["reference_style"].update(
            particles_run=reference.num_particles, extrapolated=scale != 1.0,
            peak_gib=peak_bytes(device) / 2**30 if device.type == "cuda" else None)
        results["speedup_per_image"] = {
            "median": statistics.median(ratios) * args.batch_size,
            "min": min(ratios) * args.batch_size, "max": max(ratios) * args.batch_size}
        print(describe("reference-style", results["reference_style"]))
        speedup = results["speedup_per_image"]
        print(f"speed-up per image: {speedup['median']:.1f}x (rounds: "
              f"{', '.join(f'{r * args.batch_size:.1f}x' for r in ratios)})")
    chunk = f"{args.prompt_chunk} prompts" if args.prompt_chunk else (
        f"{results['text_budget_gib']:.2f} GiB (--text-memory-gb or free memory at the end)")
    print(f"text budget: {chunk}; peak memory after our steps: {our_peak}; at the end: "
          f"{peak_memory(device)}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    run_main(main)
