"""engine/data.py against pycocotools (COCO.annToMask, loadAnns), hand-made masks and images,
and hand-computed boxes. Every data set is written here in tmp_path (PIL + JSON)."""
import json
import logging
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from engine.data import (CocoInstances, ImageError, SeededSampler, build_loader, collate,
                        load_rgb)

# non-contiguous COCO category ids, listed out of order on purpose
CATEGORIES = [dict(id=12, name="bird"), dict(id=3, name="cat"), dict(id=7, name="dog")]
LABEL_OF = {3: 1, 7: 2, 12: 3}     # sorted category ids -> 1..K

# pycocotools' decode trips a numpy 2 deprecation inside its Cython code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rect_mask(h, w, y1, y2, x1, x2):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")    # as stored in JSON
    return rle


def uncompressed_rle(mask):
    """COCO's uncompressed RLE, written by hand: column-major run lengths from 0s."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return dict(size=list(mask.shape), counts=counts)


def random_rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_coco(root, images, annotations, categories=CATEGORIES):
    """images: list of (id, file_name, pixels uint8[H, W, 3] | None, (w, h) for the JSON)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    infos = []
    for image_id, name, pixels, (w, h) in images:
        if pixels is not None:
            Image.fromarray(pixels).save(root / "img" / name)
        infos.append(dict(id=image_id, file_name=name, width=w, height=h))
    for k, ann in enumerate(annotations):
        ann.setdefault("id", 100 + k)
        ann.setdefault("iscrowd", 0)
        if len(ann["bbox"]) == 4:
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    path = root / "instances.json"
    path.write_text(json.dumps(dict(images=infos, annotations=annotations,
                                    categories=categories)))
    return path, root / "img"


@pytest.fixture
def coco_set(tmp_path):
    """4 images: two annotated (polygon, compressed RLE, uncompressed RLE, crowd), one
    without annotations, one with only a crowd annotation. Image ids are not 0..N-1."""
    h1, w1, h2, w2 = 40, 60, 36, 30
    m_rle = rect_mask(h1, w1, 20, 35, 30, 55)                      # compressed RLE
    m_crowd = rect_mask(h1, w1, 0, 10, 0, 20)
    m_unc = rect_mask(h2, w2, 4, 30, 10, 20)                      # uncompressed RLE
    m_unc[10:14, 12:15] = 0                                       # a hole
    images = [(10, "a.png", random_rgb(h1, w1, 1), (w1, h1)),
              (20, "b.jpg_as.png", random_rgb(h2, w2, 2), (w2, h2)),
              (30, "empty.png", random_rgb(h2, w2, 3), (w2, h2)),
              (40, "crowd_only.png", random_rgb(h2, w2, 4), (w2, h2))]
    anns = [
        dict(image_id=10, category_id=7, bbox=[5.0, 4.0, 20.0, 12.0],
             segmentation=[[5, 4, 25, 4, 25, 16, 5, 16]]),          # polygon rectangle
        dict(image_id=10, category_id=12, bbox=[30.0, 20.0, 25.0, 15.0],
             segmentation=compressed_rle(m_rle)),
        dict(image_id=10, category_id=3, bbox=[0.0, 0.0, 20.0, 10.0], iscrowd=1,
             segmentation=uncompressed_rle(m_crowd)),
        dict(image_id=20, category_id=3, bbox=[10.0, 4.0, 10.0, 26.0],
             segmentation=uncompressed_rle(m_unc)),
        dict(image_id=20, category_id=12, bbox=[1.5, 2.0, 6.5, 28.0],   # two polygons
             segmentation=[[1.5, 2, 8, 2, 8, 10, 1.5, 10], [2, 20, 7, 20, 4.5, 30]]),
        dict(image_id=40, category_id=7, bbox=[0.0, 0.0, 30.0, 36.0], iscrowd=1,
             segmentation=uncompressed_rle(np.ones((h2, w2), np.uint8))),
    ]
    json_path, image_dir = write_coco(tmp_path, images, anns)
    return dict(json=json_path, dir=image_dir, hand_masks={101: m_rle, 103: m_unc},
                pixels={i: p for i, _, p, _ in images})


def xywh_to_xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


# ----------------------------------------------------------------- round trip vs pycocotools

