"""The network of a MaskRCNN as plain PyTorch modules for export: every normalisation that
can be folded (frozen BatchNorm, BatchNorm in eval mode) is folded into its conv at export
time, and every conv is a standard `nn.Conv2d` (no oneDNN fused ops, no Winograd custom
op), so an exporter sees Conv / Relu / Add / MatMul only.

The parts are read through the model's submodules by their names (the state-dict keys:
backbone.body.layer1.0.conv1, backbone.fpn.lateral_convs.0, rpn.head.convs.0,
roi_heads.box_head.fc6, ...), never through the eager fast-path switches, so the export
does not depend on how the eager model chooses to run its convs.

Shape letters: N images (1 here), C channels, H/W map size, R RoIs, P pooled size.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.conv import fold_conv_norm, is_foldable

__all__ = ["fold", "PlainTrunk", "PlainFPN", "PlainRPNHead", "PlainBoxHead", "PlainMaskHead",
           "PlainMaskPredictor"]


def fold(conv: nn.Conv2d, norm: Optional[nn.Module] = None) -> nn.Module:
    """conv, then norm, as one module of standard ops.

    Returns:
        an nn.Conv2d with the norm folded into its weight and bias (layers.conv's folding,
        the eager fast path's float order; a copy: the model is untouched), or, for a
        norm that does not fold (GroupNorm), Sequential(conv, norm).
    """
    if norm is not None and not is_foldable(norm):
        return nn.Sequential(copy.deepcopy(conv), copy.deepcopy(norm))
    folded = fold_conv_norm(conv, norm)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, bias=True,
                    padding_mode=conv.padding_mode)
    with torch.no_grad():
        out.weight.copy_(folded.weight)
        out.bias.copy_(folded.bias)
    return out.requires_grad_(False)


def _norm(modules: Optional[nn.Module], i: int) -> Optional[nn.Module]:
    return modules[i] if modules is not None else None


class PlainBlock(nn.Module):
    """A torchvision BasicBlock / Bottleneck with its norms folded:
    relu(convs(x) + downsample?(x))."""

    def __init__(self, block: nn.Module):
        super().__init__()
        names = ["conv1", "conv2"] + (["conv3"] if hasattr(block, "conv3") else [])
        self.convs = nn.ModuleList(fold(getattr(block, n), getattr(block, "bn" + n[-1]))
                                   for n in names)
        down = block.downsample
        self.down = fold(down[0], down[1] if len(down) > 1 else None) \
            if down is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, C_in, H, W] -> Tensor[N, C_out, H / s, W / s]."""
        identity = self.down(x) if self.down is not None else x
        out = x
        for conv in self.convs[:-1]:
            out = F.relu(conv(out))
        return F.relu(self.convs[-1](out) + identity)


class PlainTrunk(nn.Module):
    """ResNet C2..C5 from a trunk with torchvision's module names (conv1, bn1, maxpool,
    layer1..layer4)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.stem = fold(body.conv1, body.bn1)
        self.maxpool = copy.deepcopy(body.maxpool)
        self.layers = nn.ModuleList(
            nn.Sequential(*[PlainBlock(b) for b in getattr(body, f"layer{i}")])
            for i in range(1, 5))

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: Tensor[N, 3, H, W] normalised -> [C2, C3, C4, C5] (strides 4..32)."""
        x = self.maxpool(F.relu(self.stem(x)))
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs


class PlainFPN(nn.Module):
    """The FPN (lateral_convs, output_convs, optional lateral_norms / output_norms) with
    nearest top-down upsampling and the max-pooled P6."""

    def __init__(self, fpn: nn.Module, extra_pool: bool = True):
        super().__init__()
        lat_norms = getattr(fpn, "lateral_norms", None)
        out_norms = getattr(fpn, "output_norms", None)
        self.lateral = nn.ModuleList(fold(c, _norm(lat_norms, i))
                                     for i, c in enumerate(fpn.lateral_convs))
        self.output = nn.ModuleList(fold(c, _norm(out_norms, i))
                                    for i, c in enumerate(fpn.output_convs))
        self.extra_pool = extra_pool

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """[C2..C5] -> [P2..P5] (+ P6), each Tensor[N, C, H_l, W_l]."""
        last_inner = self.lateral[-1](features[-1])
        results = [self.output[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            top_down = F.interpolate(last_inner, size=features[idx].shape[-2:],
                                     mode="nearest")
            last_inner = self.lateral[idx](features[idx]) + top_down
            results.insert(0, self.output[idx](last_inner))
        if self.extra_pool:
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results


class PlainRPNHead(nn.Module):
    """Shared 3x3 conv(s) + ReLU, then objectness logits and box deltas per level."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.convs = nn.ModuleList(fold(c) for c in head.convs)
        self.cls_logits = fold(head.cls_logits)
        self.bbox_pred = fold(head.bbox_pred)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """-> per level (Tensor[N, A, H_l, W_l] logits, Tensor[N, 4A, H_l, W_l] deltas)."""
        logits, deltas = [], []
        for t in features:
            for conv in self.convs:
                t = F.relu(conv(t))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


class PlainBoxHead(nn.Module):
    """TwoMLPHead (fc6, fc7) or Nconv1fc (convs [+ norms], fc6), then the predictor
    (cls_score, bbox_pred)."""

    def __init__(self, box_head: nn.Module, predictor: nn.Module):
        super().__init__()
        convs = getattr(box_head, "convs", None) or []
        norms = getattr(box_head, "norms", None)
        self.convs = nn.ModuleList(fold(c, _norm(norms, i)) for i, c in enumerate(convs))
        self.fcs = nn.ModuleList(copy.deepcopy(getattr(box_head, n))
                                 for n in ("fc6", "fc7") if hasattr(box_head, n))
        self.cls_score = copy.deepcopy(predictor.cls_score)
        self.bbox_pred = copy.deepcopy(predictor.bbox_pred)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: Tensor[R, C, P, P] -> (logits Tensor[R, K+1], deltas Tensor[R, 4(K+1)])."""
        for conv in self.convs:
            x = F.relu(conv(x))
        x = x.flatten(start_dim=1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.cls_score(x), self.bbox_pred(x)


class PlainMaskHead(nn.Module):
    """The mask head's (conv, [norm,] relu) blocks, norms folded."""

    def __init__(self, mask_head: nn.Module):
        super().__init__()
        self.convs = nn.ModuleList(fold(block[0], block[1] if len(block) == 3 else None)
                                   for block in mask_head)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[R, C, P, P] -> Tensor[R, C', P, P]."""
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


class PlainMaskPredictor(nn.Module):
    """2x2 stride-2 deconv + ReLU, 1x1 conv: Tensor[R, C, P, P] -> Tensor[R, K+1, 2P, 2P]."""

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.conv5_mask = copy.deepcopy(predictor.conv5_mask)
        self.mask_fcn_logits = fold(predictor.mask_fcn_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))
