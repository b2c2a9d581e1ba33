"""The one builder: reads the model sections of a config and builds the parts, each
module with plain keyword arguments or parts built here; below this file nothing reads
the config.

    cfg = configs.load_config("my.ini")
    model = build_model(cfg)                      # a GeneralizedRCNN, random weights

Every slot is a table: a plain dict `NAME -> constructor` in the module that defines the
slot, and a config key that picks the entry. This file only looks names up (lookup, at
build time: an entry added at run time is accepted) and calls the entry with the slot's
fixed keyword arguments (documented above each table; docs/architecture.md lists them):

    slot              config key                  table
    trunk             backbone.backbone           backbones.resnet.TRUNKS
    FPN               backbone.fpn                backbones.fpn.FPNS
    anchor rule       anchors.anchor_rule         proposal.anchors.CELL_ANCHORS
    RPN head          rpn.rpn_head                proposal.head.RPN_HEADS
    proposal filter   rpn.rpn_box_filter          proposal.rpn.PROPOSAL_FILTERS
    level rule        roi_heads.roi_level_rule    pooling.multiscale.LEVEL_RULES
    box RoI pooler    box_head.box_roi_pool       pooling.multiscale.ROI_POOLERS
    box head          box_head.box_head           heads.box_head.BOX_HEADS
    box predictor     box_head.box_predictor      heads.box_head.BOX_PREDICTORS
    mask RoI pooler   mask_head.mask_roi_pool     pooling.multiscale.ROI_POOLERS
    mask head         mask_head.mask_head         heads.mask_head.MASK_HEADS
    mask predictor    mask_head.mask_predictor    heads.mask_head.MASK_PREDICTORS
    mask paste        mask_head.mask_paste        tools.paste.PASTE_MASKS

A variant is one class (or function) plus one entry in its table, e.g.
`heads.MASK_HEADS["upsample"] = MyHead` and `mask_head = upsample`.
"""
from __future__ import annotations

import copy
import re
from typing import Callable, Mapping, Optional

from easydict import EasyDict
from torch import nn

from backbones import FPNS, TRUNKS, ResNetFPN, load_pretrained_trunk
from generalized_rcnn import GeneralizedRCNN
from heads import (BOX_HEADS, BOX_PREDICTORS, MASK_HEADS, MASK_PREDICTORS, PASTE_MASKS,
                   RoIHeads)
from layers import FastPath, FrozenBatchNorm2d
from pooling import LEVEL_RULES, ROI_POOLERS
from proposal import RPN, RPN_HEADS, AnchorGenerator
from proposal.anchors import CELL_ANCHORS
from proposal.rpn import PROPOSAL_FILTERS
from tools.transform import ImageTransform

# What [model] num_classes = auto builds when nothing resolved it (training takes the
# data's categories, MaskRCNN the pretrained weights' classes): COCO's 80 object classes.
COCO_NUM_CLASSES = 80


def lookup(table: Mapping[str, Callable], name: str, section: str, key: str,
           what: str) -> Callable:
    """table[name], or a one-line ValueError naming the key and listing the valid names:
    "[mask_head] mask_head = 'foo' is not a known mask head; valid names: fcn"."""
    if name in table:
        return table[name]
    raise ValueError(f"[{section}] {key} = {name!r} is not a known {what}; valid names: "
                     f"{', '.join(table)}")


def lookup_numbered(table: Mapping[str, Callable], name: str, section: str, key: str,
                    what: str) -> tuple[Callable, Optional[int]]:
    """(entry, number) for a name: the entry `name` itself (number None), else the entry
    whose key has "N" where the name has its first number ("resnet101" -> "resnetN", 101;
    "4conv1fc" -> "Nconv1fc", 4). The error lists the valid names, "N" meaning a number."""
    if name in table:
        return table[name], None
    match = re.search(r"\d+", name)
    if match:
        pattern = name[:match.start()] + "N" + name[match.end():]
        if pattern in table:
            return table[pattern], int(match.group())
    raise ValueError(f"[{section}] {key} = {name!r} is not a known {what}; valid names: "
                     f"{', '.join(table)} (N: a number)")


def build_fast_path(cfg: EasyDict) -> FastPath:
    """[backbone] fuse_bn and winograd: how every conv of the model runs."""
    b = cfg.backbone
    return FastPath(fuse_bn=b.fuse_bn, winograd=b.fuse_bn and b.winograd)


