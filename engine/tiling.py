"""Detection on images of any size, one overlapping tile at a time.

    def detect(tiles):                      # float tiles -> detections in tile pixels
        return [dict(boxes=o["boxes"], labels=o["labels"], scores=o["scores"],
                     windows=dense_to_crops(o["masks"], 0.5)) for o in model(tiles)]

    result = predict_tiled(detect, image_uint8, tile=1024, overlap=0.2, batch_size=4)
    rles = [crop_to_rle(c, *image_uint8.shape[-2:]) for c in result["windows"]]

The image is cut into windows of `tile` pixels (`tile_windows`), overlapping by
`overlap` of a tile, the last row and column aligned to the image border. Tiles are cut
as views of the image and converted to float one batch at a time, and masks are kept as
`MaskCrop`s (a box-sized window), so memory follows the tile and the number of
detections, never the image area: an 8000x6000 image needs its own 144 MB (uint8) and
one batch of tiles.

Merging across tiles (`merge_tiles`). Each detection, shifted to image pixels, gets a
*margin*: the distance from its box to the nearest edge of its tile that lies inside the
image (edges on the image border do not count: nothing is cut there). A margin below
EDGE_TOLERANCE of the tile side marks a detection *cut* by its tile. Two detections of
the same class from two different tiles are the same object when their IoU exceeds
`iou_threshold`, or when one of them is cut and more than `iou_threshold` of its box
lies inside the other's box (IoU alone misses a cut object: half an object's box has an
IoU of 0.5 at best with the whole). Detections of one tile are never compared with each
other (the model's own NMS has done that). Then, greedily in order of priority (uncut
detections first, the largest margin first; cut ones after them, the highest score
first), a detection is kept unless an already kept one is the same object. So an object
is reported by the tile where it is most central, with that tile's box, score and mask
unchanged: an object entirely inside one tile gets exactly the box and score it gets when
that tile is run alone. An object larger than the overlap can be cut in every tile; its
parts overlap inside the tiles' common band, so it is usually still reported once, by its
best-scoring part (a part's box, not the whole object's): choose `overlap` * `tile` at
least the size of the largest object.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from engine.images import to_float
from engine.predict import dense_to_windows, window_to_rle
from tools.boxes import box_area
from tools.paste import MaskWindow

__all__ = ["MaskCrop", "crop_to_rle", "shift_crop", "dense_to_crops", "tile_windows",
           "predict_tiled", "merge_tiles", "EDGE_TOLERANCE"]

# A box closer than this fraction of the tile side (and at least 1 px) to an interior
# tile edge counts as cut by it: boxes are clipped to the tile, and the regression of a
# cut object's edge lands on the tile edge or a few pixels inside it.
EDGE_TOLERANCE = 0.02

Window = tuple[int, int, int, int]          # (y0, x0, y1, x1), pixels, end exclusive

# Where a detection holds its MaskCrops (as engine.Predictor's detections do).
MASK_KEY = "windows"


# The Predictor's mask window (tools.paste): pixel (y, x) of the full mask is
# mask[y - y0, x - x0] inside the window, background outside; x0, y0: int, mask:
# Tensor[h, w] bool. Here a window may reach past the image border (crop_to_rle clips).
MaskCrop = MaskWindow


def shift_crop(crop: MaskCrop, dx: int, dy: int) -> MaskCrop:
    """The same mask moved by (dx, dy) pixels (tile to image coordinates)."""
    return MaskCrop(crop.x0 + int(dx), crop.y0 + int(dy), crop.mask)


def _clip_crop(crop: MaskCrop, height: int, width: int) -> MaskCrop:
    """The part of `crop` inside a height x width image (an empty mask if none is)."""
    h, w = crop.mask.shape
    x0, y0 = max(crop.x0, 0), max(crop.y0, 0)
    x1, y1 = min(crop.x0 + w, width), min(crop.y0 + h, height)
    if x1 <= x0 or y1 <= y0:
        return MaskCrop(0, 0, crop.mask.new_zeros((0, 0)))
    return MaskCrop(x0, y0, crop.mask[y0 - crop.y0:y1 - crop.y0, x0 - crop.x0:x1 - crop.x0])


def crop_to_rle(crop: MaskCrop, height: int, width: int) -> dict:
    """COCO RLE {"size": [height, width], "counts": str} of the full mask that `crop`
    describes: pycocotools' encode of the dense mask (counts decoded to str), computed
    from the crop alone (engine.predict.window_to_rle); parts outside the image dropped."""
    if crop.mask.dim() != 2:
        raise ValueError(f"crop_to_rle: crop.mask must be Tensor[h, w], got shape "
                         f"{tuple(crop.mask.shape)}")
    return window_to_rle(_clip_crop(crop, height, width), height, width)


def dense_to_crops(masks: Tensor, threshold: float = 0.5) -> list[MaskCrop]:
    """Binarise full-size masks (probability >= threshold) and keep each one's bounding
    window.

    Args:
        masks: Tensor[D, 1, H, W] or Tensor[D, H, W], probabilities (or bool).
    Returns:
        D MaskCrop with bool masks; an empty mask gives MaskCrop(0, 0, Tensor[0, 0]).
    """
    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"dense_to_crops: masks must be Tensor[D, 1, H, W] or [D, H, W], "
                         f"got shape {tuple(masks.shape)}")
    return dense_to_windows(masks if masks.dtype == torch.bool else masks >= threshold)


# ------------------------------------------------------------------------------ tiles

def _tile_size(tile) -> tuple[int, int]:
    """tile: int or (th, tw) -> (th, tw), checked."""
    pair = (tile, tile) if not isinstance(tile, (tuple, list)) else tuple(tile)
    if (len(pair) != 2 or any(isinstance(t, bool) or not isinstance(t, (int, np.integer))
                              or t < 1 for t in pair)):
        raise ValueError(f"tile must be a positive int or a pair (height, width) of "
                         f"positive ints, got {tile!r}")
    return int(pair[0]), int(pair[1])


def _starts(size: int, tile: int, overlap: float) -> list[int]:
    """Window starts along one side: every `stride`, then one ending on the border."""
    if size <= tile:
        return [0]
    stride = max(1, round(tile * (1 - overlap)))
    return list(range(0, size - tile, stride)) + [size - tile]


def tile_windows(height: int, width: int, tile, overlap: float = 0.2) -> list[Window]:
    """Overlapping windows that cover a height x width image.

    Args:
        tile: int or (th, tw), the window size in pixels (>= 1).
        overlap: in [0, 1), the fraction of a tile shared by neighbours; the stride is
            round(tile * (1 - overlap)) (at least 1). The last row and column of windows
            end on the image border; a side no longer than the tile is one window.
    Returns:
        [(y0, x0, y1, x1)], row by row, end exclusive; windows are (th, tw) or the image
        side where it is smaller.
    """
    th, tw = _tile_size(tile)
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1:
            raise ValueError(f"tile_windows: image {name} must be a positive int, "
                             f"got {side!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) \
            or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a fraction of the tile in [0, 1), got "
                         f"{overlap!r}")
    return [(y, x, min(y + th, height), min(x + tw, width))
            for y in _starts(height, th, overlap) for x in _starts(width, tw, overlap)]


def _check_image(image) -> None:
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 \
            or min(image.shape[1:]) < 1:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"predict_tiled: image must be a Tensor[3, H, W] (RGB, channels "
                         f"first), got {shape}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"predict_tiled: image must be uint8 (0..255) or float in "
                         f"[0, 1], got {image.dtype}")


def _tile_input(image: Tensor, window: Window) -> Tensor:
    """The float32 Tensor[3, h, w] in [0, 1] of one window (a copy of the tile only)."""
    y0, x0, y1, x1 = window
    return to_float(image[:, y0:y1, x0:x1]).to(torch.float32).contiguous()


def _to_image(detection: dict, window: Window, index: int) -> dict:
    """A tile's detection (tile pixels) in image pixels, with only the merged fields."""
    missing = [k for k in ("boxes", "labels", "scores") if k not in detection]
    if missing:
        raise ValueError(f"predict_tiled: detect's result for tile {index} {window} lacks "
                         f"{missing} (expected dict(boxes, labels, scores, windows))")
    if "masks" in detection and MASK_KEY not in detection:
        raise ValueError("predict_tiled: detect returned dense 'masks' without 'windows'; "
                         "convert them with engine.tiling.dense_to_crops(masks)")
    y0, x0 = window[0], window[1]
    boxes = detection["boxes"]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"predict_tiled: detect's boxes for tile {index} {window} must "
                         f"be Tensor[D, 4], got shape {tuple(boxes.shape)}")
    out = {"boxes": boxes + boxes.new_tensor([x0, y0, x0, y0]),
           "labels": detection["labels"], "scores": detection["scores"]}
    if MASK_KEY in detection:
        if len(detection[MASK_KEY]) != boxes.shape[0]:
            raise ValueError(f"predict_tiled: tile {index} has {boxes.shape[0]} boxes but "
                             f"{len(detection[MASK_KEY])} {MASK_KEY}")
        out[MASK_KEY] = [shift_crop(c, x0, y0) for c in detection[MASK_KEY]]
    return out


