"""Inference-only fast path: BatchNorm folded into the convolutions, ReLU and residual
adds fused into them (oneDNN post-ops on CPU), channels-last activations.

Shape letters: N images, C channels, H/W size. Nothing here is used in training mode or
when gradients are enabled: the folded weights are detached copies.

Folding: a conv (weight W, no bias) followed by a normalisation y = x * s + t with
s = gamma / sqrt(var + eps), t = beta - mean * s (FrozenBatchNorm2d, or BatchNorm2d in
eval mode) equals one conv with weight W * s (per output channel) and bias t. The result
differs from the unfused one only by float rounding (relative ~1e-7).

On CPU (float32, oneDNN available) each folded conv runs as
`torch.ops.mkldnn._convolution_pointwise` on channels-last tensors with the ReLU, or the
residual add + ReLU, applied inside the convolution (no extra pass over the activations);
elsewhere (CUDA, other dtypes) it is F.conv2d with the folded weights and in-place
add_ / relu_.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .norm import FrozenBatchNorm2d


@dataclass
class FoldedConv:
    """A conv with its normalisation folded in: weight Tensor[C_out, C_in, k, k],
    bias Tensor[C_out] (detached), and the conv geometry."""
    weight: Tensor
    bias: Tensor
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


def norm_scale_shift(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(scale Tensor[C], shift Tensor[C]) with norm(x) == x * scale + shift.

    Raises:
        TypeError for a layer that is not FrozenBatchNorm2d or BatchNorm2d.
    """
    if isinstance(norm, FrozenBatchNorm2d):
        gamma, beta, eps = norm.weight, norm.bias, norm.eps
    elif isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
        gamma = norm.weight if norm.affine else torch.ones_like(norm.running_var)
        beta = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        eps = norm.eps
    else:
        raise TypeError(f"cannot fold {type(norm).__name__} into a convolution "
                        "(only FrozenBatchNorm2d and BatchNorm2d with running statistics)")
    # FrozenBatchNorm2d's own float order, so folding changes the rounding only.
    scale = gamma * (norm.running_var + eps).rsqrt()
    shift = beta - norm.running_mean * scale
    return scale.detach(), shift.detach()


def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> FoldedConv:
    """conv followed by norm -> one FoldedConv (conv.bias, if any, is folded too)."""
    scale, shift = norm_scale_shift(norm)
    weight = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.detach() * scale + shift
    return FoldedConv(weight, bias, tuple(conv.stride), tuple(conv.padding),
                      tuple(conv.dilation), conv.groups)


def is_foldable(norm: nn.Module) -> bool:
    return isinstance(norm, FrozenBatchNorm2d) or (
        isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats)


def use_onednn(x: Tensor) -> bool:
    """oneDNN fused convolutions apply: CPU float32 with mkldnn built in."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def conv_act(x: Tensor, conv: FoldedConv, relu: bool,
             residual: Optional[Tensor] = None) -> Tensor:
    """relu?(conv(x) + residual?) with the folded weights.

    Args:
        x: Tensor[N, C_in, H, W]; residual: Tensor[N, C_out, H', W'] (the conv's output
            size) or None. On the oneDNN path x should be channels-last (the output is).
    """
    if use_onednn(x):
        args = (conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, *args, "relu" if relu else "none", [], "")
        residual = residual.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, *args, "add", 1.0, "relu" if relu else None, [], "")
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    if residual is not None:
        y = y.add_(residual)
    return y.relu_() if relu else y


def fold_block(block: nn.Module) -> dict:
    parts = {"conv1": fold_conv_norm(block.conv1, block.bn1),
             "conv2": fold_conv_norm(block.conv2, block.bn2)}
    if isinstance(block, Bottleneck):
        parts["conv3"] = fold_conv_norm(block.conv3, block.bn3)
    if block.downsample is not None:
        parts["downsample"] = fold_conv_norm(block.downsample[0], block.downsample[1])
    return parts


def block_forward(x: Tensor, parts: dict) -> Tensor:
    identity = x
    if "downsample" in parts:
        identity = conv_act(x, parts["downsample"], relu=False)
    out = conv_act(x, parts["conv1"], relu=True)
    if "conv3" in parts:
        out = conv_act(out, parts["conv2"], relu=True)
        return conv_act(out, parts["conv3"], relu=True, residual=identity)
    return conv_act(out, parts["conv2"], relu=True, residual=identity)


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


def fused_trunk_forward(trunk: nn.Module, x: Tensor) -> list[Tensor]:
    """The trunk's forward with folded convs: x Tensor[N, 3, H, W] -> [C2, C3, C4, C5]
    (channels-last on the oneDNN path). Each block is folded just before it runs, so at
    most one block's folded weights exist at a time (no second copy of the trunk)."""
    if use_onednn(x):
        x = x.contiguous(memory_format=torch.channels_last)
    x = trunk.maxpool(conv_act(x, fold_conv_norm(trunk.conv1, trunk.bn1), relu=True))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(trunk, name):
            x = block_forward(x, fold_block(block))
        outs.append(x)
    return outs


