"""Inference at work: a Predictor for image lists, files, folders and globs, batched, on
PyTorch, ONNX Runtime or OpenVINO, with results as COCO RLE, box-sized crops or dense
masks.

    from engine import Predictor
    predictor = Predictor("outputs/model_final.pth", batch_size=4)   # or a model, "coco",
                                                                    # a zoo name, an .onnx
    results = predictor([image1, image2])          # RGB [0, 1] Tensor[3, H, W] each
    for result in predictor.run("photos/"):        # a file, folder, glob or list of paths
        print(result["file_name"], result["category_names"], result["scores"])

Each result is a dict:
    boxes Tensor[D, 4] float32 (x1, y1, x2, y2) in image pixels, labels Tensor[D] int64 in
    1..K, scores Tensor[D] float32, category_names list[str] (D), image_size (H, W), and
    masks (mask models) in the predictor's mask_format:
        "rle":   list of D COCO RLE dicts {"size": [H, W], "counts": str} (pycocotools
                 decodes them; what COCO results files hold),
        "crop":  list of D tools.paste.MaskWindow(x0, y0, mask Tensor[h, w] bool): the
                 mask inside the window its box covers, background elsewhere,
        "dense": Tensor[D, H, W] bool (100 masks of a 6000 x 4000 photo: 2.4 GB).
    Every form is the model's pasted mask probability >= mask_threshold, pixel for pixel;
    the model never builds the [D, 1, H, W] canvas (its pasting returns the windows).
    run() adds image_id (1-based position in the input order) and file_name.

Batching: run() decodes images in `workers` threads ahead of the model (torchvision.io
releases the GIL) and writes results in another thread. A batch of images is split into
groups of equal padded input size, so an image is always run at the size it has alone:
results do not depend on batch_size (zero padding to a larger batch canvas would change
the features near its right and bottom edges, as torchvision's batching does).

Bad files: an unreadable image in a folder (truncated, not an image, empty) is skipped
with one SkippedImageWarning naming it; predictor.failures lists (path, reason) of the
last run and predictor.summary() says it in a line.
"""
from __future__ import annotations

import copy
import json
import math
import queue
import tempfile
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor, nn

from builder import build_model
from configs import apply_overrides, resolve_config
from configs.loader import known_keys
from convert import zoo
from convert.weights import is_safetensors
from engine.checkpoint import load_checkpoint
from engine.data import ImageError
from engine.evaluate import detections_to_coco
from engine.formats import write_coco
from engine.images import IMAGE_SUFFIXES, collect_inputs, decode_image_file, to_float
from engine.video import VIDEO_SUFFIXES, JsonlWriter, VideoError, VideoReader, VideoWriter, \
    draw_frame, is_video
from maskrcnn import MaskRCNN
from tools.paste import MaskWindow
from tools.tracing import resized_size
from tools.visualize import draw_detections

__all__ = ["Predictor", "load_model", "predict", "collect_images", "is_zoo_name",
           "MASK_FORMATS", "RUNTIMES", "SkippedImageWarning", "CocoResultsWriter",
           "OverlayWriter", "JsonlResultsWriter", "VideoResultsWriter", "result_to_json",
           "window_to_rle", "IMAGE_SUFFIXES"]

MASK_FORMATS = ("rle", "crop", "dense")
RUNTIMES = ("torch", "onnxruntime", "openvino")


class SkippedImageWarning(UserWarning):
    """An input image could not be read and was skipped (the run goes on)."""


# ------------------------------------------------------------------------ models

def load_model(weights, device="cpu", overrides: Optional[dict] = None):
    """The MaskRCNN of a training checkpoint (eval mode) and its metadata.

    Args:
        weights: a checkpoint written by engine/train.py (it holds the config and the
            class mapping; loaded with weights_only=True), a weights file exported from
            one (`maskrcnn export-weights`), or "coco" / a model-zoo name (convert.zoo.ZOO:
            downloaded once, verified, with its COCO categories).
        overrides: config keys to change for inference (e.g. box_score_thresh).
    Returns:
        (model, dict(class_names, cat_ids, config, iteration)).
    """
    if is_zoo_name(weights) or is_safetensors(weights):
        return _load_pretrained(weights, device, overrides or {})
    state = load_checkpoint(weights)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{weights}: not a training checkpoint of this library (expected "
                         f"the keys 'model' and 'config'; got "
                         f"{sorted(state)[:8] if isinstance(state, dict) else type(state)})")
    cfg = apply_overrides(resolve_config(known_keys(state["config"])), overrides or {})
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{weights}: the weights do not fit the model its config "
                         f"describes: {str(err)[:300]}") from None
    model.to(device).eval()
    k = model.num_classes
    meta = dict(class_names=list(state.get("class_names") or [str(i) for i in range(1, k + 1)]),
                cat_ids=list(state.get("cat_ids") or range(1, k + 1)), config=cfg,
                iteration=state.get("iteration"))
    # the model carries its classes too, so Predictor(model) names them
    model.categories = {label: (name, int(cat_id)) for label, (name, cat_id) in
                        enumerate(zip(meta["class_names"], meta["cat_ids"]), start=1)}
    return model, meta


