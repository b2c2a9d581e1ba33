"""What the readers share: a COCO dict under construction, class lists, image sizes.

Every reader collects (image, instance) records with class *names*; `CocoBuilder.build`
numbers the categories 1..K in the order of `classes` and fills bbox and area from the
mask pycocotools rasterises (or from the box of a box-only instance).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from engine.images import IMAGE_SUFFIXES  # noqa: F401  (yolo.py's image files)

logger = logging.getLogger("engine.formats")

PathLike = Union[str, os.PathLike]

# labelme's labels.txt starts with these two pseudo-classes; they are not categories.
PSEUDO_CLASSES = ("__ignore__", "_background_")


class FormatError(ValueError):
    """A source data set cannot be read (the message names the file and what to do)."""


def parse_classes(spec: Union[None, str, Sequence[str]]) -> Optional[list[str]]:
    """Class names in category-id order from `spec`: None / "" / "none" -> None (the
    reader's default order); a list of names; a text file with one name per line
    (labelme's labels.txt: its __ignore__ and _background_ lines are skipped); or names
    separated by commas ("cat, dog")."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        names = [str(n).strip() for n in spec]
    else:
        text = spec.strip()
        if text.lower() in ("", "none"):
            return None
        if Path(text).is_file():
            names = Path(text).read_text().splitlines()
        elif not (any(c in text for c in "/\\") or text.lower().endswith(".txt")):
            names = text.split(",")
        else:
            raise FormatError(f"classes = {text}: file not found (give a file with one "
                              f"class name per line, or names separated by commas)")
        names = [n.strip() for n in names]
    names = [n for n in names if n and n not in PSEUDO_CLASSES]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FormatError(f"classes {names}: {duplicates} appear more than once")
    return names or None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image file's header (the pixels are not decoded)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError) as exc:
        raise FormatError(f"image file {path} cannot be read: {exc}") from exc


def relative(path: Path, root: Path) -> str:
    """`path` relative to `root` with forward slashes (may start with ../)."""
    return Path(os.path.relpath(path, root)).as_posix()


def polygons_rle(polygons: Sequence[Sequence[float]], width: int, height: int) -> dict:
    """The one RLE of the union of COCO polygons [x1, y1, x2, y2, ...] (pixel coords)."""
    return mask_utils.merge(mask_utils.frPyObjects([list(p) for p in polygons],
                                                   height, width))


def mask_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of a mask bool/uint8[H, W] with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class CocoBuilder:
    """Images and instances of one source, turned into a COCO dict by `build`.

    add_image(file_name, width, height) -> image id (1, 2, ...); add_polygons /
    add_mask / add_box add one instance of class `name` to an image; `where` names the
    file (and line or object) for messages."""

    def __init__(self, fmt: str, source: Path):
        self.fmt, self.source = fmt, source
        self.images: list[dict] = []
        self.instances: list[tuple[dict, str, str]] = []   # (annotation, name, where)

    def add_image(self, file_name: str, width: int, height: int) -> dict:
        info = dict(id=len(self.images) + 1, file_name=file_name, width=int(width),
                    height=int(height))
        self.images.append(info)
        return info

    def add_polygons(self, image: dict, name: str, polygons: Sequence[Sequence[float]],
                     where: str) -> None:
        """polygons: list of [x1, y1, x2, y2, ...] in pixel coordinates (>= 3 points)."""
        polygons = [[float(v) for v in p] for p in polygons]
        rle = polygons_rle(polygons, image["width"], image["height"])
        self._add_segmented(image, name, polygons, rle, where)

    def add_mask(self, image: dict, name: str, mask: np.ndarray, where: str,
                 bbox: Optional[Sequence[float]] = None) -> None:
        """mask bool[H, W], stored as RLE; bbox [x, y, w, h] (default the mask's)."""
        rle = mask_rle(mask)
        self._add_segmented(image, name, rle, rle, where, bbox)

    def add_box(self, image: dict, name: str, bbox: Sequence[float], where: str) -> None:
        """A box-only instance: bbox [x, y, w, h], no segmentation."""
        bbox = [float(v) for v in bbox]
        self._add(dict(image_id=image["id"], bbox=bbox, area=bbox[2] * bbox[3]), name, where)

    def _add_segmented(self, image, name, segmentation, rle, where, bbox=None) -> None:
        area = float(mask_utils.area(rle))
        if area == 0:
            logger.warning("%s: the %s instance covers no pixel; skipped", where, name)
            return
        bbox = [float(v) for v in (mask_utils.toBbox(rle) if bbox is None else bbox)]
        self._add(dict(image_id=image["id"], segmentation=segmentation, bbox=bbox,
                       area=area), name, where)

    def _add(self, ann: dict, name: str, where: str) -> None:
        ann.update(iscrowd=0)
        self.instances.append((ann, str(name), where))

    def names(self) -> list[str]:
        return [name for _, name, _ in self.instances]

    def build(self, classes: Sequence[str]) -> dict:
        """The COCO dict: categories 1..K = `classes` in order; an instance whose class
        is not among them raises FormatError naming its file."""
        ids = {name: k + 1 for k, name in enumerate(classes)}
        annotations = []
        for ann, name, where in self.instances:
            if name not in ids:
                raise FormatError(f"{where}: class {name!r} is not among the classes "
                                  f"{list(classes)} (add it to [data] classes / --classes, "
                                  f"or fix the label)")
            annotations.append(dict(ann, id=len(annotations) + 1, category_id=ids[name]))
        return dict(
            info=dict(description=f"{self.fmt} data set converted by engine.formats",
                      source=str(self.source), format=self.fmt),
            images=self.images, annotations=annotations,
            categories=[dict(id=k + 1, name=n, supercategory="") for k, n in
                        enumerate(classes)])
