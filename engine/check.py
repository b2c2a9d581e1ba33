"""Checks of an instance-segmentation data set (COCO form) before training time is spent
on it: the mistakes that train quietly to AP 0, found in seconds and named.

    coco = read_coco_json("train.json")                       # engine.data
    findings = check_dataset(coco, "train/", min_instances=10, fast=True)
    checked = CheckedSet("train", "train.json", "train/", dataset_stats(coco), findings)
    print(format_report([checked]))

`maskrcnn check-data` prints that report; `maskrcnn train` runs the fast checks first
([data] check_data) and stops on errors before the model is built.

Each `Finding` names where the problem is (image file, image id, annotation id or
category), what is wrong and the fix. Errors: training on the set fails later or learns
the wrong thing (`maskrcnn train` stops); warnings: it trains, but look.

Codes (E error, W warning):
- E missing-section, missing-id, image-fields, unknown-image, unknown-category, bad-bbox:
  JSON the loader cannot interpret (CocoInstances raises the first).
- E duplicate-image-id / -annotation-id / -category-id: pycocotools silently keeps the
  last entry of an id. W duplicate-file: two image entries for one file.
- E no-categories, no-annotations, all-crowd, background-category: nothing (or a class
  without objects) to learn.
- W category-id-zero, category-gaps: fine here (labels follow the sorted ids), not in
  tools that take the id as the label. W few-instances: fewer than min_instances
  non-crowd instances.
- E missing-image-dir, missing-file, unreadable-file (not an image, float pixels;
  truncated: full check only). E size-mismatch: the file's size is not the JSON's (the
  message says whether EXIF orientation explains it). W exif-orientation: the sizes
  agree, but viewers (and annotation tools) show the image turned.
- E rle-size, bad-segmentation: masks the loader cannot use. W no-mask, empty-mask
  (dropped by the loader), tiny-mask (< TINY_MASK_PIXELS), box-mask-disagree (IoU <
  MIN_MASK_BOX_IOU), empty-box (dropped), box-outside (clipped).
- E boxes-outside, normalised-boxes: the boxes as a whole do not fit the pixels.
  box-convention: [x1, y1, x2, y2] boxes, E shown by the masks, W guessed without.
- E split-mismatch: train and val categories differ (check_split_pair).

fast=True reads only the image headers (size, mode, EXIF: milliseconds per image); the
full check also decodes every image to find truncated files. Masks are measured as RLE
by pycocotools (area, tight box) without drawing them, in both.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

PathLike = Union[str, Path]

SEVERITIES = ("error", "warning")
# A category with fewer non-crowd instances than this is reported (--min-instances).
MIN_INSTANCES = 10
# Below this IoU between a box and its mask's tight box the two disagree; the loader
# (CocoInstances' default min_mask_box_iou) then trains on the mask's box.
MIN_MASK_BOX_IOU = 0.5
# A mask of fewer pixels is reported as tiny (a stray click more often than an object).
TINY_MASK_PIXELS = 16
# A box with less than this fraction of its area inside its image is "outside"; when
# more than MOSTLY of the boxes are, the coordinates are wrong as a whole (an error).
MIN_INSIDE = 0.5
MOSTLY = 0.5
# The [x1, y1, x2, y2] reading of a box matches its mask's box (IoU >= XYXY_IOU) clearly
# better than the COCO [x, y, w, h] reading (by XYXY_MARGIN) for MOSTLY of the boxes.
XYXY_IOU, XYXY_MARGIN = 0.8, 0.1
# Without masks: every box has x2 > x1, y2 > y1 and fits as [x1, y1, x2, y2], and at least
# this share overflows the image when read as [x, y, w, h].
XYXY_OVERFLOW = 0.1
# EXIF orientation tag (0x0112) values 2..8 and what a viewer does with the pixels.
EXIF_ORIENTATION_TAG = 0x0112
EXIF_TURNS = {2: "mirrored", 3: "rotated 180 degrees", 4: "flipped vertically",
              5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
              8: "rotated 90 degrees counter-clockwise"}
BACKGROUND_NAMES = {"background", "__background__", "_background_", "bg", "__bg__"}
# Findings of one code in the report's details (all of them are in --json).
DETAILS_PER_CODE = 10


@dataclass
class Finding:
    """One problem: severity "error" or "warning", a code (e.g. "missing-file"), where
    (readable: "annotation 17 (image 3, 3.png)"), what is wrong and the fix; the file
    name, image id, annotation id and category id it concerns, where it has them."""
    severity: str
    code: str
    where: str
    message: str
    fix: str
    file: Optional[str] = None
    image_id: Optional[int] = None
    ann_id: Optional[int] = None
    category_id: Optional[int] = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckedSet:
    """A checked data set: its name (train, val), source (the JSON), image root, stats
    (`dataset_stats`) and findings."""
    name: str
    source: str
    image_root: str
    stats: dict
    findings: list = field(default_factory=list)


class DataCheckError(ValueError):
    """The data has errors. The message names the first (and counts the others);
    `checked` holds the CheckedSets for `format_report` / `report()`."""

    def __init__(self, checked: Sequence[CheckedSet], prefix: str = "check-data"):
        self.checked = list(checked)
        errors = [(c, f) for c in self.checked for f in c.findings if f.severity == "error"]
        if not errors:
            super().__init__(f"{prefix}: no errors")
            return
        c, first = errors[0]
        text = (f"{first.where} in {c.source}: {first.message}" if first.where
                else f"{c.source} {first.message}")
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        super().__init__(f"{prefix}: {text}{more}")

    @classmethod
    def of(cls, findings: Sequence[Finding], source: str, prefix: str) -> "DataCheckError":
        """The error for findings of one file without the full check's stats."""
        return cls([CheckedSet("data", source, "", {}, list(findings))], prefix)

    def report(self) -> str:
        return format_report(self.checked)