def test_round_trip_matches_pycocotools(coco_set):
    ds = CocoInstances(coco_set["json"], coco_set["dir"])
    coco = COCO(str(coco_set["json"]))
    assert ds.cat_ids == [3, 7, 12] and ds.class_names == ["cat", "dog", "bird"]
    assert ds.num_classes == 3 and ds.ids == [10, 20, 30, 40]
    assert len(ds) == 4
    for i, image_id in enumerate(ds.ids):
        image, target = ds[i]
        info = coco.loadImgs(image_id)[0]
        assert target["image_id"] == image_id
        expected_image = torch.from_numpy(coco_set["pixels"][image_id]).permute(2, 0, 1) / 255.0
        torch.testing.assert_close(image, expected_image.float(), rtol=0, atol=1e-7)
        assert image.dtype == torch.float32
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        assert target["boxes"].shape == (len(anns), 4) and target["boxes"].dtype == torch.float32
        assert target["masks"].shape == (len(anns), info["height"], info["width"])
        assert target["masks"].dtype == torch.uint8 and target["labels"].dtype == torch.int64
        for k, ann in enumerate(anns):
            assert target["labels"][k].item() == LABEL_OF[ann["category_id"]]
            assert target["boxes"][k].tolist() == xywh_to_xyxy(ann["bbox"])
            np.testing.assert_array_equal(target["masks"][k].numpy(), coco.annToMask(ann))
            if ann["id"] in coco_set["hand_masks"]:      # RLE masks equal what was drawn
                np.testing.assert_array_equal(target["masks"][k].numpy(),
                                              coco_set["hand_masks"][ann["id"]])


def test_crowd_is_not_a_target(coco_set):
    ds = CocoInstances(coco_set["json"], coco_set["dir"])
    _, target = ds[ds.ids.index(10)]
    assert target["labels"].tolist() == [2, 3]          # dog (7), bird (12); crowd cat gone
    _, target = ds[ds.ids.index(40)]                       # only a crowd annotation
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 36, 30)


def test_polygon_mask_by_hand(coco_set):
    """The rectangle polygon (5, 4)-(25, 16) covers pixels x 5..24, y 4..15 (pycocotools'
    rasteriser includes the left/top edges, excludes the right/bottom ones)."""
    ds = CocoInstances(coco_set["json"], coco_set["dir"])
    _, target = ds[0]
    np.testing.assert_array_equal(target["masks"][0].numpy(), rect_mask(40, 60, 4, 16, 5, 25))


def test_skip_empty(coco_set):
    kept = CocoInstances(coco_set["json"], coco_set["dir"], train=True, skip_empty=False)
    skipped = CocoInstances(coco_set["json"], coco_set["dir"], train=True, skip_empty=True)
    evaluation = CocoInstances(coco_set["json"], coco_set["dir"], train=False, skip_empty=True)
    assert kept.ids == [10, 20, 30, 40]
    assert skipped.ids == [10, 20]                 # no annotation / crowd only are skipped
    assert evaluation.ids == [10, 20, 30, 40]      # evaluation keeps every image
    _, target = kept[kept.ids.index(30)]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 36, 30)
    flipped = CocoInstances(coco_set["json"], coco_set["dir"], train=True, skip_empty=False,
                            flip_prob=1.0)
    image, target = flipped[flipped.ids.index(30)]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 36, 30)
    assert torch.equal(image, kept[kept.ids.index(30)][0].flip(-1))


# ----------------------------------------------------------------- flip

def test_flip_matches_hand_flipped(coco_set):
    plain = CocoInstances(coco_set["json"], coco_set["dir"])
    flipped = CocoInstances(coco_set["json"], coco_set["dir"], train=True, flip_prob=1.0)
    for i in range(2):
        image, target = plain[i]
        f_image, f_target = flipped[i]
        width = image.shape[-1]
        hand = torch.from_numpy(coco_set["pixels"][plain.ids[i]][:, ::-1].copy())
        torch.testing.assert_close(f_image, hand.permute(2, 0, 1).float() / 255, rtol=0,
                                   atol=1e-7)
        np.testing.assert_array_equal(f_target["masks"].numpy(),
                                      target["masks"].numpy()[:, :, ::-1])
        for box, f_box in zip(target["boxes"].tolist(), f_target["boxes"].tolist()):
            assert f_box == [width - box[2], box[1], width - box[0], box[3]]
        assert f_target["labels"].tolist() == target["labels"].tolist()
        assert f_target["image_id"] == target["image_id"]
    # the flipped rectangle polygon (x 5..24 in a 60-wide image) covers x 35..54
    _, f_target = flipped[0]
    np.testing.assert_array_equal(f_target["masks"][0].numpy(), rect_mask(40, 60, 4, 16, 35, 55))
    assert f_target["boxes"][0].tolist() == [35.0, 4.0, 55.0, 16.0]


