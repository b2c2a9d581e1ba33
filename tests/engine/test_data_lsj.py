"""Large-scale jitter (engine.data.large_scale_jitter, CocoInstances(lsj=True)): hand-computed
pixels, boxes and masks for fixed scales and offsets, boxes equal to the masks' tight boxes,
sizes, per-sample reproducibility, and nothing changed when lsj is off."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.data import LSJ_FILL, CocoInstances, build_loader, large_scale_jitter

torch.set_num_threads(2)

# pycocotools' decode trips a numpy 2 deprecation inside its Cython code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def scripted(*values):
    """A `rand` that returns these values in turn (scale, top, left)."""
    it = iter(values)
    return lambda: next(it)


def rect(h, w, y1, y2, x1, x2):
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def tight_boxes(masks):
    """The masks' bounding boxes by numpy: [x_min, y_min, x_max + 1, y_max + 1]."""
    out = []
    for m in masks.numpy():
        ys, xs = np.nonzero(m)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def resized(image, h, w):
    """The bilinear, antialiased resize, by torch.nn.functional rather than v2."""
    return F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def test_downscale_pads_bottom_right():
    """scale 0.5 of a 40 x 40 image, lsj_size 40: the image is halved into the top-left
    20 x 20 and padded with LSJ_FILL; the masked instance's box is its halved mask's box,
    the box-only one's box is halved."""
    image = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    target = dict(boxes=torch.tensor([[8.0, 10.0, 30.0, 20.0], [4.0, 24.0, 14.0, 36.0]]),
                  labels=torch.tensor([1, 2]),
                  masks=torch.stack([rect(40, 40, 10, 20, 8, 30), rect(40, 40, 0, 0, 0, 0)]),
                  mask_valid=torch.tensor([True, False]), image_id=7)
    out, t = large_scale_jitter(image, target, 40, (0.5, 0.5), scripted(0.3, 0.7, 0.2))
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :20, :20], resized(image, 20, 20), rtol=0, atol=1e-6)
    fill = torch.tensor(LSJ_FILL)[:, None, None]
    assert torch.equal(out[:, 20:, :], fill.expand(3, 20, 40))
    assert torch.equal(out[:, :, 20:], fill.expand(3, 40, 20))
    # nearest halving keeps rows 10, 12, .., 18 -> 5..9 and columns 8..28 -> 4..14
    assert torch.equal(t["masks"][0], rect(40, 40, 5, 10, 4, 15))
    assert not t["masks"][1].any()
    assert t["boxes"].tolist() == [[4.0, 5.0, 15.0, 10.0], [2.0, 12.0, 7.0, 18.0]]
    assert t["labels"].tolist() == [1, 2] and t["mask_valid"].tolist() == [True, False]
    assert t["image_id"] == 7 and target["boxes"][0, 0] == 8.0     # the input is untouched


def test_upscale_crops_clips_and_drops_vanished_instances():
    """scale 2 of a 40 x 40 image, lsj_size 40: an 80 x 80 image cropped at top 40 (the
    whole room, rand 1.0), left 0. Instances above the crop vanish and are dropped from
    boxes, labels, masks and mask_valid alike; one crossing its top edge is clipped."""
    image = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1))
    target = dict(
        boxes=torch.tensor([[8.0, 10.0, 30.0, 20.0],      # mask, y 20..40 x2: vanishes
                            [4.0, 24.0, 14.0, 36.0],      # box only: y 48..72 -> 8..32
                            [10.0, 15.0, 18.0, 30.0],     # mask, y 30..60 -> clipped 0..20
                            [0.0, 0.0, 10.0, 10.0]]),     # box only, y 0..20: vanishes
        labels=torch.tensor([1, 2, 3, 1]),
        masks=torch.stack([rect(40, 40, 10, 20, 8, 30), rect(40, 40, 0, 0, 0, 0),
                           rect(40, 40, 15, 30, 10, 18), rect(40, 40, 0, 0, 0, 0)]),
        mask_valid=torch.tensor([True, False, True, False]))
    out, t = large_scale_jitter(image, target, 40, (2.0, 2.0), scripted(0.5, 1.0, 0.0))
    torch.testing.assert_close(out, resized(image, 80, 80)[:, 40:, :40], rtol=0, atol=1e-6)
    assert t["boxes"].tolist() == [[8.0, 8.0, 28.0, 32.0], [20.0, 0.0, 36.0, 20.0]]
    assert t["labels"].tolist() == [2, 3] and t["mask_valid"].tolist() == [False, True]
    assert t["masks"].shape == (2, 40, 40) and not t["masks"][0].any()
    assert torch.equal(t["masks"][1], rect(40, 40, 0, 20, 20, 36))


def test_target_without_mask_valid_has_all_masks_valid():
    image = torch.rand(3, 30, 60)
    target = dict(boxes=torch.tensor([[0.0, 0.0, 60.0, 30.0]]), labels=torch.tensor([1]),
                  masks=rect(30, 60, 3, 9, 6, 30)[None])
    # scale 1, 30 x 60 into 40: factor 2/3 -> 20 x 40, padded below; the box is the mask's
    out, t = large_scale_jitter(image, target, 40, (1.0, 1.0), scripted(0.0, 0.0, 0.0))
    assert "mask_valid" not in t and t["masks"].shape == (1, 40, 40)
    assert t["boxes"].tolist() == tight_boxes(t["masks"]).tolist() == [[4.0, 2.0, 20.0, 6.0]]
    torch.testing.assert_close(out[:, :20], resized(image, 20, 40), rtol=0, atol=1e-6)


