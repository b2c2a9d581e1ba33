"""COCO-format instance segmentation data: a dataset, its collate function and a loader.

Shape letters: M GT instances of an image, H/W the image size, K object classes.

    dataset = CocoInstances("instances_train2017.json", "train2017", train=True, flip_prob=0.5)
    loader = build_loader(dataset, batch_size=4, shuffle=True, num_workers=2, seed=0)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, targets in loader:   # list[Tensor[3, H, W]], list[dict]
            losses = model(images, targets)

Policies (what happens to imperfect data; every drop or repair is logged once per
annotation with the image file and the annotation id):
- Crowd annotations (iscrowd=1) are not training targets, as in torchvision and detectron2;
  pycocotools evaluation still reads them from the JSON.
- Boxes are the COCO `bbox` [x, y, w, h] -> (x1, y1, x2, y2), clipped to the image. A box that
  is empty after clipping (zero or negative width/height, or outside the image) is dropped.
- Masks come from `segmentation` (polygons, compressed or uncompressed RLE) through
  pycocotools. An instance whose mask is empty is dropped (it would teach the mask head
  to predict nothing). When the box and the mask's tight box overlap with IoU below
  `min_mask_box_iou`, the mask is trusted: the box is replaced by the mask's box.
- Box-only instances: an annotation without a segmentation (no key, null or [], as
  box-only exporters write) is kept with its box and label, an all-zero mask and
  `mask_valid` False. A box-only detector (mask_on = false) trains on such data as it is;
  a Mask R-CNN trains its RPN and box head on every instance and its mask head only on
  the instances with `mask_valid` True.
- JSON content the loader cannot interpret (entries without an id, images without
  file_name / width / height, annotations of unlisted images or categories, malformed
  bboxes) raises engine.check.DataCheckError (a ValueError) at construction, naming the
  first problem; `maskrcnn check-data` reports them all, with the other checks.
- Image-level problems (missing or unreadable file, an RLE or a file whose size differs
  from the JSON's width/height) raise an error naming the file with on_error="raise"
  (default). With on_error="skip" they are logged and the sample is replaced by the next
  readable image in dataset order, so a run stays deterministic.
- Images are converted to RGB float32 in [0, 1]: grayscale is repeated over the channels,
  alpha is dropped, palettes are expanded, and 16-bit images are scaled by 1/65535.

Large-scale jitter (lsj=True, training only; detectron2's LSJ recipe): see
`large_scale_jitter`. Every sample becomes lsj_size x lsj_size.

Determinism: `build_loader` yields, with every index, a per-sample seed derived from
(seed, epoch, position in the epoch), and the dataset draws its flip (first) and its
large-scale jitter (then) from that seed. The batches are thus the same for any
num_workers, and a resumed run reproduces an epoch's order exactly
(`loader.sampler.set_epoch(epoch, start_batch=k)` skips k batches without loading them).
Indexing the dataset with a plain int draws the flip and the jitter from torch's global
RNG instead (in a worker, the worker's seeded RNG).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.check import (MIN_MASK_BOX_IOU, DataCheckError, box_iou, json_errors,
                          missing_sections, segmentation_rle, xywh_to_clipped_xyxy)

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# Pillow modes holding 16-bit samples. Pillow < 10 opened 16-bit PNGs as 32-bit "I"; PNG
# and most image files have no real 32-bit integer format, so "I" is read as 16-bit too.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ON_ERROR = ("raise", "skip")


class ImageError(ValueError):
    """A sample's image cannot be used (missing, unreadable, or of the wrong size).

    Attributes: path (the image file, or None), reason (a few words for a summary line:
    "missing", "empty file", "not an image", "truncated", "unreadable", "float pixels",
    "640x480, JSON says 480x640"...).
    """

    def __init__(self, message: str, path: Optional[PathLike] = None,
                 reason: str = "unreadable"):
        super().__init__(message)
        self.path, self.reason = path, reason


def _read_failure(path: Path, exc: Exception) -> str:
    """The short reason a file Pillow failed on cannot be read."""
    with contextlib.suppress(OSError):       # gone meanwhile: the other reasons apply
        if path.stat().st_size == 0:
            return "empty file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    return "truncated" if "truncated" in str(exc).lower() else "unreadable"


# ----------------------------------------------------------------------------- images

def load_rgb(path: PathLike) -> Tensor:
    """Reads an image file as Tensor[3, H, W] float32 RGB in [0, 1].

    Grayscale is repeated over the channels, alpha dropped, palettes expanded; 16-bit
    images are scaled by 1/65535 and 8-bit ones by 1/255. Raises ImageError naming the
    path when the file is missing, unreadable or of an unsupported mode."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist (check the image directory and "
                         f"the JSON's file_name)", path, "missing")
    try:
        with Image.open(path) as img:
            if _is_16bit_color_png(img):
                return _load_16bit_png(path)
            img.load()
            array = _to_rgb_array(img, path)
    except (UnidentifiedImageError, OSError, SyntaxError, RuntimeError) as exc:
        raise ImageError(f"image file {path} cannot be read: {exc}", path,
                         _read_failure(path, exc)) from exc
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _is_16bit_color_png(img: Image.Image) -> bool:
    """Pillow keeps only the high byte of 16-bit RGB / RGBA / LA PNGs (it has no 16-bit
    colour mode); those are decoded by torchvision instead."""
    if img.format != "PNG" or img.mode in _SIXTEEN_BIT_MODES or not img.tile:
        return False
    return ";16" in str(img.tile[0][3])


