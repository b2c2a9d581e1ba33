"""Convolutions with their normalisation folded in, their ReLU / residual add fused, and
3x3 convs by Winograd: the fast path every module with convs shares (trunk, FPN, RPN head,
box and mask heads).

Shape letters: N images, C channels, H/W size.

FastPath: the two speed switches, one value given to each of those modules at
construction (the builder makes it from the config keys backbone.fuse_bn and
backbone.winograd).

Folding: a conv (weight W, no bias) followed by a normalisation y = x * s + t with
s = gamma / sqrt(var + eps), t = beta - mean * s (FrozenBatchNorm2d, or BatchNorm2d in
eval mode) equals one conv with weight W * s (per output channel) and bias t. The result
differs from the unfused one only by float rounding (relative ~1e-7). At inference the
folded weights are detached copies; in training a frozen norm folds inside the autograd
graph (fold_conv_norm(detach=False)): the gradient reaches the conv, and the forward and
backward skip the normalisation passes.

On CPU (float32, oneDNN available), when no gradient is needed, each folded conv runs as
`torch.ops.mkldnn._convolution_pointwise` on channels-last tensors with the ReLU, or the
residual add + ReLU, applied inside the convolution (no extra pass over the activations);
elsewhere (training, CUDA, other dtypes) it is F.conv2d with the folded weights and
in-place add_ / relu_.

Winograd: 3x3 stride-1 convs (padding 1, C_in and C_out multiples of 8) on CPU float32 run
as `libs.ops.conv3x3_winograd`, in inference and in training (its backward is Winograd
too): F(4x4, 3x3) does 4x fewer multiplications (speed-ups: docs/benchmarks.md). Its
rounding error is about 4x a direct conv's (max abs ~5e-5 for O(1) outputs), so it is an
option of the fused paths, off where torchvision's exact arithmetic is asked for.

Grouped convs: on the oneDNN inference path, the ResNeXt 3x3 grouped convs (stride 1,
padding 1, 8 or 16 channels per group, in == out, maps of MIN_GROUPED_KERNEL_PIXELS or
more) run as `libs.ops.grouped_conv3x3`, a direct AVX2 + FMA kernel 1.3-1.7x faster than
oneDNN's grouped conv on the X-101 res2 / res3 maps (docs/benchmarks.md, "X-101 grouped
convs"). Its arithmetic is a direct conv's (only the summation order differs), so it is
part of fuse_bn's fast path, not a switch of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from libs import ops as kernel_ops

from .norm import FrozenBatchNorm2d


@dataclass(frozen=True)
class FastPath:
    """How the convs of a module run; every module with convs takes one at construction.

    Args:
        fuse_bn: (config backbone.fuse_bn) fold the norms into the convs and fuse ReLU /
            residual adds (oneDNN, channels-last) at inference; with frozen_bn trunks,
            fold in training too. False computes as the source framework (torchvision,
            detectron2) does, so outputs match it to the last bit.
        winograd: (config backbone.winograd) 3x3 stride-1 convs by Winograd, in inference
            and training. It rounds differently from a direct conv, so the builder turns
            it on only with fuse_bn; EXACT turns both off.
        onednn: fold on the CPU into oneDNN's fused convolutions (the eager fast path).
            False folds the norms into plain convolutions (F.conv2d + add + ReLU), the
            standard ops an exporter can write down (EXPORT).
    """
    fuse_bn: bool = True
    winograd: bool = True
    onednn: bool = True

    def folds_at_inference(self, x: Tensor) -> bool:
        """With no gradient needed, conv2d folds the norms into the convs for input x:
        fuse_bn, and oneDNN applies to x or the plain-op folding is asked for."""
        return (self.fuse_bn and not torch.is_grad_enabled()
                and (use_onednn(x) or not self.onednn))


EXACT = FastPath(fuse_bn=False, winograd=False)
# What the exports trace (deploy/): norms folded, every conv a standard one.
EXPORT = FastPath(fuse_bn=True, winograd=False, onednn=False)


@dataclass
class FoldedConv:
    """A conv with its normalisation folded in: weight Tensor[C_out, C_in, k, k],
    bias Tensor[C_out], and the conv geometry."""
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


def fold_conv_norm(conv: nn.Conv2d, norm: Optional[nn.Module] = None,
                   detach: bool = True) -> FoldedConv:
    """conv followed by norm (None: the conv alone) as one FoldedConv; conv.bias, if any,
    is folded too. detach=False keeps the weight in the autograd graph of conv.weight
    (training: the gradient reaches the conv, the frozen norm has no parameters)."""
    weight, bias = conv.weight, conv.bias
    if detach:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    if norm is not None:
        scale, shift = norm_scale_shift(norm)
        weight = weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if bias is None else bias * scale + shift
    elif bias is None:
        bias = torch.zeros(conv.out_channels, dtype=weight.dtype, device=weight.device)
    return FoldedConv(weight, bias, tuple(conv.stride), tuple(conv.padding),
                      tuple(conv.dilation), conv.groups)


def is_foldable(norm: nn.Module) -> bool:
    return isinstance(norm, FrozenBatchNorm2d) or (
        isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats)


def use_onednn(x: Tensor) -> bool:
    """oneDNN fused convolutions apply: CPU float32 with mkldnn built in."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def onednn_inference(x: Tensor) -> bool:
    """The fused oneDNN path applies to x: no gradients needed, oneDNN available."""
    return not torch.is_grad_enabled() and use_onednn(x)


