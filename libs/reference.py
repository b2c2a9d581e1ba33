"""Pure-PyTorch RoIAlign and NMS: the readable reference and the fallback.

These implement exactly the semantics in ``docs/kernels.md`` ("Semantics"; the same
arithmetic as ``torchvision.ops``) with ordinary tensor operations, so they run on any
device and any floating dtype. The compiled kernels in ``libs/csrc`` are tested against
``torchvision.ops``; these functions are what ``libs`` uses when a compiled library is
missing (or ``MASKRCNN_FORCE_FALLBACK=1``).

Shapes: N images, C channels, H/W feature height/width, K RoIs, PH/PW pooled size,
n boxes for NMS.

RoIAlign is separable: a sample point ``(y, x)`` of a bin takes its bilinear weights from
``y`` alone times ``x`` alone, and it is dropped when ``y`` or ``x`` is out of range. So the
four taps of every sample are built from per-axis tables (one for the rows of the
``PH x gh`` sample grid, one for the ``PW x gw`` columns), gathered from the input in one
indexing op and averaged. RoIs with the same sampling grid ``(gh, gw)`` are processed
together; with ``sampling_ratio > 0`` that is all of them at once.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
from torch import Tensor

__all__ = ["roi_align_forward", "roi_align_backward", "nms"]

# Upper bound on gathered elements (per tap) held at once; chunks RoIs of one grid size.
_GATHER_BUDGET = 1 << 22


def _axis_taps(start: Tensor, bin_size: Tensor, pooled: int, grid: int, size: int):
    """Bilinear taps along one axis for every sample coordinate of a group of RoIs.

    Args:
        start, bin_size: Tensor[k] RoI start and bin size on this axis (feature pixels).
        pooled: PH or PW. grid: samples per bin on this axis (gh or gw). size: H or W.

    Returns:
        (low, high, w_low, w_high): Tensor[k, pooled * grid]; low/high are int64 indices
        into [0, size), w_low/w_high the weights, already zero for out-of-range samples.
    """
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    i = torch.arange(grid, device=start.device, dtype=start.dtype)
    # Same expression and evaluation order as the kernels: start + p*bin + (i+.5)*bin/grid.
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
             + (i[None, None, :] + 0.5) * bin_size[:, None, None] / grid)
    coord = coord.reshape(start.shape[0], pooled * grid)
    # Written as "inside" so that NaN coordinates are outside too.
    inside = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    coord = torch.where(at_edge, low, coord)
    high = torch.where(at_edge, low, low + 1)
    w_high = coord - low
    w_low = 1.0 - w_high
    zero = torch.zeros_like(coord)
    w_low = torch.where(inside, w_low, zero)
    w_high = torch.where(inside, w_high, zero)
    # Out-of-range (and NaN) samples have zero weight; point their taps at pixel 0.
    low = torch.where(inside, low, zero).long()
    high = torch.where(inside, high, zero).long()
    return low, high, w_low, w_high


def _roi_geometry(rois: Tensor, spatial_scale: float, pooled_h: int, pooled_w: int,
                  sampling_ratio: int, aligned: bool):
    """Per-RoI start, bin size and sampling grid. rois: Tensor[K, 5] -> Tensor[K] each."""
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    rw = rois[:, 3] * spatial_scale - offset - x0
    rh = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:
        # Legacy behaviour: force malformed RoIs to be 1x1.
        rw = rw.clamp(min=1.0)
        rh = rh.clamp(min=1.0)
    bin_h = rh / pooled_h
    bin_w = rw / pooled_w
    if sampling_ratio > 0:
        gh = torch.full_like(rh, sampling_ratio, dtype=torch.int64)
        gw = torch.full_like(rw, sampling_ratio, dtype=torch.int64)
    else:
        # Adaptive grid; a degenerate aligned RoI gives an empty grid (never negative).
        gh = torch.nan_to_num(torch.ceil(rh / pooled_h), nan=0.0).clamp(min=0).long()
        gw = torch.nan_to_num(torch.ceil(rw / pooled_w), nan=0.0).clamp(min=0).long()
    return y0, x0, bin_h, bin_w, gh, gw


def _groups(gh: Tensor, gw: Tensor, per_roi: int) -> List[Tuple[Tensor, int, int]]:
    """Splits RoI indices into chunks sharing one grid (gh, gw) and fitting the budget."""
    if gh.numel() == 0:
        return []
    key = gh * (int(gw.max()) + 1) + gw
    out = []
    for k in torch.unique(key).tolist():
        idx = torch.nonzero(key == k).flatten()
        g_h, g_w = int(gh[idx[0]]), int(gw[idx[0]])
        if g_h == 0 or g_w == 0:
            continue  # empty grid: the output stays zero
        step = max(1, _GATHER_BUDGET // max(1, per_roi * g_h * g_w))
        for s in range(0, idx.numel(), step):
            out.append((idx[s:s + step], g_h, g_w))
    return out


def _group_taps(rois, idx, geometry, g_h, g_w, pooled_h, pooled_w, H, W):
    """Flat tap indices into an [N*H*W] plane and weights for RoIs ``idx``.

    Returns (batch Tensor[k], flat index list of 4 Tensor[k, S], weight list of 4 Tensor[k, S])
    with S = PH*gh*PW*gw ordered (ph, iy, pw, ix), taps ordered as in the spec.
    """
    y0, x0, bin_h, bin_w, _, _ = geometry
    yl, yh, wyl, wyh = _axis_taps(y0[idx], bin_h[idx], pooled_h, g_h, H)
    xl, xh, wxl, wxh = _axis_taps(x0[idx], bin_w[idx], pooled_w, g_w, W)
    batch = rois[idx, 0].long()  # int() of the batch index: truncation
    k = idx.numel()

    def outer(a, b):
        return (a[:, :, None] * b[:, None, :]).reshape(k, -1)

    def flat(yi, xi):
        return (yi[:, :, None] * W + xi[:, None, :]).reshape(k, -1)

    index = [flat(yl, xl), flat(yl, xh), flat(yh, xl), flat(yh, xh)]
    weight = [outer(wyl, wxl), outer(wyl, wxh), outer(wyh, wxl), outer(wyh, wxh)]
    return batch, index, weight


def roi_align_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                      pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign forward (differentiable w.r.t. ``input`` through autograd).

    Args:
        input: Tensor[N, C, H, W] floating.
        rois: Tensor[K, 5] rows (batch_index, x1, y1, x2, y2); treated as constants.

    Returns:
        Tensor[K, C, PH, PW] in input's dtype.
    """
    N, C, H, W = input.shape
    K = rois.shape[0]
    rois = rois.detach().to(input.dtype)
    out = input.new_zeros((K, C, pooled_h, pooled_w))
    if K == 0 or input.numel() == 0:
        return out
    geometry = _roi_geometry(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
    gh, gw = geometry[4], geometry[5]
    count = (gh * gw).clamp(min=1).to(input.dtype)
    planes = input.reshape(N, C, H * W)
    pieces, where = [], []
    for idx, g_h, g_w in _groups(gh, gw, C * pooled_h * pooled_w):
        batch, index, weight = _group_taps(rois, idx, geometry, g_h, g_w,
                                           pooled_h, pooled_w, H, W)
        acc = None
        for tap, w in zip(index, weight):
            # planes[batch[k], :, tap[k, s]] -> [k, S, C] (advanced indices go first)
            v = planes[batch[:, None], :, tap] * w[:, :, None]
            acc = v if acc is None else acc + v
        acc = acc.reshape(idx.numel(), pooled_h, g_h, pooled_w, g_w, C)
        val = acc.sum(dim=(2, 4)) / count[idx, None, None, None]
        pieces.append(val.permute(0, 3, 1, 2))
        where.append(idx)
    if pieces:
        # index_put keeps the graph to `input` (out itself is a constant zero buffer).
        out = out.index_put((torch.cat(where),), torch.cat(pieces))
    return out


def roi_align_backward(grad_output: Tensor, rois: Tensor, spatial_scale: float,
                       pooled_h: int, pooled_w: int, sampling_ratio: int, aligned: bool,
                       N: int, C: int, H: int, W: int) -> Tensor:
    """Gradient of :func:`roi_align_forward` w.r.t. its input: Tensor[N, C, H, W].

    Each sample adds ``grad_output * w / count`` to its four taps (``index_add_``).
    """
    grad_input = grad_output.new_zeros((N, C, H * W))
    K = rois.shape[0]
    if K == 0 or grad_input.numel() == 0:
        return grad_input.reshape(N, C, H, W)
    rois = rois.detach().to(grad_output.dtype)
    geometry = _roi_geometry(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
    gh, gw = geometry[4], geometry[5]
    count = (gh * gw).clamp(min=1).to(grad_output.dtype)
    flat_grad = grad_input.permute(0, 2, 1).reshape(N * H * W, C).contiguous()
    for idx, g_h, g_w in _groups(gh, gw, C * pooled_h * pooled_w):
        batch, index, weight = _group_taps(rois, idx, geometry, g_h, g_w,
                                           pooled_h, pooled_w, H, W)
        k = idx.numel()
        g = (grad_output[idx] / count[idx, None, None, None]).permute(0, 2, 3, 1)  # k,PH,PW,C
        g = g[:, :, None, :, None, :].expand(k, pooled_h, g_h, pooled_w, g_w, C)
        g = g.reshape(k, -1, C)
        for tap, w in zip(index, weight):
            rows = (batch[:, None] * (H * W) + tap).reshape(-1)
            flat_grad.index_add_(0, rows, (g * w[:, :, None]).reshape(-1, C))
    return flat_grad.reshape(N, H, W, C).permute(0, 3, 1, 2).contiguous()


def _iou_rows(boxes: Tensor, areas: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """IoU matrix Tensor[len(rows), len(cols)] with the spec's arithmetic (no +1)."""
    a, b = boxes[rows][:, None, :], boxes[cols][None, :, :]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    return inter / (areas[rows][:, None] + areas[cols][None, :] - inter)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, block: int = 512) -> Tensor:
    """Greedy NMS. boxes: Tensor[n, 4], scores: Tensor[n] -> kept indices, int64,
    by descending score (stable: ties keep their original order).

    Works block by block over the sorted boxes: a block is first suppressed by every box
    already kept, then resolved greedily inside (a small Python loop over a bool matrix).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True)[1]
    b = boxes[order]
    if b.dtype in (torch.float16, torch.bfloat16):
        # As the kernels do: areas of boxes over 256 px overflow float16.
        b = b.float()
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    kept = torch.empty(0, dtype=torch.int64, device=boxes.device)
    for s in range(0, n, block):
        cols = torch.arange(s, min(s + block, n), device=boxes.device)
        # Compared in float64 like torchvision's `(double)iou > threshold`.
        alive = torch.ones(cols.numel(), dtype=torch.bool, device=boxes.device)
        if kept.numel():
            alive &= ~(_iou_rows(b, areas, kept, cols).double() > iou_threshold).any(0)
        over = (_iou_rows(b, areas, cols, cols).double() > iou_threshold).cpu().numpy()
        alive_np = alive.cpu().numpy().copy()
        for i in range(cols.numel()):
            if alive_np[i]:
                alive_np[i + 1:] &= ~over[i, i + 1:]
        mask = torch.from_numpy(alive_np).to(boxes.device)
        kept = torch.cat([kept, cols[mask]])
    return order[kept]
