"""tools/boxes.py against hand-computed values and torchvision (our oracle)."""
import math

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.ops import boxes as tv_boxes

from tools.boxes import (BalancedPositiveNegativeSampler, BoxCoder, Matcher, box_area,
                         box_iou, clip_boxes_to_image, remove_small_boxes)


def random_boxes(n, size=100.0, generator=None, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=generator, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------- geometry

def test_box_area_hand_computed():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 2.0, 4.0, 3.0], [5.0, 5.0, 5.0, 9.0]])
    assert box_area(boxes).tolist() == [100.0, 3.0, 0.0]


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0],     # identical -> 1
                      [5.0, 0.0, 15.0, 10.0],     # half overlap: 50 / 150
                      [10.0, 10.0, 20.0, 20.0],   # touching corner -> 0
                      [2.0, 2.0, 4.0, 4.0]])      # contained: 4 / 100
    iou = box_iou(a, b)
    assert iou.shape == (1, 4)
    torch.testing.assert_close(iou, torch.tensor([[1.0, 1 / 3, 0.0, 0.04]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_box_iou_matches_torchvision(dtype):
    g = torch.Generator().manual_seed(0)
    a = random_boxes(7, generator=g).to(dtype)
    b = random_boxes(11, generator=g).to(dtype)
    ours = box_iou(a, b)
    assert ours.shape == (7, 11)
    assert torch.equal(ours, tv_boxes.box_iou(a, b))


def test_box_iou_empty():
    assert box_iou(torch.zeros(0, 4), random_boxes(3)).shape == (0, 3)
    assert box_iou(random_boxes(3), torch.zeros(0, 4)).shape == (3, 0)


def test_clip_and_remove_small_match_torchvision():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(50, size=80, generator=g) - 20
    for size in [(50, 70), (64, 32)]:
        clipped = clip_boxes_to_image(boxes, size)
        assert torch.equal(clipped, tv_boxes.clip_boxes_to_image(boxes, size))
        assert clipped[:, 0::2].max() <= size[1] and clipped[:, 1::2].max() <= size[0]
        assert torch.equal(remove_small_boxes(clipped, 3.0), tv_boxes.remove_small_boxes(clipped, 3.0))
    batched = boxes.view(5, 10, 4)
    assert torch.equal(clip_boxes_to_image(batched, (50, 70)),
                       tv_boxes.clip_boxes_to_image(batched, (50, 70)))


def test_remove_small_boxes_hand_computed():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.0, 0.0, 0.5, 5.0], [0.0, 0.0, 5.0, 0.9]])
    assert remove_small_boxes(boxes, 1.0).tolist() == [0]


# ---------------------------------------------------------------- BoxCoder

@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(weights):
    g = torch.Generator().manual_seed(2)
    anchors = random_boxes(64, generator=g)
    gt = random_boxes(64, generator=g)
    ours, theirs = BoxCoder(weights), tv_utils.BoxCoder(weights)

    targets = ours.encode(gt, anchors)
    assert targets.shape == (64, 4)
    assert torch.equal(targets, theirs.encode_single(gt, anchors))

    for j in (1, 3):
        deltas = torch.randn(64, 4 * j, generator=g) * 2  # some dw/dh hit the clamp
        decoded = ours.decode(deltas, anchors)
        assert decoded.shape == (64, j, 4)
        assert torch.equal(decoded, theirs.decode(deltas, [anchors]))


def test_box_coder_round_trip_and_clamp():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors = random_boxes(20, generator=torch.Generator().manual_seed(3)).double()
    gt = random_boxes(20, generator=torch.Generator().manual_seed(4)).double()
    torch.testing.assert_close(coder.decode(coder.encode(gt, anchors), anchors)[:, 0], gt)

    huge = torch.tensor([[0.0, 0.0, 1e4, 1e4]])  # dw, dh clamp to log(1000/16) * 5
    box = coder.decode(huge, torch.tensor([[0.0, 0.0, 16.0, 16.0]]))[0, 0]
    torch.testing.assert_close(box[2] - box[0], torch.tensor(1000.0))
    assert coder.bbox_xform_clip == math.log(1000.0 / 16)


def test_box_coder_empty():
    coder = BoxCoder()
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert coder.decode(torch.zeros(0, 8), torch.zeros(0, 4)).shape == (0, 2, 4)


# ---------------------------------------------------------------- Matcher

def test_matcher_hand_computed():
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.2],
                        [0.1, 0.6, 0.2, 0.25]])
    plain = Matcher(0.7, 0.3)(iou)
    assert plain.tolist() == [0, -2, -1, -1]
    # GT 1's best prediction is column 1 (0.6): restored to its own best GT (1).
    # GT 0's best is column 0, already matched.
    low = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert low.tolist() == [0, 1, -1, -1]


@pytest.mark.parametrize("allow_low", [False, True])
def test_matcher_matches_torchvision(allow_low):
    g = torch.Generator().manual_seed(5)
    gt = random_boxes(6, generator=g)
    preds = torch.cat([random_boxes(200, generator=g), gt[:2]])  # exact hits and ties
    iou = box_iou(gt, preds)
    ours = Matcher(0.7, 0.3, allow_low)(iou)
    theirs = tv_utils.Matcher(0.7, 0.3, allow_low)(iou)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, theirs)


def test_matcher_empty_gt_is_background():
    out = Matcher(0.7, 0.3, True)(torch.zeros(0, 5))
    assert out.tolist() == [-1] * 5


# ---------------------------------------------------------------- sampler

def test_sampler_counts_and_torchvision_order():
    g = torch.Generator().manual_seed(6)
    labels = [torch.randint(-1, 3, (300,), generator=g), torch.randint(-1, 1, (40,), generator=g)]
    labels[1][:3] = 1
    torch.manual_seed(0)
    pos, neg = BalancedPositiveNegativeSampler(64, 0.25)(labels)
    torch.manual_seed(0)
    tv_pos, tv_neg = tv_utils.BalancedPositiveNegativeSampler(64, 0.25)(labels)
    for p, n, tp, tn, lab in zip(pos, neg, tv_pos, tv_neg, labels):
        assert p.dtype == torch.bool and n.dtype == torch.bool
        assert torch.equal(p, tp.bool()) and torch.equal(n, tn.bool())
        assert (lab[p] >= 1).all() and (lab[n] == 0).all()
    assert pos[0].sum() == 16 and neg[0].sum() == 48
    assert pos[1].sum() == 3 and neg[1].sum() == min(61, int((labels[1] == 0).sum()))
