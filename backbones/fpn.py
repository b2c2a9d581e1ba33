"""Feature Pyramid Network (Lin et al. 2017) as torchvision builds it.

Shape letters: N images, C_l input channels of level l, H_l/W_l its size.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from layers import FastPath, conv2d, optional_norm_layer


class FPN(nn.Module):
    """Top-down pyramid with lateral connections, plus a max-pooled extra level.

    P_l = output_conv_l(lateral_conv_l(C_l) + upsample(P'_{l+1})), nearest upsampling to
    the lateral's size; P6 = max_pool2d(P5, kernel 1, stride 2) (a stride-2 subsample).

    Args:
        in_channels_list: channels of the inputs, finest first (C2..C5).
        out_channels: channels of every output level (256).
        extra_pool: append the P6 max-pool level (the RPN uses it; RoI heads do not).
        norm: "none" (convs with bias: torchvision v1, detectron2 3x) or a norm after
            every conv, "frozen_bn", "bn" or "gn" (convs without bias: torchvision v2,
            detectron2 LSJ); the top-down sum adds the normalised laterals.
        fast_path: how the convs run (layers.FastPath; EXACT keeps torchvision's
            arithmetic).
    """

    def __init__(self, in_channels_list: list[int], out_channels: int = 256,
                 extra_pool: bool = True, norm: str = "none",
                 fast_path: FastPath = FastPath()):
        super().__init__()
        norm_layer = optional_norm_layer(norm)
        bias = norm_layer is None
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(c, out_channels, kernel_size=1, bias=bias) for c in in_channels_list)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=bias)
            for _ in in_channels_list)
        if norm_layer is not None:
            self.lateral_norms = nn.ModuleList(norm_layer(out_channels)
                                               for _ in in_channels_list)
            self.output_norms = nn.ModuleList(norm_layer(out_channels)
                                              for _ in in_channels_list)
        self.has_norm = norm_layer is not None
        self.extra_pool = extra_pool
        self.out_channels = out_channels
        self.fast_path = fast_path
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.constant_(conv.bias, 0)

    def _lateral(self, i: int, x: Tensor, top_down=None) -> Tensor:
        """lateral(x) + top_down?, written into top_down (a fresh upsampled map) on the
        fused path."""
        norm = self.lateral_norms[i] if self.has_norm else None
        return conv2d(x, self.lateral_convs[i], residual=top_down,
                      fast_path=self.fast_path, norm=norm, overwrite_residual=True)

    def _output(self, i: int, x: Tensor) -> Tensor:
        norm = self.output_norms[i] if self.has_norm else None
        return conv2d(x, self.output_convs[i], fast_path=self.fast_path, norm=norm)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """
        Args:
            features: [Tensor[N, C_l, H_l, W_l]] finest first (C2..C5).
        Returns:
            [Tensor[N, out_channels, H_l, W_l]] finest first (P2..P5), then P6 when
            extra_pool is set.
        """
        # conv2d: one oneDNN call with the top-down add fused at inference on CPU.
        last = len(features) - 1
        last_inner = self._lateral(last, features[-1])
        results = [self._output(last, last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            top_down = F.interpolate(last_inner, size=features[idx].shape[-2:],
                                     mode="nearest")
            last_inner = self._lateral(idx, features[idx], top_down=top_down)
            results.insert(0, self._output(idx, last_inner))
        if self.extra_pool:
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results


# The FPN, by the config key backbone.fpn. builder.py calls an entry with
#     in_channels_list: list[int] (the trunk's out_channels_list, C2..C5),
#     out_channels: int (fpn_channels), norm: str (fpn_norm), fast_path: layers.FastPath
# and the module (with an out_channels attribute) maps [C2..C5] -> [P2..P6], strides
# 4..64, each Tensor[N, out_channels, H / s, W / s] (the RPN uses all five levels, the
# RoI heads P2..P5).
FPNS = {"fpn": FPN}
