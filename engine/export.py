"""Model-only weights files (safetensors): what a trained model needs, nothing to resume.

    export_weights("outputs/model_0001000.pth", "model.safetensors")   # maskrcnn export-weights
    MaskRCNN(pretrained="model.safetensors")       # or MaskRCNN.from_checkpoint(...)

A training checkpoint also holds the optimizer, scheduler, scaler and RNG states (about
three times the model's size with SGD momentum); the exported file holds the model's
tensors and, as JSON strings in the safetensors metadata:

    config       the full config {section: {key: value}}: the architecture to rebuild
    categories   {label: [name, COCO category id]} (when the checkpoint names its classes)
    iteration    the training iteration it was taken at (when known)
    format       "pt" (the safetensors convention for PyTorch tensors)

Reading a safetensors file never runs code (it is a JSON header and raw tensor bytes).
convert.pretrained.read_model_weights tells the format from the content: an 8-byte
little-endian header length, then a JSON header starting with `{`.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from torch import Tensor

PathLike = Union[str, os.PathLike]
# safetensors refuses headers above 100 MB; a larger length means another format.
_MAX_HEADER = 100_000_000


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


def _categories(raw: dict) -> Optional[dict[str, list]]:
    """{label: [name, COCO id]} (JSON keys are strings) from a training checkpoint's
    class_names / cat_ids (label l <-> index l - 1), or its "categories"."""
    if raw.get("categories"):
        return {str(int(k)): [str(v[0]), int(v[1])] for k, v in raw["categories"].items()}
    names, ids = raw.get("class_names"), raw.get("cat_ids")
    if names and ids and len(names) == len(ids):
        return {str(i + 1): [str(n), int(c)] for i, (n, c) in enumerate(zip(names, ids))}
    return None


def save_weights(state: dict[str, Tensor], path: PathLike, config: Optional[dict] = None,
                 categories: Optional[dict] = None,
                 iteration: Optional[int] = None) -> Path:
    """Write a model-only safetensors file atomically (a temp file in the same folder,
    fsync, os.replace): a crash never leaves a partial file under `path`.

    Args:
        state: the model's state dict (moved to the CPU, made contiguous; tensors that
            share storage are copied, as safetensors requires).
        config: the plain {section: {key: value}} config (engine.checkpoint.plain(cfg)).
        categories: {label: (name, COCO id)}.
    Raises:
        OSError naming the file when it cannot be written.
    """
    from safetensors.torch import save_file
    from engine.checkpoint import plain
    path = Path(path)
    tensors, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        if value.numel():
            seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    metadata = {"format": "pt"}
    if config is not None:
        metadata["config"] = json.dumps(plain(config))
    if categories:
        metadata["categories"] = json.dumps(
            {str(int(k)): [str(v[0]), int(v[1])] for k, v in categories.items()})
    if iteration is not None:
        metadata["iteration"] = json.dumps(int(iteration))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_weights(checkpoint: PathLike, out: PathLike) -> Path:
    """The model-only weights file of a training checkpoint (engine/train.py's
    model_*.pth): its model state, config, categories and iteration; no optimizer,
    scheduler or RNG state. Returns `out`.

    Raises:
        FileNotFoundError naming the checkpoint; ValueError naming it when it is not a
        training checkpoint of this library (no 'model' state dict or no 'config'), or is
        unsafe, truncated or no checkpoint at all (tools.zoo.read_checkpoint: never runs
        code from the file); OSError naming `out`.
    """
    from tools.zoo import read_checkpoint
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if is_safetensors(checkpoint):
        raise ValueError(f"{checkpoint} is already a model-only weights file (safetensors); "
                         f"export reads a training checkpoint (model_*.pth)")
    raw = read_checkpoint(checkpoint)
    state = raw.get("model") if isinstance(raw, dict) else None
    if (not isinstance(state, dict) or not isinstance(raw.get("config"), dict)
            or not all(isinstance(v, Tensor) for v in state.values())):
        got = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{checkpoint}: not a training checkpoint of this library "
                         f"(expected a 'model' state dict of tensors and a 'config'; "
                         f"got {got})")
    categories = _categories(raw)
    try:
        return save_weights(state, out, raw["config"],
                            categories and {int(k): v for k, v in categories.items()},
                            raw.get("iteration"))
    except OSError as err:
        raise OSError(f"cannot write {out}: {err.strerror or err}") from err
