"""The one builder: reads the model sections of a config and builds the parts, each
module with plain keyword arguments or parts built here; below this file nothing reads
the config.

    cfg = configs.load_config("my.ini")
    model = build_model(cfg)                      # a GeneralizedRCNN, random weights

A variant is one class plus one entry in its slot's table: box heads (heads.build_box_head),
mask pasting (heads.PASTE_MASKS), anchors (proposal.anchors.CELL_ANCHORS), proposal
filters (proposal.rpn.PROPOSAL_FILTERS), norms (layers.norm).
"""
from __future__ import annotations

import re
from typing import Optional

from easydict import EasyDict
from torch import nn

from backbones import build_resnet_fpn_backbone
from backbones.resnet import FAMILY_WIDTHS
from generalized_rcnn import GeneralizedRCNN
from heads import BoxPredictor, MaskHead, MaskPredictor, RoIHeads, build_box_head
from layers import FastPath, FrozenBatchNorm2d
from pooling import MultiScaleRoIAlign
from proposal import RPN, AnchorGenerator, RPNHead
from tools.transform import ImageTransform


def build_fast_path(cfg: EasyDict) -> FastPath:
    """[backbone] fuse_bn and winograd: how every conv of the model runs."""
    b = cfg.backbone
    return FastPath(fuse_bn=b.fuse_bn, winograd=b.fuse_bn and b.winograd)


def _trunk_arch(b: EasyDict) -> dict:
    """ResNetTrunk's depth / groups / width_per_group from [backbone]: resnetNN or
    resnextNN, groups and width_per_group 0 meaning the family's default."""
    match = re.fullmatch(r"(resnet|resnext)(\d+)", b.backbone)
    if not match:
        raise ValueError(f"[backbone] backbone must look like 'resnet50' or 'resnext101', "
                         f"got {b.backbone!r}")
    family, depth = match.group(1), int(match.group(2))
    groups, width = FAMILY_WIDTHS[family]
    return dict(depth=depth, groups=b.groups or groups,
                width_per_group=b.width_per_group or width)


def build_backbone(cfg: EasyDict, pretrained_backbone: Optional[str] = None) -> nn.Module:
    """[backbone]: the ResNet-FPN; pretrained_backbone None, "imagenet" or a path of
    ImageNet ResNet weights."""
    b = cfg.backbone
    backbone = build_resnet_fpn_backbone(
        **_trunk_arch(b), norm=b.norm, trainable_layers=b.trainable_layers,
        out_channels=b.fpn_channels, pretrained=pretrained_backbone,
        fast_path=build_fast_path(cfg), stride_in_1x1=b.stride_in_1x1, fpn_norm=b.fpn_norm)
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
    """[anchors] and [rpn]."""
    a, r = cfg.anchors, cfg.rpn
    anchors = AnchorGenerator(sizes=a.anchor_sizes, aspect_ratios=a.aspect_ratios,
                              rule=a.anchor_rule)
    head = RPNHead(cfg.backbone.fpn_channels, anchors.num_anchors_per_location()[0],
                   num_convs=r.rpn_head_convs, fast_path=build_fast_path(cfg))
    return RPN(anchor_generator=anchors, head=head, **{key: r[key] for key in RPN_KEYS})


def build_roi_heads(cfg: EasyDict) -> RoIHeads:
    """[roi_heads], [box_head], [mask_head] (and model.num_classes, model.mask_on)."""
    m, h, bh, mh = cfg.model, cfg.roi_heads, cfg.box_head, cfg.mask_head
    channels = cfg.backbone.fpn_channels
    fast_path = build_fast_path(cfg)
    pool_kw = dict(aligned=h.roi_aligned, canonical_scale=h.roi_canonical_scale,
                   canonical_level=h.roi_canonical_level, level_rule=h.roi_level_rule)
    box_head = build_box_head(bh.box_head, channels, bh.box_pool_size, bh.representation_size,
                              bh.box_conv_dim, bh.box_norm, fast_path)
    mask_parts = ()
    if m.mask_on:
        mask_parts = (
            MultiScaleRoIAlign(mh.mask_pool_size, mh.mask_sampling_ratio, **pool_kw),
            MaskHead(channels, tuple(mh.mask_layers), mh.mask_dilation, mh.mask_norm,
                     fast_path),
            MaskPredictor(mh.mask_layers[-1], mh.mask_dim_reduced, m.num_classes + 1,
                          fast_path))
    return RoIHeads(
        MultiScaleRoIAlign(bh.box_pool_size, bh.box_sampling_ratio, **pool_kw), box_head,
        BoxPredictor(bh.representation_size, m.num_classes + 1), *mask_parts,
        box_fg_iou_thresh=h.box_fg_iou_thresh, box_bg_iou_thresh=h.box_bg_iou_thresh,
        box_batch_size_per_image=h.box_batch_size_per_image,
        box_positive_fraction=h.box_positive_fraction, bbox_reg_weights=h.bbox_reg_weights,
        box_loss=bh.box_loss, box_smooth_l1_beta=bh.box_smooth_l1_beta,
        box_score_thresh=h.box_score_thresh, box_nms_thresh=h.box_nms_thresh,
        box_detections_per_img=h.box_detections_per_img, box_min_size=h.box_min_size,
        box_drop_empty=h.box_drop_empty)


def build_transform(cfg: EasyDict) -> ImageTransform:
    """[transform] (and the mask pasting of [mask_head])."""
    t = cfg.transform
    return ImageTransform(
        min_size=t.min_size, max_size=t.max_size, image_mean=t.image_mean,
        image_std=t.image_std, size_divisible=t.size_divisible,
        train_min_size=t.train_min_size, mask_paste_padding=cfg.mask_head.mask_paste_padding,
        input_format=t.input_format, pixel_scale=t.pixel_scale,
        mask_paste=cfg.mask_head.mask_paste)


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
        cfg: a config from configs.load_config (optionally with apply_overrides).
    """
    return GeneralizedRCNN(*build_parts(cfg, pretrained_backbone), cfg=cfg)
