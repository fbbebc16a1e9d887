"""Data-parallel training under torchrun: the process group, ranks, and the collectives SVI needs.

`torchrun --nproc_per_node N experiments/svi_train.py ...` starts N processes; each joins the
process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
NCCL with the GPU of its LOCAL_RANK on CUDA, gloo on the CPU. Without torchrun, or with one
process, nothing is initialised and every helper here is a no-op for a world of size 1.

Each rank takes its slice of the same global batch; its per-image objective is weighted by its
share of the batch, so the sum of the weighted gradients over ranks is the full-batch gradient.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from bayesprompt.errors import UserError

#: How long a rank waits at a barrier or collective. Long, because the other ranks wait while
#: rank 0 writes the offline world and computes the feature cache of a whole dataset.
TIMEOUT = timedelta(hours=2)


def world_size() -> int:
    """Number of processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0, the one process that writes files and evaluates."""
    return rank() == 0


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the torchrun job of the environment for the duration of the block, if there is one.

    `device` is the user's --device: 'cuda' selects NCCL and the GPU of LOCAL_RANK, 'cpu' gloo.
    """
    if _launched_world_size() == 1 or dist.is_initialized():
        yield
        return
    if device.startswith("cuda"):
        if device != "cuda":
            raise UserError(
                f"--device {device} names one GPU, but torchrun started "
                f"{_launched_world_size()} processes, which need one GPU each. Pass --device "
                "cuda: each process then uses the GPU of its LOCAL_RANK."
            )
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """The device this rank computes on: 'cuda' becomes the GPU of LOCAL_RANK under torchrun."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def _collective_device() -> torch.device:
    """Where tensors of collectives live: this rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank arrives here."""
    if world_size() == 1:
        return
    device = _collective_device()
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def _rank_zero_succeeded(succeeded: bool) -> bool:
    """Rank 0's `succeeded`, received by every rank (a barrier that carries one flag)."""
    flag = torch.tensor([float(succeeded)], device=_collective_device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (writing caches); the others then run it (reading them).

    If the block fails on rank 0, the others stop with a UserError rather than a broken
    barrier, so the user reads rank 0's error message without tracebacks.
    """
    if world_size() == 1:
        yield
    elif is_main_process():
        try:
            yield
        except BaseException:
            _rank_zero_succeeded(False)
            raise
        _rank_zero_succeeded(True)
    else:
        if not _rank_zero_succeeded(False):
            raise UserError(f"(rank {rank()}) stopped: rank 0 failed with the error above.")
        yield


def check_batch_size(batch_size: int) -> None:
    """A global batch must give every rank at least one image per full step."""
    if batch_size < world_size():
        raise UserError(
            f"--batch-size {batch_size} is the global batch, split across the "
            f"{world_size()} processes torchrun started, so some would have no image in every "
            f"step. Pass --batch-size {world_size()} or more (a multiple of the number of "
            "processes splits evenly), or start fewer processes."
        )


def shard(index: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's slice of a global batch of image indices (B,), and its weight b_r / B.

    Slices differ in size by at most one image. A rank left without an image (a last batch
    smaller than the world) runs on the batch's first image with weight 0, so every rank runs
    the same program and takes part in the same collectives.
    """
    if world_size() == 1:
        return index, 1.0
    local = torch.tensor_split(index, world_size())[rank()]
    if len(local) == 0:
        return index[:1], 0.0
    return local, len(local) / len(index)


def seed_rank_stream(seed: int, epoch: int) -> None:
    """Give ranks other than 0 their own particle noise, reseeded at each epoch.

    Rank 0 keeps the single-process random stream (saved in checkpoints). The others are
    reseeded from (seed, epoch, rank) at the start of every epoch, so that their noise is
    independent of rank 0's and a resumed run (which restarts at an epoch) draws the same.
    """
    if rank() > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank()]).generate_state(1)[0]))


@torch.no_grad()
def broadcast_parameters(parameters: list[torch.Tensor]) -> None:
    """Overwrite every rank's parameters with rank 0's, in place (one flat broadcast)."""
    if world_size() == 1 or not parameters:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    dist.broadcast(flat, src=0)
    for p, values in zip(parameters, flat.split([p.numel() for p in parameters]), strict=True):
        p.copy_(values.view_as(p))


@torch.no_grad()
def all_reduce_gradients(parameters: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum the (share-weighted) gradients and a scalar loss over ranks; returns the summed loss.

    One flat all-reduce carries the gradients, a has-gradient count per parameter (a parameter
    that no rank's graph reached keeps `grad = None`, as in a single process, so the optimiser
    skips it) and the loss.
    """
    if world_size() == 1:
        return loss
    sizes = [p.numel() for p in parameters]
    grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
             for p in parameters]
    reached = torch.tensor([p.grad is not None for p in parameters], dtype=loss.dtype,
                           device=loss.device)
    flat = torch.cat([*grads, reached, loss.detach().reshape(1)])
    dist.all_reduce(flat)
    *summed, reached, total = flat.split([*sizes, len(parameters), 1])
    for p, grad, count in zip(parameters, summed, reached.tolist(), strict=True):
        p.grad = grad.view_as(p).clone() if count > 0 else None
    return total[0]


#: The reductions of `reduce_named`, with the value a rank lacking a name contributes.
_REDUCTIONS = {"sum": (dist.ReduceOp.SUM, 0.0), "min": (dist.ReduceOp.MIN, math.inf),
               "max": (dist.ReduceOp.MAX, -math.inf)}


@torch.no_grad()
def reduce_named(values: dict[str, torch.Tensor], op: str) -> dict[str, torch.Tensor]:
    """Named scalars reduced over ranks (`op`: "sum", "min" or "max"), for every name some
    rank holds (a rank without it adds nothing to the reduction). One exchange of the names
    and one all-reduce: call it on every rank, at the same point, rarely (log rows)."""
    if world_size() == 1:
        return values
    reduce_op, missing = _REDUCTIONS[op]
    held: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(held, sorted(values))
    names = sorted({name for rank_names in held for name in rank_names})
    device = _collective_device()
    flat = torch.tensor([missing] * len(names), dtype=torch.float64, device=device)
    for position, name in enumerate(names):
        if name in values:
            flat[position] = values[name].to(device, torch.float64)
    dist.all_reduce(flat, op=reduce_op)
    return dict(zip(names, flat, strict=True))
