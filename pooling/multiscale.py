"""Multi-level (FPN) RoIAlign: each box is pooled from the pyramid level matching its size.

Shape letters: N images, C channels, L levels, R RoIs (sum over images of R_i),
PH/PW pooled size.

Results equal ``torchvision.ops.MultiScaleRoIAlign`` (same level rule, same scales, same
row order). The difference is in the bookkeeping: torchvision runs ``where(levels == l)``,
one RoIAlign and an ``index_put`` per level; here one op (``maskrcnn::roi_align_multilevel``)
takes every level and the per-RoI level, and on the CPU one kernel call writes each RoI's
row in place (no per-level gathers, concatenation or scatter of the pooled features).
Scales are cached per (feature sizes, padded image size).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from libs import boxes_to_rois, ops, pooling_dtype, roi_align
from tools.tracing import is_tracing, round_log2, size_tensor

__all__ = ["MultiScaleRoIAlign", "level_scales", "traced_level_scales", "map_levels",
           "LEVEL_RULES", "ROI_POOLERS", "torchvision_level", "detectron2_level"]


def level_scales(feature_sizes: Sequence[Tuple[int, int]],
                 image_sizes: Sequence[Tuple[int, int]]) -> List[float]:
    """Scale (1/stride) of each level: ``2 ** round(log2(feature_h / max_image_h))``.

    As torchvision: the padded batch size is the max (h, w) over images, and the height
    ratio decides (the ratio is rounded to a power of two, so padding does not matter).
    """
    max_h = max(int(s[0]) for s in image_sizes)
    scales = []
    for h, _ in feature_sizes:
        # float32 log2 as torchvision computes it, so ties round the same way.
        approx = torch.tensor(float(h) / float(max_h)).log2().round()
        scales.append(2.0 ** float(approx))
    return scales


def torchvision_level(sizes: Tensor, canonical_scale: float, canonical_level: int,
                      eps: float) -> Tensor:
    """torchvision: ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``."""
    return torch.floor(canonical_level + torch.log2(sizes / canonical_scale)
                       + torch.tensor(eps, dtype=sizes.dtype))


def detectron2_level(sizes: Tensor, canonical_scale: float, canonical_level: int,
                     eps: float) -> Tensor:
    """detectron2: ``floor(canonical_level + log2(sqrt(area) / canonical_scale + 1e-8))``
    (eps unused)."""
    return torch.floor(canonical_level + torch.log2(sizes / canonical_scale + 1e-8))


# The level rule, by the config key roi_heads.roi_level_rule (MultiScaleRoIAlign's
# level_rule). An entry is a function
#     rule(sizes: Tensor[R] = sqrt(box area), canonical_scale: float, canonical_level: int,
#          eps: float) -> Tensor[R] float, the unclamped, floored absolute level
# (map_levels clamps it to the pyramid). A new rule is one function and one entry here.
LEVEL_RULES = {"torchvision": torchvision_level, "detectron2": detectron2_level}


def _check_level_rule(level_rule: str) -> None:
    if level_rule not in LEVEL_RULES:
        raise ValueError(f"level_rule must be {' or '.join(map(repr, LEVEL_RULES))}, "
                         f"got {level_rule!r}")


def map_levels(boxes: Sequence[Tensor], k_min: int, k_max: int, canonical_scale: float,
               canonical_level: int, level_rule: str = "torchvision",
               eps: float = 1e-6) -> Tensor:
    """Pyramid level of each box, relative to ``k_min``: Tensor[R] int64 in [0, k_max-k_min].

    ``LEVEL_RULES[level_rule]`` of the boxes' sqrt(area): torchvision
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``, detectron2
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale + 1e-8))``; clamped to
    the available levels.
    """
    b = torch.cat(list(boxes), dim=0)
    s = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    _check_level_rule(level_rule)
    lvl = LEVEL_RULES[level_rule](s, canonical_scale, canonical_level, eps)
    if isinstance(k_min, Tensor):    # traced: k_min, k_max float 0-d tensors
        return (torch.minimum(torch.maximum(lvl, k_min), k_max) - k_min).to(torch.int64)
    lvl = torch.clamp(lvl, min=k_min, max=k_max)
    return lvl.to(torch.int64) - k_min


def traced_level_scales(features: Sequence[Tensor], image_h) -> Tensor:
    """level_scales when traced: Tensor[L] float32, 2 ** round(log2(H_l / Hr)) from the
    sizes as tensors (the ratio rounded to float32 first, as level_scales does), so that
    one graph serves every image size."""
    ratios = torch.stack([size_tensor(f.shape[-2]).to(torch.float64) for f in features])
    ratios = (ratios / size_tensor(image_h).to(torch.float64)).to(torch.float32)
    return torch.pow(2.0, round_log2(ratios.to(torch.float64))).to(torch.float32)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over a feature pyramid, choosing the level per box by its size.

    Args:
        output_size: int or (PH, PW).
        sampling_ratio: samples per bin per axis; <= 0 means adaptive.
        aligned: pixel-centre convention (see ``libs.roi_align``).
        canonical_scale, canonical_level: a box of side ``canonical_scale`` maps to level
            ``canonical_level`` (224 -> P4, as in the FPN paper).
        level_rule: a name in LEVEL_RULES: "torchvision" or "detectron2" (differ only in
            where the epsilon sits).
        eps: torchvision's epsilon added before the floor.

    forward(features: list[Tensor[N, C, H_l, W_l]] finest first (P2..P5),
            boxes: list[Tensor[R_i, 4]] per image in resized-image pixels,
            image_sizes: list[(h, w)] of the resized images)
        -> Tensor[R, C, PH, PW], rows in image order then box order.
    """

    def __init__(self, output_size, sampling_ratio: int, aligned: bool = False,
                 canonical_scale: float = 224, canonical_level: int = 4,
                 level_rule: str = "torchvision", eps: float = 1e-6):
        super().__init__()
        _check_level_rule(level_rule)
        self.output_size = (output_size, output_size) if isinstance(output_size, int) \
            else tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.level_rule = level_rule
        self.eps = eps
        self._scale_cache: Dict[tuple, List[float]] = {}

    def _scales(self, features: List[Tensor], image_sizes) -> List[float]:
        feature_sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
        key = (feature_sizes, max(int(s[0]) for s in image_sizes))
        scales = self._scale_cache.get(key)
        if scales is None:
            scales = level_scales(feature_sizes, image_sizes)
            self._scale_cache[key] = scales
        return scales

    def forward(self, features: List[Tensor], boxes: List[Tensor],
                image_sizes: List[Tuple[int, int]]) -> Tensor:
        if isinstance(features, Tensor):
            features = [features]
        if len(features) == 0:
            raise ValueError("MultiScaleRoIAlign: features must be a non-empty list")
        if len(image_sizes) == 0:
            raise ValueError("MultiScaleRoIAlign: image_sizes must list the (h, w) of each image")
        if is_tracing():
            return self._forward_traced(list(features), boxes, image_sizes)
        scales = self._scales(list(features), image_sizes)
        rois = boxes_to_rois(boxes).to(features[0].device)
        if len(features) == 1:
            return self._pool(features[0], rois, scales[0])
        k_min = int(round(-math.log2(scales[0])))
        k_max = int(round(-math.log2(scales[-1])))
        levels = map_levels(boxes, k_min, k_max, self.canonical_scale, self.canonical_level,
                            self.level_rule, self.eps)
        dtype = pooling_dtype(features[0].dtype, rois.dtype)
        # One op for all levels: one fused kernel call on the CPU, per-level calls writing
        # into one result elsewhere; no host sync, so torch.compile traces it as is.
        out = ops.roi_align_multilevel([f.to(dtype) for f in features],
                                       rois.to(dtype), levels, scales, *self.output_size,
                                       self.sampling_ratio, self.aligned)
        return out.to(features[0].dtype)

    def _forward_traced(self, features: List[Tensor], boxes: List[Tensor],
                        image_sizes) -> Tensor:
        """forward for one image as an exporter traces it: the scales follow the image
        size, and the boxes are scaled to each level's map here (powers of two: exact)
        so that the op runs with spatial_scale 1. ONNX (TorchScript tracer): one RoIAlign
        per level (what ONNX RoiAlign expresses) gathered back into box order;
        torch.export: our fused multi-level op."""
        scales = traced_level_scales(features, image_sizes[0][0])
        k_min = -round_log2(scales[0].to(torch.float64)).to(torch.float32)
        k_max = -round_log2(scales[-1].to(torch.float64)).to(torch.float32)
        levels = map_levels(boxes, k_min, k_max, self.canonical_scale, self.canonical_level,
                            self.level_rule, self.eps)
        boxes = torch.cat(list(boxes))
        ph, pw = self.output_size
        if not torch.jit.is_tracing():
            rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes * scales[levels][:, None]], 1)
            return ops.roi_align_multilevel(features, rois, levels, [1.0] * len(features),
                                            ph, pw, self.sampling_ratio, self.aligned)
        pooled, order = [], []
        for level, feature in enumerate(features):
            idx = torch.nonzero(levels == level).reshape(-1)
            level_boxes = boxes[idx] * scales[level]
            rois = torch.cat([torch.zeros_like(level_boxes[:, :1]), level_boxes], 1)
            pooled.append(ops.roi_align(feature, rois, 1.0, ph, pw, self.sampling_ratio,
                                        self.aligned))
            order.append(idx)
        # Row i of the result is row inverse[i] of the levels' rows. (A scatter,
        # out[order] = pooled, traces into a ScatterND whose update shape the tracer
        # fixes when a level has one RoI: a gather does not.)
        order = torch.cat(order)
        inverse = torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0]))
        return torch.cat(pooled)[inverse]

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio,
                         self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}, level_rule={self.level_rule!r}")


# The RoI pooler, by the config keys box_head.box_roi_pool and mask_head.mask_roi_pool.
# builder.py calls an entry with these keyword arguments:
#     output_size: int, sampling_ratio: int, aligned: bool, canonical_scale: float,
#     canonical_level: int, level_rule: str (a name in LEVEL_RULES)
# and the module it returns is called as
#     pooler(features: list[Tensor[N, C, H_l, W_l]] finest first (P2..P5),
#            boxes: list[Tensor[R_i, 4]] per image, resized-image pixels,
#            image_sizes: list[(h, w)]) -> Tensor[sum R_i, C, P, P], image order then box order.
ROI_POOLERS = {"multiscale": MultiScaleRoIAlign}
