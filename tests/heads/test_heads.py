"""RoI heads against torchvision's roi_heads functions (the oracle), plus zero-loss cases.

Shapes: R RoIs, K object classes (K + 1 logits), S = 28 mask size, D detections.
"""
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead as TvMLP
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign as TvMultiScaleRoIAlign

from heads import (MaskHead, MaskPredictor, RoIHeads, box_inference, fastrcnn_loss,
                   mask_inference, mask_loss, mask_target_labels,
                   paste_masks_in_image)
from heads.mask_head import image_masks_zeros
from tools.boxes import BoxCoder
from builder import build_roi_heads
from configs import apply_overrides, load_config

torch.set_num_threads(2)
K = 4  # object classes


def maskrcnn_loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs):
    """torchvision's maskrcnn_loss signature over ours: the full K + 1 logits, the GT
    class's channel selected, then heads.mask_loss (the model selects the channel inside
    MaskPredictor instead)."""
    labels = mask_target_labels(gt_labels, mask_matched_idxs)
    pred = mask_logits[torch.arange(labels.shape[0]), labels]
    return mask_loss(pred, proposals, gt_masks, mask_matched_idxs)


def _random_boxes(n, size=200.0, min_side=4.0, generator=None):
    xy = torch.rand(n, 2, generator=generator) * size * 0.7
    wh = torch.rand(n, 2, generator=generator) * size * 0.4 + min_side
    return torch.cat([xy, xy + wh], dim=1)


def _labels_and_targets(sizes, num_pos):
    labels, targets = [], []
    for n, p in zip(sizes, num_pos):
        lab = torch.zeros(n, dtype=torch.int64)
        lab[:p] = torch.randint(1, K + 1, (p,))
        labels.append(lab)
        targets.append(torch.randn(n, 4))
    return labels, targets


# ------------------------------------------------------------------------- box loss

def test_fastrcnn_loss_matches_torchvision():
    torch.manual_seed(0)
    labels, targets = _labels_and_targets([7, 5], [3, 2])
    logits, deltas = torch.randn(12, K + 1), torch.randn(12, 4 * (K + 1))
    ours = fastrcnn_loss(logits, deltas, labels, targets)
    ref = tv_roi_heads.fastrcnn_loss(logits, deltas, labels, targets)
    for a, b in zip(ours, ref, strict=True):
        # losses ~1 (no equality promised: a sum in another order would round by ulps)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fastrcnn_loss_l1_option():
    torch.manual_seed(0)
    labels, targets = _labels_and_targets([6], [2])
    logits, deltas = torch.randn(6, K + 1), torch.randn(6, 4 * (K + 1))
    _, loss_box = fastrcnn_loss(logits, deltas, labels, targets, box_loss="l1")
    pred = deltas.reshape(6, -1, 4)[[0, 1], labels[0][:2]]
    torch.testing.assert_close(loss_box, (pred - targets[0][:2]).abs().sum() / 6)


def test_fastrcnn_loss_no_positives_is_zero_and_connected():
    torch.manual_seed(0)
    labels, targets = _labels_and_targets([5], [0])
    logits = torch.randn(5, K + 1, requires_grad=True)
    deltas = torch.randn(5, 4 * (K + 1), requires_grad=True)
    loss_cls, loss_box = fastrcnn_loss(logits, deltas, labels, targets)
    assert loss_box.item() == 0 and loss_box.requires_grad
    (loss_cls + loss_box).backward()
    assert deltas.grad is not None and deltas.grad.abs().sum() == 0


def test_fastrcnn_loss_no_rois_is_zero_not_nan():
    logits = torch.zeros(0, K + 1, requires_grad=True)
    deltas = torch.zeros(0, 4 * (K + 1), requires_grad=True)
    loss_cls, loss_box = fastrcnn_loss(logits, deltas, [torch.zeros(0, dtype=torch.int64)],
                                       [torch.zeros(0, 4)])
    assert loss_cls.item() == 0 and loss_box.item() == 0
    (loss_cls + loss_box).backward()


