"""Readers of the annotation formats tools export, each to an in-memory COCO dict.

    coco, image_root = to_coco("labelme", "data/labelme")          # folder of labelme JSONs
    coco, image_root = to_coco("voc", "VOCdevkit/VOC2012", split="val")
    coco, image_root = to_coco("yolo", "data.yaml", split="train")
    dataset = CocoInstances(coco, image_root, train=True)          # engine/data.py
    write_coco(coco, "train.json")                                 # `maskrcnn convert-data`

A COCO dict has `images` (id, file_name relative to image_root, width, height),
`annotations` (id, image_id, category_id, segmentation as polygons [x1, y1, ...] in
pixels or RLE, bbox [x, y, w, h], area, iscrowd 0; box-only instances have no
segmentation), `categories` (id 1..K, name) and `info` (format, source).

Where each reader finds images, how it rasterises and numbers the categories: the
module docs of labelme.py, voc.py and yolo.py (and README "Train on your data").
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .common import FormatError, PathLike, parse_classes
from .labelme import read_labelme
from .voc import VOC_CLASSES, read_voc
from .yolo import read_yolo

__all__ = ["FORMATS", "FormatError", "VOC_CLASSES", "parse_classes", "summary", "to_coco",
           "write_coco"]


def read_coco(source: Path, image_dir: Optional[Path] = None, split: str = "train",
              classes: Optional[Sequence[str]] = None) -> tuple[dict, Path]:
    """A COCO instances JSON as it is (`split` and `classes` are not used); the image root
    is image_dir (default the JSON's folder)."""
    try:
        data = json.loads(Path(source).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"coco: {source} cannot be read as JSON: {exc}") from exc
    return data, Path(image_dir) if image_dir is not None else Path(source).parent


# name -> reader(source, image_dir, split, classes) -> (COCO dict, image root)
FORMATS: dict[str, Callable[..., tuple[dict, Path]]] = {
    "coco": read_coco, "labelme": read_labelme, "voc": read_voc, "yolo": read_yolo,
}


def to_coco(fmt: str, source: PathLike, image_dir: Optional[PathLike] = None, *,
            split: str = "train", classes: Union[None, str, Sequence[str]] = None
            ) -> tuple[dict, Path]:
    """(COCO dict, image root: the folder its file_names are relative to) of `source` in
    format `fmt` (a key of FORMATS).

    image_dir: coco: the image folder; labelme: where images not found at imagePath are
        looked for by name, and embedded imageData is decoded; voc: the image folder
        (default <root>/JPEGImages); yolo: the split's image folder instead of data.yaml's.
    split: "train" or "val": which list a VOC root or a data.yaml names.
    classes: category names in id order (a list, a file with one per line, or "a, b");
        default: the format's own order (see each reader)."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    source = Path(source)
    if not source.exists():
        raise FormatError(f"{fmt}: {source} not found")
    return FORMATS[fmt](source, None if image_dir is None else Path(image_dir), split,
                        parse_classes(classes))


def write_coco(coco_dict: dict, path: PathLike) -> Path:
    """Writes the COCO dict (or a COCO results list) as JSON at `path` atomically (a
    temporary file renamed over it, so a reader never sees half a file); RLE counts in
    bytes are written as text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(coco_dict, f, default=_bytes_as_text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _bytes_as_text(value):
    if isinstance(value, bytes):
        return value.decode("ascii")
    raise TypeError(f"write_coco: {type(value).__name__} {value!r} is not JSON data")


def summary(coco_dict: dict) -> str:
    """One line: images, instances, and instances per category (box-only counted)."""
    names = {c["id"]: c["name"] for c in coco_dict["categories"]}
    counts = {name: 0 for name in names.values()}
    box_only = 0
    for ann in coco_dict["annotations"]:
        counts[names[ann["category_id"]]] += 1
        box_only += not ann.get("segmentation")
    per = ", ".join(f"{name} {n}" for name, n in counts.items())
    return (f"{len(coco_dict['images'])} images, {len(coco_dict['annotations'])} instances"
            + (f" ({box_only} box-only)" if box_only else "") + f": {per}")
