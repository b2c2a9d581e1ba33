"""The one reader of weight files: a path in; its parameters, stored config, categories
and format out. Reading never runs code from the file.

    read_weights(path) -> WeightsFile(state, format, config, categories, raw)
    read_file(path)    -> the file's whole dict (a training checkpoint's optimizer too)

Formats, told from the content (never from the file name):
    checkpoint    our training checkpoint {"model": state, "config": ..., "optimizer": ...}
                  (engine/checkpoint.py)
    safetensors   our model-only weights file (engine/export.py): the state, and the
                  config, categories and iteration as JSON metadata
    state_dict    a plain state dict in our names
    torchvision   a MaskRCNN state dict (v1 or v2): keys `backbone.fpn.inner_blocks.*`, ...
    detectron2    a model-zoo .pkl ({"model": {name: array}}) or a training .pth
                  ({"model": {name: tensor}}): keys `backbone.bottom_up.*`, ...
A safetensors file is an 8-byte little-endian header length, then a JSON header starting
with `{`; torch files (zip or legacy) and raw pickles go through tools.download's safe
readers.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from torch import Tensor
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from convert.detectron2 import is_detectron2_state
from tools.download import SOURCES, read_torch_or_pickle

PathLike = Union[str, os.PathLike]
FORMATS = ("checkpoint", "safetensors", "state_dict", "torchvision", "detectron2")
# safetensors refuses headers above 100 MB; a larger length means another format.
_MAX_HEADER = 100_000_000


@dataclass
class WeightsFile:
    """What a weights file holds.

    state: {parameter name: Tensor} in the file's own names (convert.pretrained puts
    torchvision / detectron2 names into ours); format: one of FORMATS; config: the
    {section: {key: value}} stored with our checkpoints and weights files, else None;
    categories: label -> (name, COCO id) when known; raw: the whole dict the file holds.
    """
    state: dict[str, Tensor]
    format: str
    config: Optional[dict]
    categories: Optional[dict[int, tuple[str, int]]]
    raw: dict

    @property
    def source(self) -> str:
        """Whose parameter names: "maskrcnn", "torchvision" or "detectron2"."""
        return self.format if self.format in SOURCES else "maskrcnn"


# ------------------------------------------------------------------------ categories

# torchvision's 91 names: index = COCO category id, "__background__" at 0, "N/A" in gaps.
_TV_NAMES: list[str] = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])

# The 80 COCO object categories as (coco_id, name), in COCO id order.
COCO_CATEGORIES: list[tuple[int, str]] = [
    (cid, name) for cid, name in enumerate(_TV_NAMES) if cid > 0 and name != "N/A"]


def categories_for(source: str) -> dict[int, tuple[str, int]]:
    """Model label -> (name, COCO category id) for a zoo source.

    torchvision models have 90 object classes whose label is the COCO id (1..90); the ten
    ids COCO does not use map to ("N/A", id). detectron2 models predict contiguous labels
    1..80 (our label = detectron2 class index + 1), the 80 categories in COCO id order.
    """
    if source == "torchvision":
        return {cid: (_TV_NAMES[cid], cid) for cid in range(1, len(_TV_NAMES))}
    if source == "detectron2":
        return {i + 1: (name, cid) for i, (cid, name) in enumerate(COCO_CATEGORIES)}
    raise ValueError(f"unknown zoo source {source!r}; expected one of {SOURCES}")


def stored_categories(raw: dict) -> Optional[dict[int, tuple[str, int]]]:
    """Categories saved with our files: a weights file's "categories", or a training
    checkpoint's class_names / cat_ids (label l <-> index l - 1)."""
    if raw.get("categories"):
        return {int(k): (str(v[0]), int(v[1])) for k, v in raw["categories"].items()}
    names, ids = raw.get("class_names"), raw.get("cat_ids")
    if names and ids and len(names) == len(ids):
        return {i + 1: (str(n), int(c)) for i, (n, c) in enumerate(zip(names, ids))}
    return None


# ------------------------------------------------------------------------ containers

def is_safetensors(path: PathLike) -> bool:
    """Whether the file's content is a safetensors file: a little-endian u64 header length
    n that fits the file, then a JSON header beginning with `{` (never the file name)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(size - 8, _MAX_HEADER) and head[8:9] == b"{"


def read_safetensors(path: PathLike) -> dict:
    """A weights file as a checkpoint-like dict: {"model": {name: Tensor}, "config": dict
    or absent, "categories": {label: [name, id]} or absent, "iteration": int or absent}.

    Raises:
        FileNotFoundError naming the file; ValueError naming the file when it is
        truncated, corrupt or its metadata is not the JSON this library writes.
    """
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:   # SafetensorError and friends: truncated or corrupt
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is truncated or not a valid safetensors file: {first}"
                         ) from err
    raw: dict[str, Any] = {"model": state}
    for key in ("config", "categories", "iteration"):
        if key in metadata:
            try:
                raw[key] = json.loads(metadata[key])
            except ValueError as err:
                raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err})"
                                 ) from err
    if "config" in raw and not isinstance(raw["config"], dict):
        raise ValueError(f"{path}: metadata 'config' is not a {{section: {{key: value}}}} "
                         f"object")
    return raw


def read_file(path: PathLike, shown: Optional[str] = None) -> dict:
    """The dict a weights file holds (safetensors, torch zip or legacy, raw pickle), its
    numeric numpy arrays as tensors; errors name `shown` (default: the path).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError (a ValueError): it pickles anything but arrays / tensors
            and plain containers: one line naming the file and the global; nothing of
            it was run.
        ValueError: truncated, corrupt or not a checkpoint (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        return read_safetensors(path)
    return read_torch_or_pickle(path, str(path) if shown is None else shown)


# ------------------------------------------------------------------------ the reader

def is_torchvision_state(state: dict) -> bool:
    return any(k.startswith(("backbone.fpn.inner_blocks.", "rpn.head.conv."))
               for k in state)


def detect_format(raw: dict, state: dict, safetensors: bool) -> str:
    """One of FORMATS: by the parameter names first, then by the container."""
    if is_detectron2_state(state):
        return "detectron2"
    if is_torchvision_state(state):
        return "torchvision"
    if safetensors:
        return "safetensors"
    return "state_dict" if state is raw else "checkpoint"


def read_weights(path: PathLike) -> WeightsFile:
    """Read a weights file of any supported format (see the module docstring).

    Raises:
        FileNotFoundError naming the file; ValueError (tools.download's
        UnsafeCheckpointError and friends) for files that are not safe, complete
        checkpoints, or hold no state dict of tensors.
    """
    raw = read_file(path)
    state = raw.get("model", raw)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a model checkpoint (expected a state dict of tensors, "
                         f"or a dict holding one under 'model')")
    fmt = detect_format(raw, state, is_safetensors(path))
    if fmt in SOURCES:
        return WeightsFile(state, fmt, None, categories_for(fmt), raw)
    config = raw.get("config") if state is not raw else None
    return WeightsFile(state, fmt, config, stored_categories(raw), raw)
