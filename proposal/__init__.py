"""Proposals: anchors, the RPN head, proposal selection, RPN targets and losses."""
from .anchors import AnchorGenerator
from .head import RPN_HEADS, RPNHead
from .rpn import (RPN, anchor_labels, flatten_predictions, match_anchors, rpn_loss,
                  select_proposals)

__all__ = ["AnchorGenerator", "RPNHead", "RPN_HEADS", "RPN", "flatten_predictions", "select_proposals",
           "match_anchors", "anchor_labels", "rpn_loss"]
