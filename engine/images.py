"""Input side of inference: which files a source names, and decoding them.

    files = collect_inputs(["photo.jpg", "folder/", "shots/*.png", "clip.mp4"])
    image = decode_image_file(files[0])          # Tensor[3, H, W] uint8 RGB

A source is a file, a folder (its images, sorted, non-recursive), a glob, or a list of
those. Decoding uses torchvision.io (libjpeg-turbo, libpng, libwebp; it releases the GIL,
so a thread pool decodes in parallel with the model) and falls back to Pillow for the
formats torchvision does not read (BMP, TIFF, PPM) and for 16-bit PNGs, which come back as
float32 in [0, 1] (engine.data.load_rgb). Every failure is an ImageError naming the file
and the reason in one line.
"""
from __future__ import annotations

import glob
import warnings
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor

from engine.data import ImageError, load_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
# torchvision.io decodes these; they are recognised by their first bytes, not the suffix.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8")

PathLike = Union[str, Path]

# torchvision 0.29 warns on every decode that its decoders are deprecated in favour of
# TorchCodec's (which reads images only through FFmpeg system libraries): one filter
# here, not catch_warnings per call, which is not thread-safe.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities "
                        "of TorchVision are deprecated", category=UserWarning)


def is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def collect_inputs(source: Union[PathLike, Sequence[PathLike]],
                   extra_suffixes: Sequence[str] = ()) -> list[Path]:
    """The files a source names, in order: a file as it is (any suffix: a bad one fails
    when decoded, with its name), a folder's files with an image suffix (or one of
    `extra_suffixes`, e.g. video), sorted, and a glob's matches, sorted.

    Raises FileNotFoundError naming the first path that does not exist, a glob that
    matches nothing, or a source without any image."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    suffixes = tuple(IMAGE_SUFFIXES) + tuple(extra_suffixes)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(f for f in path.iterdir()
                            if f.is_file() and f.suffix.lower() in suffixes)
        elif path.exists():
            found.append(path)
        elif is_glob(str(item)):
            matches = sorted(Path(p) for p in glob.glob(str(item)) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"no file matches {item}")
            found += matches
        else:
            raise FileNotFoundError(f"image file or folder not found: {item}")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(suffixes)}) in "
                                f"{[str(p) for p in items]}")
    return found


def decode_image_file(path: PathLike) -> Tensor:
    """An image file as Tensor[3, H, W]: uint8 RGB, or float32 in [0, 1] for 16-bit
    images. Raises ImageError naming the file and why (missing, empty, truncated, not an
    image)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = "missing" if isinstance(err, FileNotFoundError) else "unreadable"
        raise ImageError(f"{path}: cannot be read ({err.strerror or err})", path,
                         reason) from None
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes)", path, "empty file")
    if not data.startswith(_MAGIC) and not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return load_rgb(path)                 # Pillow: BMP, TIFF, PPM, or not an image
    from torchvision.io import ImageReadMode, decode_image
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
    except RuntimeError as err:
        # torchvision's messages start with the C++ source location: keep the reason
        why = str(err).split(", ")[-1].split(". ")[0]
        short = "truncated" if "truncated" in why.lower() else "unreadable"
        raise ImageError(f"{path}: cannot be decoded ({why})", path, short) from None
    if image.dtype != torch.uint8:            # 16-bit PNG: Pillow path keeps the depth
        return load_rgb(path)
    return image


def to_float(image: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (as engine.data.load_rgb); float unchanged."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image