def _load_16bit_png(path: Path) -> Tensor:
    from torchvision.io import decode_png, read_file
    pixels = decode_png(read_file(str(path))).to(torch.float32) / 65535.0   # [C, H, W]
    if pixels.shape[0] <= 2:           # gray (+ alpha)
        return pixels[:1].repeat(3, 1, 1)
    return pixels[:3].contiguous()


def _to_rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """float32[H, W, 3] in [0, 1] from an opened PIL image of any supported mode."""
    if img.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(img).astype(np.float32)
        gray = np.clip(gray, 0.0, 65535.0) / 65535.0
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise ImageError(f"image file {path} has 32-bit float pixels (mode F) whose range "
                         f"is unknown; convert it to 8- or 16-bit", path, "float pixels")
    if img.mode != "RGB":
        img = img.convert("RGB")    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1
    return np.asarray(img, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- dataset

class CocoInstances(Dataset):
    """A COCO instances JSON (or the same content as an in-memory dict, e.g. from
    `engine.formats.to_coco`) plus its image directory.

    Args:
        json_path: COCO instances annotation file, or its content as a dict (images,
            annotations, categories; messages then name its info["source"]).
        image_dir: directory the images' `file_name`s are relative to.
        train: training set: skip_empty and flip_prob apply.
        skip_empty: with train=True, drop images without a usable (non-crowd, non-empty
            box) annotation. Evaluation (train=False) keeps every image.
        flip_prob: with train=True, probability of a horizontal flip of each sample.
        on_error: "raise" (default) or "skip" for unusable images (see the module doc).
        min_mask_box_iou: below this IoU between the box and the mask's tight box, the
            mask's box is used.
        lsj: with train=True, large-scale jitter (`large_scale_jitter`) of each sample.
        lsj_scale: (min, max) of its random scale (detectron2's LSJ: 0.1, 2.0).
        lsj_size: the side of its square output (1024).

    `dataset[i]` -> (image Tensor[3, H, W] float32 in [0, 1], target dict(
        boxes Tensor[M, 4] float32 (x1, y1, x2, y2) pixels, labels Tensor[M] int64 in 1..K,
        masks Tensor[M, H, W] uint8, mask_valid Tensor[M] bool (False: the annotation has
        no segmentation, its mask is all zero and not a target), image_id int (the COCO
        image id))).

    Attributes: coco (pycocotools COCO), ids (COCO image ids in dataset order), cat_ids
    (COCO category ids, sorted; label l <-> cat_ids[l - 1]), class_names (same order),
    num_classes (K).
    """

    def __init__(self, json_path: Union[PathLike, dict], image_dir: PathLike,
                 train: bool = False,
                 skip_empty: bool = True, flip_prob: float = 0.0, on_error: str = "raise",
                 min_mask_box_iou: float = MIN_MASK_BOX_IOU, lsj: bool = False,
                 lsj_scale: Sequence[float] = (0.1, 2.0), lsj_size: int = 1024):
        if on_error not in _ON_ERROR:
            raise ValueError(f"CocoInstances: on_error={on_error!r}; use one of {_ON_ERROR}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"CocoInstances: flip_prob={flip_prob} must be in [0, 1]")
        lsj_scale = tuple(float(v) for v in lsj_scale)
        if len(lsj_scale) != 2 or not 0.0 < lsj_scale[0] <= lsj_scale[1]:
            raise ValueError(f"CocoInstances: lsj_scale={lsj_scale} must be (min, max) with "
                             f"0 < min <= max, e.g. (0.1, 2.0)")
        if int(lsj_size) < 1:
            raise ValueError(f"CocoInstances: lsj_size={lsj_size} must be >= 1")
        self.json_path = Path(_source_name(json_path) if isinstance(json_path, dict)
                              else json_path)
        self.image_dir = Path(image_dir)
        self.train = train
        self.skip_empty = skip_empty
        self.flip_prob = float(flip_prob)
        self.on_error = on_error
        self.min_mask_box_iou = float(min_mask_box_iou)
        self.lsj, self.lsj_scale, self.lsj_size = bool(lsj), lsj_scale, int(lsj_size)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"CocoInstances: image directory {self.image_dir} does "
                                    f"not exist (for {self.json_path})")

        self.coco = (_coco_from_dict(json_path, self.json_path)
                     if isinstance(json_path, dict) else _load_coco(self.json_path))
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c))
                                       for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self._label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        box_only = sum(1 for a in self.coco.anns.values()
                       if not a.get("iscrowd", 0) and not a.get("segmentation"))
        if box_only:
            logger.info("%s: %d of %d annotations have no segmentation: kept as box-only "
                        "instances (mask_valid False: no mask target)", self.json_path,
                        box_only, len(self.coco.anns))

        ids = sorted(self.coco.imgs)
        if train and skip_empty:
            ids = [i for i in ids if any(self._usable(a) for a in self._anns(i))]
        self.ids: list[int] = ids
        self._logged: set = set()   # notes already logged by this process

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"CocoInstances({str(self.json_path)!r}, images={len(self)}, "
                f"classes={self.num_classes}, train={self.train})")

    def __getitem__(self, index) -> tuple[Tensor, dict]:
        """index: int, or (int, sample_seed) as yielded by build_loader's sampler."""
        index, seed = (index if isinstance(index, tuple) else (index, None))
        if not -len(self) <= index < len(self):
            raise IndexError(f"CocoInstances: index {index} out of range for {len(self)} "
                             f"images")
        index %= len(self)
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                image, target = self._load(self.ids[i])
                break
            except ImageError as exc:
                if self.on_error == "raise":
                    raise
                if ("skip", self.ids[i]) not in self._logged:   # once per image, not per epoch
                    self._logged.add(("skip", self.ids[i]))
                    logger.warning("skipping image %d (%s); using the next image instead",
                                   self.ids[i], exc)
        else:
            raise RuntimeError(f"CocoInstances: no readable image in {self.json_path} "
                               f"(on_error='skip' skipped all {len(self)})")
        if self.train:
            rand = _uniforms(seed)
            if self.flip_prob > 0 and rand() < self.flip_prob:    # the seed's first draw
                image, target = hflip(image, target)
            if self.lsj:    # after the flip, as detectron2: the padding stays bottom-right
                image, target = large_scale_jitter(image, target, self.lsj_size,
                                                   self.lsj_scale, rand)
        return image, target

    # --------------------------------------------------------------- loading

    def _anns(self, image_id: int) -> list[dict]:
        return self.coco.imgToAnns.get(image_id, [])

    def _usable(self, ann: dict) -> bool:
        """Non-crowd with a non-empty clipped box (masks are checked at load time)."""
        if ann.get("iscrowd", 0):
            return False
        info = self.coco.imgs[ann["image_id"]]
        box = xywh_to_clipped_xyxy(ann["bbox"], info["width"], info["height"])
        return box[2] > box[0] and box[3] > box[1]

    def _load(self, image_id: int) -> tuple[Tensor, dict]:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        height, width = info["height"], info["width"]
        image = load_rgb(path)
        if tuple(image.shape[1:]) != (height, width):
            raise ImageError(f"image file {path} is {image.shape[2]}x{image.shape[1]} "
                             f"(width x height) but {self.json_path} says {width}x{height} "
                             f"for image id {image_id}", path,
                             f"{image.shape[2]}x{image.shape[1]}, JSON says {width}x{height}")
        boxes, labels, masks = [], [], []     # masks: uint8[H, W], or None (box only)
        for ann in self._anns(image_id):
            if ann.get("iscrowd", 0):
                continue
            instance = self._instance(ann, path, height, width)
            if instance is not None:
                boxes.append(instance[0])
                labels.append(self._label_of[ann["category_id"]])
                masks.append(instance[1])
        valid = [m is not None for m in masks]
        if all(valid) and masks:
            stacked = torch.from_numpy(np.stack(masks))
        else:
            stacked = torch.zeros((len(masks), height, width), dtype=torch.uint8)
            for k, mask in enumerate(masks):
                if mask is not None:
                    stacked[k] = torch.from_numpy(mask)
        target = dict(
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(labels, dtype=torch.int64),
            masks=stacked,
            mask_valid=torch.tensor(valid, dtype=torch.bool),
            image_id=int(image_id),
        )
        return image, target

    def _instance(self, ann: dict, path: Path, height: int, width: int
                  ) -> Optional[tuple[list[float], Optional[np.ndarray]]]:
        """(box [x1, y1, x2, y2], mask uint8[H, W] or None when the annotation has no
        segmentation) of one non-crowd annotation, or None when it is dropped (logged)."""
        box = xywh_to_clipped_xyxy(ann["bbox"], width, height)
        if not (box[2] > box[0] and box[3] > box[1]):
            self._note(ann, path, f"box {ann['bbox']} (x, y, w, h) is empty after clipping "
                                  f"to the {width}x{height} image; instance dropped")
            return None
        if not ann.get("segmentation"):       # no key, null, [] or {}: a box-only instance
            return box, None
        mask = self._mask(ann, path, height, width)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            self._note(ann, path, "mask is empty for a non-empty box; instance dropped")
            return None
        mask_box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        if box_iou(box, mask_box) < self.min_mask_box_iou:
            self._note(ann, path, f"box {[round(v, 1) for v in box]} disagrees with its "
                                  f"mask's box {mask_box} (IoU < {self.min_mask_box_iou}); "
                                  f"using the mask's box")
            box = mask_box
        return box, mask

    def _mask(self, ann: dict, path: Path, height: int, width: int) -> np.ndarray:
        segm = ann.get("segmentation")
        if not segm:
            return np.zeros((height, width), dtype=np.uint8)
        if isinstance(segm, dict):
            size = [int(v) for v in segm.get("size", ())]
            if size != [height, width]:
                raise ImageError(f"annotation {ann.get('id')} of image file {path} has an RLE "
                                 f"of size {size} (height, width) but the image is "
                                 f"[{height}, {width}] in {self.json_path}", path,
                                 f"RLE size of annotation {ann.get('id')}")
        rle = segmentation_rle(segm, height, width)
        if rle is None:
            return np.zeros((height, width), dtype=np.uint8)
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)

    def _note(self, ann: dict, path: Path, message: str) -> None:
        key = (ann.get("id"), message)
        if key not in self._logged:
            self._logged.add(key)
            logger.warning("%s, annotation %s: %s", path, ann.get("id"), message)


