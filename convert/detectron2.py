"""detectron2 Mask R-CNN state dicts (ResNet/ResNeXt-FPN: the classic 3x models and the
LSJ "new baselines") converted to this project's parameter names.

    detectron2 (prefix `backbone.bottom_up.`)     ours (prefix `backbone.body.`)
    stem.conv1.weight                             conv1.weight
    stem.conv1.norm.*                             bn1.*
    res{s}.{i}.conv{j}.weight                     layer{s-1}.{i}.conv{j}.weight
    res{s}.{i}.conv{j}.norm.*                     layer{s-1}.{i}.bn{j}.*
    res{s}.{i}.shortcut.weight                    layer{s-1}.{i}.downsample.0.weight
    res{s}.{i}.shortcut.norm.*                    layer{s-1}.{i}.downsample.1.*

    backbone.fpn_lateral{k}.{weight,bias}         backbone.fpn.lateral_convs.{k-2}.*
    backbone.fpn_lateral{k}.norm.*                backbone.fpn.lateral_norms.{k-2}.*
    backbone.fpn_output{k}.{weight,bias}          backbone.fpn.output_convs.{k-2}.*
    backbone.fpn_output{k}.norm.*                 backbone.fpn.output_norms.{k-2}.*

    proposal_generator.rpn_head.conv.*            rpn.head.convs.0.*     (one conv)
    proposal_generator.rpn_head.conv.conv{j}.*    rpn.head.convs.{j}.*   (several, j from 0)
    proposal_generator.rpn_head.objectness_logits.*   rpn.head.cls_logits.*
    proposal_generator.rpn_head.anchor_deltas.*       rpn.head.bbox_pred.*

    roi_heads.box_head.fc1.* / fc2.*              roi_heads.box_head.fc6.* / fc7.*
    roi_heads.box_head.conv{j}.{weight,bias}      roi_heads.box_head.convs.{j-1}.*
    roi_heads.box_head.conv{j}.norm.*             roi_heads.box_head.norms.{j-1}.*
    roi_heads.box_predictor.cls_score.*           same name; background row moved last -> first
    roi_heads.box_predictor.bbox_pred.*           same name; 4 zero background rows prepended
    roi_heads.mask_head.mask_fcn{j}.{weight,bias} roi_heads.mask_head.{j-1}.0.*
    roi_heads.mask_head.mask_fcn{j}.norm.*        roi_heads.mask_head.{j-1}.1.*
    roi_heads.mask_head.deconv.*                  roi_heads.mask_predictor.conv5_mask.*
    roi_heads.mask_head.predictor.*               roi_heads.mask_predictor.mask_fcn_logits.*
                                                  (zero background channel prepended)

`*` of a norm is weight, bias, running_mean, running_var or num_batches_tracked.
Dropped (not learned): pixel_mean, pixel_std, proposal_generator.anchor_generator.*.
Any other key is a ValueError naming it. Class labels: detectron2's classes 0..K-1 (and
background K) become ours 1..K (and background 0).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["is_detectron2_state", "detectron2_num_classes", "convert_detectron2_state"]

_NORM = r"norm\.(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"
_WB = r"(?P<p>weight|bias)"
_BODY = r"backbone\.bottom_up\."
_RES = _BODY + r"res(?P<s>[2-5])\.(?P<i>\d+)\."

# (detectron2 key regex, our key template, offsets added to the named integer groups)
_RULES: list[tuple[str, str, dict[str, int]]] = [
    (_BODY + r"stem\.conv1\.weight", "backbone.body.conv1.weight", {}),
    (_BODY + r"stem\.conv1\." + _NORM, "backbone.body.bn1.{p}", {}),
    (_RES + r"conv(?P<j>[1-3])\.weight", "backbone.body.layer{s}.{i}.conv{j}.weight", {"s": -1}),
    (_RES + r"conv(?P<j>[1-3])\." + _NORM, "backbone.body.layer{s}.{i}.bn{j}.{p}", {"s": -1}),
    (_RES + r"shortcut\.weight", "backbone.body.layer{s}.{i}.downsample.0.weight", {"s": -1}),
    (_RES + r"shortcut\." + _NORM, "backbone.body.layer{s}.{i}.downsample.1.{p}", {"s": -1}),
    (r"backbone\.fpn_(?P<t>lateral|output)(?P<k>[2-5])\." + _WB,
     "backbone.fpn.{t}_convs.{k}.{p}", {"k": -2}),
    (r"backbone\.fpn_(?P<t>lateral|output)(?P<k>[2-5])\." + _NORM,
     "backbone.fpn.{t}_norms.{k}.{p}", {"k": -2}),
    (r"proposal_generator\.rpn_head\.conv\." + _WB, "rpn.head.convs.0.{p}", {}),
    (r"proposal_generator\.rpn_head\.conv\.conv(?P<j>\d+)\." + _WB, "rpn.head.convs.{j}.{p}", {}),
    (r"proposal_generator\.rpn_head\.objectness_logits\." + _WB, "rpn.head.cls_logits.{p}", {}),
    (r"proposal_generator\.rpn_head\.anchor_deltas\." + _WB, "rpn.head.bbox_pred.{p}", {}),
    (r"roi_heads\.box_head\.fc(?P<j>[12])\." + _WB, "roi_heads.box_head.fc{j}.{p}", {"j": 5}),
    (r"roi_heads\.box_head\.conv(?P<j>\d+)\." + _WB, "roi_heads.box_head.convs.{j}.{p}",
     {"j": -1}),
    (r"roi_heads\.box_head\.conv(?P<j>\d+)\." + _NORM, "roi_heads.box_head.norms.{j}.{p}",
     {"j": -1}),
    (r"roi_heads\.box_predictor\.(?P<n>cls_score|bbox_pred)\." + _WB,
     "roi_heads.box_predictor.{n}.{p}", {}),
    (r"roi_heads\.mask_head\.mask_fcn(?P<j>\d+)\." + _WB, "roi_heads.mask_head.{j}.0.{p}",
     {"j": -1}),
    (r"roi_heads\.mask_head\.mask_fcn(?P<j>\d+)\." + _NORM, "roi_heads.mask_head.{j}.1.{p}",
     {"j": -1}),
    (r"roi_heads\.mask_head\.deconv\." + _WB, "roi_heads.mask_predictor.conv5_mask.{p}", {}),
    (r"roi_heads\.mask_head\.predictor\." + _WB, "roi_heads.mask_predictor.mask_fcn_logits.{p}",
     {}),
]
_COMPILED = [(re.compile(pattern), template, offsets) for pattern, template, offsets in _RULES]
# Buffers that are not learned (older checkpoints saved them): dropped.
_DROP = re.compile(r"pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*")


def _prepend_zeros(t: Tensor, rows: int) -> Tensor:
    return torch.cat([t.new_zeros((rows,) + t.shape[1:]), t])


# Our key -> how its value changes (K object classes).
_VALUES: dict[str, Callable[[Tensor], Tensor]] = {
    # detectron2 logits: classes 0..K-1 then background; ours: background then 1..K.
    **{f"roi_heads.box_predictor.cls_score.{p}": lambda t: torch.cat([t[-1:], t[:-1]])
       for p in ("weight", "bias")},
    # detectron2 regresses object classes only; ours has 4 (unused) background rows.
    **{f"roi_heads.box_predictor.bbox_pred.{p}": lambda t: _prepend_zeros(t, 4)
       for p in ("weight", "bias")},
    # detectron2 predicts K masks; ours K + 1 with channel 0 for background (unused).
    **{f"roi_heads.mask_predictor.mask_fcn_logits.{p}": lambda t: _prepend_zeros(t, 1)
       for p in ("weight", "bias")},
}


def is_detectron2_state(state: Mapping[str, object]) -> bool:
    """True when `state` uses detectron2's GeneralizedRCNN parameter names."""
    return any(k.startswith(("backbone.bottom_up.", "proposal_generator.")) for k in state)


