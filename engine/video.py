"""Video in and out: decode a clip frame by frame, encode annotated frames, and write one
JSON line per frame. Decoding and encoding use PyAV (`pip install
'mask-rcnn-pytorch[video]'`), whose wheels bundle FFmpeg: nothing else to install.

    with VideoReader("clip.mp4") as reader, \\
            VideoWriter("out/clip.mp4", reader.fps, reader.width, reader.height) as writer, \\
            JsonlWriter("out/clip.jsonl") as lines:
        for index, frame in reader:                 # frame: Tensor[3, H, W] uint8 RGB
            result = ...                            # boxes, labels, scores, masks (RLE)
            writer.write(draw_frame(frame, result, class_names))
            lines.write({"frame": index, **result})

Written codecs (when `codec` is not given): H.264 (libx264) in .mp4 / .m4v / .mov / .mkv,
MPEG-4 Part 2 in .avi, VP9 in .webm; MPEG-4 Part 2 where the H.264 encoder is missing.
Frames are encoded as yuv420p (4:2:0 chroma, what every player decodes), which needs an
even width and height: odd-sized frames get one column / row repeated at the right /
bottom edge, so the written video is up to one pixel wider and taller than its frames.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

PathLike = Union[str, os.PathLike]

# File name suffixes treated as videos (lower case); the rest are images.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts",
                  ".wmv", ".flv", ".3gp", ".ogv")
# Encoders tried in order for a suffix (the first one the bundled FFmpeg has wins); other
# suffixes use _DEFAULT_CODECS. The container must accept the codec: .webm holds only
# VP8 / VP9 / AV1.
_CODECS = {".webm": ("libvpx-vp9", "libvpx"), ".avi": ("mpeg4", "libx264")}
_DEFAULT_CODECS = ("libx264", "mpeg4")
# Frame rate when the file states none (FFmpeg's own default).
_FALLBACK_FPS = 25.0
_INSTALL = "pip install 'mask-rcnn-pytorch[video]'"


class VideoError(ValueError):
    """A video file that cannot be read or written; the message names the file."""


def is_video(path: PathLike) -> bool:
    """Whether the file name ends in one of VIDEO_SUFFIXES (any case)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError(f"reading and writing video needs PyAV: {_INSTALL}") from None
    return av


