"""The ResNet trunk's forward with its norms folded into the convs (layers/conv.py).

Inference: every block folded just before it runs (detached copies, oneDNN post-ops,
channels-last). Training with frozen norms: the frozen stages run that way without
autograd, the trainable blocks fold in the autograd graph (block_forward(detach=False)).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from layers.conv import conv_act as _conv_act
from layers.conv import fold_conv_norm, is_foldable, use_onednn


def block_forward(x: Tensor, block: nn.Module, winograd: bool = False,
                  detach: bool = True, overwrite_input: bool = False,
                  onednn: bool = True) -> Tensor:
    """A BasicBlock / Bottleneck with its norms folded: relu(convs(x) + identity).
    detach=False folds in the autograd graph (gradients reach the convs).

    At inference the last conv adds into the identity in place when nothing else needs
    it: a downsampled identity is the block's own, x itself only with overwrite_input
    (the caller does not use x again). onednn: as conv_act's (FastPath.onednn)."""
    def folded(conv, norm):
        return fold_conv_norm(conv, norm, detach)

    def conv_act(*args, **kwargs):
        return _conv_act(*args, **kwargs, onednn=onednn)

    identity, own_identity = x, overwrite_input and detach
    if block.downsample is not None:
        identity = conv_act(x, folded(block.downsample[0], block.downsample[1]), relu=False)
        own_identity = detach
    out = conv_act(x, folded(block.conv1, block.bn1), relu=True, winograd=winograd)
    last = (block.conv2, block.bn2)
    if isinstance(block, Bottleneck):
        out = conv_act(out, folded(block.conv2, block.bn2), relu=True, winograd=winograd)
        last = (block.conv3, block.bn3)
    return conv_act(out, folded(*last), relu=True, residual=identity,
                    overwrite_residual=own_identity)


def stem_forward(trunk: nn.Module, x: Tensor, onednn: bool = True) -> Tensor:
    """maxpool(relu(bn1(conv1(x)))) folded, channels-last on the oneDNN path."""
    if onednn and use_onednn(x):
        x = x.contiguous(memory_format=torch.channels_last)
    return trunk.maxpool(_conv_act(x, fold_conv_norm(trunk.conv1, trunk.bn1), relu=True,
                                   onednn=onednn))


def trunk_is_foldable(trunk: nn.Module) -> bool:
    """True when every normalisation of the ResNet trunk can be folded (not GroupNorm),
    and its blocks are torchvision's BasicBlock / Bottleneck."""
    if not is_foldable(trunk.bn1):
        return False
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(trunk, name):
            if not isinstance(block, (BasicBlock, Bottleneck)):
                return False
            norms = [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck)
                                              else [])
            if block.downsample is not None:
                norms.append(block.downsample[1])
            if not all(is_foldable(n) for n in norms):
                return False
    return True


def trunk_all_frozen_bn(trunk: nn.Module) -> bool:
    return trunk_is_foldable(trunk) and not any(
        isinstance(m, nn.BatchNorm2d) for m in trunk.modules())


def fused_trunk_forward(trunk: nn.Module, x: Tensor, winograd: bool = False,
                        onednn: bool = True) -> list[Tensor]:
    """The trunk's inference forward with folded convs: x Tensor[N, 3, H, W] ->
    [C2, C3, C4, C5] (channels-last on the oneDNN path). Each block is folded just before
    it runs, so at most one block's folded weights exist at a time (no second copy of the
    trunk)."""
    x = stem_forward(trunk, x, onednn)
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = stage_forward(getattr(trunk, name), x, winograd, onednn)
        outs.append(x)
    return outs


def stage_forward(layer: nn.Sequential, x: Tensor, winograd: bool = False,
                  onednn: bool = True) -> Tensor:
    """A stage's blocks folded, at inference. x is the previous stage's output, which the
    caller keeps; the blocks after the first overwrite their input (see block_forward)."""
    for index, block in enumerate(layer):
        x = block_forward(x, block, winograd, overwrite_input=index > 0, onednn=onednn)
    return x
