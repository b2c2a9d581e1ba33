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
    early_stop                            only in the last checkpoint of a run that [solver]
                                          patience ended: dict(iteration, metric,
                                          evaluations, best_ap, best_iteration, patience,
                                          patience_delta); resuming trains no further

Files are `model_0001000.pth` in the output directory; `last_checkpoint` names the newest.
A save writes `.model_0001000.pth.<random>.tmp` and renames it, so a crash (even SIGKILL)
never leaves a half-written file under a checkpoint name; the next save deletes such
leftover temp files. Resuming takes the newest checkpoint that loads: one cut short by a
full disk or an interrupted copy is skipped with a warning naming it.
"""
from __future__ import annotations

import os
import random
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from convert.weights import read_file
from tools.download import UnsafeCheckpointError

PathLike = Union[str, os.PathLike]
_NAME = re.compile(r"^model_(\d+)\.pth$")
# mkstemp names of atomic_save / _atomic_write_text: a killed save leaves one behind
_TEMP = re.compile(r"^\.(model_\d+\.pth|last_checkpoint)\..+\.tmp$")
# Test hook (tests/engine/test_faults.py): when this variable names a checkpoint file,
# atomic_save SIGKILLs its own process after writing that file's temp file and before
# renaming it, the worst moment for a crash. Inert unless set.
KILL_SAVING_ENV = "MASKRCNN_TEST_KILL_SAVING"


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
        if os.environ.get(KILL_SAVING_ENV) == path.name:
            os.kill(os.getpid(), signal.SIGKILL)
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


def _newest_first(output_dir: PathLike) -> list[Path]:
    """Checkpoints to resume from, best first: the one `last_checkpoint` names, then the
    others by iteration, highest first."""
    output_dir = Path(output_dir)
    found = list_checkpoints(output_dir)[::-1]
    pointer = output_dir / "last_checkpoint"
    if pointer.is_file():
        named = output_dir / pointer.read_text().strip()
        if named.is_file():
            found = [named] + [p for p in found if p != named]
    return found


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest checkpoint: the one `last_checkpoint` names, else the highest iteration."""
    found = _newest_first(output_dir)
    return found[0] if found else None


def load_latest_checkpoint(output_dir: PathLike, verbose: bool = True
                           ) -> tuple[Optional[Path], Optional[dict]]:
    """(path, state) of the newest checkpoint of output_dir that loads, (None, None) when
    there is none. One that does not load (truncated by a full disk or an interrupted
    copy, or unsafe) is skipped with a one-line warning on stderr naming it and why, so
    a crash during a copy costs the iterations since the previous checkpoint, not the run.

    Raises:
        FileNotFoundError naming every file tried and why, when none of them loads.
    """
    tried = []
    for path in _newest_first(output_dir):
        try:
            return path, _load(path)
        except ValueError as err:
            tried.append(str(err))
            if verbose:
                print(f"warning: resume skips a checkpoint that does not load: {err}",
                      file=sys.stderr)
    if tried:
        raise FileNotFoundError(
            f"cannot resume: no checkpoint in {output_dir} loads ({'; '.join(tried)}). "
            f"Restore a good copy of one, or train without resuming")
    return None, None


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
    _remove_temp_files(output_dir)
    return path


def _remove_temp_files(output_dir: PathLike) -> None:
    """Delete the temp files of saves killed before their rename. Their names never
    match a checkpoint's, so they were never candidates; this only reclaims the disk.
    Only one process (rank 0) saves to an output_dir, so none is in use."""
    for path in Path(output_dir).iterdir():
        if _TEMP.match(path.name):
            path.unlink(missing_ok=True)


def _load(path: Path) -> dict:
    """The checkpoint's dict on the CPU, read by convert.weights (torch.load with
    weights_only=True for our files): its errors are one line naming the file."""
    return read_file(path)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with torch.load(weights_only=True): never runs code from it.

    Raises, each with one line naming the file and what to do:
        FileNotFoundError if missing; UnsafeCheckpointError (a ValueError) when it pickles
        anything but tensors and plain containers (a pickled object is refused, never
        run); ValueError when it is truncated (a full disk, an interrupted copy) or not a
        checkpoint at all.
    """
    try:
        state = _load(Path(path))
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(_with_hint(err, "load only checkpoints from a source you "
                                    "trust, re-saved as tensors and plain containers")
                                    ) from err.__cause__
    except ValueError as err:
        raise ValueError(_with_hint(err, "copy the file again, or use an older checkpoint")
                         ) from err.__cause__
    return state if map_location in (None, "cpu") else _to_device(state, map_location)


def _with_hint(err: Exception, hint: str) -> str:
    """err's one-line message followed by what to do about it."""
    return f"{str(err).rstrip('.')}; {hint}"


def _to_device(value: Any, device: Any) -> Any:
    """value with its tensors on `device` (_load reads everything onto the CPU)."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


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


def training_state(model, optimizer, schedule, scaler, train_set, cfg, iteration: int,
                   position: tuple[int, int], elapsed: float, rngs: list) -> dict:
    """The checkpoint content (see the module docstring). scaler: None without AMP;
    position: (epoch, batch_in_epoch); rngs: every rank's rng_state()."""
    epoch, batch_in_epoch = position
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "iteration": iteration,
        "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch},
        "elapsed_s": float(elapsed),
        "rng": rngs,
        "cat_ids": [int(c) for c in train_set.cat_ids],
        "class_names": [str(n) for n in train_set.class_names],
        "config": plain(cfg),
    }


def resume_training(output_dir: PathLike, resume: bool, main: bool, rank: int, model,
                    optimizer, schedule, scaler) -> tuple[Optional[Path], tuple]:
    """With `resume`, load the newest checkpoint of output_dir that loads into the run's
    model, optimizer, schedule, scaler and this rank's RNGs (rank 0 says so).

    Returns:
        (its path or None, (iteration, elapsed_s, epoch, batch_in_epoch), its
        "early_stop" record or None): zeros and None for a fresh start.
    """
    # loaded on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
    path, state = load_latest_checkpoint(output_dir, verbose=main) if resume else (None, None)
    if path is None:
        if not resume and main and latest_checkpoint(output_dir) is not None:
            print(f"note: {output_dir} holds checkpoints of an earlier run; starting fresh "
                  f"(pass --resume to continue it)", file=sys.stderr)
        return None, (0, 0.0, 0, 0), None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    if main:
        print(f"resuming from {path} (iteration {state['iteration']})")
    return path, (state["iteration"], state["elapsed_s"], state["data"]["epoch"],
                  state["data"]["batch_in_epoch"]), state.get("early_stop")


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
