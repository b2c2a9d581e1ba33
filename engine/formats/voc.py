"""Pascal VOC: Annotations/<id>.xml boxes, plus SegmentationObject/<id>.png (instances)
and SegmentationClass/<id>.png (classes) palette PNGs where the image has them.

Source: the VOC root (the folder holding Annotations/, JPEGImages/, SegmentationObject/,
SegmentationClass/, ImageSets/), or a list file of image ids (e.g.
VOC2012/ImageSets/Segmentation/train.txt; the root is three levels up). With the root,
the split's list ImageSets/Segmentation/<split>.txt is read, else
ImageSets/Main/<split>.txt, else every XML in Annotations/. The image is
JPEGImages/<filename of the XML> (else <id>.jpg / <id>.png); the image root is
JPEGImages/. Width/height come from the XML's <size>, else from the image.

Instances:
- With a SegmentationObject PNG: pixel value i (1, 2, ...) is instance i, matched to the
  XML's i-th <object> (VOC's convention). Its mask is the pixels of value i, stored as
  RLE: 0 is background and 255 the border / void band VOC draws around each object (and
  over ambiguous pixels), so border pixels belong to no mask (the masks are thus a few
  pixels thinner than the objects; VOC's evaluation ignores those pixels too). Its box is
  the XML object's box. Its class is the majority SegmentationClass value over its
  pixels (value k -> the k-th class, as VOC's palette numbers the 20 classes), else, with
  no SegmentationClass PNG or value, the XML object's <name>; a disagreement between the
  two is warned about, the PNG wins. XML objects without a pixel in the PNG are
  box-only instances.
- Without a SegmentationObject PNG (detection-only images): every XML object is a
  box-only instance (no segmentation; engine.data trains its box, not its mask).
- Boxes: VOC's 1-based inclusive pixel corners -> COCO [xmin - 1, ymin - 1,
  xmax - xmin + 1, ymax - ymin + 1].
- <difficult>1</difficult> objects are kept as ordinary instances (iscrowd 0), as
  detectron2 trains on them; <truncated> and <pose> are ignored.
Categories: `classes` when given; else the 20 VOC classes in VOC's order (category id k =
palette value k) when every object name is one of them; else the sorted names found (then
SegmentationClass values are read in that order: give `classes` in your palette's order).
PNGs must be palette ("P") or grayscale ("L") images holding the indices.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .common import CocoBuilder, FormatError, image_size, logger, relative

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOID = 255


def read_voc(source: Path, image_dir: Optional[Path] = None, split: str = "train",
             classes: Optional[Sequence[str]] = None) -> tuple[dict, Path]:
    """(COCO dict, image root) of a VOC root or ImageSets list file (see the module doc).
    image_dir: the image folder (default <root>/JPEGImages)."""
    root, ids = _root_and_ids(source, split)
    images = Path(image_dir) if image_dir is not None else root / "JPEGImages"
    records = [_read_xml(root, i) for i in tqdm(ids, desc="reading VOC", unit="image",
                                                disable=None, leave=False)]
    if classes:
        order = list(classes)
    else:
        names = {o["name"] for r in records for o in r["objects"]}
        order = list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)
    builder = CocoBuilder("voc", source)
    for record in tqdm(records, desc="reading VOC masks", unit="image", disable=None,
                       leave=False):
        _add_image(builder, record, root, images, order)
    return builder.build(order), images


def _root_and_ids(source: Path, split: str) -> tuple[Path, list[str]]:
    if source.is_file():
        return source.parents[2], _read_ids(source)
    if not (source / "Annotations").is_dir():
        raise FormatError(f"voc: {source} has no Annotations/ folder (give the VOC root, "
                          f"e.g. VOCdevkit/VOC2012, or an ImageSets/Segmentation/*.txt list)")
    for sub in ("Segmentation", "Main"):
        listing = source / "ImageSets" / sub / f"{split}.txt"
        if listing.is_file():
            return source, _read_ids(listing)
    return source, sorted(p.stem for p in (source / "Annotations").glob("*.xml"))


def _read_ids(listing: Path) -> list[str]:
    """Image ids of an ImageSets list (first column; Main/<class>_<split>.txt has a
    second column of -1/0/1 flags)."""
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise FormatError(f"voc: {listing} lists no image id")
    return ids


def _read_xml(root: Path, image_id: str) -> dict:
    """{id, filename, width, height, objects: [{name, bbox xywh}]} of Annotations/<id>.xml."""
    path = root / "Annotations" / f"{image_id}.xml"
    if not path.is_file():
        raise FormatError(f"voc: {path} not found (image id {image_id!r} of the list)")
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise FormatError(f"voc: {path} is not valid XML: {exc}") from exc
    objects = []
    for k, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            x1, y1, x2, y2 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as exc:
            raise FormatError(f"voc: {path}, object {k} ({name!r}): no numeric "
                              f"bndbox xmin/ymin/xmax/ymax") from exc
        objects.append(dict(name=name, bbox=[x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                            where=f"voc: {path}, object {k} ({name!r})"))
    size = tree.find("size")
    width = int(float(size.findtext("width") or 0)) if size is not None else 0
    height = int(float(size.findtext("height") or 0)) if size is not None else 0
    return dict(id=image_id, path=path, filename=(tree.findtext("filename") or "").strip(),
                width=width, height=height, objects=objects)


def _image_file(record: dict, images: Path) -> Path:
    names = [record["filename"], f"{record['id']}.jpg", f"{record['id']}.png"]
    for name in filter(None, names):
        if (images / name).is_file():
            return images / name
    raise FormatError(f"voc: {record['path']}: image not found in {images} (tried "
                      f"{', '.join(filter(None, names))})")


def _add_image(builder: CocoBuilder, record: dict, root: Path, images: Path,
               order: list[str]) -> None:
    file = _image_file(record, images)
    width, height = record["width"], record["height"]
    if not (width and height):
        width, height = image_size(file)
    image = builder.add_image(relative(file, images), width, height)
    objects = record["objects"]
    instances = _read_png(root / "SegmentationObject" / f"{record['id']}.png", (height, width))
    if instances is None:
        for obj in objects:
            builder.add_box(image, obj["name"], obj["bbox"], obj["where"])
        return
    classes = _read_png(root / "SegmentationClass" / f"{record['id']}.png", (height, width))
    values = [int(v) for v in np.unique(instances) if v not in (0, VOID)]
    for value in values:
        mask = instances == value
        obj = objects[value - 1] if value <= len(objects) else None
        where = obj["where"] if obj else f"voc: {record['path']}, PNG instance {value}"
        name = _class_of(mask, classes, obj, order, where)
        builder.add_mask(image, name, mask, where, obj["bbox"] if obj else None)
    for k, obj in enumerate(objects):
        if k + 1 not in values:
            builder.add_box(image, obj["name"], obj["bbox"], obj["where"])


def _class_of(mask: np.ndarray, classes: Optional[np.ndarray], obj: Optional[dict],
              order: list[str], where: str) -> str:
    """The class name of one PNG instance: the majority SegmentationClass value over its
    pixels, else the XML object's name."""
    from_png = None
    if classes is not None:
        counts = np.bincount(classes[mask].ravel(), minlength=256)
        counts[[0, VOID]] = 0
        value = int(counts.argmax())
        if counts[value] and value <= len(order):
            from_png = order[value - 1]
    if from_png is None:
        if obj is None:
            raise FormatError(f"{where}: no XML object and no SegmentationClass value for "
                              f"this instance")
        return obj["name"]
    if obj is not None and obj["name"] != from_png:
        logger.warning("%s: SegmentationClass says %r, the XML %r; using %r", where,
                       from_png, obj["name"], from_png)
    return from_png


def _read_png(path: Path, shape: tuple[int, int]) -> Optional[np.ndarray]:
    """Index array uint8[H, W] of a palette / grayscale PNG, or None when it is absent."""
    if not path.is_file():
        return None
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise FormatError(f"voc: {path} is a {img.mode} image; VOC masks are palette "
                              f"(P) or grayscale (L) PNGs of indices")
        array = np.asarray(img, dtype=np.uint8)
    if array.shape != shape:
        raise FormatError(f"voc: {path} is {array.shape[1]}x{array.shape[0]} but its image "
                          f"is {shape[1]}x{shape[0]} (width x height)")
    return array
