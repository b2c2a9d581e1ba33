"""Traceable pieces of Mask R-CNN inference: the same arithmetic as the eager model, written
so that one graph serves every image size.

Two tracers run this code. The ONNX exporter (TorchScript tracer) hands out sizes
(`x.shape[i]`) as 0-d int64 tensors, so size arithmetic must stay in tensor ops;
torch.export hands out SymInts, which tensor factories (arange, interpolate, pad) take
as they are. `size_tensor` turns either into a tensor where a tensor is needed; only the
image resize (`resized_size`) and the padding need ints and branch on which it got.

Shape letters: H/W input image size, Hr/Wr resized, Hp/Wp padded, T_l anchors of level
l, R RoIs / candidates, D detections, S mask size, K classes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from libs import ops as kernel_ops   # registers maskrcnn::roi_align / nms / ...

__all__ = ["size_tensor", "resized_size", "pad_to_multiple", "grid_anchors", "clip_boxes",
           "batched_nms", "level_scales", "map_levels", "pool_levels",
           "paste_masks_torchvision", "paste_masks_detectron2"]

# ONNX NonMaxSuppression's max_output_boxes_per_class: "all of them" (as torchvision).
_NO_LIMIT = 2 ** 62


def size_tensor(size) -> Tensor:
    """A size (int, SymInt, or the tracer's 0-d tensor) as a 0-d int64 tensor."""
    if isinstance(size, Tensor):
        return size.to(torch.int64)
    return torch.scalar_tensor(size, dtype=torch.int64)


def resized_size(h, w, min_size: int, max_size: int):
    """(Hr, Wr) of ImageTransform.resize: the shorter side to min_size, the longer capped
    at max_size, floor, at least 1 pixel; float64 as Python computes it.

    h, w: ints / SymInts (eager, torch.export) -> SymInts; 0-d tensors (ONNX tracer) ->
    0-d int64 tensors."""
    if isinstance(h, Tensor):
        hf, wf = h.to(torch.float64), w.to(torch.float64)
        # number / tensor would run as reciprocal(tensor) * number: not Python's division
        lo, hi = torch.full_like(hf, min_size), torch.full_like(hf, max_size)
        scale = torch.minimum(lo / torch.minimum(hf, wf), hi / torch.maximum(hf, wf))
        return (torch.floor(hf * scale).to(torch.int64).clamp(min=1),
                torch.floor(wf * scale).to(torch.int64).clamp(min=1))
    scale = torch.sym_min(min_size / torch.sym_min(h, w), max_size / torch.sym_max(h, w))
    # trunc == floor here (positive); .pt2 files can serialize math.trunc, not math.floor
    return (torch.sym_max(math.trunc(h * scale), 1), torch.sym_max(math.trunc(w * scale), 1))


def pad_to_multiple(x: Tensor, h, w, stride: int) -> Tensor:
    """Zero-pad x Tensor[N, C, h, w] at the bottom and right to multiples of stride."""
    pad_h = (h + stride - 1) // stride * stride - h
    pad_w = (w + stride - 1) // stride * stride - w
    return F.pad(x, (0, pad_w, 0, pad_h))


def grid_anchors(cell: Tensor, grid_h, grid_w, stride_h: Tensor, stride_w: Tensor) -> Tensor:
    """Tile cell anchors Tensor[A, 4] over a grid: Tensor[grid_h * grid_w * A, 4], ordered
    by location (row-major) then cell anchor; integer shifts added last, as the eager
    AnchorGenerator does. stride_h/w: 0-d int64 tensors."""
    shifts_x = torch.arange(0, grid_w, dtype=torch.int32) * stride_w
    shifts_y = torch.arange(0, grid_h, dtype=torch.int32) * stride_h
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4)


def round_log2(ratio: Tensor) -> Tensor:
    """round(log2(ratio)) of a float64 0-d tensor, as float64 (ONNX has no Log2)."""
    return torch.round(torch.log(ratio) / math.log(2.0))