def test_flip_only_in_training_and_with_probability(coco_set):
    evaluation = CocoInstances(coco_set["json"], coco_set["dir"], train=False, flip_prob=1.0)
    never = CocoInstances(coco_set["json"], coco_set["dir"], train=True, flip_prob=0.0)
    _, reference = CocoInstances(coco_set["json"], coco_set["dir"])[0]
    for ds in (evaluation, never):
        assert ds[0][1]["boxes"].tolist() == reference["boxes"].tolist()

    half = CocoInstances(coco_set["json"], coco_set["dir"], train=True, flip_prob=0.5)
    flips = [half[(0, s)][1]["boxes"][0, 0].item() == 35.0 for s in range(200)]
    assert 70 <= sum(flips) <= 130                  # binomial(200, 0.5): 7 sigma
    # the same sample seed gives the same flip; torch's RNG gives a reproducible draw
    assert all(half[(0, s)][1]["boxes"][0, 0].item() == (35.0 if f else 5.0)
               for s, f in enumerate(flips))
    torch.manual_seed(5)
    first = [half[0][1]["boxes"][0, 0].item() for _ in range(20)]
    torch.manual_seed(5)
    assert [half[0][1]["boxes"][0, 0].item() for _ in range(20)] == first
    assert set(first) == {5.0, 35.0}


# ----------------------------------------------------------------- image modes

def _save(path, img):
    img.save(path)
    return path


def test_image_modes_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    pal_idx = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    p_img = Image.fromarray(pal_idx, mode="P")
    p_img.putpalette(palette.flatten().tolist())

    def expect(rgb01):
        return torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1)

    cases = {
        "gray.png": (Image.fromarray(gray), np.repeat(gray[:, :, None], 3, 2) / 255.0),
        "rgba.png": (Image.fromarray(rgba), rgba[:, :, :3] / 255.0),
        "g16.png": (Image.fromarray(g16), np.repeat(g16[:, :, None], 3, 2) / 65535.0),
        "pal.png": (p_img, palette[pal_idx] / 255.0),
        "la.png": (Image.fromarray(np.stack([gray, gray[::-1]], 2), mode="LA"),
                   np.repeat(gray[:, :, None], 3, 2) / 255.0),
    }
    for name, (img, rgb01) in cases.items():
        loaded = load_rgb(_save(tmp_path / name, img))
        assert loaded.shape == (3, 5, 7) and loaded.dtype == torch.float32, name
        torch.testing.assert_close(loaded, expect(rgb01), rtol=0, atol=1e-6, msg=name)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")   # really a 16-bit file


def write_png16(path, pixels):
    """A 16-bit RGB (uint16[H, W, 3]) or gray + alpha (uint16[H, W, 2]) PNG written by hand:
    Pillow cannot write them."""
    h, w, c = pixels.shape
    color_type = {2: 4, 3: 2, 4: 6}[c]

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_16bit_color_png_keeps_full_precision(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 65536, (4, 5, 3)).astype(np.uint16)
    la = rng.integers(0, 65536, (4, 5, 2)).astype(np.uint16)
    loaded = load_rgb(write_png16(tmp_path / "rgb16.png", rgb))
    torch.testing.assert_close(loaded, torch.from_numpy(rgb.astype(np.float32) / 65535)
                               .permute(2, 0, 1), rtol=0, atol=1e-6)
    loaded = load_rgb(write_png16(tmp_path / "la16.png", la))
    gray = torch.from_numpy(la[:, :, 0].astype(np.float32) / 65535)
    torch.testing.assert_close(loaded, gray.expand(3, 4, 5), rtol=0, atol=1e-6)


def test_grayscale_16bit_image_in_dataset(tmp_path):
    g16 = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500)
    (tmp_path / "img").mkdir()
    Image.fromarray(g16).save(tmp_path / "img" / "g.png")
    json_path, image_dir = write_coco(tmp_path, [(1, "g.png", None, (10, 12))], [])
    image, _ = CocoInstances(json_path, image_dir)[0]
    torch.testing.assert_close(image[1], torch.from_numpy(g16.astype(np.float32) / 65535))
    assert torch.equal(image[0], image[2]) and torch.equal(image[0], image[1])


# ----------------------------------------------------------------- bad data

def _one_image_set(tmp_path, anns, size=(30, 20), pixels=True):
    w, h = size
    images = [(1, "one.png", random_rgb(h, w, 0) if pixels else None, (w, h))]
    return write_coco(tmp_path, images, anns)


def test_missing_image_raises_naming_path(tmp_path):
    json_path, image_dir = _one_image_set(tmp_path, [], pixels=False)
    ds = CocoInstances(json_path, image_dir)
    with pytest.raises(ImageError, match=r"one\.png.*does not exist"):
        ds[0]