@torch.no_grad()
def predict_tiled(detect: Callable[[list[Tensor]], list[dict]], image: Tensor, tile,
                  overlap: float = 0.2, batch_size: int = 1, iou_threshold: float = 0.5,
                  *, progress: bool = False) -> dict:
    """Detections on an image of any size, run tile by tile and merged (module docstring).

    Args:
        detect: list of float32 Tensor[3, h, w] in [0, 1] -> one detection per tile,
            dict(boxes Tensor[D, 4] (x1, y1, x2, y2) tile pixels, labels Tensor[D] int64,
            scores Tensor[D], optional windows: D MaskCrop in tile pixels).
        image: Tensor[3, H, W], uint8 (0..255; a tile becomes `tile.float() / 255`) or
            float in [0, 1].
        tile, overlap: the windows (tile_windows).
        batch_size: tiles per detect call.
        iou_threshold: duplicates across tiles (merge_tiles).
        progress: a tqdm bar over the tiles.
    Returns:
        dict(boxes Tensor[K, 4] image pixels, labels, scores, windows (if detect gives
        them): K MaskCrop in image pixels), by descending score.
    """
    _check_image(image)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    height, width = image.shape[1:]
    windows = tile_windows(height, width, tile, overlap)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(windows), desc="tiles", dynamic_ncols=True)
    parts = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        outputs = detect([_tile_input(image, w) for w in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"predict_tiled: detect returned {len(outputs)} detections "
                             f"for {len(batch)} tiles (expected one per tile)")
        parts += [_to_image(o, w, start + i) for i, (o, w) in enumerate(zip(outputs, batch))]
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return merge_tiles(parts, windows, (height, width), iou_threshold)


# ------------------------------------------------------------------------------ merge

def _margins(boxes: Tensor, window: Window, size: tuple[int, int]) -> Tensor:
    """Tensor[D]: distance from each box to its window's nearest interior edge (inf when
    the window has none: it is the whole image)."""
    y0, x0, y1, x1 = window
    height, width = size
    inf = torch.full_like(boxes[:, 0], float("inf"))
    gaps = torch.stack([boxes[:, 0] - x0 if x0 > 0 else inf,
                        boxes[:, 1] - y0 if y0 > 0 else inf,
                        x1 - boxes[:, 2] if x1 < width else inf,
                        y1 - boxes[:, 3] if y1 < height else inf])
    return gaps.amin(0)


def _same_objects(a: dict, b: dict, cut_a: Tensor, cut_b: Tensor,
                  iou_threshold: float) -> Tensor:
    """Tensor[Da, Db] bool: detection pairs of two tiles that are one object (module
    docstring): same class and IoU > t, or a cut box more than t inside the other."""
    lt = torch.max(a["boxes"][:, None, :2], b["boxes"][None, :, :2])
    rb = torch.min(a["boxes"][:, None, 2:], b["boxes"][None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)                          # [Da, Db]
    area_a, area_b = box_area(a["boxes"])[:, None], box_area(b["boxes"])[None, :]
    iou = inter / (area_a + area_b - inter)
    cut_inside = ((cut_a[:, None] & (inter > iou_threshold * area_a))
                  | (cut_b[None, :] & (inter > iou_threshold * area_b)))
    same_class = a["labels"][:, None] == b["labels"][None, :]
    return same_class & ((iou > iou_threshold) | cut_inside) & (inter > 0)


def merge_tiles(parts: Sequence[dict], windows: Sequence[Window], size: tuple[int, int],
                iou_threshold: float = 0.5) -> dict:
    """One detection per object from the detections of overlapping tiles.

    Args:
        parts: per window, dict(boxes Tensor[D_i, 4] image pixels, labels, scores,
            optional windows) as predict_tiled makes them.
        windows: the (y0, x0, y1, x1) of each part. size: (H, W) of the image.
        iou_threshold: in [0, 1], the overlap above which two detections are one object.
    Returns:
        dict(boxes, labels, scores, windows?) of the kept detections, by descending score
        (the rule is in the module docstring).
    """
    if len(parts) != len(windows):
        raise ValueError(f"merge_tiles: {len(parts)} parts for {len(windows)} windows")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) \
            or not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    margins = [_margins(p["boxes"], w, size) for p, w in zip(parts, windows)]
    cuts = [m < max(1.0, EDGE_TOLERANCE * min(w[2] - w[0], w[3] - w[1]))
            for m, w in zip(margins, windows)]
    offsets = np.cumsum([0] + [p["boxes"].shape[0] for p in parts])
    neighbours: list[list[int]] = [[] for _ in range(int(offsets[-1]))]
    for i, j in _overlapping_pairs(windows, parts):
        same = _same_objects(parts[i], parts[j], cuts[i], cuts[j], iou_threshold)
        for a, b in torch.nonzero(same).tolist():
            neighbours[offsets[i] + a].append(int(offsets[j] + b))
            neighbours[offsets[j] + b].append(int(offsets[i] + a))
    if not neighbours:
        return _gather(parts, [])
    # Priority: uncut before cut, then the larger margin (uncut only), then the score.
    cut = torch.cat(cuts).tolist()
    margin = torch.cat(margins).tolist()
    score = torch.cat([p["scores"] for p in parts]).tolist()
    order = sorted(range(len(score)),
                   key=lambda k: (cut[k], 0.0 if cut[k] else -margin[k], -score[k], k))
    suppressed = [False] * len(score)
    kept = []
    for k in order:
        if not suppressed[k]:
            kept.append(k)
            for other in neighbours[k]:
                suppressed[other] = True
    kept.sort(key=lambda k: (-score[k], k))
    return _gather(parts, kept)


def _overlapping_pairs(windows: Sequence[Window], parts: Sequence[dict],
                       chunk: int = 256) -> list[tuple[int, int]]:
    """(i, j), i < j: windows that share pixels and both have detections."""
    busy = np.array([i for i, p in enumerate(parts) if p["boxes"].shape[0]], dtype=np.int64)
    if busy.size < 2:
        return []
    w = np.asarray(windows, dtype=np.int64)[busy]                   # [B, 4] y0 x0 y1 x1
    pairs = []
    for s in range(0, len(w), chunk):       # [chunk, B] at a time: thousands of tiles
        a = w[s:s + chunk, None]
        hit = ((a[..., 0] < w[None, :, 2]) & (w[None, :, 0] < a[..., 2])
               & (a[..., 1] < w[None, :, 3]) & (w[None, :, 1] < a[..., 3]))
        rows, cols = np.nonzero(hit)
        rows += s
        later = cols > rows
        pairs += zip(busy[rows[later]].tolist(), busy[cols[later]].tolist())
    return pairs


def _gather(parts: Sequence[dict], kept: list[int]) -> dict:
    """The fields of the detections at global indices `kept` (parts concatenated)."""
    if not parts:
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "scores": torch.zeros(0)}
    index = torch.tensor(kept, dtype=torch.int64)
    out = {k: torch.cat([p[k] for p in parts])[index.to(parts[0][k].device)]
           for k in ("boxes", "labels", "scores")}
    if any(MASK_KEY in p for p in parts):
        crops = [c for p in parts for c in p.get(MASK_KEY, [None] * p["boxes"].shape[0])]
        if any(crops[k] is None for k in kept):
            raise ValueError(f"predict_tiled: some tiles' detections have {MASK_KEY} and "
                             f"others have none; detect must give {MASK_KEY} for every tile "
                             f"or for none")
        out[MASK_KEY] = [crops[k] for k in kept]
    return out
