"""A variant is one class and one table entry: a new mask head and a new box RoI pooler,
each defined here and added to its slot's table (nothing else of the library edited),
build from a config naming them, train, are saved and rebuilt by
MaskRCNN.from_checkpoint, and export to ONNX with eager's detections.

- UpsampleMaskHead: two 3x3 convs and a bilinear 2x upsample (the shipped predictor's
  transposed conv then doubles again: 28 -> 56 pixel masks).
- AdaptiveFeaturePooling (PANet): every box pooled from every FPN level with the
  library's RoIAlign op, the levels fused by element-wise max.
"""
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import heads
import libs
import pooling
from maskrcnn import MaskRCNN
from tests.deploy.helpers import pairs_with_masks

torch.set_num_threads(2)

# The bar: >= 98% of eager's detections paired with the export's (same label,
# score within 1e-4, box within 1e-2 px), mask IoU >= 0.99 on the pairs.
PAIRED, SCORE_TOL, BOX_TOL, MASK_IOU = 0.98, 1e-4, 1e-2, 0.99


class UpsampleMaskHead(nn.Module):
    """MASK_HEADS entry: Tensor[R, C, P, P] -> Tensor[R, layers[-1], 2P, 2P]."""

    def __init__(self, in_channels, layers, dilation, norm, fast_path):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, layers[-1], 3, padding=1)
        self.conv2 = nn.Conv2d(layers[-1], layers[-1], 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class AdaptiveFeaturePooling(nn.Module):
    """ROI_POOLERS entry (PANet): each box from every level, element-wise max."""

    def __init__(self, output_size, sampling_ratio, aligned, canonical_scale,
                 canonical_level, level_rule):
        super().__init__()
        self.output_size, self.sampling_ratio, self.aligned = \
            output_size, sampling_ratio, aligned

    def forward(self, features, boxes, image_sizes):
        sizes = [tuple(f.shape[-2:]) for f in features]
        scales = pooling.level_scales(sizes, image_sizes)
        pooled = [libs.roi_align(f, boxes, self.output_size, s, self.sampling_ratio,
                                 self.aligned) for f, s in zip(features, scales)]
        return functools.reduce(torch.maximum, pooled)


VARIANTS = {
    "mask_head": (heads.MASK_HEADS, "upsample", UpsampleMaskHead,
                  lambda m: m.roi_heads.mask_head),
    "box_roi_pool": (pooling.ROI_POOLERS, "adaptive", AdaptiveFeaturePooling,
                     lambda m: m.roi_heads.box_roi_pool),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(train json, train images, held-out images Tensor[3, H, W]) of the demo data."""
    from engine.data import CocoInstances
    from engine.shapes import make_shapes
    root = tmp_path_factory.mktemp("variants")
    train_json, train_images = make_shapes(root, "train", 8, 128, 3, seed=0)
    val_json, val_images = make_shapes(root, "val", 3, 128, 3, seed=1000)
    val = CocoInstances(str(val_json), str(val_images), train=False)
    return train_json, train_images, [val[i][0] for i in range(len(val))]


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_variant_builds_trains_saves_and_exports(key, shapes, tmp_path, monkeypatch):
    from engine.train import train
    import deploy
    table, name, cls, module_of = VARIANTS[key]
    monkeypatch.setitem(table, name, cls)
    train_json, train_images, held_out = shapes
    cfg = MaskRCNN(config="configs/demo.ini", num_classes=3, train_json=str(train_json),
                   train_images=str(train_images), val_json="none",
                   output_dir=str(tmp_path / "out"), max_iter=2, warmup_iters=1,
                   checkpoint_every=0, log_every=1, **{key: name}).cfg
    assert cfg.box_head.box_roi_pool if key == "box_roi_pool" else cfg.mask_head.mask_head

    # Builds from a config that names it, trains two steps with finite losses.
    summary = train(cfg, progress=False)
    assert summary["iterations"] == 2, summary
    records = [json.loads(line) for line in
               (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    losses = [r["losses"] for r in records if "losses" in r]
    assert len(losses) == 2, records
    for step in losses:
        assert set(step) >= {"loss_cls", "loss_box", "loss_mask"}, step
        assert all(math.isfinite(v) for v in step.values()), step

    # Saved and rebuilt from the checkpoint with equal outputs.
    # Two steps from scratch score every class below the shipped threshold: keep all.
    model = MaskRCNN.from_checkpoint(summary["checkpoint"], box_score_thresh=0.0).eval()
    assert isinstance(module_of(model), cls)
    again = MaskRCNN.from_checkpoint(summary["checkpoint"], box_score_thresh=0.0).eval()
    with torch.no_grad():
        for image in held_out:
            a, b = model([image])[0], again([image])[0]
            assert all(torch.equal(a[k], b[k]) for k in a), "rebuilt model differs"

    # Exported to ONNX: the same detections in ONNX Runtime.
    pytest.importorskip("onnxruntime", reason="the [export] extra (make test installs it)")
    path = deploy.export_onnx(model, tmp_path / "variant.onnx", example_size=(128, 128))
    predictor = deploy.OnnxPredictor(path, threads=2)
    total = paired = 0
    for image in held_out + [torch.rand(3, 97, 150, generator=torch.Generator().manual_seed(3))]:
        with torch.no_grad():
            eager = model([image])[0]
        exported = predictor(image)
        pairs = pairs_with_masks(eager, exported, SCORE_TOL, BOX_TOL, MASK_IOU, key)
        total, paired = total + len(eager["scores"]), paired + len(pairs)
    assert total > 0, "no detections to compare"
    assert paired >= PAIRED * total, f"{key}: {paired} of {total} detections paired"