# ----------------------------------------------------------------------------- where

def _image_where(info: dict) -> str:
    return f"image {info.get('id')} ({info.get('file_name')})"


def _ann_where(ann: dict, images: dict) -> str:
    info = images.get(ann.get("image_id"))
    name = f", {info.get('file_name')}" if info else ""
    return f"annotation {ann.get('id')} (image {ann.get('image_id')}{name})"


def _image_finding(severity, code, info, message, fix) -> Finding:
    return Finding(severity, code, _image_where(info), message, fix,
                   file=info.get("file_name"), image_id=info.get("id"))


def _ann_finding(severity, code, ann, images, message, fix) -> Finding:
    info = images.get(ann.get("image_id")) or {}
    return Finding(severity, code, _ann_where(ann, images), message, fix,
                   file=info.get("file_name"), image_id=ann.get("image_id"),
                   ann_id=ann.get("id"), category_id=ann.get("category_id"))


def _cat_finding(severity, code, cat, message, fix) -> Finding:
    return Finding(severity, code, f"category {cat.get('id')} ({cat.get('name')})", message,
                   fix, category_id=cat.get("id"))


# ----------------------------------------------------------------------------- boxes

def xywh_to_clipped_xyxy(bbox: Sequence[float], width: float, height: float) -> list[float]:
    """COCO bbox [x, y, w, h] -> [x1, y1, x2, y2] clipped to the width x height image."""
    x, y, w, h = (float(v) for v in bbox)
    return [min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes (0 when both are empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])   # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def segmentation_rle(segm, height: int, width: int) -> Optional[dict]:
    """pycocotools RLE of a COCO segmentation (polygons, compressed or uncompressed RLE;
    an RLE is taken at its own size), or None when no polygon has 3 points."""
    if isinstance(segm, dict):
        return (mask_utils.frPyObjects(segm, *segm["size"]) if isinstance(segm["counts"], list)
                else segm)
    polygons = [p for p in segm if len(p) >= 6]   # < 3 points cannot be drawn
    if not polygons:
        return None
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


# ----------------------------------------------------------------------------- the JSON

def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_bbox(bbox) -> bool:
    return (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in bbox))


def missing_sections(coco: dict) -> list[Finding]:
    """A COCO instances file has images, annotations and categories lists."""
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(coco.get(k), list)]
    if not missing:
        return []
    return [Finding("error", "missing-section", "",
                    f"lacks {missing} (or they are not lists); a COCO instances file has "
                    f"images, annotations and categories",
                    "export the data set as COCO instances (or name its format: [data] "
                    "format / --format)")]


_SECTIONS = (("images", "image"), ("annotations", "annotation"), ("categories", "category"))


def _missing_ids(coco: dict) -> list[Finding]:
    found = []
    for section, what in _SECTIONS:
        for k, entry in enumerate(coco[section]):
            if not isinstance(entry, dict) or not _is_id(entry.get("id")):
                shown = entry.get("id") if isinstance(entry, dict) else entry
                found.append(Finding("error", "missing-id", f"{section}[{k}]",
                                     f"an entry of {section!r} without an integer 'id' "
                                     f"({shown!r})",
                                     f"give every {what} a unique integer id"))
    return found


