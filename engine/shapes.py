"""A synthetic instance-segmentation data set of coloured shapes, in COCO format.

Each image has a noisy random background (a colour gradient, a low-frequency texture and
pixel noise) and 1-4 shapes of random kind, colour, size (about 10%-50% of the image side)
and rotation. Shapes drawn later occlude earlier ones; every annotation is the *visible*
mask (RLE), its bbox and area, so occluded pixels belong to the occluder. A placement that
would leave an earlier shape with a tiny visible part is re-drawn instead (dropping that
shape afterwards would leave an un-annotated fragment in the image).

    json_path, image_dir = make_shapes("data/shapes", "train", num_images=2000, image_size=128)
    CocoInstances(json_path, image_dir, train=True)     # engine/data.py reads it
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# Class k (1-based label) is CLASS_NAMES[k - 1]; num_classes=K uses the first K kinds.
CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

# Shape diameter (circumscribed circle) as a fraction of the image side.
MIN_SIZE_FRAC, MAX_SIZE_FRAC = 0.12, 0.5
# An earlier shape must keep at least this fraction of its area (and MIN_VISIBLE_PIXELS).
MIN_VISIBLE_FRAC = 0.4
MIN_VISIBLE_PIXELS = 24
# Shapes differ from the background under them by at least this RGB distance (0..441),
# so every instance is visible through the noise.
MIN_CONTRAST = 90.0
_PLACEMENT_TRIES = 20
_FORMAT_VERSION = 1


def _polygon(kind: str, radius: float, angle: float) -> np.ndarray:
    """Vertices float[V, 2] (x, y) of a shape of circumradius `radius` centred
    at the origin, rotated by `angle` radians."""
    if kind == "square":
        t = np.arange(4) * (math.pi / 2) + math.pi / 4
        r = np.full(4, radius)
    elif kind == "triangle":
        t = np.arange(3) * (2 * math.pi / 3) - math.pi / 2
        r = np.full(3, radius)
    elif kind == "hexagon":
        t = np.arange(6) * (math.pi / 3)
        r = np.full(6, radius)
    elif kind == "star":
        t = np.arange(10) * (math.pi / 5) - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    elif kind == "cross":
        # A plus sign of arm half-width w: 12 vertices at radius sqrt(w^2 + R^2) or w*sqrt2.
        w = 0.35 * radius / math.sqrt(1 + 0.35 ** 2)
        arm = math.sqrt(radius ** 2 - w ** 2)
        pts = [(arm, -w), (arm, w), (w, w), (w, arm), (-w, arm), (-w, w), (-arm, w),
               (-arm, -w), (-w, -w), (-w, -arm), (w, -arm), (w, -w)]
        xy = np.asarray(pts, dtype=np.float64)
        t, r = np.arctan2(xy[:, 1], xy[:, 0]), np.hypot(xy[:, 0], xy[:, 1])
    else:
        raise ValueError(f"engine/shapes.py: unknown shape kind {kind!r}; "
                         f"known: {', '.join(CLASS_NAMES)}")
    t = t + angle
    return np.stack((r * np.cos(t), r * np.sin(t)), axis=1)


def draw_shape(kind: str, center: tuple[float, float], radius: float, angle: float,
               image_size: int) -> np.ndarray:
    """bool[S, S] mask of one shape: `center` (x, y) in pixels, circumradius `radius`,
    rotation `angle` in radians (ignored for circles)."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    else:
        xy = _polygon(kind, radius, angle) + np.asarray([cx, cy])
        draw.polygon([tuple(p) for p in xy.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float[S, S, 3] in 0..255: a random two-colour gradient plus a smooth texture."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ramp = (xs * math.cos(theta) + ys * math.sin(theta))
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    image = c0 + (c1 - c0) * ramp[..., None]
    # Low-frequency texture: a coarse random grid upsampled bilinearly.
    cells = int(rng.integers(3, 9))
    grid = rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32)
    texture = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize(
        (size, size), Image.BILINEAR)) for c in range(3)], axis=-1)
    return image + rng.uniform(10, 45) * texture