def detectron2_num_classes(state: Mapping[str, object]) -> int:
    """K, the number of object classes of a detectron2 state dict (cls_score rows - 1)."""
    key = "roi_heads.box_predictor.cls_score.bias"
    if key not in state:
        raise ValueError(f"not a detectron2 Mask R-CNN state dict: no {key}")
    return int(state[key].shape[0]) - 1


def _our_key(key: str) -> str | None:
    """Our name for a detectron2 key; None for a dropped one; ValueError if unknown."""
    if _DROP.fullmatch(key):
        return None
    for pattern, template, offsets in _COMPILED:
        m = pattern.fullmatch(key)
        if m:
            groups = m.groupdict()
            for name, delta in offsets.items():
                groups[name] = int(groups[name]) + delta
            return template.format(**groups)
    raise ValueError(f"unknown detectron2 parameter {key!r}: no conversion rule for it")


def convert_detectron2_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detectron2 Mask R-CNN (ResNet/ResNeXt-FPN) state dict under our names and layout.

    Values may be tensors or numpy arrays (model-zoo .pkl files hold arrays); the result
    holds tensors (the unchanged ones share memory with the input where possible).
    Raises ValueError on an unknown key or on class-agnostic box / mask predictors.
    """
    num_classes = detectron2_num_classes(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        ours = _our_key(key)
        if ours is None:
            continue
        value = torch.as_tensor(value)
        if ours.startswith(("roi_heads.box_predictor.bbox_pred.",
                            "roi_heads.mask_predictor.mask_fcn_logits.")):
            per_class = 4 if "bbox_pred" in ours else 1
            if value.shape[0] != per_class * num_classes:
                raise ValueError(
                    f"{key}: {value.shape[0]} rows, expected {per_class} x {num_classes} "
                    "classes (class-agnostic predictors are not supported)")
        if ours in out:
            raise ValueError(f"{key}: two detectron2 keys map to {ours!r}")
        out[ours] = _VALUES[ours](value) if ours in _VALUES else value
    return out
