"""RoI-head training targets: add GT boxes to the proposals, match, sample, encode.

Shapes: R_i proposals of image i, M_i GT boxes, S_i sampled RoIs.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from tools.boxes import BalancedPositiveNegativeSampler, BoxCoder, Matcher, box_iou


@dataclass
class RoITargets:
    """Per image, for the sampled RoIs only."""
    proposals: list[Tensor]           # Tensor[S_i, 4]
    labels: list[Tensor]              # Tensor[S_i] int64, 0 = background
    matched_idxs: list[Tensor]        # Tensor[S_i] int64 GT index (0 for background)
    regression_targets: list[Tensor]  # Tensor[S_i, 4]


def assign_targets(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                   matcher: Matcher) -> tuple[Tensor, Tensor]:
    """One image: GT index and label per proposal (-1 = ignored, between thresholds).

    Args:
        proposals: Tensor[R, 4]; gt_boxes: Tensor[M, 4]; gt_labels: Tensor[M] int64.
    Returns:
        (matched_idxs Tensor[R] clamped to >= 0, labels Tensor[R] int64).
    """
    num = proposals.shape[0]
    if gt_boxes.numel() == 0:
        # An image without objects: every proposal is background.
        zeros = torch.zeros(num, dtype=torch.int64, device=proposals.device)
        return zeros, zeros.clone()
    matches = matcher(box_iou(gt_boxes, proposals))
    matched_idxs = matches.clamp(min=0)
    labels = gt_labels[matched_idxs].to(torch.int64)
    labels[matches == -1] = 0
    labels[matches == -2] = -1
    return matched_idxs, labels


def select_training_samples(proposals: list[Tensor], gt_boxes: list[Tensor],
                            gt_labels: list[Tensor], matcher: Matcher,
                            sampler: BalancedPositiveNegativeSampler,
                            box_coder: BoxCoder) -> RoITargets:
    """Add the GT boxes to the proposals, match, sample (512, 25% positive), encode.

    Args:
        proposals: per image Tensor[R_i, 4]; gt_boxes: per image Tensor[M_i, 4];
        gt_labels: per image Tensor[M_i] int64.
    """
    dtype, device = proposals[0].dtype, proposals[0].device
    gt_boxes = [b.to(dtype) for b in gt_boxes]
    # GT boxes are perfect proposals: they guarantee positives early in training.
    proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
    matched, labels = zip(*[assign_targets(p, g, lab, matcher)
                            for p, g, lab in zip(proposals, gt_boxes, gt_labels)])
    pos_masks, neg_masks = sampler(list(labels))
    out = RoITargets([], [], [], [])
    for i, (pos, neg) in enumerate(zip(pos_masks, neg_masks)):
        keep = torch.where(pos | neg)[0]
        gts = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype,
                                                                    device=device)
        out.proposals.append(proposals[i][keep])
        out.labels.append(labels[i][keep])
        out.matched_idxs.append(matched[i][keep])
        out.regression_targets.append(
            box_coder.encode(gts[matched[i][keep]], proposals[i][keep]))
    return out
