"""YOLO segmentation (Ultralytics): a data.yaml plus one label .txt per image.

Source: the data.yaml (or a folder holding one). Its keys:
- `path`: the data set root (relative: to the yaml's folder, else to the working
  directory; absent: the yaml's folder) - the image root of the COCO dict;
- `train` / `val`: the split's images under the root: a folder (searched recursively for
  .jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp), a .txt list of image paths (relative to the
  list's folder), or a list of those; `split` picks the key. An entry starting with ../
  that does not exist is also tried without it, as Ultralytics does for Roboflow's
  exports (data.yaml beside train/ and valid/, entries `../train/images`);
- `names`: the class names, a list or a {index: name} dict.
Labels follow the YOLO convention: the image's path with its last `images` folder
replaced by `labels` and the suffix by .txt (images/train/a.jpg -> labels/train/a.txt;
a path without an `images` folder: the .txt beside the image); an image without a label
file has no instance (a background image).

Each label line is `class x1 y1 x2 y2 ...`: a polygon normalised by the image size,
scaled back by width (x) and height (y) into the COCO polygon in pixel coordinates that
pycocotools rasterises (so exactly the mask of `ultralytics.data.converter`'s COCO
polygons, up to the 6 decimals it writes). A line of 4 numbers `class cx cy w h` (YOLO
detection) is a box-only instance. Class k -> names[k] -> category id k + 1 (or its place
in `classes`, when given). Width/height come from the image file's header.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from .common import IMAGE_SUFFIXES, CocoBuilder, FormatError, image_size, relative


def read_yolo(source: Path, image_dir: Optional[Path] = None, split: str = "train",
              classes: Optional[Sequence[str]] = None) -> tuple[dict, Path]:
    """(COCO dict, image root) of the `split` of a YOLO data.yaml (see the module doc).
    image_dir: the split's image folder instead of the yaml's entry."""
    yaml_path = source / "data.yaml" if source.is_dir() else source
    spec = _read_yaml(yaml_path)
    root = _root(spec, yaml_path)
    names = _names(spec, yaml_path)
    if image_dir is not None:
        files = _images_of(Path(image_dir), yaml_path)
    else:
        if split not in spec:
            raise FormatError(f"yolo: {yaml_path} has no {split!r} key (the {split} images)")
        entries = spec[split] if isinstance(spec[split], list) else [spec[split]]
        files = [f for e in entries for f in _images_of(_entry(root, str(e)), yaml_path)]
    builder = CocoBuilder("yolo", yaml_path)
    for file in tqdm(files, desc="reading YOLO", unit="image", disable=None, leave=False):
        width, height = image_size(file)
        image = builder.add_image(relative(file, root), width, height)
        _add_labels(builder, image, label_path(file), names)
    return builder.build(list(classes) if classes else names), root


def label_path(image: Path) -> Path:
    """images/.../a.jpg -> labels/.../a.txt (the last `images` folder of the path)."""
    parts = list(image.parts)
    if "images" in parts:
        k = len(parts) - 1 - parts[::-1].index("images")
        parts[k] = "labels"
    return Path(*parts).with_suffix(".txt")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FormatError(f"yolo: {path} not found (give the data set's data.yaml)")
    try:
        import yaml
    except ImportError as exc:
        raise FormatError("yolo: reading data.yaml needs PyYAML: pip install pyyaml") from exc
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FormatError(f"yolo: {path} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise FormatError(f"yolo: {path} is not a mapping of path/train/val/names")
    return spec


def _root(spec: dict, yaml_path: Path) -> Path:
    if not spec.get("path"):
        return yaml_path.parent
    root = Path(str(spec["path"]))
    if root.is_absolute():
        return root
    beside = yaml_path.parent / root
    return beside if beside.is_dir() or not root.is_dir() else root


def _entry(root: Path, entry: str) -> Path:
    """The path of a split entry: root / entry, or without a leading ../ when only that
    exists (Roboflow's data.yaml)."""
    path = root / entry
    if not path.exists() and entry.startswith("../") and (root / entry[3:]).exists():
        return root / entry[3:]
    return path


def _names(spec: dict, yaml_path: Path) -> list[str]:
    names = spec.get("names")
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except ValueError as exc:
            raise FormatError(f"yolo: {yaml_path}: names keys must be class indices") from exc
        if keys != list(range(len(keys))):
            raise FormatError(f"yolo: {yaml_path}: names indices {keys} are not 0..{len(keys) - 1}")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    if not isinstance(names, list) or not names:
        raise FormatError(f"yolo: {yaml_path} has no 'names' list or dict of class names")
    return [str(n) for n in names]


def _images_of(entry: Path, yaml_path: Path) -> list[Path]:
    """Image files of one split entry: a folder (recursive) or a .txt list."""
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if entry.is_file() and entry.suffix == ".txt":
        lines = [s.strip() for s in entry.read_text().splitlines() if s.strip()]
        return [p if p.is_absolute() else entry.parent / p for p in map(Path, lines)]
    raise FormatError(f"yolo: {yaml_path}: image folder or list {entry} not found")


def _add_labels(builder: CocoBuilder, image: dict, path: Path, names: list[str]) -> None:
    if not path.is_file():
        return
    width, height = image["width"], image["height"]
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"yolo: {path}, line {number}"
        try:
            values = [float(v) for v in line.split()]
        except ValueError as exc:
            raise FormatError(f"{where}: {line!r} is not numbers") from exc
        k, coords = int(values[0]), values[1:]
        if values[0] != k or not 0 <= k < len(names):
            raise FormatError(f"{where}: class {values[0]:g} is not one of the "
                              f"{len(names)} classes of data.yaml (0..{len(names) - 1})")
        if len(coords) == 4:    # detection label: centre x, centre y, width, height
            cx, cy, w, h = coords
            builder.add_box(image, names[k], [(cx - w / 2) * width, (cy - h / 2) * height,
                                              w * width, h * height], where)
        elif len(coords) >= 6 and len(coords) % 2 == 0:
            polygon = [v * (width if i % 2 == 0 else height) for i, v in enumerate(coords)]
            builder.add_polygons(image, names[k], [polygon], where)
        else:
            raise FormatError(f"{where}: {len(coords)} coordinates; expected a polygon "
                              f"(x y pairs, at least 3) or a box (cx cy w h)")
