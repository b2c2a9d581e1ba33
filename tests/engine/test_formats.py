"""engine.formats: labelme, Pascal VOC and YOLO-seg data sets written here from a COCO
source (make_shapes) by writers of this file, with the tools' quirks, read back with our
readers and compared with what the source says (pycocotools rasterises and decodes:
the oracle); two training iterations from each format; `maskrcnn convert-data`."""
import base64
import io
import json
import logging
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from engine.formats import FORMATS, FormatError, to_coco, write_coco


# ----------------------------------------------------------------------------- source

@pytest.fixture(scope="module")
def source(shapes_data):
    """[{stem, path, width, height, anns: [(name, bbox, mask uint8[H, W])]}] of the
    shapes training set (8 images of 64 px, 3 classes)."""
    json_path, image_dir = shapes_data["train"]
    data = json.loads(Path(json_path).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = []
    for info in data["images"]:
        anns = [(names[a["category_id"]], [float(v) for v in a["bbox"]],
                 mask_utils.decode(a["segmentation"]))
                for a in data["annotations"] if a["image_id"] == info["id"]]
        images.append(dict(stem=Path(info["file_name"]).stem,
                           path=Path(image_dir) / info["file_name"],
                           width=info["width"], height=info["height"], anns=anns))
    return images


def _row_polygon(mask, rows=None):
    """Pixel-corner polygon [x1, y1, ...] down the left edges of each row's first pixel
    and up the right edges of its last (the mask itself where each row is one run)."""
    rows = np.flatnonzero(mask.any(1)) if rows is None else rows
    left, right = [], []
    for y in rows:
        xs = np.flatnonzero(mask[y])
        left += [(xs[0], y), (xs[0], y + 1)]
        right += [(xs[-1] + 1, y), (xs[-1] + 1, y + 1)]
    return [float(v) for point in left + right[::-1] for v in point]


def _rasterise(polygons, width, height):
    """pycocotools' mask uint8[H, W] of polygons in pixel coordinates (the oracle)."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))


def _box_of(mask):
    return [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))]


def _read(coco_dict):
    """{file stem: [(category name, bbox, mask uint8[H, W] or None)]} of a COCO dict,
    decoded by pycocotools (annotations in id order)."""
    coco = COCO()
    coco.dataset = json.loads(json.dumps(coco_dict))     # as written to and read from JSON
    coco.createIndex()
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    out = {}
    for info in coco.dataset["images"]:
        anns = sorted(coco.imgToAnns[info["id"]], key=lambda a: a["id"])
        out[Path(info["file_name"]).stem] = [
            (names[a["category_id"]], a["bbox"],
             coco.annToMask(a) if a.get("segmentation") else None) for a in anns]
    return out


def _assert_same(got, expected):
    """got / expected: {stem: [(name, bbox, mask or None)]}: names, boxes, masks equal."""
    assert sorted(got) == sorted(expected)
    for stem, instances in expected.items():
        assert len(got[stem]) == len(instances), stem
        for (name, box, mask), (want_name, want_box, want_mask) in zip(got[stem], instances):
            assert name == want_name, stem
            assert box == pytest.approx(want_box, abs=1e-4), (stem, name)
            assert (mask is None) == (want_mask is None), (stem, name)
            if mask is not None:
                np.testing.assert_array_equal(mask, want_mask, err_msg=f"{stem} {name}")


def _train_two(tiny_cfg, **data):
    from engine.train import train
    summary = train(tiny_cfg(max_iter=2, batch_size=1, val_json="none", **data),
                    progress=False)
    assert summary["iterations"] == 2
    assert all(np.isfinite(v) for v in summary["last_losses"].values())
    return summary


# ----------------------------------------------------------------------------- labelme

def _write_labelme(source, folder, embed):
    """labelme files: polygons from the source masks; without `embed` the images lie in
    ../images (imagePath relative to the JSON), with it only the base64 imageData holds
    them (imagePath names a file that does not exist) and the first instance of each
    image is two shapes of one group_id. The first file also has a rectangle and a line.
    Returns the expected {stem: [(name, bbox, mask)]}."""
    folder.mkdir(parents=True)
    (folder.parent / "images").mkdir(exist_ok=True)
    expected = {}
    for k, image in enumerate(source):
        w, h = image["width"], image["height"]
        shapes, want = [], []
        for i, (name, _, mask) in enumerate(image["anns"]):
            rows = np.flatnonzero(mask.any(1))
            parts = ([rows[: len(rows) // 2], rows[len(rows) // 2:]]
                     if embed and i == 0 and len(rows) > 1 else [rows])
            polygons = [_row_polygon(mask, r) for r in parts]
            group = 7 if len(parts) > 1 else None
            shapes += [dict(label=name, points=np.reshape(p, (-1, 2)).tolist(),
                            group_id=group, shape_type="polygon", flags={}) for p in polygons]
            union = _rasterise(polygons, w, h)
            want.append((name, _box_of(union), union))
        if k == 0:
            shapes.append(dict(label="circle", points=[[3.0, 4.0], [20.5, 9.0]],
                               group_id=None, shape_type="rectangle", flags={}))
            box = _rasterise([[3, 4, 20.5, 4, 20.5, 9, 3, 9]], w, h)
            want.append(("circle", _box_of(box), box))
            shapes.append(dict(label="square", points=[[1, 1], [9, 9]], group_id=None,
                               shape_type="line", flags={}))
        record = dict(version="5.4.1", flags={}, shapes=shapes, imageHeight=h, imageWidth=w)
        if embed:
            record.update(imagePath=f"{image['stem']}.png",
                          imageData=base64.b64encode(image["path"].read_bytes()).decode())
        else:
            shutil.copy(image["path"], folder.parent / "images" / image["path"].name)
            record.update(imagePath=f"..\\images\\{image['path'].name}", imageData=None)
        (folder / f"{image['stem']}.json").write_text(json.dumps(record))
        expected[image["stem"]] = want
    return expected


@pytest.mark.parametrize("embed", [False, True], ids=["image-files", "imageData"])
def test_labelme_reads_what_was_written(source, tmp_path, caplog, embed):
    expected = _write_labelme(source, tmp_path / "labelme", embed)
    with caplog.at_level(logging.WARNING, logger="engine.formats"):
        coco, root = to_coco("labelme", tmp_path / "labelme")
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    _assert_same(_read(coco), expected)
    for info in coco["images"]:      # the files a data set opens
        with Image.open(root / info["file_name"]) as img:
            assert img.size == (info["width"], info["height"])
    first = f"{source[0]['stem']}.json"
    assert any(first in r.message and "'line'" in r.message for r in caplog.records)
    if embed:
        decoded = root / coco["images"][0]["file_name"]
        assert decoded.parent.name == "labelme_imagedata"
        assert decoded.read_bytes() == source[0]["path"].read_bytes()


def test_labelme_classes_and_missing_image(source, tmp_path):
    _write_labelme(source[:2], tmp_path / "labelme", embed=False)
    coco, _ = to_coco("labelme", tmp_path / "labelme",
                      classes=["triangle", "square", "circle", "star"])
    assert [c["name"] for c in coco["categories"]] == ["triangle", "square", "circle", "star"]
    with pytest.raises(FormatError, match="'circle' is not among the classes"):
        to_coco("labelme", tmp_path / "labelme", classes="square, triangle")
    (tmp_path / "images" / source[1]["path"].name).unlink()
    with pytest.raises(FormatError, match=f"{source[1]['stem']}.json.*imageData"):
        to_coco("labelme", tmp_path / "labelme")


# ----------------------------------------------------------------------------- VOC

def _voc_palette():
    """VOC's colour map (its devkit's bitget construction): index -> RGB."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _border(labels):
    """bool[H, W]: pixels with a 4-neighbour of another value (both sides of every
    boundary), VOC's void band around each object."""
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:] != labels[:-1]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def _save_palette_png(array, path):
    img = Image.fromarray(array.astype(np.uint8), mode="P")
    img.putpalette(_voc_palette())
    img.save(path)