def json_errors(coco: dict) -> list[Finding]:
    """The JSON content the loader cannot interpret (CocoInstances raises the first):
    entries without an integer id or not objects, images without file_name / width /
    height, annotations whose image or category is not listed, bboxes that are not 4
    finite numbers."""
    found = _missing_ids(coco)
    coco = {k: [e for e in coco[k] if isinstance(e, dict)] for k, _ in _SECTIONS}
    cat_ids = sorted(c["id"] for c in coco["categories"] if _is_id(c.get("id")))
    images = {i.get("id"): i for i in coco["images"]}
    for info in coco["images"]:
        for key in ("file_name", "width", "height"):
            if key not in info:
                found.append(_image_finding(
                    "error", "image-fields", info, f"has no {key!r}",
                    "give every image entry id, file_name, width and height"))
            elif key != "file_name" and not _positive(info[key]):
                found.append(_image_finding(
                    "error", "image-fields", info, f"has {key} {info[key]!r}",
                    f"write the image's {key} in pixels, a positive integer"))
    for ann in coco["annotations"]:
        if ann.get("image_id") not in images:
            found.append(_ann_finding(
                "error", "unknown-image", ann, images,
                f"refers to image {ann.get('image_id')}, which is not in 'images'",
                "add the image entry or remove the annotation"))
        if ann.get("category_id") not in cat_ids:
            found.append(_ann_finding(
                "error", "unknown-category", ann, images,
                f"has category_id {ann.get('category_id')}, not in 'categories' {cat_ids}",
                "list the category in 'categories' (ids 0-based here but 1-based there, "
                "or the other way round, is the usual cause: renumber one of them)"))
        if not _valid_bbox(ann.get("bbox")):
            found.append(_ann_finding(
                "error", "bad-bbox", ann, images,
                f"has bbox {ann.get('bbox')!r}; expected [x, y, width, height] of 4 finite "
                f"numbers", "write the COCO bbox [x, y, width, height] in pixels"))
    return found


def _duplicate_ids(coco: dict) -> list[Finding]:
    """Ids must be unique integers: pycocotools indexes by id, and the later entry of a
    duplicate silently replaces the earlier one."""
    found = []
    for section, what in _SECTIONS:
        counts = Counter(e.get("id") for e in coco[section] if _is_id(e.get("id")))
        for value, n in sorted(counts.items()):
            if n > 1:
                found.append(Finding(
                    "error", f"duplicate-{what}-id", f"{what} {value}",
                    f"{n} {section} have id {value}; only the last is used",
                    f"give every {what} a unique id",
                    image_id=value if what == "image" else None,
                    ann_id=value if what == "annotation" else None,
                    category_id=value if what == "category" else None))
    names = Counter(i.get("file_name") for i in coco["images"] if "file_name" in i)
    for name, n in sorted(names.items()):
        if n > 1:
            found.append(Finding("warning", "duplicate-file", f"file {name}",
                                 f"{n} image entries name the file {name}",
                                 "merge their annotations into one image entry",
                                 file=name))
    return found


# ----------------------------------------------------------------------------- the index

@dataclass
class _Data:
    """The parts of a COCO dict later checks can rely on: images (by id, with file_name,
    width and height), categories (by id), the annotations whose image, category and
    bbox are valid, and the image root."""
    images: dict
    cats: dict
    anns: list
    root: Path


def _index(coco: dict, root: Path) -> _Data:
    images = {i["id"]: i for i in coco["images"] if _is_id(i.get("id")) and "file_name" in i
              and _positive(i.get("width")) and _positive(i.get("height"))}
    cats = {c["id"]: c for c in coco["categories"] if _is_id(c.get("id"))}
    anns = [a for a in coco["annotations"] if a.get("image_id") in images
            and a.get("category_id") in cats and _valid_bbox(a.get("bbox"))]
    return _Data(images, cats, anns, root)


# ----------------------------------------------------------------------------- categories

def _category_ids(data: _Data) -> list[Finding]:
    """Id 0 and gaps work here (labels are the sorted ids' positions) but not in tools
    that take category_id as the class index; a 'background' category is a mistake."""
    found = []
    if not data.cats:
        return [Finding("error", "no-categories", "categories", "'categories' is empty",
                        "list the object classes in 'categories' (ids from 1)")]
    for cat in data.cats.values():
        if str(cat.get("name", "")).strip().lower() in BACKGROUND_NAMES:
            found.append(_cat_finding(
                "error", "background-category", cat,
                "is a background class; Mask R-CNN adds background itself, so this one "
                "becomes an object class that has no objects",
                "remove it from 'categories' (and from the annotations)"))
        elif cat["id"] <= 0:
            found.append(_cat_finding(
                "warning", "category-id-zero", cat,
                f"has id {cat['id']}: this library maps the sorted ids to labels 1..K, so "
                f"it trains; tools that take category_id as the label (torchvision's "
                f"references, most converters) read 0 as background",
                "renumber the categories from 1 (in 'categories' and the annotations)"))
    ids = sorted(i for i in data.cats if i > 0)
    gaps = sorted(set(range(ids[0], ids[-1] + 1)) - set(ids)) if ids else []
    if gaps:
        shown = ", ".join(map(str, gaps[:8])) + (", ..." if len(gaps) > 8 else "")
        found.append(Finding(
            "warning", "category-gaps", "categories",
            f"the ids {ids[0]}..{ids[-1]} skip {shown}: harmless here (labels follow the "
            f"sorted ids, as for COCO's 80 ids in 1..90), but a dropped category leaves "
            f"exactly this trace",
            "nothing if the gaps are intended; else restore the missing categories"))
    return found


