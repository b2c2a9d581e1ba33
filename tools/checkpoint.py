"""Training checkpoints: atomic writes, the last `keep_last` kept, safe loading.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with `torch.load(weights_only=True)` and can never execute code:

    model, optimizer, scheduler, scaler   state dicts
    iteration                             iterations done
    data                                  dict(epoch, batch_in_epoch): the data order position
    elapsed_s                             training seconds spent (the time budget's clock)
    rng                                   torch / numpy / python random / CUDA states
    cat_ids, class_names                  the class mapping (label l <-> cat_ids[l - 1])
    config                                the full config as a plain {section: {key: value}}

Files are `model_0001000.pth` in the output directory; `last_checkpoint` names the newest.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]
_NAME = re.compile(r"^model_(\d+)\.pth$")


def checkpoint_path(output_dir: PathLike, iteration: int) -> Path:
    return Path(output_dir) / f"model_{iteration:07d}.pth"


def atomic_save(obj: Any, path: PathLike) -> Path:
    """torch.save to a temp file in the same directory, then os.replace: a crash never
    leaves a half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def list_checkpoints(output_dir: PathLike) -> list[Path]:
    """model_*.pth files of output_dir, oldest (lowest iteration) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest checkpoint: the one `last_checkpoint` names, else the highest iteration."""
    pointer = Path(output_dir) / "last_checkpoint"
    if pointer.is_file():
        path = Path(output_dir) / pointer.read_text().strip()
        if path.is_file():
            return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict, output_dir: PathLike, iteration: int,
                    keep_last: int = 3) -> Path:
    """Write state atomically as model_<iteration>.pth, point last_checkpoint at it and
    delete all but the newest keep_last checkpoints (keep_last <= 0 keeps all)."""
    path = atomic_save(state, checkpoint_path(output_dir, iteration))
    _atomic_write_text(path.name + "\n", Path(output_dir) / "last_checkpoint")
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with torch.load(weights_only=True).

    Raises:
        FileNotFoundError if missing; ValueError naming the file when it holds anything
        but tensors and plain containers (a pickled object is refused, never run).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused to load: the file holds pickled Python objects "
                         f"that weights_only loading does not allow ({err}). Only load "
                         f"checkpoints written by this library or that you trust, after "
                         f"converting them to plain tensors and containers.") from None


# --------------------------------------------------------------------- plain values

def plain(value: Any) -> Any:
    """A config (EasyDict, tuples) as plain dicts / lists / scalars (weights_only safe)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def rng_state() -> dict:
    """Every random generator's state as tensors / lists / numbers."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"][0])
