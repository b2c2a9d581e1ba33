"""Layers shared by the trunk, the FPN and the heads: norms and the fast conv path."""
from .conv import EXACT, EXPORT, FastPath, conv2d
from .norm import FrozenBatchNorm2d, norm_layer_factory, optional_norm_layer

__all__ = ["EXACT", "EXPORT", "FastPath", "conv2d", "FrozenBatchNorm2d", "norm_layer_factory",
           "optional_norm_layer"]
