"""ResNet + FPN backbone, its builder, and the map from torchvision's backbone weights.

Shape letters: N images, H/W input size. Outputs P2..P6 have strides 4, 8, 16, 32, 64.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .fpn import FPN
from .norm import FrozenBatchNorm2d
from .resnet import ResNetTrunk, imagenet_weights_path, load_imagenet_weights


class ResNetFPN(nn.Module):
    """`body` (ResNetTrunk, C2..C5) followed by `fpn` (FPN, P2..P6).

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
                              pretrained: str | None = None, fuse_bn: bool = True,
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
        fuse_bn: fold the norms into the trunk convs where possible (ResNetTrunk's
            fuse_inference; backbones/fused.py).
        groups, width_per_group, stride_in_1x1: the trunk's block variant (ResNetTrunk).
        fpn_norm: "none" or the norm after every FPN conv (FPN).
    """
    body = ResNetTrunk(depth, norm, trainable_layers, fuse_inference=fuse_bn, groups=groups,
                       width_per_group=width_per_group, stride_in_1x1=stride_in_1x1)
    if pretrained is not None:
        path = (imagenet_weights_path(depth, groups, width_per_group)
                if pretrained == "imagenet" else pretrained)
        load_imagenet_weights(body, path)
    return ResNetFPN(body, FPN(body.out_channels_list, out_channels, norm=fpn_norm))


def convert_torchvision_backbone_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision BackboneWithFPN state dict (keys relative to `backbone.`) to ours.

    body.*                              -> body.*  (same ResNet module names)
    fpn.inner_blocks.{i}.0.{weight,bias} -> fpn.lateral_convs.{i}.{weight,bias}
    fpn.layer_blocks.{i}.0.{weight,bias} -> fpn.output_convs.{i}.{weight,bias}
    fpn.inner_blocks.{i}.1.*             -> fpn.lateral_norms.{i}.*  (v2: conv + BatchNorm)
    fpn.layer_blocks.{i}.1.*             -> fpn.output_norms.{i}.*
    (torchvision < 0.13 names without the ".0" are accepted too.)
    """
    out = {}
    for key, value in tv_state.items():
        if key.startswith("fpn."):
            parts = key.split(".")  # fpn, block, i, [0 | 1,] param
            is_norm = len(parts) == 5 and parts[3] == "1"
            names = {"inner_blocks": ("lateral_convs", "lateral_norms"),
                     "layer_blocks": ("output_convs", "output_norms")}[parts[1]]
            key = f"fpn.{names[is_norm]}.{parts[2]}.{parts[-1]}"
        out[key] = value
    return out


def load_torchvision_backbone_state(backbone: ResNetFPN, tv_backbone: nn.Module | dict) -> None:
    """Copy torchvision backbone weights into ours (strict: every key must match).

    Args:
        backbone: ours, from build_resnet_fpn_backbone with the same depth.
        tv_backbone: torchvision's BackboneWithFPN (e.g. `maskrcnn_resnet50_fpn().backbone`,
            `resnet_fpn_backbone(...)`) or its state_dict(). Given a module, the
            FrozenBatchNorm2d eps values are copied too: torchvision's COCO Mask R-CNN v1
            weights run with eps 0.0, which matters for parity.
    """
    state = tv_backbone.state_dict() if isinstance(tv_backbone, nn.Module) else tv_backbone
    backbone.load_state_dict(convert_torchvision_backbone_state_dict(state), strict=True)
    if isinstance(tv_backbone, nn.Module):
        ours = dict(backbone.body.named_modules())
        for name, module in tv_backbone.body.named_modules():
            if hasattr(module, "eps") and isinstance(ours.get(name), FrozenBatchNorm2d):
                ours[name].eps = module.eps
