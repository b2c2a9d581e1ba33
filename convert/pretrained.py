"""Pretrained weights for a whole model: read a checkpoint in any supported format,
convert it to our parameter names, and load it (class-specific predictors re-initialised
when the number of classes differs).

Formats, detected from the content (never from the file name):
    ours         a state dict, or a training checkpoint {"model": ..., "config": ...}, or
                 a model-only weights file (safetensors: the state, and the config and
                 categories as JSON metadata; engine/export.py)
    torchvision  a MaskRCNN state dict (v1 or v2): keys `backbone.fpn.inner_blocks.*`, ...
    detectron2   a model-zoo .pkl ({"model": {name: array}}) or a training .pth
                 ({"model": {name: tensor}}): keys `backbone.bottom_up.*`, ...
Files are read by convert.weights.read_weights, which never runs code from them.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import Tensor, nn

from convert.detectron2 import convert_detectron2_state, is_detectron2_state
from convert.torchvision import (convert_torchvision_backbone_state_dict,
                                 convert_torchvision_roi_heads_state_dict,
                                 convert_torchvision_rpn_state_dict)
from convert.weights import is_torchvision_state, read_weights  # noqa: F401 (re-exported)

PathLike = Union[str, os.PathLike]

# Parameters whose first dimension counts classes: with another num_classes they cannot
# load, and are re-initialised instead.
CLASS_SPECIFIC = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.",
                  "roi_heads.mask_predictor.mask_fcn_logits.")


@dataclass
class ModelWeights:
    """A checkpoint's parameters in our names, and what it says about itself.

    state: {our parameter name: Tensor}; source: "maskrcnn", "torchvision" or
    "detectron2"; config: the {section: {key: value}} stored with our training
    checkpoints and exported weights files (else None); categories: label -> (name,
    COCO id), when known.
    """
    state: dict[str, Tensor]
    source: str
    config: Optional[dict] = None
    categories: Optional[dict] = None


def convert_torchvision_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A whole torchvision MaskRCNN state dict (v1 or v2) in our names."""
    converters = {"backbone.": convert_torchvision_backbone_state_dict,
                  "rpn.": convert_torchvision_rpn_state_dict,
                  "roi_heads.": convert_torchvision_roi_heads_state_dict}
    out = {}
    for prefix, convert in converters.items():
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        out.update({prefix + k: v for k, v in convert(part).items()})
    return out


def read_model_weights(path: PathLike) -> ModelWeights:
    """Read a checkpoint file of any supported format (convert.weights.read_weights) and
    put its parameters into our names.

    Raises:
        FileNotFoundError naming the file; ValueError (tools.download's
        UnsafeCheckpointError and friends) for files that are not safe, complete
        checkpoints.
    """
    found = read_weights(path)
    converters = {"detectron2": convert_detectron2_state,
                  "torchvision": convert_torchvision_state}
    state = converters[found.format](found.state) if found.format in converters \
        else found.state
    return ModelWeights(state, found.source, found.config, found.categories)


def class_count(state: dict[str, Tensor]) -> Optional[int]:
    """K (background excluded) of a state dict in our names, None without a box predictor."""
    weight = state.get("roi_heads.box_predictor.cls_score.weight")
    return None if weight is None else int(weight.shape[0]) - 1


def fit_state(ours: dict[str, Tensor], weights: ModelWeights, origin: str,
              notice: Callable[[str], None]) -> tuple[dict[str, Tensor], bool]:
    """The part of `weights` to load into a model whose state dict is `ours`: all of it,
    or, when the number of classes differs, all but the class-specific predictors (which
    keep their fresh initialisation; `notice` gets one line).

    Returns:
        (state to load, whether the class-specific predictors are in it).
    Raises:
        ValueError naming `origin`, the parameter and both shapes for a mismatch, or the
        missing / unexpected parameter names (a checkpoint for another architecture).
    """
    # A step counter may come back from a pickle of arrays as shape (1,) instead of ().
    state = {k: v.reshape(()) if k.endswith("num_batches_tracked") and v.numel() == 1 else v
             for k, v in weights.state.items()}
    theirs_k, ours_k = class_count(state), class_count(ours)
    same_classes = theirs_k is None or theirs_k == ours_k
    if not same_classes:
        skipped = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith(CLASS_SPECIFIC)})
        state = {k: v for k, v in state.items() if not k.startswith(CLASS_SPECIFIC)}
        notice(f"{origin}: num_classes {ours_k} differs from the checkpoint's {theirs_k}: "
               f"skipped its class-specific layers {', '.join(skipped)} (their shapes "
               f"count classes; re-initialised for {ours_k} classes), loaded the other "
               f"{len(state)} tensors")
    hint = "use the config the checkpoint was made with (a zoo preset: configs/zoo/...)"
    for key, value in state.items():
        if key in ours and tuple(ours[key].shape) != tuple(value.shape):
            raise ValueError(f"{origin}: parameter {key} has shape {tuple(value.shape)} in "
                             f"the checkpoint but {tuple(ours[key].shape)} in the model; "
                             f"{hint}")
    # Frozen BatchNorm layers carry no step counter; BatchNorm ones not loaded keep theirs.
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")
               and (same_classes or not k.startswith(CLASS_SPECIFIC))]
    unexpected = [k for k in state if k not in ours and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{origin} does not fit this model's architecture: missing "
                         f"{_first(missing)}, unexpected {_first(unexpected)}; {hint}")
    return {k: v for k, v in state.items() if k in ours}, same_classes


def _first(keys: list[str], n: int = 5) -> str:
    return str(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _print_notice(message: str) -> None:
    print(message, file=sys.stderr)


def load_model_weights(model: nn.Module, weights: ModelWeights, origin: str,
                       notice: Callable[[str], None] = _print_notice) -> bool:
    """Load `weights` into `model` as fit_state allows; returns whether the
    class-specific predictors were loaded too."""
    state, same_classes = fit_state(model.state_dict(), weights, origin, notice)
    model.load_state_dict(state, strict=False)
    return same_classes


def content_check(model: nn.Module) -> Callable[[dict], None]:
    """For convert.zoo.fetch: a downloaded detectron2 file must be a dict of arrays whose
    names and shapes fit `model` (the preset's architecture) after conversion."""
    shapes = model.state_dict()

    def check(raw: dict) -> None:
        state = raw.get("model", raw) if isinstance(raw, dict) else raw
        if not isinstance(state, dict) or not is_detectron2_state(state):
            raise ValueError("not a detectron2 model checkpoint (no backbone.bottom_up.* "
                             "arrays under 'model')")
        fit_state(shapes, ModelWeights(convert_detectron2_state(state), "detectron2"),
                  "the file", notice=lambda message: None)
    return check
