"""Tiled prediction (engine/tiling.py): windows, crop RLEs against pycocotools, the merge
rule on hand-made detections, and a trained demo-recipe model on a composed image."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from engine.tiling import (MaskCrop, crop_to_rle, dense_to_crops, merge_tiles,
                           predict_tiled, shift_crop, tile_windows)

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ windows

@pytest.mark.parametrize("height, width, tile, overlap", [
    (300, 500, 128, 0.2), (128, 128, 128, 0.5), (100, 60, 128, 0.2), (257, 129, (64, 128), 0.0),
    (1000, 37, 100, 0.9)])
def test_windows_cover_the_image_with_the_stride(height, width, tile, overlap):
    windows = tile_windows(height, width, tile, overlap)
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    covered = np.zeros((height, width), dtype=np.int64)
    for y0, x0, y1, x1 in windows:
        assert (y1 - y0, x1 - x0) == (min(th, height), min(tw, width))
        assert 0 <= y0 and 0 <= x0 and y1 <= height and x1 <= width
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    for side, t, axis in ((height, th, 0), (width, tw, 1)):
        starts = sorted({w[axis] for w in windows})
        if side <= t:
            assert starts == [0]
            continue
        stride = round(t * (1 - overlap))
        # regular stride, then one window ending on the border
        assert starts[:-1] == list(range(0, starts[-2] + 1, stride))
        assert starts[-1] == side - t and 0 < starts[-1] - starts[-2] <= stride


def test_small_image_is_one_window():
    assert tile_windows(90, 128, 128, 0.3) == [(0, 0, 90, 128)]


@pytest.mark.parametrize("kwargs, words", [
    (dict(tile=0), "tile must be a positive int"), (dict(tile=(64,)), "tile must be"),
    (dict(tile=64.0), "tile must be"), (dict(overlap=1.0), "overlap must be"),
    (dict(overlap=-0.1), "overlap must be"), (dict(height=0), "image height")])
def test_window_arguments_are_checked(kwargs, words):
    args = dict(height=100, width=100, tile=64, overlap=0.2) | kwargs
    with pytest.raises(ValueError, match=words):
        tile_windows(**args)


# ------------------------------------------------------------------------------ crops

def _encode(dense):
    """The oracle: pycocotools' RLE of a dense uint8 mask, counts as str."""
    rle = mask_utils.encode(np.asfortranarray(dense))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _dense(crop, height, width):
    """The full mask a crop stands for, by plain indexing (the oracle's input)."""
    full = np.zeros((height + 2 * 64, width + 2 * 64), dtype=np.uint8)   # room outside
    h, w = crop.mask.shape
    full[crop.y0 + 64:crop.y0 + 64 + h, crop.x0 + 64:crop.x0 + 64 + w] = crop.mask.numpy()
    return full[64:64 + height, 64:64 + width]


@pytest.mark.parametrize("x0, y0, h, w", [
    (5, 7, 20, 30),          # inside
    (-6, -9, 25, 18),        # clipped at the top-left corner
    (40, 25, 30, 40),        # clipped at the bottom-right corner
    (0, 0, 48, 64),          # the whole image: runs join across columns
    (10, 0, 48, 3),          # full-height columns
    (70, 10, 5, 5),          # entirely outside
    (3, 3, 0, 0),            # empty crop
])
def test_crop_rle_equals_pycocotools(x0, y0, h, w):
    height, width = 48, 64
    g = torch.Generator().manual_seed(x0 * 1000 + y0 * 10 + h)
    for density in (0.0, 0.5, 1.0):
        crop = MaskCrop(x0, y0, torch.rand(h, w, generator=g) < density)
        dense = _dense(crop, height, width)
        expected = _encode(dense)
        assert crop_to_rle(crop, height, width) == expected, (density, expected)


def test_crop_rle_corner_pixels():
    for y, x in ((0, 0), (47, 63), (47, 0), (0, 63)):
        crop = MaskCrop(x, y, torch.ones(1, 1, dtype=torch.bool))
        dense = _dense(crop, 48, 64)
        assert crop_to_rle(crop, 48, 64) == _encode(dense)


