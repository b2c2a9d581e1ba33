"""Map torchvision RegionProposalNetwork weights onto ours.

torchvision (>= 0.13) -> ours (keys relative to the RPN module, e.g. `rpn.`):
    head.conv.0.0.{weight,bias}  -> head.conv.{weight,bias}   (older: head.conv.*)
    head.cls_logits.*            -> head.cls_logits.*
    head.bbox_pred.*             -> head.bbox_pred.*
The anchor generator has no weights; build ours with the same sizes / ratios.
"""
from __future__ import annotations

import re

from torch import Tensor, nn


def convert_torchvision_rpn_state_dict(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision RPN state dict (keys relative to `rpn.`) to ours."""
    return {re.sub(r"^head\.conv\.0\.0\.", "head.conv.", k): v for k, v in tv_state.items()}


def load_torchvision_rpn_state(rpn: nn.Module, tv_rpn: nn.Module | dict) -> None:
    """Copy torchvision RPN weights (module, e.g. `tv_model.rpn`, or its state_dict) into
    ours, strictly."""
    state = tv_rpn.state_dict() if isinstance(tv_rpn, nn.Module) else tv_rpn
    rpn.load_state_dict(convert_torchvision_rpn_state_dict(state), strict=True)
