"""engine/check.py and `maskrcnn check-data`: a clean shapes set gives no finding; each
problem planted alone in a copy of it is found, with its severity, naming the planted
annotation / image / category; `maskrcnn train` stops on a planted error before the
model is built."""
import copy
import json
import shutil

import pytest
from PIL import Image

from engine.check import (DataCheckError, check_dataset, check_sets, check_split_pair,
                          format_report)
from engine.cli import main

# the shapes sets' categories have 5..8 instances: 1 keeps few-instances out of the
# clean set's report
MIN = 1


@pytest.fixture(scope="module")
def clean(shapes_data, tmp_path_factory):
    """(train COCO dict, its image dir copy, val COCO dict) of shapes_data."""
    (tj, ti), (vj, _) = shapes_data["train"], shapes_data["val"]
    root = tmp_path_factory.mktemp("check")
    shutil.copytree(ti, root / "images")
    return (json.loads(tj.read_text()), root / "images", json.loads(vj.read_text()))


@pytest.fixture
def planted(clean, tmp_path):
    """A fresh copy of the clean train set (dict, image dir) to plant a problem in."""
    coco, images, _ = clean
    shutil.copytree(images, tmp_path / "images")
    return copy.deepcopy(coco), tmp_path / "images"


def _ann(coco, k=0):
    return coco["annotations"][k]


# each plant(coco, image_dir) -> what the finding must name (str); (code, severity)
def _cat_zero(coco, _):
    for c in coco["categories"]:
        c["id"] -= 1
    for a in coco["annotations"]:
        a["category_id"] -= 1
    return "category 0 (circle)"


def _annotations_zero_based(coco, _):
    for a in coco["annotations"]:
        a["category_id"] -= 1
    first = next(a for a in coco["annotations"] if a["category_id"] == 0)
    return f"annotation {first['id']} "


def _cat_gap(coco, _):
    for c in coco["categories"] + coco["annotations"]:
        key = "id" if "name" in c else "category_id"
        if c[key] == 3:
            c[key] = 5
    return "skip 3, 4"


def _background(coco, _):
    coco["categories"].insert(0, dict(id=0, name="__background__"))
    return "category 0 (__background__)"


def _all_crowd(coco, _):
    for a in coco["annotations"]:
        a["iscrowd"] = 1
    return f"all {len(coco['annotations'])} annotations"


def _xyxy(coco, _):
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        a["bbox"] = [x, y, x + w, y + h]
    return "annotation "


def _xyxy_no_masks(coco, images):
    for a in coco["annotations"]:
        del a["segmentation"]
    return _xyxy(coco, images)


def _size(coco, _):
    coco["images"][2]["width"] = 80
    return "3.png"


def _no_mask(coco, _):
    _ann(coco, 4)["segmentation"] = []
    return f"annotation {_ann(coco, 4)['id']} "


def _tiny_mask(coco, _):
    x, y = _ann(coco, 3)["bbox"][:2]
    _ann(coco, 3)["segmentation"] = [[x, y, x + 3, y, x + 3, y + 3, x, y + 3]]
    return f"annotation {_ann(coco, 3)['id']} "


def _empty_mask(coco, _):
    _ann(coco, 3)["segmentation"] = [[1.0, 1.0, 2.0, 2.0]]      # 2 points: not drawable
    return f"annotation {_ann(coco, 3)['id']} "


def _rle_size(coco, _):
    _ann(coco, 5)["segmentation"]["size"] = [32, 32]
    return f"annotation {_ann(coco, 5)['id']} "


def _outside(coco, _):
    _ann(coco, 6)["bbox"][0] += 60.0
    return f"annotation {_ann(coco, 6)['id']} "


def _all_outside(coco, _):
    for a in coco["annotations"]:
        a["bbox"][0] += 200.0
    return "lie mostly outside"


def _normalised(coco, _):
    for a in coco["annotations"]:
        a["bbox"] = [v / 64.0 for v in a["bbox"]]
    return "within [0, 1]"


def _disagree(coco, _):
    x, y, w, h = _ann(coco, 2)["bbox"]
    _ann(coco, 2)["bbox"] = [64.0 - x - w, 64.0 - y - h, w, h] if x > 8 else [40.0, 40.0, 8, 8]
    return f"annotation {_ann(coco, 2)['id']} "