def clip_boxes(boxes: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """boxes Tensor[..., 4] clamped to x in [0, w], y in [0, h] (h, w: 0-d tensors)."""
    w, h = w.to(boxes.dtype), h.to(boxes.dtype)
    zero = torch.zeros((), dtype=boxes.dtype)
    x = torch.minimum(torch.maximum(boxes[..., 0::2], zero), w)
    y = torch.minimum(torch.maximum(boxes[..., 1::2], zero), h)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per-category NMS by the coordinate-offset trick (libs.batched_nms, torchvision):
    each category shifted to its own square, one `maskrcnn::nms` (ONNX:
    NonMaxSuppression). boxes Tensor[R, 4] with coordinates >= 0 (clipped), scores
    Tensor[R], idxs Tensor[R] int64 -> kept indices Tensor[k] int64, by score."""
    # max(boxes, 0) is boxes.max() for clipped boxes, and defined for R = 0.
    top = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes.dtype) * (top + 1)
    return kernel_ops.nms(boxes + offsets[:, None], scores, float(iou_threshold))


def level_scales(feature_heights: Sequence, image_h: Tensor) -> Tensor:
    """Tensor[L] float32 scale of each level, 2 ** round(log2(H_l / Hr)) (pooling's
    level_scales: the resized image's height decides, so odd sizes give what eager
    gives)."""
    ratios = torch.stack([size_tensor(h).to(torch.float64) for h in feature_heights])
    ratios = (ratios / image_h.to(torch.float64)).to(torch.float32).to(torch.float64)
    return torch.pow(2.0, round_log2(ratios)).to(torch.float32)


def map_levels(boxes: Tensor, scales: Tensor, canonical_scale: float, canonical_level: int,
               level_rule: str, eps: float = 1e-6) -> Tensor:
    """Pyramid level index of each box Tensor[R, 4]: Tensor[R] int64 in [0, L) (pooling's
    map_levels with k_min, k_max from the scales)."""
    k_min = -round_log2(scales[0].to(torch.float64)).to(torch.float32)
    k_max = -round_log2(scales[-1].to(torch.float64)).to(torch.float32)
    s = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    if level_rule == "torchvision":
        lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale)
                          + torch.tensor(eps, dtype=s.dtype))
    else:
        lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale + 1e-8))
    lvl = torch.minimum(torch.maximum(lvl, k_min), k_max)
    return (lvl - k_min).to(torch.int64)


def pool_levels(features: list[Tensor], boxes: Tensor, scales: Tensor, output_size: int,
                sampling_ratio: int, aligned: bool, canonical_scale: float,
                canonical_level: int, level_rule: str, per_level: bool) -> Tensor:
    """Multi-level RoIAlign of one image's boxes Tensor[R, 4] -> Tensor[R, C, P, P].

    The boxes are scaled to each level's map here (scales are powers of two: exact) and
    the op runs with spatial_scale 1, so the scales may depend on the image size.
    per_level: one `maskrcnn::roi_align` per level (ONNX RoiAlign) and a scatter back into
    box order; else one `maskrcnn::roi_align_multilevel` (torch.export: our kernel)."""
    levels = map_levels(boxes, scales, canonical_scale, canonical_level, level_rule)
    sr = max(int(sampling_ratio), 0)      # <= 0: adaptive (ONNX: 0)
    if not per_level:
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes * scales[levels][:, None]], 1)
        return kernel_ops.roi_align_multilevel(features, rois, levels, [1.0] * len(features),
                                               output_size, output_size, sr, aligned)
    pooled, order = [], []
    for level, feature in enumerate(features):
        idx = torch.nonzero(levels == level).reshape(-1)
        level_boxes = boxes[idx] * scales[level]
        rois = torch.cat([torch.zeros_like(level_boxes[:, :1]), level_boxes], 1)
        pooled.append(kernel_ops.roi_align(feature, rois, 1.0, output_size, output_size, sr,
                                           aligned))
        order.append(idx)
    # Back into box order: row i of the result is row inverse[i] of the levels' rows.
    # (A scatter of the pooled rows, out[order] = pooled, traces into a ScatterND whose
    # update shape the tracer fixes when a level has one RoI: a gather does not.)
    order = torch.cat(order)
    inverse = torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0]))
    return torch.cat(pooled)[inverse]


# ------------------------------------------------------------------------ mask pasting

def _resize_rows(src: Tensor, valid: Tensor, in_size: int) -> Tensor:
    """One axis of a bilinear resize as a matrix: src Tensor[D, L] float32 source
    coordinates (>= 0) of L output pixels, valid Tensor[D, L] bool -> Tensor[D, L, in_size]
    (rows of invalid pixels zero). PyTorch's align_corners=False taps: i0 = floor(src),
    i1 = min(i0 + 1, in_size - 1)."""
    i0 = src.to(torch.int64).clamp(max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    lam1 = src - i0.to(torch.float32)
    lam0 = 1.0 - lam1
    taps = torch.arange(in_size, dtype=torch.int64)
    weights = ((taps == i0[..., None]).to(torch.float32) * lam0[..., None]
               + (taps == i1[..., None]).to(torch.float32) * lam1[..., None])
    return weights * valid[..., None].to(torch.float32)


def _torchvision_axis(start: Tensor, end: Tensor, length: Tensor, in_size: int,
                      image_side) -> Tensor:
    """Resize matrix Tensor[D, image_side, in_size] of the torchvision paste along one
    axis: the padded mask resized to `length` pixels starting at `start` (integer boxes,
    Tensor[D] int64), visible in [max(start, 0), min(end, side)); float arithmetic of
    heads.mask_head._bilinear_weights."""
    pos = torch.arange(image_side, dtype=torch.int64)
    dst = (pos[None] - start[:, None]).to(torch.float64)
    scale = (torch.full_like(length, in_size, dtype=torch.float32)
             / length.to(torch.float32)).to(torch.float64)
    src = ((dst + 0.5) * scale[:, None] - 0.5).to(torch.float32).clamp(min=0)
    valid = (pos[None] >= start.clamp(min=0)[:, None]) & (pos[None] < end[:, None])
    return _resize_rows(src, valid, in_size)


def paste_masks_torchvision(masks: Tensor, boxes: Tensor, image_h, image_w,
                            padding: int = 1) -> Tensor:
    """heads.mask_head.paste_masks_in_image as two batched matrix products: masks
    Tensor[D, 1, S, S] padded by `padding`, boxes Tensor[D, 4] scaled by (S + 2p) / S and
    truncated to ints, each mask resized bilinearly to its box's integer size and placed
    in an image_h x image_w canvas -> Tensor[D, 1, image_h, image_w]."""
    size = masks.shape[-1]
    padded = F.pad(masks[:, 0], (padding,) * 4).to(torch.float32)
    in_size = size + 2 * padding
    scale = float(in_size) / size
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    ibox = torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), 1)
    ibox = ibox.to(torch.int64)                      # truncation, as the eager paste
    box_w = (ibox[:, 2] - ibox[:, 0] + 1).clamp(min=1)
    box_h = (ibox[:, 3] - ibox[:, 1] + 1).clamp(min=1)
    end_x = torch.minimum(ibox[:, 0] + box_w, ibox[:, 2] + 1)
    end_y = torch.minimum(ibox[:, 1] + box_h, ibox[:, 3] + 1)
    wy = _torchvision_axis(ibox[:, 1], end_y, box_h, in_size, image_h)
    wx = _torchvision_axis(ibox[:, 0], end_x, box_w, in_size, image_w)
    return torch.bmm(torch.bmm(wy, padded), wx.transpose(1, 2))[:, None]


def _detectron2_axis(lo: Tensor, hi: Tensor, size: int, image_side) -> Tensor:
    """Resize matrix Tensor[D, image_side, size] of detectron2's grid_sample paste along
    one axis: pixel centres mapped into the box [lo, hi) (Tensor[D] float32), bilinear
    with zeros outside the mask, and nothing outside [floor(lo) - 1, ceil(hi) + 1)."""
    pos = torch.arange(image_side, dtype=torch.int64)
    g = (pos[None].to(torch.float32) + 0.5 - lo[:, None]) / (hi - lo)[:, None] * 2 - 1
    coord = ((g + 1) * size - 1) / 2                 # grid_sample, align_corners=False
    i0 = torch.floor(coord)
    lam1 = coord - i0
    i0 = i0.to(torch.int64)
    taps = torch.arange(size, dtype=torch.int64)
    weights = ((taps == i0[..., None]).to(torch.float32) * (1.0 - lam1)[..., None]
               + (taps == (i0 + 1)[..., None]).to(torch.float32) * lam1[..., None])
    first = torch.floor(lo).to(torch.int64) - 1
    last = torch.ceil(hi).to(torch.int64) + 1
    window = (pos[None] >= first[:, None]) & (pos[None] < last[:, None])
    return weights * window[..., None].to(torch.float32)


def paste_masks_detectron2(masks: Tensor, boxes: Tensor, image_h, image_w,
                           padding: int = 0) -> Tensor:
    """heads.mask_head.paste_masks_grid_sample (bilinear grid_sample of each mask over
    its box at pixel centres, zero outside the mask and outside the box's integer bounds
    widened by one pixel) as two batched matrix products: the bilinear weights factor
    per axis. masks Tensor[D, 1, S, S], boxes Tensor[D, 4] -> Tensor[D, 1, image_h,
    image_w]. padding: unused (the signature is shared)."""
    size = masks.shape[-1]
    boxes = boxes.to(torch.float32)
    wy = _detectron2_axis(boxes[:, 1], boxes[:, 3], size, image_h)
    wx = _detectron2_axis(boxes[:, 0], boxes[:, 2], size, image_w)
    return torch.bmm(torch.bmm(wy, masks[:, 0].to(torch.float32)), wx.transpose(1, 2))[:, None]


PASTE = {"torchvision": paste_masks_torchvision, "detectron2": paste_masks_detectron2}
