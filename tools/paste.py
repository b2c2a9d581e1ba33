"""Mask pasting: S x S mask probabilities of each detection resized into its box of the
full image. A leaf utility (the image transform's postprocess calls it).

    PASTE_MASKS[name](masks Tensor[D, 1, S, S], boxes Tensor[D, 4], (H, W), padding)
        -> Tensor[D, 1, H, W]
    PASTE_MASKS[name](masks, boxes, (H, W), padding, crops=True)
        -> [MaskWindow(x0, y0, Tensor[h, w])] * D

With crops=True (eager only) each detection's pasted probabilities come back as the
window of the image the rule writes (top-left pixel (x0, y0); everything outside it is 0
in the dense canvas), so a caller can keep 100 masks of a 6000 x 4000 photo in box-sized
pieces instead of 9.6 GB. The dense canvas is filled from the same windows: the two forms
are equal pixel for pixel.

Table (config key mask_head.mask_paste): "torchvision" (paste_masks_in_image) and
"detectron2" (paste_masks_grid_sample). A new rule is one function of that signature and
one entry in PASTE_MASKS.

Each rule runs eagerly as per-box work on the visible part of each box only; when the
forward is traced for export (tools.tracing.is_tracing) the same bilinear weights are
built for the whole canvas and applied as two batched matrix products, which need no
loop over detections (the count is data-dependent) and no int() of a size.

Shapes: D detections, S mask size, H/W image size.
"""
from __future__ import annotations

import math
import mmap
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .tracing import is_tracing

__all__ = ["PASTE_MASKS", "paste_masks_in_image", "paste_masks_grid_sample",
           "image_masks_zeros", "MaskWindow"]


class MaskWindow(NamedTuple):
    """A detection's pasted mask as the image window it covers: pixels
    [y0, y0 + h) x [x0, x0 + w) of the full image hold `mask` (Tensor[h, w]); the rest of
    the image is 0. h or w is 0 when the box lies outside the image."""
    x0: int
    y0: int
    mask: Tensor