def test_unreadable_image_raises_naming_path(tmp_path):
    json_path, image_dir = _one_image_set(tmp_path, [], pixels=False)
    (image_dir / "one.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match=r"one\.png.*cannot be read"):
        CocoInstances(json_path, image_dir)[0]


def test_size_mismatch_names_both_sizes(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(random_rgb(20, 30, 0)).save(tmp_path / "img" / "one.png")
    json_path, image_dir = write_coco(tmp_path, [(1, "one.png", None, (32, 24))], [])
    with pytest.raises(ImageError, match=r"one\.png is 30x20 .* says 32x24"):
        CocoInstances(json_path, image_dir)[0]


def test_on_error_skip_logs_and_uses_next_image(tmp_path, caplog):
    images = [(1, "ok1.png", random_rgb(10, 10, 1), (10, 10)),
              (2, "gone.png", None, (10, 10)),
              (3, "ok3.png", random_rgb(10, 10, 3), (10, 10))]
    json_path, image_dir = write_coco(tmp_path, images, [])
    with pytest.raises(ImageError, match="gone.png"):
        CocoInstances(json_path, image_dir)[1]
    ds = CocoInstances(json_path, image_dir, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        image, target = ds[1]
    assert target["image_id"] == 3
    torch.testing.assert_close(image, torch.from_numpy(random_rgb(10, 10, 3)).permute(2, 0, 1)
                               .float() / 255)
    assert any("gone.png" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="on_error"):
        CocoInstances(json_path, image_dir, on_error="ignore")


def test_on_error_skip_wraps_around_and_fails_when_nothing_readable(tmp_path):
    images = [(1, "ok.png", random_rgb(10, 10, 1), (10, 10)), (2, "gone.png", None, (10, 10))]
    json_path, image_dir = write_coco(tmp_path, images, [])
    assert CocoInstances(json_path, image_dir, on_error="skip")[1][1]["image_id"] == 1
    json_path, image_dir = write_coco(tmp_path / "none", [(2, "gone.png", None, (10, 10))], [])
    with pytest.raises(RuntimeError, match="no readable image"):
        CocoInstances(json_path, image_dir, on_error="skip")[0]


def test_boxes_clipped_and_empty_boxes_dropped(tmp_path, caplog):
    w, h = 30, 20
    full = compressed_rle(np.ones((h, w), np.uint8))
    anns = [dict(image_id=1, category_id=3, bbox=[-5.0, 12.0, 20.0, 30.0], id=1,
                 segmentation=compressed_rle(rect_mask(h, w, 12, 20, 0, 15))),  # clipped
            dict(image_id=1, category_id=3, bbox=[4.0, 4.0, 0.0, 6.0], id=2,
                 segmentation=full),                                             # zero width
            dict(image_id=1, category_id=3, bbox=[31.0, 2.0, 5.0, 5.0], id=3,
                 segmentation=full),                                             # outside
            dict(image_id=1, category_id=3, bbox=[5.0, 5.0, -3.0, 4.0], id=4,
                 segmentation=full)]                                             # negative
    json_path, image_dir = _one_image_set(tmp_path, anns, size=(w, h))
    ds = CocoInstances(json_path, image_dir)
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        _, target = ds[0]
    assert target["boxes"].tolist() == [[0.0, 12.0, 15.0, 20.0]]
    assert target["masks"].shape == (1, h, w)
    messages = " ".join(r.getMessage() for r in caplog.records)
    for ann_id in (2, 3, 4):
        assert f"annotation {ann_id}: box" in messages and "dropped" in messages
    assert "one.png" in messages
    # an image whose boxes are all empty counts as empty for skip_empty
    train = CocoInstances(json_path, image_dir, train=True)
    anns_empty = [a for a in anns if a["id"] != 1]
    json_path2, image_dir2 = _one_image_set(tmp_path / "e", anns_empty, size=(w, h))
    assert len(train) == 1 and len(CocoInstances(json_path2, image_dir2, train=True)) == 0


def test_empty_mask_for_box_is_dropped(tmp_path, caplog):
    w, h = 30, 20
    anns = [dict(image_id=1, category_id=7, bbox=[2.0, 2.0, 10.0, 10.0], id=5,
                 segmentation=compressed_rle(np.zeros((h, w), np.uint8))),
            dict(image_id=1, category_id=7, bbox=[2.0, 2.0, 10.0, 10.0], id=6,
                 segmentation=[[2, 2, 12, 2]]),        # < 3 points: draws nothing
            dict(image_id=1, category_id=12, bbox=[2.0, 2.0, 10.0, 10.0], id=7,
                 segmentation=[[2, 2, 12, 2, 12, 12, 2, 12]])]
    json_path, image_dir = _one_image_set(tmp_path, anns, size=(w, h))
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        _, target = CocoInstances(json_path, image_dir)[0]
    assert target["labels"].tolist() == [3]
    messages = [r.getMessage() for r in caplog.records]
    assert any("annotation 5" in m and "mask is empty" in m for m in messages)
    assert any("annotation 6" in m and "mask is empty" in m for m in messages)


def test_box_far_from_mask_uses_mask_box(tmp_path, caplog):
    w, h = 40, 30
    mask = rect_mask(h, w, 3, 9, 25, 35)                    # box (25, 3, 35, 9)
    anns = [dict(image_id=1, category_id=3, bbox=[0.0, 15.0, 10.0, 10.0], id=8,
                 segmentation=compressed_rle(mask)),          # far away: IoU 0
            dict(image_id=1, category_id=3, bbox=[24.5, 3.0, 10.5, 6.0], id=9,
                 segmentation=compressed_rle(mask))]          # agrees (IoU 0.95): kept
    json_path, image_dir = _one_image_set(tmp_path, anns, size=(w, h))
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        _, target = CocoInstances(json_path, image_dir)[0]
    assert target["boxes"].tolist() == [[25.0, 3.0, 35.0, 9.0], [24.5, 3.0, 35.0, 9.0]]
    assert any("annotation 8" in r.getMessage() and "mask's box" in r.getMessage()
               for r in caplog.records)
    assert not any("annotation 9" in r.getMessage() for r in caplog.records)


def test_rle_size_mismatch_raises(tmp_path):
    anns = [dict(image_id=1, category_id=3, bbox=[0.0, 0.0, 5.0, 5.0], id=11,
                 segmentation=compressed_rle(np.ones((10, 10), np.uint8)))]
    json_path, image_dir = _one_image_set(tmp_path, anns, size=(30, 20))
    with pytest.raises(ImageError, match=r"annotation 11 .*one\.png.*\[10, 10\].*\[20, 30\]"):
        CocoInstances(json_path, image_dir)[0]


@pytest.mark.parametrize("ann, pattern", [
    (dict(image_id=1, category_id=99, bbox=[0, 0, 5, 5]), r"category_id 99.*\[3, 7, 12\]"),
    (dict(image_id=5, category_id=3, bbox=[0, 0, 5, 5]), r"image 5"),
    (dict(image_id=1, category_id=3, bbox=[0, 0, 5]), r"bbox \[0, 0, 5\]"),
])
def test_bad_annotations_raise_at_construction(tmp_path, ann, pattern):
    json_path, image_dir = _one_image_set(tmp_path, [dict(ann, segmentation=[])])
    with pytest.raises(ValueError, match=pattern):
        CocoInstances(json_path, image_dir)


def test_bad_files_raise_at_construction(tmp_path):
    json_path, image_dir = _one_image_set(tmp_path, [])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoInstances(tmp_path / "nope.json", image_dir)
    with pytest.raises(FileNotFoundError, match="no_dir"):
        CocoInstances(json_path, tmp_path / "no_dir")
    (tmp_path / "bad.json").write_text(json.dumps(dict(images=[])))
    with pytest.raises(ValueError, match=r"bad\.json lacks \['annotations', 'categories'\]"):
        CocoInstances(tmp_path / "bad.json", image_dir)


# ----------------------------------------------------------------- loader

@pytest.fixture
def loader_set(tmp_path):
    images, anns = [], []
    for i in range(10):
        h, w = 16 + i, 20
        images.append((i + 1, f"{i}.png", random_rgb(h, w, i), (w, h)))
        anns.append(dict(image_id=i + 1, category_id=[3, 7, 12][i % 3],
                         bbox=[1.0, 2.0, 6.0 + i, 5.0],
                         segmentation=compressed_rle(rect_mask(h, w, 2, 7, 1, 7 + i))))
    return write_coco(tmp_path, images, anns)


def _batches(loader):
    return [(images, targets) for images, targets in loader]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b):
        assert len(images_a) == len(images_b)
        for x, y in zip(images_a, images_b):
            assert torch.equal(x, y)
        for x, y in zip(targets_a, targets_b):
            assert x["image_id"] == y["image_id"]
            for key in ("boxes", "labels", "masks"):
                assert torch.equal(x[key], y[key])


def test_collate_keeps_lists(loader_set):
    ds = CocoInstances(*loader_set)
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for t in targets] == [1, 2]
    assert images[0].shape == (3, 16, 20) and images[1].shape == (3, 17, 20)


def test_workers_give_same_batches_as_main_process(loader_set):
    ds = CocoInstances(*loader_set, train=True, flip_prob=0.5)
    runs = []
    for num_workers in (0, 2):
        loader = build_loader(ds, batch_size=3, shuffle=True, num_workers=num_workers, seed=7)
        epochs = []
        for epoch in (1, 2):          # the workers persist across epochs
            loader.sampler.set_epoch(epoch)
            epochs.append(_batches(loader))
        runs.append(epochs[0])
        runs.append(epochs[1])
    _assert_same(runs[0], runs[2])
    _assert_same(runs[1], runs[3])
    assert [len(images) for images, _ in runs[0]] == [3, 3, 3, 1]
    ids = [t["image_id"] for _, targets in runs[0] for t in targets]
    assert sorted(ids) == list(range(1, 11)) and ids != sorted(ids)
    # the flips really vary and agree with a hand flip of the unflipped sample
    flipped = [t["boxes"][0, 0].item() != 1.0 for _, targets in runs[0] for t in targets]
    assert 0 < sum(flipped) < 10
    for _, targets in runs[0]:
        for t in targets:
            x2 = 1.0 + 6.0 + (t["image_id"] - 1)
            assert t["boxes"][0, 0].item() in (1.0, 20.0 - x2)


def test_order_depends_on_seed_and_epoch_only(loader_set):
    ds = CocoInstances(*loader_set, train=True, flip_prob=0.5)

    def ids(seed, epoch):
        loader = build_loader(ds, batch_size=4, shuffle=True, seed=seed)
        loader.sampler.set_epoch(epoch)
        return [t["image_id"] for _, targets in loader for t in targets]

    assert ids(0, 0) == ids(0, 0)
    assert ids(0, 0) != ids(0, 1) and ids(0, 0) != ids(1, 0)
    in_order = build_loader(ds, batch_size=4, shuffle=False)
    assert [t["image_id"] for _, ts in in_order for t in ts] == list(range(1, 11))


def test_resume_skips_seen_batches(loader_set):
    ds = CocoInstances(*loader_set, train=True, flip_prob=0.5)
    loader = build_loader(ds, batch_size=3, shuffle=True, seed=2)
    loader.sampler.set_epoch(4)
    full = _batches(loader)
    loader.sampler.set_epoch(4, start_batch=2)
    assert len(loader) == 2
    _assert_same(_batches(loader), full[2:])
    loader.sampler.set_epoch(4)
    assert len(loader) == 4


def test_distributed_shards_cover_the_epoch(loader_set):
    ds = CocoInstances(*loader_set)
    whole = SeededSampler(len(ds), shuffle=True, seed=3, with_seeds=False)
    whole.set_epoch(2)
    order = list(whole)
    shards = []
    for rank in range(3):
        loader = build_loader(ds, batch_size=2, shuffle=True, seed=3, distributed=True,
                              num_replicas=3, rank=rank)
        loader.sampler.set_epoch(2)
        shards.append([ds.ids.index(t["image_id"]) for _, ts in loader for t in ts])
    assert [len(s) for s in shards] == [4, 4, 4]          # 10 padded to 12
    padded = order + order[:2]
    for rank in range(3):
        assert shards[rank] == padded[rank::3]
    with pytest.raises(RuntimeError, match="process group"):
        build_loader(ds, batch_size=2, shuffle=True, distributed=True)


def test_loader_on_plain_dataset():
    data = [(torch.full((3, 2, 2), float(i)), dict(image_id=i)) for i in range(5)]
    loader = build_loader(data, batch_size=2, shuffle=False)
    assert [[t["image_id"] for t in ts] for _, ts in loader] == [[0, 1], [2, 3], [4]]


# ----------------------------------------------------------------- box-only data

def _drop_segmentation(json_path, out_path, drop):
    """A copy of a COCO file without `segmentation` in the annotations drop(ann, anns of
    its image) selects."""
    data = json.loads(open(json_path).read())
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for ann in data["annotations"]:
        if drop(ann, by_image[ann["image_id"]]):
            del ann["segmentation"]
    out_path.write_text(json.dumps(data))
    return out_path


def _apart(ann, anns):
    """The annotation's box overlaps no other box of its image."""
    x, y, w, h = ann["bbox"]
    return all(x + w <= b[0] or b[0] + b[2] <= x or y + h <= b[1] or b[1] + b[3] <= y
               for b in (a["bbox"] for a in anns if a is not ann))


def mixed_drop(ann, anns):
    """Which shapes annotations lose their mask in the mixed file: even ids whose box
    touches no other box (so a proposal cannot match both a masked and a maskless box)."""
    return ann["id"] % 2 == 0 and _apart(ann, anns)


def test_box_only_instances_are_kept(shapes_data, tmp_path):
    """A COCO file without segmentations (a box-only detector's data) keeps every instance:
    boxes and labels as in the JSON, mask_valid False, all-zero masks of the image size."""
    json_path, image_dir = shapes_data["train"]
    box_only = _drop_segmentation(json_path, tmp_path / "boxes.json", lambda a, anns: True)
    ds = CocoInstances(box_only, image_dir, train=True)
    coco = COCO(str(box_only))
    assert len(ds) == len(coco.imgs) == 8
    for i, image_id in enumerate(ds.ids):
        _, target = ds[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) > 0
        assert target["boxes"].tolist() == [xywh_to_xyxy(a["bbox"]) for a in anns]
        assert target["labels"].tolist() == [a["category_id"] for a in anns]   # ids 1..3
        assert target["mask_valid"].tolist() == [False] * len(anns)
        assert target["mask_valid"].dtype == torch.bool
        assert target["masks"].shape == (len(anns), 64, 64) and not target["masks"].any()


def test_mixed_file_marks_instances_without_masks(shapes_data, tmp_path):
    json_path, image_dir = shapes_data["train"]
    mixed = _drop_segmentation(json_path, tmp_path / "mixed.json", mixed_drop)
    full, ds = CocoInstances(json_path, image_dir), CocoInstances(mixed, image_dir)
    coco = COCO(str(mixed))
    n_without = 0
    for i, image_id in enumerate(ds.ids):
        _, target = ds[i]
        _, reference = full[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        has_mask = ["segmentation" in a for a in anns]
        n_without += has_mask.count(False)
        assert target["mask_valid"].tolist() == has_mask
        assert torch.equal(target["boxes"], reference["boxes"])
        assert torch.equal(target["labels"], reference["labels"])
        assert torch.equal(target["masks"][target["mask_valid"]],
                           reference["masks"][target["mask_valid"]])
        assert not target["masks"][~target["mask_valid"]].any()
        assert reference["mask_valid"].all()
    assert n_without == 6                      # annotations 2, 6, 12, 14 (alone), 18, 20


def test_empty_segmentation_list_is_box_only_and_flips(tmp_path):
    """`segmentation: []` or null (what box-only exporters write) means no mask, like a
    missing key; a segmentation that draws nothing is still dropped (above)."""
    w, h = 30, 20
    anns = [dict(image_id=1, category_id=7, bbox=[2.0, 3.0, 10.0, 5.0], id=1, segmentation=[]),
            dict(image_id=1, category_id=3, bbox=[4.0, 4.0, 6.0, 6.0], id=2,
                 segmentation=[[4, 4, 10, 4, 10, 10, 4, 10]]),
            dict(image_id=1, category_id=12, bbox=[20.0, 1.0, 5.0, 5.0], id=3,
                 segmentation=None)]
    json_path, image_dir = _one_image_set(tmp_path, anns, size=(w, h))
    _, target = CocoInstances(json_path, image_dir)[0]
    assert target["labels"].tolist() == [2, 1, 3]
    assert target["mask_valid"].tolist() == [False, True, False]
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0], [4.0, 4.0, 10.0, 10.0],
                                        [20.0, 1.0, 25.0, 6.0]]
    np.testing.assert_array_equal(target["masks"][1].numpy(), rect_mask(h, w, 4, 10, 4, 10))
    _, flipped = CocoInstances(json_path, image_dir, train=True, flip_prob=1.0)[0]
    assert flipped["mask_valid"].tolist() == [False, True, False]
    assert flipped["boxes"][0].tolist() == [w - 12.0, 3.0, w - 2.0, 8.0]
    np.testing.assert_array_equal(flipped["masks"].numpy(), target["masks"].numpy()[..., ::-1])


