"""The image transform: normalise, resize and pad a batch on the way in; map detections
back to the original images (boxes rescaled, masks pasted) on the way out.

Shape letters: N images, H/W an original image's size, Hr/Wr its resized size, Hp/Wp the
padded batch's size, M GT instances, D detections.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .intmath import float32_ratio, float_pow2, int_divmod, pow2
from .paste import PASTE_MASKS
from .structures import ImageList
from .tracing import is_tracing, resized_size, size_tensor


def resize_boxes(boxes: Tensor, original_size, new_size) -> Tensor:
    """Scale Tensor[M, 4] boxes from original_size (h, w) to new_size (float32 ratios,
    torchvision's arithmetic; sizes may be the tracer's 0-d tensors)."""
    ratio_h, ratio_w = [size_tensor(s, boxes.device).to(torch.float32)
                        / size_tensor(s0, boxes.device).to(torch.float32)
                        for s, s0 in zip(new_size, original_size)]
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


class ImageTransform(nn.Module):
    """Normalise, resize (shorter side to min_size, longer side capped at max_size) and
    pad a batch; targets are resized the same way. `postprocess` maps detections back.

    Args:
        min_size: shorter side at test time; train_min_size: choices at training time.
        max_size: cap on the longer side.
        image_mean, image_std: normalisation, in input_format order and pixel_scale units.
        size_divisible: the padded batch's sides are multiples of this.
        mask_paste_padding: zero border added to masks before pasting (1; torchvision).
        input_format: "RGB" or "BGR", the channel order the weights expect (images are
            always given RGB).
        pixel_scale: 1.0 or 255.0, the pixel range the weights expect (images are
            always given in [0, 1]).
        mask_paste: a name in tools.paste.PASTE_MASKS ("torchvision", "detectron2").
    """

    def __init__(self, min_size: int = 800, max_size: int = 1333,
                 image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225),
                 size_divisible: int = 32, train_min_size=None, mask_paste_padding: int = 1,
                 input_format: str = "RGB", pixel_scale: float = 1.0,
                 mask_paste: str = "torchvision"):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if mask_paste not in PASTE_MASKS:
            raise ValueError(f"mask_paste must be one of {sorted(PASTE_MASKS)}, "
                             f"got {mask_paste!r}")
        self.input_format = input_format
        self.pixel_scale = float(pixel_scale)
        self.mask_paste = mask_paste
        self.min_size = int(min_size)
        self.train_min_size = tuple(train_min_size or (min_size,))
        self.max_size = int(max_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.size_divisible = int(size_divisible)
        self.mask_paste_padding = int(mask_paste_padding)
        # False: postprocess returns each detection's MaskWindow (tools.paste) instead of
        # the [D, 1, H, W] canvas (engine.Predictor: memory bounded by the boxes).
        self.paste_into_image = True

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None
                ) -> tuple[ImageList, Optional[list[dict]]]:
        """
        Args:
            images: per image Tensor[3, H, W] float in [0, 1].
            targets: per image dict(boxes[M, 4], labels[M], masks[M, H, W]) or None;
                not modified (resized copies are returned).
        Returns:
            (ImageList(tensors Tensor[N, 3, Hp, Wp], image_sizes [(Hr, Wr)]), targets).
        """
        resized, new_targets = [], None if targets is None else []
        for i, image in enumerate(images):
            target = None if targets is None else dict(targets[i])
            image, target = self.resize(self.normalize(image), target)
            resized.append(image)
            if new_targets is not None:
                new_targets.append(target)
        return ImageList(self.batch_images(resized), [image_size(img) for img in resized]), \
            new_targets

    def normalize(self, image: Tensor) -> Tensor:
        """RGB [0, 1] -> the weights' channel order and pixel scale, normalised."""
        if self.input_format == "BGR":
            image = image.flip(0)
        if self.pixel_scale != 1.0:
            image = image * self.pixel_scale
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def _choose_min_size(self) -> int:
        if not self.training:
            return self.min_size
        # torchvision's torch_choice: drawn from torch's RNG so seeds reproduce it.
        index = int(torch.empty(1).uniform_(0.0, float(len(self.train_min_size))).item())
        return self.train_min_size[index]

    def resize(self, image: Tensor, target: Optional[dict] = None):
        """Image Tensor[3, H, W] -> Tensor[3, Hr, Wr]; target boxes and masks alike.

        No side drops below 1 pixel: an image more than max_size / min_size times wider
        than high would otherwise vanish (F.interpolate floors each side)."""
        h, w = image.shape[-2:]
        # torchvision's arithmetic: scale_factor with recompute_scale_factor interpolates
        # to floor(side * scale), which resized_size computes (tensors when traced).
        size = dict(size=resized_size(h, w, self._choose_min_size(), self.max_size))
        if is_tracing():
            image = bilinear_resize(image, *size["size"])
        else:
            image = F.interpolate(image[None], mode="bilinear", align_corners=False,
                                  **size)[0]
        if target is None:
            return image, None
        valid = target.get("mask_valid")
        if "masks" in target and valid is not None and not bool(valid.any()):
            # box-only instances: their masks are all zero and no target, nothing to resample
            target["masks"] = torch.zeros((len(target["masks"]), *image.shape[-2:]),
                                          dtype=torch.uint8, device=image.device)
        elif "masks" in target:
            masks = target["masks"][:, None].float()
            target["masks"] = F.interpolate(masks, **size)[:, 0].byte()
        target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        return image, target

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad to a common size, each side rounded up to size_divisible."""
        if len(images) == 1:     # also what a traced forward needs: no int() of a size
            return _pad_to_multiple(images[0][None], self.size_divisible)
        stride = float(self.size_divisible)
        max_h = int(math.ceil(max(img.shape[-2] for img in images) / stride) * stride)
        max_w = int(math.ceil(max(img.shape[-1] for img in images) / stride) * stride)
        batch = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
        for img, slot in zip(images, batch):
            slot[:, :img.shape[-2], :img.shape[-1]].copy_(img)
        return batch

    def postprocess(self, detections: list[dict], image_sizes, original_sizes) -> list[dict]:
        """Boxes back to original pixels; masks [D, 1, S, S] pasted to [D, 1, H, W] (or
        to [MaskWindow] * D when paste_into_image is False)."""
        out = []
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det = dict(det)
            det["boxes"] = resize_boxes(det["boxes"], size, original)
            if "masks" in det:
                det["masks"] = PASTE_MASKS[self.mask_paste](
                    det["masks"], det["boxes"], original, self.mask_paste_padding,
                    crops=not self.paste_into_image)
            out.append(det)
        return out


def _linear_taps(in_size, out_size, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Along one axis of a bilinear resize from in_size to out_size pixels
    (align_corners=False), PyTorch's CPU arithmetic: the float32 scale in / out, source
    coordinate scale * (dst + 0.5) - 0.5 (one rounding) clamped at 0, taps i0 = floor and
    i1 = min(i0 + 1, in - 1), weights 1 - lambda and lambda. -> (i0, i1, w0, w1), each
    Tensor[out_size].

    In integers and exact float32 steps (tools.intmath; in_size below 2^15, out_size up to
    2^13): OpenVINO runs float64 in float32 and its float32 Divide is an ulp off for a
    quarter of the quotients, either of which moved the weights by up to ~1e-4."""
    in_size = size_tensor(in_size, device).reshape(1)
    mantissa, shift = float32_ratio(in_size, size_tensor(out_size, device).reshape(1))
    dst = torch.arange(out_size, dtype=torch.int64, device=device)
    src = _source_coordinates(mantissa, shift, dst).clamp(min=0)
    i0 = torch.minimum(src.to(torch.int64), in_size - 1)      # src >= 0: trunc is floor
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    lam = (src - i0.to(torch.float32)).clamp(0, 1)
    return i0, i1, 1 - lam, lam


