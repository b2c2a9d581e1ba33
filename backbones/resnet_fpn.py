"""ResNet + FPN backbone and its builder.

Shape letters: N images, H/W input size. Outputs P2..P6 have strides 4, 8, 16, 32, 64.
"""
from __future__ import annotations

from torch import Tensor, nn

from layers import FastPath

from .fpn import FPN
from .resnet import ResNetTrunk, load_pretrained_trunk


class ResNetFPN(nn.Module):
    """`body` (a trunk: ResNetTrunk or another backbones.TRUNKS entry, C2..C5) followed by
    `fpn` (FPN or another backbones.FPNS entry, P2..P6).

    Attributes:
        out_channels: channels of every output level.
    """

    def __init__(self, body: ResNetTrunk, fpn: FPN):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        """
        Args:
            x: Tensor[N, 3, H, W], normalised (padded) images.
        Returns:
            [P2, P3, P4, P5, P6], each Tensor[N, out_channels, ~H / s, ~W / s].
        """
        return self.fpn(self.body(x))


def build_resnet_fpn_backbone(depth: int = 101, norm: str = "frozen_bn",
                              trainable_layers: int = 3, out_channels: int = 256,
                              pretrained: str | None = None,
                              fast_path: FastPath = FastPath(),
                              groups: int = 1, width_per_group: int = 64,
                              stride_in_1x1: bool = False,
                              fpn_norm: str = "none") -> ResNetFPN:
    """Build a ResNet-FPN backbone.

    Args:
        depth: 18, 34, 50, 101 or 152.
        norm: "frozen_bn" (default; fine-tuning), "bn" or "gn" (training from scratch).
        trainable_layers: 0..5 trunk stages left trainable, from layer4 down (torchvision's
            rule; 3 trains layer2..layer4). The FPN is always trainable.
        out_channels: FPN channels.
        pretrained: None (random init), "imagenet" (torchvision's checkpoint, from the
            torch hub cache or downloaded there: imagenet_weights_path), or a path to a
            torchvision ResNet ImageNet state dict (.pth).
        fast_path: how the trunk's and the FPN's convs run (layers.FastPath).
        groups, width_per_group, stride_in_1x1: the trunk's block variant (ResNetTrunk).
        fpn_norm: "none" or the norm after every FPN conv (FPN).
    """
    body = ResNetTrunk(depth, norm, trainable_layers, fast_path=fast_path, groups=groups,
                       width_per_group=width_per_group, stride_in_1x1=stride_in_1x1)
    load_pretrained_trunk(body, pretrained)
    return ResNetFPN(body, FPN(body.out_channels_list, out_channels, norm=fpn_norm,
                               fast_path=fast_path))
