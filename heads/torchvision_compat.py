"""Map torchvision RoIHeads weights onto ours (keys relative to `roi_heads.`).

    box_head.fc6.*, box_head.fc7.*      -> the same (TwoMLPHead, v1)
    box_head.{j}.0.weight                -> box_head.convs.{j}.weight  (FastRCNNConvFCHead, v2:
    box_head.{j}.1.*                     -> box_head.norms.{j}.*        Conv2dNormActivation
    box_head.{N + 1}.*                   -> box_head.fc6.*              blocks, Flatten, Linear)
    box_predictor.*, mask_head.*, mask_predictor.* -> the same (mask head blocks are
                                            (conv, [norm,] relu) Sequentials on both sides)
"""
from __future__ import annotations

import re

from torch import Tensor, nn

_HEADS = ("box_head", "box_predictor", "mask_head", "mask_predictor")


def convert_torchvision_roi_heads_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision RoIHeads state dict (keys relative to `roi_heads.`) to ours."""
    conv_blocks = {int(m.group(1)) for k in tv_state
                   if (m := re.match(r"box_head\.(\d+)\.0\.weight$", k))}
    out = {}
    for key, value in tv_state.items():
        if key.split(".")[0] not in _HEADS:
            continue
        match = re.match(r"box_head\.(\d+)\.(?:(\d)\.)?(\w+)$", key)
        if match:
            block, part, name = int(match.group(1)), match.group(2), match.group(3)
            if block in conv_blocks:
                key = f"box_head.{'convs' if part == '0' else 'norms'}.{block}.{name}"
            else:
                key = f"box_head.fc6.{name}"     # the Linear after Flatten
        out[key] = value
    return out


def load_torchvision_roi_heads_state(roi_heads: nn.Module, tv_roi_heads: nn.Module | dict) -> None:
    """Copy torchvision RoIHeads weights (module or its state_dict) into ours, strictly."""
    state = tv_roi_heads.state_dict() if isinstance(tv_roi_heads, nn.Module) else tv_roi_heads
    roi_heads.load_state_dict(convert_torchvision_roi_heads_state_dict(state), strict=True)