def _few_instances(data: _Data, min_instances: int) -> list[Finding]:
    """Categories with fewer than min_instances non-crowd instances (crowd ones are not
    training targets)."""
    counts = Counter(a["category_id"] for a in data.anns if not a.get("iscrowd", 0))
    crowd = Counter(a["category_id"] for a in data.anns if a.get("iscrowd", 0))
    found = []
    for cid, cat in sorted(data.cats.items()):
        n = counts.get(cid, 0)
        if n < min_instances:
            extra = f" ({crowd[cid]} crowd, not training targets)" if crowd.get(cid) else ""
            found.append(_cat_finding(
                "warning", "few-instances", cat,
                f"has {n} instance{'' if n == 1 else 's'}{extra}, fewer than "
                f"{min_instances}: its AP will be "
                f"noise or 0", "annotate more of it, merge it into a related category or "
                               "drop it"))
    return found


def _crowd(data: _Data) -> list[Finding]:
    if not data.anns:
        return [Finding("error", "no-annotations", "annotations", "no usable annotations",
                        "annotate the images (or check the image_id / category_id links)")]
    if all(a.get("iscrowd", 0) for a in data.anns):
        return [Finding("error", "all-crowd", "annotations",
                        f"all {len(data.anns)} annotations have iscrowd = 1: crowd regions "
                        f"are not training targets, so nothing is learned",
                        "set iscrowd = 0 for single objects (iscrowd = 1 is for regions of "
                        "many objects that are not annotated one by one)")]
    return []


# ----------------------------------------------------------------------------- boxes and masks

@dataclass
class _Geometry:
    """One annotation's box (unclipped [x1, y1, x2, y2] of its bbox) and mask (area in
    pixels and tight [x1, y1, x2, y2]; None without a segmentation)."""
    ann: dict
    width: int
    height: int
    box: list
    mask_area: Optional[float] = None
    mask_box: Optional[list] = None


def _geometry(data: _Data) -> tuple[list[_Geometry], list[Finding]]:
    """Measures every annotation's mask as RLE (no drawing); reports masks that are
    missing, of the wrong size or unreadable."""
    geoms, found = [], []
    for ann in data.anns:
        info = data.images[ann["image_id"]]
        g = _Geometry(ann, info["width"], info["height"], _xyxy(ann["bbox"]))
        geoms.append(g)
        segm = ann.get("segmentation")
        if ann.get("iscrowd", 0):
            continue
        if not segm:
            found.append(_ann_finding(
                "warning", "no-mask", ann, data.images,
                "has no segmentation: a box-only instance (no mask target)",
                "add its polygon or RLE; for a box-only detector set [model] mask_on = "
                "false"))
            continue
        problem = _measure_mask(g, segm)
        if problem:
            found.append(_ann_finding("error", problem[0], ann, data.images, *problem[1:]))
    return geoms, found


def _measure_mask(g: _Geometry, segm) -> Optional[tuple[str, str, str]]:
    """Fills g.mask_area and g.mask_box; (code, message, fix) when the segmentation
    cannot be used."""
    if isinstance(segm, dict) and [int(v) for v in segm.get("size", ())] != [g.height, g.width]:
        return ("rle-size", f"has an RLE of size {segm.get('size')} (height, width) but "
                            f"the image is [{g.height}, {g.width}]",
                "encode the mask at the image's size (or correct the image's width/height)")
    try:
        rle = segmentation_rle(segm, g.height, g.width)
    except Exception as exc:   # noqa: BLE001 (pycocotools raises bare Exception)
        return ("bad-segmentation", f"has a segmentation pycocotools cannot read ({exc})",
                "write polygons [[x1, y1, x2, y2, ...], ...] or an RLE {size, counts}")
    if rle is None:
        g.mask_area, g.mask_box = 0.0, None
        return None
    g.mask_area = float(mask_utils.area(rle))
    if g.mask_area > 0:
        g.mask_box = _xyxy(mask_utils.toBbox(rle).tolist())
    return None


