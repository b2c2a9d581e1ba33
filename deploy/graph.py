"""InferenceGraph: a MaskRCNN's eval-mode forward for one image as a module an exporter can
trace once and run at any image size.

    graph = InferenceGraph(model)              # copies (folded) weights; model untouched
    boxes, labels, scores, masks = graph(image)  # image: Tensor[3, H, W] RGB in [0, 1]

It computes what `model([image])[0]` computes (the same transform, anchors, proposal
selection, RoI heads, NMS, mask pasting and thresholds, read from model.cfg), with
standard ops plus the `maskrcnn::` custom ops for RoIAlign and NMS, which the ONNX
exporter maps to RoiAlign / NonMaxSuppression (deploy.onnx_export) and torch.export keeps.

Differences from eager, by design: BatchNorm is folded into the convs and every conv is a
standard one (the eager CPU path runs Winograd and oneDNN fused convs), so outputs agree
up to float rounding; no input validation (the caller passes a float Tensor[3, H, W]).

Shape letters: H/W image size, Hr/Wr resized, D detections, K classes, S mask size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tools.boxes import BoxCoder

from . import functional as fn
from .layers import (PlainBoxHead, PlainFPN, PlainMaskHead, PlainMaskPredictor,
                     PlainRPNHead, PlainTrunk)

__all__ = ["InferenceGraph", "OUTPUT_NAMES"]

OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")


def _config(model: nn.Module):
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError("deploy: the model has no config (model.cfg is None); build it "
                         "with MaskRCNN(...) or MaskRCNN.from_torchvision(...)")
    return cfg


class InferenceGraph(nn.Module):
    """Export form of a MaskRCNN (eval mode, batch 1, dynamic image size).

    Args:
        model: a MaskRCNN (its weights are copied, norms folded; it is not modified).
        per_level_pooling: RoIAlign as one `maskrcnn::roi_align` per FPN level plus a
            scatter (True: what ONNX RoiAlign can express) or one
            `maskrcnn::roi_align_multilevel` (False: torch.export, our fused kernel).

    forward(image Tensor[3, H, W] float32 RGB in [0, 1]) ->
        boxes Tensor[D, 4] (x1, y1, x2, y2) in image pixels, labels Tensor[D] int64 in
        1..K, scores Tensor[D] float32 (decreasing), masks Tensor[D, 1, H, W] float32
        probabilities (only with mask_on).
    """

    def __init__(self, model: nn.Module, per_level_pooling: bool = True):
        super().__init__()
        cfg = _config(model)
        self.cfg = cfg
        self.per_level = per_level_pooling
        self.mask_on = bool(cfg.model.mask_on)
        self._set_transform(cfg.transform)
        self.trunk = PlainTrunk(model.backbone.body)
        self.fpn = PlainFPN(model.backbone.fpn, getattr(model.backbone.fpn, "extra_pool", True))
        self.rpn_head = PlainRPNHead(model.rpn.head)
        cells = model.rpn.anchor_generator.cell_anchors
        for i, cell in enumerate(cells):
            self.register_buffer(f"cell_{i}", cell.detach().to(torch.float32).clone())
        self.num_levels = len(cells)
        self.box_head = PlainBoxHead(model.roi_heads.box_head, model.roi_heads.box_predictor)
        if self.mask_on:
            self.mask_head = PlainMaskHead(model.roi_heads.mask_head)
            self.mask_predictor = PlainMaskPredictor(model.roi_heads.mask_predictor)
        self.rpn_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.box_coder = BoxCoder(tuple(float(w) for w in cfg.roi_heads.bbox_reg_weights))
        self.paste = fn.PASTE[cfg.mask_head.mask_paste]
        self.eval()

    def _set_transform(self, t) -> None:
        mean = torch.tensor(t.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(t.image_std, dtype=torch.float32)[:, None, None]
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    # ------------------------------------------------------------------ transform

    def normalize(self, image: Tensor) -> Tensor:
        """RGB [0, 1] Tensor[3, H, W] -> the weights' channel order, scale, normalised."""
        t = self.cfg.transform
        if t.input_format == "BGR":
            image = image.flip(0)
        if float(t.pixel_scale) != 1.0:
            image = image * float(t.pixel_scale)
        return (image - self.mean) / self.std

    def transform(self, image: Tensor):
        """-> (padded Tensor[1, 3, Hp, Wp], (Hr, Wr) sizes as given by resized_size)."""
        t = self.cfg.transform
        h, w = image.shape[-2], image.shape[-1]
        new_h, new_w = fn.resized_size(h, w, int(t.min_size), int(t.max_size))
        x = F.interpolate(self.normalize(image)[None], size=(new_h, new_w), mode="bilinear",
                          align_corners=False)
        return fn.pad_to_multiple(x, new_h, new_w, int(t.size_divisible)), (new_h, new_w)

    # ------------------------------------------------------------------------ RPN

    def _strides(self, padded: Tensor, feature: Tensor) -> tuple[Tensor, Tensor]:
        """Anchor strides (0-d int64) of one level: padded size // feature size, or the
        level's power of two (detectron2's rule)."""
        sizes = [(fn.size_tensor(padded.shape[i]), fn.size_tensor(feature.shape[i]))
                 for i in (-2, -1)]
        if self.cfg.anchors.anchor_rule == "detectron2":
            return tuple(torch.pow(2.0, fn.round_log2(p.to(torch.float64) / g.to(torch.float64)))
                         .to(torch.int64) for p, g in sizes)
        return tuple(torch.div(p, g, rounding_mode="floor") for p, g in sizes)

    def proposals(self, padded: Tensor, size: tuple[Tensor, Tensor],
                  features: list[Tensor]) -> Tensor:
        """RPN proposals Tensor[R, 4] in resized-image pixels, best first (rpn.py's
        select_proposals for one image)."""
        r = self.cfg.rpn
        logits_per_level, deltas_per_level = self.rpn_head(features)
        boxes, logits, levels = [], [], []
        for level, (feature, logit, delta) in enumerate(
                zip(features, logits_per_level, deltas_per_level)):
            a, gh, gw = logit.shape[1], feature.shape[-2], feature.shape[-1]
            # (anchor, y, x) -> (y, x, anchor): the AnchorGenerator's order
            logit = logit[0].permute(1, 2, 0).reshape(-1)
            delta = delta[0].reshape(a, 4, gh, gw).permute(2, 3, 0, 1).reshape(-1, 4)
            stride_h, stride_w = self._strides(padded, feature)
            anchors = fn.grid_anchors(getattr(self, f"cell_{level}"), gh, gw, stride_h,
                                      stride_w)
            k = _min_k(int(r.rpn_pre_nms_top_n_test), logit)
            top, idx = logit.topk(k)
            # Decoding the kept anchors only: decode is row-wise, the same numbers.
            boxes.append(self.rpn_coder.decode(delta[idx], anchors[idx]).reshape(-1, 4))
            logits.append(top)
            levels.append(torch.full_like(idx, level))
        boxes, logits, levels = torch.cat(boxes), torch.cat(logits), torch.cat(levels)
        h, w = fn.size_tensor(size[0]), fn.size_tensor(size[1])
        boxes = fn.clip_boxes(boxes, h, w)
        if r.rpn_box_filter == "detectron2":
            scores = logits
            keep = torch.isfinite(boxes).all(dim=1) & torch.isfinite(logits) & \
                (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        else:
            scores = torch.sigmoid(logits)
            keep = ((boxes[:, 2] - boxes[:, 0]) >= r.rpn_min_size) & \
                ((boxes[:, 3] - boxes[:, 1]) >= r.rpn_min_size) & \
                (scores >= r.rpn_score_thresh)
        idx = torch.nonzero(keep).reshape(-1)
        boxes, scores, levels = boxes[idx], scores[idx], levels[idx]
        order = fn.batched_nms(boxes, scores, levels, r.rpn_nms_thresh)
        return boxes[order[:int(r.rpn_post_nms_top_n_test)]]

    # ------------------------------------------------------------------ RoI heads

    def _pool(self, features, boxes, scales, head: str) -> Tensor:
        h, c = self.cfg.roi_heads, self.cfg[f"{head}_head"]
        return fn.pool_levels(features, boxes, scales, int(c[f"{head}_pool_size"]),
                              int(c[f"{head}_sampling_ratio"]), bool(h.roi_aligned),
                              float(h.roi_canonical_scale), int(h.roi_canonical_level),
                              h.roi_level_rule, self.per_level)

    def detect(self, features, proposals, scales, size) -> tuple[Tensor, Tensor, Tensor]:
        """Box branch: (boxes Tensor[D, 4], scores Tensor[D], labels Tensor[D]) in
        resized-image pixels (box_head.box_inference for one image)."""
        h = self.cfg.roi_heads
        logits, deltas = self.box_head(self._pool(features, proposals, scales, "box"))
        boxes = self.box_coder.decode(deltas, proposals)          # [R, K+1, 4]
        boxes = fn.clip_boxes(boxes, fn.size_tensor(size[0]), fn.size_tensor(size[1]))
        scores = F.softmax(logits, -1)
        labels = torch.arange(scores.shape[1]).view(1, -1).expand_as(scores)
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)
        keep = (scores > h.box_score_thresh) & torch.isfinite(boxes).all(dim=1)
        if h.box_min_size > 0:
            keep = keep & ((boxes[:, 2] - boxes[:, 0]) >= h.box_min_size) & \
                ((boxes[:, 3] - boxes[:, 1]) >= h.box_min_size)
        idx = torch.nonzero(keep).reshape(-1)
        boxes, scores, labels = boxes[idx], scores[idx], labels[idx]
        order = fn.batched_nms(boxes, scores, labels, h.box_nms_thresh)
        order = order[:int(h.box_detections_per_img)]
        if h.box_drop_empty:
            kept = boxes[order]
            order = order[torch.nonzero((kept[:, 2] > kept[:, 0]) &
                                        (kept[:, 3] > kept[:, 1])).reshape(-1)]
        return boxes[order], scores[order], labels[order]

    def mask_probs(self, features, boxes, labels, scales) -> Tensor:
        """Tensor[D, 1, S, S] sigmoid of each detection's own class channel."""
        logits = self.mask_predictor(self.mask_head(self._pool(features, boxes, scales,
                                                               "mask")))
        s = logits.shape[-1]
        index = labels.view(-1, 1, 1, 1).expand(-1, 1, s, s)
        return torch.gather(logits, 1, index).sigmoid()

    # -------------------------------------------------------------------- forward

    def forward(self, image: Tensor):
        image_h, image_w = image.shape[-2], image.shape[-1]
        padded, size = self.transform(image.to(torch.float32))
        features = self.fpn(self.trunk(padded))
        proposals = self.proposals(padded, size, features)
        features = features[:4]
        resized_h = fn.size_tensor(size[0])
        scales = fn.level_scales([f.shape[-2] for f in features], resized_h)
        boxes, scores, labels = self.detect(features, proposals, scales, size)
        masks: Optional[Tensor] = None
        if self.mask_on:
            masks = self.mask_probs(features, boxes, labels, scales)
        # back to the input image's pixels (float32 ratios, as ImageTransform)
        ratio_h = fn.size_tensor(image_h).to(torch.float32) / resized_h.to(torch.float32)
        ratio_w = fn.size_tensor(image_w).to(torch.float32) / \
            fn.size_tensor(size[1]).to(torch.float32)
        boxes = boxes * torch.stack([ratio_w, ratio_h, ratio_w, ratio_h])
        if masks is None:
            return boxes, labels, scores
        masks = self.paste(masks, boxes, image_h, image_w,
                           int(self.cfg.mask_head.mask_paste_padding))
        return boxes, labels, scores, masks


def _min_k(top_n: int, scores: Tensor):
    """min(top_n, len(scores)) as the tracer wants it (a tensor) or torch.export (SymInt)."""
    n = scores.shape[0]
    if isinstance(n, Tensor):
        return torch.minimum(n, torch.tensor(top_n))
    return torch.sym_min(n, top_n)
