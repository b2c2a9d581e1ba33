"""torchvision's Mask R-CNN as ours: its hyper-parameters as config overrides, and its
weights in our parameter names (v1 and v2, modules or state dicts).

Backbone (keys relative to `backbone.`):
    body.*                               -> body.*  (same ResNet module names)
    fpn.inner_blocks.{i}.0.{weight,bias} -> fpn.lateral_convs.{i}.{weight,bias}
    fpn.layer_blocks.{i}.0.{weight,bias} -> fpn.output_convs.{i}.{weight,bias}
    fpn.inner_blocks.{i}.1.*             -> fpn.lateral_norms.{i}.*  (v2: conv + BatchNorm)
    fpn.layer_blocks.{i}.1.*             -> fpn.output_norms.{i}.*
    (torchvision < 0.13 names without the ".0" are accepted too.)

RPN (keys relative to `rpn.`):
    head.conv.{j}.0.{weight,bias} -> head.convs.{j}.{weight,bias}  (v1 has j = 0, v2 0, 1;
                                                                     older: head.conv.*)
    head.cls_logits.*, head.bbox_pred.* -> the same
    The anchor generator has no weights; ours is built with the same sizes / ratios.

RoI heads (keys relative to `roi_heads.`):
    box_head.fc6.*, box_head.fc7.*      -> the same (TwoMLPHead, v1)
    box_head.{j}.0.weight                -> box_head.convs.{j}.weight  (FastRCNNConvFCHead, v2:
    box_head.{j}.1.*                     -> box_head.norms.{j}.*        Conv2dNormActivation
    box_head.{N + 1}.*                   -> box_head.fc6.*              blocks, Flatten, Linear)
    box_predictor.*, mask_head.*, mask_predictor.* -> the same (mask head blocks are
                                            (conv, [norm,] relu) Sequentials on both sides)
"""
from __future__ import annotations

import re

from torch import Tensor, nn

from layers import FrozenBatchNorm2d


# ----------------------------------------------------------------- hyper-parameters

_TV_DEPTHS = {("BasicBlock", 2, 2, 2, 2): 18, ("BasicBlock", 3, 4, 6, 3): 34,
              ("Bottleneck", 3, 4, 6, 3): 50, ("Bottleneck", 3, 4, 23, 3): 101,
              ("Bottleneck", 3, 8, 36, 3): 152}


def _torchvision_depth(body: nn.Module) -> int:
    layers = [getattr(body, f"layer{i}") for i in range(1, 5)]
    key = (type(layers[0][0]).__name__, *(len(layer) for layer in layers))
    if key not in _TV_DEPTHS:
        raise ValueError(f"unsupported torchvision backbone body (blocks {key})")
    return _TV_DEPTHS[key]


def _torchvision_trainable_layers(body: nn.Module) -> int:
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"]
    trainable = 0
    for name in stages:
        if not any(p.requires_grad for p in getattr(body, name).parameters()):
            break
        trainable += 1
    return trainable


def _one_per_level(values, what: str) -> tuple:
    if any(len(v) != 1 for v in values):
        raise ValueError(f"torchvision {what} {values}: only one value per level is supported")
    return tuple(v[0] for v in values)