def build_trunk(cfg: EasyDict) -> nn.Module:
    """[backbone] backbone (TRUNKS, e.g. resnet101 -> "resnetN" with depth 101), norm,
    trainable_layers, groups, width_per_group (0: the entry's default), stride_in_1x1."""
    b = cfg.backbone
    trunk, depth = lookup_numbered(TRUNKS, b.backbone, "backbone", "backbone", "trunk")
    kwargs = {} if depth is None else dict(depth=depth)
    return trunk(**kwargs, norm=b.norm, trainable_layers=b.trainable_layers,
                 fast_path=build_fast_path(cfg), groups=b.groups,
                 width_per_group=b.width_per_group, stride_in_1x1=b.stride_in_1x1)


def build_backbone(cfg: EasyDict, pretrained_backbone: Optional[str] = None) -> nn.Module:
    """[backbone]: the trunk (build_trunk) and the FPN (key fpn, FPNS); pretrained_backbone
    None, "imagenet" or a path of ImageNet ResNet weights for the trunk."""
    b = cfg.backbone
    body = build_trunk(cfg)
    load_pretrained_trunk(body, pretrained_backbone)
    fpn = lookup(FPNS, b.fpn, "backbone", "fpn", "FPN")(
        in_channels_list=body.out_channels_list, out_channels=b.fpn_channels,
        norm=b.fpn_norm, fast_path=build_fast_path(cfg))
    backbone = ResNetFPN(body, fpn)
    _set_frozen_bn(backbone.body, eps=b.norm_eps)
    return backbone


def _set_frozen_bn(model: nn.Module, **attributes) -> None:
    """Set eps / op on every FrozenBatchNorm2d of `model`."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            for name, value in attributes.items():
                setattr(module, name, value)


# [rpn] keys that RPN takes under the same names.
RPN_KEYS = ("rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "rpn_batch_size_per_image",
            "rpn_positive_fraction", "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test", "rpn_nms_thresh",
            "rpn_score_thresh", "rpn_min_size", "rpn_box_filter")


def build_rpn(cfg: EasyDict) -> RPN:
    """[anchors] and [rpn]: anchor_rule (CELL_ANCHORS), rpn_head (RPN_HEADS),
    rpn_box_filter (PROPOSAL_FILTERS)."""
    a, r = cfg.anchors, cfg.rpn
    lookup(CELL_ANCHORS, a.anchor_rule, "anchors", "anchor_rule", "anchor rule")
    lookup(PROPOSAL_FILTERS, r.rpn_box_filter, "rpn", "rpn_box_filter", "proposal filter")
    anchors = AnchorGenerator(sizes=a.anchor_sizes, aspect_ratios=a.aspect_ratios,
                              rule=a.anchor_rule)
    head = lookup(RPN_HEADS, r.rpn_head, "rpn", "rpn_head", "RPN head")(
        in_channels=cfg.backbone.fpn_channels,
        num_anchors=anchors.num_anchors_per_location()[0], num_convs=r.rpn_head_convs,
        fast_path=build_fast_path(cfg))
    return RPN(anchor_generator=anchors, head=head, **{key: r[key] for key in RPN_KEYS})


def build_roi_pool(cfg: EasyDict, name: str, key: str, output_size: int,
                   sampling_ratio: int) -> nn.Module:
    """A RoI pooler (ROI_POOLERS[name], config key `key`) with [roi_heads]'s
    roi_aligned, roi_canonical_scale, roi_canonical_level and roi_level_rule
    (LEVEL_RULES)."""
    h = cfg.roi_heads
    lookup(LEVEL_RULES, h.roi_level_rule, "roi_heads", "roi_level_rule", "level rule")
    section = "box_head" if key == "box_roi_pool" else "mask_head"
    return lookup(ROI_POOLERS, name, section, key, "RoI pooler")(
        output_size=output_size, sampling_ratio=sampling_ratio, aligned=h.roi_aligned,
        canonical_scale=h.roi_canonical_scale, canonical_level=h.roi_canonical_level,
        level_rule=h.roi_level_rule)


def build_roi_heads(cfg: EasyDict) -> RoIHeads:
    """[roi_heads], [box_head], [mask_head] (and model.num_classes, model.mask_on):
    box_roi_pool / mask_roi_pool (ROI_POOLERS), box_head (BOX_HEADS), box_predictor
    (BOX_PREDICTORS), mask_head (MASK_HEADS), mask_predictor (MASK_PREDICTORS)."""
    m, h, bh, mh = cfg.model, cfg.roi_heads, cfg.box_head, cfg.mask_head
    num_classes = concrete_num_classes(cfg)
    channels = cfg.backbone.fpn_channels
    fast_path = build_fast_path(cfg)
    # Built in the order of the code before the tables (box head, mask pooler, head,
    # predictor, box pooler, predictor): the same random draws give the same weights.
    box_head, convs = lookup_numbered(BOX_HEADS, bh.box_head, "box_head", "box_head",
                                      "box head")
    box_head = box_head(**({} if convs is None else dict(num_convs=convs)),
                        in_channels=channels, pool_size=bh.box_pool_size,
                        representation_size=bh.representation_size,
                        conv_dim=bh.box_conv_dim, norm=bh.box_norm, fast_path=fast_path)
    mask_parts = ()
    if m.mask_on:
        mask_parts = (
            build_roi_pool(cfg, mh.mask_roi_pool, "mask_roi_pool", mh.mask_pool_size,
                           mh.mask_sampling_ratio),
            lookup(MASK_HEADS, mh.mask_head, "mask_head", "mask_head", "mask head")(
                in_channels=channels, layers=tuple(mh.mask_layers),
                dilation=mh.mask_dilation, norm=mh.mask_norm, fast_path=fast_path),
            lookup(MASK_PREDICTORS, mh.mask_predictor, "mask_head", "mask_predictor",
                   "mask predictor")(
                in_channels=mh.mask_layers[-1], dim_reduced=mh.mask_dim_reduced,
                num_classes=num_classes + 1, fast_path=fast_path))
    box_roi_pool = build_roi_pool(cfg, bh.box_roi_pool, "box_roi_pool", bh.box_pool_size,
                                  bh.box_sampling_ratio)
    box_predictor = lookup(BOX_PREDICTORS, bh.box_predictor, "box_head", "box_predictor",
                           "box predictor")(in_channels=bh.representation_size,
                                            num_classes=num_classes + 1)
    return RoIHeads(
        box_roi_pool, box_head, box_predictor, *mask_parts,
        box_fg_iou_thresh=h.box_fg_iou_thresh, box_bg_iou_thresh=h.box_bg_iou_thresh,
        box_batch_size_per_image=h.box_batch_size_per_image,
        box_positive_fraction=h.box_positive_fraction, bbox_reg_weights=h.bbox_reg_weights,
        box_loss=bh.box_loss, box_smooth_l1_beta=bh.box_smooth_l1_beta,
        box_score_thresh=h.box_score_thresh, box_nms_thresh=h.box_nms_thresh,
        box_detections_per_img=h.box_detections_per_img, box_min_size=h.box_min_size,
        box_drop_empty=h.box_drop_empty)


def build_transform(cfg: EasyDict) -> ImageTransform:
    """[transform] (and the mask pasting of [mask_head]: mask_paste, PASTE_MASKS)."""
    t = cfg.transform
    lookup(PASTE_MASKS, cfg.mask_head.mask_paste, "mask_head", "mask_paste", "mask paste")
    return ImageTransform(
        min_size=t.min_size, max_size=t.max_size, image_mean=t.image_mean,
        image_std=t.image_std, size_divisible=t.size_divisible,
        train_min_size=t.train_min_size, mask_paste_padding=cfg.mask_head.mask_paste_padding,
        input_format=t.input_format, pixel_scale=t.pixel_scale,
        mask_paste=cfg.mask_head.mask_paste)


def concrete_num_classes(cfg: EasyDict) -> int:
    """K of cfg's [model] num_classes: the number, or COCO_NUM_CLASSES for "auto"."""
    k = cfg.model.num_classes
    return COCO_NUM_CLASSES if k == "auto" else k


