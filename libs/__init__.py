"""RoIAlign and NMS: torchvision-compatible entry points over our own kernels; and a
Winograd 3x3 convolution for the CPU.

    from libs import roi_align, nms, batched_nms, conv3x3, backend_info

The work is done by the ``torch.library`` ops in ``libs.ops`` (namespace ``maskrcnn``),
which call the compiled libraries in ``libs/build`` (``python libs/build_libs.py``) or,
when those are missing, the pure-PyTorch reference in ``libs.reference``.

Shapes: N images, C channels, H/W feature size, K RoIs, PH/PW pooled size, n boxes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import ops
from ._loader import backend_info

__all__ = ["roi_align", "nms", "batched_nms", "conv3x3", "backend_info", "boxes_to_rois",
           "pooling_dtype"]

# Above these many boxes batched_nms loops over classes instead of offsetting boxes
# (the offset trick's single NMS is quadratic in the total; the loop in per-class sizes).
_LOOP_ABOVE = {"cpu": 1000, "cuda": 25000}


def _pair(output_size) -> Tuple[int, int]:
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    try:
        ph, pw = (int(v) for v in output_size)
    except (TypeError, ValueError):
        raise ValueError(f"output_size must be an int or (int, int), got {output_size!r}")
    if ph <= 0 or pw <= 0:
        raise ValueError(f"output_size must be positive, got {tuple(output_size)}")
    return ph, pw


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """list of Tensor[L_i, 4] (per image) -> Tensor[sum L_i, 5] with the image index first."""
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4], got {shape}")
    if len(boxes) == 0:
        return torch.zeros((0, 5))
    cat = torch.cat([b for b in boxes], dim=0)
    ids = torch.cat([torch.full((b.shape[0], 1), float(i), dtype=cat.dtype, device=cat.device)
                     for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, cat], dim=1)


def roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size,
              spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """RoIAlign (Mask R-CNN), same signature and results as ``torchvision.ops.roi_align``.

    Args:
        input: Tensor[N, C, H, W] float32/float64 (CUDA also float16/bfloat16);
            NCHW- or channels_last-contiguous inputs are used without a copy.
        boxes: Tensor[K, 5] rows (batch_index, x1, y1, x2, y2), or a list of N
            Tensor[L_i, 4] (one per image), in image coordinates.
        output_size: int or (PH, PW).
        spatial_scale: feature size / image size (e.g. 1/4 for stride 4).
        sampling_ratio: samples per bin along each axis; <= 0 means ceil(roi_size / PH).
        aligned: shift the box by -0.5 pixel (the pixel-centre convention; Detectron2).

    Returns:
        Tensor[K, C, PH, PW]; differentiable w.r.t. ``input`` (not the boxes).
    """
    if not isinstance(input, Tensor) or input.dim() != 4 or not input.is_floating_point():
        what = (f"{input.dtype} Tensor{list(input.shape)}" if isinstance(input, Tensor)
                else type(input).__name__)
        raise ValueError(f"roi_align: input must be a 4-D float Tensor[N, C, H, W], got {what}")
    ph, pw = _pair(output_size)
    if isinstance(boxes, (list, tuple)):
        rois = boxes_to_rois(boxes)
        if len(boxes) == 0:
            rois = rois.to(input.device)
    elif isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError("roi_align: boxes must be a Tensor[K, 5] (batch_index, x1, y1, "
                             f"x2, y2) or a list of Tensor[L, 4], got Tensor{list(boxes.shape)}")
        rois = boxes
    else:
        raise ValueError("roi_align: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], "
                         f"got {type(boxes).__name__}")
    if rois.device != input.device:
        raise ValueError(f"roi_align: boxes are on {rois.device} but input is on "
                         f"{input.device}: move them with .to(input.device)")
    dtype = pooling_dtype(input.dtype, rois.dtype)
    out = ops.roi_align(input.to(dtype), rois.to(dtype), float(spatial_scale), ph, pw,
                        int(sampling_ratio), bool(aligned))
    return out.to(input.dtype)


def pooling_dtype(feature_dtype: torch.dtype, rois_dtype: torch.dtype) -> torch.dtype:
    """The dtype RoIAlign computes in: the features' own, except half-precision features
    with float32/float64 boxes (autocast), pooled in float32 as torchvision's autocast rule
    does, because box coordinates rounded to float16 are up to half a pixel off at 1000 px."""
    if feature_dtype in (torch.float16, torch.bfloat16) and \
            rois_dtype in (torch.float32, torch.float64):
        return torch.float32
    return feature_dtype


def _check_per_box(op: str, name: str, t: Tensor, boxes: Tensor, what: str) -> None:
    """``t`` must be a Tensor[n] on ``boxes``' device, n = number of boxes."""
    n = boxes.shape[0]
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n:
        shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a Tensor[n] with n = {n} ({what}), "
                         f"got {shape}")
    if t.device != boxes.device:
        raise ValueError(f"{op}: {name} are on {t.device} but boxes are on "
                         f"{boxes.device}: move them with .to(boxes.device)")