def render_scene(rng: np.random.Generator, image_size: int, num_classes: int = 3,
                 min_instances: int = 1, max_instances: int = 4):
    """One image and its instances, drawn in order (later shapes occlude earlier ones).

    Returns:
        image: uint8[S, S, 3]
        instances: list of dict(label int in 1..K, color (r, g, b), full bool[S, S] (the
            whole shape), mask bool[S, S] (its visible part)), in drawing order.
    """
    size = image_size
    background = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int64)     # index of the visible instance
    instances: list[dict] = []
    for _ in range(int(rng.integers(min_instances, max_instances + 1))):
        label = int(rng.integers(1, num_classes + 1))
        kind = CLASS_NAMES[label - 1]
        for _try in range(_PLACEMENT_TRIES):
            radius = rng.uniform(MIN_SIZE_FRAC, MAX_SIZE_FRAC) * size / 2
            center = tuple(rng.uniform(radius, size - radius, size=2))
            full = draw_shape(kind, center, radius, rng.uniform(0, 2 * math.pi), size)
            if full.sum() < MIN_VISIBLE_PIXELS:
                continue
            if all(_still_visible(inst, full) for inst in instances):
                break
        else:
            continue        # no placement keeps the others visible: skip this shape
        under = background[full].mean(axis=0)
        color = rng.uniform(0, 255, size=3)
        for _c in range(_PLACEMENT_TRIES):
            if np.linalg.norm(color - under) >= MIN_CONTRAST:
                break
            color = rng.uniform(0, 255, size=3)
        for inst in instances:
            inst["mask"] &= ~full
        owner[full] = len(instances)
        instances.append(dict(label=label, color=tuple(int(round(c)) for c in color),
                              full=full, mask=full.copy()))
    image = background
    for index, inst in enumerate(instances):
        image[owner == index] = inst["color"]
    image = image + rng.normal(0, rng.uniform(3, 15), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), instances


def _still_visible(instance: dict, occluder: np.ndarray) -> bool:
    visible = int((instance["mask"] & ~occluder).sum())
    return visible >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRAC * int(instance["full"].sum()))


def _annotation(mask: np.ndarray, label: int, image_id: int, ann_id: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    area = float(mask_utils.area(rle))
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(id=ann_id, image_id=image_id, category_id=label, segmentation=rle,
                bbox=bbox, area=area, iscrowd=0)


def _check_args(split, num_images, image_size, num_classes, min_instances, max_instances):
    where = "engine/shapes.py make_shapes"
    if not split or any(c in split for c in "/\\"):
        raise ValueError(f"{where}: split must be a plain name like 'train', got {split!r}")
    if num_images < 1:
        raise ValueError(f"{where}: num_images must be >= 1, got {num_images}")
    if image_size < 32:
        raise ValueError(f"{where}: image_size must be >= 32 pixels, got {image_size}")
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"{where}: num_classes must be in 1..{len(CLASS_NAMES)} "
                         f"({', '.join(CLASS_NAMES)}), got {num_classes}")
    if not 1 <= min_instances <= max_instances:
        raise ValueError(f"{where}: need 1 <= min_instances <= max_instances, got "
                         f"{min_instances}, {max_instances}")


def make_shapes(root: Union[str, os.PathLike], split: str, num_images: int, image_size: int,
                num_classes: int = 3, seed: int = 0, min_instances: int = 1,
                max_instances: int = 4) -> tuple[Path, Path]:
    """Write root/<split>.json (COCO instances: images, annotations with RLE
    `segmentation`, `bbox` [x, y, w, h], `area`, `iscrowd` 0, categories) and
    root/<split>/<id>.png (image ids 1..num_images).

    Deterministic in the arguments: image i is drawn from numpy Generator([seed, i]), so
    it does not depend on num_images. Re-running with the same arguments reuses the
    existing files. Returns (json_path, image_dir).
    """
    _check_args(split, num_images, image_size, num_classes, min_instances, max_instances)
    root = Path(root)
    json_path, image_dir = root / f"{split}.json", root / split
    params = dict(version=_FORMAT_VERSION, num_images=num_images, image_size=image_size,
                  num_classes=num_classes, seed=seed, min_instances=min_instances,
                  max_instances=max_instances)
    if _is_complete(json_path, image_dir, params):
        return json_path, image_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        rng = np.random.default_rng([seed, image_id])
        image, instances = render_scene(rng, image_size, num_classes, min_instances,
                                        max_instances)
        file_name = f"{image_id}.png"
        Image.fromarray(image).save(image_dir / file_name, compress_level=1)
        images.append(dict(id=image_id, file_name=file_name, width=image_size,
                           height=image_size))
        for inst in instances:
            annotations.append(_annotation(inst["mask"], inst["label"], image_id,
                                           len(annotations) + 1))
    categories = [dict(id=k, name=CLASS_NAMES[k - 1], supercategory="shape")
                  for k in range(1, num_classes + 1)]
    data = dict(info=dict(description="synthetic shapes (engine/shapes.py)", shapes=params),
                images=images, annotations=annotations, categories=categories)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, json_path)      # the JSON appears last: its presence marks a full set
    return json_path, image_dir


def _is_complete(json_path: Path, image_dir: Path, params: dict) -> bool:
    if not json_path.is_file():
        return False
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return False
    if data.get("info", {}).get("shapes") != params:
        return False
    return all((image_dir / im["file_name"]).is_file() for im in data["images"])
