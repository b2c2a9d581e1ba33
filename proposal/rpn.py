"""Region Proposal Network: prediction, proposal selection, anchor targets and losses.

Shape letters: N images, L levels, A anchors per location, T anchors per image over all
levels (sum_l H_l * W_l * A), M_i GT boxes of image i, R_i proposals of image i.

Every step matches torchvision's RegionProposalNetwork (the same anchors order, top-n,
NMS and random sampling order), so under the same weights and seed the proposals and
losses equal torchvision's; tests/proposal checks this.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import libs
from tools.boxes import (BalancedPositiveNegativeSampler, BoxCoder, Matcher, box_iou,
                         clip_boxes_to_image, remove_small_boxes)
from tools.structures import ImageList

from .anchors import AnchorGenerator


class RPN(nn.Module):
    """Proposals from anchors, plus the RPN losses when GT boxes are given.

    Args:
        anchor_generator: the anchors of every level.
        head: maps features to per-level objectness logits and deltas (RPNHead).
        rpn_fg_iou_thresh: anchors with IoU >= this with a GT box are positive.
        rpn_bg_iou_thresh: anchors with IoU < this with every GT box are negative; in
            between they are ignored. Each GT box's best anchors are positive regardless.
        rpn_batch_size_per_image: anchors sampled per image for the losses.
        rpn_positive_fraction: at most this fraction of the sample is positive.
        rpn_pre_nms_top_n_train / rpn_pre_nms_top_n_test: highest-scoring anchors kept
            per level before NMS, in training / eval mode (self.training picks).
        rpn_post_nms_top_n_train / rpn_post_nms_top_n_test: proposals kept per image
            after NMS.
        rpn_nms_thresh: IoU threshold of the NMS, run per level.
        rpn_score_thresh: proposals with objectness probability < this are dropped.
        rpn_min_size: proposals with a side < this (pixels) are dropped.
        rpn_box_filter: "torchvision" (rpn_min_size and rpn_score_thresh as above, NMS on
            probabilities) or "detectron2" (drop non-finite and empty boxes only, NMS on
            logits: the two orders differ where sigmoid saturates into ties).
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module,
                 rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                 rpn_nms_thresh: float = 0.7, rpn_score_thresh: float = 0.0,
                 rpn_min_size: float = 1e-3, rpn_box_filter: str = "torchvision"):
        super().__init__()
        if rpn_box_filter not in PROPOSAL_FILTERS:
            raise ValueError(f"rpn_box_filter must be one of {sorted(PROPOSAL_FILTERS)}, "
                             f"got {rpn_box_filter!r}")
        self.rpn_box_filter = rpn_box_filter
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(rpn_fg_iou_thresh, rpn_bg_iou_thresh,
                               allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(rpn_batch_size_per_image,
                                                       rpn_positive_fraction)
        self.rpn_pre_nms_top_n_train = rpn_pre_nms_top_n_train
        self.rpn_pre_nms_top_n_test = rpn_pre_nms_top_n_test
        self.rpn_post_nms_top_n_train = rpn_post_nms_top_n_train
        self.rpn_post_nms_top_n_test = rpn_post_nms_top_n_test
        self.rpn_nms_thresh = rpn_nms_thresh
        self.rpn_score_thresh = rpn_score_thresh
        self.rpn_min_size = rpn_min_size

    @property
    def pre_nms_top_n(self) -> int:
        return self.rpn_pre_nms_top_n_train if self.training else self.rpn_pre_nms_top_n_test

    @property
    def post_nms_top_n(self) -> int:
        return self.rpn_post_nms_top_n_train if self.training else self.rpn_post_nms_top_n_test

    def forward(self, images: ImageList, features: list[Tensor],
                gt_boxes: Optional[list[Tensor]] = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """
        Args:
            images: the padded batch; image_sizes bound the proposals.
            features: per level Tensor[N, C, H_l, W_l], finest first (P2..P6).
            gt_boxes: per image Tensor[M_i, 4] (M_i may be 0), or None.
        Returns:
            (proposals, losses): per image Tensor[R_i, 4], detached, best first; losses is
            {} when gt_boxes is None, else {"loss_rpn_cls", "loss_rpn_box"} (in train and
            eval mode alike, so validation losses work).
        """
        pred_objectness, pred_deltas = self.head(features)
        anchors = self.anchor_generator.per_level(images.tensors, features)
        objectness, deltas = level_predictions(pred_objectness, pred_deltas)

        # The proposals are treated as fixed for joint training: no gradient through them.
        boxes, _ = select_proposals(
            anchors, [o.detach() for o in objectness], [d.detach() for d in deltas],
            images.image_sizes, self.box_coder, self.pre_nms_top_n, self.post_nms_top_n,
            self.rpn_nms_thresh, self.rpn_score_thresh, self.rpn_min_size,
            self.rpn_box_filter)

        losses: dict[str, Tensor] = {}
        if gt_boxes is not None:
            image_anchors = [torch.cat(anchors)] * len(images.image_sizes)
            matched_idxs = match_anchors(image_anchors, gt_boxes, self.matcher)
            loss_cls, loss_box = rpn_loss(torch.cat(objectness, dim=1),
                                          torch.cat(deltas, dim=1), image_anchors, gt_boxes,
                                          matched_idxs, self.sampler, self.box_coder)
            losses = {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}
        return boxes, losses


def level_predictions(pred_objectness: list[Tensor], pred_deltas: list[Tensor]
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Each level's predictions in anchor order (location, anchor).

    Args:
        pred_objectness: per level Tensor[N, A, H_l, W_l].
        pred_deltas: per level Tensor[N, 4A, H_l, W_l].
    Returns:
        (objectness per level Tensor[N, T_l], deltas per level Tensor[N, T_l, 4]).
    """
    objectness, deltas = [], []
    for logits, reg in zip(pred_objectness, pred_deltas):
        n, a, h, w = logits.shape
        objectness.append(logits.view(n, a, 1, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1))
        deltas.append(reg.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return objectness, deltas


def flatten_predictions(pred_objectness: list[Tensor],
                        pred_deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The levels concatenated in anchor order (level, location, anchor):
    (objectness Tensor[N, T], deltas Tensor[N, T, 4])."""
    objectness, deltas = level_predictions(pred_objectness, pred_deltas)
    return torch.cat(objectness, dim=1), torch.cat(deltas, dim=1)


def select_proposals(anchors: list[Tensor], objectness: list[Tensor], deltas: list[Tensor],
                     image_sizes: list[tuple[int, int]], box_coder: BoxCoder,
                     pre_nms_top_n: int, post_nms_top_n: int, rpn_nms_thresh: float,
                     rpn_score_thresh: float = 0.0, rpn_min_size: float = 1e-3,
                     rpn_box_filter: str = "torchvision") -> tuple[list[Tensor], list[Tensor]]:
    """Per-level top-n, decode, then per image the proposal filter (PROPOSAL_FILTERS:
    clip, drop boxes, per-level NMS, top-n).

    Args:
        anchors: per level Tensor[T_l, 4] (the same for every image).
        objectness: per level Tensor[N, T_l] logits (detached).
        deltas: per level Tensor[N, T_l, 4] (detached).
        image_sizes: (h, w) per image; boxes are clipped to it.
        box_coder: decodes deltas against anchors.
        rpn_box_filter: a name in PROPOSAL_FILTERS (see RPN).
    Returns:
        (boxes, scores): per image Tensor[R_i, 4] and Tensor[R_i] probabilities, sorted by
        decreasing score, R_i <= post_nms_top_n.
    """
    boxes, logits, levels = [], [], []
    for level, (level_anchors, scores, level_deltas) in enumerate(
            zip(anchors, objectness, deltas)):
        top, idx = scores.topk(_top_n(pre_nms_top_n, scores), dim=1)     # [N, k]
        batch = torch.arange(scores.shape[0], device=scores.device)[:, None]
        # Decoding the kept anchors only: decode is row-wise, the same numbers.
        decoded = box_coder.decode(level_deltas[batch, idx].reshape(-1, 4),
                                   level_anchors[idx].reshape(-1, 4))
        boxes.append(decoded.reshape(idx.shape[0], -1, 4))
        logits.append(top)
        levels.append(torch.full_like(idx, level))
    boxes, logits, levels = torch.cat(boxes, 1), torch.cat(logits, 1), torch.cat(levels, 1)
    keep_fn = PROPOSAL_FILTERS[rpn_box_filter]
    final_boxes, final_scores = [], []
    for image_boxes, image_logits, image_levels, size in zip(boxes, logits, levels,
                                                             image_sizes):
        keep = keep_fn(image_boxes, image_logits, image_levels, size, post_nms_top_n,
                       rpn_nms_thresh, rpn_score_thresh, rpn_min_size)
        final_boxes.append(clip_boxes_to_image(image_boxes, size)[keep])
        final_scores.append(torch.sigmoid(image_logits[keep]))
    return final_boxes, final_scores


def _top_n(top_n: int, scores: Tensor):
    """min(top_n, T_l) for scores Tensor[N, T_l]: an int, or what a tracer keeps
    symbolic (a 0-d tensor for the TorchScript tracer, a SymInt for torch.export)."""
    n = scores.shape[1]
    if isinstance(n, Tensor):
        return torch.minimum(n, torch.tensor(top_n))
    if isinstance(n, int):
        return min(top_n, n)
    return torch.sym_min(n, top_n)


def _filter_image(boxes: Tensor, logits: Tensor, levels: Tensor, size: tuple[int, int],
                  top_n: int, nms_thresh: float, score_thresh: float,
                  min_size: float) -> Tensor:
    """Indices into one image's candidates (torchvision): clip, drop small and
    low-scoring boxes, NMS per level on probabilities, top-n."""
    scores = torch.sigmoid(logits)
    boxes = clip_boxes_to_image(boxes, size)
    keep = remove_small_boxes(boxes, min_size)
    keep = keep[scores[keep] >= score_thresh]
    order = libs.batched_nms(boxes[keep], scores[keep], levels[keep], nms_thresh)[:top_n]
    return keep[order]


def _filter_image_detectron2(boxes: Tensor, logits: Tensor, levels: Tensor,
                             size: tuple[int, int], top_n: int, nms_thresh: float,
                             score_thresh: float, min_size: float) -> Tensor:
    """Indices into one image's candidates (detectron2): drop non-finite, clip, drop
    empty boxes, NMS per level on logits, top-n (score_thresh, min_size: unused)."""
    keep = torch.where(torch.isfinite(boxes).all(dim=1) & torch.isfinite(logits))[0]
    clipped = clip_boxes_to_image(boxes[keep], size)
    nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    keep, clipped = keep[nonempty], clipped[nonempty]
    order = libs.batched_nms(clipped, logits[keep], levels[keep], nms_thresh)[:top_n]
    return keep[order]


# Proposal filters, by the config key rpn.rpn_box_filter: each maps one image's candidates
# (boxes Tensor[C, 4], logits Tensor[C], levels Tensor[C], size (h, w), top_n, nms_thresh,
# score_thresh, min_size) to kept indices Tensor[R] int64, best first.
PROPOSAL_FILTERS = {"torchvision": _filter_image, "detectron2": _filter_image_detectron2}


def match_anchors(anchors: list[Tensor], gt_boxes: list[Tensor], matcher: Matcher) -> list[Tensor]:
    """Per image Tensor[T] int64: matched GT index, -1 (negative) or -2 (ignored).

    An image without GT boxes gets -1 everywhere: all its anchors are negatives.
    """
    return [matcher(box_iou(gt.to(a.dtype), a)) for a, gt in zip(anchors, gt_boxes)]


def anchor_labels(matched_idxs: Tensor) -> Tensor:
    """Tensor[T] float: 1 positive, 0 negative, -1 ignored (the sampler's input)."""
    labels = (matched_idxs >= 0).to(torch.float32)
    labels[matched_idxs == Matcher.BETWEEN_THRESHOLDS] = -1.0
    return labels


def rpn_loss(objectness: Tensor, pred_deltas: Tensor, anchors: list[Tensor],
             gt_boxes: list[Tensor], matched_idxs: list[Tensor],
             sampler: BalancedPositiveNegativeSampler, box_coder: BoxCoder,
             beta: float = 1.0 / 9) -> tuple[Tensor, Tensor]:
    """Objectness and box losses over a balanced sample of anchors.

    Args:
        objectness: Tensor[N, T] logits.
        pred_deltas: Tensor[N, T, 4].
        anchors: per image Tensor[T, 4].
        gt_boxes: per image Tensor[M_i, 4].
        matched_idxs: per image Tensor[T] from match_anchors.
    Returns:
        (loss_rpn_cls, loss_rpn_box): BCE-with-logits averaged over the sampled anchors;
        smooth-L1 (beta) summed over sampled positives / number sampled (0 without
        positives, still connected to the graph).
    """
    labels = [anchor_labels(m) for m in matched_idxs]
    pos_masks, neg_masks = sampler(labels)
    pos = torch.where(torch.cat(pos_masks))[0]
    neg = torch.where(torch.cat(neg_masks))[0]
    sampled = torch.cat([pos, neg])

    matched_gt = torch.cat([_matched_gt_boxes(gt, m, a)
                            for gt, m, a in zip(gt_boxes, matched_idxs, anchors)])
    targets = box_coder.encode(matched_gt[pos], torch.cat(anchors)[pos])
    box_loss = F.smooth_l1_loss(pred_deltas.reshape(-1, 4)[pos], targets, beta=beta,
                                reduction="sum") / max(sampled.numel(), 1)
    cls_loss = F.binary_cross_entropy_with_logits(objectness.reshape(-1)[sampled],
                                                  torch.cat(labels)[sampled])
    return cls_loss, box_loss


def _matched_gt_boxes(gt: Tensor, matched_idxs: Tensor, anchors: Tensor) -> Tensor:
    """Tensor[T, 4]: each anchor's matched GT box (rows of unmatched anchors are unused)."""
    if gt.numel() == 0:
        return anchors.new_zeros(anchors.shape)
    return gt.to(anchors.dtype)[matched_idxs.clamp(min=0)]
