"""Mask R-CNN: the image transform, the model, the config loader and the one builder.

Shape letters: N images, H/W an original image's size, Hr/Wr its resized size, M GT
instances, D detections, K object classes (background is class 0, objects 1..K).

    model = MaskRCNN(num_classes=80, backbone="resnet50").eval()
    detections = model([image])            # image: Tensor[3, H, W] in [0, 1]

`build_model(cfg)` is the only code that reads the model sections of `config.ini`; below it
every module takes plain keyword arguments. The training / data / eval / demo keys are
read by the tools (see TRAINING_KEYS).
"""
from __future__ import annotations

import configparser
import copy
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from easydict import EasyDict
from torch import Tensor, nn

from backbones import build_resnet_fpn_backbone, load_torchvision_backbone_state
from backbones.norm import FrozenBatchNorm2d
from backbones.resnet import FAMILY_WIDTHS
from heads import (PASTE_MASKS, BoxPredictor, MaskHead, MaskPredictor, RoIHeads,
                   build_box_head, load_torchvision_roi_heads_state)
from pooling import MultiScaleRoIAlign
from proposal import RPN, AnchorGenerator, RPNHead, load_torchvision_rpn_state
from tools import pretrained as pretrained_weights
from tools import zoo
from tools.structures import ImageList

import configs as _configs   # the shipped config files (config.ini, presets, demo)

try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version
    __version__ = _dist_version("mask-rcnn-pytorch")
except PackageNotFoundError:   # a source checkout that was never pip-installed
    __version__ = "0+unknown"

# The folder holding this module: the repository root in a checkout, site-packages when
# installed. The defaults are the package's own config.ini (configs.shipped finds it with
# importlib.resources in a wheel, at the repository root in a checkout), never a
# config.ini of the working directory.
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = _configs.shipped("config.ini")

# Sections read by build_model; every other section belongs to the tools.
MODEL_SECTIONS = ("model", "backbone", "transform", "anchors", "rpn", "roi_heads",
                  "box_head", "mask_head")

# Model-section keys that MaskRCNN's constructor reads (build_model reads the others).
CONSTRUCTOR_KEYS = ("model.pretrained",)

# "section.key" of every key the training, data, evaluation and demo code reads
# (tests/test_config.py checks that these plus build_model's keys cover config.ini).
TRAINING_KEYS = (
    "solver.optimizer", "solver.lr", "solver.momentum", "solver.weight_decay",
    "solver.warmup_iters", "solver.warmup_factor", "solver.steps", "solver.gamma",
    "solver.max_iter", "solver.batch_size", "solver.clip_grad", "solver.amp",
    "solver.checkpoint_every", "solver.keep_last", "solver.seed", "solver.log_every",
    "solver.output_dir", "solver.lr_schedule", "solver.min_lr_factor", "solver.max_minutes",
    "solver.init_weights", "solver.tensorboard",
    "data.train_json", "data.train_images", "data.val_json", "data.val_images",
    "data.skip_empty", "data.flip_prob", "data.num_workers", "data.lsj", "data.lsj_scale",
    "data.lsj_size",
    "eval.eval_batch_size", "eval.mask_threshold", "eval.eval_every",
    "demo.demo_minutes", "demo.demo_image_size", "demo.demo_num_classes",
    "demo.demo_num_train", "demo.demo_num_val",
)


# ----------------------------------------------------------------------------- config

_INT = re.compile(r"^[+-]?\d+$")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _infer_type(text: str) -> str:
    """Type tag of a value in the default config: the schema."""
    text = text.strip()
    if text.lower() == "none":
        return "any"
    if text.lower() in ("true", "false"):
        return "bool"
    if "," in text:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return "tuple[int]" if all(_INT.match(t) for t in items) else "tuple[float]"
    if _INT.match(text):
        return "int"
    return "float" if _is_float(text) else "str"


def _parse_text(text: str, kind: str) -> Any:
    """Parse a config string as `kind`; raises ValueError (caller adds the context)."""
    text = text.strip()
    if kind == "any":
        return None if text.lower() == "none" else _parse_text(text, _infer_type(text))
    if kind == "int":
        if not _INT.match(text):
            raise ValueError
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bool":
        return _BOOLS[text.lower()]
    if kind == "str":
        return text
    items = [t.strip() for t in text.split(",")]
    if items and items[-1] == "":
        items = items[:-1]                 # "800," is a one-element tuple
    if not items:
        raise ValueError
    return tuple(_parse_text(t, kind[6:-1]) for t in items)


def _coerce(value: Any, kind: str) -> Any:
    """A Python value (an override) as `kind`; strings are parsed like config text."""
    if isinstance(value, str) and kind != "str":
        return _parse_text(value, kind)
    if kind == "any":
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind.startswith("tuple"):
        items = value if isinstance(value, (list, tuple)) else (value,)
        return tuple(_coerce(v, kind[6:-1]) for v in items)
    raise ValueError


