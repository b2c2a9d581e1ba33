"""Mask branch of the RoI heads: head, predictor, targets, loss, inference, pasting.

Shapes: R RoIs, M GT instances, K object classes (K + 1 channels with background),
S mask size (28), D detections, H/W image size.
"""
import math
import mmap
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers import FastPath, conv2d, optional_norm_layer
from layers.conv import onednn_inference
from libs import roi_align


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
        if not (fast_path.winograd or (fast_path.fuse_bn and onednn_inference(x))):
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
        if not (self.fast_path.fuse_bn and onednn_inference(x)):
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
    return list(probs.split([len(lab) for lab in labels], dim=0))


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale boxes about their centres (torchvision's arithmetic, float32)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)


def _bilinear_weights(length: Tensor, offset: Tensor, out_size: Tensor, in_size: int,
                      span: int) -> Tensor:
    """Rows of a bilinear resize matrix (PyTorch's align_corners=False rule).

    For each box b, output pixels offset[b] + j (j < length[b]) of a resize from in_size to
    out_size[b]; rows j >= length[b] are zero. Returns Tensor[B, span, in_size].
    """
    j = torch.arange(span, device=length.device)
    dst = (offset[:, None] + j[None]).to(torch.float64)
    # PyTorch: a float32 scale, then scale * (dst + 0.5) - 0.5 in double, stored as float.
    # (A Python number / tensor is computed as a reciprocal times the number: not exact.)
    scale = torch.full_like(out_size, in_size, dtype=torch.float32) / out_size.float()
    scale = scale.to(torch.float64)
    src = ((dst + 0.5) * scale[:, None] - 0.5).to(torch.float32).clamp(min=0)
    # src >= 0, so truncation is floor; padding rows (j >= length) may run past the end.
    i0 = src.to(torch.int64).clamp(max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    lam1 = src - i0.to(torch.float32)
    lam0 = 1.0 - lam1
    valid = (j[None] < length[:, None]).to(torch.float32)
    weights = torch.zeros(length.shape[0], span, in_size, device=length.device)
    weights.scatter_add_(2, i0[..., None], (lam0 * valid)[..., None])
    weights.scatter_add_(2, i1[..., None], (lam1 * valid)[..., None])
    return weights


def image_masks_zeros(count: int, height: int, width: int, dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    """Zeros Tensor[count, 1, height, width] to paste masks into.

    On the CPU its memory is an anonymous mapping, zero until written: pasting writes only
    each box's rows, so the pages outside the boxes are never touched. torch.zeros would
    write every page (341 MB for 100 detections at 800 x 1066, ~60 ms plus the kernel's
    page faults: docs/benchmarks.md, "Model zoo")."""
    shape = (count, 1, height, width)
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, numel * dtype.itemsize)
    return torch.frombuffer(pages, dtype=dtype).view(shape)


def paste_masks_in_image(masks: Tensor, boxes: Tensor, img_shape: tuple[int, int],
                         padding: int = 1) -> Tensor:
    """Paste S x S mask probabilities into an H x W image, as torchvision does.

    The masks are padded by `padding` pixels and the boxes scaled by (S + 2p) / S so the
    resized mask has a zero border; each box is resized bilinearly to its integer size
    (x2 - x1 + 1, y2 - y1 + 1). Only the part of each box inside the image is computed:
    the separable bilinear resize is two small matrix products per box.

    Args:
        masks: Tensor[D, 1, S, S]; boxes: Tensor[D, 4] in image pixels; img_shape: (H, W).
    Returns:
        Tensor[D, 1, H, W].
    """
    im_h, im_w = int(img_shape[0]), int(img_shape[1])
    size = masks.shape[-1]
    out = image_masks_zeros(masks.shape[0], im_h, im_w, masks.dtype, masks.device)
    if masks.shape[0] == 0:
        return out
    padded = F.pad(masks[:, 0], (padding,) * 4).to(torch.float32)
    ibox = _expand_boxes(boxes, float(size + 2 * padding) / size).to(torch.int64)
    box_w = (ibox[:, 2] - ibox[:, 0] + 1).clamp(min=1)
    box_h = (ibox[:, 3] - ibox[:, 1] + 1).clamp(min=1)
    x0, y0 = ibox[:, 0].clamp(min=0), ibox[:, 1].clamp(min=0)
    x1 = torch.minimum(ibox[:, 0] + box_w, ibox[:, 2] + 1).clamp(max=im_w)
    y1 = torch.minimum(ibox[:, 1] + box_h, ibox[:, 3] + 1).clamp(max=im_h)
    vis_w, vis_h = (x1 - x0).clamp(min=0), (y1 - y0).clamp(min=0)
    span_w, span_h = max(int(vis_w.max()), 1), max(int(vis_h.max()), 1)
    in_size = padded.shape[-1]
    wy = _bilinear_weights(vis_h, y0 - ibox[:, 1], box_h, in_size, span_h)
    wx = _bilinear_weights(vis_w, x0 - ibox[:, 0], box_w, in_size, span_w)
    rows = torch.bmm(wy, padded)                      # [D, span_h, S + 2p]
    # One product per box at its own size: a batched product would compute every box at
    # the largest box's span (100 detections, one of them image-sized: 30x the work).
    for d, (ya, yb, xa, xb) in enumerate(torch.stack((y0, y1, x0, x1), 1).tolist()):
        if yb > ya and xb > xa:
            out[d, 0, ya:yb, xa:xb] = torch.mm(rows[d, :yb - ya], wx[d, :xb - xa].t())
    return out


def paste_masks_grid_sample(masks: Tensor, boxes: Tensor, img_shape: tuple[int, int],
                            padding: int = 0) -> Tensor:
    """Paste S x S mask probabilities into an H x W image as detectron2 does: bilinear
    `grid_sample` (zero outside the mask) of each mask over its box, at pixel centres,
    within the box's integer bounds widened by one pixel (outside them: 0).

    Args:
        masks: Tensor[D, 1, S, S]; boxes: Tensor[D, 4] in image pixels; img_shape: (H, W).
        padding: unused (torchvision pasting's border; the signature is shared).
    Returns:
        Tensor[D, 1, H, W] probabilities (detectron2 thresholds them at 0.5).
    """
    im_h, im_w = int(img_shape[0]), int(img_shape[1])
    out = image_masks_zeros(masks.shape[0], im_h, im_w, torch.float32, masks.device)
    for d in range(masks.shape[0]):
        box = boxes[d:d + 1].to(torch.float32)
        xa = max(int(box[0, 0].floor()) - 1, 0)
        ya = max(int(box[0, 1].floor()) - 1, 0)
        xb = min(int(box[0, 2].ceil()) + 1, im_w)
        yb = min(int(box[0, 3].ceil()) + 1, im_h)
        if xb <= xa or yb <= ya:
            continue
        x0, y0, x1, y1 = box.split(1, dim=1)
        gy = (torch.arange(ya, yb, dtype=torch.float32, device=box.device) + 0.5 - y0) \
            / (y1 - y0) * 2 - 1
        gx = (torch.arange(xa, xb, dtype=torch.float32, device=box.device) + 0.5 - x0) \
            / (x1 - x0) * 2 - 1
        grid = torch.stack([gx[:, None, :].expand(1, len(gy[0]), len(gx[0])),
                            gy[:, :, None].expand(1, len(gy[0]), len(gx[0]))], dim=3)
        out[d, 0, ya:yb, xa:xb] = F.grid_sample(masks[d:d + 1].float(), grid,
                                                align_corners=False)[0, 0]
    return out


# Mask pasting, by the config key mask_head.mask_paste (tools.transform.ImageTransform's
# mask_paste). An entry is a function
#     paste(masks: Tensor[D, 1, S, S] probabilities, boxes: Tensor[D, 4],
#           img_shape: (h, w), padding: int) -> Tensor[D, 1, h, w]
PASTE_MASKS = {"torchvision": paste_masks_in_image, "detectron2": paste_masks_grid_sample}
