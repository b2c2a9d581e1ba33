"""Mask R-CNN, the entry point: `MaskRCNN` and what a user calls.

    model = MaskRCNN(num_classes=80, pretrained="coco").eval()
    detections = model([image])            # image: Tensor[3, H, W] RGB in [0, 1]

Where things are (docs/architecture.md has the picture):
    configs/loader.py     the config language: schema, load_config, apply_overrides
    builder.py            the one builder: config -> parts (build_model)
    generalized_rcnn.py   the assembled model's forward and input checks
    tools/transform.py    resize / normalise / pad, and postprocess
    convert/              torchvision's and detectron2's checkpoints in our names
"""
from __future__ import annotations

import os
from typing import Optional, Union

from torch import nn

from builder import COCO_NUM_CLASSES, build_model, build_parts
from configs import DEFAULT_CONFIG, apply_overrides, load_config, resolve_config
from configs.loader import (AUTO, configured_backbone, explicit_keys, known_keys,
                            overlay_config, trainable_without_weights, with_num_classes)
from convert import pretrained as pretrained_weights
from convert import zoo
from convert.torchvision import load_torchvision_weights, torchvision_hyperparameters
from generalized_rcnn import GeneralizedRCNN

try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version
    __version__ = _dist_version("mask-rcnn-pytorch")
except PackageNotFoundError:   # a source checkout that was never pip-installed
    __version__ = "0+unknown"

__all__ = ["MaskRCNN", "GeneralizedRCNN", "build_model", "load_config", "apply_overrides",
           "DEFAULT_CONFIG", "__version__"]


class MaskRCNN(GeneralizedRCNN):
    """Mask R-CNN: transform -> backbone (ResNet-FPN) -> RPN -> RoI heads -> postprocess.

    Args:
        num_classes: K object classes (background excluded); None (or "auto") takes the
            config's model.num_classes, whose "auto" (the shipped default) means the
            pretrained weights' classes, or 80 (COCO) without weights. Another K than the
            checkpoint's loads everything but the class-specific predictors, which are
            re-initialised (one-line notice naming them).
        pretrained: None (the config's model.pretrained, "none" by default); "coco"
            (the zoo's model for the configured backbone: convert.zoo.COCO_FOR_BACKBONE);
            a zoo name ("detectron2/mask_rcnn_R_101_FPN_3x", see convert.zoo.ZOO); a
            checkpoint path (ours, torchvision's or detectron2's .pth / .pkl, detected
            from the content); or "imagenet" (backbone only). A zoo model brings its
            preset's architecture and categories; it is downloaded into the torch hub
            cache once and verified (MASKRCNN_OFFLINE=1 forbids downloading).
        config: None (the package's defaults), a config path (relative to the working
            directory; a shipped file such as "configs/zoo/<preset>.ini" is found in the
            package when not there) or an already-loaded EasyDict. With a zoo
            model, the preset replaces the defaults and the config's non-default values
            still apply (test-time settings, data, solver).
        **overrides: config keys, bare (unique across sections, e.g. backbone="resnet50")
            or "section.key"; unknown, ambiguous or mistyped ones raise ValueError.

    Attributes:
        transform, backbone, rpn, roi_heads; cfg (the resolved EasyDict); num_classes;
        categories (label -> (name, COCO id), or None when unknown).

    The parts come from builder.py; forward and the input checks from GeneralizedRCNN.
    """

    def __init__(self, num_classes: Optional[int] = None, pretrained: Optional[str] = None,
                 config: Union[str, os.PathLike, dict, None] = None, **overrides):
        cfg = resolve_config(config)
        # The argument, else the key as an override, else the config's value.
        for value in (overrides.pop("model.pretrained", None), cfg.model.pretrained):
            pretrained = value if pretrained is None else pretrained
        if pretrained is not None and str(pretrained).lower() == "none":
            pretrained = None
        if num_classes is not None and num_classes != AUTO:
            overrides["model.num_classes"] = num_classes
        entry, weights = None, None
        if pretrained is not None and pretrained != "imagenet":
            entry = zoo.resolve_name(str(pretrained), configured_backbone(cfg, overrides))
        if entry is not None:
            cfg = overlay_config(load_config(entry.preset_path), cfg, overrides,
                                  f"the zoo model {entry.name}")
        elif pretrained is not None and pretrained != "imagenet":
            weights = pretrained_weights.read_model_weights(pretrained)
            if weights.config is not None:       # ours: the architecture it was trained with
                stored = resolve_config(known_keys(weights.config))
                cfg = overlay_config(stored, cfg, overrides, f"the checkpoint {pretrained}")
        elif pretrained is None:
            cfg = trainable_without_weights(cfg, explicit_keys(config, overrides))
        cfg = apply_overrides(cfg, overrides)
        counted = weights is not None and pretrained_weights.class_count(weights.state)
        cfg = with_num_classes(cfg, counted or COCO_NUM_CLASSES)
        cfg.model.pretrained = pretrained
        super().__init__(*build_parts(cfg, "imagenet" if pretrained == "imagenet" else None),
                         cfg=cfg)
        if entry is not None:
            path = zoo.fetch(entry, check_content=pretrained_weights.content_check(self))
            self._load_weights(pretrained_weights.read_model_weights(path),
                               f"{entry.name} ({path})")
        elif weights is not None:
            self._load_weights(weights, str(pretrained))

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], **overrides) -> "MaskRCNN":
        """The model of one of our checkpoints (a training checkpoint or an exported
        weights file), rebuilt from the config stored in it, with its categories;
        `overrides` (config keys) change test-time settings, e.g. box_score_thresh."""
        return cls(pretrained=str(path), **overrides)

    def _load_weights(self, weights: "pretrained_weights.ModelWeights", origin: str) -> None:
        same_classes = pretrained_weights.load_model_weights(self, weights, origin)
        self.categories = weights.categories if same_classes else None

    @classmethod
    def from_torchvision(cls, tv_model: nn.Module, fuse_bn: bool = True) -> "MaskRCNN":
        """Ours, from a torchvision.models.detection.MaskRCNN with a ResNet-FPN backbone
        (any depth; v1, or v2 as maskrcnn_resnet50_fpn_v2 builds it): the same weights
        and hyper-parameters, so eval outputs are equal.

        num_classes is torchvision's minus one (background). The depth comes from the
        body's block counts; trainable stages from requires_grad; the norms from the
        modules (a BatchNorm2d trunk becomes norm "bn", else "frozen_bn").

        fuse_bn: True (default) runs the fast path (config key backbone.fuse_bn: BatchNorm
            folded into the convolutions, Winograd convs; speed in docs/benchmarks.md):
            equal up to float rounding, which random networks whose features grow to
            1e2..1e5 amplify, but trained weights do not. False computes as torchvision
            does: boxes, labels and scores equal to the last bit whatever the weights,
            mask probabilities within one float32 rounding step (the sigmoid of the
            selected class and the pasting round differently).
        """
        overrides = {**torchvision_hyperparameters(tv_model), "fuse_bn": bool(fuse_bn)}
        model = cls(config=DEFAULT_CONFIG, **overrides)
        load_torchvision_weights(model, tv_model)
        return model
