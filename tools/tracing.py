"""What the eval forward needs to trace once for every image size.

Two tracers run the model's own eval forward (deploy/): the ONNX exporter's TorchScript
tracer hands out sizes (`x.shape[i]`) as 0-d int64 tensors, so size arithmetic must stay
in tensor ops or it is frozen at the example's value; torch.export hands out SymInts,
which tensor factories take as they are, and Python arithmetic on them guards (a guard on
a dynamic size fails the export). The modules branch on `is_tracing()` only where the
eager arithmetic would freeze a size, and compute the same numbers there.

    if is_tracing():
        h = size_tensor(image.shape[-2])      # 0-d int64, follows the input
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .intmath import float64_floor_times_ratio, int_less

__all__ = ["is_tracing", "size_tensor", "resized_size", "round_log2"]


def is_tracing() -> bool:
    """The forward is being traced for export (TorchScript tracer or torch.export)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def size_tensor(size, device=None) -> Tensor:
    """A size (int, SymInt, or the tracer's 0-d tensor) as a 0-d int64 tensor."""
    if isinstance(size, Tensor):
        return size.to(dtype=torch.int64, device=device)
    return torch.scalar_tensor(size, dtype=torch.int64, device=device)


def resized_size(h, w, min_size: int, max_size: int):
    """(Hr, Wr) of an image resized so that its shorter side is min_size and its longer
    side at most max_size: floor(side * scale), at least 1, with
    scale = min(min_size / min(h, w), max_size / max(h, w)) in float64 as Python computes
    it (so 389 x (512 / 389) floors to 511, as in eager).

    h, w: ints -> ints; SymInts (torch.export) -> SymInts; 0-d tensors (TorchScript
    tracer) -> 0-d int64 tensors, exact for sides below 2^15 and sizes up to 2^13."""
    if isinstance(h, Tensor):
        # In integers (tools.intmath): OpenVINO's CPU plugin runs float64 in float32,
        # where 300 * (320 / 200) floors to 479 instead of 480.
        sides = torch.stack((h, w)).to(torch.int64)
        short, long = sides.min().reshape(1), sides.max().reshape(1)
        # scale = min(min_size / short, max_size / long), compared as exact fractions
        # (float64 division is monotonic: it cannot reorder them).
        by_min = ~int_less(max_size * short, min_size * long)
        num = torch.where(by_min, torch.full_like(long, min_size),
                          torch.full_like(long, max_size))
        den = torch.where(by_min, short, long)
        hr, wr = float64_floor_times_ratio(sides, num, den).clamp(min=1).unbind(0)
        return hr, wr
    if isinstance(h, int) and isinstance(w, int):
        scale = min(min_size / min(h, w), max_size / max(h, w))
        return max(math.floor(h * scale), 1), max(math.floor(w * scale), 1)
    scale = torch.sym_min(min_size / torch.sym_min(h, w), max_size / torch.sym_max(h, w))
    # trunc == floor here (positive); .pt2 files can serialize math.trunc, not math.floor
    return (torch.sym_max(math.trunc(h * scale), 1), torch.sym_max(math.trunc(w * scale), 1))


def round_log2(ratio: Tensor) -> Tensor:
    """round(log2(ratio)) of a float64 tensor, as float64 (ONNX has no Log2)."""
    return torch.round(torch.log(ratio) / math.log(2.0))
