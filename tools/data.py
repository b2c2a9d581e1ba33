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
- Image-level problems (missing or unreadable file, an RLE or a file whose size differs
  from the JSON's width/height) raise an error naming the file with on_error="raise"
  (default). With on_error="skip" they are logged and the sample is replaced by the next
  readable image in dataset order, so a run stays deterministic.
- Images are converted to RGB float32 in [0, 1]: grayscale is repeated over the channels,
  alpha is dropped, palettes are expanded, and 16-bit images are scaled by 1/65535.

Determinism: `build_loader` yields, with every index, a per-sample seed derived from
(seed, epoch, position in the epoch), and the dataset draws its flip from that seed. The
batches are thus the same for any num_workers, and a resumed run reproduces an epoch's
order exactly (`loader.sampler.set_epoch(epoch, start_batch=k)` skips k batches without
loading them). Indexing the dataset with a plain int draws the flip from torch's global
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
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# Pillow modes holding 16-bit samples. Pillow < 10 opened 16-bit PNGs as 32-bit "I"; PNG
# and most image files have no real 32-bit integer format, so "I" is read as 16-bit too.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ON_ERROR = ("raise", "skip")


class ImageError(ValueError):
    """A sample's image cannot be used (missing, unreadable, or of the wrong size)."""


# ----------------------------------------------------------------------------- images

def load_rgb(path: PathLike) -> Tensor:
    """Reads an image file as Tensor[3, H, W] float32 RGB in [0, 1].

    Grayscale is repeated over the channels, alpha dropped, palettes expanded; 16-bit
    images are scaled by 1/65535 and 8-bit ones by 1/255. Raises ImageError naming the
    path when the file is missing, unreadable or of an unsupported mode."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist (check the image directory and "
                         f"the JSON's file_name)")
    try:
        with Image.open(path) as img:
            if _is_16bit_color_png(img):
                return _load_16bit_png(path)
            img.load()
            array = _to_rgb_array(img, path)
    except (UnidentifiedImageError, OSError, SyntaxError, RuntimeError) as exc:
        raise ImageError(f"image file {path} cannot be read: {exc}") from exc
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
                         f"is unknown; convert it to 8- or 16-bit")
    if img.mode != "RGB":
        img = img.convert("RGB")    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1
    return np.asarray(img, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- dataset

class CocoInstances(Dataset):
    """A COCO instances JSON plus its image directory.

    Args:
        json_path: COCO instances annotation file.
        image_dir: directory the images' `file_name`s are relative to.
        train: training set: skip_empty and flip_prob apply.
        skip_empty: with train=True, drop images without a usable (non-crowd, non-empty
            box) annotation. Evaluation (train=False) keeps every image.
        flip_prob: with train=True, probability of a horizontal flip of each sample.
        on_error: "raise" (default) or "skip" for unusable images (see the module doc).
        min_mask_box_iou: below this IoU between the box and the mask's tight box, the
            mask's box is used.

    `dataset[i]` -> (image Tensor[3, H, W] float32 in [0, 1], target dict(
        boxes Tensor[M, 4] float32 (x1, y1, x2, y2) pixels, labels Tensor[M] int64 in 1..K,
        masks Tensor[M, H, W] uint8, image_id int (the COCO image id))).

    Attributes: coco (pycocotools COCO), ids (COCO image ids in dataset order), cat_ids
    (COCO category ids, sorted; label l <-> cat_ids[l - 1]), class_names (same order),
    num_classes (K).
    """

    def __init__(self, json_path: PathLike, image_dir: PathLike, train: bool = False,
                 skip_empty: bool = True, flip_prob: float = 0.0, on_error: str = "raise",
                 min_mask_box_iou: float = 0.5):
        if on_error not in _ON_ERROR:
            raise ValueError(f"CocoInstances: on_error={on_error!r}; use one of {_ON_ERROR}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"CocoInstances: flip_prob={flip_prob} must be in [0, 1]")
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        self.train = train
        self.skip_empty = skip_empty
        self.flip_prob = float(flip_prob)
        self.on_error = on_error
        self.min_mask_box_iou = float(min_mask_box_iou)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"CocoInstances: image directory {self.image_dir} does "
                                    f"not exist (for {self.json_path})")

        self.coco = _load_coco(self.json_path)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c))
                                       for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self._label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        _validate(self.coco, self.json_path)

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
        if self.train and self.flip_prob > 0 and _draw(seed) < self.flip_prob:
            image, target = hflip(image, target)
        return image, target

    # --------------------------------------------------------------- loading

    def _anns(self, image_id: int) -> list[dict]:
        return self.coco.imgToAnns.get(image_id, [])

    def _usable(self, ann: dict) -> bool:
        """Non-crowd with a non-empty clipped box (masks are checked at load time)."""
        if ann.get("iscrowd", 0):
            return False
        info = self.coco.imgs[ann["image_id"]]
        box = _xywh_to_clipped_xyxy(ann["bbox"], info["width"], info["height"])
        return box[2] > box[0] and box[3] > box[1]

    def _load(self, image_id: int) -> tuple[Tensor, dict]:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        height, width = info["height"], info["width"]
        image = load_rgb(path)
        if tuple(image.shape[1:]) != (height, width):
            raise ImageError(f"image file {path} is {image.shape[2]}x{image.shape[1]} "
                             f"(width x height) but {self.json_path} says {width}x{height} "
                             f"for image id {image_id}")
        boxes, labels, masks = [], [], []
        for ann in self._anns(image_id):
            if ann.get("iscrowd", 0):
                continue
            instance = self._instance(ann, path, height, width)
            if instance is not None:
                boxes.append(instance[0])
                labels.append(self._label_of[ann["category_id"]])
                masks.append(instance[1])
        target = dict(
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(labels, dtype=torch.int64),
            masks=(torch.from_numpy(np.stack(masks)) if masks
                   else torch.zeros((0, height, width), dtype=torch.uint8)),
            image_id=int(image_id),
        )
        return image, target

    def _instance(self, ann: dict, path: Path, height: int, width: int
                  ) -> Optional[tuple[list[float], np.ndarray]]:
        """(box [x1, y1, x2, y2], mask uint8[H, W]) of one non-crowd annotation, or None
        when it is dropped (logged)."""
        box = _xywh_to_clipped_xyxy(ann["bbox"], width, height)
        if not (box[2] > box[0] and box[3] > box[1]):
            self._note(ann, path, f"box {ann['bbox']} (x, y, w, h) is empty after clipping "
                                  f"to the {width}x{height} image; instance dropped")
            return None
        mask = self._mask(ann, path, height, width)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            self._note(ann, path, "mask is empty for a non-empty box; instance dropped")
            return None
        mask_box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        if _iou(box, mask_box) < self.min_mask_box_iou:
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
                                 f"[{height}, {width}] in {self.json_path}")
            rle = (mask_utils.frPyObjects(segm, height, width)
                   if isinstance(segm["counts"], list) else segm)
        else:
            polygons = [p for p in segm if len(p) >= 6]   # < 3 points cannot be drawn
            if not polygons:
                return np.zeros((height, width), dtype=np.uint8)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)

    def _note(self, ann: dict, path: Path, message: str) -> None:
        key = (ann.get("id"), message)
        if key not in self._logged:
            self._logged.add(key)
            logger.warning("%s, annotation %s: %s", path, ann.get("id"), message)


def _load_coco(json_path: Path) -> COCO:
    if not json_path.is_file():
        raise FileNotFoundError(f"CocoInstances: annotation file {json_path} does not exist")
    try:
        with open(json_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"CocoInstances: {json_path} is not valid JSON: {exc}") from exc
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"CocoInstances: {json_path} lacks {missing}; a COCO instances "
                         f"file has images, annotations and categories")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
        coco.createIndex()
    return coco


def _validate(coco: COCO, json_path: Path) -> None:
    """Clear errors for JSON content the loader cannot interpret."""
    for image_id, info in coco.imgs.items():
        for key in ("file_name", "width", "height"):
            if key not in info:
                raise ValueError(f"CocoInstances: image {image_id} in {json_path} has no "
                                 f"{key!r}")
    for ann in coco.anns.values():
        where = f"annotation {ann.get('id')} in {json_path}"
        if ann.get("image_id") not in coco.imgs:
            raise ValueError(f"CocoInstances: {where} refers to image {ann.get('image_id')}, "
                             f"which is not in 'images'")
        if ann.get("category_id") not in coco.cats:
            raise ValueError(f"CocoInstances: {where} has category_id "
                             f"{ann.get('category_id')}, not in 'categories' "
                             f"{sorted(coco.cats)}")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"CocoInstances: {where} has bbox {bbox!r}; expected "
                             f"[x, y, width, height] of 4 finite numbers")


def _xywh_to_clipped_xyxy(bbox: Sequence[float], width: int, height: int) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw(seed: Optional[int]) -> float:
    """A uniform [0, 1) number from the sample seed, or from torch's global RNG."""
    if seed is None:
        return float(torch.rand(()))
    return float(torch.rand((), generator=torch.Generator().manual_seed(seed)))


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Horizontal flip of image Tensor[3, H, W] and its target's boxes and masks."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1],
                                   width - boxes[:, 0], boxes[:, 3]], dim=1)
    target["masks"] = _flip_last(target["masks"])
    return _flip_last(image), target


def _flip_last(x: Tensor) -> Tensor:
    # numpy's copy is single-threaded: torch.flip's intra-op threads made a 128x128 flip
    # take ~10 ms instead of ~0.05 ms on 2 busy cores (data loading in the main process)
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