@lru_cache(maxsize=1)
def _schema() -> dict[str, dict[str, tuple[str, str]]]:
    """{section: {key: (type tag, default text)}} from the shipped config.ini."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    if not parser.read(DEFAULT_CONFIG):     # read() skips a missing file silently
        raise FileNotFoundError(f"the package's default config is missing: {DEFAULT_CONFIG}")
    return {s: {k: (_infer_type(v), v) for k, v in parser[s].items()}
            for s in parser.sections()}


def _defaults() -> EasyDict:
    return EasyDict({s: {k: _parse_text(text, kind) for k, (kind, text) in keys.items()}
                     for s, keys in _schema().items()})


def load_config(path: Union[str, os.PathLike] = DEFAULT_CONFIG) -> EasyDict:
    """Read a config file over the defaults of the shipped config.ini. A relative path
    is taken relative to the working directory, as written (see _resolve_config for the
    fallback to the shipped files).

    Returns:
        EasyDict {section: {key: typed value}} with every key of the schema.
    Raises:
        ValueError naming file, section, key, value and expected type for an unknown
        section or key or a value of the wrong type. FileNotFoundError if missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path)
    schema, cfg = _schema(), _defaults()
    for section in parser.sections():
        if section not in schema:
            raise ValueError(f"{path}: unknown section [{section}] "
                             f"(known: {', '.join(schema)})")
        for key, text in parser[section].items():
            if key not in schema[section]:
                raise ValueError(f"{path}: [{section}] unknown key {key!r} = {text!r}")
            kind = schema[section][key][0]
            try:
                cfg[section][key] = _parse_text(text, kind)
            except (ValueError, KeyError):
                raise ValueError(f"{path}: [{section}] {key} = {text!r}: expected {kind}") \
                    from None
    return cfg


def _find_key(name: str) -> tuple[str, str]:
    """(section, key) of an override name: a bare key (unique) or "section.key"."""
    schema = _schema()
    if "." in name:
        section, key = name.split(".", 1)
        if section in schema and key in schema[section]:
            return section, key
        raise ValueError(f"unknown config key {name!r}")
    sections = [s for s in schema if name in schema[s]]
    if len(sections) != 1:
        problem = "unknown" if not sections else f"ambiguous (in {sections})"
        raise ValueError(f"config key {name!r} is {problem}; use 'section.key'")
    return sections[0], name


def apply_overrides(cfg: EasyDict, overrides: dict[str, Any]) -> EasyDict:
    """A copy of `cfg` with `overrides` ({bare key or "section.key": value}) applied,
    each value checked against the schema's type (strings are parsed)."""
    cfg = copy.deepcopy(cfg)
    for name, value in overrides.items():
        section, key = _find_key(name)
        kind = _schema()[section][key][0]
        try:
            cfg[section][key] = _coerce(value, kind)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"override {name}={value!r}: [{section}] {key} expects "
                             f"{kind}") from None
    return EasyDict(cfg)


def _configured_backbone(cfg: EasyDict, overrides: dict[str, Any]) -> str:
    for name in ("backbone", "backbone.backbone"):
        if name in overrides:
            return str(overrides[name])
    return cfg.backbone.backbone


def _overlay_config(base: EasyDict, user: EasyDict, overrides: dict[str, Any],
                    what: str) -> EasyDict:
    """`base` (a zoo preset, or the config stored in a checkpoint), with the user's config
    values that differ from the shipped defaults laid over it (test-time settings, data,
    solver). The architecture is the base's: a backbone override that names another one
    is an error."""
    cfg = copy.deepcopy(base)
    backbone = overrides.pop("backbone", overrides.pop("backbone.backbone", None))
    if backbone is not None and backbone != cfg.backbone.backbone:
        raise ValueError(f"backbone={backbone!r} conflicts with {what} "
                         f"({cfg.backbone.backbone}); leave backbone out, or pick a model "
                         f"for {backbone!r}")
    defaults = _defaults()
    for section, keys in user.items():
        for key, value in keys.items():
            own = (section, key) in (("backbone", "backbone"), ("model", "num_classes"),
                                     ("model", "pretrained"))
            if not own and value != defaults[section][key]:
                cfg[section][key] = value
    return cfg


def _known_keys(config: dict) -> dict:
    """A stored config without the sections and keys this version no longer has."""
    schema = _schema()
    return {s: {k: v for k, v in keys.items() if k in schema.get(s, {})}
            for s, keys in config.items() if s in schema}


