"""proposal/rpn.py against torchvision's RegionProposalNetwork (our oracle).

Small features (16 channels, a 128x160 padded batch) keep these fast.
"""
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead as TVRPNHead

from convert.torchvision import convert_torchvision_rpn_state_dict, load_torchvision_rpn_state
from layers import EXACT
from proposal import RPN, AnchorGenerator, RPNHead
from tools.structures import ImageList

C = 16
GRIDS = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
IMAGES = ImageList(torch.zeros(2, 3, 128, 160), [(128, 150), (100, 160)])


def make_pair(pre_train=300, pre_test=200, post_train=150, post_test=100, seed=0):
    torch.manual_seed(seed)
    tv_head = TVRPNHead(C, 3)
    for p in tv_head.parameters():  # std 0.01 gives near-constant scores: spread them out
        torch.nn.init.normal_(p, std=0.3)
    tv = RegionProposalNetwork(
        TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
        tv_head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256,
        positive_fraction=0.5, pre_nms_top_n=dict(training=pre_train, testing=pre_test),
        post_nms_top_n=dict(training=post_train, testing=post_test), nms_thresh=0.7)
    ours = RPN(AnchorGenerator(), RPNHead(C, 3, fast_path=EXACT),
               rpn_pre_nms_top_n_train=pre_train, rpn_pre_nms_top_n_test=pre_test,
               rpn_post_nms_top_n_train=post_train, rpn_post_nms_top_n_test=post_test)
    load_torchvision_rpn_state(ours, tv)
    return ours, tv


def make_features(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, C, h, w, generator=g) for h, w in GRIDS]


def as_dict(features):
    return OrderedDict((str(i), f) for i, f in enumerate(features))


def gt_boxes(seed=2):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(4, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 16 + torch.rand(4, 2, generator=g) * 60], dim=1)
    return [boxes, boxes[:1] + 10]


def test_head_key_mapping_and_init():
    torch.manual_seed(0)                      # the inits (std 0.01, checked below)
    tv = TVRPNHead(C, 3)
    keys = set(convert_torchvision_rpn_state_dict(
        {"head." + k: v for k, v in tv.state_dict().items()}))
    assert keys == {"head." + k for k in RPNHead(C, 3).state_dict()}
    head = RPNHead(C, 3)
    assert head.cls_logits.bias.abs().sum() == 0
    assert 0.005 < head.convs[0].weight.std() < 0.015
    objectness, deltas = head(make_features())
    assert [o.shape[1] for o in objectness] == [3] * 5 and deltas[0].shape == (2, 12, 32, 40)


@pytest.mark.parametrize("defaults", [False, True])
def test_eval_proposals_match_torchvision(defaults):
    ours, tv = make_pair(pre_test=1000, post_test=1000) if defaults else make_pair()
    ours.eval(), tv.eval()
    features = make_features()
    with torch.no_grad():
        boxes, losses = ours(IMAGES, features)
        tv_boxes, _ = tv(IMAGES, as_dict(features))
    assert losses == {}
    for b, t, (h, w) in zip(boxes, tv_boxes, IMAGES.image_sizes, strict=True):
        assert b.shape == t.shape and b.shape[0] > 10
        assert torch.equal(b, t)               # the exact head: torchvision's proposals
        assert b[:, 0::2].max() <= w and b[:, 1::2].max() <= h
    if not defaults:
        assert all(b.shape[0] <= 100 for b in boxes)


def test_train_losses_and_proposals_match_torchvision():
    ours, tv = make_pair()
    features = [f.requires_grad_() for f in make_features()]
    gt = gt_boxes()
    torch.manual_seed(123)
    boxes, losses = ours.train()(IMAGES, features, gt)
    torch.manual_seed(123)
    tv_boxes, tv_losses = tv.train()(IMAGES, as_dict(features), [{"boxes": b} for b in gt])
    for b, t in zip(boxes, tv_boxes, strict=True):
        assert torch.equal(b, t)               # the same proposal arithmetic as in eval
        assert b.shape[0] <= 150
    # no equality promised for losses (means summed in another order round by ulps)
    torch.testing.assert_close(losses["loss_rpn_cls"], tv_losses["loss_objectness"],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses["loss_rpn_box"], tv_losses["loss_rpn_box_reg"],
                               rtol=1e-6, atol=1e-6)
    assert losses["loss_rpn_box"] > 0
    grads = torch.autograd.grad(losses["loss_rpn_cls"] + losses["loss_rpn_box"], features[0])
    tv_grads = torch.autograd.grad(tv_losses["loss_objectness"] + tv_losses["loss_rpn_box_reg"],
                                   features[0])
    torch.testing.assert_close(grads[0], tv_grads[0], rtol=1e-5, atol=1e-7)


def test_image_without_gt_matches_torchvision():
    ours, tv = make_pair()
    features = make_features()
    gt = [gt_boxes()[0], torch.zeros(0, 4)]
    torch.manual_seed(7)
    _, losses = ours.train()(IMAGES, features, gt)
    torch.manual_seed(7)
    _, tv_losses = tv.train()(IMAGES, as_dict(features), [{"boxes": b} for b in gt])
    torch.testing.assert_close(losses["loss_rpn_cls"], tv_losses["loss_objectness"])
    torch.testing.assert_close(losses["loss_rpn_box"], tv_losses["loss_rpn_box_reg"])


def test_no_gt_anywhere_gives_zero_connected_box_loss():
    ours, _ = make_pair()
    features = [f.requires_grad_() for f in make_features()]
    _, losses = ours.train()(IMAGES, features, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert losses["loss_rpn_box"].item() == 0 and losses["loss_rpn_box"].requires_grad
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"] > 0
    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    assert ours.head.cls_logits.weight.grad is not None


def test_eval_mode_with_gt_returns_losses_and_test_top_n():
    ours, tv = make_pair()
    features = make_features()
    with torch.no_grad():
        boxes, losses = ours.eval()(IMAGES, features, gt_boxes())
        tv_boxes, _ = tv.eval()(IMAGES, as_dict(features))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    for b, t in zip(boxes, tv_boxes, strict=True):  # eval top-n regardless of the GT
        assert torch.equal(b, t)
    _, losses = ours.train()(IMAGES, features, None)
    assert losses == {}


def test_default_constructor_values():
    rpn = RPN(AnchorGenerator(), RPNHead())
    assert (rpn.rpn_pre_nms_top_n_train, rpn.rpn_pre_nms_top_n_test) == (2000, 1000)
    assert (rpn.rpn_post_nms_top_n_train, rpn.rpn_post_nms_top_n_test) == (2000, 1000)
    assert (rpn.rpn_nms_thresh, rpn.rpn_score_thresh, rpn.rpn_min_size) == (0.7, 0.0, 1e-3)
    assert (rpn.matcher.high_threshold, rpn.matcher.low_threshold) == (0.7, 0.3)
    assert rpn.matcher.allow_low_quality_matches
    assert (rpn.sampler.batch_size_per_image, rpn.sampler.positive_fraction) == (256, 0.5)
    assert rpn.train().pre_nms_top_n == 2000 and rpn.eval().pre_nms_top_n == 1000


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_proposals_match_torchvision_cuda():
    ours, tv = make_pair()
    ours.eval().cuda(), tv.eval().cuda()
    features = [f.cuda() for f in make_features()]
    images = IMAGES.to("cuda")
    with torch.no_grad():
        boxes, _ = ours(images, features)
        tv_boxes, _ = tv(images, as_dict(features))
    for b, t in zip(boxes, tv_boxes):
        assert b.is_cuda
        torch.testing.assert_close(b, t, rtol=0, atol=1e-4)