def _masks(geoms: list[_Geometry], data: _Data) -> list[Finding]:
    """Empty and tiny masks, and boxes far from their mask's box."""
    found = []
    for g in geoms:
        if g.mask_area is None:
            continue
        ann = g.ann
        if g.mask_area == 0:
            found.append(_ann_finding(
                "warning", "empty-mask", ann, data.images,
                "has a segmentation without pixels (polygons of < 3 points, or an empty "
                "RLE): the loader drops the instance", "redraw the mask or remove the "
                                                       "annotation"))
        elif g.mask_area < TINY_MASK_PIXELS:
            found.append(_ann_finding(
                "warning", "tiny-mask", ann, data.images,
                f"has a mask of {g.mask_area:.0f} pixels (< {TINY_MASK_PIXELS})",
                "check it is an object and not a stray click; remove it if not"))
        if g.mask_box is not None:
            box = xywh_to_clipped_xyxy(ann["bbox"], g.width, g.height)
            iou = box_iou(box, g.mask_box)
            if iou < MIN_MASK_BOX_IOU:
                found.append(_ann_finding(
                    "warning", "box-mask-disagree", ann, data.images,
                    f"box {_rounded(ann['bbox'])} (x, y, w, h) and its mask's box "
                    f"{_rounded(_to_xywh(g.mask_box))} overlap with IoU {iou:.2f} < "
                    f"{MIN_MASK_BOX_IOU}: the loader trains on the mask's box, pycocotools "
                    f"evaluates bbox AP on the JSON's box",
                    "recompute bbox from the mask (pycocotools mask.toBbox)"))
    return found


def _boxes(geoms: list[_Geometry], data: _Data) -> list[Finding]:
    """Empty boxes, boxes (mostly) outside their image."""
    found, outside = [], []
    for g in geoms:
        x1, y1, x2, y2 = g.box
        area = (x2 - x1) * (y2 - y1)
        if x2 <= x1 or y2 <= y1:
            found.append(_ann_finding(
                "warning", "empty-box", g.ann, data.images,
                f"has bbox {_rounded(g.ann['bbox'])} with width or height <= 0: the loader "
                f"drops the instance", "write [x, y, width, height] with width, height > 0"))
            continue
        inside = xywh_to_clipped_xyxy(g.ann["bbox"], g.width, g.height)
        share = (inside[2] - inside[0]) * (inside[3] - inside[1]) / area
        if share < MIN_INSIDE:
            outside.append(g)
            found.append(_ann_finding(
                "warning", "box-outside", g.ann, data.images,
                f"bbox {_rounded(g.ann['bbox'])} has {share:.0%} of its area inside the "
                f"{g.width}x{g.height} image: the loader clips it (drops it when nothing "
                f"is inside)", "correct the box (coordinates of this image, in pixels)"))
    if len(outside) >= 2 and len(outside) > MOSTLY * len(geoms):
        found.append(Finding(
            "error", "boxes-outside", "annotations",
            f"{len(outside)} of {len(geoms)} boxes lie mostly outside their images (e.g. "
            f"{_ann_where(outside[0].ann, data.images)}): the coordinates do not belong "
            f"to these images' sizes", "check the images are the annotated ones (not "
                                       "resized copies) and the boxes are in pixels",
            ann_id=outside[0].ann.get("id")))
    return found


def _normalised(geoms: list[_Geometry], data: _Data) -> list[Finding]:
    """Every box within [0, 1]: normalised coordinates (YOLO style), not pixels."""
    if not geoms or max(max(g.box) for g in geoms) > 1.0 + 1e-6:
        return []
    if all(g.width <= 2 and g.height <= 2 for g in geoms):
        return []
    return [Finding("error", "normalised-boxes", "annotations",
                    f"all {len(geoms)} boxes lie within [0, 1] (e.g. "
                    f"{_ann_where(geoms[0].ann, data.images)}: {_rounded(geoms[0].ann['bbox'])}"
                    f"): normalised coordinates, but COCO boxes are in pixels",
                    "multiply x and w by the image width, y and h by its height",
                    ann_id=geoms[0].ann.get("id"))]