def _explicit_keys(config: Union[str, os.PathLike, dict, None],
                   overrides: dict[str, Any]) -> set[str]:
    """"section.key" of every key the user set: in overrides, in the config file, or (a
    loaded config) with a value other than the default."""
    keys = {".".join(_find_key(name)) for name in overrides}
    if isinstance(config, dict):
        defaults = _defaults()
        keys |= {f"{s}.{k}" for s, values in config.items() for k, v in values.items()
                 if s in defaults and k in defaults[s] and v != defaults[s][k]}
    elif config is not None:
        path = Path(config)
        path = path if path.exists() else (_configs.repo_relative(path) or path)
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        parser.read(path)
        keys |= {f"{s}.{k}" for s in parser.sections() for k in parser[s]}
    return keys


# Trained from scratch, frozen BatchNorm keeps random statistics and frozen stages keep
# random weights; torchvision too trains every stage with BatchNorm when given no weights.
_FROM_SCRATCH = {"backbone.norm": "bn", "backbone.trainable_layers": 5}


def _trainable_without_weights(cfg: EasyDict, explicit: set[str]) -> EasyDict:
    """No pretrained weights: trainable norm and all stages, unless the user set them."""
    cfg = copy.deepcopy(cfg)
    for name, value in _FROM_SCRATCH.items():
        section, key = name.split(".")
        if name not in explicit and cfg[section][key] == _defaults()[section][key]:
            cfg[section][key] = value
    return cfg


def _resolve_config(config: Union[str, os.PathLike, dict, None]) -> EasyDict:
    """None (the package's defaults), a loaded dict, or a path. A relative path is the
    working directory's file; when there is none there and it names a shipped file as
    written in the repository ("config.ini", "configs/demo.ini", "configs/zoo/..."), the
    package's copy is read."""
    if config is None:
        return load_config(DEFAULT_CONFIG)
    if isinstance(config, dict):
        # Re-check a loaded config over the defaults, as if its values were overrides.
        flat = {f"{s}.{k}": v for s, keys in config.items() for k, v in keys.items()}
        return apply_overrides(_defaults(), flat)
    path = Path(config)
    if not path.exists():
        path = _configs.repo_relative(path) or path
    return load_config(path)


# -------------------------------------------------------------------------- transform

def resize_boxes(boxes: Tensor, original_size, new_size) -> Tensor:
    """Scale Tensor[M, 4] boxes from original_size (h, w) to new_size (float32 ratios,
    torchvision's arithmetic)."""
    ratio_h, ratio_w = [torch.tensor(s, dtype=torch.float32, device=boxes.device)
                        / torch.tensor(s0, dtype=torch.float32, device=boxes.device)
                        for s, s0 in zip(new_size, original_size)]
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


