"""Verified downloads into torch.hub's cache, and safe reading of pickled weights.

    fetch(entry)            the file in the torch hub cache, downloaded and verified once
    read_torch_or_pickle(p) a torch .pth or a raw pickle (.pkl) as a dict; never runs code
    torch_load_safe(p)      torch.load(weights_only=True) with one-line errors

A leaf module: it imports no other package of the project. The table of downloadable
models (convert/zoo.py) and the reader that tells weight formats apart
(convert/weights.py) build on it.

The cache is torch.hub's ($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints by
default), shared with torchvision. A download goes to `<file>.partial-<random>` and is
renamed onto the final name only once verified, so a file under the final name is always
complete. torchvision file names carry a sha256 prefix that the file must match.
detectron2 publishes no hashes: its files are verified by content (they must unpickle as
arrays and pass the caller's check) and their sha256 is then recorded in `<file>.sha256`,
which later loads check against.

Set MASKRCNN_OFFLINE=1 to forbid downloads: a missing file then raises FileNotFoundError
naming the URL and the exact path to put the file at.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import hashlib
import http.client
import importlib
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

PathLike = Union[str, os.PathLike]
# (path, name shown in errors) -> the file's dict; fetch checks content through one
Reader = Callable[[Path, str], dict]

SOURCES = ("torchvision", "detectron2")
OFFLINE_ENV = "MASKRCNN_OFFLINE"
_CHUNK = 1 << 20   # 1 MiB: hashing / downloading 170-500 MB files without holding them
_TIMEOUT_S = 60    # per socket operation: a dead server fails instead of hanging


class ChecksumError(ValueError):
    """A downloaded or cached checkpoint failed verification (hash or content)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint pickles something other than arrays / tensors and plain containers."""


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded (network, HTTP or file error)."""


# ------------------------------------------------------------------ a downloadable file

@dataclass(frozen=True)
class ZooEntry:
    """One downloadable checkpoint (convert.zoo.ZooEntry adds what its preset says).

    name:    "<source>/<model>", the key in ZOO (e.g. "detectron2/mask_rcnn_R_50_FPN_3x")
    preset:  its config file, relative to the package root ("configs/zoo/<name>.ini")
    url:     where to download it (http(s):// or file://)
    sha256:  the hex prefix the file's sha256 must start with (torchvision puts 8 hex
             digits in its file names); None when the source publishes no hash
    box_ap, mask_ap: COCO val2017 AP published by the source
    source:  "torchvision" (labels = COCO ids 1..90) or "detectron2" (labels 1..80)
    backbone: "resnet50", "resnet101" or "resnext101"
    """
    name: str
    preset: str
    url: str
    sha256: Optional[str]
    box_ap: float
    mask_ap: float
    source: str
    backbone: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"ZooEntry {self.name!r}: source must be one of {SOURCES}, "
                             f"got {self.source!r}")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{1,64}", self.sha256):
            raise ValueError(f"ZooEntry {self.name!r}: sha256 must be lower-case hex "
                             f"(a prefix of the digest), got {self.sha256!r}")

    @property
    def filename(self) -> str:
        """The last URL path component: the file's name in the cache."""
        return urllib.request.url2pathname(self.url.rstrip("/").rsplit("/", 1)[-1])


# ------------------------------------------------------------------------ safe reading

