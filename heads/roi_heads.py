"""RoI heads: box and mask branches on FPN features, given RPN proposals.

Shapes: N images, R_i proposals of image i, K object classes (background is 0),
D_i detections, C = 256 feature channels, S = 28 mask size.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from tools.boxes import BalancedPositiveNegativeSampler, BoxCoder, Matcher

from .box_head import box_inference, fastrcnn_loss
from .mask_head import mask_inference, mask_loss, mask_target_labels
from .targets import RoITargets, select_training_samples


class RoIHeads(nn.Module):
    """Box + mask heads. Losses are computed whenever targets are given (train or eval),
    detections whenever the module is in eval mode.

    Args:
        box_roi_pool: MultiScaleRoIAlign for the box branch (7x7).
        box_head: pooled features Tensor[R, C, 7, 7] -> Tensor[R, D] (TwoMLPHead,
            ConvFCHead or any module of that contract).
        box_predictor: Tensor[R, D] -> (class logits [R, K+1], deltas [R, 4(K+1)]).
        mask_roi_pool, mask_head, mask_predictor: the mask branch, or all None (no masks).
    Args (keyword):
        box_fg_iou_thresh, box_bg_iou_thresh: RoI matcher (0.5, 0.5).
        box_batch_size_per_image, box_positive_fraction: RoI sampler (512, 0.25).
        bbox_reg_weights: box coder weights (10, 10, 5, 5).
        box_loss, box_smooth_l1_beta: "smooth_l1" with beta 1/9, or "l1".
        box_score_thresh, box_nms_thresh, box_detections_per_img, box_min_size:
            inference (0.05, 0.5, 100, 1e-2; box_min_size 0 removes nothing).
        box_drop_empty: drop empty boxes after the top-k (detectron2's postprocess).
    """

    def __init__(self, box_roi_pool: nn.Module, box_head: nn.Module,
                 box_predictor: nn.Module, mask_roi_pool: Optional[nn.Module] = None,
                 mask_head: Optional[nn.Module] = None,
                 mask_predictor: Optional[nn.Module] = None, *,
                 box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), box_loss: str = "smooth_l1",
                 box_smooth_l1_beta: float = 1.0 / 9, box_score_thresh: float = 0.05,
                 box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
                 box_min_size: float = 1e-2, box_drop_empty: bool = False):
        super().__init__()
        mask_parts = (mask_roi_pool, mask_head, mask_predictor)
        if any(p is None for p in mask_parts) and any(p is not None for p in mask_parts):
            raise ValueError("mask_roi_pool, mask_head and mask_predictor go together: "
                             "pass all three or none")
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_on = mask_head is not None
        if self.mask_on:
            self.mask_roi_pool = mask_roi_pool
            self.mask_head = mask_head
            self.mask_predictor = mask_predictor
        self.num_classes = box_predictor.cls_score.out_features - 1
        self.proposal_matcher = Matcher(box_fg_iou_thresh, box_bg_iou_thresh,
                                        allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(box_batch_size_per_image,
                                                             box_positive_fraction)
        self.box_coder = BoxCoder(tuple(float(w) for w in bbox_reg_weights))
        self.box_loss = box_loss
        self.box_smooth_l1_beta = box_smooth_l1_beta
        self.box_score_thresh = box_score_thresh
        self.box_nms_thresh = box_nms_thresh
        self.box_detections_per_img = box_detections_per_img
        self.box_min_size = box_min_size
        self.box_drop_empty = box_drop_empty

    def forward(self, features: list[Tensor], proposals: list[Tensor],
                image_sizes: list[tuple[int, int]],
                targets: Optional[list[dict]] = None) -> tuple[list[dict], dict]:
        """
        Args:
            features: [P2, P3, P4, P5] (extra levels such as P6 are ignored),
                each Tensor[N, C, H_l, W_l].
            proposals: per image Tensor[R_i, 4] in resized-image pixels.
            image_sizes: per image (h, w) of the resized (unpadded) image.
            targets: per image dict(boxes Tensor[M_i, 4], labels Tensor[M_i] int64,
                masks Tensor[M_i, H, W]) in resized-image pixels, or None.
        Returns:
            (detections, losses): detections (eval mode only, else []) per image
            dict(boxes[D_i, 4], labels[D_i], scores[D_i], masks[D_i, 1, S, S] probs);
            losses (targets given only, else {}) loss_cls, loss_box, loss_mask.
        """
        features = list(features)[:4]
        # The proposals are treated as fixed: no gradient flows back into the RPN boxes.
        proposals = [p.detach() for p in proposals]
        if self.training and targets is None:
            raise ValueError("RoIHeads: targets are required in training mode")
        losses = {} if targets is None else self._losses(features, proposals, image_sizes,
                                                         targets)
        detections = [] if self.training else self._detect(features, proposals, image_sizes)
        return detections, losses

    def _losses(self, features, proposals, image_sizes, targets) -> dict:
        gt_boxes = [t["boxes"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        with torch.no_grad():
            samples = select_training_samples(proposals, gt_boxes, gt_labels,
                                              self.proposal_matcher, self.fg_bg_sampler,
                                              self.box_coder)
        class_logits, box_regression = self._forward_box(features, samples.proposals,
                                                         image_sizes)
        loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, samples.labels,
                                           samples.regression_targets, self.box_loss,
                                           self.box_smooth_l1_beta)
        losses = {"loss_cls": loss_cls, "loss_box": loss_box}
        if self.mask_on:
            losses["loss_mask"] = self._mask_loss(features, samples, image_sizes, targets)
        return losses

    def _mask_loss(self, features, samples: RoITargets, image_sizes, targets) -> Tensor:
        # Only positive RoIs carry a mask target, and only those matched to an instance
        # with a mask (target "mask_valid", Tensor[M] bool; all instances without it):
        # box-only instances train the box branch only. No such RoI: a zero loss.
        pos = [torch.where(lab > 0)[0] for lab in samples.labels]
        if any("mask_valid" in t for t in targets):
            pos = [i if "mask_valid" not in t else i[t["mask_valid"][m[i]]]
                   for i, m, t in zip(pos, samples.matched_idxs, targets)]
        boxes = [p[i] for p, i in zip(samples.proposals, pos)]
        matched = [m[i] for m, i in zip(samples.matched_idxs, pos)]
        labels = mask_target_labels([t["labels"] for t in targets], matched)
        pooled = self.mask_roi_pool(features, boxes, image_sizes)
        pred = self.mask_predictor(self.mask_head(pooled), labels)
        return mask_loss(pred, boxes, [t["masks"] for t in targets], matched)

    def _detect(self, features, proposals, image_sizes) -> list[dict]:
        class_logits, box_regression = self._forward_box(features, proposals, image_sizes)
        boxes, scores, labels = box_inference(
            class_logits, box_regression, proposals, image_sizes, self.box_coder,
            self.box_score_thresh, self.box_nms_thresh, self.box_detections_per_img,
            self.box_min_size, self.box_drop_empty)
        detections = [dict(boxes=b, labels=lab, scores=s)
                      for b, s, lab in zip(boxes, scores, labels)]
        if self.mask_on:
            mask_logits = self._forward_mask(features, boxes, image_sizes)
            for det, probs in zip(detections, mask_inference(mask_logits, labels)):
                det["masks"] = probs
        return detections

    def _forward_box(self, features, boxes, image_sizes) -> tuple[Tensor, Tensor]:
        """-> (class_logits Tensor[R, K+1], box_regression Tensor[R, 4(K+1)])."""
        pooled = self.box_roi_pool(features, boxes, image_sizes)
        return self.box_predictor(self.box_head(pooled))

    def _forward_mask(self, features, boxes, image_sizes) -> Tensor:
        """-> mask_logits Tensor[R, K+1, S, S]."""
        pooled = self.mask_roi_pool(features, boxes, image_sizes)
        return self.mask_predictor(self.mask_head(pooled))