class ImageTransform(nn.Module):
    """Normalise, resize (shorter side to min_size, longer side capped at max_size) and
    pad a batch; targets are resized the same way. `postprocess` maps detections back.

    Args:
        min_size: shorter side at test time; train_min_size: choices at training time.
        max_size: cap on the longer side.
        image_mean, image_std: normalisation, in input_format order and pixel_scale units.
        size_divisible: the padded batch's sides are multiples of this.
        mask_paste_padding: zero border added to masks before pasting (1; torchvision).
        input_format: "RGB" or "BGR", the channel order the weights expect (images are
            always given RGB).
        pixel_scale: 1.0 or 255.0, the pixel range the weights expect (images are
            always given in [0, 1]).
        mask_paste: "torchvision" or "detectron2" (heads.mask_head.PASTE_MASKS).
    """

    def __init__(self, min_size: int = 800, max_size: int = 1333,
                 image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225),
                 size_divisible: int = 32, train_min_size=None, mask_paste_padding: int = 1,
                 input_format: str = "RGB", pixel_scale: float = 1.0,
                 mask_paste: str = "torchvision"):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if mask_paste not in PASTE_MASKS:
            raise ValueError(f"mask_paste must be one of {sorted(PASTE_MASKS)}, "
                             f"got {mask_paste!r}")
        self.input_format = input_format
        self.pixel_scale = float(pixel_scale)
        self.mask_paste = mask_paste
        self.min_size = int(min_size)
        self.train_min_size = tuple(train_min_size or (min_size,))
        self.max_size = int(max_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.size_divisible = int(size_divisible)
        self.mask_paste_padding = int(mask_paste_padding)

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None
                ) -> tuple[ImageList, Optional[list[dict]]]:
        """
        Args:
            images: per image Tensor[3, H, W] float in [0, 1].
            targets: per image dict(boxes[M, 4], labels[M], masks[M, H, W]) or None;
                not modified (resized copies are returned).
        Returns:
            (ImageList(tensors Tensor[N, 3, Hp, Wp], image_sizes [(Hr, Wr)]), targets).
        """
        resized, new_targets = [], None if targets is None else []
        for i, image in enumerate(images):
            target = None if targets is None else dict(targets[i])
            image, target = self.resize(self.normalize(image), target)
            resized.append(image)
            if new_targets is not None:
                new_targets.append(target)
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in resized]
        return ImageList(self.batch_images(resized), sizes), new_targets

    def normalize(self, image: Tensor) -> Tensor:
        """RGB [0, 1] -> the weights' channel order and pixel scale, normalised."""
        if self.input_format == "BGR":
            image = image.flip(0)
        if self.pixel_scale != 1.0:
            image = image * self.pixel_scale
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def _choose_min_size(self) -> int:
        if not self.training:
            return self.min_size
        # torchvision's torch_choice: drawn from torch's RNG so seeds reproduce it.
        index = int(torch.empty(1).uniform_(0.0, float(len(self.train_min_size))).item())
        return self.train_min_size[index]

    def resize(self, image: Tensor, target: Optional[dict] = None):
        """Image Tensor[3, H, W] -> Tensor[3, Hr, Wr]; target boxes and masks alike.

        No side drops below 1 pixel: an image more than max_size / min_size times wider
        than high would otherwise vanish (F.interpolate floors each side)."""
        h, w = image.shape[-2:]
        scale = min(self._choose_min_size() / min(h, w), self.max_size / max(h, w))
        new_h, new_w = math.floor(h * scale), math.floor(w * scale)
        if new_h >= 1 and new_w >= 1:    # torchvision's arithmetic
            size = dict(scale_factor=scale, recompute_scale_factor=True)
        else:
            size = dict(size=(max(new_h, 1), max(new_w, 1)))
        image = F.interpolate(image[None], mode="bilinear", align_corners=False, **size)[0]
        if target is None:
            return image, None
        valid = target.get("mask_valid")
        if "masks" in target and valid is not None and not bool(valid.any()):
            # box-only instances: their masks are all zero and no target, nothing to resample
            target["masks"] = torch.zeros((len(target["masks"]), *image.shape[-2:]),
                                          dtype=torch.uint8, device=image.device)
        elif "masks" in target:
            masks = target["masks"][:, None].float()
            target["masks"] = F.interpolate(masks, **size)[:, 0].byte()
        target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        return image, target

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad to a common size, each side rounded up to size_divisible."""
        stride = float(self.size_divisible)
        max_h = int(math.ceil(max(img.shape[-2] for img in images) / stride) * stride)
        max_w = int(math.ceil(max(img.shape[-1] for img in images) / stride) * stride)
        batch = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
        for img, slot in zip(images, batch):
            slot[:, :img.shape[-2], :img.shape[-1]].copy_(img)
        return batch

    def postprocess(self, detections: list[dict], image_sizes, original_sizes) -> list[dict]:
        """Boxes back to original pixels; masks [D, 1, S, S] pasted to [D, 1, H, W]."""
        out = []
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det = dict(det)
            det["boxes"] = resize_boxes(det["boxes"], size, original)
            if "masks" in det:
                det["masks"] = PASTE_MASKS[self.mask_paste](det["masks"], det["boxes"],
                                                            original, self.mask_paste_padding)
            out.append(det)
        return out


# ---------------------------------------------------------------------------- builder

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
    b = cfg.backbone
    backbone = build_resnet_fpn_backbone(
        **_trunk_arch(b), norm=b.norm, trainable_layers=b.trainable_layers,
        out_channels=b.fpn_channels, pretrained=pretrained_backbone, fuse_bn=b.fuse_bn,
        stride_in_1x1=b.stride_in_1x1, fpn_norm=b.fpn_norm)
    for module in backbone.body.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = b.norm_eps
    return backbone


def _set_frozen_bn_op(model: nn.Module, op: str) -> None:
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.op = op


def build_rpn(cfg: EasyDict) -> RPN:
    a, r = cfg.anchors, cfg.rpn
    anchors = AnchorGenerator(sizes=a.anchor_sizes, aspect_ratios=a.aspect_ratios,
                              rule=a.anchor_rule)
    head = RPNHead(cfg.backbone.fpn_channels, anchors.num_anchors_per_location()[0],
                   num_convs=r.rpn_head_convs)
    return RPN(
        anchor_generator=anchors, head=head,
        fg_iou_thresh=r.rpn_fg_iou_thresh, bg_iou_thresh=r.rpn_bg_iou_thresh,
        batch_size_per_image=r.rpn_batch_size_per_image,
        positive_fraction=r.rpn_positive_fraction,
        pre_nms_top_n_train=r.rpn_pre_nms_top_n_train,
        pre_nms_top_n_test=r.rpn_pre_nms_top_n_test,
        post_nms_top_n_train=r.rpn_post_nms_top_n_train,
        post_nms_top_n_test=r.rpn_post_nms_top_n_test,
        nms_thresh=r.rpn_nms_thresh, score_thresh=r.rpn_score_thresh, min_size=r.rpn_min_size,
        box_filter=r.rpn_box_filter)


def build_roi_heads(cfg: EasyDict) -> RoIHeads:
    m, h, bh, mh = cfg.model, cfg.roi_heads, cfg.box_head, cfg.mask_head
    channels = cfg.backbone.fpn_channels
    pool_kw = dict(aligned=h.roi_aligned, canonical_scale=h.roi_canonical_scale,
                   canonical_level=h.roi_canonical_level, level_rule=h.roi_level_rule)
    box_head = build_box_head(bh.box_head, channels, bh.box_pool_size, bh.representation_size,
                              bh.box_conv_dim, bh.box_norm)
    mask_parts = ()
    if m.mask_on:
        mask_parts = (
            MultiScaleRoIAlign(mh.mask_pool_size, mh.mask_sampling_ratio, **pool_kw),
            MaskHead(channels, tuple(mh.mask_layers), mh.mask_dilation, mh.mask_norm),
            MaskPredictor(mh.mask_layers[-1], mh.mask_dim_reduced, m.num_classes + 1))
    return RoIHeads(
        MultiScaleRoIAlign(bh.box_pool_size, bh.box_sampling_ratio, **pool_kw), box_head,
        BoxPredictor(bh.representation_size, m.num_classes + 1), *mask_parts,
        fg_iou_thresh=h.box_fg_iou_thresh, bg_iou_thresh=h.box_bg_iou_thresh,
        batch_size_per_image=h.box_batch_size_per_image,
        positive_fraction=h.box_positive_fraction, bbox_reg_weights=h.bbox_reg_weights,
        box_loss=bh.box_loss, box_smooth_l1_beta=bh.box_smooth_l1_beta,
        box_score_thresh=h.box_score_thresh, box_nms_thresh=h.box_nms_thresh,
        box_detections_per_img=h.box_detections_per_img, box_min_size=h.box_min_size,
        box_drop_empty=h.box_drop_empty)


def build_transform(cfg: EasyDict) -> ImageTransform:
    t = cfg.transform
    return ImageTransform(
        min_size=t.min_size, max_size=t.max_size, image_mean=t.image_mean,
        image_std=t.image_std, size_divisible=t.size_divisible,
        train_min_size=t.train_min_size, mask_paste_padding=cfg.mask_head.mask_paste_padding,
        input_format=t.input_format, pixel_scale=t.pixel_scale,
        mask_paste=cfg.mask_head.mask_paste)


def build_model(cfg: EasyDict, pretrained_backbone: Optional[str] = None) -> "MaskRCNN":
    """The one builder: reads the model sections of `cfg` and assembles a MaskRCNN.

    Args:
        cfg: a config from load_config (optionally with apply_overrides).
        pretrained_backbone: None, "imagenet" or a path of ImageNet ResNet weights.
    """
    b = cfg.backbone
    model = MaskRCNN.from_parts(build_backbone(cfg, pretrained_backbone), build_rpn(cfg),
                                build_roi_heads(cfg), build_transform(cfg),
                                cfg.model.num_classes, cfg)
    _set_frozen_bn_op(model, b.frozen_bn_op)
    # One switch for every fused inference path (trunk, FPN, box and mask heads), and one
    # for the Winograd convs (trunk, FPN, RPN head, box and mask heads), which need the
    # first.
    for module in model.modules():
        if hasattr(module, "fuse_inference"):
            module.fuse_inference = b.fuse_bn
        if hasattr(module, "winograd"):
            module.winograd = b.fuse_bn and b.winograd
    return model


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


def _torchvision_hyperparameters(tv: nn.Module) -> dict:
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


# ------------------------------------------------------------------------------ model

class MaskRCNN(nn.Module):
    """Mask R-CNN: transform -> backbone (ResNet-FPN) -> RPN -> RoI heads -> postprocess.

    Args:
        num_classes: K object classes (background excluded); None takes the config's
            model.num_classes (80 in the shipped config.ini), or with a zoo model its
            checkpoint's. Another K than the checkpoint's loads everything but the
            class-specific predictors, which are re-initialised (one-line notice).
        pretrained: None (the config's model.pretrained, "none" by default); "coco"
            (the zoo's model for the configured backbone: tools.zoo.COCO_FOR_BACKBONE);
            a zoo name ("detectron2/mask_rcnn_R_101_FPN_3x", see tools.zoo.ZOO); a
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
        transform, backbone, rpn, roi_heads; cfg (the resolved EasyDict); categories
        (label -> (name, COCO id), or None when unknown).
    """

    def __init__(self, num_classes: Optional[int] = None, pretrained: Optional[str] = None,
                 config: Union[str, os.PathLike, dict, None] = None, **overrides):
        super().__init__()
        cfg = _resolve_config(config)
        if pretrained is None:
            pretrained = cfg.model.pretrained
        if pretrained is not None and str(pretrained).lower() == "none":
            pretrained = None
        if num_classes is not None:
            overrides["model.num_classes"] = num_classes
        entry, weights = None, None
        if pretrained is not None and pretrained != "imagenet":
            entry = zoo.resolve_name(str(pretrained), _configured_backbone(cfg, overrides))
        if entry is not None:
            cfg = _overlay_config(load_config(entry.preset_path), cfg, overrides,
                                  f"the zoo model {entry.name}")
        elif pretrained is not None and pretrained != "imagenet":
            weights = pretrained_weights.read_model_weights(pretrained)
            if weights.config is not None:       # ours: the architecture it was trained with
                stored = _resolve_config(_known_keys(weights.config))
                cfg = _overlay_config(stored, cfg, overrides, f"the checkpoint {pretrained}")
        elif pretrained is None:
            cfg = _trainable_without_weights(cfg, _explicit_keys(config, overrides))
        cfg = apply_overrides(cfg, overrides)
        cfg.model.pretrained = pretrained
        built = build_model(cfg, pretrained_backbone="imagenet" if pretrained == "imagenet"
                            else None)
        self._set_parts(built.backbone, built.rpn, built.roi_heads, built.transform,
                        built.num_classes, cfg)
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
    def from_parts(cls, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module,
                   transform: ImageTransform, num_classes: int,
                   cfg: Optional[EasyDict] = None) -> "MaskRCNN":
        """Assemble from already-built parts (what build_model does)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._set_parts(backbone, rpn, roi_heads, transform, num_classes, cfg)
        return model

    def _set_parts(self, backbone, rpn, roi_heads, transform, num_classes, cfg) -> None:
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes
        self.cfg = cfg
        self.categories = None

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None):
        """
        Args:
            images: per image Tensor[3, H, W] float in [0, 1] (sizes may differ).
            targets: per image dict(boxes Tensor[M, 4] float (x1, y1, x2, y2) pixels,
                labels Tensor[M] int64 in 1..K, masks Tensor[M, H, W] uint8/bool (with
                mask_on only), optional mask_valid Tensor[M] bool); required in training
                mode. mask_valid False marks an instance without a mask (box-only
                annotations): it counts for the RPN and box losses, and the mask loss uses
                only the positive RoIs matched to instances with mask_valid True (the
                masks of the others are ignored: all zero will do). Without mask_valid
                every mask is valid.
        Returns:
            training mode: dict(loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask).
            eval mode: per image dict(boxes Tensor[D, 4] original pixels, labels Tensor[D]
                int64, scores Tensor[D], masks Tensor[D, 1, H, W] float probabilities).
            eval mode with targets: (detections, losses), for a validation loss without
                switching to training mode (the losses use the eval-mode proposals).
        Raises:
            ValueError naming the image index and the problem for malformed inputs.
        """
        if self.training and targets is None:
            raise ValueError("targets are required in training mode (or call model.eval())")
        if isinstance(images, (list, tuple)) and not images and not self.training:
            return [] if targets is None else ([], {})
        self._validate(images, targets)
        # float64 / float16 / bfloat16 images run on the weights' dtype.
        dtype = next(p for p in self.parameters() if p.is_floating_point()).dtype
        images = [img.to(dtype) for img in images]
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        gt_boxes = None if targets is None else [t["boxes"] for t in targets]
        proposals, rpn_losses = self.rpn(image_list, features, gt_boxes)
        detections, head_losses = self.roi_heads(features[:4], proposals,
                                                 image_list.image_sizes, targets)
        losses = {**rpn_losses, **head_losses}
        if self.training:
            return losses
        detections = self.transform.postprocess(detections, image_list.image_sizes,
                                                original_sizes)
        return detections if targets is None else (detections, losses)

    @classmethod
    def from_torchvision(cls, tv_model: nn.Module, fuse_bn: bool = True) -> "MaskRCNN":
        """Ours, from a torchvision.models.detection.MaskRCNN with a ResNet-FPN backbone
        (any depth; v1, or v2 as maskrcnn_resnet50_fpn_v2 builds it): the same weights
        and hyper-parameters, so eval outputs are equal.

        num_classes is torchvision's minus one (background). The depth comes from the
        body's block counts; trainable stages from requires_grad; the norms from the
        modules (a BatchNorm2d trunk becomes norm "bn", else "frozen_bn").

        fuse_bn: True (default) runs the fast path (config key backbone.fuse_bn: BatchNorm
            folded into the convolutions, Winograd convs; ~1.9x faster CPU inference):
            equal up to float rounding, which random networks whose features grow to
            1e2..1e5 amplify, but trained weights do not. False computes exactly as
            torchvision does, so the outputs match to the last bit whatever the weights.
        """
        overrides = {**_torchvision_hyperparameters(tv_model), "fuse_bn": bool(fuse_bn)}
        model = cls(config=DEFAULT_CONFIG, **overrides)
        load_torchvision_backbone_state(model.backbone, tv_model.backbone)
        load_torchvision_rpn_state(model.rpn, tv_model.rpn)
        load_torchvision_roi_heads_state(model.roi_heads, tv_model.roi_heads)
        return model

    # ------------------------------------------------------------------ validation

    # Pixel values may overshoot [0, 1] by this much (bicubic resampling, rounding): the
    # check is there to catch 0..255 and mean/std-normalised images, not to clamp.
    _PIXEL_SLACK = 0.1

    def _validate(self, images, targets) -> None:
        """Raise ValueError naming the image (or target) index, the problem and the fix for
        an input the model cannot use. Images: a list (or tuple) of at least one
        Tensor[3, H, W] with H, W >= 1, of any floating dtype (ImageTransform.resize
        converts them to the weights' dtype), on the model's device, finite, in [0, 1]
        (up to _PIXEL_SLACK). Costs one aminmax pass per image and one host sync."""
        if isinstance(images, Tensor):
            fix = ("model([image])" if images.dim() == 3
                   else "list(images), one Tensor[3, H, W] per image")
            raise ValueError(f"images must be a list of Tensor[3, H, W], got a Tensor"
                             f"{list(images.shape)}: pass {fix}")
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of Tensor[3, H, W], got "
                             f"{type(images).__name__}")
        if len(images) == 0:
            raise ValueError("images is empty: training needs at least one Tensor[3, H, W]")
        weight = next(p for p in self.parameters() if p.is_floating_point())
        for i, image in enumerate(images):
            self._validate_image(i, image, weight.device)
        self._validate_pixels(images)
        if targets is None:
            return
        if not isinstance(targets, (list, tuple)):
            raise ValueError(f"targets must be a list of dicts, one per image, got "
                             f"{type(targets).__name__}")
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets: pass one "
                             f"target dict per image (or no targets for detections only)")
        for i, (image, target) in enumerate(zip(images, targets)):
            self._validate_target(i, image, target)

    @staticmethod
    def _validate_image(i: int, image, device: torch.device) -> None:
        """Image i's type, layout, shape, dtype and device (no pass over the pixels)."""
        if not isinstance(image, Tensor):
            raise ValueError(f"image {i}: expected a Tensor[3, H, W] of RGB floats in [0, 1], "
                             f"got {type(image).__name__} (a PIL image or an HWC array: "
                             f"torchvision.transforms.functional.to_tensor converts it)")
        if image.layout != torch.strided:
            raise ValueError(f"image {i}: a {image.layout} tensor, expected a dense one: "
                             f"pass image.to_dense()")
        shape = tuple(image.shape)
        if image.dim() != 3:
            hint = {2: ": one channel? pass image.expand(3, -1, -1)",
                    4: ": a batch? pass list(batch), one Tensor[3, H, W] per image"}
            raise ValueError(f"image {i}: expected a 3-D Tensor[3, H, W], got shape {shape}"
                             f"{hint.get(image.dim(), '')}")
        if shape[0] != 3:
            hint = ("channels last? pass image.permute(2, 0, 1)" if shape[2] == 3
                    else "grayscale? pass image.expand(3, -1, -1)" if shape[0] == 1
                    else "RGBA? drop the alpha channel with image[:3]" if shape[0] == 4
                    else "pass RGB images")
            raise ValueError(f"image {i}: expected 3 channels (RGB), got shape {shape}: "
                             f"{hint}")
        if shape[1] == 0 or shape[2] == 0:
            raise ValueError(f"image {i}: empty, shape {shape}: height and width must be at "
                             f"least 1 pixel")
        if not image.is_floating_point():
            hint = ("pass image.float() / 255" if image.dtype == torch.uint8
                    else "pass real-valued images" if image.is_complex()
                    else "pass image.float() (divided by 255 if the values are 0..255)")
            raise ValueError(f"image {i}: expected RGB floats in [0, 1], got {image.dtype}: "
                             f"{hint}")
        if image.device != device:
            raise ValueError(f"image {i}: on {image.device} but the model is on {device}: "
                             f"move it with image.to('{device}')")

    def _validate_pixels(self, images) -> None:
        """Finite values in [0, 1] (up to _PIXEL_SLACK): one aminmax pass per image (it
        propagates NaN) and a single host sync for the batch."""
        slack = self._PIXEL_SLACK
        ranges = torch.stack([torch.stack(torch.aminmax(image)).float() for image in images])
        for i, (lo, hi) in enumerate(ranges.tolist()):
            if not (lo >= -slack and hi <= 1 + slack):        # also true for NaN
                self._pixel_error(i, images[i])

    def _pixel_error(self, i: int, image: Tensor) -> None:
        """The ValueError for image i's values (the slow path: counts on the original)."""
        nan, inf = int(image.isnan().sum()), int(image.isinf().sum())
        if nan or inf:
            found = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite"))
                                 if n)
            raise ValueError(f"image {i}: {found} values out of {image.numel()}, expected RGB "
                             f"floats in [0, 1]: check how the image was loaded or "
                             f"preprocessed")
        lo, hi = (float(v) for v in torch.aminmax(image))
        hint = ("mean/std-normalised? pass the image before normalisation, the model "
                "normalises by itself" if lo < -self._PIXEL_SLACK
                else "0..255 pixels? divide by 255")
        raise ValueError(f"image {i}: values span [{lo:.4g}, {hi:.4g}], expected RGB floats "
                         f"in [0, 1]: {hint}")

    def _validate_target(self, i: int, image: Tensor, target: dict) -> None:
        """Target i's types, devices, shapes and values against image i (validated).
        masks are required with mask_on only; the optional mask_valid (a bool Tensor[M],
        False: instance without a mask, excluded from the mask loss) is checked when given,
        and a target without it has all its masks valid."""
        needed = ("boxes", "labels", "masks") if self.roi_heads.mask_on else ("boxes", "labels")
        if not isinstance(target, dict):
            raise ValueError(f"target {i}: expected a dict with {list(needed)}, got "
                             f"{type(target).__name__}")
        missing = [k for k in needed if k not in target]
        if missing:
            raise ValueError(f"target {i}: missing {missing}")
        mask_valid = target.get("mask_valid")
        for key in needed + (("mask_valid",) if mask_valid is not None else ()):
            if not isinstance(target[key], Tensor):
                raise ValueError(f"target {i}: {key} must be a Tensor, got "
                                 f"{type(target[key]).__name__}")
            if target[key].device != image.device:
                raise ValueError(f"target {i}: {key} on {target[key].device} but image {i} is "
                                 f"on {image.device}: move it with .to('{image.device}')")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"target {i}: boxes must be a float Tensor[M, 4], got "
                             f"{tuple(boxes.shape)} {boxes.dtype} (no objects: "
                             f"torch.zeros(0, 4))")
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"target {i}: labels must be an int64 Tensor[M], got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        masks = target["masks"] if "masks" in needed else None
        if masks is not None and (masks.dim() != 3
                                  or tuple(masks.shape[-2:]) != tuple(image.shape[-2:])):
            raise ValueError(f"target {i}: masks must be Tensor[M, {image.shape[-2]}, "
                             f"{image.shape[-1]}] (the image size), got "
                             f"{tuple(masks.shape)}")
        if mask_valid is not None and (mask_valid.dim() != 1
                                       or mask_valid.dtype != torch.bool):
            raise ValueError(f"target {i}: mask_valid must be a bool Tensor[M] (False: the "
                             f"instance has no mask), got {tuple(mask_valid.shape)} "
                             f"{mask_valid.dtype}")
        counts = {"boxes": len(boxes), "labels": len(labels)}
        if masks is not None:
            counts["masks"] = len(masks)
        if mask_valid is not None:
            counts["mask_valid"] = len(mask_valid)
        if len(set(counts.values())) != 1:
            raise ValueError(f"target {i}: count mismatch {counts}")
        finite = torch.isfinite(boxes).all(1)
        empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        bad = torch.where(~finite | empty)[0]
        if len(bad):
            j = int(bad[0])
            problem = ("is not finite" if not finite[j]
                       else "has x2 <= x1 or y2 <= y1 (boxes are x1, y1, x2, y2)")
            raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} {problem}")
        if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(f"target {i}: labels must be in 1..{self.num_classes} (0 is "
                             f"background), got {labels.tolist()}")
        if masks is not None and masks.is_complex():
            raise ValueError(f"target {i}: masks must be 0/1 (uint8 or bool), got "
                             f"{masks.dtype}")
        if masks is not None and masks.numel() and masks.dtype != torch.bool:
            lo, hi = (float(v) for v in torch.aminmax(masks))
            if not (lo >= 0 and hi <= 1):
                raise ValueError(f"target {i}: masks must be 0/1 (uint8 or bool), got "
                                 f"values in [{lo:g}, {hi:g}]: pass masks > 0")
