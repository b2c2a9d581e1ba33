"""detectron2 as a test oracle: its Mask R-CNN model-zoo architectures with random weights,
calibrated so that they detect things, and run the way its model zoo runs them.

Only tests import this (``from tests.zoo import detectron2_oracle``). Without detectron2
installed, importing it skips: at a test module's top level the whole module, inside a
fixture only the tests using the fixture. Nothing here is product code, and the product
never imports detectron2.

    model, settings = build_d2_model("mask_rcnn_R_50_FPN_3x", pre_nms_topk_test=300, ...)
    image = make_image(320, 427)               # uint8 [H, W, 3], BGR
    calibrate(model, image)                    # or a list of images
    save_model_zoo_pkl(model, path)            # what the model zoo's .pkl files hold
    out = run_d2(model, image)                 # boxes, scores, labels (1..K), masks, ...

Shapes: K object classes, D detections, H x W the image.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from typing import Iterator, Sequence, Union

import numpy as np
import pytest
import torch
from torch import Tensor, nn

detectron2 = pytest.importorskip(
    "detectron2", reason="detectron2 (the oracle) is not installed: "
    "pip install ../shared/oracles/detectron2-0.6-cp311-cp311-linux_x86_64.whl")

from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.backbone.resnet import BottleneckBlock  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402

# detectron2.model_zoo does not import on current setuptools; the configs ship with the
# package anyway.
CONFIG_DIR = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs")
CONFIGS = {
    "mask_rcnn_R_50_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "mask_rcnn_R_101_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
    "mask_rcnn_X_101_32x8d_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml",
    "mask_rcnn_R_50_FPN_400ep_LSJ": "new_baselines/mask_rcnn_R_50_FPN_400ep_LSJ.py",
    "mask_rcnn_R_101_FPN_400ep_LSJ": "new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py",
}
NAMES = tuple(CONFIGS)
Image = Union[np.ndarray, Tensor]
# Class-logit spread after calibration. With 80 classes, 1.5 gives top scores ~0.3-0.8 and,
# at 15 detections per image, score gaps of 1e-4..3e-3 (larger spreads saturate the
# softmax and crowd the scores near 1). At 100 detections per image gaps of ~1e-6 are
# unavoidable: parity tests should keep detections_per_image small.
CLS_LOGIT_STD = 1.5


# ----------------------------------------------------------------------------- build

def build_d2_model(name: str, *, num_classes: int = 80, seed: int = 0,
                   pre_nms_topk_test: int | None = None,
                   post_nms_topk_test: int | None = None,
                   detections_per_image: int | None = None,
                   score_thresh_test: float | None = None,
                   nms_thresh_test: float | None = None) -> tuple[nn.Module, dict]:
    """The model-zoo architecture `name` on the CPU, in eval mode, with detectron2's own
    random initialisation (torch seeded with `seed`).

    The keyword arguments override test-time settings (None keeps the config's):
    pre_nms_topk_test (RPN, per FPN level), post_nms_topk_test (RPN, per image),
    detections_per_image, score_thresh_test and nms_thresh_test (box predictor).
    LSJ models: their SyncBN norms become plain BatchNorm2d (same state-dict keys).

    Returns (model, settings): settings holds the values the model runs with, read back
    from the built model, so that our side can be configured the same: num_classes,
    pre_nms_topk_test, post_nms_topk_test, rpn_nms_thresh, detections_per_image,
    score_thresh_test, nms_thresh_test, pixel_mean / pixel_std (BGR, 0..255),
    size_divisibility, stride_in_1x1, num_groups, width_per_group, depth, norm.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown detectron2 config {name!r}; known: {', '.join(NAMES)}")
    path = os.path.join(CONFIG_DIR, CONFIGS[name])
    torch.manual_seed(seed)
    if path.endswith(".yaml"):
        cfg = get_cfg()
        cfg.merge_from_file(path)
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        for value, keys in ((pre_nms_topk_test, ("MODEL", "RPN", "PRE_NMS_TOPK_TEST")),
                            (post_nms_topk_test, ("MODEL", "RPN", "POST_NMS_TOPK_TEST")),
                            (detections_per_image, ("TEST", "DETECTIONS_PER_IMAGE")),
                            (score_thresh_test, ("MODEL", "ROI_HEADS", "SCORE_THRESH_TEST")),
                            (nms_thresh_test, ("MODEL", "ROI_HEADS", "NMS_THRESH_TEST"))):
            if value is not None:
                node = cfg
                for key in keys[:-1]:
                    node = node[key]
                node[keys[-1]] = value
        model = build_model(cfg)
        arch = dict(stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1,
                    num_groups=cfg.MODEL.RESNETS.NUM_GROUPS,
                    width_per_group=cfg.MODEL.RESNETS.WIDTH_PER_GROUP,
                    depth=cfg.MODEL.RESNETS.DEPTH, norm=cfg.MODEL.RESNETS.NORM)
    else:
        m = LazyConfig.load(path).model
        # One CPU process: SyncBN -> BN (same parameters and buffers).
        m.backbone.bottom_up.stem.norm = m.backbone.bottom_up.stages.norm = "BN"
        m.backbone.norm = "BN"
        m.roi_heads.box_head.conv_norm = m.roi_heads.mask_head.conv_norm = nn.BatchNorm2d
        m.roi_heads.num_classes = num_classes
        rpn, predictor = m.proposal_generator, m.roi_heads.box_predictor
        if pre_nms_topk_test is not None:
            rpn.pre_nms_topk = (rpn.pre_nms_topk[0], pre_nms_topk_test)
        if post_nms_topk_test is not None:
            rpn.post_nms_topk = (rpn.post_nms_topk[0], post_nms_topk_test)
        if detections_per_image is not None:
            predictor.test_topk_per_image = detections_per_image
        if score_thresh_test is not None:
            predictor.test_score_thresh = score_thresh_test
        if nms_thresh_test is not None:
            predictor.test_nms_thresh = nms_thresh_test
        stages = m.backbone.bottom_up.stages
        arch = dict(stride_in_1x1=stages.stride_in_1x1, num_groups=stages.get("num_groups", 1),
                    width_per_group=stages.get("width_per_group", 64), depth=stages.depth,
                    norm=stages.norm)
        model = instantiate(m)
    model = model.to("cpu").eval()
    rpn, predictor = model.proposal_generator, model.roi_heads.box_predictor
    settings = dict(
        num_classes=model.roi_heads.num_classes,
        pre_nms_topk_test=rpn.pre_nms_topk[False], post_nms_topk_test=rpn.post_nms_topk[False],
        rpn_nms_thresh=rpn.nms_thresh, detections_per_image=predictor.test_topk_per_image,
        score_thresh_test=predictor.test_score_thresh, nms_thresh_test=predictor.test_nms_thresh,
        pixel_mean=tuple(model.pixel_mean.flatten().tolist()),
        pixel_std=tuple(model.pixel_std.flatten().tolist()),
        size_divisibility=model.backbone.size_divisibility, **arch)
    return model, settings


# ------------------------------------------------------------------------- images

def make_image(height: int = 320, width: int = 427, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] BGR test image: blocky noise at three scales, so features and
    proposals vary over sizes (plain pixel noise gives near-uniform feature maps)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, height, width)
    for cells, weight in ((6, 0.5), (24, 0.3), (height, 0.2)):
        coarse = torch.rand(1, 3, cells, max(1, cells * width // height), generator=g)
        image += weight * nn.functional.interpolate(coarse, size=(height, width))[0]
    return (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _chw_float(image: Image) -> Tensor:
    """float32 [3, H, W] BGR 0..255 from uint8/float [H, W, 3] (numpy or tensor) or
    [3, H, W] (tensor)."""
    t = torch.as_tensor(image)
    if t.dim() != 3:
        raise ValueError(f"expected a 3-D image, got shape {tuple(t.shape)}")
    if t.shape[0] != 3 or (isinstance(image, np.ndarray) and t.shape[-1] == 3):
        t = t.permute(2, 0, 1)
    return t.float().contiguous()


def bgr_to_rgb01(image: Image) -> Tensor:
    """The same image as our models take it: float32 [3, H, W], RGB, in [0, 1]."""
    return _chw_float(image).flip(0) / 255.0


def _inputs(images: Image | Sequence[Image]) -> list[dict]:
    if isinstance(images, (np.ndarray, Tensor)):
        images = [images]
    out = []
    for image in images:
        chw = _chw_float(image)
        out.append({"image": chw, "height": chw.shape[1], "width": chw.shape[2]})
    return out


# --------------------------------------------------------------------- calibration

@contextlib.contextmanager
def _norm_statistics(module: nn.Module) -> Iterator[None]:
    """While active, every BatchNorm / FrozenBatchNorm in `module` first sets its running
    statistics to those of its input (per channel, over batch and space), so its output
    is weight * N(0, 1) + bias. A forward pass in order calibrates layer after layer."""
    def hook(norm, args):
        x = args[0]
        if x.numel():
            norm.running_mean.copy_(x.mean((0, 2, 3)))
            norm.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    handles = [m.register_forward_pre_hook(hook) for m in module.modules()
               if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(model: nn.Module, images: Image | Sequence[Image]) -> nn.Module:
    """Make random weights detect: real, varied detections with spread-out scores.

    - The last norm of every bottleneck block gets scale 0.2 (trained ResNets have small
      ones; with 1 the residual stream grows block after block and float rounding with it).
    - Norm statistics (FrozenBN and BN alike) are set from `images`, stage by stage, so
      features stay O(1) (detectron2 initialises FrozenBN as identity, and the MSRA
      R-50/R-101 configs feed it 0..255 pixels: pixel_std is 1).
    - RPN: objectness logits with std 1 around +1 (proposal scores are not near-ties);
      anchor deltas with std 0.5 (so that decoding matters).
    - Box predictor: class logits centred per class, std 1.5, object classes +1 over
      background (detectron2's LAST column), so classes compete; box deltas std 1.
    - Mask predictor: logits with std 3 (detectron2's init, std 0.001, leaves every mask
      probability at 0.5, where the 0.5 threshold decides by rounding).
    Returns the model (changed in place), in eval mode.
    """
    model.eval()
    inputs = _inputs(images)
    for block in model.backbone.bottom_up.modules():
        if isinstance(block, BottleneckBlock):
            block.conv3.norm.weight.fill_(0.2)
    batch = model.preprocess_image(inputs)
    with _norm_statistics(model.backbone):
        features = model.backbone(batch.tensor)

    rpn = model.proposal_generator
    head = rpn.rpn_head
    head.objectness_logits.bias.fill_(1.0)
    logits, deltas = head([features[f] for f in rpn.in_features])
    logits = torch.cat([x.flatten() for x in logits])
    head.objectness_logits.weight.div_((logits - 1.0).std())
    head.anchor_deltas.weight.mul_(0.5 / torch.cat([x.flatten() for x in deltas]).std())
    proposals, _ = rpn(batch, features)

    heads = model.roi_heads
    pooled = heads.box_pooler([features[f] for f in heads.box_in_features],
                              [p.proposal_boxes for p in proposals])
    with _norm_statistics(heads.box_head):
        hidden = heads.box_head(pooled)
    scores, box_deltas = heads.box_predictor(hidden)
    cls = heads.box_predictor.cls_score
    scale = CLS_LOGIT_STD / scores.std(0).mean()
    cls.weight.mul_(scale)
    cls.bias.mul_(scale).sub_(scores.mean(0) * scale)
    cls.bias[:-1] += 1.0                      # object classes over background (last)
    heads.box_predictor.bbox_pred.weight.mul_(1.0 / box_deltas.std())

    # The mask head runs on the detections: its norms are calibrated on them, then its
    # logits (seen by a hook, in the same pass) are scaled.
    seen = []
    hook = heads.mask_head.predictor.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with _norm_statistics(heads.mask_head):
            detections, _ = heads(batch, features, proposals)
    finally:
        hook.remove()
    if sum(len(d) for d in detections) == 0:
        raise RuntimeError("calibration left the detectron2 model without detections")
    heads.mask_head.predictor.weight.mul_(3.0 / seen[0].std())
    heads.mask_head.predictor.bias.zero_()
    return model


# ------------------------------------------------------------------------ running

def save_model_zoo_pkl(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the state dict as detectron2's model zoo .pkl files hold it."""
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()},
                     "__author__": "test"}, f)


@torch.no_grad()
def run_d2(model: nn.Module, image: Image) -> dict[str, Tensor]:
    """detectron2's detections on one image given at its test size (detectron2 resizes
    outside the model; at the test size that resize is a no-op).

    Returns boxes [D, 4] float (x1, y1, x2, y2 pixels), scores [D], labels [D] int64 in
    1..K (detectron2's class + 1, our convention), masks [D, H, W] bool (pasted at 0.5,
    as detectron2 does), and mask_probs [D, 28, 28]: the predicted class's mask
    probabilities before pasting (a tighter comparison than the thresholded masks).
    """
    inputs = _inputs(image)
    raw = model.inference(inputs, do_postprocess=False)[0]
    mask_probs = raw.pred_masks[:, 0].clone()
    kept = detector_postprocess(raw, inputs[0]["height"], inputs[0]["width"])
    if len(kept) != len(mask_probs):
        # detector_postprocess drops empty boxes; keep mask_probs aligned.
        boxes = raw.pred_boxes.tensor
        mask_probs = mask_probs[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    return dict(boxes=kept.pred_boxes.tensor.float(), scores=kept.scores,
                labels=kept.pred_classes.long() + 1, masks=kept.pred_masks.bool(),
                mask_probs=mask_probs)


def min_score_gap(scores: Tensor) -> float:
    """Smallest difference between two detection scores (inf for fewer than 2): a
    parity test at tolerance t needs gaps well above t, or the order may flip."""
    if len(scores) < 2:
        return float("inf")
    s = scores.sort().values
    return (s[1:] - s[:-1]).min().item()
