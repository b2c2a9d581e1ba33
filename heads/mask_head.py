"""Mask branch of the RoI heads: head, predictor, targets, loss, inference (pasting into
the image: tools/paste.py).

Shapes: R RoIs, M GT instances, K object classes (K + 1 channels with background),
S mask size (28), D detections, H/W image size.
"""
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers import FastPath, conv2d, optional_norm_layer
from libs import roi_align
from tools.paste import (PASTE_MASKS, image_masks_zeros,  # noqa: F401  (re-exported)
                         paste_masks_grid_sample, paste_masks_in_image)

from .box_head import split_per_image


class MaskHead(nn.Sequential):
    """4 x (3x3 conv 256 + norm? + ReLU); a Sequential of (conv, [norm,] relu) blocks, so
    parameter names ("0.0.weight", "0.1.running_mean", ...) equal torchvision's
    MaskRCNNHeads (v1 without norm, v2 with BatchNorm).

    Args:
        in_channels: channels of the pooled features (256).
        layers: output channels of each conv.
        dilation: conv dilation (padding = dilation keeps the size).
        norm: "none" (convs with bias) or "frozen_bn", "bn", "gn" after each conv.
        fast_path: how the convs run (layers.FastPath).
    """

    def __init__(self, in_channels: int = 256, layers=(256, 256, 256, 256), dilation: int = 1,
                 norm: str = "none", fast_path: FastPath = FastPath()):
        norm_layer = optional_norm_layer(norm)
        blocks = []
        for channels in layers:
            conv = nn.Conv2d(in_channels, channels, 3, stride=1, padding=dilation,
                             dilation=dilation, bias=norm_layer is None)
            norms = [] if norm_layer is None else [norm_layer(channels)]
            blocks.append(nn.Sequential(conv, *norms, nn.ReLU(inplace=True)))
            in_channels = channels
        super().__init__(*blocks)
        self.fast_path = fast_path
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[R, C, P, P] pooled RoI features -> Tensor[R, layers[-1], P, P]."""
        fast_path = self.fast_path
        if not (fast_path.winograd or fast_path.folds_at_inference(x)):
            return super().forward(x)
        # Each conv + ReLU is one Winograd call, or at inference on CPU one oneDNN call,
        # on channels-last tensors.
        for block in self:
            x = conv2d(x, block[0], relu=True, fast_path=fast_path,
                       norm=block[1] if len(block) == 3 else None)
        return x


class MaskPredictor(nn.Sequential):
    """2x2 stride-2 deconv + ReLU, then 1x1 conv to K + 1 mask logits (14 -> 28).

    Only the weights get kaiming init; biases keep PyTorch's default, as torchvision does.
    fast_path (layers.FastPath): with fuse_bn, the 1x1 conv runs on oneDNN at inference.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int,
                 fast_path: FastPath = FastPath()):
        super().__init__(OrderedDict([
            ("conv5_mask", nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
            ("relu", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
        ]))
        self.fast_path = fast_path
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """x: Tensor[R, C, P, P] -> mask logits Tensor[R, K+1, 2P, 2P]; with labels
        (Tensor[R] int64, training) only each RoI's own class: Tensor[R, 2P, 2P]."""
        if labels is not None:
            return self._forward_selected(x, labels)
        if not self.fast_path.folds_at_inference(x):
            return super().forward(x)
        x = F.relu(self.conv5_mask(x), inplace=True)
        return conv2d(x, self.mask_fcn_logits, fast_path=self.fast_path)

    def _forward_selected(self, x: Tensor, labels: Tensor) -> Tensor:
        # The loss reads one channel per RoI: computing the other K costs K times the
        # 1x1 conv (and its backward) for logits whose gradient is zero anyway.
        x = F.relu(self.conv5_mask(x), inplace=True)
        conv = self.mask_fcn_logits
        weight = conv.weight[labels, :, 0, 0]
        out = torch.einsum("rdhw,rd->rhw", x, weight)
        return out + conv.bias[labels][:, None, None] if conv.bias is not None else out


# The mask head, by the config key mask_head.mask_head. builder.py calls an entry with
#     in_channels: int (FPN channels C), layers: tuple[int, ...] (mask_layers),
#     dilation: int (mask_dilation), norm: str (mask_norm), fast_path: layers.FastPath
# and the module maps pooled features Tensor[R, C, P, P] -> Tensor[R, layers[-1], P, P].
MASK_HEADS = {"fcn": MaskHead}

# The mask predictor, by the config key mask_head.mask_predictor. builder.py calls an
# entry with
#     in_channels: int (layers[-1]), dim_reduced: int (mask_dim_reduced),
#     num_classes: int (K + 1), fast_path: layers.FastPath
# and the module's forward(x: Tensor[R, C, P, P], labels: Tensor[R] | None = None) gives
# mask logits Tensor[R, K+1, S, S], or with labels (training) each RoI's own class
# Tensor[R, S, S]; S = 2P for the shipped one.
MASK_PREDICTORS = {"deconv": MaskPredictor}


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor,
                           size: int) -> Tensor:
    """RoIAlign each RoI's matched GT mask to size x size (the mask targets).

    Args:
        gt_masks: Tensor[M, H, W] of one image; boxes: Tensor[R, 4] positive RoIs;
        matched_idxs: Tensor[R] int64 index into gt_masks.
    Returns:
        Tensor[R, size, size] float in [0, 1].
    """
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0)[:, 0]


def mask_target_labels(gt_labels: list[Tensor], mask_matched_idxs: list[Tensor]) -> Tensor:
    """Tensor[R] int64: the class of each positive RoI's matched GT, images concatenated."""
    return torch.cat([lab[idx] for lab, idx in zip(gt_labels, mask_matched_idxs)], dim=0)


def mask_loss(pred_mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
              mask_matched_idxs: list[Tensor]) -> Tensor:
    """BCE-with-logits between each positive RoI's own-class logits and its projected GT
    mask.

    Args:
        pred_mask_logits: Tensor[R, S, S], the GT class's channel of each positive RoI.
        proposals: per image Tensor[R_i, 4] positive RoIs.
        gt_masks: per image Tensor[M_i, H, W].
        mask_matched_idxs: per image Tensor[R_i] GT index of each RoI.
    Returns:
        scalar; zero but graph-connected when there are no positive RoIs.
    """
    if pred_mask_logits.shape[0] == 0:
        return pred_mask_logits.sum() * 0
    size = pred_mask_logits.shape[-1]
    targets = torch.cat([project_masks_on_boxes(m, p, i, size)
                         for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)], dim=0)
    return F.binary_cross_entropy_with_logits(pred_mask_logits, targets)


def mask_inference(mask_logits: Tensor, labels: list[Tensor]) -> list[Tensor]:
    """Sigmoid of each detection's predicted-class channel.

    Args:
        mask_logits: Tensor[D, K+1, S, S] (all images); labels: per image Tensor[D_i].
    Returns:
        per image Tensor[D_i, 1, S, S] probabilities.
    """
    all_labels = torch.cat(labels)
    index = torch.arange(mask_logits.shape[0], device=all_labels.device)
    probs = mask_logits[index, all_labels][:, None].sigmoid()
    return list(split_per_image(probs, labels))
