"""Box branch of the RoI heads: head, predictor, loss and inference.

Shapes: N images, R RoIs (summed over images unless per image), K object classes
(K + 1 with background, class 0), C pooled channels, P pooled size (7).
"""
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers import FastPath, conv2d, optional_norm_layer
from libs import batched_nms
from tools.boxes import BoxCoder, clip_boxes_to_image, remove_small_boxes


class TwoMLPHead(nn.Module):
    """Flatten, fc6 + ReLU, fc7 + ReLU (torchvision's default FPN box head).

    Args:
        in_channels: C * P * P of the pooled RoI features.
        representation_size: width of both layers (1024).
    """

    def __init__(self, in_channels: int, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[R, C, P, P] -> Tensor[R, representation_size]."""
        x = F.relu(self.fc6(x.flatten(start_dim=1)))
        return F.relu(self.fc7(x))


class ConvFCHead(nn.Module):
    """N x (3x3 conv + norm? + ReLU), flatten, one fc + ReLU: the "Nconv1fc" head of
    torchvision's v2 Mask R-CNN and detectron2's LSJ models (N = 4).

    Args:
        in_channels: C of the pooled features (256).
        pool_size: P, the pooled side (7).
        num_convs: N; conv_dim: channels of each conv (256).
        representation_size: width of the fc (1024).
        norm: "none" (convs with bias) or "frozen_bn", "bn", "gn" after each conv.
        fast_path: how the convs run (layers.FastPath).
    """

    def __init__(self, in_channels: int, pool_size: int, num_convs: int = 4,
                 conv_dim: int = 256, representation_size: int = 1024, norm: str = "none",
                 fast_path: FastPath = FastPath()):
        super().__init__()
        self.fast_path = fast_path
        norm_layer = optional_norm_layer(norm)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, padding=1,
                      bias=norm_layer is None) for i in range(num_convs))
        if norm_layer is not None:
            self.norms = nn.ModuleList(norm_layer(conv_dim) for _ in range(num_convs))
        self.has_norm = norm_layer is not None
        channels = conv_dim if num_convs else in_channels
        self.fc6 = nn.Linear(channels * pool_size ** 2, representation_size)
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[R, C, P, P] -> Tensor[R, representation_size]."""
        for i, conv in enumerate(self.convs):
            x = conv2d(x, conv, relu=True, fast_path=self.fast_path,
                       norm=self.norms[i] if self.has_norm else None)
        return F.relu(self.fc6(x.flatten(start_dim=1)))


def two_fc_head(in_channels: int, pool_size: int, representation_size: int,
                conv_dim: int = 256, norm: str = "none",
                fast_path: FastPath = FastPath()) -> TwoMLPHead:
    """BOX_HEADS["2fc"]: TwoMLPHead on the flattened pooled features (conv_dim, norm and
    fast_path unused)."""
    return TwoMLPHead(in_channels * pool_size ** 2, representation_size)


def conv_fc_head(in_channels: int, pool_size: int, representation_size: int,
                 conv_dim: int = 256, norm: str = "none", fast_path: FastPath = FastPath(),
                 num_convs: int = 4) -> "ConvFCHead":
    """BOX_HEADS["Nconv1fc"]: ConvFCHead with num_convs = N convs of conv_dim."""
    return ConvFCHead(in_channels, pool_size, num_convs, conv_dim, representation_size, norm,
                      fast_path)


# The box head, by the config key box_head.box_head. builder.py calls an entry with
#     in_channels: int (FPN channels C), pool_size: int (P, box_pool_size),
#     representation_size: int, conv_dim: int (box_conv_dim), norm: str (box_norm),
#     fast_path: layers.FastPath
# and, for a key with "N" (the name's first number there: "4conv1fc" -> "Nconv1fc"),
#     num_convs: int = N.
# The module maps pooled features Tensor[R, C, P, P] -> Tensor[R, representation_size]
# (what the box predictor takes).
BOX_HEADS = {"2fc": two_fc_head, "Nconv1fc": conv_fc_head}


def build_box_head(kind: str, in_channels: int, pool_size: int, representation_size: int,
                   conv_dim: int = 256, norm: str = "none",
                   fast_path: FastPath = FastPath()) -> nn.Module:
    """The box head named by the config key box_head: "2fc" or "Nconv1fc" (N >= 0), or
    another entry of BOX_HEADS (builder.py looks names up the same way)."""
    kwargs = dict(in_channels=in_channels, pool_size=pool_size,
                  representation_size=representation_size, conv_dim=conv_dim, norm=norm,
                  fast_path=fast_path)
    if kind in BOX_HEADS:
        return BOX_HEADS[kind](**kwargs)
    match = re.fullmatch(r"(\d+)conv1fc", kind)
    if match:
        return BOX_HEADS["Nconv1fc"](**kwargs, num_convs=int(match.group(1)))
    raise ValueError(f"box_head must be '2fc' or 'Nconv1fc' (e.g. '4conv1fc'), got {kind!r}")


class BoxPredictor(nn.Module):
    """Class logits (K + 1) and class-specific box deltas (4 * (K + 1)).

    Args:
        in_channels: width of the box head's output.
        num_classes: K + 1, background included.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: Tensor[R, D] -> (pred_logits Tensor[R, K+1], pred_deltas Tensor[R, 4(K+1)])."""
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


# The box predictor, by the config key box_head.box_predictor. builder.py calls an entry
# with in_channels: int (representation_size) and num_classes: int (K + 1); the module
# maps Tensor[R, representation_size] -> (class logits Tensor[R, K+1], box deltas
# Tensor[R, 4(K+1)]) and keeps cls_score / bbox_pred (the box loss and inference read them
# only through the outputs).
BOX_PREDICTORS = {"fastrcnn": BoxPredictor}


def fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                  regression_targets: list[Tensor], box_loss: str = "smooth_l1",
                  box_smooth_l1_beta: float = 1.0 / 9) -> tuple[Tensor, Tensor]:
    """Cross-entropy over sampled RoIs; box loss on positives, summed / number sampled.

    Args:
        class_logits: Tensor[R, K+1] for the sampled RoIs of all images.
        box_regression: Tensor[R, 4(K+1)].
        labels: per image Tensor[R_i] int64, 0 = background.
        regression_targets: per image Tensor[R_i, 4] encoded GT boxes.
        box_loss: "smooth_l1" (torchvision, box_smooth_l1_beta 1/9) or "l1" (detectron2).
    Returns:
        (loss_cls, loss_box), scalars; zero but graph-connected with no RoIs.
    """
    gt_labels = torch.cat(labels, dim=0)
    gt_deltas = torch.cat(regression_targets, dim=0)
    if gt_labels.numel() == 0:
        # cross_entropy over nothing is NaN; keep the graph for DDP / optimisers.
        return class_logits.sum() * 0, box_regression.sum() * 0
    loss_cls = F.cross_entropy(class_logits, gt_labels)
    pos = torch.where(gt_labels > 0)[0]
    pred_deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, gt_labels[pos]]
    if box_loss == "smooth_l1":
        loss = F.smooth_l1_loss(pred_deltas, gt_deltas[pos], beta=box_smooth_l1_beta,
                                reduction="sum")
    elif box_loss == "l1":
        loss = F.l1_loss(pred_deltas, gt_deltas[pos], reduction="sum")
    else:
        raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {box_loss!r}")
    return loss_cls, loss / gt_labels.numel()


