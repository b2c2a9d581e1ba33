"""Anchor boxes on every FPN level, as torchvision's AnchorGenerator tiles them.

Shape letters: N images, L levels, H_l/W_l level l's feature size, A_l anchors per
location on level l; T = sum_l H_l * W_l * A_l anchors per image.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from tools.structures import ImageList
from tools.tracing import is_tracing, round_log2, size_tensor

Sizes = Union[Sequence[float], Sequence[Sequence[float]]]


class AnchorGenerator(nn.Module):
    """Anchors of several sizes and aspect ratios (height / width) per level.

    Args:
        sizes: anchor sides in pixels per level, e.g. (32, 64, 128, 256, 512) (one size
            per level) or ((32,), (64,), ...) (several per level).
        aspect_ratios: height / width ratios; one tuple used at every level, or one tuple
            per level.

        rule: "torchvision" or "detectron2" (below).

    Anchors on a level are ordered by location (row-major), then by cell anchor; each is
    a cell anchor (-w/2, -h/2, w/2, h/2) shifted by (x * stride_w, y * stride_h).
    torchvision: cells ordered by ratio then size, rounded to integers, stride = padded
    image size // feature size. detectron2: cells ordered by size then ratio, not
    rounded, stride the level's nominal power of two (4 .. 64), offset 0.
    """

    def __init__(self, sizes: Sizes = ((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios: Sizes = (0.5, 1.0, 2.0), rule: str = "torchvision"):
        super().__init__()
        if rule not in CELL_ANCHORS:
            raise ValueError(f"anchor rule must be one of {sorted(CELL_ANCHORS)}, got {rule!r}")
        self.rule = rule
        sizes = tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        if len(aspect_ratios) != len(sizes):
            raise ValueError(f"{len(sizes)} levels of sizes but {len(aspect_ratios)} of ratios")
        self.sizes = sizes
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.cell_anchors = [CELL_ANCHORS[rule](s, r)
                             for s, r in zip(self.sizes, self.aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        """A_l for every level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def forward(self, images: ImageList, features: list[Tensor]) -> list[Tensor]:
        """
        Args:
            images: the padded batch (only its tensor size and image count are used).
            features: per level Tensor[N, C, H_l, W_l], finest first.
        Returns:
            per image, Tensor[T, 4] anchors (the same for every image), levels in order.
        """
        anchors = torch.cat(self.per_level(images.tensors, features))
        return [anchors for _ in images.image_sizes]

    def per_level(self, padded: Tensor, features: list[Tensor]) -> list[Tensor]:
        """Per level Tensor[H_l * W_l * A_l, 4] anchors of the padded batch
        Tensor[N, 3, Hp, Wp] (forward's, before the levels are concatenated)."""
        if len(features) != len(self.cell_anchors):
            raise ValueError(f"{len(features)} feature levels but anchors for "
                             f"{len(self.cell_anchors)}")
        dtype, device = features[0].dtype, features[0].device
        per_level = []
        for feature, cell in zip(features, self.cell_anchors):
            grid_h, grid_w = feature.shape[-2:]
            stride = self._stride(padded.shape[-2:], (grid_h, grid_w))
            per_level.append(grid_anchors(cell.to(dtype=dtype, device=device),
                                          (grid_h, grid_w), stride))
        return per_level

    def _stride(self, image_size, grid_size) -> tuple:
        """(stride_h, stride_w) of a level: padded size // grid size (torchvision) or the
        level's power of two (detectron2: P6 of an 800-pixel image has 13 rows: 61 by
        division, 64 nominally). Traced, as 0-d int64 tensors that follow the input."""
        pairs = tuple(zip(image_size, grid_size))
        if is_tracing():
            pairs = tuple((size_tensor(s), size_tensor(g)) for s, g in pairs)
            if self.rule == "detectron2":
                return tuple(torch.pow(2.0, round_log2(s.double() / g.double())).long()
                             for s, g in pairs)
            return tuple(torch.div(s, g, rounding_mode="floor") for s, g in pairs)
        if self.rule == "detectron2":
            return tuple(2 ** round(math.log2(s / g)) for s, g in pairs)
        return tuple(s // g for s, g in pairs)


def base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Anchors centred on (0, 0): Tensor[len(ratios) * len(sizes), 4], float32, rounded."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def detectron2_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Anchors centred on (0, 0), detectron2's arithmetic: w = sqrt(size^2 / ratio) and
    h = ratio * w in double precision, not rounded; Tensor[len(sizes) * len(ratios), 4]
    float32 ordered by size, then ratio."""
    cells = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(float(size) ** 2 / float(ratio))
            h = float(ratio) * w
            cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(cells, dtype=torch.float32)


CELL_ANCHORS = {"torchvision": base_anchors, "detectron2": detectron2_cell_anchors}


def grid_anchors(cell: Tensor, grid_size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Tile `cell` (Tensor[A, 4]) over an H x W grid: Tensor[H * W * A, 4]."""
    grid_h, grid_w = grid_size
    device = cell.device
    # Integer shifts, added to the float cell anchors last (torchvision's order).
    shifts_x = torch.arange(0, grid_w, dtype=torch.int32, device=device) * stride[1]
    shifts_y = torch.arange(0, grid_h, dtype=torch.int32, device=device) * stride[0]
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4)