def is_zoo_name(weights) -> bool:
    """"coco" or a name of convert.zoo.ZOO (anything else is a file path)."""
    return str(weights) == "coco" or str(weights) in zoo.ZOO


def _load_pretrained(weights, device, overrides: dict):
    """A zoo model or an exported weights file: MaskRCNN(pretrained=...) rebuilds it."""
    model = MaskRCNN(pretrained=str(weights), **overrides).to(device).eval()
    return model, dict(_model_categories(model), config=model.cfg, iteration=None)


def _model_categories(model: nn.Module) -> dict:
    """class_names and cat_ids of a model from its `categories` (label -> (name, id)),
    else the label numbers."""
    labels = range(1, model.num_classes + 1)
    categories = getattr(model, "categories", None) or {}
    return dict(class_names=[categories.get(i, (str(i), i))[0] for i in labels],
                cat_ids=[categories.get(i, (str(i), i))[1] for i in labels])


def collect_images(paths: Sequence[Union[str, Path]]) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in folders."""
    return collect_inputs(paths)


# ---------------------------------------------------------------------- runtimes

class TorchRuntime:
    """Our MaskRCNN on a torch device. detect(images) -> per image dict(boxes, labels,
    scores[, windows: list of MaskWindow with probabilities]), in input order."""

    def __init__(self, model: nn.Module, device):
        self.model = model.eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def detect(self, images: list[Tensor]) -> list[dict]:
        out: list[Optional[dict]] = [None] * len(images)
        transform = self.model.transform
        for indices in group_by_input_size(images, transform.min_size, transform.max_size,
                                           transform.size_divisible):
            batch = [images[i].to(self.device) for i in indices]
            previous, transform.paste_into_image = transform.paste_into_image, False
            try:
                detections = self.model(batch)
            finally:
                transform.paste_into_image = previous
            for i, det in zip(indices, detections):
                out[i] = _detection_with_windows(det)
        return out


def group_by_input_size(images: Sequence[Tensor], min_size: int, max_size: int,
                        stride: int) -> list[list[int]]:
    """Indices of `images` grouped by the padded size the model's transform gives each
    alone (first-seen order): a group batches without padding any image further."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        h, w = resized_size(int(image.shape[-2]), int(image.shape[-1]), min_size, max_size)
        key = (math.ceil(h / stride) * stride, math.ceil(w / stride) * stride)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _detection_with_windows(det: dict) -> dict:
    out = {k: det[k].cpu() for k in ("boxes", "labels", "scores")}
    if "masks" in det:
        out["windows"] = [MaskWindow(x0, y0, m.cpu()) for x0, y0, m in det["masks"]]
    return out


class ExportedRuntime:
    """An exported ONNX model in ONNX Runtime or OpenVINO (deploy.OnnxPredictor /
    OpenVinoPredictor): one image per call; its dense masks are cut to windows."""

    def __init__(self, path: Path, runtime: str, threads: Optional[int] = None):
        import deploy
        cls = deploy.OnnxPredictor if runtime == "onnxruntime" else deploy.OpenVinoPredictor
        self.runner = cls(path, threads=threads)

    def detect(self, images: list[Tensor]) -> list[dict]:
        out = []
        for image in images:
            det = self.runner(image)
            item = {k: det[k] for k in ("boxes", "labels", "scores")}
            if "masks" in det:
                item["windows"] = dense_to_windows(det["masks"])
            out.append(item)
        return out


