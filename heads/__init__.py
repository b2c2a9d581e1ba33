"""RoI heads: box and mask branches, their targets, losses and inference."""
from .box_head import (BOX_HEADS, BOX_PREDICTORS, BoxPredictor, ConvFCHead, TwoMLPHead,
                       box_inference, build_box_head, fastrcnn_loss)
from .mask_head import (MASK_HEADS, MASK_PREDICTORS, PASTE_MASKS, MaskHead, MaskPredictor,
                        mask_inference, mask_loss,
                        mask_target_labels, paste_masks_grid_sample,
                        paste_masks_in_image, project_masks_on_boxes)
from .roi_heads import RoIHeads
from .targets import RoITargets, assign_targets, select_training_samples

__all__ = ["RoIHeads", "TwoMLPHead", "ConvFCHead", "build_box_head", "PASTE_MASKS",
           "BOX_HEADS", "BOX_PREDICTORS", "MASK_HEADS", "MASK_PREDICTORS",
           "paste_masks_grid_sample", "BoxPredictor", "MaskHead", "MaskPredictor",
           "fastrcnn_loss", "box_inference", "mask_loss",
           "mask_target_labels", "mask_inference",
           "paste_masks_in_image", "project_masks_on_boxes", "RoITargets",
           "assign_targets", "select_training_samples"]