def read_coco_json(json_path: PathLike) -> dict:
    """The parsed COCO JSON file; FileNotFoundError / ValueError naming the file."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"CocoInstances: annotation file {json_path} does not exist")
    try:
        with open(json_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"CocoInstances: {json_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"CocoInstances: {json_path} holds a {type(data).__name__}, not a "
                         f"COCO object with images, annotations and categories")
    return data


def _load_coco(json_path: Path) -> COCO:
    return _coco_from_dict(read_coco_json(json_path), json_path)


def _source_name(data: dict) -> str:
    """What messages call an in-memory COCO dict: its info["source"] (the file or folder
    a reader of engine.formats made it from), else "<in-memory COCO dict>"."""
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    return str(info.get("source") or "<in-memory COCO dict>")


def _coco_from_dict(data: dict, json_path) -> COCO:
    """A pycocotools COCO indexing `data` (not copied), after the JSON checks of
    engine.check (before pycocotools indexes it: a missing id would be a bare KeyError
    there)."""
    errors = missing_sections(data) or json_errors(data)
    if errors:
        raise DataCheckError.of(errors, str(json_path), "CocoInstances")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
        coco.createIndex()
    return coco


def _uniforms(seed: Optional[int]) -> Callable[[], float]:
    """() -> successive uniform [0, 1) numbers from the sample seed's own generator, or
    from torch's global RNG when seed is None."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return lambda: float(torch.rand((), generator=generator))


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Horizontal flip of image Tensor[3, H, W] and its target's boxes and masks."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1],
                                   width - boxes[:, 0], boxes[:, 3]], dim=1)
    valid = target.get("mask_valid")
    if valid is None or bool(valid.any()):     # box-only targets' masks are all zero
        target["masks"] = _flip_last(target["masks"])
    return _flip_last(image), target


