"""labelme: one JSON per image (`shapes` of labelled points), as labelme saves them.

Source: a folder of labelme JSON files (non-recursive; JSON files without `shapes` are
skipped with a warning). Images:
- `imagePath` relative to the JSON (labelme's convention; Windows backslashes are
  accepted), else a file of the same name in `image_dir` when one is given;
- else the embedded base64 `imageData` (labelme's "save image data" option) is decoded
  once into `<image_dir or the JSON folder>/labelme_imagedata/<json stem>.<png|jpg>` and
  that file is used (re-written only when its content differs).
Width/height come from `imageWidth` / `imageHeight` (labelme >= 4), else from the image.
The image root is the JSON folder: `file_name`s are relative to it (they may start with
../).

Instances and rasterisation:
- `polygon` (also a shape without `shape_type`): its points unchanged, as the COCO
  polygon [x1, y1, x2, y2, ...] in pixel coordinates; pycocotools rasterises it (a pixel
  belongs to the mask when its centre is inside; labelme's own PIL drawing also fills the
  pixels the outline passes through, up to one pixel more at the edges).
- `rectangle`: its two corners -> the 4-corner polygon.
- `circle`: centre and a point on the circle -> a 64-gon.
- other shape types (line, linestrip, point, mask, ...): skipped with a warning naming the
  file, the label and the type.
- Shapes with the same label and the same non-null `group_id` in one file are one
  instance (its polygons' union), labelme's convention for an object in several parts;
  a shape with group_id null is an instance of its own. Instances keep file order.
Categories: `classes` when given, else the sorted label names found (val sets get the
training set's classes from engine.initialise).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image
from tqdm import tqdm

from .common import CocoBuilder, FormatError, image_size, logger, relative

CACHE_FOLDER = "labelme_imagedata"
CIRCLE_VERTICES = 64


def read_labelme(source: Path, image_dir: Optional[Path] = None, split: str = "train",
                 classes: Optional[Sequence[str]] = None) -> tuple[dict, Path]:
    """(COCO dict, image root) of a folder of labelme JSONs (see the module doc).
    `split` is not used: a folder is one split."""
    if not source.is_dir():
        raise FormatError(f"labelme: {source} is not a folder (give the folder of labelme "
                          f"JSON files)")
    files = sorted(source.glob("*.json"))
    if not files:
        raise FormatError(f"labelme: no .json file in {source}")
    builder = CocoBuilder("labelme", source)
    for path in tqdm(files, desc="reading labelme", unit="file", disable=None, leave=False):
        data = _read_json(path)
        if data is None:
            continue
        file, width, height = _image_of(data, path, image_dir)
        image = builder.add_image(relative(file, source), width, height)
        for name, polygons, where in _instances(data, path):
            builder.add_polygons(image, name, polygons, where)
    order = list(classes) if classes else sorted(set(builder.names()))
    return builder.build(order), source


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"labelme: {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        logger.warning("labelme: %s has no 'shapes' list: not a labelme file, skipped", path)
        return None
    return data


def _image_of(data: dict, path: Path, image_dir: Optional[Path]) -> tuple[Path, int, int]:
    """(image file, width, height) of a labelme JSON (see the module doc for the search)."""
    image_path = str(data.get("imagePath") or "").replace("\\", "/")
    candidates = [path.parent / image_path] if image_path else []
    if image_path and image_dir is not None:
        candidates.append(Path(image_dir) / Path(image_path).name)
    file = next((c for c in candidates if c.is_file()), None)
    if file is None and data.get("imageData"):
        file = _decode_image_data(data["imageData"], path, image_dir)
    if file is None:
        raise FormatError(f"labelme: {path}: image {image_path!r} not found (looked at "
                          f"{', '.join(str(c) for c in candidates) or 'nothing'}) and no "
                          f"embedded imageData; move the image beside the JSON or set the "
                          f"image folder ([data] train_images / --images)")
    width, height = data.get("imageWidth"), data.get("imageHeight")
    if not (isinstance(width, int) and isinstance(height, int)):
        width, height = image_size(file)
    return file, width, height


def _decode_image_data(text: str, path: Path, image_dir: Optional[Path]) -> Path:
    """Writes the embedded image of labelme JSON `path` to the cache folder; its path."""
    try:
        raw = base64.b64decode(text, validate=False)
        with Image.open(io.BytesIO(raw)) as img:
            kind = (img.format or "PNG").lower()
    except (binascii.Error, OSError, ValueError) as exc:
        raise FormatError(f"labelme: {path}: imageData is not a base64 image: {exc}") from exc
    suffix = {"jpeg": ".jpg", "mpo": ".jpg"}.get(kind, f".{kind}")
    folder = Path(image_dir or path.parent) / CACHE_FOLDER
    out = folder / f"{path.stem}{suffix}"
    if not (out.is_file() and out.read_bytes() == raw):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(raw)
        tmp.replace(out)
    return out


def _instances(data: dict, path: Path) -> list[tuple[str, list[list[float]], str]]:
    """[(label, polygons, where)] of a labelme file, shapes grouped by (label, group_id)."""
    groups: dict = {}
    for k, shape in enumerate(data["shapes"]):
        label = str(shape.get("label", "")).strip()
        kind = shape.get("shape_type") or "polygon"
        where = f"labelme: {path}, shape {k} ({label!r}, {kind})"
        polygon = _polygon(kind, shape.get("points") or [], where)
        if polygon is None:
            continue
        group = shape.get("group_id")
        key = (label, group) if group is not None else (label, None, k)
        groups.setdefault(key, (label, [], where))[1].append(polygon)
    return list(groups.values())


def _polygon(kind: str, points: list, where: str) -> Optional[list[float]]:
    """The COCO polygon [x1, y1, ...] of one labelme shape, or None (warned) when it has
    no area or an unsupported type."""
    try:
        xy = [(float(p[0]), float(p[1])) for p in points]
    except (TypeError, ValueError, IndexError):
        logger.warning("%s: points %r are not [x, y] pairs; skipped", where, points)
        return None
    if kind == "polygon" and len(xy) >= 3:
        return [v for p in xy for v in p]
    if kind == "rectangle" and len(xy) >= 2:
        xs, ys = [p[0] for p in xy], [p[1] for p in xy]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    if kind == "circle" and len(xy) >= 2:
        (cx, cy), (px, py) = xy[:2]
        r = math.hypot(px - cx, py - cy)
        angles = [2 * math.pi * i / CIRCLE_VERTICES for i in range(CIRCLE_VERTICES)]
        return [v for a in angles for v in (cx + r * math.cos(a), cy + r * math.sin(a))]
    if kind in ("polygon", "rectangle", "circle"):
        logger.warning("%s: too few points (%d); skipped", where, len(xy))
    else:
        logger.warning("%s: shape type %r is not an instance outline (polygon, rectangle "
                       "and circle are); skipped", where, kind)
    return None