def build_parts(cfg: EasyDict, pretrained_backbone: Optional[str] = None
                ) -> tuple[nn.Module, RPN, RoIHeads, ImageTransform]:
    """(backbone, rpn, roi_heads, transform) as the model sections of `cfg` describe them,
    with random weights (or an ImageNet trunk: pretrained_backbone None, "imagenet" or a
    path of ImageNet ResNet weights)."""
    parts = (build_backbone(cfg, pretrained_backbone), build_rpn(cfg), build_roi_heads(cfg),
             build_transform(cfg))
    for part in parts:
        _set_frozen_bn(part, op=cfg.backbone.frozen_bn_op)
    return parts


def build_model(cfg: EasyDict, pretrained_backbone: Optional[str] = None
                ) -> GeneralizedRCNN:
    """The model `cfg` describes (build_parts), exactly: MaskRCNN(config=...) also
    resolves pretrained weights and the defaults of a model trained without them.

    Args:
        cfg: a config from configs.load_config (optionally with apply_overrides);
            num_classes = auto builds COCO_NUM_CLASSES (the model's cfg says so).
    """
    if cfg.model.num_classes == "auto":
        cfg = EasyDict(copy.deepcopy(cfg))
        cfg.model.num_classes = COCO_NUM_CLASSES
    return GeneralizedRCNN(*build_parts(cfg, pretrained_backbone), cfg=cfg)