# Padding colour of the large-scale jitter: the ImageNet mean (RGB in [0, 1]), which the
# model's normalisation maps to 0 like its own batch padding (torchvision's LSJ recipe).
LSJ_FILL = (0.485, 0.456, 0.406)


def large_scale_jitter(image: Tensor, target: dict, size: int = 1024,
                       scale_range: Sequence[float] = (0.1, 2.0),
                       rand: Optional[Callable[[], float]] = None,
                       fill: Sequence[float] = LSJ_FILL) -> tuple[Tensor, dict]:
    """Large-scale jitter, detectron2's LSJ (ResizeScale + FixedSizeCrop), on
    torchvision.transforms.v2 tv_tensors so the image, boxes and masks move together.

    1. Resize (aspect ratio kept; bilinear with antialiasing, masks nearest) so the image
       fits a square of side size * s, s uniform in scale_range.
    2. Crop size x size at a random offset (where the resized image is larger) and pad
       the bottom / right to size x size (where it is smaller) with `fill`.
    Boxes are clipped to the crop. An instance with a mask (target["mask_valid"]; all,
    without that field) gets its transformed mask's tight box, as detectron2 recomputes
    boxes after a crop (a clipped box of a non-rectangular object overshoots it). An
    instance that vanishes (empty box; or empty mask, where it has one) is dropped from
    boxes, labels, masks and mask_valid alike; other fields are kept as they are.

    Args:
        image: Tensor[3, H, W] float in [0, 1]; target: dict(boxes Tensor[M, 4] x1y1x2y2,
            labels Tensor[M], masks Tensor[M, H, W] uint8, optional mask_valid Tensor[M]).
        rand: () -> uniform [0, 1): three draws, the scale then the crop's top and left
            (fractions of the room to move); default torch's global RNG.
    Returns:
        (Tensor[3, size, size], target of size x size).
    """
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF
    rand = rand or (lambda: float(torch.rand(())))
    height, width = image.shape[-2:]
    low, high = (float(v) for v in scale_range)
    scale = low + (high - low) * rand()
    factor = min(size * scale / height, size * scale / width)
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    crop_h, crop_w = min(size, new_h), min(size, new_w)
    top, left = round((new_h - crop_h) * rand()), round((new_w - crop_w) * rand())
    pad = [0, 0, size - crop_w, size - crop_h]               # left, top, right, bottom

    def geometry(x, fill_value):
        x = TF.resize(x, [new_h, new_w], antialias=True)
        return TF.pad(TF.crop(x, top, left, crop_h, crop_w), pad, fill=fill_value)

    out_image = geometry(tv_tensors.Image(image), list(fill)).as_subclass(Tensor)
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY",
                                     canvas_size=(height, width))
    boxes = geometry(boxes, 0).as_subclass(Tensor).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, crop_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, crop_h)
    masks = target["masks"]
    valid = target.get("mask_valid")
    has_mask = (torch.ones(len(masks), dtype=torch.bool, device=masks.device)
                if valid is None else valid.to(torch.bool))
    out_masks = masks.new_zeros((len(masks), size, size))
    keep = torch.ones_like(has_mask)
    if bool(has_mask.any()):                  # box-only instances' masks stay all zero
        out_masks[has_mask] = geometry(tv_tensors.Mask(masks[has_mask]), 0).as_subclass(Tensor)
        boxes[has_mask], keep[has_mask] = _mask_boxes(out_masks[has_mask])
    keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target = dict(target, boxes=boxes[keep], labels=target["labels"][keep],
                  masks=out_masks[keep])
    if valid is not None:
        target["mask_valid"] = valid[keep]
    return out_image, target


