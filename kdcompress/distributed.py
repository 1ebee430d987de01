"""Multi-process training on torch.distributed: gloo on CPU, nccl on CUDA.

kdc runs under ``torchrun`` unchanged::

    torchrun --standalone --nproc_per_node=2 -m kdcompress run recipe.yaml
    kdc run recipe.yaml --nproc 2          # the same, launched for you

Every rank trains a DistributedDataParallel copy on its shard of each
epoch's shuffled order (the global batch stays ``data.batch_size``, split
across ranks, so the learning-rate schedule means the same thing); metrics are
summed across ranks; only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "init",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "local_rank",
    "shutdown",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (no-op when not under torchrun); return this rank's device."""
    if not launched_by_torchrun() or is_distributed():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
        # share the cores between the ranks on this machine
        per_rank = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(per_rank)
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity when not distributed)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