def _box_convention(geoms: list[_Geometry], data: _Data) -> list[Finding]:
    """Boxes written as [x1, y1, x2, y2]: told apart by the masks' boxes where there are
    masks (an error), else guessed from the boxes alone (a warning)."""
    masked = [g for g in geoms if g.mask_box is not None]
    if masked:
        xyxy = [g for g in masked if _reads_as_xyxy(g)]
        if not xyxy or len(xyxy) <= MOSTLY * len(masked):
            return []
        g = xyxy[0]
        return [Finding(
            "error", "box-convention", "annotations",
            f"{len(xyxy)} of {len(masked)} boxes match their mask's box when read as "
            f"[x1, y1, x2, y2], not as COCO's [x, y, w, h] (e.g. "
            f"{_ann_where(g.ann, data.images)}: bbox {_rounded(g.ann['bbox'])}, mask box "
            f"{_rounded(g.mask_box)} as x1, y1, x2, y2)", _XYXY_FIX, ann_id=g.ann.get("id"))]
    boxes = [g for g in geoms if not g.ann.get("iscrowd", 0)]
    if len(boxes) < 5 or not all(_fits_as_xyxy(g) for g in boxes):
        return []
    over = [g for g in boxes if g.box[2] > g.width + 1 or g.box[3] > g.height + 1]
    if len(over) < XYXY_OVERFLOW * len(boxes):
        return []
    g = over[0]
    return [Finding(
        "warning", "box-convention", "annotations",
        f"every box has its 3rd and 4th numbers above the 1st and 2nd and fits the image as "
        f"[x1, y1, x2, y2], while {len(over)} of {len(boxes)} overflow it as COCO's "
        f"[x, y, w, h] (e.g. {_ann_where(g.ann, data.images)}: bbox "
        f"{_rounded(g.ann['bbox'])} in a {g.width}x{g.height} image)", _XYXY_FIX,
        ann_id=g.ann.get("id"))]


_XYXY_FIX = "convert the boxes: [x1, y1, x2, y2] -> [x1, y1, x2 - x1, y2 - y1]"


def _reads_as_xyxy(g: _Geometry) -> bool:
    as_xyxy = box_iou([float(v) for v in g.ann["bbox"]], g.mask_box)
    return as_xyxy >= XYXY_IOU and as_xyxy > box_iou(g.box, g.mask_box) + XYXY_MARGIN


def _fits_as_xyxy(g: _Geometry) -> bool:
    a, b, c, d = (float(v) for v in g.ann["bbox"])
    return c > a and d > b and c <= g.width + 1 and d <= g.height + 1


