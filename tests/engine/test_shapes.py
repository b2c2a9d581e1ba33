"""engine/shapes.py: determinism, annotations against the pixels (decoded with pycocotools),
occlusion order, statistics, and that pycocotools reads the JSON."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from engine.shapes import CLASS_NAMES, draw_shape, make_shapes, render_scene


def _load(json_path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(json_path))


def _pixels(image_dir, image):
    return np.asarray(Image.open(image_dir / image["file_name"]).convert("RGB"))


@pytest.fixture(scope="module")
def stats_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes(root, "train", num_images=150, image_size=96, num_classes=3, seed=3)


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a = make_shapes(tmp_path / "a", "val", num_images=6, image_size=64, seed=7)
    b = make_shapes(tmp_path / "b", "val", num_images=6, image_size=64, seed=7)
    c = make_shapes(tmp_path / "c", "val", num_images=6, image_size=64, seed=8)
    assert a == (tmp_path / "a" / "val.json", tmp_path / "a" / "val")
    assert a[0].read_bytes() == b[0].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()
    for i in range(1, 7):
        assert (a[1] / f"{i}.png").read_bytes() == (b[1] / f"{i}.png").read_bytes()
    assert any((a[1] / f"{i}.png").read_bytes() != (c[1] / f"{i}.png").read_bytes()
               for i in range(1, 7))


def test_rerun_reuses_files_and_new_arguments_rewrite(tmp_path):
    json_path, image_dir = make_shapes(tmp_path, "train", num_images=4, image_size=64)
    stamp = (json_path.stat().st_mtime_ns, (image_dir / "1.png").stat().st_mtime_ns)
    make_shapes(tmp_path, "train", num_images=4, image_size=64)
    assert (json_path.stat().st_mtime_ns, (image_dir / "1.png").stat().st_mtime_ns) == stamp
    make_shapes(tmp_path, "train", num_images=5, image_size=64)
    assert len(json.loads(json_path.read_text())["images"]) == 5


def test_json_loads_with_pycocotools(stats_set):
    json_path, image_dir = stats_set
    raw = json.loads(json_path.read_text())
    coco = _load(json_path)
    assert sorted(coco.getImgIds()) == list(range(1, 151))
    assert [coco.cats[k]["name"] for k in sorted(coco.cats)] == list(CLASS_NAMES[:3])
    assert sorted(coco.cats) == [1, 2, 3]
    for ann in raw["annotations"][:20]:
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["iscrowd"] == 0
        assert coco.annToMask(ann).shape == (96, 96)
    for image in raw["images"][:5]:
        assert _pixels(image_dir, image).shape == (image["height"], image["width"], 3)


def test_annotations_agree_with_pixels(stats_set):
    json_path, image_dir = stats_set
    coco = _load(json_path)
    for image_id in coco.getImgIds()[:40]:
        pixels = _pixels(image_dir, coco.imgs[image_id]).astype(np.float64)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        # Visible masks never overlap: every pixel belongs to at most one instance.
        assert (np.sum(masks, axis=0) <= 1).all()
        for ann, mask in zip(anns, masks):
            ys, xs = np.nonzero(mask)
            x, y = xs.min(), ys.min()
            assert ann["bbox"] == pytest.approx([x, y, xs.max() - x + 1, ys.max() - y + 1])
            assert ann["area"] == mask.sum() >= 24
            # One flat colour under pixel noise (sigma <= 15, clipped at 0/255).
            assert pixels[mask].std(axis=0).max() < 20, (image_id, ann["id"])
            # The shape stands out from the pixels just outside it.
            ring = _dilate(mask) & ~mask & ~np.any(masks, axis=0)
            if ring.sum() >= 10:
                gap = np.linalg.norm(pixels[mask].mean(0) - pixels[ring].mean(0))
                assert gap > 30, (image_id, ann["id"], gap)


def _dilate(mask, steps=2):
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def test_later_shapes_occlude_earlier_ones():
    overlaps = 0
    for seed in range(60):
        image, instances = render_scene(np.random.default_rng(seed), 96, num_classes=3)
        image = image.astype(np.float64)
        for i, inst in enumerate(instances):
            later = np.zeros_like(inst["full"])
            for other in instances[i + 1:]:
                later |= other["full"]
            # Reference rule: visible = own shape minus every shape drawn after it.
            np.testing.assert_array_equal(inst["mask"], inst["full"] & ~later)
            assert np.abs(image[inst["mask"]].mean(0) - inst["color"]).max() < 8
            for other in instances[i + 1:]:
                hidden = inst["full"] & other["mask"]
                if hidden.sum() >= 10:
                    overlaps += 1
                    assert np.abs(image[hidden].mean(0) - other["color"]).max() < 8
            # A heavily occluded shape is not kept: most of it stays visible.
            assert inst["mask"].sum() >= 0.4 * inst["full"].sum()
    assert overlaps >= 5      # the scenes really exercise occlusion


def test_statistics(stats_set):
    json_path, _ = stats_set
    raw = json.loads(json_path.read_text())
    per_image = np.bincount([a["image_id"] for a in raw["annotations"]], minlength=151)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 4
    assert 2.2 <= per_image.mean() <= 2.8
    assert set(np.unique(per_image)) == {1, 2, 3, 4}
    labels = np.bincount([a["category_id"] for a in raw["annotations"]], minlength=4)[1:]
    assert labels.min() > 0.25 * len(raw["annotations"])
    side = np.array([max(a["bbox"][2:]) for a in raw["annotations"]]) / 96
    assert side.min() >= 0.05 and side.max() <= 0.52
    assert np.percentile(side, 10) < 0.2 and np.percentile(side, 90) > 0.38


@pytest.mark.parametrize("kind,area_factor", [("circle", math.pi), ("square", 2.0),
                                              ("triangle", 3 * math.sqrt(3) / 4),
                                              ("hexagon", 3 * math.sqrt(3) / 2)])
def test_shape_areas_match_geometry(kind, area_factor):
    radius = 30.0
    mask = draw_shape(kind, (64.0, 64.0), radius, angle=0.3, image_size=128)
    assert mask.sum() == pytest.approx(area_factor * radius ** 2, rel=0.06)
    ys, xs = np.nonzero(mask)
    assert np.hypot(xs - 64, ys - 64).max() <= radius + 1.5


def test_every_kind_can_be_drawn_and_bad_arguments_are_named(tmp_path):
    json_path, _ = make_shapes(tmp_path, "all", num_images=30, image_size=64,
                               num_classes=len(CLASS_NAMES))
    raw = json.loads(json_path.read_text())
    assert {a["category_id"] for a in raw["annotations"]} == set(range(1, len(CLASS_NAMES) + 1))
    with pytest.raises(ValueError, match="num_classes"):
        make_shapes(tmp_path, "x", num_images=2, image_size=64, num_classes=99)
    with pytest.raises(ValueError, match="min_instances"):
        make_shapes(tmp_path, "x", num_images=2, image_size=64, min_instances=3,
                    max_instances=2)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes(tmp_path, "x", num_images=2, image_size=8)