def _write_voc(source, root, classes):
    """A VOC root: JPEGImages, Annotations (1-based boxes; the first object difficult),
    SegmentationObject / SegmentationClass palette PNGs with the 255 border (not for the
    last image: box-only), ImageSets/Segmentation/train.txt. Returns the expected
    {stem: [(name, bbox, mask or None)]}."""
    for sub in ("JPEGImages", "Annotations", "SegmentationObject", "SegmentationClass",
                "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    expected = {}
    for k, image in enumerate(source):
        stem, w, h = image["stem"], image["width"], image["height"]
        Image.open(image["path"]).convert("RGB").save(root / "JPEGImages" / f"{stem}.jpg")
        xml = ET.Element("annotation")
        ET.SubElement(xml, "filename").text = f"{stem}.jpg"
        size = ET.SubElement(xml, "size")
        for tag, value in (("width", w), ("height", h), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        objects = np.zeros((h, w), dtype=np.uint8)
        classes_png = np.zeros((h, w), dtype=np.uint8)
        for i, (name, (x, y, bw, bh), mask) in enumerate(image["anns"]):
            obj = ET.SubElement(xml, "object")
            ET.SubElement(obj, "name").text = name
            ET.SubElement(obj, "difficult").text = "1" if i == 0 else "0"
            box = ET.SubElement(obj, "bndbox")
            for tag, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + bw),
                               ("ymax", y + bh)):
                ET.SubElement(box, tag).text = str(int(value))
            objects[mask > 0] = i + 1
            classes_png[mask > 0] = classes.index(name) + 1
        ET.ElementTree(xml).write(root / "Annotations" / f"{stem}.xml")
        border = _border(objects)
        box_only = k == len(source) - 1
        if not box_only:
            _save_palette_png(np.where(border, 255, objects), root / "SegmentationObject" / f"{stem}.png")
            _save_palette_png(np.where(border, 255, classes_png),
                              root / "SegmentationClass" / f"{stem}.png")
        want = []
        for name, box, mask in image["anns"]:
            inner = (mask > 0) & ~border
            want.append((name, box, None if box_only or not inner.any()
                         else inner.astype(np.uint8)))
        expected[stem] = want
    (root / "ImageSets/Segmentation/train.txt").write_text(
        "\n".join(image["stem"] for image in source) + "\n")
    return expected