def _dup_image(coco, _):
    coco["images"][1]["id"] = coco["images"][0]["id"]
    return f"image {coco['images'][0]['id']}"


def _dup_ann(coco, _):
    _ann(coco, 1)["id"] = _ann(coco, 0)["id"]
    return f"annotation {_ann(coco, 0)['id']}"


def _missing_ann_id(coco, _):
    del _ann(coco, 7)["id"]
    return "annotations[7]"


def _unknown_image(coco, _):
    _ann(coco, 2)["image_id"] = 99
    return f"annotation {_ann(coco, 2)['id']} "


def _missing_file(_, images):
    (images / "3.png").unlink()
    return "3.png"


def _unreadable_file(_, images):
    (images / "4.png").write_bytes(b"not an image")
    return "4.png"


PLANTS = [
    (_cat_zero, "category-id-zero", "warning"),
    (_annotations_zero_based, "unknown-category", "error"),
    (_cat_gap, "category-gaps", "warning"),
    (_background, "background-category", "error"),
    (_all_crowd, "all-crowd", "error"),
    (_xyxy, "box-convention", "error"),
    (_xyxy_no_masks, "box-convention", "warning"),
    (_size, "size-mismatch", "error"),
    (_no_mask, "no-mask", "warning"),
    (_tiny_mask, "tiny-mask", "warning"),
    (_empty_mask, "empty-mask", "warning"),
    (_rle_size, "rle-size", "error"),
    (_outside, "box-outside", "warning"),
    (_all_outside, "boxes-outside", "error"),
    (_normalised, "normalised-boxes", "error"),
    (_disagree, "box-mask-disagree", "warning"),
    (_dup_image, "duplicate-image-id", "error"),
    (_dup_ann, "duplicate-annotation-id", "error"),
    (_missing_ann_id, "missing-id", "error"),
    (_unknown_image, "unknown-image", "error"),
    (_missing_file, "missing-file", "error"),
    (_unreadable_file, "unreadable-file", "error"),
]


def test_clean_set_has_no_findings(clean):
    coco, images, val = clean
    assert check_dataset(coco, images, min_instances=MIN) == []
    assert check_dataset(coco, images, min_instances=MIN, fast=True) == []
    assert check_split_pair(coco, val) == []


@pytest.mark.parametrize("plant, code, severity", PLANTS,
                         ids=[p[0].__name__.strip("_") for p in PLANTS])
def test_planted_problem_is_found_and_named(planted, plant, code, severity):
    coco, images = planted
    named = plant(coco, images)
    found = check_dataset(coco, images, min_instances=MIN, fast=True)
    hits = [f for f in found if f.code == code]
    assert hits, f"{code} not found; found {[f.code for f in found]}"
    assert all(f.severity == severity for f in hits)
    assert any(named in f"{f.where}: {f.message}" for f in hits), [f.where for f in hits]
    assert all(f.fix for f in hits)
    # the report's table names the code and its first offender
    report = format_report(check_sets([("train", "train.json", coco, images)], MIN,
                                      fast=True))
    assert code in report and hits[0].where in report


def test_few_instances_names_each_category_below_the_threshold(clean):
    coco, images, _ = clean
    counts = {c["id"]: 0 for c in coco["categories"]}
    for a in coco["annotations"]:
        counts[a["category_id"]] += 1
    threshold = sorted(counts.values())[1]          # one category at least reaches it
    found = [f for f in check_dataset(coco, images, min_instances=threshold, fast=True)]
    assert {f.category_id for f in found if f.code == "few-instances"} == \
        {c for c, n in counts.items() if n < threshold}
    assert {f.code for f in found} == {"few-instances"}


def test_train_val_category_mismatch(clean):
    coco, _, val = clean
    val = copy.deepcopy(val)
    val["categories"][1]["name"] = "box"
    found = check_split_pair(coco, val)
    assert [f.code for f in found] == ["split-mismatch"] and found[0].severity == "error"
    assert "'square' / 'box'" in found[0].message