# Smallest map side on which the Winograd convs run. RoI maps (7x7 box-head, 14x14
# mask-head convs) lose however many RoIs there are: their border tiles are mostly
# padding (a 7x7 map fills 49 of 64 tile outputs). Measurements: docs/benchmarks.md.
MIN_WINOGRAD_SIDE = 16


def winograd_pays(x: Tensor, in_channels: int) -> bool:
    """Enough 4x4 output tiles to amortise the filter transform (36 C K values written,
    and in the backward read and transformed back): forward + backward lose below ~120
    tiles at 256 channels and below ~250 at 512 (ResNet layer4 at 800 px has 63)."""
    n, _, h, w = x.shape
    if min(h, w) < MIN_WINOGRAD_SIDE:
        return False
    return n * ((h + 3) // 4) * ((w + 3) // 4) >= max(128, in_channels // 2)


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


# Smallest map (H * W) on which the grouped kernel runs: below it oneDNN was as fast or
# faster (per-call overhead; 16 per group on 50x76 measured 0.9-1.1x, on 13x19 0.65x);
# from 100x100 on it wins. Measurements: docs/benchmarks.md, "X-101 grouped convs".
MIN_GROUPED_KERNEL_PIXELS = 10000


def grouped_kernel_applies(x: Tensor, conv: FoldedConv) -> bool:
    """libs.ops.grouped_conv3x3 computes this conv, and faster than oneDNN: a grouped 3x3
    conv with stride 1, padding 1, no dilation, as many output as input channels, a group
    width the kernel has (8 or 16), a map of MIN_GROUPED_KERNEL_PIXELS or more, CPU
    float32 and the kernel built. The caller checks that no gradient is needed (the
    kernel has no backward)."""
    w, c = conv.weight, x.shape[1]
    return (conv.groups > 1 and x.shape[2] * x.shape[3] >= MIN_GROUPED_KERNEL_PIXELS
            and tuple(w.shape[2:]) == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and w.shape[0] == c
            and c % conv.groups == 0
            and c // conv.groups in kernel_ops.GROUPED_CONV_GROUP_WIDTHS
            and x.dtype == torch.float32 and w.dtype == torch.float32
            and kernel_ops.grouped_conv_available())


def _needs_grad(x: Tensor, conv: FoldedConv) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad
                                        or conv.bias.requires_grad)


def conv_act(x: Tensor, conv: FoldedConv, relu: bool,
             residual: Optional[Tensor] = None, winograd: bool = False,
             overwrite_residual: bool = False, onednn: bool = True) -> Tensor:
    """relu?(conv(x) + residual?) with folded weights, differentiable when they are.

    Args:
        x: Tensor[N, C_in, H, W]; residual: Tensor[N, C_out, H', W'] (the conv's output
            size) or None. On the oneDNN path x should be channels-last (the output is).
        winograd: run eligible convs (no residual) as conv3x3_winograd.
        overwrite_residual: the caller no longer needs residual, so the oneDNN path may
            write the result into it (oneDNN's sum post-op: the same sum, which may
            round the bias and residual adds in another order) instead of into a new map. Above glibc's 32 MB mmap threshold every new map is fresh pages
            the kernel must fault in and zero: ~25 ms of CPU time for a 55 MB ResNeXt
            res2 map at 800 px (docs/benchmarks.md, "Model zoo").
        onednn: False keeps to F.conv2d and plain adds (FastPath.onednn).
    """
    if winograd and residual is None and winograd_applies(x, conv):
        return winograd_conv(x, conv, relu)
    if onednn and use_onednn(x) and not _needs_grad(x, conv):
        if residual is None and grouped_kernel_applies(x, conv):
            return kernel_ops.grouped_conv3x3(x, conv.weight, conv.bias, conv.groups, relu)
        args = (conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, *args, "relu" if relu else "none", [], "")
        residual = residual.contiguous(memory_format=torch.channels_last)
        if overwrite_residual:
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, *args, "add", 1.0, "relu" if relu else None, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, *args, "add", 1.0, "relu" if relu else None, [], "")
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    if residual is not None:
        y = y.add_(residual)     # add and ReLU backward need neither input: in place is safe
    return y.relu_() if relu else y


def conv2d(x: Tensor, conv: nn.Conv2d, relu: bool = False,
           residual: Optional[Tensor] = None, fast_path: FastPath = FastPath(),
           norm: Optional[nn.Module] = None, overwrite_residual: bool = False) -> Tensor:
    """relu?(norm?(conv(x)) + residual?) for a module's conv and norm.

    With fast_path.fuse_bn, at inference on CPU: one oneDNN call on channels-last tensors,
    the norm folded into the conv (overwrite_residual: as conv_act's); with EXPORT's
    onednn=False, anywhere at inference: F.conv2d with the norm folded in. With
    fast_path.winograd, eligible convs without a residual run as conv3x3_winograd, in
    inference and training. Otherwise (training without Winograd, CUDA, or fast_path
    EXACT) the modules and plain ops.
    """
    grad = torch.is_grad_enabled()
    foldable = conv.padding_mode == "zeros" and _foldable_now(norm, grad)
    if fast_path.winograd and residual is None and foldable:
        folded = fold_conv_norm(conv, norm, detach=not grad)
        if winograd_applies(x, folded):
            return winograd_conv(x, folded, relu)
    if foldable and fast_path.folds_at_inference(x):
        if fast_path.onednn:
            x = x.contiguous(memory_format=torch.channels_last)
        return conv_act(x, fold_conv_norm(conv, norm), relu, residual,
                        overwrite_residual=overwrite_residual, onednn=fast_path.onednn)
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