class VideoReader:
    """The frames of a video file, in presentation order.

        with VideoReader("clip.mp4") as reader:
            for index, frame in reader:    # 0, 1, ...; Tensor[3, H, W] uint8 RGB
                ...

    Attributes:
        fps: float, the stream's average frame rate (25 when the file states none).
        frames: int, the frame count the container states, or None when it states none
            (.mkv, .webm): iterating gives the true count.
        width, height: int, the decoded frame size.
    Raises:
        VideoError (a ValueError) naming the file: missing, not a video, no video
            stream, or a frame that does not decode.
        ImportError when PyAV is not installed.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._av = _import_av()
        self._container = self._open()
        stream = self._container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate else _FALLBACK_FPS
        self.frames: Optional[int] = stream.frames or None
        self.width = stream.codec_context.width
        self.height = stream.codec_context.height

    def _open(self):
        if not self.path.is_file():
            raise VideoError(f"{self.path}: no such video file")
        try:
            container = self._av.open(str(self.path))
        except self._av.error.FFmpegError as e:
            raise VideoError(f"{self.path}: not a readable video ({_reason(e)})") from None
        if not container.streams.video:
            container.close()
            raise VideoError(f"{self.path}: holds no video stream")
        return container

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        """(frame index from 0, Tensor[3, H, W] uint8 RGB) per frame. A second pass
        re-opens the file and starts again from frame 0."""
        if self._container is None:
            self._container = self._open()
        container, self._container = self._container, None
        index = 0
        try:
            for frame in container.decode(video=0):
                rgb = frame.to_ndarray(format="rgb24")              # [H, W, 3] uint8
                yield index, torch.from_numpy(rgb).permute(2, 0, 1)
                index += 1
        except self._av.error.FFmpegError as e:
            raise VideoError(f"{self.path}: frame {index} does not decode "
                             f"({_reason(e)})") from None
        finally:
            container.close()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VideoWriter:
    """Encodes RGB frames into a video file, written atomically: frames go to a temp file
    in the same folder, renamed to `path` by close() (the end of a `with` block); an
    exception inside the block, or abort(), removes the temp file and leaves `path`
    as it was.

        with VideoWriter("out.mp4", fps=30, width=640, height=480) as writer:
            writer.write(frame)    # Tensor[3, H, W] uint8, PIL image or [H, W, 3] uint8 array

    Args:
        path: output file; its suffix picks the container and, when codec is None, the
            codec (see the module docstring).
        fps: frames per second (> 0), e.g. a VideoReader's fps.
        width, height: the size of every frame written. Odd sizes are padded to even by
            repeating the last column / row (4:2:0 chroma needs even sizes); `size` is
            the encoded (width, height).
        codec: an FFmpeg encoder name ("libx264", "mpeg4", "libvpx-vp9", ...).
    Raises:
        VideoError naming the file when the codec or container is unavailable or the
        file cannot be written; ValueError for a frame of another size or type.
    """

    def __init__(self, path: PathLike, fps: float, width: int, height: int,
                 codec: Optional[str] = None):
        self.path = Path(path)
        if not _positive(fps):
            raise ValueError(f"{self.path}: fps must be a positive number, got {fps!r}")
        if int(width) < 1 or int(height) < 1:
            raise ValueError(f"{self.path}: frame size must be positive, got "
                             f"{width}x{height}")
        self._av = av = _import_av()
        self.width, self.height = int(width), int(height)
        self.size = (self.width + self.width % 2, self.height + self.height % 2)
        self.frames_written = 0
        self.codec = codec or _default_codec(av, self.path.suffix.lower())
        if not _has_encoder(av, self.codec):
            raise VideoError(f"{self.path}: PyAV's FFmpeg has no encoder {self.codec!r}; "
                             f"leave codec unset or name another (libx264, mpeg4, ...)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the temp file keeps the suffix: FFmpeg picks the container from it
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.",
                                         suffix=f".tmp{self.path.suffix}",
                                         dir=self.path.parent)
        os.close(fd)
        try:
            self._container = av.open(self._tmp, "w")
            self._stream = self._container.add_stream(
                self.codec, rate=Fraction(float(fps)).limit_denominator(1001))
            self._stream.width, self._stream.height = self.size
            self._stream.pix_fmt = "yuv420p"
            _constant_quality(self._stream, self.codec)
        except (av.error.FFmpegError, ValueError) as e:
            self.abort()
            raise VideoError(f"{self.path}: cannot write codec {self.codec!r} in a "
                             f"{self.path.suffix or 'suffix-less'} file "
                             f"({_reason(e)})") from None

    def write(self, frame: Union[Tensor, np.ndarray, Image.Image]) -> None:
        """Encode one frame: Tensor[3, H, W] uint8, [H, W, 3] uint8 array or PIL image
        (converted to RGB), H, W = height, width."""
        if self._container is None:
            raise ValueError(f"{self.path}: write() after close()")
        array = _to_hwc(frame, self.path)
        if array.shape[:2] != (self.height, self.width):
            raise ValueError(f"{self.path}: frame {self.frames_written} is "
                             f"{array.shape[1]}x{array.shape[0]}, the video "
                             f"{self.width}x{self.height} (width x height)")
        pad = ((0, self.size[1] - self.height), (0, self.size[0] - self.width), (0, 0))
        if self.size != (self.width, self.height):
            array = np.pad(array, pad, mode="edge")
        video_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(array),
                                                       format="rgb24")
        video_frame.pts = self.frames_written          # in 1 / fps: constant frame rate
        self._mux(video_frame)
        self.frames_written += 1

    def _mux(self, frame) -> None:
        try:
            for packet in self._stream.encode(frame):   # frame None flushes the encoder
                self._container.mux(packet)
        except self._av.error.FFmpegError as e:
            raise VideoError(f"{self.path}: encoding frame {self.frames_written} failed "
                             f"({_reason(e)})") from None

    def close(self) -> Path:
        """Flush the encoder, finish the file and rename it to `path`."""
        if self._container is None:
            return self.path
        try:
            self._mux(None)
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop what was written: close the encoder, remove the temp file."""
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            try:
                container.close()
            except Exception:                   # the file is discarded anyway
                pass
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _default_codec(av, suffix: str) -> str:
    """The first encoder of the suffix's list that this FFmpeg build has."""
    names = _CODECS.get(suffix, _DEFAULT_CODECS)
    return next((name for name in names if _has_encoder(av, name)), names[0])


