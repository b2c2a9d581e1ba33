"""ResNet trunks (torchvision.models.resnet) returning C2..C5, with stage freezing and
ImageNet weight loading.

Shape letters: N images, H/W input size. C2..C5 have strides 4, 8, 16, 32.
Module names equal torchvision's (conv1, bn1, layer1..layer4), so torchvision's
`backbone.body.*` and ImageNet state-dict keys load unchanged (ImageNet's fc.* is dropped).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from layers import FastPath
from layers.conv import use_onednn
from layers.norm import norm_layer_factory
from tools import download as zoo

from .fused_trunk import (block_forward, fused_trunk_forward, stage_forward, stem_forward,
                          trunk_all_frozen_bn, trunk_is_foldable)

DEPTHS = (18, 34, 50, 101, 152)
# (groups, width_per_group) of each family's 3x3 convs: ResNet, and ResNeXt's 32x8d.
FAMILY_WIDTHS = {"resnet": (1, 64), "resnext": (32, 8)}
# Stages from the input up; trainable_layers=k trains the last k (torchvision's rule).
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")


def resnet_out_channels(depth: int) -> list[int]:
    """Channels of C2..C5: basic blocks (18, 34) 64..512, bottlenecks (50+) 256..2048."""
    _check_depth(depth)
    base = 64 if depth < 50 else 256
    return [base, base * 2, base * 4, base * 8]


def _check_depth(depth: int) -> None:
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {DEPTHS}, got {depth}")


class ResNetTrunk(nn.Module):
    """ResNet without its pooling and classifier.

    Args:
        depth: 18, 34, 50, 101 or 152.
        norm: "frozen_bn", "bn" or "gn" (see layers.norm.norm_layer_factory).
        groups, width_per_group: the 3x3 convs of the bottlenecks (1, 64: ResNet;
            32, 8: ResNeXt-32x8d). Basic blocks (18, 34) take only (1, 64).
        stride_in_1x1: put each stage's stride in the first 1x1 conv of its first block
            (MSRA weights, detectron2's STRIDE_IN_1X1) instead of the 3x3 conv.
        trainable_layers: 0..5, how many stages, counted from layer4 down to conv1, keep
            trainable parameters; the others are frozen (requires_grad False, and their
            BatchNorm layers stay in eval mode so their statistics do not drift).
        fast_path: layers.FastPath. With fuse_bn, in eval mode without gradients, run
            the convs with the normalisation folded in and ReLU / residual adds fused
            (backbones/fused_trunk.py); with frozen_bn and gradients (training), run the
            frozen stages that way without autograd and fold the norms in-graph in the
            trainable ones. Equal to the unfused forward up to float rounding. GroupNorm
            trunks never fuse. With winograd, the 3x3 stride-1 convs of the fused
            paths run by Winograd.
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", trainable_layers: int = 3,
                 fast_path: FastPath = FastPath(), groups: int = 1,
                 width_per_group: int = 64, stride_in_1x1: bool = False):
        super().__init__()
        _check_depth(depth)
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        if depth < 50 and (groups, width_per_group) != (1, 64):
            raise ValueError(f"ResNet-{depth} has basic blocks: groups / width_per_group "
                             f"must be 1 / 64, got {groups} / {width_per_group}")
        # torchvision's resnetNN builders with ResNeXt widths (resnext101_32x8d is this).
        net = getattr(tv_resnet, f"resnet{depth}")(weights=None,
                                                   norm_layer=norm_layer_factory(norm),
                                                   groups=groups, width_per_group=width_per_group)
        if stride_in_1x1:
            _move_stride_to_1x1(net)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.layer4 = net.layer4
        self.depth = depth
        self.groups, self.width_per_group = groups, width_per_group
        self.out_channels_list = resnet_out_channels(depth)
        self.trainable_layers = trainable_layers
        self._freeze()
        self.fast_path = fast_path
        self._foldable = trunk_is_foldable(self)
        self._all_frozen_bn = trunk_all_frozen_bn(self)

    def _frozen_modules(self) -> list[nn.Module]:
        frozen = STAGES[: len(STAGES) - self.trainable_layers]
        # bn1 belongs to the conv1 stage.
        return [m for name in frozen for m in
                ([self.conv1, self.bn1] if name == "conv1" else [getattr(self, name)])]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetTrunk":
        super().train(mode)
        for module in self._frozen_modules():
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def uses_fused_path(self) -> bool:
        """Inference (eval mode, no grad) with foldable norms runs the fused path."""
        return (self.fast_path.fuse_bn and not self.training and not torch.is_grad_enabled()
                and self._foldable)

    def _frozen_prefix(self) -> int:
        """How many of conv1, layer1.. (in order) are frozen: they need no gradient."""
        return len(STAGES) - self.trainable_layers

    def _forward_folded_train(self, x: Tensor) -> list[Tensor]:
        """Training (or grad-enabled) forward of a frozen-BatchNorm trunk: the frozen
        stages run the inference fast path without autograd (nothing there needs a
        gradient when the input does not), the trainable ones fold the norms in-graph.
        On the CPU the activations stay channels-last from there on (FPN and heads too):
        oneDNN's forward and backward convolutions are faster on them, and it saves the
        NCHW copy of C2."""
        frozen = self._frozen_prefix() if not x.requires_grad else 0
        outs = []
        stages = [("conv1", None)] + [(f"layer{i}", getattr(self, f"layer{i}"))
                                      for i in range(1, 5)]
        for index, (name, layer) in enumerate(stages):
            if index < frozen:
                with torch.no_grad():
                    x = self._stage_inference(name, layer, x)
            elif layer is None:
                x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            else:
                for block in layer:
                    x = block_forward(x, block, self.fast_path.winograd, detach=False)
            if layer is not None:
                outs.append(x)
        return outs

    def _stage_inference(self, name: str, layer, x: Tensor) -> Tensor:
        if layer is None:
            return stem_forward(self, x)
        if use_onednn(x):
            x = x.contiguous(memory_format=torch.channels_last)
        return stage_forward(layer, x, self.fast_path.winograd)

    def forward(self, x: Tensor) -> list[Tensor]:
        """
        Args:
            x: Tensor[N, 3, H, W], normalised images.
        Returns:
            [C2, C3, C4, C5], Tensor[N, C_l, H / s, W / s] for strides s = 4, 8, 16, 32
            (channels-last memory format on the fused CPU inference path).
        """
        if self.uses_fused_path():
            # Folded on every call, block by block, not cached: a cache would hold a
            # second copy of the trunk's weights (~95 MB for ResNet-50) for little gain.
            return fused_trunk_forward(self, x, self.fast_path.winograd, self.fast_path.onednn)
        if self.fast_path.fuse_bn and self._all_frozen_bn:
            return self._forward_folded_train(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def _move_stride_to_1x1(net: nn.Module) -> None:
    """MSRA-style bottlenecks: the first block of a stage strides in conv1, not conv2.
    The weights keep their shapes; only where the subsampling happens changes."""
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(net, name)[0]
        if isinstance(block, tv_resnet.Bottleneck) and block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def _imagenet_urls(depth: int, groups: int = 1, width_per_group: int = 64) -> list[str]:
    """torchvision's ImageNet checkpoint URLs for this trunk, preferred first.

    IMAGENET1K_V1 first: it is what torchvision's Mask R-CNN backbones were trained from.
    """
    _check_depth(depth)
    family = (f"ResNet{depth}" if (groups, width_per_group) == (1, 64)
              else f"ResNeXt{depth}_{groups}X{width_per_group}D")
    enum = getattr(tv_resnet, f"{family}_Weights", None)
    if enum is None:
        raise ValueError(f"torchvision has no ImageNet weights for {family}; pass a weights "
                         f"file as pretrained=... or train from scratch")
    return [w.url for w in enum if w.name.startswith("IMAGENET1K")]


def imagenet_weight_files(depth: int, groups: int = 1, width_per_group: int = 64) -> list[str]:
    """torchvision's ImageNet checkpoint file names for this trunk, preferred first."""
    return [url.rsplit("/", 1)[-1] for url in _imagenet_urls(depth, groups, width_per_group)]


def _imagenet_entry(url: str) -> "zoo.ZooEntry":
    """A downloadable file of tools.zoo, verified by the sha256 prefix in its name."""
    name = url.rsplit("/", 1)[-1]
    return zoo.ZooEntry(name=f"ImageNet weights {name}", preset="", url=url,
                        sha256=name.rsplit("-", 1)[-1].split(".")[0], box_ap=0.0,
                        mask_ap=0.0, source="torchvision", backbone="")


def imagenet_weights_path(depth: int, groups: int = 1, width_per_group: int = 64,
                          progress: bool = True) -> str:
    """Path of a torchvision ImageNet checkpoint in the torch hub cache: a cached one
    (any of imagenet_weight_files, verified by its hash), else IMAGENET1K_V1 downloaded
    there (tools.zoo.fetch: progress bar, atomic, verified).

    Raises:
        FileNotFoundError naming the file, its URL and the path to put it at, when it is
        not cached and MASKRCNN_OFFLINE=1; DownloadError likewise when the download fails.
    """
    entries = [_imagenet_entry(url) for url in _imagenet_urls(depth, groups, width_per_group)]
    cached = [e for e in entries if zoo.cached_file(e).is_file()]
    return str(zoo.fetch(cached[0] if cached else entries[0], progress=progress))


def load_imagenet_weights(trunk: ResNetTrunk, path: str) -> None:
    """Load a torchvision ResNet ImageNet state dict (file) into `trunk`.

    The classifier (fc.*) is dropped; every other key must match. The trunk must use
    "frozen_bn" or "bn" (GroupNorm has no statistics to take from a BatchNorm checkpoint).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if any(isinstance(m, nn.GroupNorm) for m in trunk.modules()):
        raise ValueError("ImageNet BatchNorm weights cannot initialise a GroupNorm trunk; "
                         "use norm='frozen_bn' or 'bn', or pretrained=None")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    # Old checkpoints lack BatchNorm's step counter; nothing else may be missing.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"{path} does not fit ResNet-{trunk.depth}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_pretrained_trunk(trunk: ResNetTrunk, pretrained: str | None) -> None:
    """pretrained None (nothing), "imagenet" (torchvision's checkpoint for the trunk's
    depth / groups / width_per_group: imagenet_weights_path) or a path of a torchvision
    ResNet ImageNet state dict, loaded into `trunk` (load_imagenet_weights)."""
    if pretrained is None:
        return
    path = (imagenet_weights_path(trunk.depth, trunk.groups, trunk.width_per_group)
            if pretrained == "imagenet" else pretrained)
    load_imagenet_weights(trunk, path)


def _family_trunk(family: str):
    """A TRUNKS entry: ResNetTrunk with groups / width_per_group 0 meaning the family's
    default (FAMILY_WIDTHS)."""
    default_groups, default_width = FAMILY_WIDTHS[family]

    def build(depth: int, norm: str = "frozen_bn", trainable_layers: int = 3,
              fast_path: FastPath = FastPath(), groups: int = 0, width_per_group: int = 0,
              stride_in_1x1: bool = False) -> ResNetTrunk:
        return ResNetTrunk(depth, norm, trainable_layers, fast_path=fast_path,
                           groups=groups or default_groups,
                           width_per_group=width_per_group or default_width,
                           stride_in_1x1=stride_in_1x1)
    build.__name__ = build.__qualname__ = f"{family}_trunk"
    build.__doc__ = (f"TRUNKS[{family + 'N'!r}]: ResNetTrunk of depth N, groups / "
                     f"width_per_group 0 meaning {default_groups} / {default_width}.")
    return build


# The trunk, by the config key backbone.backbone. A key with "N" stands for any name with
# a number there ("resnet101" -> "resnetN"); builder.py calls an entry with
#     depth: int (that number; only for keys with "N"), norm: str, trainable_layers: int,
#     fast_path: layers.FastPath, groups: int, width_per_group: int (0: the entry's
#     default), stride_in_1x1: bool
# and the module, with an out_channels_list attribute (channels of C2..C5), maps images
# Tensor[N, 3, H, W] -> [C2, C3, C4, C5], strides 4, 8, 16, 32. pretrained_backbone
# ("imagenet" or a file) loads by load_pretrained_trunk (trunks with ResNetTrunk's
# depth / groups / width_per_group attributes and parameter names).
TRUNKS = {"resnetN": _family_trunk("resnet"), "resnextN": _family_trunk("resnext")}