def test_voc_reads_what_was_written(source, tmp_path):
    classes = ["circle", "square", "triangle"]
    expected = _write_voc(source, tmp_path / "VOC", classes)
    # instances are read back in mask order, box-only ones after them
    for stem, want in expected.items():
        expected[stem] = ([x for x in want if x[2] is not None]
                          + [x for x in want if x[2] is None])
    coco, root = to_coco("voc", tmp_path / "VOC")
    assert root == tmp_path / "VOC" / "JPEGImages"
    assert [c["name"] for c in coco["categories"]] == classes    # sorted: not VOC's names
    assert all(a["iscrowd"] == 0 for a in coco["annotations"])    # difficult kept
    _assert_same(_read(coco), expected)
    listed, _ = to_coco("voc", tmp_path / "VOC/ImageSets/Segmentation/train.txt")
    assert listed["annotations"] == coco["annotations"]


def test_voc_standard_classes_and_class_png_wins(tmp_path, caplog):
    """VOC names -> the 20 VOC classes in VOC order; SegmentationClass decides an
    instance's class when the XML disagrees (warned)."""
    from engine.formats import VOC_CLASSES
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:10, 3:12] = 1
    fake = dict(stem="2007_000001", path=tmp_path / "a.png", width=16, height=16,
                anns=[("dog", [3.0, 4.0, 9.0, 6.0], mask)])
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(fake["path"])
    _write_voc([fake, dict(fake, stem="2007_000002")], tmp_path / "VOC", list(VOC_CLASSES))
    cls_png = tmp_path / "VOC/SegmentationClass/2007_000001.png"
    labels = np.asarray(Image.open(cls_png)).copy()
    labels[(labels != 0) & (labels != 255)] = VOC_CLASSES.index("cat") + 1
    _save_palette_png(labels, cls_png)
    with caplog.at_level(logging.WARNING, logger="engine.formats"):
        coco, _ = to_coco("voc", tmp_path / "VOC")
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert [names[a["category_id"]] for a in coco["annotations"]] == ["cat", "dog"]
    assert any("2007_000001.xml" in r.message and "'cat'" in r.message
               for r in caplog.records)


# ----------------------------------------------------------------------------- YOLO

def _write_yolo(source, root):
    """data.yaml (names as a {index: name} dict, `path: .`), images/train/*.png and
    labels/train/*.txt with 6-decimal normalised polygons; the images are cropped to
    64 x 48 px (x and y scale differently); the first image also has a detection line
    (class cx cy w h). images/val holds two of the images. Returns the expected
    {stem: [(name, bbox, mask or None)]}."""
    classes = ["circle", "square", "triangle"]
    for sub in ("images/train", "labels/train", "images/val", "labels/val"):
        (root / sub).mkdir(parents=True)
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {k}: {n}\n" for k, n in enumerate(classes)))
    expected = {}
    for k, image in enumerate(source):
        w, h = image["width"], image["height"] - 16
        lines, want = [], []
        for name, _, mask in image["anns"]:
            if not mask[:h].any():
                continue
            polygon = _row_polygon(mask[:h])
            xy = np.reshape(polygon, (-1, 2)) / [w, h]
            lines.append(" ".join([str(classes.index(name))]
                                  + [f"{v:.6f}" for v in xy.ravel()]))
            drawn = _rasterise([polygon], w, h)
            want.append((name, _box_of(drawn), drawn))
        if k == 0:
            lines.append("1 0.5 0.5 0.25 0.125")
            want.append(("square", [0.375 * w, 0.4375 * h, 0.25 * w, 0.125 * h], None))
        split = "val" if k >= len(source) - 2 else "train"
        Image.open(image["path"]).crop((0, 0, w, h)).save(root / "images" / split /
                                                          image["path"].name)
        (root / "labels" / split / f"{image['stem']}.txt").write_text("\n".join(lines) + "\n")
        expected[image["stem"]] = want
    return expected


