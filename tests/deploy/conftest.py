"""Fixtures of the deploy tests: the two oracle models the issue names, built once per
session and shared by the ONNX, torch.export and CLI tests.

- tv_model: torchvision's maskrcnn_resnet50_fpn with calibrated random weights (real,
  varied detections), converted with MaskRCNN.from_torchvision; small test-time sizes.
- trained (tests/conftest.py, shared with the engine tests): the demo recipe trained
  150 iterations.
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
