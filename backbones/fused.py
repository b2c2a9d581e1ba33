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

Winograd: with `winograd` set, 3x3 stride-1 convs (padding 1, C_in and C_out multiples of
8) on CPU float32 run as `libs.ops.conv3x3_winograd` instead, in inference and in
training (its backward is Winograd too): F(4x4, 3x3) does 4x fewer multiplications, and
measures 1.2x (512 channels, 25x34 map) to 2.3x (256 channels, P2/P3 maps) faster than
oneDNN's direct conv on 2 cores. Its rounding error is about 4x a direct conv's
(max abs ~5e-5 for O(1) outputs), so it is an option of the fused paths, off where
torchvision's exact arithmetic is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from libs import ops as kernel_ops

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


def winograd_pays(x: Tensor, in_channels: int) -> bool:
    """Enough 4x4 output tiles to amortise the filter transform (36 C K values written,
    and in the backward read and transformed back): bench/winograd.py-style timings on
    2 cores, forward + backward, lost below ~120 tiles at 256 channels (63 tiles: 0.84x)
    and below ~250 at 512 (117 tiles: 0.93x; ResNet layer4 at 800 px has 63)."""
    n, _, h, w = x.shape
    # RoI maps (7x7 box-head, 14x14 mask-head convs) lose however many RoIs: their border
    # tiles are mostly padding (a 7x7 map fills 49 of 64 tile outputs).
    if min(h, w) < MIN_WINOGRAD_SIDE:
        return False
    return n * ((h + 3) // 4) * ((w + 3) // 4) >= max(128, in_channels // 2)


# Smallest map side on which the Winograd convs run (bench/winograd.py-style timings, 2
# cores, 256 channels: 1000 RoIs of 7x7 0.93x, 100 of 14x14 0.88x, 8 of 28x28 1.07x).
MIN_WINOGRAD_SIDE = 16


def winograd_applies(x: Tensor, conv: FoldedConv) -> bool:
    """conv3x3_winograd computes this conv, and faster: CPU float32, 3x3 kernel, stride
    1, padding 1, no dilation or groups, channel counts multiples of 8, a map large
    enough (winograd_pays), and the kernels are built."""
    w = conv.weight
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and tuple(w.shape[2:]) == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and w.shape[0] % 8 == 0 and w.shape[1] % 8 == 0
            and winograd_pays(x, w.shape[1]) and kernel_ops.winograd_available())


def winograd_conv(x: Tensor, conv: FoldedConv, relu: bool) -> Tensor:
    """relu?(conv(x)) by Winograd (see winograd_applies): channels-last output,
    differentiable w.r.t. x, weight and bias."""
    return kernel_ops.conv3x3_winograd(x, conv.weight, conv.bias, relu)


def conv_act(x: Tensor, conv: FoldedConv, relu: bool,
             residual: Optional[Tensor] = None, winograd: bool = False) -> Tensor:
    """relu?(conv(x) + residual?) with the folded weights.

    Args:
        x: Tensor[N, C_in, H, W]; residual: Tensor[N, C_out, H', W'] (the conv's output
            size) or None. On the oneDNN path x should be channels-last (the output is).
        winograd: run eligible convs (no residual) as conv3x3_winograd.
    """
    if winograd and residual is None and winograd_applies(x, conv):
        return winograd_conv(x, conv, relu)
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


def block_forward(x: Tensor, parts: dict, winograd: bool = False) -> Tensor:
    identity = x
    if "downsample" in parts:
        identity = conv_act(x, parts["downsample"], relu=False)
    out = conv_act(x, parts["conv1"], relu=True, winograd=winograd)
    if "conv3" in parts:
        out = conv_act(out, parts["conv2"], relu=True, winograd=winograd)
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


