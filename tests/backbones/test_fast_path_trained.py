"""The fast path (BatchNorm folded into the convs, Winograd 3x3 convs) on trained weights:
the demo recipe trained here for 400 iterations (about a minute and a half) on synthetic shapes,
then evaluated twice on held-out images, fast (the default) and exact (fuse_bn = false).
pycocotools is the oracle for AP; the detections are paired one to one (same label, score
within 1e-4, box within 1e-2 px), tight enough that a 0.5% slip in folding fails.

Random weights amplify rounding (features of 1e2..1e5); trained ones do not, which is why
the fast path is the default. Shapes: D detections.
"""
from pathlib import Path

import pytest
import torch

from maskrcnn import DEFAULT_CONFIG, apply_overrides, load_config

PACKAGE_DIR = Path(__file__).resolve().parents[2]   # the repository root

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, val dataset) of the demo recipe after 400 iterations (a fixed
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
        "max_iter": 400, "warmup_iters": 50, "checkpoint_every": 0, "log_every": 50})
    summary = train(cfg, progress=False)
    return summary["checkpoint"], CocoInstances(str(val_json), str(val_images), train=False)


# Fast vs exact on these trained weights (measured, 400 iterations, 40 held-out images, 505
# detections, 61 scoring >= 0.5): scores within 2.4e-6, boxes within 5.4e-5 px, every
# detection paired. With the norms folded 0.5% off (scale * 1.005, a BatchNorm-folding
# slip) scores move by up to 1e-2 and boxes by 0.96 px, and none of the 505 pairs at these
# tolerances (600 iterations: 420 detections, the same picture).
SCORE_TOL, BOX_TOL, PAIRED = 1e-4, 1e-2, 0.99


@pytest.mark.slow
def test_fast_path_equals_exact_on_trained_weights(trained):
    from engine.evaluate import evaluate
    from engine.predict import load_model
    from tests.deploy.helpers import pair_detections
    checkpoint, dataset = trained
    fast, _ = load_model(checkpoint)
    exact, _ = load_model(checkpoint, overrides={"fuse_bn": False})
    assert fast.cfg.backbone.fuse_bn and fast.cfg.backbone.winograd
    assert not exact.cfg.backbone.fuse_bn
    paired = total = confident = 0
    with torch.no_grad():
        for i in range(len(dataset)):
            image = dataset[i][0]
            expected, got = exact([image])[0], fast([image])[0]
            assert len(got["scores"]) == len(expected["scores"]), f"image {i}: counts differ"
            paired += len(pair_detections(expected, got, SCORE_TOL, BOX_TOL))
            total += len(expected["scores"])
            confident += int((expected["scores"] >= 0.5).sum())
    print(f"fast vs exact: {paired} of {total} detections paired ({confident} score >= 0.5)")
    assert confident >= 20, f"only {confident} detections scoring >= 0.5: undertrained"
    assert paired >= PAIRED * total, f"{paired} of {total} detections paired"
    ap_fast = evaluate(fast, dataset, progress=False)
    ap_exact = evaluate(exact, dataset, progress=False)
    assert ap_exact["segm"]["AP"] > 0.05, "the model learned nothing: a vacuous test"
    for kind in ("bbox", "segm"):
        print(f"{kind} AP fast {ap_fast[kind]['AP']:.4f} exact {ap_exact[kind]['AP']:.4f}")
        assert abs(ap_fast[kind]["AP"] - ap_exact[kind]["AP"]) <= 0.005, kind


def test_default_config_runs_the_fast_path():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.backbone.fuse_bn and cfg.backbone.winograd
