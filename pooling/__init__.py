"""RoIAlign modules: single feature map and multi-level (FPN).

    from pooling import RoIAlign, MultiScaleRoIAlign
"""
from .multiscale import LEVEL_RULES, ROI_POOLERS, MultiScaleRoIAlign, level_scales, map_levels
from .roi_align import RoIAlign

__all__ = ["RoIAlign", "MultiScaleRoIAlign", "level_scales", "map_levels", "LEVEL_RULES",
           "ROI_POOLERS"]