def fused_trunk_forward(trunk: nn.Module, x: Tensor, winograd: bool = False) -> list[Tensor]:
    """The trunk's forward with folded convs: x Tensor[N, 3, H, W] -> [C2, C3, C4, C5]
    (channels-last on the oneDNN path). Each block is folded just before it runs, so at
    most one block's folded weights exist at a time (no second copy of the trunk)."""
    if use_onednn(x):
        x = x.contiguous(memory_format=torch.channels_last)
    x = trunk.maxpool(conv_act(x, fold_conv_norm(trunk.conv1, trunk.bn1), relu=True))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(trunk, name):
            x = block_forward(x, fold_block(block), winograd)
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
           residual: Optional[Tensor] = None, fast: bool = True,
           winograd: bool = False, norm: Optional[nn.Module] = None) -> Tensor:
    """relu?(norm?(conv(x)) + residual?): one oneDNN call on channels-last tensors on the
    fast path (inference on CPU, `fast` set; the norm folded into the conv), else the
    modules and plain ops (training, CUDA, or the source framework's exact arithmetic
    when `fast` is False). With `winograd`, eligible convs without a residual run as
    conv3x3_winograd, in inference and training."""
    zeros = conv.padding_mode == "zeros"
    grad = torch.is_grad_enabled()
    if winograd and residual is None and zeros and _foldable_now(norm, grad):
        folded = _fold(conv, norm, grad)
        if winograd_applies(x, folded):
            return winograd_conv(x, folded, relu)
    if fast and fast_path(x) and zeros and _foldable_now(norm, grad):
        return conv_act(x.contiguous(memory_format=torch.channels_last),
                        _fold(conv, norm, False), relu, residual)
    y = conv(x)
    if norm is not None:
        y = norm(y)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _foldable_now(norm: Optional[nn.Module], grad: bool) -> bool:
    """The norm can be folded into the conv without changing what is computed: a
    BatchNorm in training mode normalises by batch statistics, and with gradients only a
    frozen norm (no parameters to train) folds inside the autograd graph."""
    if norm is None:
        return True
    if grad:
        return isinstance(norm, FrozenBatchNorm2d)
    return is_foldable(norm) and not norm.training


def _fold(conv: nn.Conv2d, norm: Optional[nn.Module], live: bool) -> FoldedConv:
    if norm is None:
        return _live_conv_of(conv) if live else _conv_of(conv)
    return fold_conv_norm_live(conv, norm) if live else fold_conv_norm(conv, norm)


def _live_conv_of(conv: nn.Conv2d) -> FoldedConv:
    """conv's parameters themselves (in the autograd graph) as a FoldedConv."""
    bias = conv.bias if conv.bias is not None else \
        torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
    return FoldedConv(conv.weight, bias, tuple(conv.stride), tuple(conv.padding),
                      tuple(conv.dilation), conv.groups)


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
                residual: Optional[Tensor] = None, winograd: bool = False) -> Tensor:
    if winograd and residual is None and winograd_applies(x, conv):
        return winograd_conv(x, conv, relu)
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    if residual is not None:
        y = y.add_(residual)     # add and ReLU backward need neither input: in place is safe
    return y.relu_() if relu else y


def block_forward_live(x: Tensor, block: nn.Module, winograd: bool = False) -> Tensor:
    """A BasicBlock / Bottleneck with FrozenBatchNorm2d, its norms folded into the convs
    in the autograd graph: the forward and backward skip the normalisation passes."""
    identity = x
    if block.downsample is not None:
        identity = _conv_train(x, fold_conv_norm_live(block.downsample[0],
                                                      block.downsample[1]), relu=False)
    out = _conv_train(x, fold_conv_norm_live(block.conv1, block.bn1), relu=True,
                      winograd=winograd)
    if isinstance(block, Bottleneck):
        out = _conv_train(out, fold_conv_norm_live(block.conv2, block.bn2), relu=True,
                          winograd=winograd)
        return _conv_train(out, fold_conv_norm_live(block.conv3, block.bn3), relu=True,
                           residual=identity)
    return _conv_train(out, fold_conv_norm_live(block.conv2, block.bn2), relu=True,
                       residual=identity)


def trunk_all_frozen_bn(trunk: nn.Module) -> bool:
    return trunk_is_foldable(trunk) and not any(
        isinstance(m, nn.BatchNorm2d) for m in trunk.modules())
