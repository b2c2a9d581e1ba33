"""Box geometry shared by the RPN and the RoI heads.

Boxes are (x1, y1, x2, y2) in pixels. Shape letters: M ground-truth boxes, R predicted
boxes (anchors, proposals), J boxes decoded per row (classes for the RoI head, 1 for RPN).

Every function matches torchvision (`ops/boxes.py`, `models/detection/_utils.py`),
including the order of float operations, so that given the same inputs our results
equal torchvision's bit for bit; tests/tools/test_boxes.py checks this.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "remove_small_boxes",
    "BoxCoder",
    "Matcher",
    "BalancedPositiveNegativeSampler",
]


def _upcast(t: Tensor) -> Tensor:
    # Half-precision products of pixel coordinates overflow; compute in 32 bits or more.
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box.

    Args:
        boxes: Tensor[R, 4] (any leading shape `...` works).
    Returns:
        Tensor[R], (x2 - x1) * (y2 - y1).
    """
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union.

    Args:
        boxes1: Tensor[M, 4].
        boxes2: Tensor[R, 4].
    Returns:
        Tensor[M, R]; entry (i, j) is IoU(boxes1[i], boxes2[j]). Two zero-area boxes
        that do not overlap give 0/0 = nan, as in torchvision.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [M, R, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [M, R, 2]
    wh = _upcast(rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp boxes to lie inside an image.

    Args:
        boxes: Tensor[R, 4] (any leading shape `...` works).
        size: (h, w) of the image, ints or 0-d tensors.
    Returns:
        Tensor of the same shape, x in [0, w], y in [0, h].
    """
    height, width = size
    if isinstance(width, Tensor):    # traced sizes (tools.tracing): the same clamp
        zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
        boxes_x = torch.minimum(torch.maximum(boxes[..., 0::2], zero), width.to(boxes.dtype))
        boxes_y = torch.minimum(torch.maximum(boxes[..., 1::2], zero), height.to(boxes.dtype))
        return torch.stack((boxes_x, boxes_y), dim=boxes.dim()).reshape(boxes.shape)
    boxes_x = boxes[..., 0::2].clamp(min=0, max=width)
    boxes_y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((boxes_x, boxes_y), dim=boxes.dim()).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both >= `min_size`.

    Args:
        boxes: Tensor[R, 4].
        min_size: smallest side length kept, in pixels.
    Returns:
        Tensor[K] int64, increasing indices into `boxes`.
    """
    ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    keep = (ws >= min_size) & (hs >= min_size)
    return torch.where(keep)[0]


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas relative to reference boxes, and back.

    dx = wx * (gx - px) / pw, dy = wy * (gy - py) / ph, dw = ww * log(gw / pw),
    dh = wh * log(gh / ph), with (px, py, pw, ph) the reference box's centre and size.

    Args:
        weights: (wx, wy, ww, wh); (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
        bbox_xform_clip: decoded dw, dh are clamped to at most this value before exp(),
            so a wild prediction cannot give an infinite box.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 bbox_xform_clip: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, gt_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Regression targets that move each proposal onto its matched GT box.

        Args:
            gt_boxes: Tensor[R, 4], the GT box matched to each proposal.
            proposals: Tensor[R, 4], the reference boxes (anchors or proposals).
        Returns:
            Tensor[R, 4] deltas (dx, dy, dw, dh), in gt_boxes' dtype.
        """
        weights = torch.as_tensor(self.weights, dtype=gt_boxes.dtype, device=gt_boxes.device)
        wx, wy, ww, wh = weights[0], weights[1], weights[2], weights[3]

        ex_widths = proposals[:, 2:3] - proposals[:, 0:1]
        ex_heights = proposals[:, 3:4] - proposals[:, 1:2]
        ex_ctr_x = proposals[:, 0:1] + 0.5 * ex_widths
        ex_ctr_y = proposals[:, 1:2] + 0.5 * ex_heights

        gt_widths = gt_boxes[:, 2:3] - gt_boxes[:, 0:1]
        gt_heights = gt_boxes[:, 3:4] - gt_boxes[:, 1:2]
        gt_ctr_x = gt_boxes[:, 0:1] + 0.5 * gt_widths
        gt_ctr_y = gt_boxes[:, 1:2] + 0.5 * gt_heights

        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.cat((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply deltas to reference boxes.

        Args:
            deltas: Tensor[R, 4 * J], J sets of (dx, dy, dw, dh) per row.
            boxes: Tensor[R, 4], the reference boxes (cast to deltas' dtype).
        Returns:
            Tensor[R, J, 4] decoded boxes.
        """
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]

        half_w = 0.5 * pred_w
        half_h = 0.5 * pred_h
        pred = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h,
                            pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)
        return pred  # [R, J, 4]


class Matcher:
    """Assigns each prediction the GT box it overlaps most, if the overlap is good enough.

    Args:
        high_threshold: IoU >= this is a match (foreground).
        low_threshold: IoU < this is BELOW_LOW_THRESHOLD (-1, background);
            IoU in [low, high) is BETWEEN_THRESHOLDS (-2, ignored).
        allow_low_quality_matches: also match, for each GT box, the predictions that
            overlap it most (ties included) even below `high_threshold`, so that every
            GT box has at least one match (the Faster R-CNN RPN rule).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float,
                 allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """
        Args:
            iou: Tensor[M, R], IoU of every (GT, prediction) pair.
        Returns:
            Tensor[R] int64: the matched GT index in [0, M), or -1 / -2. With no GT
            boxes (M == 0) every prediction is -1 (torchvision raises instead).
        """
        num_gt, num_pred = iou.shape
        if num_gt == 0 or num_pred == 0:
            return torch.full((num_pred,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64,
                              device=iou.device)
        matched_vals, matches = iou.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None

        below_low = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below_low] = self.BELOW_LOW_THRESHOLD
        matches[between] = self.BETWEEN_THRESHOLDS

        if all_matches is not None:
            self._set_low_quality_matches(matches, all_matches, iou)
        return matches

    @staticmethod
    def _set_low_quality_matches(matches: Tensor, all_matches: Tensor, iou: Tensor) -> None:
        # Each prediction restored here gets its own best GT (all_matches), which need not
        # be the GT it is best for: torchvision's rule, kept for parity.
        highest_per_gt, _ = iou.max(dim=1)
        _, pred_inds = torch.where(iou == highest_per_gt[:, None])
        matches[pred_inds] = all_matches[pred_inds]


class BalancedPositiveNegativeSampler:
    """Samples a fixed-size mini-batch per image with at most a given fraction of positives.

    Random draws happen in torchvision's order (per image: a randperm over the positives,
    then one over the negatives), so under the same seed the same elements are picked.

    Args:
        batch_size_per_image: elements sampled per image (fewer if not enough exist).
        positive_fraction: at most this fraction of the batch is positive; negatives
            fill the rest.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            labels: per image, Tensor[R_i]: >= 1 positive, 0 negative, -1 ignored.
        Returns:
            (pos_masks, neg_masks): per image, Tensor[R_i] bool of the sampled elements.
        """
        pos_masks, neg_masks = [], []
        for labels_i in labels:
            pos_mask, neg_mask = self._sample_image(labels_i)
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks

    def _sample_image(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        positive = torch.where(labels >= 1)[0]
        negative = torch.where(labels == 0)[0]
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)

        perm_pos = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
        perm_neg = torch.randperm(negative.numel(), device=negative.device)[:num_neg]

        pos_mask = torch.zeros_like(labels, dtype=torch.bool)
        neg_mask = torch.zeros_like(labels, dtype=torch.bool)
        pos_mask[positive[perm_pos]] = True
        neg_mask[negative[perm_neg]] = True
        return pos_mask, neg_mask