def _numpy_attr(submodule: str, name: str) -> Any:
    """numpy._core.<submodule>.<name> (numpy 2) or numpy.core.<...> (numpy 1)."""
    try:
        return getattr(importlib.import_module(f"numpy._core.{submodule}"), name)
    except ImportError:
        return getattr(importlib.import_module(f"numpy.core.{submodule}"), name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); any other codec
    # would be a way to reach codec machinery, so it is refused.
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a checkpoint pickle may name: what numpy arrays, numpy scalars,
    dtypes and an OrderedDict need, under the numpy 1 and numpy 2 module names."""
    found = {
        ("multiarray", "_reconstruct"): _numpy_attr("multiarray", "_reconstruct"),
        ("multiarray", "scalar"): _numpy_attr("multiarray", "scalar"),
        ("numeric", "_frombuffer"): _numpy_attr("numeric", "_frombuffer"),   # protocol 5
    }
    allowed = {(f"{pkg}.{sub}", name): obj for (sub, name), obj in found.items()
               for pkg in ("numpy.core", "numpy._core")}
    allowed.update({("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                    ("collections", "OrderedDict"): collections.OrderedDict,
                    ("_codecs", "encode"): _latin1_encode})
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts / lists of numpy arrays; any other global is refused, not imported."""

    def __init__(self, file: BinaryIO, shown: str) -> None:
        # latin1: Python 2 pickles of numpy arrays hold the raw data as a py2 str.
        super().__init__(file, encoding="latin1")
        self._shown = shown

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            # Shown by its Python 3 name (protocol 2 writes builtins as __builtin__).
            module, name = _compat_pickle.NAME_MAPPING.get(
                (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
            raise UnsafeCheckpointError(
                f"refusing to load {self._shown}: it pickles {module}.{name}, not only "
                f"arrays; loading never runs code from a checkpoint")
        return obj


def _to_torch(value: Any) -> Any:
    """numpy arrays -> tensors (numeric / bool dtypes; others stay numpy), numpy scalars ->
    Python numbers, containers rebuilt with the same type, anything else unchanged."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            return value
        # torch wants native byte order and a writable buffer (unpickled arrays may be
        # read-only views of the pickle's bytes).
        value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
        if not value.flags.writeable:
            value = value.copy()
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, _to_torch(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_torch(v) for v in value)
    return value


def torch_load_safe(path: Path, shown: str) -> Any:
    """torch.load(weights_only=True) on the CPU, its refusals and read errors turned into
    one-line ValueErrors naming `shown` (the file as the user knows it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        offending = re.search(r"GLOBAL ([\w.]+)", message)
        if offending or "Unsupported" in message:
            what = offending.group(1) if offending else "an object that is not a tensor"
            raise UnsafeCheckpointError(
                f"refusing to load {shown}: it pickles {what}, not only tensors and plain "
                f"containers (torch.load weights_only=True refused it); loading never "
                f"runs code from a checkpoint") from err
        raise ValueError(f"{shown} is truncated or not a checkpoint: "
                         f"{message.splitlines()[0] if message else type(err).__name__}"
                         ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{shown} is truncated or not a checkpoint: {first}") from err


def read_torch_or_pickle(path: Path, shown: str) -> dict:
    """A torch file (zip or legacy) or a raw pickle as a dict, without ever executing code
    from it; errors name `shown` (a download's temp file is shown by its final name).

    torch files go through torch.load(weights_only=True); raw pickles (detectron2 .pkl:
    {"model": {name: ndarray}, "__author__": ..., ...}, protocol 2 Python 2 pickles
    included) through an unpickler that only admits numpy arrays. The format is told by
    content, not by extension. Numeric numpy arrays become tensors, the dict structure
    is kept.

    Raises:
        UnsafeCheckpointError: it pickles anything else (a class, a function): one line
            naming the file and the global; nothing of it was run.
        ValueError: truncated, corrupt or not a checkpoint (naming the file).
    """
    with open(path, "rb") as f:
        magic = f.read(2)
        f.seek(0)
        if magic == b"PK":   # torch's zip format
            state = torch_load_safe(path, shown)
        elif magic[:1] == b"\x80":   # a pickle (protocol >= 2): detectron2 or legacy torch
            try:
                state = _ArraysOnlyUnpickler(f, shown).load()
            except UnsafeCheckpointError:
                raise
            except Exception as err:   # unpickling garbage can raise almost anything
                raise ValueError(f"{shown} is truncated or not a checkpoint: "
                                 f"{type(err).__name__}: {err}") from err
            # A legacy torch.save file is a sequence of pickles, the first the magic number.
            if isinstance(state, int) and state == torch.serialization.MAGIC_NUMBER:
                state = torch_load_safe(path, shown)
        else:
            raise ValueError(f"{shown} is not a checkpoint: it is neither a torch zip file "
                             f"nor a pickle (starts with {magic!r}); is it truncated or an "
                             f"HTML error page?")
    if not isinstance(state, dict):
        raise ValueError(f"{shown} holds a {type(state).__name__}, not a dict of weights")
    return _to_torch(state)


# ------------------------------------------------------------------------ the cache

def cache_dir() -> Path:
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_file(entry: ZooEntry) -> Path:
    """Where `entry`'s file is (or will be) cached."""
    return cache_dir() / entry.filename


def sha256_file(path: PathLike) -> str:
    """The file's sha256 hex digest, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: Path, digest: str) -> None:
    """Write `<path>.sha256` atomically, in `sha256sum -c` format."""
    target = _sidecar(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.partial-", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{digest}  {path.name}\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _content_failure(path: Path, shown: str, check_content: Optional[Callable[[dict], None]],
                     read: Reader) -> Optional[Exception]:
    """None when `read` reads the file and it passes check_content, else the error saying
    why."""
    try:
        state = read(path, shown)
        if check_content is not None:
            check_content(state)
    except Exception as err:   # any failure of the caller's check is a verdict, not a crash
        return err
    return None


def _why(err: Exception) -> str:
    return str(err) or type(err).__name__


def _verify_cached(entry: ZooEntry, path: Path,
                   check_content: Optional[Callable[[dict], None]], read: Reader) -> None:
    """Raise ChecksumError when the cached file is not the one `entry` names."""
    sidecar = _sidecar(path)
    redo = (f"Delete it (rm {path}" + (f" {sidecar}" if entry.sha256 is None else "")
            + ") and retry to download it again.")
    if entry.sha256 is not None:
        got = sha256_file(path)
        if not got.startswith(entry.sha256):
            raise ChecksumError(f"cached {entry.name} checkpoint {path} is corrupt: sha256 "
                                f"{got} does not start with {entry.sha256}. {redo}")
        return
    if sidecar.is_file():
        words = sidecar.read_text().split()
        want = words[0] if words else ""
        got = sha256_file(path)
        if got != want:
            raise ChecksumError(f"cached {entry.name} checkpoint {path} changed since it was "
                                f"verified: sha256 {got}, recorded in {sidecar}: "
                                f"{want or '(empty)'}. {redo}")
        return
    # Cached without a record (copied in by hand, or an older version of this code).
    _check_content(path, str(path), check_content, read,
                   f"cached {entry.name} checkpoint {path}", redo)
    _write_sidecar(path, sha256_file(path))


def _download(entry: ZooEntry, tmp: Path, final: Path, progress: bool) -> str:
    """Download entry.url into `tmp` (an open-able path); returns the sha256 hex digest."""
    manual = f"Download it by hand from {entry.url} and put it at {final}."
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(entry.url, timeout=_TIMEOUT_S) as response, \
                open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=entry.filename, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        if total is not None and done != total:
            raise DownloadError(f"could not download {entry.filename} ({entry.name}) from "
                                f"{entry.url}: got {done} of {total} bytes. {manual}")
    except (OSError, http.client.HTTPException, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"could not download {entry.filename} ({entry.name}) from "
                            f"{entry.url}: {reason}. {manual}") from err
    return digest.hexdigest()


def fetch(entry: ZooEntry, progress: bool = True,
          check_content: Optional[Callable[[dict], None]] = None,
          read: Reader = read_torch_or_pickle) -> Path:
    """The verified local file of `entry`, downloaded into cache_dir() if not there.

    Verification: with entry.sha256, the file's sha256 must start with it. Without (the
    detectron2 files), the file must read with `read(path, shown)` and pass
    `check_content(state)` (which raises to reject it); its sha256 is then recorded in
    `<file>.sha256`, and later calls only compare the hash with that record.

    Raises:
        ChecksumError: the cached or downloaded file failed verification (it is not
            loaded further, and a failed download leaves nothing in the cache).
        FileNotFoundError: MASKRCNN_OFFLINE=1 and the file is not cached.
        DownloadError (a RuntimeError): the download failed; names the URL and the path
            to put the file at by hand.
    """
    final = cached_file(entry)
    if final.is_file():
        _verify_cached(entry, final, check_content, read)
        return final
    if os.environ.get(OFFLINE_ENV) == "1":
        raise FileNotFoundError(
            f"{entry.name}: {entry.filename} is not cached and {OFFLINE_ENV}=1 forbids "
            f"downloading. Download {entry.url} and put it at {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{final.name}.partial-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        digest = _download(entry, tmp, final, progress)
        _verify_download(entry, tmp, final, digest, check_content, read)
        if entry.sha256 is None:
            _write_sidecar(final, digest)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)   # gone already after a successful os.replace
    return final


def _verify_download(entry: ZooEntry, tmp: Path, final: Path, digest: str,
                     check_content: Optional[Callable[[dict], None]], read: Reader) -> None:
    where = f"the download of {entry.name} from {entry.url}"
    if entry.sha256 is not None:
        if not digest.startswith(entry.sha256):
            raise ChecksumError(f"{where} is corrupt or not the published file: sha256 "
                                f"{digest} does not start with {entry.sha256}. Nothing was "
                                f"saved at {final}; retry, or check the URL.")
        return
    _check_content(tmp, str(final), check_content, read, where,
                   f"Nothing was saved at {final}; retry, or check the URL.")


def _check_content(path: Path, shown: str, check_content: Optional[Callable[[dict], None]],
                   read: Reader, what: str, advice: str) -> None:
    """Raises ChecksumError "<what> failed its content check: <why>. <advice>" when the
    checkpoint at `path` (named `shown` in messages) fails check_content."""
    failure = _content_failure(path, shown, check_content, read)
    if failure is not None:
        raise ChecksumError(f"{what} failed its content check: {_why(failure)}. "
                            f"{advice}") from failure