def _fill(windows: list[MaskWindow], height: int, width: int, dtype: torch.dtype,
          device) -> Tensor:
    """The dense Tensor[D, 1, height, width] holding each window at its place."""
    out = image_masks_zeros(len(windows), height, width, dtype, device)
    for d, (x0, y0, mask) in enumerate(windows):
        if mask.numel():
            out[d, 0, y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = mask
    return out


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale boxes about their centres (torchvision's arithmetic, float32)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)


def _bilinear_weights(offset: Tensor, lo: Tensor, hi: Tensor, out_size: Tensor,
                      in_size: int, span) -> Tensor:
    """Rows of a bilinear resize matrix (PyTorch's align_corners=False rule).

    For each box b, row j is output pixel offset[b] + j of a resize from in_size to
    out_size[b]; rows outside [lo[b], hi[b]) are zero. Returns Tensor[B, span, in_size].
    """
    j = torch.arange(span, device=offset.device)
    dst = (offset[:, None] + j[None]).to(torch.float64)
    # PyTorch: a float32 scale, then scale * (dst + 0.5) - 0.5 in double, stored as float.
    # (A Python number / tensor is computed as a reciprocal times the number: not exact.)
    scale = torch.full_like(out_size, in_size, dtype=torch.float32) / out_size.float()
    scale = scale.to(torch.float64)
    src = ((dst + 0.5) * scale[:, None] - 0.5).to(torch.float32).clamp(min=0)
    # src >= 0, so truncation is floor; rows outside [lo, hi) may run past the end.
    i0 = src.to(torch.int64).clamp(max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    lam1 = src - i0.to(torch.float32)
    lam0 = 1.0 - lam1
    valid = ((j[None] >= lo[:, None]) & (j[None] < hi[:, None])).to(torch.float32)
    weights = torch.zeros(offset.shape[0], span, in_size, device=offset.device)
    weights.scatter_add_(2, i0[..., None], (lam0 * valid)[..., None])
    weights.scatter_add_(2, i1[..., None], (lam1 * valid)[..., None])
    return weights


def image_masks_zeros(count: int, height: int, width: int, dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    """Zeros Tensor[count, 1, height, width] to paste masks into.

    On the CPU its memory is an anonymous mapping, zero until written: pasting writes only
    each box's rows, so the pages outside the boxes are never touched. torch.zeros would
    write every page (341 MB for 100 detections at 800 x 1066, ~60 ms plus the kernel's
    page faults: docs/benchmarks.md, "Model zoo")."""
    shape = (count, 1, height, width)
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, numel * dtype.itemsize)
    return torch.frombuffer(pages, dtype=dtype).view(shape)


def paste_masks_in_image(masks: Tensor, boxes: Tensor, img_shape: tuple[int, int],
                         padding: int = 1, crops: bool = False):
    """Paste S x S mask probabilities into an H x W image, as torchvision does.

    The masks are padded by `padding` pixels and the boxes scaled by (S + 2p) / S so the
    resized mask has a zero border; each box is resized bilinearly to its integer size
    (x2 - x1 + 1, y2 - y1 + 1). Eagerly only the part of each box inside the image is
    computed: the separable bilinear resize is two small matrix products per box.

    Args:
        masks: Tensor[D, 1, S, S]; boxes: Tensor[D, 4] in image pixels; img_shape: (H, W).
        crops: return each detection's MaskWindow instead of the canvas (eager only).
    Returns:
        Tensor[D, 1, H, W], or [MaskWindow] * D with crops=True.
    """
    size = masks.shape[-1]
    padded = F.pad(masks[:, 0], (padding,) * 4).to(torch.float32)
    in_size = size + 2 * padding
    ibox = _expand_boxes(boxes, float(in_size) / size).to(torch.int64)
    box_w = (ibox[:, 2] - ibox[:, 0] + 1).clamp(min=1)
    box_h = (ibox[:, 3] - ibox[:, 1] + 1).clamp(min=1)
    x0, y0 = ibox[:, 0].clamp(min=0), ibox[:, 1].clamp(min=0)
    x_end = torch.minimum(ibox[:, 0] + box_w, ibox[:, 2] + 1)
    y_end = torch.minimum(ibox[:, 1] + box_h, ibox[:, 3] + 1)
    if is_tracing():
        im_h, im_w = img_shape
        # Whole canvas: row p is pixel p, visible where x0 <= p < x_end (beyond the image
        # there are no rows).
        wy = _bilinear_weights(-ibox[:, 1], y0, y_end, box_h, in_size, im_h)
        wx = _bilinear_weights(-ibox[:, 0], x0, x_end, box_w, in_size, im_w)
        return torch.bmm(torch.bmm(wy, padded), wx.transpose(1, 2))[:, None]
    im_h, im_w = int(img_shape[0]), int(img_shape[1])
    windows = []
    if masks.shape[0]:
        x1, y1 = x_end.clamp(max=im_w), y_end.clamp(max=im_h)
        vis_w, vis_h = (x1 - x0).clamp(min=0), (y1 - y0).clamp(min=0)
        span_w, span_h = max(int(vis_w.max()), 1), max(int(vis_h.max()), 1)
        zero = torch.zeros_like(vis_h)
        wy = _bilinear_weights(y0 - ibox[:, 1], zero, vis_h, box_h, in_size, span_h)
        wx = _bilinear_weights(x0 - ibox[:, 0], zero, vis_w, box_w, in_size, span_w)
        rows = torch.bmm(wy, padded)                      # [D, span_h, S + 2p]
        # One product per box at its own size: a batched product would compute every box
        # at the largest box's span (100 detections, one image-sized: 30x the work).
        for d, (ya, yb, xa, xb) in enumerate(torch.stack((y0, y1, x0, x1), 1).tolist()):
            h, w = max(yb - ya, 0), max(xb - xa, 0)
            windows.append(MaskWindow(min(xa, im_w), min(ya, im_h),
                                      torch.mm(rows[d, :h], wx[d, :w].t())))
    return windows if crops else _fill(windows, im_h, im_w, masks.dtype, masks.device)


def _grid_sample_axis(lo: Tensor, hi: Tensor, size: int, image_side) -> Tensor:
    """Resize matrix Tensor[D, image_side, size] of the grid_sample paste along one axis:
    pixel centres mapped into the box [lo, hi) (Tensor[D] float32), bilinear with zeros
    outside the mask, and nothing outside [floor(lo) - 1, ceil(hi) + 1)."""
    pos = torch.arange(image_side, dtype=torch.int64, device=lo.device)
    g = (pos[None].to(torch.float32) + 0.5 - lo[:, None]) / (hi - lo)[:, None] * 2 - 1
    coord = ((g + 1) * size - 1) / 2                 # grid_sample, align_corners=False
    i0 = torch.floor(coord)
    lam1 = coord - i0
    i0 = i0.to(torch.int64)
    taps = torch.arange(size, dtype=torch.int64, device=lo.device)
    weights = ((taps == i0[..., None]).to(torch.float32) * (1.0 - lam1)[..., None]
               + (taps == (i0 + 1)[..., None]).to(torch.float32) * lam1[..., None])
    first = torch.floor(lo).to(torch.int64) - 1
    last = torch.ceil(hi).to(torch.int64) + 1
    window = (pos[None] >= first[:, None]) & (pos[None] < last[:, None])
    return weights * window[..., None].to(torch.float32)


def paste_masks_grid_sample(masks: Tensor, boxes: Tensor, img_shape: tuple[int, int],
                            padding: int = 0, crops: bool = False):
    """Paste S x S mask probabilities into an H x W image as detectron2 does: bilinear
    `grid_sample` (zero outside the mask) of each mask over its box, at pixel centres,
    within the box's integer bounds widened by one pixel (outside them: 0). Traced, the
    bilinear weights factor per axis: two batched matrix products.

    Args:
        masks: Tensor[D, 1, S, S]; boxes: Tensor[D, 4] in image pixels; img_shape: (H, W).
        padding: unused (torchvision pasting's border; the signature is shared).
        crops: return each detection's MaskWindow instead of the canvas (eager only).
    Returns:
        Tensor[D, 1, H, W] probabilities (detectron2 thresholds them at 0.5), or
        [MaskWindow] * D with crops=True.
    """
    if is_tracing():
        size, boxes = masks.shape[-1], boxes.to(torch.float32)
        wy = _grid_sample_axis(boxes[:, 1], boxes[:, 3], size, img_shape[0])
        wx = _grid_sample_axis(boxes[:, 0], boxes[:, 2], size, img_shape[1])
        return torch.bmm(torch.bmm(wy, masks[:, 0].to(torch.float32)),
                         wx.transpose(1, 2))[:, None]
    im_h, im_w = int(img_shape[0]), int(img_shape[1])
    windows = [_grid_sample_window(masks[d:d + 1], boxes[d:d + 1].to(torch.float32),
                                   im_h, im_w) for d in range(masks.shape[0])]
    return windows if crops else _fill(windows, im_h, im_w, torch.float32, masks.device)


def _grid_sample_window(mask: Tensor, box: Tensor, im_h: int, im_w: int) -> MaskWindow:
    """One detection of paste_masks_grid_sample: mask Tensor[1, 1, S, S], box
    Tensor[1, 4] float32."""
    xa = min(max(int(box[0, 0].floor()) - 1, 0), im_w)
    ya = min(max(int(box[0, 1].floor()) - 1, 0), im_h)
    xb = min(int(box[0, 2].ceil()) + 1, im_w)
    yb = min(int(box[0, 3].ceil()) + 1, im_h)
    if xb <= xa or yb <= ya:
        return MaskWindow(xa, ya, mask.new_zeros((max(yb - ya, 0), max(xb - xa, 0)),
                                                 dtype=torch.float32))
    x0, y0, x1, y1 = box.split(1, dim=1)
    gy = (torch.arange(ya, yb, dtype=torch.float32, device=box.device) + 0.5 - y0) \
        / (y1 - y0) * 2 - 1
    gx = (torch.arange(xa, xb, dtype=torch.float32, device=box.device) + 0.5 - x0) \
        / (x1 - x0) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(1, len(gy[0]), len(gx[0])),
                        gy[:, :, None].expand(1, len(gy[0]), len(gx[0]))], dim=3)
    return MaskWindow(xa, ya, F.grid_sample(mask.float(), grid, align_corners=False)[0, 0])


# Mask pasting, by the config key mask_head.mask_paste.
PASTE_MASKS = {"torchvision": paste_masks_in_image, "detectron2": paste_masks_grid_sample}
