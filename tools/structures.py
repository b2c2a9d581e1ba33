"""Typed containers passed between stages.

Shape letters: N images, Hp/Wp padded height/width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageList:
    """A padded batch of images and the size of each image before padding.

    Attributes:
        tensors: Tensor[N, 3, Hp, Wp], the images zero-padded to a common size.
        image_sizes: list of N (h, w) tuples, each image's size inside `tensors`
            (after resizing, before padding). Boxes live in these coordinates.
    """

    tensors: Tensor
    image_sizes: list[tuple[int, int]]

    def to(self, device: torch.device | str) -> "ImageList":
        """Return a copy with `tensors` moved to `device` (sizes are plain ints)."""
        return ImageList(self.tensors.to(device), list(self.image_sizes))

    def __len__(self) -> int:
        return len(self.image_sizes)