def _to_xywh(box: Sequence[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _rounded(values: Iterable[float]) -> list:
    return [round(float(v), 1) for v in values]


_ROOT_CAUSES = {"box-convention": ("box-mask-disagree", "box-outside", "boxes-outside"),
                "normalised-boxes": ("box-mask-disagree", "empty-box"),
                "boxes-outside": ("box-mask-disagree", "box-outside")}


def _without_consequences(found: list[Finding]) -> list[Finding]:
    """A set-wide box mistake shows in every box, a wrong image size in every RLE of the
    image: report the cause, not each symptom."""
    codes = {f.code for f in found}
    hidden = {c for cause, shown in _ROOT_CAUSES.items() if cause in codes for c in shown}
    resized = {f.image_id for f in found if f.code == "size-mismatch"}
    return [f for f in found if f.code not in hidden
            and not (f.code == "rle-size" and f.image_id in resized)]


# ----------------------------------------------------------------------------- image files

def _files(data: _Data, fast: bool, progress: bool) -> list[Finding]:
    """Missing, unreadable and truncated files; sizes that differ from the JSON (whether
    EXIF orientation explains it); EXIF orientation tags."""
    if not data.root.is_dir():
        return [Finding("error", "missing-image-dir", str(data.root),
                        f"the image directory {data.root} does not exist",
                        "point --images / [data] train_images, val_images at the images")]
    found = []
    for info in _bar(list(data.images.values()), progress, "check images"):
        found += _one_file(info, data.root / info["file_name"], fast)
    return found


def _one_file(info: dict, path: Path, fast: bool) -> list[Finding]:
    if not path.is_file():
        return [_image_finding("error", "missing-file", info, f"the file {path} does not exist",
                               "put the image there, or correct file_name in the JSON "
                               "(relative to the image directory)")]
    try:
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            orientation = _orientation(img)
            if not fast:
                img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return [_image_finding("error", "unreadable-file", info,
                               f"the file {path} cannot be read: {exc}",
                               "re-export or re-download the image")]
    if mode == "F":
        return [_image_finding("error", "unreadable-file", info,
                               f"the file {path} has 32-bit float pixels (mode F)",
                               "convert it to 8- or 16-bit")]
    return _size(info, path, size, orientation)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when none) from the header: Pillow's PNG getexif()
    decodes the whole image to look behind the pixels, so for PNG only the eXIf chunk
    before them (where the PNG spec puts it) is read."""
    if img.format == "PNG":
        raw = img.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
    else:
        exif = img.getexif()
    return int(exif.get(EXIF_ORIENTATION_TAG, 1) or 1)


def _size(info: dict, path: Path, size: tuple, orientation: int) -> list[Finding]:
    """The JSON's width x height against the file's, EXIF orientation considered."""
    json_size = (int(info["width"]), int(info["height"]))
    turn = EXIF_TURNS.get(orientation)
    if size == json_size:
        if turn is None:
            return []
        return [_image_finding(
            "warning", "exif-orientation", info,
            f"the file has EXIF orientation {orientation} (viewers show it {turn}); this "
            f"library, like pycocotools, uses the stored pixels, and the JSON's size "
            f"matches them: if the annotation tool showed the turned view, the masks are "
            f"misplaced", "look at an overlay; store the pixels turned and drop the tag "
                          "(PIL ImageOps.exif_transpose) before annotating")]
    stored = f"{size[0]}x{size[1]}"
    said = f"{json_size[0]}x{json_size[1]}"
    if size[::-1] == json_size and orientation >= 5:
        why = (f"EXIF orientation {orientation} ({turn}) explains it: the JSON describes "
               f"the turned view, the annotations were drawn on it, but the stored pixels "
               f"are {stored} and that is what is read")
        fix = ("store the images turned: PIL ImageOps.exif_transpose(img).save(...) (it "
               "drops the tag), then the annotations fit")
    elif size[::-1] == json_size:
        why = "width and height are swapped in the JSON (no EXIF orientation explains it)"
        fix = "swap width and height in the JSON (and check the masks' orientation)"
    else:
        why = "not explained by EXIF orientation; a resized copy of the annotated image?"
        fix = "use the annotated images, or correct width/height (and rescale the annotations)"
    return [_image_finding("error", "size-mismatch", info,
                           f"the file {path} is {stored} (width x height) but the JSON says "
                           f"{said}: {why}", fix)]


def _bar(items: list, progress: bool, desc: str):
    if not progress or len(items) < 500:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="img", leave=False)


# ----------------------------------------------------------------------------- entry points

def check_dataset(coco: dict, image_root: PathLike, min_instances: int = MIN_INSTANCES,
                  fast: bool = False, progress: bool = False) -> list[Finding]:
    """All checks of one data set (see the module docstring): errors first, then
    warnings, each group in the order of the checks.

    Args:
        coco: a COCO instances dict (images, annotations, categories).
        image_root: the directory the images' file_names are relative to.
        min_instances: categories with fewer non-crowd instances are reported.
        fast: read only image headers (not decode every image).
        progress: a tqdm bar over the images (for large sets).
    """
    found = missing_sections(coco)
    if found:
        return found
    found = json_errors(coco)
    # the other checks read the entries that are objects (json_errors named the others)
    coco = dict(coco, **{k: [e for e in coco[k] if isinstance(e, dict)] for k, _ in _SECTIONS})
    found += _duplicate_ids(coco)
    data = _index(coco, Path(image_root))
    found += _category_ids(data) + _few_instances(data, min_instances) + _crowd(data)
    geoms, mask_found = _geometry(data)
    found += mask_found + _normalised(geoms, data) + _box_convention(geoms, data)
    found += _masks(geoms, data) + _boxes(geoms, data)
    found += _files(data, fast, progress)
    found = _without_consequences(found)
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))


def check_split_pair(train: dict, val: dict) -> list[Finding]:
    """Train and val must list the same categories (ids and names): the model's classes
    are the training set's, and evaluation looks them up in val by id."""
    cats = [{c.get("id"): str(c.get("name")) for c in d.get("categories") or []}
            for d in (train, val)]
    if cats[0] == cats[1]:
        return []
    only_train = sorted(set(cats[0]) - set(cats[1]))
    only_val = sorted(set(cats[1]) - set(cats[0]))
    renamed = sorted(i for i in set(cats[0]) & set(cats[1]) if cats[0][i] != cats[1][i])
    parts = [f"only in train: {only_train}" if only_train else "",
             f"only in val: {only_val}" if only_val else "",
             "named differently: " + ", ".join(f"{i} ({cats[0][i]!r} / {cats[1][i]!r})"
                                               for i in renamed) if renamed else ""]
    return [Finding("error", "split-mismatch", "categories",
                    "train and val categories differ: " + "; ".join(p for p in parts if p),
                    "use the same 'categories' list (ids and names) in both files")]


def dataset_stats(coco: dict) -> dict:
    """Counts for the report: images (and those without annotations), annotations,
    crowd, mask-less, and per category (id, name, instances (non-crowd), crowd)."""
    anns = [a for a in coco.get("annotations") or [] if isinstance(a, dict)]
    per_cat, crowd = Counter(), Counter()
    for a in anns:
        (crowd if a.get("iscrowd", 0) else per_cat)[a.get("category_id")] += 1
    annotated = {a.get("image_id") for a in anns}
    images = coco.get("images") or []
    return dict(
        images=len(images),
        images_without_annotations=sum(1 for i in images if i.get("id") not in annotated),
        annotations=len(anns), crowd=sum(crowd.values()),
        without_mask=sum(1 for a in anns if not a.get("iscrowd", 0)
                         and not a.get("segmentation")),
        categories=[dict(id=c.get("id"), name=c.get("name"), instances=per_cat[c.get("id")],
                         crowd=crowd[c.get("id")]) for c in coco.get("categories") or []])


def check_sets(sets: Sequence[tuple], min_instances: int = MIN_INSTANCES, fast: bool = False,
               progress: bool = False) -> list[CheckedSet]:
    """sets: [(name, source, coco dict, image root)], train first. Checks each, and
    (with two) that their categories agree (reported with the second)."""
    checked = [CheckedSet(name, str(source), str(root), dataset_stats(coco),
                          check_dataset(coco, root, min_instances, fast, progress))
               for name, source, coco, root in sets]
    if len(sets) == 2:
        checked[1].findings += check_split_pair(sets[0][2], sets[1][2])
    return checked


def has_errors(checked: Sequence[CheckedSet]) -> bool:
    return any(f.severity == "error" for c in checked for f in c.findings)


# ----------------------------------------------------------------------------- report

def _table(header: Sequence[str], rows: Sequence[Sequence], right: Sequence[int] = ()) -> str:
    """Plain-text table; columns aligned, those in `right` right-aligned."""
    cells = [list(map(str, header))] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.rjust(w) if i in right else v.ljust(w)   # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join(fmt(r) for r in cells)


def _summary(checked: CheckedSet) -> list[str]:
    s = checked.stats
    lines = [f"== {checked.name} set: {checked.source}"
             + (f" (images in {checked.image_root})" if checked.image_root else "")]
    if not s:     # a loader's error: the JSON was not read through
        return lines
    crowd = s["crowd"] / s["annotations"] if s["annotations"] else 0.0
    lines += [f"images {s['images']} ({s['images_without_annotations']} without annotations), "
             f"annotations {s['annotations']}: crowd {s['crowd']} ({crowd:.1%}), "
             f"without mask {s['without_mask']}"]
    if s["categories"]:
        rows = [(c["name"], c["id"], c["instances"], c["crowd"]) for c in s["categories"]]
        lines += ["", _table(("category", "id", "instances", "crowd"), rows, right=(1, 2, 3))]
    return lines


def _findings_table(findings: Sequence[Finding], first: int = 3) -> list[str]:
    groups: dict = defaultdict(list)
    for f in findings:
        groups[(f.severity, f.code)].append(f)
    rows = [(sev, code, len(fs), "; ".join(f.where or "the JSON" for f in fs[:first])
             + ("; ..." if len(fs) > first else ""))
            for (sev, code), fs in groups.items()]
    return ["", _table(("severity", "code", "count", "first"), rows, right=(2,))]


def _details(findings: Sequence[Finding]) -> list[str]:
    lines, shown = [""], Counter()
    for f in findings:
        shown[f.code] += 1
        if shown[f.code] <= DETAILS_PER_CODE:
            lines += [f"{f.severity} {f.code}: {f.where or 'the JSON'}: {f.message}",
                      f"    fix: {f.fix}"]
    for code, n in shown.items():
        if n > DETAILS_PER_CODE:
            lines.append(f"... and {n - DETAILS_PER_CODE} more {code} (--json lists all)")
    return lines


def format_report(checked: Sequence[CheckedSet], details: bool = True,
                  stats: bool = True) -> str:
    """The report: per set, its counts and instances per category (stats), a row per
    finding code (count, first offenders) and the findings with their fixes (details);
    then the verdict."""
    lines: list = []
    for c in checked:
        lines += _summary(c) if stats else _summary(CheckedSet(c.name, c.source, "", {}))
        if c.findings:
            lines += _findings_table(c.findings) + (_details(c.findings) if details else [])
        else:
            lines += ["", "no problems found"]
        lines.append("")
    lines.append(verdict(checked))
    return "\n".join(lines)


def verdict(checked: Sequence[CheckedSet]) -> str:
    errors = sum(f.severity == "error" for c in checked for f in c.findings)
    warnings = sum(f.severity == "warning" for c in checked for f in c.findings)
    if errors:
        return (f"{errors} error(s), {warnings} warning(s): fix the errors before training "
                f"(training would fail or learn the wrong thing)")
    if warnings:
        return f"no errors, {warnings} warning(s): the data trains; look at the warnings"
    return "no problems found"


def report_dict(checked: Sequence[CheckedSet]) -> dict:
    """The report as JSON-ready data (--json): every finding, not only the first few."""
    return dict(
        errors=sum(f.severity == "error" for c in checked for f in c.findings),
        warnings=sum(f.severity == "warning" for c in checked for f in c.findings),
        sets=[dict(name=c.name, source=c.source, image_root=c.image_root, stats=c.stats,
                   findings=[f.as_dict() for f in c.findings]) for c in checked])


def report_json(checked: Sequence[CheckedSet]) -> str:
    return json.dumps(report_dict(checked), indent=2)
