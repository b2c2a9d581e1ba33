"""``RoIAlign`` module over one feature map (a thin wrapper of ``libs.roi_align``)."""
from __future__ import annotations

from typing import List, Union

from torch import Tensor, nn

from libs import roi_align


class RoIAlign(nn.Module):
    """RoIAlign over one feature map.

    Args:
        output_size: int or (PH, PW).
        spatial_scale: feature size / image size (1/stride).
        sampling_ratio: samples per bin per axis; <= 0 means adaptive.
        aligned: pixel-centre convention (shift boxes by -0.5 feature pixel).

    forward(input: Tensor[N, C, H, W], rois: Tensor[R, 5] | list[Tensor[R_i, 4]])
        -> Tensor[R, C, PH, PW]
    """

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