def _check_nms_args(boxes: Tensor, scores: Tensor) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"nms: boxes must be a Tensor[n, 4] (x1, y1, x2, y2), got {shape}")
    _check_per_box("nms", "scores", scores, boxes, "one per box")
    if not boxes.is_floating_point():
        raise ValueError(f"nms: boxes must be floating point, got {boxes.dtype}")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, identical to ``torchvision.ops.nms``.

    Args:
        boxes: Tensor[n, 4] (x1, y1, x2, y2). scores: Tensor[n].
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box is
            strictly greater than this.

    Returns:
        Tensor[k] int64 indices of the kept boxes, by descending score (ties: lower index
        first).
    """
    _check_nms_args(boxes, scores)
    return ops.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category ``idxs``; same result as ``torchvision.ops.batched_nms``.

    Args:
        boxes: Tensor[n, 4]. scores: Tensor[n]. idxs: Tensor[n] integer category per box.

    Returns:
        Tensor[k] int64 kept indices, by descending score (ties: lower index first).
    """
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return _batched_nms_traced(boxes, scores, idxs, iou_threshold)
    _check_nms_args(boxes, scores)
    _check_per_box("batched_nms", "idxs", idxs, boxes, "one category per box")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if n > _LOOP_ABOVE.get(boxes.device.type, 1000) and not torch.compiler.is_compiling():
        return _batched_nms_loop(boxes, scores, idxs, iou_threshold)
    return _batched_nms_offset(boxes, scores, idxs, iou_threshold)


def _batched_nms_offset(boxes, scores, idxs, iou_threshold):
    # Shift each category to its own disjoint square so one NMS never mixes categories.
    # Half precision lacks the range for the shifted coordinates: use float32 then.
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _batched_nms_traced(boxes, scores, idxs, iou_threshold):
    # An exported graph holds for every box count: no branch on n, and max(boxes, 0)
    # (boxes.max() for the clipped boxes the model passes) is defined for n = 0 too.
    top = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes.dtype) * (top + 1)
    return ops.nms(boxes + offsets[:, None], scores, float(iou_threshold))


def _batched_nms_loop(boxes, scores, idxs, iou_threshold):
    keep_mask = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for cls in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == cls).flatten()
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.nonzero(keep_mask).flatten()
    # Stable sort: ties in score keep index order, as the offset path's NMS does.
    return keep[torch.sort(scores[keep], descending=True, stable=True)[1]]


def _describe(t) -> str:
    return f"{t.dtype} Tensor{list(t.shape)} on {t.device}" if isinstance(t, Tensor) \
        else type(t).__name__


def conv3x3(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
            relu: bool = False) -> Tensor:
    """relu?(F.conv2d(input, weight, bias, padding=1)) by Winograd F(4x4, 3x3).

    4x fewer multiplications than the direct convolution: about 2x faster than oneDNN's
    on 2 CPU cores for 256-channel FPN maps (docs/benchmarks.md). The rounding error is
    about 4x a direct float32 conv's; float64 is exact to ~1e-13. The native kernels take
    CPU float32 / float64 with C and K multiples of 8; other inputs run F.conv2d.

    Args:
        input: Tensor[N, C, H, W]. weight: Tensor[K, C, 3, 3]. bias: Tensor[K] or None.
        relu: apply max(., 0) to the output (fused into the output transform).

    Returns:
        Tensor[N, K, H, W] (channels-last memory); differentiable w.r.t. all three (the
        backward runs in the Winograd domain too).
    """
    if not isinstance(input, Tensor) or input.dim() != 4 or not input.is_floating_point():
        raise ValueError(f"conv3x3: input must be a 4-D float Tensor[N, C, H, W], got "
                         f"{_describe(input)}")
    C = input.shape[1]
    if not isinstance(weight, Tensor) or weight.dim() != 4 or \
            tuple(weight.shape[1:]) != (C, 3, 3):
        raise ValueError(f"conv3x3: weight must be a Tensor[K, {C}, 3, 3] (input has {C} "
                         f"channels), got {_describe(weight)}")
    K = weight.shape[0]
    if bias is None:
        bias = weight.new_zeros(K)
    elif not isinstance(bias, Tensor) or tuple(bias.shape) != (K,):
        raise ValueError(f"conv3x3: bias must be None or a Tensor[{K}], got {_describe(bias)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != input.device or t.dtype != input.dtype:
            raise ValueError(f"conv3x3: {name} is {_describe(t)} but input is "
                             f"{_describe(input)}: use one device and dtype")
    return ops.conv3x3_winograd(input, weight, bias, bool(relu))