def _log_losses(cfg):
    return [json.loads(line)["losses"] for line in
            open(f"{cfg.solver.output_dir}/log.jsonl").read().splitlines()]


def test_box_only_file_trains_a_box_model(shapes_data, tiny_cfg, tmp_path):
    """End to end: a COCO file without any segmentation trains a box-only model."""
    from engine.train import train
    json_path, image_dir = shapes_data["train"]
    box_only = _drop_segmentation(json_path, tmp_path / "boxes.json", lambda a, anns: True)
    cfg = tiny_cfg(train_json=str(box_only), train_images=str(image_dir), mask_on=False,
                   max_iter=3, flip_prob=0.5)
    summary = train(cfg, progress=False)
    assert summary["iterations"] == 3 and not summary["model"].roi_heads.mask_on
    records = _log_losses(cfg)
    assert set(records[0]) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    assert all(math.isfinite(v) for r in records for v in r.values())
    assert all(r["loss_box"] > 0 for r in records)       # the boxes are there: positives


def test_mixed_file_mask_loss_counts_only_instances_with_masks(shapes_data, tiny_cfg,
                                                               tmp_path):
    """mask_on with some annotations lacking a segmentation: training runs, loss_mask is
    finite and equals the loss_mask of the same batch without those instances (the
    maskless boxes touch no other box, and 512 RoIs per image keep every positive)."""
    from maskrcnn import build_model
    from engine.train import train
    json_path, image_dir = shapes_data["train"]
    mixed = _drop_segmentation(json_path, tmp_path / "mixed.json", mixed_drop)
    cfg = tiny_cfg(train_json=str(mixed), train_images=str(image_dir), max_iter=2,
                   box_batch_size_per_image=512)
    dataset = CocoInstances(mixed, image_dir, train=True)
    images, targets = collate([dataset[i] for i in range(len(dataset))])
    alone = [dict(boxes=t["boxes"][v], labels=t["labels"][v], masks=t["masks"][v])
             for t, v in ((t, t["mask_valid"]) for t in targets)]
    as_if_valid = [dict(t, mask_valid=torch.ones_like(t["mask_valid"])) for t in targets]
    torch.manual_seed(0)
    model = build_model(cfg).train()

    def loss_mask(targets):
        torch.manual_seed(1)
        with torch.no_grad():
            return model(images, targets)["loss_mask"]

    got = loss_mask(targets)
    assert torch.isfinite(got) and got > 0
    torch.testing.assert_close(got, loss_mask(alone), rtol=1e-5, atol=0)
    assert not torch.isclose(got, loss_mask(as_if_valid))     # zero masks would be targets

    summary = train(cfg, progress=False)
    assert summary["iterations"] == 2
    assert all(math.isfinite(r["loss_mask"]) for r in _log_losses(cfg))