def test_dense_to_crops_and_shift():
    masks = torch.zeros(3, 1, 20, 30)
    masks[0, 0, 4:9, 10:12] = 0.9
    masks[0, 0, 6, 20] = 0.5                   # >= threshold counts
    masks[1, 0, 2, 3] = 0.49                   # below: an empty crop
    masks[2] = 1.0
    crops = dense_to_crops(masks, 0.5)
    for crop, mask in zip(crops, masks[:, 0] >= 0.5):
        assert torch.equal(torch.from_numpy(_dense(crop, 20, 30)).bool(), mask)
    assert (crops[0].x0, crops[0].y0, tuple(crops[0].mask.shape)) == (10, 4, (5, 11))
    assert crops[1].mask.numel() == 0
    moved = shift_crop(crops[0], 100, 50)
    assert (moved.x0, moved.y0) == (110, 54) and moved.mask is crops[0].mask


# ------------------------------------------------------------------------------ merge

def _det(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32)}


def test_merge_rule_on_hand_made_detections():
    # Two tiles side by side on a 100 x 180 image, sharing columns 80..100; the only
    # interior edges are x = 100 (left tile) and x = 80 (right tile); "cut" = within 2 px.
    windows = [(0, 0, 100, 100), (0, 80, 100, 180)]
    left = _det([[60, 10, 95, 40],      # A whole (margin 5)
                 [70, 60, 100, 90],     # B, larger than the overlap: cut here...
                 [84, 45, 96, 55],      # C whole in both tiles, margin 4 here
                 [10, 60, 40, 90],      # two same-class boxes of one tile, IoU 0.77:
                 [12, 62, 42, 92]],     # the model's NMS kept both; so do we
                [1, 2, 1, 1, 1], [0.6, 0.95, 0.85, 0.7, 0.65])
    right = _det([[80, 10, 95, 40],     # A cut: IoU 0.43 with the whole A, all inside it
                  [80, 60, 110, 90],    # ...and cut here: IoU 0.5, 2/3 inside each other
                  [85, 45, 97, 55],     # C, margin 5 here: the more central one
                  [80, 12, 95, 38]],    # on A, but another class
                 [1, 2, 1, 3], [0.9, 0.8, 0.4, 0.3])
    out = merge_tiles([left, right], windows, (100, 180))
    got = [(round(s, 2), tuple(b)) for s, b in zip(out["scores"].tolist(),
                                                   out["boxes"].tolist())]
    # A: the whole detection wins over the better-scored cut one and keeps its score;
    # B: both cut, the higher score wins; C: the more central wins over the higher score.
    assert got == [(0.95, (70.0, 60.0, 100.0, 90.0)), (0.7, (10.0, 60.0, 40.0, 90.0)),
                   (0.65, (12.0, 62.0, 42.0, 92.0)), (0.6, (60.0, 10.0, 95.0, 40.0)),
                   (0.4, (85.0, 45.0, 97.0, 55.0)), (0.3, (80.0, 12.0, 95.0, 38.0))]


def test_predict_tiled_checks_inputs():
    def detect(tiles):
        return [_det([], [], []) for _ in tiles]
    with pytest.raises(ValueError, match="Tensor\\[3, H, W\\]"):
        predict_tiled(detect, torch.zeros(1, 3, 10, 10), 8)
    with pytest.raises(ValueError, match="uint8 .* or float"):
        predict_tiled(detect, torch.zeros(3, 10, 10, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="one per tile"):
        predict_tiled(lambda tiles: [], torch.zeros(3, 10, 10), 8)
    dense = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 8, 8)}
    with pytest.raises(ValueError, match="dense_to_crops"):
        predict_tiled(lambda tiles: [dense] * len(tiles), torch.zeros(3, 10, 10), 8)
    out = predict_tiled(detect, torch.zeros(3, 10, 10, dtype=torch.uint8), 8)
    assert out["boxes"].shape == (0, 4) and out["scores"].numel() == 0


# ------------------------------------------------------------------ a trained model

TILE, OVERLAP = 128, 0.5      # the demo recipe's image size; every object <= 64 px fits


def _model_detect(path):
    """detect(tiles) -> crop-form detections of the checkpoint's model, in tile pixels."""
    from engine.predict import load_model
    model, _ = load_model(path)

    @torch.no_grad()
    def detect(tiles):
        return [{"boxes": o["boxes"], "labels": o["labels"], "scores": o["scores"],
                 "windows": dense_to_crops(o["masks"], 0.5)} for o in model(tiles)]
    return detect


def _overlap(a, b):
    """(IoU, intersection / area of a) of two (x1, y1, x2, y2) boxes (plain floats)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return w * h / (area_a + area_b - w * h), w * h / area_a


def _xyxy(window):
    y0, x0, y1, x1 = window
    return (x0, y0, x1, y1)


def _margin(box, window, size=(192, 192)):
    """Distance from box to the window's nearest edge inside the image (hand-written)."""
    y0, x0, y1, x1 = window
    gaps = [box[0] - x0 if x0 > 0 else 1e9, box[1] - y0 if y0 > 0 else 1e9,
            x1 - box[2] if x1 < size[1] else 1e9, y1 - box[3] if y1 < size[0] else 1e9]
    return min(gaps)


