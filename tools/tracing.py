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
    tracer) -> 0-d int64 tensors."""
    if isinstance(h, Tensor):
        # 1-element, not 0-d: the ONNX exporter computes 0-d tensors ("scalars") in
        # float32, where 389 * (512 / 389) rounds up to 512.
        hf, wf = h.reshape(1).to(torch.float64), w.reshape(1).to(torch.float64)
        # A Python number / tensor traces as reciprocal(tensor) * number, which rounds
        # differently from Python's division: divide two tensors instead.
        lo, hi = torch.full_like(hf, min_size), torch.full_like(hf, max_size)
        scale = torch.minimum(lo / torch.minimum(hf, wf), hi / torch.maximum(hf, wf))
        return (torch.floor(hf * scale).to(torch.int64).clamp(min=1).reshape(()),
                torch.floor(wf * scale).to(torch.int64).clamp(min=1).reshape(()))
    if isinstance(h, int) and isinstance(w, int):
        scale = min(min_size / min(h, w), max_size / max(h, w))
        return max(math.floor(h * scale), 1), max(math.floor(w * scale), 1)
    scale = torch.sym_min(min_size / torch.sym_min(h, w), max_size / torch.sym_max(h, w))
    # trunc == floor here (positive); .pt2 files can serialize math.trunc, not math.floor
    return (torch.sym_max(math.trunc(h * scale), 1), torch.sym_max(math.trunc(w * scale), 1))


def round_log2(ratio: Tensor) -> Tensor:
    """round(log2(ratio)) of a float64 tensor, as float64 (ONNX has no Log2)."""
    return torch.round(torch.log(ratio) / math.log(2.0))