def _constant_quality(stream, codec: str) -> None:
    """Constant quality instead of FFmpeg's fixed default bit rates (MPEG-4 200 kb/s,
    VP9 256 kb/s), which blur anything larger than a thumbnail. libx264's default
    (crf 23) is already constant quality."""
    if codec == "mpeg4":           # quantiser 3 (ffmpeg -q:v 3): with the qscale flag
        stream.codec_context.qscale = True   # and no per-frame quality, qmin is used
        stream.codec_context.qmin = 3
    elif codec.startswith("libvpx"):         # ffmpeg's VP9 guide: -crf 31 -b:v 0
        stream.codec_context.bit_rate = 0
        stream.options = {"crf": "31"}


def _has_encoder(av, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:                           # UnknownCodecError: not in this build
        return False


def _positive(value) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def _to_hwc(frame, path: Path) -> np.ndarray:
    """A frame as a [H, W, 3] uint8 array."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if isinstance(frame, Tensor):
        if frame.dim() != 3 or frame.shape[0] != 3 or frame.dtype != torch.uint8:
            raise ValueError(f"{path}: a tensor frame must be Tensor[3, H, W] uint8, got "
                             f"{frame.dtype} of shape {tuple(frame.shape)}")
        return frame.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"{path}: an array frame must be [H, W, 3] uint8, got "
                             f"{frame.dtype} of shape {frame.shape}")
        return frame
    raise ValueError(f"{path}: a frame must be a uint8 Tensor[3, H, W], a [H, W, 3] uint8 "
                     f"array or a PIL image, got {type(frame).__name__}")


def _reason(error: Exception) -> str:
    """FFmpeg's message without PyAV's errno prefix, on one line."""
    text = getattr(error, "strerror", None) or str(error)
    return " ".join(str(text).split())


class JsonlWriter:
    """One JSON object per line, each line flushed as it is written, so a reader can
    tail the file and a crash keeps every line written before it. Tensors and numpy
    values become lists / numbers, bytes (pycocotools RLE counts) ASCII text.

        with JsonlWriter("out/clip.jsonl") as lines:
            lines.write({"frame": 0, "boxes": boxes, ...})
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self.lines_written = 0

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        self.lines_written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _jsonable(value):
    """json.dumps' fallback for tensors, numpy values and bytes."""
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def draw_frame(image: Tensor, result: dict, class_names: Sequence[str],
               score_threshold: float = 0.5) -> Tensor:
    """A video frame with a prediction result drawn (engine.predict.overlay_image).

    Args:
        image: Tensor[3, H, W] uint8 RGB.
        result: boxes [D, 4] (x1, y1, x2, y2), labels [D], scores [D] (tensors or
            lists), and optionally masks in any of the Predictor's forms (COCO RLE
            dicts, MaskWindow crops, Tensor[D, H, W]), or absent (boxes only).
        class_names: name of label l is class_names[l - 1].
    Returns:
        Tensor[3, H, W] uint8, the frame with masks, boxes and labels drawn.
    """
    from engine.predict import overlay_image
    detection = {"boxes": torch.as_tensor(result["boxes"], dtype=torch.float32).reshape(-1, 4),
                 "labels": torch.as_tensor(result["labels"], dtype=torch.int64),
                 "scores": torch.as_tensor(result["scores"], dtype=torch.float32),
                 "image_size": tuple(image.shape[-2:])}
    if result.get("masks") is not None:
        detection["masks"] = result["masks"]
    drawn = overlay_image(image.float() / 255, detection, class_names, score_threshold)
    return torch.from_numpy(np.array(drawn)).permute(2, 0, 1).contiguous()