# Switch for the FPN / RPN head / mask head fast path (benchmark ablations); the trunk's
# own switch is ResNetTrunk.fuse_inference.
HEADS_FAST_PATH = True


def fast_path(x: Tensor) -> bool:
    """The fused inference path applies to x: no gradients needed, oneDNN available."""
    return HEADS_FAST_PATH and not torch.is_grad_enabled() and use_onednn(x)


def _conv_of(conv: nn.Conv2d) -> FoldedConv:
    """conv's own weights as a FoldedConv (no copy: nothing is cached)."""
    bias = conv.bias.detach() if conv.bias is not None else \
        torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
    return FoldedConv(conv.weight.detach(), bias, tuple(conv.stride), tuple(conv.padding),
                      tuple(conv.dilation), conv.groups)


def conv2d(x: Tensor, conv: nn.Conv2d, relu: bool = False,
           residual: Optional[Tensor] = None, fast: bool = True) -> Tensor:
    """relu?(conv(x) + residual?): one oneDNN call on channels-last tensors on the fast
    path (inference on CPU, `fast` set), else the module and plain ops (training, CUDA,
    or torchvision's exact arithmetic when `fast` is False)."""
    if fast and fast_path(x) and conv.padding_mode == "zeros":
        return conv_act(x.contiguous(memory_format=torch.channels_last), _conv_of(conv),
                        relu, residual)
    y = conv(x)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


# ------------------------------------------------------------------ training-mode folding

def fold_conv_norm_live(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> FoldedConv:
    """Like fold_conv_norm, but the folded weight stays in the autograd graph of
    conv.weight (gradients reach the conv; the frozen norm has no parameters)."""
    scale, shift = norm_scale_shift(norm)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return FoldedConv(weight, bias, tuple(conv.stride), tuple(conv.padding),
                      tuple(conv.dilation), conv.groups)


def _conv_train(x: Tensor, conv: FoldedConv, relu: bool,
                residual: Optional[Tensor] = None) -> Tensor:
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    if residual is not None:
        y = y.add_(residual)     # add and ReLU backward need neither input: in place is safe
    return y.relu_() if relu else y


def block_forward_live(x: Tensor, block: nn.Module) -> Tensor:
    """A BasicBlock / Bottleneck with FrozenBatchNorm2d, its norms folded into the convs
    in the autograd graph: the forward and backward skip the normalisation passes."""
    identity = x
    if block.downsample is not None:
        identity = _conv_train(x, fold_conv_norm_live(block.downsample[0],
                                                      block.downsample[1]), relu=False)
    out = _conv_train(x, fold_conv_norm_live(block.conv1, block.bn1), relu=True)
    if isinstance(block, Bottleneck):
        out = _conv_train(out, fold_conv_norm_live(block.conv2, block.bn2), relu=True)
        return _conv_train(out, fold_conv_norm_live(block.conv3, block.bn3), relu=True,
                           residual=identity)
    return _conv_train(out, fold_conv_norm_live(block.conv2, block.bn2), relu=True,
                       residual=identity)


def trunk_all_frozen_bn(trunk: nn.Module) -> bool:
    return trunk_is_foldable(trunk) and not any(
        isinstance(m, nn.BatchNorm2d) for m in trunk.modules())
