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

Reading a safetensors file never runs code (it is a JSON header and raw tensor bytes);
convert/weights.py reads them and tells the format from the content.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

from torch import Tensor

from convert.weights import is_safetensors, read_weights
from engine.checkpoint import plain

PathLike = Union[str, os.PathLike]


def save_weights(state: dict[str, Tensor], path: PathLike, config: Optional[dict] = None,
                 categories: Optional[dict] = None,
                 iteration: Optional[int] = None) -> Path:
    """Write a model-only safetensors file atomically (a temp file in the same folder,
    fsync, os.replace): a crash never leaves a partial file under `path`.

    Args:
        state: the model's state dict (moved to the CPU, made contiguous; tensors that
            share storage are copied, as safetensors requires).
        config: the {section: {key: value}} config (made plain by engine.checkpoint.plain).
        categories: {label: (name, COCO id)}.
    Raises:
        OSError naming the file when it cannot be written.
    """
    from safetensors.torch import save_file
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
        unsafe, truncated or no checkpoint at all (convert.weights.read_weights: never
        runs code from the file); OSError naming `out`.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if is_safetensors(checkpoint):
        raise ValueError(f"{checkpoint} is already a model-only weights file (safetensors); "
                         f"export reads a training checkpoint (model_*.pth)")
    found = read_weights(checkpoint)
    if found.format != "checkpoint" or not isinstance(found.config, dict):
        raise ValueError(f"{checkpoint}: not a training checkpoint of this library "
                         f"(expected a 'model' state dict of tensors and a 'config'; "
                         f"got {sorted(found.raw)[:8]})")
    try:
        return save_weights(found.state, out, found.config, found.categories,
                            found.raw.get("iteration"))
    except OSError as err:
        raise OSError(f"cannot write {out}: {err.strerror or err}") from err