# ------------------------------------------------------------------------ mask loss

def _mask_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    gt_masks = [(torch.rand(3, 64, 80, generator=g) > 0.5).to(torch.uint8),
                (torch.rand(2, 50, 60, generator=g) > 0.5).to(torch.uint8)]
    gt_labels = [torch.tensor([1, 3, 4]), torch.tensor([2, 2])]
    proposals = [_random_boxes(5, 60.0, generator=g), _random_boxes(4, 50.0, generator=g)]
    matched = [torch.tensor([0, 1, 2, 1, 0]), torch.tensor([1, 0, 0, 1])]
    logits = torch.randn(9, K + 1, 28, 28, generator=g)
    return logits, proposals, gt_masks, gt_labels, matched


def test_maskrcnn_loss_matches_torchvision():
    args = _mask_case()
    # a mean BCE (~0.8) over 9 x 28 x 28 terms: their sum in another order rounds by ~1e-6
    torch.testing.assert_close(maskrcnn_loss(*args), tv_roi_heads.maskrcnn_loss(*args),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_mask_predictor_selected_class_equals_full_logits(layout, seed):
    """Training computes only each RoI's own-class logits: the same values, loss and
    parameter gradients as selecting them from torchvision's full K + 1 channels."""
    torch.manual_seed(seed)                       # the predictor's init
    g = torch.Generator().manual_seed(seed)
    predictor = MaskPredictor(16, 8, K + 1)
    with torch.no_grad():
        predictor.mask_fcn_logits.bias.normal_(generator=g)
    x = torch.randn(9, 16, 14, 14, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, K + 1, (9,), generator=g)
    weights = torch.rand(9, 28, 28, generator=g)
    results = []
    for selected in (True, False):
        predictor.zero_grad()
        with torch.enable_grad():
            if selected:
                pred = predictor(x, labels)
            else:
                pred = predictor(x)[torch.arange(9), labels]
            (pred * weights).sum().backward()
        results.append((pred.detach(), [p.grad.clone() for p in predictor.parameters()]))
    (got, got_grads), (exp, exp_grads) = results
    assert got.shape == (9, 28, 28)
    # the same products summed in another order (a 1x1 conv over 8 channels vs a gather);
    # the gradients sum ~9 x 28 x 28 of them: relative rounding
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, exp_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_maskrcnn_loss_no_positives_is_zero_and_connected():
    """heads.mask_loss itself (not a wrapper) on no positive RoI: zero, attached to the
    logits' graph (a zero gradient reaches them), as torchvision's maskrcnn_loss."""
    logits = torch.randn(0, K + 1, 28, 28, requires_grad=True)
    args = ([torch.zeros(0, 4)], [torch.zeros(0, 20, 20)], [torch.zeros(0, dtype=torch.int64)],
            [torch.zeros(0, dtype=torch.int64)])
    proposals, gt_masks, gt_labels, matched = args
    pred = logits[torch.arange(0), mask_target_labels(gt_labels, matched)]   # [0, 28, 28]
    loss = mask_loss(pred, proposals, gt_masks, matched)
    assert loss.shape == () and loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
    assert torch.equal(loss, tv_roi_heads.maskrcnn_loss(logits, *args))
    # the wrapper used by the other tests goes through the same function
    assert torch.equal(maskrcnn_loss(logits, *args), loss)


def test_mask_inference_matches_torchvision():
    logits = torch.randn(5, K + 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = [torch.tensor([1, 4, 2]), torch.tensor([3, 3])]
    for a, b in zip(mask_inference(logits, labels),
                    tv_roi_heads.maskrcnn_inference(logits, labels), strict=True):
        assert a.shape == b.shape == (len(a), 1, 28, 28)
        # the sigmoid of the selected channels only: vectorised over another extent, a
        # value may round one ulp (<= eps, the values are in [0, 1]) from torchvision's
        torch.testing.assert_close(a, b, rtol=0, atol=torch.finfo(torch.float32).eps)


# ------------------------------------------------------------------------- pasting

@pytest.mark.parametrize("img_shape", [(120, 90), (57, 211)])
def test_paste_masks_matches_torchvision(img_shape):
    g = torch.Generator().manual_seed(1)
    h, w = img_shape
    # Boxes overlap the image (torchvision's paste fails on boxes entirely outside it).
    inside = _random_boxes(20, 1.0, min_side=0.0, generator=g) * torch.tensor([w, h, w, h])
    boxes = torch.cat([
        inside + 0.3,
        torch.tensor([[-10.0, -5.0, 30.0, 40.0],            # partly outside, top-left
                      [w - 20.0, h - 10.0, w + 15.0, h + 9.0],  # partly outside, bottom-right
                      [5.0, 5.0, 5.2, 5.1],                 # tiny
                      [0.0, 0.0, float(w), float(h)]])])    # whole image
    masks = torch.rand(len(boxes), 1, 28, 28, generator=g)
    ours = paste_masks_in_image(masks, boxes, img_shape)
    ref = tv_roi_heads.paste_masks_in_image(masks, boxes, img_shape)
    assert ours.shape == ref.shape == (len(boxes), 1, h, w)
    # torchvision's interpolation arithmetic, up to one ulp of the [0, 1] values (seen:
    # 1.2e-7): a 1e-4 tolerance would hide a misplaced pixel row's worth of error
    torch.testing.assert_close(ours, ref, rtol=0, atol=torch.finfo(torch.float32).eps)


def test_paste_masks_empty():
    out = paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (30, 40))
    assert out.shape == (0, 1, 30, 40)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_image_masks_zeros_behave_as_torch_zeros(seed, tmp_path):
    """The pastes' lazily zeroed output (an anonymous mapping on the CPU) against
    torch.zeros: the same values after the same random writes, independent buffers,
    alive after the call that made it, and saved and loaded like any tensor."""
    g = torch.Generator().manual_seed(seed)
    count, height, width = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
    for dtype in (torch.float32, torch.float64):
        got = image_masks_zeros(count, height, width, dtype, torch.device("cpu"))
        other = image_masks_zeros(count, height, width, dtype, torch.device("cpu"))
        expected = torch.zeros(count, 1, height, width, dtype=dtype)
        assert got.dtype == dtype and got.shape == expected.shape
        assert torch.equal(got, expected), f"seed {seed}: not zeros"
        for _ in range(5):
            d = int(torch.randint(count, (1,), generator=g))
            y0 = int(torch.randint(height, (1,), generator=g))
            x0 = int(torch.randint(width, (1,), generator=g))
            patch = torch.rand(height - y0, width - x0, generator=g, dtype=dtype)
            got[d, 0, y0:, x0:] = patch
            expected[d, 0, y0:, x0:] = patch
        assert torch.equal(got, expected), f"seed {seed}: writes differ"
        assert torch.equal(other, torch.zeros_like(expected)), "buffers alias"
        torch.save(got, tmp_path / "masks.pt")
        assert torch.equal(torch.load(tmp_path / "masks.pt"), expected)
    assert image_masks_zeros(0, height, width, torch.float32, "cpu").shape == \
        (0, 1, height, width)


# ----------------------------------------------------------------------- inference

def test_box_inference_matches_torchvision():
    torch.manual_seed(2)
    proposals = [_random_boxes(40, 150.0), _random_boxes(30, 120.0)]
    sizes = [(150, 170), (120, 100)]
    logits, deltas = torch.randn(70, K + 1) * 3, torch.randn(70, 4 * (K + 1)) * 0.5
    tv = tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    ref = tv.postprocess_detections(logits, deltas, proposals, sizes)
    ours = box_inference(logits, deltas, proposals, sizes, BoxCoder((10.0, 10.0, 5.0, 5.0)))
    for ours_field, ref_field in zip(ours, ref, strict=True):
        for a, b in zip(ours_field, ref_field, strict=True):
            assert len(a) > 0
            assert torch.equal(a, b)          # torchvision's arithmetic: exact eval parity


# -------------------------------------------------------------------- init / shapes

def test_head_inits_match_torchvision_conventions():
    torch.manual_seed(0)
    head = MaskHead(256, (256, 256, 256, 256), 1)
    tv_head = MaskRCNNHeads(256, (256, 256, 256, 256), 1)
    assert list(dict(head.named_parameters())) == list(dict(tv_head.named_parameters()))
    for conv in (m for m in head.modules() if isinstance(m, torch.nn.Conv2d)):
        assert conv.bias.abs().sum() == 0
        expected = (2.0 / (conv.out_channels * 9)) ** 0.5   # kaiming fan_out, relu
        assert abs(conv.weight.std().item() - expected) < 0.1 * expected
    pred = MaskPredictor(256, 256, K + 1)
    tv_pred = MaskRCNNPredictor(256, 256, K + 1)
    assert list(dict(pred.named_parameters())) == list(dict(tv_pred.named_parameters()))
    assert pred(torch.randn(2, 256, 14, 14)).shape == (2, K + 1, 28, 28)


# --------------------------------------------------------- RoIHeads vs torchvision

def _pair(seed=0):
    """Our RoIHeads and torchvision's with the same weights (eval-mode parity)."""
    torch.manual_seed(seed)
    ours = build_roi_heads(apply_overrides(load_config(), {"num_classes": K}))
    tv = tv_roi_heads.RoIHeads(
        TvMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), TvMLP(256 * 49, 1024),
        FastRCNNPredictor(1024, K + 1), 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100,
        mask_roi_pool=TvMultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2),
        mask_head=MaskRCNNHeads(256, (256, 256, 256, 256), 1),
        mask_predictor=MaskRCNNPredictor(256, 256, K + 1))
    ours.load_state_dict(tv.state_dict(), strict=True)
    with torch.no_grad():
        # Random weights give near-uniform class scores; a class bias makes detections.
        ours.box_predictor.cls_score.bias[1] = 4.0
        tv.box_predictor.cls_score.bias[1] = 4.0
    return ours, tv


