"""Loads the compiled kernels (cffi, ABI mode) and reports which backend serves a device.

``mrcnn_kernels.h`` is the single description of the C ABI: it is parsed here at import
(preprocessor lines and the ``extern "C"`` wrapper stripped), so there is no second copy
of the declarations to keep in sync. Libraries are opened lazily: the CPU one when a CPU
op first runs, the CUDA one only for CUDA tensors. A missing library is looked for again
on every call until it appears (``python libs/build_libs.py`` may run in the same
process), and each device type warns once that it is using the pure-PyTorch fallback.
"""
from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path

import cffi

__all__ = ["ABI_VERSION", "HEADER", "BUILD_DIR", "get_lib", "check", "backend_info",
           "library_status", "ffi"]

ABI_VERSION = 6
_HERE = Path(__file__).resolve().parent
HEADER = _HERE / "csrc" / "mrcnn_kernels.h"
BUILD_DIR = _HERE / "build"
_FILES = {"cpu": "libmrcnn_cpu.so", "cuda": "libmrcnn_cuda.so"}
_BUILD_CMD = {"cpu": "python libs/build_libs.py", "cuda": "python libs/build_libs.py auto"}
_VERSION_FN = {"cpu": "mrc_abi_version", "cuda": "mrc_cuda_abi_version"}
_ERROR_FN = {"cpu": "mrc_last_error", "cuda": "mrc_cuda_last_error"}


def _declarations(text: str) -> str:
    """The header minus comments, preprocessor lines and the extern "C" wrapper."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or s in ('extern "C" {', "}"):
            continue
        keep.append(line)
    return "\n".join(keep)


ffi = cffi.FFI()
ffi.cdef(_declarations(HEADER.read_text()))

_lock = threading.Lock()
_libs: dict = {}          # device type -> opened library
_problem: dict = {}       # device type -> why no library is used (for backend_info)
_found_abi: dict = {}     # device type -> the ABI version the file reported (doctor)
_warned: set = set()


def _forced_fallback() -> bool:
    return os.environ.get("MASKRCNN_FORCE_FALLBACK", "") not in ("", "0")


def _warn_once(device_type: str, why: str) -> None:
    _problem[device_type] = why
    if device_type in _warned:
        return
    _warned.add(device_type)
    warnings.warn(
        f"maskrcnn: {why}; {device_type.upper()} ops use the slow pure-PyTorch fallback. "
        f"Build it with `{_BUILD_CMD[device_type]}`.", RuntimeWarning, stacklevel=4)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (shorter messages)."""
    try:
        return str(path.relative_to(_HERE.parent))
    except ValueError:
        return str(path)


def _open(device_type: str):
    path = BUILD_DIR / _FILES[device_type]
    if not path.exists():
        _warn_once(device_type, f"{_shown(path)} is not built")
        return None
    try:
        lib = ffi.dlopen(str(path))
        version = getattr(lib, _VERSION_FN[device_type])()
    except (OSError, AttributeError) as exc:
        _warn_once(device_type, f"cannot load {path}: {exc}")
        return None
    _found_abi[device_type] = version
    if version != ABI_VERSION:
        _warn_once(device_type, f"{path} has ABI version {version}, expected {ABI_VERSION} "
                                "(stale build)")
        return None
    _problem.pop(device_type, None)
    return lib


def get_lib(device_type: str):
    """The compiled library for ``"cpu"`` or ``"cuda"``, or None (use the fallback)."""
    if device_type not in _FILES or _forced_fallback():
        return None
    lib = _libs.get(device_type)
    if lib is not None:
        return lib
    with _lock:
        lib = _libs.get(device_type)
        if lib is None:
            lib = _open(device_type)
            if lib is not None:
                _libs[device_type] = lib
    return lib


def check(lib, device_type: str, rc: int, what: str) -> None:
    """Raises RuntimeError with the library's own message for a non-zero return code."""
    if rc != 0:
        msg = ffi.string(getattr(lib, _ERROR_FN[device_type])()).decode(errors="replace")
        raise RuntimeError(f"maskrcnn {what} failed (code {rc}): {msg}")


def backend_info() -> dict:
    """Which implementation each device type uses, e.g.
    ``{"cpu": "native (libs/build/libmrcnn_cpu.so, ABI 5)", "cuda": "fallback: ..."}``."""
    import torch

    info = {}
    for dev in _FILES:
        if _forced_fallback():
            info[dev] = "fallback (MASKRCNN_FORCE_FALLBACK=1)"
            continue
        if dev == "cuda" and dev not in _libs and not torch.cuda.is_available():
            path = BUILD_DIR / _FILES[dev]
            info[dev] = ("not loaded (no CUDA device)" + (f"; {path.name} present"
                         if path.exists() else f"; {path.name} not built"))
            continue
        lib = get_lib(dev) if dev == "cpu" or torch.cuda.is_available() else None
        if lib is not None:
            info[dev] = f"native (libs/build/{_FILES[dev]}, ABI {ABI_VERSION})"
        else:
            info[dev] = "fallback (" + _problem.get(dev, "library not loaded") + ")"
    info["cpu_threads"] = torch.get_num_threads()
    return info


def library_status(device_type: str) -> dict:
    """What the loader knows of one library, for `maskrcnn doctor`: its path, whether the
    file exists and is loaded, the ABI version it reported (None: never opened) and why
    it is not used (None when it is). Opens nothing: call get_lib first to try."""
    path = BUILD_DIR / _FILES[device_type]
    forced = _forced_fallback()
    problem = "MASKRCNN_FORCE_FALLBACK=1" if forced else _problem.get(device_type)
    return {"path": str(path), "present": path.exists(),
            "loaded": device_type in _libs and not forced, "forced_fallback": forced,
            "abi": _found_abi.get(device_type), "expected_abi": ABI_VERSION,
            "problem": problem, "build_command": _BUILD_CMD[device_type]}


def reset_for_tests() -> None:
    """Forgets the opened libraries and warnings (tests simulate a late build)."""
    with _lock:
        _libs.clear()
        _problem.clear()
        _found_abi.clear()
        _warned.clear()