@pytest.fixture(scope="module")
def composed(trained):
    """A 192 x 192 uint8 image of four held-out 128 px scenes (one whole, three cut, 2 x 2)
    run in 4 tiles of 128 px; each detect call is recorded: with batch_size=1, its output
    is that tile run alone. alone: [(window, detection in image pixels: boxes, labels,
    scores, crops)]."""
    path, scenes = trained
    model_detect = _model_detect(path)
    canvas = torch.zeros(3, 256, 256)
    for k, scene in enumerate(scenes[:4]):
        y, x = 128 * (k // 2), 128 * (k % 2)
        canvas[:, y:y + 128, x:x + 128] = scene
    image = (canvas[:, :192, :192] * 255).round().to(torch.uint8)
    calls = []

    def detect(tiles):
        outputs = model_detect(tiles)
        calls.append((tiles, outputs))
        return outputs
    tiled = predict_tiled(detect, image, TILE, OVERLAP, batch_size=1)
    windows = tile_windows(192, 192, TILE, OVERLAP)
    assert len(calls) == len(windows) == 4
    alone = []
    for (y0, x0, y1, x1), ((tile,), (d,)) in zip(windows, calls):
        assert torch.equal(tile, image[:, y0:y1, x0:x1].float() / 255)
        alone.append(((y0, x0, y1, x1), {
            "boxes": d["boxes"] + torch.tensor([x0, y0, x0, y0]), "labels": d["labels"],
            "scores": d["scores"], "windows": [shift_crop(c, x0, y0) for c in d["windows"]]}))
    return dict(alone=alone, tiled=tiled, image=image, checkpoint=path)


def _rows(d):
    return list(zip(d["boxes"].tolist(), d["labels"].tolist(), d["scores"].tolist(),
                    d["windows"]))


def _whole_objects(alone):
    """Detections d of a window W, at least 3 px inside W's interior edges, with at most
    half of d's box inside any other window, and some of it inside another: no other
    tile sees the object whole, and the merge has to choose."""
    found = []
    for window, d in alone:
        for box, label, score, crop in _rows(d):
            inside_others = [_overlap(box, _xyxy(w))[1] for w, _ in alone if w != window]
            if _margin(box, window) >= 3 and max(inside_others) <= 0.5 \
                    and max(inside_others) > 0:
                found.append((window, box, label, score, crop))
    return found


def test_tiled_detections_are_tiles_detections(composed):
    every = {(tuple(b), l, s) for _, d in composed["alone"] for b, l, s, _ in _rows(d)}
    tiled = _rows(composed["tiled"])
    assert tiled and all((tuple(b), l, s) in every for b, l, s, _ in tiled)
    assert [s for _, _, s, _ in tiled] == sorted((s for _, _, s, _ in tiled), reverse=True)


def test_object_inside_one_tile_keeps_that_tiles_detection(composed):
    tiled = _rows(composed["tiled"])
    objects = _whole_objects(composed["alone"])
    assert len(objects) >= 3
    for window, box, label, score, crop in objects:
        match = [t for t in tiled if t[1] == label and torch.allclose(
            torch.tensor(t[0]), torch.tensor(box), rtol=0, atol=1e-4)]
        assert len(match) == 1, f"{label} at {box} from {window}: tiled {tiled}"
        (_, _, got_score, got_crop), = match
        assert got_score == score
        assert (got_crop.x0, got_crop.y0) == (crop.x0, crop.y0)
        assert torch.equal(got_crop.mask, crop.mask)


def test_object_across_tile_edges_is_reported_once(composed):
    """Of an object whole in one tile, no cut part from another tile survives (the tiles
    alone report such parts: without the merge the object would be there twice)."""
    alone, tiled = composed["alone"], _rows(composed["tiled"])
    origin = {(tuple(b), l, s): w for w, d in alone for b, l, s, _ in _rows(d)}
    fragments_before = 0
    for window, box, label, _, _ in _whole_objects(alone):
        for other, d in alone:
            fragments_before += sum(
                other != window and l == label and _margin(b, other) < 1
                and _overlap(b, box)[1] > 0.5 for b, l, _, _ in _rows(d))
        for b, l, s, _ in tiled:
            if l == label and _overlap(b, box)[1] > 0.5:
                source = origin[(tuple(b), l, s)]
                assert source == window or _margin(b, source) >= 1, \
                    f"a cut part {b} from {source} of the object {box} from {window}"
    assert fragments_before >= 1


def test_predictor_tiles_through_predict_tiled(composed):
    """engine.Predictor(tile=...) gives its detections under "windows": the same merged
    detections, and its RLEs are those of our crops."""
    from engine.predict import Predictor
    predictor = Predictor(composed["checkpoint"], tile=TILE, tile_overlap=OVERLAP)
    result, = predictor([composed["image"]])
    ours = composed["tiled"]
    assert torch.equal(result["boxes"], ours["boxes"])
    assert torch.equal(result["scores"], ours["scores"])
    assert result["masks"] == [crop_to_rle(c, 192, 192) for c in ours["windows"]]


def test_perfect_detector_reports_each_object_once_whole():
    """A detector that sees exactly the part of each square inside its tile, scoring cut
    parts higher than whole squares: the merge keeps each square once, whole, in any
    batch size."""
    squares = [(20, 30, 45, 60), (90, 90, 120, 114), (150, 40, 181, 62), (250, 160, 280, 190),
               (5, 170, 30, 198)]                                  # x1, y1, x2, y2
    image = torch.zeros(3, 200, 300, dtype=torch.uint8)
    batch_sizes = []

    def detect(tiles, windows):
        batch_sizes.append(len(tiles))
        out = []
        for (y0, x0, y1, x1) in windows:
            parts = [(max(a, x0), max(b, y0), min(c, x1), min(d, y1))
                     for a, b, c, d in squares]
            parts = [(a - x0, b - y0, c - x0, d - y0, (c - a) * (d - b) / area)
                     for (a, b, c, d), area in zip(parts, [(c - a) * (d - b) for a, b, c, d
                                                           in squares]) if a < c and b < d]
            out.append(dict(_det([p[:4] for p in parts], [1] * len(parts),
                                 [1.5 - p[4] for p in parts]),
                            windows=[MaskCrop(a, b, torch.ones(d - b, c - a, dtype=torch.bool))
                                   for a, b, c, d, _ in parts]))
        return out
    windows = tile_windows(200, 300, 64, 0.5)
    results = []
    for batch_size in (1, 4):
        queue = list(windows)

        def detect_next(tiles):
            taken = [queue.pop(0) for _ in tiles]
            assert all(t.shape[1:] == (w[2] - w[0], w[3] - w[1]) for t, w in zip(tiles, taken))
            return detect(tiles, taken)
        results.append(predict_tiled(detect_next, image, 64, 0.5, batch_size=batch_size))
    assert batch_sizes == [1] * len(windows) + [4] * (len(windows) // 4) + [len(windows) % 4]
    for out in results:
        assert sorted(map(tuple, out["boxes"].tolist())) == sorted(map(tuple, squares))
        assert out["scores"].tolist() == [0.5] * len(squares)          # the whole ones
        for box, crop in zip(out["boxes"].int().tolist(), out["windows"]):
            dense = np.zeros((200, 300), dtype=np.uint8)
            dense[box[1]:box[3], box[0]:box[2]] = 1
            assert crop_to_rle(crop, 200, 300) == _encode(dense)


# A child process, so that its peak RSS is this run's alone: engine.Predictor on a
# 6000 x 8000 uint8 image of repeated held-out scenes, tiled at 1024 px (80 tiles; the
# model resizes each to 128 px), masks as RLE.
RSS_CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from engine.predict import Predictor
checkpoint, scene_file = sys.argv[1:3]
predictor = Predictor(checkpoint, tile=1024, tile_overlap=0.2, mask_format="rle")
scene = torch.load(scene_file)                          # uint8 [3, 128, 128]
image = scene.repeat(1, 47, 63)[:, :6000, :8000]        # 144 MB
before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result, = predictor([image])
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mb": before_mb, "detections": len(result["masks"])}))
"""


@pytest.mark.slow
def test_8000x6000_image_peak_rss_under_3gb(trained, tmp_path):
    path, scenes = trained
    scene_file = tmp_path / "scene.pt"
    torch.save((scenes[0] * 255).round().to(torch.uint8), scene_file)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(scene_file)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # a full-size mask per detection would be 48 MB each: many detections prove the crops
    assert report["detections"] >= 50, report
    assert report["rss_mb"] < 3 * 1024, report