def _inputs():
    torch.manual_seed(3)
    sizes = [(128, 160), (96, 128)]
    feats = [torch.randn(2, 256, 128 // s, 160 // s) for s in (4, 8, 16, 32)]
    proposals = [_random_boxes(30, 120.0), _random_boxes(20, 90.0)]
    return feats, proposals, sizes


def test_roi_heads_eval_matches_torchvision():
    ours, tv = _pair()
    ours.eval(), tv.eval()
    feats, proposals, sizes = _inputs()
    with torch.no_grad():
        det, losses = ours(feats, proposals, sizes)
        ref, _ = tv(OrderedDict((str(i), f) for i, f in enumerate(feats)), proposals, sizes)
    assert losses == {}
    for a, b in zip(det, ref, strict=True):
        assert len(a["boxes"]) > 0
        for key in ("labels", "boxes", "scores"):
            assert torch.equal(a[key], b[key]), key      # the box branch: exact parity
        # the mask head runs the fused (oneDNN) convs of the default config, which round
        # differently from torch's conv2d before the sigmoid (seen: 4.5e-6)
        torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=2e-5)


def _targets(sizes, empty_second=False):
    g = torch.Generator().manual_seed(5)
    out = []
    for i, (h, w) in enumerate(sizes):
        m = 0 if (empty_second and i == 1) else 2
        boxes = _random_boxes(m, float(min(h, w)), min_side=8.0, generator=g)
        out.append(dict(boxes=boxes, labels=torch.randint(1, K + 1, (m,), generator=g),
                        masks=(torch.rand(m, h, w, generator=g) > 0.5).to(torch.uint8)))
    return out


def test_roi_heads_train_losses_match_torchvision():
    ours, tv = _pair()
    ours.train(), tv.train()
    feats, proposals, sizes = _inputs()
    targets = _targets(sizes)
    torch.manual_seed(7)
    _, losses = ours(feats, proposals, sizes, targets)
    torch.manual_seed(7)
    _, ref = tv(OrderedDict((str(i), f) for i, f in enumerate(feats)), proposals, sizes,
                targets)
    assert list(losses) == ["loss_cls", "loss_box", "loss_mask"]
    for ours_key, tv_key in [("loss_cls", "loss_classifier"), ("loss_box", "loss_box_reg"),
                             ("loss_mask", "loss_mask")]:
        # no equality promised for losses: means summed in another order round by ulps
        torch.testing.assert_close(losses[ours_key], ref[tv_key], rtol=1e-5, atol=1e-6)


def test_roi_heads_no_objects_gives_zero_box_and_mask_loss():
    ours, _ = _pair()
    ours.train()
    feats, proposals, sizes = _inputs()
    targets = _targets(sizes)
    for t in targets:
        t.update(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                 masks=t["masks"][:0])
    _, losses = ours(feats, proposals, sizes, targets)
    assert losses["loss_box"].item() == 0 and losses["loss_mask"].item() == 0
    assert losses["loss_cls"].item() > 0
    sum(losses.values()).backward()       # graph-connected
    assert ours.mask_predictor.mask_fcn_logits.weight.grad is not None


def test_roi_heads_eval_with_targets_returns_both():
    ours, _ = _pair()
    ours.eval()
    feats, proposals, sizes = _inputs()
    with torch.no_grad():
        det, losses = ours(feats, proposals, sizes, _targets(sizes, empty_second=True))
    assert len(det) == 2 and set(losses) == {"loss_cls", "loss_box", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_roi_heads_training_requires_targets():
    ours, _ = _pair()
    feats, proposals, sizes = _inputs()
    with pytest.raises(ValueError, match="targets"):
        ours.train()(feats, proposals, sizes)


# ------------------------------------------ instances without masks (target "mask_valid")

def _apart_instances(sizes):
    """Per image two instances whose boxes do not touch (so no RoI can have IoU >= 0.5 with
    both), random 0/1 masks; proposals: 5 jittered copies of each box plus 20 random."""
    g = torch.Generator().manual_seed(11)
    boxes = [torch.tensor([[8.0, 10.0, 60.0, 70.0], [80.0, 75.0, 150.0, 125.0]]),
             torch.tensor([[5.0, 6.0, 50.0, 40.0], [64.0, 48.0, 120.0, 92.0]])]
    targets, proposals = [], []
    for (h, w), b in zip(sizes, boxes):
        targets.append(dict(boxes=b, labels=torch.tensor([1, 3]),
                            masks=(torch.rand(2, h, w, generator=g) > 0.5).to(torch.uint8)))
        jittered = b.repeat(5, 1) + torch.randn(10, 4, generator=g) * 2.0
        proposals.append(torch.cat([jittered, _random_boxes(20, float(min(h, w)),
                                                            generator=g)]))
    return targets, proposals


def _train_losses(heads, feats, proposals, sizes, targets):
    torch.manual_seed(7)                    # the RoI sampler's draws
    return heads(feats, proposals, sizes, targets)[1]


def test_mask_loss_uses_only_instances_with_masks():
    """mask_valid False: the instance trains the box branch but not the mask branch. The
    mask loss equals the one of the instances with masks alone (every positive RoI is
    sampled here), does not read the other masks, and the box losses do not change."""
    heads, _ = _pair()
    heads.train()
    feats, _, sizes = _inputs()
    targets, proposals = _apart_instances(sizes)
    valid = [torch.tensor([True, False]), torch.tensor([False, True])]
    marked = [dict(t, mask_valid=v) for t, v in zip(targets, valid)]
    alone = [dict(boxes=t["boxes"][v], labels=t["labels"][v], masks=t["masks"][v])
             for t, v in zip(targets, valid)]
    scrambled = [dict(t, masks=torch.where(v[:, None, None], t["masks"], 1 - t["masks"]))
                 for t, v in zip(marked, valid)]

    got = _train_losses(heads, feats, proposals, sizes, marked)
    alone_loss = _train_losses(heads, feats, proposals, sizes, alone)["loss_mask"]
    torch.testing.assert_close(got["loss_mask"], alone_loss, rtol=1e-6, atol=0)
    assert torch.equal(got["loss_mask"],
                       _train_losses(heads, feats, proposals, sizes, scrambled)["loss_mask"])
    all_valid = _train_losses(heads, feats, proposals, sizes, targets)
    assert not torch.isclose(got["loss_mask"], all_valid["loss_mask"])
    for key in ("loss_cls", "loss_box"):
        assert torch.equal(got[key], all_valid[key]), key


def test_mask_loss_without_any_mask_is_zero_and_connected():
    heads, _ = _pair()
    heads.train()
    feats, _, sizes = _inputs()
    targets, proposals = _apart_instances(sizes)
    boxes_only = [dict(t, mask_valid=torch.zeros(2, dtype=torch.bool)) for t in targets]
    losses = _train_losses(heads, feats, proposals, sizes, boxes_only)
    assert losses["loss_mask"].item() == 0 and losses["loss_box"].item() > 0
    sum(losses.values()).backward()       # graph-connected
    grad = heads.mask_predictor.mask_fcn_logits.weight.grad
    assert grad is not None and not grad.any()


def test_box_inference_matches_detectron2_with_its_postprocess():
    """detectron2 mode (box_min_size 0, box_drop_empty): detectron2's own
    fast_rcnn_inference_single_image, then its postprocess's empty-box filter, on the
    same boxes and scores; some top boxes lie outside the image (clipped to nothing)."""
    fast_rcnn = pytest.importorskip("detectron2.modeling.roi_heads.fast_rcnn",
                                    reason="detectron2 (the oracle) is not installed")
    torch.manual_seed(3)
    size, k = (120, 160), 3
    proposals = [torch.tensor([[10.0, 10, 60, 50]] * 40)]
    proposals[0][:8] += torch.tensor([200.0, 0, 200, 0])        # right of the image
    logits, deltas = torch.randn(40, k + 1) * 2, torch.randn(40, 4 * (k + 1)) * 0.3
    logits[:8, 1:] += 4.0                                         # and scoring highest
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    (boxes,), (scores,), (labels,) = box_inference(logits, deltas, proposals, [size], coder,
                                                   box_min_size=0.0, box_drop_empty=True)
    # detectron2: background last, class-specific boxes without background rows, decoded
    # by its own Box2BoxTransform (not our BoxCoder: the oracle builds its own inputs)
    box_regression = pytest.importorskip("detectron2.modeling.box_regression")
    d2_coder = box_regression.Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    d2_scores = torch.cat([logits[:, 1:], logits[:, :1]], 1).softmax(-1)
    d2_boxes = d2_coder.apply_deltas(deltas[:, 4:], proposals[0])
    ref, _ = fast_rcnn.fast_rcnn_inference_single_image(d2_boxes, d2_scores, size, 0.05,
                                                         0.5, 100)
    nonempty = ref.pred_boxes.nonempty()
    assert (~nonempty).sum() > 0, "no empty box among the candidates: weak test"
    assert torch.equal(labels, ref.pred_classes[nonempty] + 1)
    assert torch.equal(boxes, ref.pred_boxes.tensor[nonempty])     # exact eval parity
    assert torch.equal(scores, ref.scores[nonempty])
    kept_all = box_inference(logits, deltas, proposals, [size], coder, box_min_size=0.0)
    assert len(kept_all[0][0]) == len(ref)                       # without the filter
