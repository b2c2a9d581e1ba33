"""The fast path (BatchNorm folded into the convs, Winograd 3x3 convs) on trained weights:
the demo recipe trained here for 600 iterations (about two minutes) on synthetic shapes,
then evaluated twice on held-out images, fast (the default) and exact (fuse_bn = false).
pycocotools is the oracle for AP; the detections are matched one to one.

Random weights amplify rounding (features of 1e2..1e5); trained ones do not, which is why
the fast path is the default. Shapes: D detections.
"""
from pathlib import Path

import pytest
import torch

from maskrcnn import DEFAULT_CONFIG, apply_overrides, load_config
from tools.boxes import box_iou

PACKAGE_DIR = Path(__file__).resolve().parents[2]   # the repository root

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, val dataset) of the demo recipe after 600 iterations (a fixed
    count, not a time budget: the result must not depend on the machine's load)."""
    from engine.data import CocoInstances
    from engine.shapes import make_shapes
    from engine.train import train
    root = tmp_path_factory.mktemp("fast_path")
    train_json, train_images = make_shapes(root, "train", 300, 128, 3, seed=0)
    val_json, val_images = make_shapes(root, "val", 40, 128, 3, seed=1000)
    cfg = load_config(PACKAGE_DIR / "configs" / "demo.ini")
    cfg = apply_overrides(cfg, {
        "train_json": str(train_json), "train_images": str(train_images),
        "val_json": "none", "output_dir": str(root / "out"), "num_classes": 3,
        "max_iter": 600, "warmup_iters": 50, "checkpoint_every": 0, "log_every": 50})
    summary = train(cfg, progress=False)
    return summary["checkpoint"], CocoInstances(str(val_json), str(val_images), train=False)


def _matched(fast, exact, min_score=0.5):
    """(matched, total): fast detections scoring >= min_score with an exact detection of
    the same label at IoU >= 0.9 and a score within 0.01."""
    keep = fast["scores"] >= min_score
    boxes, labels, scores = fast["boxes"][keep], fast["labels"][keep], fast["scores"][keep]
    if len(boxes) == 0:
        return 0, 0
    iou = box_iou(boxes, exact["boxes"]) if len(exact["boxes"]) else boxes.new_zeros(len(boxes), 0)
    same = (labels[:, None] == exact["labels"][None]) & (iou >= 0.9) & \
        ((scores[:, None] - exact["scores"][None]).abs() <= 0.01)
    return int(same.any(1).sum()), len(boxes)


@pytest.mark.slow
def test_fast_path_equals_exact_on_trained_weights(trained):
    from engine.evaluate import evaluate
    from engine.predict import load_model
    checkpoint, dataset = trained
    fast, _ = load_model(checkpoint)
    exact, _ = load_model(checkpoint, overrides={"fuse_bn": False})
    assert fast.cfg.backbone.fuse_bn and fast.cfg.backbone.winograd
    assert not exact.cfg.backbone.fuse_bn
    matched = total = 0
    with torch.no_grad():
        for i in range(len(dataset)):
            image = dataset[i][0]
            m, t = _matched(fast([image])[0], exact([image])[0])
            matched, total = matched + m, total + t
    print(f"fast vs exact: {matched} of {total} detections scoring >= 0.5 matched")
    assert total >= 20, f"only {total} detections scoring >= 0.5: the model is undertrained"
    assert matched >= 0.98 * total, f"{matched} of {total} detections matched"
    ap_fast = evaluate(fast, dataset, progress=False)
    ap_exact = evaluate(exact, dataset, progress=False)
    assert ap_exact["segm"]["AP"] > 0.05, "the model learned nothing: a vacuous test"
    for kind in ("bbox", "segm"):
        print(f"{kind} AP fast {ap_fast[kind]['AP']:.4f} exact {ap_exact[kind]['AP']:.4f}")
        assert abs(ap_fast[kind]["AP"] - ap_exact[kind]["AP"]) <= 0.005, kind


def test_default_config_runs_the_fast_path():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.backbone.fuse_bn and cfg.backbone.winograd