# ----------------------------------------------------------------- in the dataset

def _mixed(shapes_data, tmp_path):
    """The shapes training set with the segmentation of every third annotation dropped."""
    json_path, image_dir = shapes_data["train"]
    data = json.loads(open(json_path).read())
    for ann in data["annotations"][::3]:
        del ann["segmentation"]
    (tmp_path / "mixed.json").write_text(json.dumps(data))
    return tmp_path / "mixed.json", image_dir


def _samples_equal(a, b):
    (image_a, ta), (image_b, tb) = a, b
    return torch.equal(image_a, image_b) and all(
        torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "masks", "mask_valid"))


def test_boxes_equal_the_masks_boxes_and_sizes(shapes_data, tmp_path):
    """Random scales in (0.1, 2.0), 64 px images into 48 x 48: every sample is 48 x 48, its
    fields in step, masked instances' boxes equal their masks' boxes, box-only instances
    have non-empty boxes inside the crop and all-zero masks."""
    ds = CocoInstances(*_mixed(shapes_data, tmp_path), train=True, flip_prob=0.5, lsj=True,
                       lsj_scale=(0.1, 2.0), lsj_size=48)
    padded = 0
    for seed in range(24):
        image, t = ds[(seed % len(ds), seed)]
        m = len(t["boxes"])
        assert image.shape == (3, 48, 48) and t["masks"].shape == (m, 48, 48)
        assert len(t["labels"]) == len(t["mask_valid"]) == m
        valid = t["mask_valid"]
        assert torch.equal(t["boxes"][valid], tight_boxes(t["masks"][valid]))
        assert not t["masks"][~valid].any()
        boxes = t["boxes"][~valid]
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes >= 0).all() and (boxes <= 48).all()
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        padded += bool((image[:, -1, :] == torch.tensor(LSJ_FILL)[:, None]).all())
    assert 0 < padded < 24                  # a scale below 1 pads (the bottom), above crops


def test_same_seed_same_sample(shapes_data, tmp_path):
    ds = CocoInstances(*_mixed(shapes_data, tmp_path), train=True, flip_prob=0.5, lsj=True,
                       lsj_size=48)
    for seed in (0, 1, 12345):
        assert _samples_equal(ds[(2, seed)], ds[(2, seed)])
    boxes = {tuple(ds[(2, seed)][1]["boxes"].flatten().tolist()) for seed in range(8)}
    assert len(boxes) >= 6                  # the scale and crop really vary with the seed
    torch.manual_seed(3)
    first = [ds[2] for _ in range(3)]       # a plain index: torch's global RNG
    torch.manual_seed(3)
    assert all(_samples_equal(a, ds[2]) for a in first)
    loader = build_loader(ds, batch_size=3, shuffle=True, seed=5)
    runs = []
    for _ in range(2):
        loader.sampler.set_epoch(1)
        runs.append([s for images, targets in loader for s in zip(images, targets)])
    assert all(_samples_equal(a, b) for a, b in zip(*runs)) and len(runs[0]) == len(ds)


def test_lsj_off_changes_nothing(shapes_data, tmp_path):
    """lsj=False (the default): the same samples as a data set built without the lsj keys,
    at the original size, and the flip is still the seed's first draw; lsj never applies
    outside training."""
    paths = _mixed(shapes_data, tmp_path)
    plain = CocoInstances(*paths, train=True, flip_prob=0.5)
    off = CocoInstances(*paths, train=True, flip_prob=0.5, lsj=False, lsj_scale=(0.5, 0.6),
                        lsj_size=32)
    unflipped = CocoInstances(*paths)
    for seed in range(8):
        sample = off[(seed % len(off), seed)]
        assert _samples_equal(sample, plain[(seed % len(off), seed)])
        assert sample[0].shape == (3, 64, 64)
        flip = float(torch.rand((), generator=torch.Generator().manual_seed(seed))) < 0.5
        image = unflipped[seed % len(off)][0]
        assert torch.equal(sample[0], image.flip(-1) if flip else image)
    evaluation = CocoInstances(*paths, lsj=True, lsj_size=32)
    assert _samples_equal(evaluation[0], unflipped[0])
    # An oracle outside CocoInstances (the comparisons above are the class against
    # itself): the files' pixels decoded here with PIL, and which instances have a mask
    # read from the JSON itself.
    data = json.loads(paths[0].read_text())
    for i in range(4):
        image_id = unflipped.ids[i]
        info = next(im for im in data["images"] if im["id"] == image_id)
        with Image.open(paths[1] / info["file_name"]) as f:
            pixels = np.asarray(f.convert("RGB"), dtype=np.float32) / 255.0
        pixels = torch.from_numpy(pixels).permute(2, 0, 1)
        has_mask = [("segmentation" in a) for a in data["annotations"]
                    if a["image_id"] == image_id and not a.get("iscrowd", 0)]
        for ds in (unflipped, evaluation):
            image, target = ds[i]
            assert torch.equal(image, pixels), (i, (image - pixels).abs().max())
            assert target["mask_valid"].tolist() == has_mask, i


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(lsj_scale=(2.0, 1.0)), "lsj_scale"), (dict(lsj_scale=(0.0, 1.0)), "lsj_scale"),
    (dict(lsj_scale=(0.5,)), "lsj_scale"), (dict(lsj_size=0), "lsj_size")])
def test_bad_lsj_arguments(shapes_data, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CocoInstances(*shapes_data["train"], train=True, lsj=True, **kwargs)