def test_mask_valid_is_checked_and_box_only_masks_are_not_resampled(tiny_cfg):
    from maskrcnn import build_model
    model = build_model(tiny_cfg()).train()
    image = torch.rand(3, 40, 50)
    target = dict(boxes=torch.tensor([[2.0, 3.0, 20.0, 30.0], [10.0, 5.0, 45.0, 35.0]]),
                  labels=torch.tensor([1, 2]),
                  masks=torch.zeros(2, 40, 50, dtype=torch.uint8))
    for bad, pattern in [(torch.tensor([1, 0], dtype=torch.uint8),
                          "mask_valid must be a bool"),
                         (torch.tensor([True]), r"count mismatch.*'mask_valid': 1"),
                         ([True, False], "mask_valid must be a Tensor")]:
        with pytest.raises(ValueError, match=f"target 0: {pattern}"):
            model([image], [dict(target, mask_valid=bad)])
    # no instance with a mask: the model's resize makes zero masks of the new size
    no_masks = torch.zeros(2, dtype=torch.bool)
    _, resized = model.transform.resize(image, dict(target, mask_valid=no_masks))
    assert resized["masks"].shape == (2, 51, 64) and resized["masks"].dtype == torch.uint8
    assert not resized["masks"].any()


def test_mask_model_on_box_only_validation_data_reports_bbox_ap(shapes_data, tiny_cfg,
                                                               tmp_path, monkeypatch):
    """A mask model evaluated on box-only ground truth: bbox AP, no segm (pycocotools has
    no masks to score against); and [data] lsj reaches the training data set: every
    training sample the loader takes is LSJ's (lsj_size 48 of the 64 px images, scale
    fixed at 0.5: the image fills the top-left 24 x 24, the rest is LSJ_FILL), while the
    validation samples keep their size."""
    from engine.data import LSJ_FILL, CocoInstances
    from engine.train import train
    json_path, image_dir = shapes_data["val"]
    box_only = _drop_segmentation(json_path, tmp_path / "val_boxes.json", lambda a, anns: True)
    samples = []                                  # (train, image) the data sets hand out
    real_getitem = CocoInstances.__getitem__

    def getitem(self, i):
        image, target = real_getitem(self, i)
        samples.append((self.train, image))
        return image, target
    monkeypatch.setattr(CocoInstances, "__getitem__", getitem)
    cfg = tiny_cfg(val_json=str(box_only), val_images=str(image_dir), max_iter=1,
                   lsj=True, lsj_size=48, lsj_scale=(0.5, 0.5))
    summary = train(cfg, progress=False)
    assert summary["model"].roi_heads.mask_on
    assert set(summary["metrics"]) == {"bbox"} and summary["metrics"]["bbox"]["AP"] >= 0
    trained = [image for is_train, image in samples if is_train]
    assert len(trained) >= cfg.solver.batch_size, len(samples)
    fill = torch.tensor(LSJ_FILL)[:, None, None]
    for image in trained:
        assert image.shape == (3, 48, 48), image.shape
        assert (image[:, 24:, :] == fill).all() and (image[:, :, 24:] == fill).all()
        assert not (image[:, :24, :24] == fill).all()
    validated = [image for is_train, image in samples if not is_train]
    assert validated and all(image.shape == (3, 64, 64) for image in validated)
