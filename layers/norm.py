"""Normalisation layers: FrozenBatchNorm2d and the norm factories of the trunks, FPN and heads.

FrozenBatchNorm2d keeps torchvision's buffer names (weight, bias, running_mean,
running_var) so torchvision and ImageNet state dicts load unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("frozen_bn", "bn", "gn")
FROZEN_BN_OPS = ("torchvision", "detectron2")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    y = x * scale + shift with scale = weight / sqrt(running_var + eps),
    shift = bias - running_mean * scale (torchvision's formula and float order).

    Args:
        num_features: C, the channels of the input Tensor[N, C, H, W].
        eps: added to the variance. 1e-5 by default; torchvision's COCO Mask R-CNN v1
            weights were trained with 0.0 (torchvision sets it when loading them).
        op: "torchvision" (the formula above, always) or "detectron2" (F.batch_norm
            when no gradient is needed, as detectron2's FrozenBatchNorm2d: the same
            values, rounded differently).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, op: str = "torchvision"):
        super().__init__()
        if op not in FROZEN_BN_OPS:
            raise ValueError(f"frozen BatchNorm op must be one of {FROZEN_BN_OPS}, got {op!r}")
        self.eps = eps
        self.op = op
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # BatchNorm2d checkpoints carry a step counter that a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        if self.op == "detectron2" and not x.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, training=False, eps=self.eps)
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _group_norm_32(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, num_channels)


def optional_norm_layer(norm: Optional[str]) -> Optional[Callable[[int], nn.Module]]:
    """norm_layer_factory, or None for "none" (a conv without normalisation, with bias)."""
    return None if norm in (None, "none") else norm_layer_factory(norm)


def norm_layer_factory(norm: str) -> Callable[[int], nn.Module]:
    """The `norm_layer(num_channels)` callable for torchvision's ResNet.

    Args:
        norm: "frozen_bn" (fine-tuning from ImageNet weights), "bn" (trainable
            BatchNorm2d) or "gn" (GroupNorm with 32 groups); the last two train from scratch.
    """
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return _group_norm_32
    raise ValueError(f"norm must be one of {NORMS} (or 'none' where a layer may have no "
                     f"norm), got {norm!r}")
