"""Fixtures of the deploy tests: the two oracle models the issue names, built once per
session and shared by the ONNX, torch.export and CLI tests.

- tv_model: torchvision's maskrcnn_resnet50_fpn with calibrated random weights (real,
  varied detections), converted with MaskRCNN.from_torchvision; small test-time sizes.
- trained: a checkpoint trained here, the demo recipe (ResNet-18, 128 px synthetic
  shapes) for a fixed 150 iterations (~30 s on 2 cores): enough to tell objects from the
  background, so a blank image has no detections.
"""
import pytest
import torch

from maskrcnn import MaskRCNN
from tests.zoo.torchvision_oracle import coco_v1_like

torch.set_num_threads(2)

TV_KW = dict(min_size=320, max_size=512, rpn_pre_nms_top_n_test=300,
             rpn_post_nms_top_n_test=150, box_detections_per_img=20)
# (H, W) the exports are traced with, and the sizes they are checked at (all others).
EXPORT_SIZE = (240, 320)
CHECK_SIZES = ((300, 200), (97, 411), (416, 352))


def images(sizes, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *s, generator=g) for s in sizes]


@pytest.fixture(scope="session")
def tv_model():
    """Ours, converted from a calibrated torchvision v1 model (frozen BN eps 0)."""
    tv = coco_v1_like(images([EXPORT_SIZE])[0], **TV_KW)
    return MaskRCNN.from_torchvision(tv).eval()


# Other folders import the `trained` fixture (tests/engine/test_tiling.py); pytest then
# holds one fixture per importing module, so the training is cached here, once a process.
_TRAINED: dict = {}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(checkpoint path, held-out shapes images): the demo recipe after 150 iterations."""
    if "result" not in _TRAINED:
        _TRAINED["result"] = _train_demo_recipe(tmp_path_factory)
    return _TRAINED["result"]


def _train_demo_recipe(tmp_path_factory):
    from engine.data import CocoInstances
    from engine.shapes import make_shapes
    from engine.train import train
    root = tmp_path_factory.mktemp("deploy_trained")
    train_json, train_images = make_shapes(root, "train", 150, 128, 3, seed=0)
    val_json, val_images = make_shapes(root, "val", 8, 128, 3, seed=1000)
    # The resolved config of the demo recipe (MaskRCNN validates the overrides).
    cfg = MaskRCNN(config="configs/demo.ini", num_classes=3, train_json=str(train_json),
                   train_images=str(train_images), val_json="none",
                   output_dir=str(root / "out"), max_iter=150, warmup_iters=20,
                   checkpoint_every=0, log_every=50).cfg
    summary = train(cfg, progress=False)
    dataset = CocoInstances(str(val_json), str(val_images), train=False)
    return summary["checkpoint"], [dataset[i][0] for i in range(len(dataset))]