def torchvision_hyperparameters(tv: nn.Module) -> dict:
    """Config overrides reproducing a torchvision MaskRCNN (bare key names)."""
    body, t, rpn, rh = tv.backbone.body, tv.transform, tv.rpn, tv.roi_heads
    if getattr(t, "fixed_size", None) is not None:
        raise ValueError("torchvision transform fixed_size is not supported")
    ratios = rpn.anchor_generator.aspect_ratios
    if any(tuple(r) != tuple(ratios[0]) for r in ratios):
        raise ValueError("per-level anchor aspect ratios are not supported")
    mask_on = rh.has_mask()
    convs = [block[0] for block in rh.mask_head] if mask_on else []
    bn = any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    frozen = [m for m in body.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    out = dict(
        num_classes=rh.box_predictor.cls_score.out_features - 1, mask_on=mask_on,
        backbone=f"resnet{_torchvision_depth(body)}", norm="bn" if bn else "frozen_bn",
        trainable_layers=_torchvision_trainable_layers(body),
        fpn_channels=tv.backbone.out_channels,
        min_size=t.min_size[-1], train_min_size=tuple(t.min_size), max_size=t.max_size,
        image_mean=tuple(t.image_mean), image_std=tuple(t.image_std),
        size_divisible=t.size_divisible,
        anchor_sizes=_one_per_level(rpn.anchor_generator.sizes, "anchor sizes"),
        aspect_ratios=tuple(ratios[0]),
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"],
        rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"],
        rpn_nms_thresh=rpn.nms_thresh, rpn_score_thresh=rpn.score_thresh,
        rpn_min_size=rpn.min_size,
        rpn_fg_iou_thresh=rpn.proposal_matcher.high_threshold,
        rpn_bg_iou_thresh=rpn.proposal_matcher.low_threshold,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction,
        box_fg_iou_thresh=rh.proposal_matcher.high_threshold,
        box_bg_iou_thresh=rh.proposal_matcher.low_threshold,
        box_batch_size_per_image=rh.fg_bg_sampler.batch_size_per_image,
        box_positive_fraction=rh.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=tuple(rh.box_coder.weights), box_score_thresh=rh.score_thresh,
        box_nms_thresh=rh.nms_thresh, box_detections_per_img=rh.detections_per_img,
        box_pool_size=rh.box_roi_pool.output_size[0],
        box_sampling_ratio=rh.box_roi_pool.sampling_ratio,
        roi_canonical_scale=rh.box_roi_pool.canonical_scale,
        roi_canonical_level=rh.box_roi_pool.canonical_level,
        norm_eps=frozen[0].eps if frozen else 1e-5,
        fpn_norm=_torchvision_norm(tv.backbone.fpn.inner_blocks[0]),
        rpn_head_convs=len(rpn.head.conv),
        **_torchvision_box_head(rh.box_head))
    if mask_on:
        out.update(mask_pool_size=rh.mask_roi_pool.output_size[0],
                   mask_sampling_ratio=rh.mask_roi_pool.sampling_ratio,
                   mask_layers=tuple(c.out_channels for c in convs),
                   mask_dilation=convs[0].dilation[0],
                   mask_dim_reduced=rh.mask_predictor.conv5_mask.out_channels,
                   mask_norm=_torchvision_norm(rh.mask_head[0]))
    return out


def _torchvision_norm(block: nn.Module) -> str:
    """Our name of the norm in a torchvision conv block (Conv2dNormActivation or a
    (conv, [norm,] relu) Sequential)."""
    kinds = {"BatchNorm2d": "bn", "FrozenBatchNorm2d": "frozen_bn", "GroupNorm": "gn"}
    for module in block.modules():
        if type(module).__name__ in kinds:
            return kinds[type(module).__name__]
    return "none"


def _torchvision_box_head(box_head: nn.Module) -> dict:
    """box_head config keys of a torchvision TwoMLPHead (v1) or FastRCNNConvFCHead (v2)."""
    name = type(box_head).__name__
    if name == "TwoMLPHead":
        return dict(box_head="2fc", representation_size=box_head.fc6.out_features)
    linears = [m for m in box_head if isinstance(m, nn.Linear)]
    convs = [m for m in box_head if not isinstance(m, (nn.Linear, nn.Flatten, nn.ReLU))]
    if name != "FastRCNNConvFCHead" or len(linears) != 1:
        raise ValueError(f"box head {name} is not supported (TwoMLPHead, or "
                         "FastRCNNConvFCHead with one fc layer: the v1 and v2 Mask R-CNN)")
    return dict(box_head=f"{len(convs)}conv1fc", representation_size=linears[0].out_features,
                box_conv_dim=convs[0][0].out_channels if convs else 256,
                box_norm=_torchvision_norm(convs[0]) if convs else "none")


# -------------------------------------------------------------------------- weights

def load_torchvision_weights(model: nn.Module, tv_model: nn.Module) -> None:
    """Copy a torchvision MaskRCNN's weights into ours (built with
    torchvision_hyperparameters(tv_model)), strictly, with its FrozenBatchNorm2d eps."""
    load_torchvision_backbone_state(model.backbone, tv_model.backbone)
    load_torchvision_rpn_state(model.rpn, tv_model.rpn)
    load_torchvision_roi_heads_state(model.roi_heads, tv_model.roi_heads)


def convert_torchvision_backbone_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision BackboneWithFPN state dict (keys relative to `backbone.`) to
    ours (the map in this module's docstring)."""
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


def load_torchvision_backbone_state(backbone: nn.Module, tv_backbone: nn.Module | dict) -> None:
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


def convert_torchvision_rpn_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision RPN state dict (keys relative to `rpn.`) to ours."""
    out = {}
    for key, value in tv_state.items():
        key = re.sub(r"^head\.conv\.(\d+)\.0\.", r"head.convs.\1.", key)
        out[re.sub(r"^head\.conv\.(weight|bias)$", r"head.convs.0.\1", key)] = value
    return out


def load_torchvision_rpn_state(rpn: nn.Module, tv_rpn: nn.Module | dict) -> None:
    """Copy torchvision RPN weights (module, e.g. `tv_model.rpn`, or its state_dict) into
    ours, strictly."""
    state = tv_rpn.state_dict() if isinstance(tv_rpn, nn.Module) else tv_rpn
    rpn.load_state_dict(convert_torchvision_rpn_state_dict(state), strict=True)


_HEADS = ("box_head", "box_predictor", "mask_head", "mask_predictor")


def convert_torchvision_roi_heads_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision RoIHeads state dict (keys relative to `roi_heads.`) to ours."""
    conv_blocks = {int(m.group(1)) for k in tv_state
                   if (m := re.match(r"box_head\.(\d+)\.0\.weight$", k))}
    out = {}
    for key, value in tv_state.items():
        if key.split(".")[0] not in _HEADS:
            continue
        match = re.match(r"box_head\.(\d+)\.(?:(\d)\.)?(\w+)$", key)
        if match:
            block, part, name = int(match.group(1)), match.group(2), match.group(3)
            if block in conv_blocks:
                key = f"box_head.{'convs' if part == '0' else 'norms'}.{block}.{name}"
            else:
                key = f"box_head.fc6.{name}"     # the Linear after Flatten
        out[key] = value
    return out


def load_torchvision_roi_heads_state(roi_heads: nn.Module,
                                     tv_roi_heads: nn.Module | dict) -> None:
    """Copy torchvision RoIHeads weights (module or its state_dict) into ours, strictly."""
    state = tv_roi_heads.state_dict() if isinstance(tv_roi_heads, nn.Module) else tv_roi_heads
    roi_heads.load_state_dict(convert_torchvision_roi_heads_state_dict(state), strict=True)
