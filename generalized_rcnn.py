"""The assembled detector: transform -> backbone -> RPN -> RoI heads -> postprocess, with
its input validation. `MaskRCNN` (maskrcnn.py) builds one from a config and weights;
`builder.build_model` from a config; anyone from parts they built.

Shape letters: N images, H/W an original image's size, M GT instances, D detections,
K object classes (background is class 0, objects 1..K).
"""
from __future__ import annotations

from typing import Optional

import torch
from easydict import EasyDict
from torch import Tensor, nn

from tools.transform import image_size
from tools.tracing import is_tracing


class GeneralizedRCNN(nn.Module):
    """Mask R-CNN from its parts.

    Args:
        backbone: images Tensor[N, 3, Hp, Wp] -> [P2..P6] feature maps (ResNetFPN).
        rpn: (ImageList, features, gt boxes) -> (proposals, losses) (proposal.RPN).
        roi_heads: (features P2..P5, proposals, image sizes, targets) -> (detections,
            losses) (heads.RoIHeads).
        transform: normalise / resize / pad in, detections back to the images out
            (tools.transform.ImageTransform).
        cfg: the config the parts were built from (None for hand-built parts); it is
            saved in checkpoints so that the model can be rebuilt.

    Attributes:
        transform, backbone, rpn, roi_heads; cfg; num_classes (K); categories (label ->
        (name, COCO id), or None when unknown).
    """

    def __init__(self, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module,
                 transform: nn.Module, cfg: Optional[EasyDict] = None):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.cfg = cfg
        self.num_classes = roi_heads.box_predictor.cls_score.out_features - 1
        self.categories = None

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None):
        """
        Args:
            images: per image Tensor[3, H, W] float in [0, 1] (sizes may differ).
            targets: per image dict(boxes Tensor[M, 4] float (x1, y1, x2, y2) pixels,
                labels Tensor[M] int64 in 1..K, masks Tensor[M, H, W] uint8/bool (with
                mask_on only), optional mask_valid Tensor[M] bool); required in training
                mode. mask_valid False marks an instance without a mask (box-only
                annotations): it counts for the RPN and box losses, and the mask loss uses
                only the positive RoIs matched to instances with mask_valid True (the
                masks of the others are ignored: all zero will do). Without mask_valid
                every mask is valid.
        Returns:
            training mode: dict(loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask).
            eval mode: per image dict(boxes Tensor[D, 4] original pixels, labels Tensor[D]
                int64, scores Tensor[D], masks Tensor[D, 1, H, W] float probabilities).
            eval mode with targets: (detections, losses), for a validation loss without
                switching to training mode (the losses use the eval-mode proposals).
        Raises:
            ValueError naming the image index and the problem for malformed inputs.
        """
        if self.training and targets is None:
            raise ValueError("targets are required in training mode (or call model.eval())")
        if isinstance(images, (list, tuple)) and not images and not self.training:
            return [] if targets is None else ([], {})
        if not is_tracing():     # an exporter traces one example: nothing to validate
            self._validate(images, targets)
        # float64 / float16 / bfloat16 images run on the weights' dtype.
        dtype = next(p for p in self.parameters() if p.is_floating_point()).dtype
        images = [img.to(dtype) for img in images]
        original_sizes = [image_size(img) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        gt_boxes = None if targets is None else [t["boxes"] for t in targets]
        proposals, rpn_losses = self.rpn(image_list, features, gt_boxes)
        detections, head_losses = self.roi_heads(features[:4], proposals,
                                                 image_list.image_sizes, targets)
        losses = {**rpn_losses, **head_losses}
        if self.training:
            return losses
        detections = self.transform.postprocess(detections, image_list.image_sizes,
                                                original_sizes)
        return detections if targets is None else (detections, losses)

    # ------------------------------------------------------------------ validation

    # Pixel values may overshoot [0, 1] by this much (bicubic resampling, rounding): the
    # check is there to catch 0..255 and mean/std-normalised images, not to clamp.
    _PIXEL_SLACK = 0.1

    def _validate(self, images, targets) -> None:
        """Raise ValueError naming the image (or target) index, the problem and the fix for
        an input the model cannot use. Images: a list (or tuple) of at least one
        Tensor[3, H, W] with H, W >= 1, of any floating dtype (ImageTransform.resize
        converts them to the weights' dtype), on the model's device, finite, in [0, 1]
        (up to _PIXEL_SLACK). Costs one aminmax pass per image and one host sync."""
        if isinstance(images, Tensor):
            fix = ("model([image])" if images.dim() == 3
                   else "list(images), one Tensor[3, H, W] per image")
            raise ValueError(f"images must be a list of Tensor[3, H, W], got a Tensor"
                             f"{list(images.shape)}: pass {fix}")
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of Tensor[3, H, W], got "
                             f"{type(images).__name__}")
        if len(images) == 0:
            raise ValueError("images is empty: training needs at least one Tensor[3, H, W]")
        weight = next(p for p in self.parameters() if p.is_floating_point())
        for i, image in enumerate(images):
            self._validate_image(i, image, weight.device)
        self._validate_pixels(images)
        if targets is None:
            return
        if not isinstance(targets, (list, tuple)):
            raise ValueError(f"targets must be a list of dicts, one per image, got "
                             f"{type(targets).__name__}")
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets: pass one "
                             f"target dict per image (or no targets for detections only)")
        for i, (image, target) in enumerate(zip(images, targets)):
            self._validate_target(i, image, target)

    @staticmethod
    def _validate_image(i: int, image, device: torch.device) -> None:
        """Image i's type, layout, shape, dtype and device (no pass over the pixels)."""
        if not isinstance(image, Tensor):
            raise ValueError(f"image {i}: expected a Tensor[3, H, W] of RGB floats in [0, 1], "
                             f"got {type(image).__name__} (a PIL image or an HWC array: "
                             f"torchvision.transforms.functional.to_tensor converts it)")
        if image.layout != torch.strided:
            raise ValueError(f"image {i}: a {image.layout} tensor, expected a dense one: "
                             f"pass image.to_dense()")
        shape = tuple(image.shape)
        if image.dim() != 3:
            hint = {2: ": one channel? pass image.expand(3, -1, -1)",
                    4: ": a batch? pass list(batch), one Tensor[3, H, W] per image"}
            raise ValueError(f"image {i}: expected a 3-D Tensor[3, H, W], got shape {shape}"
                             f"{hint.get(image.dim(), '')}")
        if shape[0] != 3:
            hint = ("channels last? pass image.permute(2, 0, 1)" if shape[2] == 3
                    else "grayscale? pass image.expand(3, -1, -1)" if shape[0] == 1
                    else "RGBA? drop the alpha channel with image[:3]" if shape[0] == 4
                    else "pass RGB images")
            raise ValueError(f"image {i}: expected 3 channels (RGB), got shape {shape}: "
                             f"{hint}")
        if shape[1] == 0 or shape[2] == 0:
            raise ValueError(f"image {i}: empty, shape {shape}: height and width must be at "
                             f"least 1 pixel")
        if not image.is_floating_point():
            hint = ("pass image.float() / 255" if image.dtype == torch.uint8
                    else "pass real-valued images" if image.is_complex()
                    else "pass image.float() (divided by 255 if the values are 0..255)")
            raise ValueError(f"image {i}: expected RGB floats in [0, 1], got {image.dtype}: "
                             f"{hint}")
        if image.device != device:
            raise ValueError(f"image {i}: on {image.device} but the model is on {device}: "
                             f"move it with image.to('{device}')")

    def _validate_pixels(self, images) -> None:
        """Finite values in [0, 1] (up to _PIXEL_SLACK): one aminmax pass per image (it
        propagates NaN) and a single host sync for the batch."""
        slack = self._PIXEL_SLACK
        ranges = torch.stack([torch.stack(torch.aminmax(image)).float() for image in images])
        for i, (lo, hi) in enumerate(ranges.tolist()):
            if not (lo >= -slack and hi <= 1 + slack):        # also true for NaN
                self._pixel_error(i, images[i])

    def _pixel_error(self, i: int, image: Tensor) -> None:
        """The ValueError for image i's values (the slow path: counts on the original)."""
        nan, inf = int(image.isnan().sum()), int(image.isinf().sum())
        if nan or inf:
            found = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite"))
                                 if n)
            raise ValueError(f"image {i}: {found} values out of {image.numel()}, expected RGB "
                             f"floats in [0, 1]: check how the image was loaded or "
                             f"preprocessed")
        lo, hi = (float(v) for v in torch.aminmax(image))
        hint = ("mean/std-normalised? pass the image before normalisation, the model "
                "normalises by itself" if lo < -self._PIXEL_SLACK
                else "0..255 pixels? divide by 255")
        raise ValueError(f"image {i}: values span [{lo:.4g}, {hi:.4g}], expected RGB floats "
                         f"in [0, 1]: {hint}")

    def _validate_target(self, i: int, image: Tensor, target: dict) -> None:
        """Target i's types, devices, shapes and values against image i (validated).
        masks are required with mask_on only; the optional mask_valid (a bool Tensor[M],
        False: instance without a mask, excluded from the mask loss) is checked when given,
        and a target without it has all its masks valid."""
        needed = ("boxes", "labels", "masks") if self.roi_heads.mask_on else ("boxes", "labels")
        if not isinstance(target, dict):
            raise ValueError(f"target {i}: expected a dict with {list(needed)}, got "
                             f"{type(target).__name__}")
        missing = [k for k in needed if k not in target]
        if missing:
            raise ValueError(f"target {i}: missing {missing}")
        mask_valid = target.get("mask_valid")
        for key in needed + (("mask_valid",) if mask_valid is not None else ()):
            if not isinstance(target[key], Tensor):
                raise ValueError(f"target {i}: {key} must be a Tensor, got "
                                 f"{type(target[key]).__name__}")
            if target[key].device != image.device:
                raise ValueError(f"target {i}: {key} on {target[key].device} but image {i} is "
                                 f"on {image.device}: move it with .to('{image.device}')")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"target {i}: boxes must be a float Tensor[M, 4], got "
                             f"{tuple(boxes.shape)} {boxes.dtype} (no objects: "
                             f"torch.zeros(0, 4))")
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"target {i}: labels must be an int64 Tensor[M], got "
                             f"{tuple(labels.shape)} {labels.dtype}")
        masks = target["masks"] if "masks" in needed else None
        if masks is not None and (masks.dim() != 3
                                  or tuple(masks.shape[-2:]) != tuple(image.shape[-2:])):
            raise ValueError(f"target {i}: masks must be Tensor[M, {image.shape[-2]}, "
                             f"{image.shape[-1]}] (the image size), got "
                             f"{tuple(masks.shape)}")
        if mask_valid is not None and (mask_valid.dim() != 1
                                       or mask_valid.dtype != torch.bool):
            raise ValueError(f"target {i}: mask_valid must be a bool Tensor[M] (False: the "
                             f"instance has no mask), got {tuple(mask_valid.shape)} "
                             f"{mask_valid.dtype}")
        counts = {"boxes": len(boxes), "labels": len(labels)}
        if masks is not None:
            counts["masks"] = len(masks)
        if mask_valid is not None:
            counts["mask_valid"] = len(mask_valid)
        if len(set(counts.values())) != 1:
            raise ValueError(f"target {i}: count mismatch {counts}")
        finite = torch.isfinite(boxes).all(1)
        empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        bad = torch.where(~finite | empty)[0]
        if len(bad):
            j = int(bad[0])
            problem = ("is not finite" if not finite[j]
                       else "has x2 <= x1 or y2 <= y1 (boxes are x1, y1, x2, y2)")
            raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} {problem}")
        if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(f"target {i}: labels must be in 1..{self.num_classes} (0 is "
                             f"background), got {labels.tolist()}")
        if masks is not None and masks.is_complex():
            raise ValueError(f"target {i}: masks must be 0/1 (uint8 or bool), got "
                             f"{masks.dtype}")
        if masks is not None and masks.numel() and masks.dtype != torch.bool:
            lo, hi = (float(v) for v in torch.aminmax(masks))
            if not (lo >= 0 and hi <= 1):
                raise ValueError(f"target {i}: masks must be 0/1 (uint8 or bool), got "
                                 f"values in [{lo:g}, {hi:g}]: pass masks > 0")