def _mask_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """(tight boxes Tensor[M, 4] float32 x1y1x2y2 of masks Tensor[M, H, W], nonempty
    Tensor[M] bool); an empty mask's box is all zero."""
    rows, cols = masks.amax(dim=2) > 0, masks.amax(dim=1) > 0   # bool [M, H], [M, W]
    (y1, y2), (x1, x2) = _first_last(rows), _first_last(cols)
    return torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32), rows.any(1)


def _first_last(hit: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of hit Tensor[M, L] bool: (first True index, last True index + 1); (0, 0)
    for a row without True."""
    index = torch.arange(hit.shape[1], device=hit.device)
    last = torch.where(hit, index + 1, 0).amax(1)
    first = torch.where(hit, index, hit.shape[1]).amin(1)
    return torch.minimum(first, last), last


def _flip_last(x: Tensor) -> Tensor:
    # numpy's copy is single-threaded: torch.flip's intra-op threads make a small flip
    # wait for busy cores (data loading runs in the main process)
    if x.device.type != "cpu":
        return x.flip(-1)
    return torch.from_numpy(np.ascontiguousarray(x.numpy()[..., ::-1]))


# ----------------------------------------------------------------------------- loading

def collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """[(image, target), ...] -> (list of images, list of targets): sizes differ per image."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets


class SeededSampler(Sampler):
    """Indices of one epoch, each with a per-sample seed, for one of `num_replicas` ranks.

    The epoch's order and seeds depend only on (seed, epoch): a permutation when shuffle
    is set (the identity otherwise), padded by wrapping (or cut, with drop_last) to a
    multiple of num_replicas, then every num_replicas-th entry from `rank`, as
    torch's DistributedSampler. `set_epoch(epoch, start_batch)` selects the epoch and skips
    its first start_batch * batch_size samples of this rank (resume).
    Yields (index, sample_seed) when `with_seeds`, plain indices otherwise.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = False, batch_size: int = 1,
                 with_seeds: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"SeededSampler: rank {rank} not in [0, {num_replicas})")
        self.size, self.shuffle, self.seed = size, shuffle, int(seed)
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.batch_size, self.with_seeds = batch_size, with_seeds
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start_batch) * self.batch_size

    def _per_replica(self) -> int:
        if self.drop_last:
            return self.size // self.num_replicas
        return math.ceil(self.size / self.num_replicas)

    def __len__(self) -> int:
        return max(0, self._per_replica() - self.start)

    def __iter__(self) -> Iterator:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 63)
        order = (torch.randperm(self.size, generator=g) if self.shuffle
                 else torch.arange(self.size))
        seeds = torch.randint(0, 2 ** 62, (self.size,), generator=g)
        total = self._per_replica() * self.num_replicas
        if total > self.size and self.size > 0:   # wrap-pad so every rank gets as many
            reps = math.ceil(total / self.size)
            order, seeds = order.repeat(reps), seeds.repeat(reps)
        # position p of the padded epoch gets seeds[p], so padded duplicates differ
        positions = list(range(self.rank, total, self.num_replicas))[self.start:]
        for p in positions:
            index = int(order[p])
            yield (index, int(seeds[p] + p // max(self.size, 1))) if self.with_seeds else index


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                 seed: int = 0, distributed: bool = False, drop_last: bool = False,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None
                 ) -> DataLoader:
    """A DataLoader of (list[Tensor[3, H, W]], list[target]) batches, reproducible from seed.

    `loader.sampler` is a SeededSampler: call `loader.sampler.set_epoch(epoch)` before each
    epoch (distributed or not) and `set_epoch(epoch, start_batch=k)` to resume after k
    batches. distributed=True shards by torch.distributed's rank and world size (or the
    explicit num_replicas / rank); as DistributedSampler, ranks are padded to equal length
    by repeating samples, so a distributed evaluation must de-duplicate by image_id.
    Workers' numpy and random are seeded from torch's
    per-worker seed, which is itself drawn from `seed`. Workers persist across epochs
    (no re-start cost); the order still comes from the sampler in the main process.
    """
    if batch_size < 1:
        raise ValueError(f"build_loader: batch_size={batch_size} must be >= 1")
    if distributed and (num_replicas is None or rank is None):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs an initialised "
                               "torch.distributed process group (or num_replicas and rank)")
        num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        rank = dist.get_rank() if rank is None else rank
    sampler = SeededSampler(len(dataset), shuffle, seed=seed,
                            num_replicas=num_replicas or 1, rank=rank or 0,
                            drop_last=drop_last and distributed, batch_size=batch_size,
                            with_seeds=isinstance(dataset, CocoInstances))
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate, drop_last=drop_last,
                      worker_init_fn=_seed_worker, generator=generator,
                      persistent_workers=num_workers > 0)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