def box_inference(class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                  image_sizes: list[tuple[int, int]], box_coder: BoxCoder,
                  box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
                  box_detections_per_img: int = 100, box_min_size: float = 1e-2,
                  box_drop_empty: bool = False
                  ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Softmax, class-specific decode, clip, drop background, threshold, NMS, top-k.

    Args:
        class_logits: Tensor[R, K+1]; box_regression: Tensor[R, 4(K+1)].
        proposals: per image Tensor[R_i, 4]; image_sizes: per image (h, w).
        box_score_thresh, box_nms_thresh, box_detections_per_img: the score threshold,
            the NMS IoU threshold (per class) and the top-k.
        box_min_size: before NMS, drop boxes with a side < this (torchvision; 0: none).
        box_drop_empty: after the top-k, drop boxes with a side of 0 (detectron2's
            postprocess: a box clipped to nothing, e.g. one outside the image).
    Returns:
        per image boxes Tensor[D_i, 4], scores Tensor[D_i], labels Tensor[D_i] int64
        (in 1..K), sorted by decreasing score.
    """
    num_classes = class_logits.shape[-1]
    pred_boxes = box_coder.decode(box_regression, torch.cat(proposals, dim=0))
    pred_scores = F.softmax(class_logits, -1)
    results = ([], [], [])
    for boxes, scores, size in zip(split_per_image(pred_boxes, proposals),
                                   split_per_image(pred_scores, proposals), image_sizes):
        boxes, scores, labels = _select_detections(
            clip_boxes_to_image(boxes, size), scores, num_classes,
            box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img, box_min_size=box_min_size,
            box_drop_empty=box_drop_empty)
        for out, value in zip(results, (boxes, scores, labels)):
            out.append(value)
    return results


def split_per_image(rows: Tensor, per_image: list[Tensor]) -> tuple[Tensor, ...]:
    """rows Tensor[sum R_i, ...] as one Tensor[R_i, ...] per image (per_image: a tensor of
    R_i rows per image). One image: rows itself, whatever its length, so that a traced
    graph holds for every count."""
    if len(per_image) == 1:
        return (rows,)
    return rows.split([len(p) for p in per_image], 0)


def _select_detections(boxes: Tensor, scores: Tensor, num_classes: int, *,
                       box_score_thresh: float, box_nms_thresh: float,
                       box_detections_per_img: int, box_min_size: float,
                       box_drop_empty: bool):
    """One image: boxes Tensor[R, K+1, 4], scores Tensor[R, K+1] -> top detections."""
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
    # Every (RoI, object class) pair becomes a candidate; background is dropped.
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)
    # Non-finite candidates (diverged weights, NaN inputs) are never detections.
    keep = torch.where((scores > box_score_thresh) & torch.isfinite(boxes).all(dim=1))[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if box_min_size > 0:
        keep = remove_small_boxes(boxes, box_min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, box_nms_thresh)[:box_detections_per_img]
    if box_drop_empty:
        kept = boxes[keep]
        keep = keep[(kept[:, 2] > kept[:, 0]) & (kept[:, 3] > kept[:, 1])]
    return boxes[keep], scores[keep], labels[keep]