def test_truncated_file_only_in_full_check(planted):
    coco, images = planted
    data = (images / "5.png").read_bytes()
    (images / "5.png").write_bytes(data[: len(data) // 2])
    assert check_dataset(coco, images, min_instances=MIN, fast=True) == []
    found = check_dataset(coco, images, min_instances=MIN)
    assert [(f.code, f.file) for f in found] == [("unreadable-file", "5.png")]


@pytest.mark.parametrize("json_size, code, severity", [
    ((20, 30), "size-mismatch", "error"),          # the JSON has the rotated view's size
    ((30, 20), "exif-orientation", "warning"),     # the JSON has the stored pixels' size
])
def test_exif_orientation(tmp_path, json_size, code, severity):
    """A JPEG stored 30x20 with orientation 6 (viewers turn it 90 degrees clockwise: a
    20x30 view), PIL's own EXIF writer as the oracle."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 20), (90, 120, 200)).save(tmp_path / "photo.jpg", exif=exif)
    with Image.open(tmp_path / "photo.jpg") as img:       # the tag really is there
        assert img.getexif()[0x0112] == 6
    w, h = json_size
    coco = dict(images=[dict(id=1, file_name="photo.jpg", width=w, height=h)],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[2, 2, 10, 10],
                                  segmentation=[[2, 2, 12, 2, 12, 12, 2, 12]], iscrowd=0)],
                categories=[dict(id=1, name="thing")])
    found = check_dataset(coco, tmp_path, min_instances=MIN)
    assert [(f.code, f.severity, f.file) for f in found] == [(code, severity, "photo.jpg")]
    assert "EXIF orientation 6" in found[0].message
    assert ("explains it" in found[0].message) == (code == "size-mismatch")


# ----------------------------------------------------------------- command line

def _write_set(coco, images, tmp_path, name="train"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    return ["--data", str(path), "--images", str(images)]


def test_cli_exit_codes_and_json(planted, tmp_path, capsys):
    coco, images = planted
    args = _write_set(coco, images, tmp_path)
    assert main(["check-data", *args, "--min-instances", "1"]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert main(["check-data", *args, "--min-instances", "100", "--fast"]) == 0   # warnings
    assert "few-instances" in capsys.readouterr().out
    (images / "3.png").unlink()
    assert main(["check-data", *args, "--json", "--no-progress"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == 1
    missing = [f for f in report["sets"][0]["findings"] if f["code"] == "missing-file"]
    assert missing[0]["file"] == "3.png" and missing[0]["image_id"] == 3


def test_cli_config_checks_train_and_val(clean, planted, tiny_cfg, write_ini, tmp_path,
                                         capsys):
    coco, images = planted
    _, _, val = clean
    val = copy.deepcopy(val)
    val["categories"].pop()
    args = _write_set(val, images, tmp_path, "val")
    config = write_ini(tiny_cfg(val_json=args[1], val_images=args[3]), tmp_path / "c.ini")
    assert main(["check-data", "--config", str(config), "--min-instances", "1"]) == 1
    out = capsys.readouterr().out
    assert "== train set:" in out and "== val set:" in out and "split-mismatch" in out


# ----------------------------------------------------------------- training

def test_train_stops_on_a_planted_error_before_the_model(planted, tiny_cfg, write_ini,
                                                         tmp_path, monkeypatch, capsys):
    import engine.initialise

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built despite the data error")
    monkeypatch.setattr(engine.initialise, "build_initial_model", no_model)
    coco, images = planted
    _ann(coco, 1)["id"] = _ann(coco, 0)["id"]           # a duplicate annotation id
    args = _write_set(coco, images, tmp_path)
    cfg = tiny_cfg(train_json=args[1], train_images=args[3])
    config = write_ini(cfg, tmp_path / "c.ini")
    assert main(["train", "--config", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "duplicate-annotation-id" in err and f"annotation {_ann(coco, 0)['id']}" in err
    out = tmp_path / "out"
    assert not list(out.glob("model_*.pth")) and not (out / "log.jsonl").exists()
    # check_data = false skips the check: the run gets as far as building the model
    with pytest.raises(AssertionError, match="model was built"):
        from engine.train import train
        train(tiny_cfg(train_json=args[1], train_images=args[3], check_data=False),
              progress=False)


def test_loader_errors_are_data_check_errors(planted, tiny_cfg, tmp_path):
    """What the loader cannot index (a missing annotation id: pycocotools' KeyError
    before) stops training with the same report."""
    from engine.train import train
    coco, images = planted
    del _ann(coco, 0)["id"]
    args = _write_set(coco, images, tmp_path)
    with pytest.raises(DataCheckError, match=r"annotations\[0\].*without an integer 'id'"):
        train(tiny_cfg(train_json=args[1], train_images=args[3]), progress=False)