def dense_to_windows(masks: Tensor) -> list[MaskWindow]:
    """Tensor[D, 1, H, W] probabilities -> each mask's window: the smallest box holding
    its nonzero pixels (an empty window for an all-zero mask)."""
    windows = []
    for m in masks[:, 0]:
        rows = torch.nonzero(m.any(dim=1))[:, 0]
        cols = torch.nonzero(m.any(dim=0))[:, 0]
        if len(rows) == 0:
            windows.append(MaskWindow(0, 0, m[:0, :0].clone()))
            continue
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        windows.append(MaskWindow(x0, y0, m[y0:y1, x0:x1].clone()))
    return windows


# ------------------------------------------------------------------------ masks

def window_to_rle(window: MaskWindow, height: int, width: int) -> dict:
    """A binary mask window of an H x W image -> COCO RLE {"size": [H, W], "counts": str},
    equal to pycocotools' encode of the full mask, computed from the window alone (the
    full mask is never built: memory follows the box, not the image)."""
    x0, y0, mask = window
    mask = mask.to(torch.bool)
    h, w = mask.shape
    if mask.numel() == 0 or not bool(mask.any()):
        runs = [height * width]
    else:
        # column-major order, as COCO RLE: pixel (y, x) is at x * H + y
        cols = torch.nn.functional.pad(mask.t().to(torch.int8), (1, 1))    # [w, h + 2]
        change = torch.nonzero(cols[:, 1:] != cols[:, :-1])               # (col, row)
        pos = (change[:, 0] + x0) * height + change[:, 1] + y0
        starts, ends = pos[0::2], pos[1::2]
        # a run ending at the bottom of one column and going on at the top of the next
        # is one run: drop such end / start pairs
        joined = ends[:-1] == starts[1:]
        starts = torch.cat((starts[:1], starts[1:][~joined]))
        ends = torch.cat((ends[:-1][~joined], ends[-1:]))
        edges = torch.stack((starts, ends), 1).flatten()
        bounds = torch.cat((edges.new_zeros(1), edges, edges.new_full((1,), height * width)))
        runs = bounds.diff().tolist()
        if runs[-1] == 0:          # the mask reaches the last pixel: no closing zeros
            runs.pop()
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def windows_to_dense(windows: Sequence[MaskWindow], height: int, width: int) -> Tensor:
    """Binary windows -> Tensor[D, H, W] bool."""
    out = torch.zeros((len(windows), height, width), dtype=torch.bool)
    for d, (x0, y0, mask) in enumerate(windows):
        out[d, y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = mask
    return out


def _binary(windows: Sequence[MaskWindow], threshold: float) -> list[MaskWindow]:
    return [MaskWindow(x0, y0, m >= threshold) for x0, y0, m in windows]


# ------------------------------------------------------------------------ predictor

class Predictor:
    """A model ready for volumes of images. See the module docstring for the results.

    Args:
        model_or_weights: a MaskRCNN, a training checkpoint, an exported weights file,
            "coco" / a zoo name, or an exported .onnx file (runtime onnxruntime/openvino).
        batch_size: images per model call (torch runtime; the exported graphs take one).
        device: torch device of the torch runtime.
        runtime: "torch", "onnxruntime" or "openvino" (the last two: an .onnx file, or
            any of the above exported to a temporary .onnx first).
        tile: None, or a tile side (int or (h, w)) in pixels: images larger than a tile
            run as overlapping tiles (engine.tiling), memory bounded by the tile.
        tile_overlap: fraction of the tile shared by neighbouring tiles, in [0, 1).
        mask_format: "rle", "crop" or "dense".
        mask_threshold: mask probability >= this is foreground.
        workers: decoding threads ahead of the model in run(), plus one writing thread
            (0: decode, predict and write one image after the other in the caller's
            thread).
        threads: intra-op threads of ONNX Runtime / OpenVINO (None: their default).
        overrides: config keys for a model built from weights (e.g. box_score_thresh).
    """

    def __init__(self, model_or_weights, batch_size: int = 1, device="cpu",
                 runtime: str = "torch", tile=None, tile_overlap: float = 0.2,
                 mask_format: str = "rle", mask_threshold: float = 0.5, workers: int = 2,
                 threads: Optional[int] = None, overrides: Optional[dict] = None):
        _check_choice("runtime", runtime, RUNTIMES)
        _check_choice("mask_format", mask_format, MASK_FORMATS)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(workers) < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if not 0.0 <= float(tile_overlap) < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self.batch_size, self.workers = int(batch_size), int(workers)
        self.mask_format = mask_format
        self.mask_threshold = float(mask_threshold)
        self.tile, self.tile_overlap = tile, float(tile_overlap)
        self.failures: list[tuple[str, str]] = []
        self.count = 0
        self.runtime, meta = _build_runtime(model_or_weights, runtime, device, threads,
                                            overrides or {})
        self.class_names, self.cat_ids = meta["class_names"], meta["cat_ids"]
        self.nms_threshold = meta.get("nms_threshold", 0.5)

    # -------------------------------------------------------------- images in memory

    def __call__(self, images: Sequence[Tensor]) -> list[dict]:
        """images: RGB Tensor[3, H, W] each, float in [0, 1] or uint8. Returns one
        result dict per image, in order."""
        if isinstance(images, Tensor):
            raise TypeError("Predictor takes a list of Tensor[3, H, W] images (a batch "
                            "tensor: list(batch))")
        return [self._result(det, _size(img)) for det, img in
                zip(self._detect_images(list(images)), images)]

    def _detect_images(self, images: list[Tensor]) -> list[dict]:
        """Binary-window detections of images (tiled when they exceed the tile)."""
        if self.tile is not None:
            return [self._detect_tiled(img) for img in images]
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [to_float(img) for img in images[start:start + self.batch_size]]
            out += self._detect_batch(chunk)
        return out

    def _detect_batch(self, images: list[Tensor]) -> list[dict]:
        detections = self.runtime.detect(images)
        for det in detections:
            if "windows" in det:
                det["windows"] = _binary(det["windows"], self.mask_threshold)
        return detections

    def _detect_tiled(self, image: Tensor) -> dict:
        from engine.tiling import predict_tiled
        return predict_tiled(self._detect_batch, image, self.tile, self.tile_overlap,
                             self.batch_size, self.nms_threshold)

    def _result(self, det: dict, size: tuple[int, int]) -> dict:
        labels = det["labels"]
        result = dict(boxes=det["boxes"], labels=labels, scores=det["scores"],
                      category_names=[self._name(int(l)) for l in labels],
                      image_size=size)
        windows = det.get("windows")
        if windows is not None:
            result["masks"] = self._masks(windows, *size)
        return result

    def _name(self, label: int) -> str:
        return self.class_names[label - 1] if 1 <= label <= len(self.class_names) \
            else str(label)

    def _masks(self, windows: list[MaskWindow], height: int, width: int):
        if self.mask_format == "crop":
            return windows
        if self.mask_format == "dense":
            return windows_to_dense(windows, height, width)
        return [window_to_rle(w, height, width) for w in windows]

    # -------------------------------------------------------------- files

    def run(self, source, writers: Iterable = (), progress: bool = False
            ) -> Iterator[dict]:
        """Results for every image and video frame a source names (a file, folder, glob
        or list of them; videos by suffix, engine.video), in input order, each with
        image_id (1-based position in that order), file_name, and frame (the index in its
        video) for video frames. Unreadable images and videos are skipped with a
        SkippedImageWarning (see self.failures). `writers` (CocoResultsWriter,
        OverlayWriter, JsonlResultsWriter, VideoResultsWriter) get every result with its
        image in a background thread and are closed at the end.
        """
        files = collect_inputs(source, VIDEO_SUFFIXES)
        self.failures, self.count = [], 0
        bar = _progress_bar(_frame_count(files)) if progress else None
        sink = _WriterThread(list(writers), threaded=self.workers > 0)
        try:
            for batch in self._decoded_batches(files, bar):
                images = [item[-1] for item in batch]
                for (image_id, path, frame, image), det in zip(batch,
                                                               self._detect_images(images)):
                    result = self._result(det, _size(image))
                    result.update(image_id=image_id, file_name=str(path))
                    if frame is not None:
                        result["frame"] = frame
                    sink.put(result, image)
                    self.count += 1
                    yield result
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
            sink.close()

    def _decoded_batches(self, files: list[Path], bar) -> Iterator[list]:
        """Batches of (image_id, path, frame, image), decoded ahead of the model."""
        batch = []
        for item in self._decoded(files):
            if item[-1] is None:
                if bar is not None:
                    bar.update(1)
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _decoded(self, files: list[Path]) -> Iterator[tuple]:
        """(image_id, path, frame index or None, image or None when unreadable), in
        input order: images decoded by `workers` threads up to a few batches ahead,
        video frames as the video decodes them."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode") \
            if self.workers else None
        ahead = max(2 * self.batch_size, self.workers)
        pending: deque = deque()
        image_id = 0
        try:
            for path in files:
                if is_video(path):
                    while pending:                      # images before it come first
                        yield _resolved(pending.popleft())
                    for frame, image in self._frames(path):
                        image_id += 1
                        yield image_id, path, frame, image
                    continue
                image_id += 1
                job = pool.submit(self._decode, path) if pool else self._decode(path)
                pending.append((image_id, path, None, job))
                if len(pending) >= ahead:
                    yield _resolved(pending.popleft())
            while pending:
                yield _resolved(pending.popleft())
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def _frames(self, path: Path) -> Iterator[tuple[int, Tensor]]:
        """A video's (frame index, Tensor[3, H, W] uint8); a video that cannot be read
        (or stops decoding) is a failure like an unreadable image."""
        try:
            with VideoReader(path) as reader:
                yield from reader
        except VideoError as err:
            self._skip(path, f"unreadable video: {str(err).split(': ', 1)[-1]}")

    def _decode(self, path: Path) -> Optional[Tensor]:
        try:
            return decode_image_file(path)
        except ImageError as err:
            self._skip(path, err.reason)
            return None

    def _skip(self, path: Path, reason: str) -> None:
        """A bad input: one warning naming it, and (path, reason) for the summary."""
        self.failures.append((str(path), reason))
        warnings.warn(f"skipped {path} ({reason})", SkippedImageWarning, stacklevel=3)

    def summary(self) -> str:
        """One line on the last run: images predicted, and the skipped ones with why."""
        line = f"predicted {self.count} image{'s' * (self.count != 1)}"
        if self.failures:
            skipped = "; ".join(f"{p} ({why})" for p, why in self.failures)
            line += f"; skipped {len(self.failures)} unreadable: {skipped}"
        return line


def _resolved(item: tuple) -> tuple:
    """A pending (image_id, path, frame, Future or image) with its image."""
    *head, job = item
    return (*head, job.result() if hasattr(job, "result") else job)


def _frame_count(files: list[Path]) -> Optional[int]:
    """Images plus the frames the videos state (None when a video states none)."""
    total = 0
    for path in files:
        if not is_video(path):
            total += 1
            continue
        try:
            with VideoReader(path) as reader:
                if reader.frames is None:
                    return None
                total += reader.frames
        except (VideoError, ImportError):
            total += 1
    return total


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _size(image: Tensor) -> tuple[int, int]:
    return int(image.shape[-2]), int(image.shape[-1])


def _progress_bar(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="predict", unit="img", dynamic_ncols=True)


def _build_runtime(model_or_weights, runtime: str, device, threads, overrides: dict):
    """(runtime object, meta with class_names, cat_ids, nms_threshold)."""
    source = model_or_weights
    if runtime != "torch" and not isinstance(source, nn.Module) \
            and str(source).endswith(".onnx"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        return ExportedRuntime(path, runtime, threads), _onnx_meta(path)
    if isinstance(source, (str, Path)) and str(source).endswith(".onnx"):
        raise ValueError(f"{source}: an exported ONNX file runs with runtime='onnxruntime' "
                         f"or 'openvino', not 'torch'")
    if isinstance(source, nn.Module):
        model, meta = source, _model_categories(source)
    else:
        if not is_zoo_name(source) and not Path(source).is_file():
            raise FileNotFoundError(f"weights file not found: {source} (a checkpoint, an "
                                    f"exported weights file, 'coco' or a zoo name)")
        model, meta = load_model(source, device if runtime == "torch" else "cpu", overrides)
    meta["nms_threshold"] = float(model.roi_heads.box_nms_thresh)
    if runtime == "torch":
        return TorchRuntime(model.to(device), device), meta
    path = _export_to_temp(model, meta)
    return ExportedRuntime(path, runtime, threads), meta


_META_KEY = "maskrcnn.categories"


def _export_to_temp(model: nn.Module, meta: dict) -> Path:
    """The model as an .onnx file in a temporary folder (removed at exit)."""
    import atexit
    import shutil
    from deploy import export_onnx
    folder = Path(tempfile.mkdtemp(prefix="maskrcnn-onnx-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    # exported from a CPU copy: the caller's model stays on its device
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    path = export_onnx(model if on_cpu else copy.deepcopy(model).cpu(), folder / "model.onnx")
    write_onnx_categories(path, meta["class_names"], meta["cat_ids"])
    return path


def write_onnx_categories(path: Path, class_names: Sequence[str],
                          cat_ids: Sequence[int]) -> None:
    """Store the class names and ids in an .onnx file's metadata, for Predictor."""
    import onnx
    model = onnx.load(str(path))
    for prop in list(model.metadata_props):
        if prop.key == _META_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = _META_KEY, json.dumps(
        {"class_names": list(class_names), "cat_ids": [int(c) for c in cat_ids]})
    onnx.save(model, str(path))


def _onnx_meta(path: Path) -> dict:
    """class_names / cat_ids stored by write_onnx_categories, else the label numbers."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == _META_KEY:
            return json.loads(prop.value)
    # K is not in the graph: labels are named by their number, cat_ids are the labels
    return dict(class_names=[], cat_ids=[])


# ------------------------------------------------------------------------ writers

class _WriterThread:
    """Runs writers on (result, image) pairs in one background thread, so drawing and
    encoding overlap the model. A writer's exception is raised again at close()."""

    def __init__(self, writers: list, threaded: bool = True):
        self.writers = writers
        self.error: Optional[BaseException] = None
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.thread = None
        if writers and threaded:
            self.thread = threading.Thread(target=self._loop, name="writers", daemon=True)
            self.thread.start()

    def put(self, result: dict, image: Tensor) -> None:
        if self.thread is None:             # workers=0: everything in the caller's thread
            for writer in self.writers:
                writer.write(result, image)
            return
        if self.error is not None:
            raise self.error
        self.queue.put((result, image))

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    for writer in self.writers:
                        writer.write(*item)
                except BaseException as err:      # re-raised in the caller's thread
                    self.error = err

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        errors = [self.error]
        for writer in self.writers:
            try:
                writer.close()
            except BaseException as err:
                errors.append(err)
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise error


class CocoResultsWriter:
    """Every detection in the COCO results format, written to `path` at close():
    image_id (the result's), category_id (cat_ids[label - 1]), bbox [x, y, w, h], score,
    segmentation (RLE), and the image's file_name."""

    def __init__(self, path: Union[str, Path], cat_ids: Sequence[int]):
        self.path, self.cat_ids, self.records = Path(path), list(cat_ids), []

    def write(self, result: dict, image: Tensor) -> None:
        det = result
        if "masks" in result:
            det = dict(result, masks=_as_rle(result["masks"], *result["image_size"]))
        for record in detections_to_coco(det, result["image_id"], self.cat_ids):
            record["file_name"] = result["file_name"]
            self.records.append(record)

    def close(self) -> None:
        write_coco(self.records, self.path)


class JsonlResultsWriter:
    """One JSON line per image or video frame (result_to_json), flushed as written: a
    stream can be followed with `tail -f`, and a crash keeps every line written."""

    def __init__(self, path: Union[str, Path]):
        self.lines = JsonlWriter(path)
        self.path = self.lines.path

    def write(self, result: dict, image: Tensor) -> None:
        self.lines.write(result_to_json(result))

    def close(self) -> None:
        self.lines.close()


class VideoResultsWriter:
    """For each input video: <folder>/<video stem>.mp4, its frames with the detections
    scoring >= score_threshold drawn, and <folder>/<video stem>.jsonl, one line per frame
    (result_to_json). Results of still images are left to the other writers.
    (<stem>_annotated.* when the output would replace the input video.)"""

    def __init__(self, folder: Union[str, Path], class_names: Sequence[str],
                 score_threshold: float = 0.5):
        self.folder, self.class_names = Path(folder), list(class_names)
        self.score_threshold = float(score_threshold)
        self.source: Optional[str] = None
        self.video = self.lines = None
        self.written: list[Path] = []

    def write(self, result: dict, image: Tensor) -> None:
        if "frame" not in result:
            return
        if result["file_name"] != self.source:
            self._finish()
            self._start(Path(result["file_name"]), image)
        self.video.write(draw_frame(image, result, self.class_names, self.score_threshold))
        self.lines.write(result_to_json(result))

    def _start(self, source: Path, image: Tensor) -> None:
        stem = source.stem
        if (self.folder / f"{stem}.mp4").resolve() == source.resolve():
            stem += "_annotated"
        with VideoReader(source) as reader:
            fps = reader.fps
        self.source = str(source)
        self.video = VideoWriter(self.folder / f"{stem}.mp4", fps, image.shape[-1],
                                 image.shape[-2])
        self.lines = JsonlWriter(self.folder / f"{stem}.jsonl")
        self.written += [self.video.path, self.lines.path]

    def _finish(self) -> None:
        if self.video is not None:
            self.video.close()
            self.lines.close()
            self.video = self.lines = None

    def close(self) -> None:
        self._finish()


def result_to_json(result: dict) -> dict:
    """A result as plain JSON values: boxes [[x1, y1, x2, y2]], labels, scores,
    category_names, image_size, masks as COCO RLE, and file_name / frame / image_id."""
    out = {k: result[k] for k in ("file_name", "frame", "image_id") if k in result}
    out.update(image_size=list(result["image_size"]),
               boxes=[[round(v, 3) for v in box] for box in result["boxes"].tolist()],
               labels=result["labels"].tolist(),
               scores=[round(v, 5) for v in result["scores"].tolist()],
               category_names=list(result["category_names"]))
    if "masks" in result:
        out["masks"] = _as_rle(result["masks"], *result["image_size"])
    return out


def _as_rle(masks, height: int, width: int) -> list[dict]:
    """Masks of any mask_format as COCO RLE dicts."""
    if isinstance(masks, Tensor):
        return [window_to_rle(MaskWindow(0, 0, m), height, width) for m in masks]
    return [m if isinstance(m, dict) else window_to_rle(m, height, width) for m in masks]


class OverlayWriter:
    """<folder>/<image stem>.png per image: masks, boxes, class names and scores of the
    detections scoring >= score_threshold (two inputs with one stem: a.png, a_1.png)."""

    def __init__(self, folder: Union[str, Path], class_names: Sequence[str],
                 score_threshold: float = 0.5):
        self.folder, self.class_names = Path(folder), list(class_names)
        self.score_threshold = float(score_threshold)
        self.stems: dict[str, int] = {}

    def write(self, result: dict, image: Tensor) -> None:
        if "frame" in result:                 # video frames: VideoResultsWriter
            return
        stem = Path(result["file_name"]).stem
        n = self.stems.get(stem, 0)
        self.stems[stem] = n + 1
        name = stem if n == 0 else f"{stem}_{n}"
        # zlib level 1: a 1600 x 1200 overlay saves in ~30 ms instead of ~130 ms (level 6,
        # Pillow's default) for files ~1.5x larger; these are pictures to look at
        overlay_image(to_float(image), result, self.class_names,
                      self.score_threshold).save(self.folder / f"{name}.png",
                                                 compress_level=1)

    def close(self) -> None:
        pass


def overlay_image(image: Tensor, result: dict, class_names: Sequence[str],
                  score_threshold: float = 0.5):
    """tools.visualize.draw_detections of a result in any mask format: only the drawn
    detections' masks are made dense."""
    keep = torch.nonzero(result["scores"] >= score_threshold)[:, 0]
    det = {k: result[k][keep] for k in ("boxes", "labels", "scores")}
    masks = result.get("masks")
    if masks is not None:
        h, w = result["image_size"]
        det["masks"] = _dense_subset(masks, keep.tolist(), h, w)[:, None]
    return draw_detections(image, det, class_names, score_threshold)


def _dense_subset(masks, keep: list[int], height: int, width: int) -> Tensor:
    if isinstance(masks, Tensor):
        return masks[keep].float()
    picked = [masks[i] for i in keep]
    if not picked:
        return torch.zeros((0, height, width))
    if isinstance(picked[0], dict):
        dense = mask_utils.decode(picked)                    # [H, W, n] uint8
        return torch.from_numpy(np.ascontiguousarray(dense.transpose(2, 0, 1))).float()
    return windows_to_dense(picked, height, width).float()


# ------------------------------------------------------------------------ one call

def predict(model, paths: Sequence[Union[str, Path]], out_dir, class_names: Sequence[str],
            cat_ids: Sequence[int], score_threshold: float = 0.5,
            mask_threshold: float = 0.5, device="cpu", progress: bool = True) -> Path:
    """Overlay PNGs and results.json (COCO results with file_name) for every image;
    returns the JSON's path. (A Predictor run with the two writers.)"""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model, device=device, mask_threshold=mask_threshold)
    predictor.class_names, predictor.cat_ids = list(class_names), list(cat_ids)
    writers = [CocoResultsWriter(out_dir / "results.json", cat_ids),
               OverlayWriter(out_dir, class_names, score_threshold)]
    for _ in predictor.run(paths, writers, progress=progress):
        pass
    return out_dir / "results.json"
