"""RPN head: objectness logits and box deltas at every anchor.

Shape letters: N images, C channels, H_l/W_l level l's size, A anchors per location.
"""
from __future__ import annotations

from torch import Tensor, nn

from layers import FastPath, conv2d


class RPNHead(nn.Module):
    """3x3 conv + ReLU layers shared by all levels, then 1x1 convs to A logits and 4A
    deltas.

    Args:
        in_channels: C of the features (256 for the FPN).
        num_anchors: A, anchors per location (3: one size x three ratios).
        num_convs: 3x3 conv + ReLU layers (1 classic; 2 in torchvision v2 and detectron2's
            LSJ models).
        fast_path: how the shared convs run (layers.FastPath).
    """

    def __init__(self, in_channels: int = 256, num_anchors: int = 3, num_convs: int = 1,
                 fast_path: FastPath = FastPath()):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"the RPN head needs at least one conv, got num_convs={num_convs}")
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
                                   for _ in range(num_convs))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        self.fast_path = fast_path
        for conv in (*self.convs, self.cls_logits, self.bbox_pred):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            features: per level Tensor[N, C, H_l, W_l].
        Returns:
            (pred_objectness, pred_deltas): per level Tensor[N, A, H_l, W_l] logits and
            Tensor[N, 4A, H_l, W_l] deltas, channel a * 4 + k for anchor a, coordinate k.
        """
        objectness, deltas = [], []
        for feature in features:
            t = feature
            for conv in self.convs:
                t = conv2d(t, conv, relu=True, fast_path=self.fast_path)
            objectness.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return objectness, deltas


# The RPN head, by the config key rpn.rpn_head. builder.py calls an entry with
#     in_channels: int (FPN channels C), num_anchors: int (A per location),
#     num_convs: int (rpn_head_convs), fast_path: layers.FastPath
# and the module maps features list[Tensor[N, C, H_l, W_l]] (P2..P6) -> (objectness
# list[Tensor[N, A, H_l, W_l]], deltas list[Tensor[N, 4A, H_l, W_l]]).
RPN_HEADS = {"standard": RPNHead}