def test_yolo_reads_what_was_written(source, tmp_path):
    expected = _write_yolo(source, tmp_path / "yolo")
    coco, root = to_coco("yolo", tmp_path / "yolo" / "data.yaml")
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]    # YOLO class k -> id k + 1
    train_stems = [image["stem"] for image in source[:-2]]
    _assert_same(_read(coco), {s: expected[s] for s in train_stems})
    assert (root / coco["images"][0]["file_name"]).is_file()
    # Roboflow's quirks: names as a list, no `path`, entries relative to a folder above
    (tmp_path / "yolo/roboflow.yaml").write_text(
        "train: ../images/train\nval: ../images/val\nnames: [circle, square, triangle]\n")
    for yaml_path in (tmp_path / "yolo", tmp_path / "yolo/roboflow.yaml"):
        val, _ = to_coco("yolo", yaml_path, split="val")
        _assert_same(_read(val), {image["stem"]: expected[image["stem"]]
                                  for image in source[-2:]})


def test_yolo_bad_class_names_the_line(source, tmp_path):
    _write_yolo(source[:3], tmp_path / "yolo")
    label = tmp_path / "yolo/labels/train" / f"{source[0]['stem']}.txt"
    label.write_text(label.read_text() + "5 0.1 0.1 0.2 0.1 0.2 0.2\n")
    with pytest.raises(FormatError, match=rf"{label.name}, line \d+: class 5 .* 3 classes"):
        to_coco("yolo", tmp_path / "yolo/data.yaml")


# ----------------------------------------------------------------------------- training

def test_train_two_iterations_from_each_format(source, tmp_path, tiny_cfg):
    """[data] format = labelme / voc / yolo: the training set (and the validation set,
    with the training set's classes) come from the readers; two iterations each."""
    from engine.initialise import build_datasets
    _write_labelme(source, tmp_path / "labelme", embed=True)
    _write_voc(source, tmp_path / "VOC", ["circle", "square", "triangle"])
    _write_yolo(source, tmp_path / "yolo")
    runs = {"labelme": tmp_path / "labelme", "voc": tmp_path / "VOC",
            "yolo": tmp_path / "yolo" / "data.yaml"}
    for fmt, path in runs.items():
        summary = _train_two(tiny_cfg, format=fmt, train_json=str(path), train_images="none",
                             output_dir=str(tmp_path / fmt / "out"))
        assert summary["model"].num_classes == 3, fmt
    train_set, val_set = build_datasets(tiny_cfg(format="yolo", train_json=str(runs["yolo"]),
                                                 train_images="none", val_json=str(runs["yolo"]),
                                                 val_images="none"))
    assert (len(train_set), len(val_set)) == (len(source) - 2, 2)
    assert val_set.class_names == train_set.class_names == ["circle", "square", "triangle"]
    image, target = train_set[0]
    assert image.shape[1:] == target["masks"].shape[1:] and target["mask_valid"].any()
    with pytest.raises(FileNotFoundError, match="train_images = nowhere.*none is allowed"):
        build_datasets(tiny_cfg(format="voc", train_json=str(runs["voc"]),
                                train_images="nowhere"))
    with pytest.raises(ValueError, match="format = pascal"):
        build_datasets(tiny_cfg(format="pascal"))


# ----------------------------------------------------------------------------- CLI

def test_convert_data_cli_writes_coco_json(source, tmp_path, capsys):
    from engine.cli import main
    expected = _write_labelme(source, tmp_path / "labelme", embed=False)
    out = tmp_path / "converted" / "train.json"
    assert main(["convert-data", "--from", "labelme", str(tmp_path / "labelme"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(source)} images" in printed and str(out) in printed
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == len(source)
    assert sum(len(v) for v in expected.values()) == len(coco.getAnnIds())
    _assert_same(_read(coco.dataset), expected)
    with pytest.raises(SystemExit):
        main(["convert-data", "--from", "yolo", str(tmp_path / "labelme"),
              "--out", str(out)])
    assert "data.yaml" in capsys.readouterr().err


def test_write_coco_is_atomic_json_with_rle(tmp_path):
    rle = mask_utils.encode(np.asfortranarray(np.ones((4, 4), np.uint8)))   # bytes counts
    data = dict(images=[dict(id=1, file_name="a.png", width=4, height=4)],
                annotations=[dict(id=1, image_id=1, category_id=1, segmentation=rle,
                                  bbox=[0, 0, 4, 4], area=16, iscrowd=0)],
                categories=[dict(id=1, name="x")])
    path = write_coco(data, tmp_path / "out.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    assert COCO(str(path)).annToMask(COCO(str(path)).anns[1]).sum() == 16
    assert set(FORMATS) == {"coco", "labelme", "voc", "yolo"}
