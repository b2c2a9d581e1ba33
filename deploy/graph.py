"""InferenceGraph: a MaskRCNN's own eval-mode forward for one image, as a module an
exporter traces once and runs at any image size.

    graph = InferenceGraph(model)                # a copy; the model is untouched
    boxes, labels, scores, masks = graph(image)  # image: Tensor[3, H, W] RGB in [0, 1]

It runs `model([image])[0]`: the very modules of the model (any variant from the slot
tables, or a model built from hand-made parts), so there is no second implementation to
keep in step. Two things differ from eager, both chosen here:
- every module's `fast_path` is `layers.EXPORT`: norms folded into standard convs (the
  eager CPU path runs oneDNN fused convs and Winograd), so outputs agree up to float
  rounding;
- the modules see `tools.tracing.is_tracing()` and keep sizes as tensors (TorchScript
  tracer) or SymInts (torch.export) where eager would take an int, and skip the input
  validation (the caller passes a float Tensor[3, H, W]).

Shape letters: H/W image size, D detections.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from layers import EXPORT

__all__ = ["InferenceGraph", "OUTPUT_NAMES", "export_copy", "example_image"]

OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")


def example_image(size: tuple[int, int]) -> Tensor:
    """A deterministic example image Tensor[3, H, W] to trace with (its values do not
    shape the graph)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, *size, generator=g)


def export_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose convs run as the exports write them
    (every module's fast_path set to layers.EXPORT)."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if hasattr(module, "fast_path"):
            module.fast_path = EXPORT
    return model.requires_grad_(False)


class InferenceGraph(nn.Module):
    """Export form of a MaskRCNN (eval mode, batch 1, dynamic image size).

    Args:
        model: a MaskRCNN / GeneralizedRCNN (copied: see export_copy).

    forward(image Tensor[3, H, W] float32 RGB in [0, 1]) ->
        boxes Tensor[D, 4] (x1, y1, x2, y2) in image pixels, labels Tensor[D] int64 in
        1..K, scores Tensor[D] float32 (decreasing), masks Tensor[D, 1, H, W] float32
        probabilities (only with a mask branch).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = export_copy(model)
        self.mask_on = bool(self.model.roi_heads.mask_on)
        self.eval()

    def forward(self, image: Tensor):
        detections = self.model([image.to(torch.float32)])[0]
        return tuple(detections[name] for name in OUTPUT_NAMES[:4 if self.mask_on else 3])
