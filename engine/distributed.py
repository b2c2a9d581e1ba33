"""Distributed data-parallel helpers: one process per GPU (or CPU processes with gloo).

Launched by `torchrun`, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; multi-node works with torchrun's usual flags (--nnodes, --node-rank,
--rdzv-endpoint ...). Without those variables everything runs as a single process and
every helper here is a no-op. Only rank 0 logs and writes files.

    torchrun --nproc-per-node 8 -m engine.cli train --config my.ini
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> bool:
    """Join the process group described by the environment (torchrun), once.

    NCCL on CUDA (each process takes GPU LOCAL_RANK), gloo on CPU. Returns True when
    running with more than one process.
    """
    if env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def device_for_rank() -> torch.device:
    """This process's device: its GPU (LOCAL_RANK) if CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank (so every rank takes the same decision)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average float values over ranks (for logging the same losses everywhere)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = list(values)          # every rank builds the same dict, so the same order
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                          device=device_for_rank() if dist.get_backend() == "nccl"
                          else "cpu")
    dist.all_reduce(tensor)
    tensor /= get_world_size()
    return dict(zip(keys, tensor.tolist()))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