def _source_coordinates(mantissa: Tensor, shift: Tensor, dst: Tensor) -> Tensor:
    """float32(scale * (dst + 0.5) - 0.5) rounded once, as the kernel's fused multiply-add
    does, for scale = mantissa * 2^-shift (tools.intmath.float32_ratio, shift in [9, 37])
    and dst < 2^13.

    The exact value is T / 2^(shift + 1), T = mantissa * (2 dst + 1) - 2^shift (39 bits):
    written as hi * 2^15 + lo with integers hi < 2^24 and |lo| < 2^15, both terms are
    exact float32 and their one addition rounds T (fused with a scaling into an FMA, it
    rounds the same)."""
    odd = 2 * dst + 1                                       # < 2^14
    top, low = int_divmod(mantissa, torch.full_like(mantissa, 2 ** 15))
    carry, lo = int_divmod(low * odd, torch.full_like(dst, 2 ** 15))
    hi = top * odd + carry
    # - 2^shift on the side where it is an integer
    big = shift >= 15
    hi = hi - torch.where(big, pow2((shift - 15).clamp(min=0)), torch.zeros_like(shift))
    lo = lo - torch.where(big, torch.zeros_like(shift), pow2(shift.clamp(max=15)))
    return (hi.to(torch.float32) * float_pow2(14 - shift)
            + lo.to(torch.float32) * float_pow2(-1 - shift))


def bilinear_resize(image: Tensor, new_h, new_w) -> Tensor:
    """F.interpolate(image[None], (new_h, new_w), mode="bilinear")[0] for image
    Tensor[C, H, W], as gathers and weighted sums in the order PyTorch's CPU kernel adds
    (along W, then H): what an exported graph computes instead of its Resize op, whose
    coordinate arithmetic differs from PyTorch's by ~1e-4 of a pixel value."""
    x0, x1, wx0, wx1 = _linear_taps(image.shape[-1], new_w, image.device)
    y0, y1, wy0, wy1 = _linear_taps(image.shape[-2], new_h, image.device)
    rows = image.index_select(2, x0) * wx0 + image.index_select(2, x1) * wx1
    return rows.index_select(1, y0) * wy0[:, None] + rows.index_select(1, y1) * wy1[:, None]


def image_size(image: Tensor) -> tuple:
    """(h, w) of an image: ints, or when traced the sizes as 0-d tensors that follow the
    input (an int would freeze the example's size into the graph)."""
    if is_tracing():
        return size_tensor(image.shape[-2]), size_tensor(image.shape[-1])
    return int(image.shape[-2]), int(image.shape[-1])


def _pad_to_multiple(x: Tensor, stride: int) -> Tensor:
    """Zero-pad x Tensor[N, C, h, w] at the bottom and right to multiples of stride, in
    tensor-friendly arithmetic (sizes may be the tracer's tensors or SymInts)."""
    h, w = x.shape[-2], x.shape[-1]
    return F.pad(x, (0, (w + stride - 1) // stride * stride - w,
                     0, (h + stride - 1) // stride * stride - h))
