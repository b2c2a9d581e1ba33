"""Map torchvision RegionProposalNetwork weights onto ours.

torchvision (>= 0.13) -> ours (keys relative to the RPN module, e.g. `rpn.`):
    head.conv.{j}.0.{weight,bias} -> head.convs.{j}.{weight,bias}  (v1 has j = 0, v2 0, 1;
                                                                     older: head.conv.*)
    head.cls_logits.*            -> head.cls_logits.*
    head.bbox_pred.*             -> head.bbox_pred.*
The anchor generator has no weights; build ours with the same sizes / ratios.
"""
from __future__ import annotations

import re

from torch import Tensor, nn


def convert_torchvision_rpn_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision RPN state dict (keys relative to `rpn.`) to ours."""
    out = {}
    for key, value in tv_state.items():
        key = re.sub(r"^head\.conv\.(\d+)\.0\.", r"head.convs.\1.", key)
        out[re.sub(r"^head\.conv\.(weight|bias)$", r"head.convs.0.\1", key)] = value
    return out


def load_torchvision_rpn_state(rpn: nn.Module, tv_rpn: nn.Module | dict) -> None:
    """Copy torchvision RPN weights (module, e.g. `tv_model.rpn`, or its state_dict) into
    ours, strictly."""
    state = tv_rpn.state_dict() if isinstance(tv_rpn, nn.Module) else tv_rpn
    rpn.load_state_dict(convert_torchvision_rpn_state_dict(state), strict=True)
