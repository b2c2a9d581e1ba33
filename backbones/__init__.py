"""Backbones: ResNet / ResNeXt trunks and the FPN."""
from .fpn import FPN
from .resnet import (ResNetTrunk, imagenet_weight_files, imagenet_weights_path,
                     load_imagenet_weights, resnet_out_channels)
from .resnet_fpn import ResNetFPN, build_resnet_fpn_backbone

__all__ = ["FPN", "ResNetTrunk", "ResNetFPN", "build_resnet_fpn_backbone",
           "resnet_out_channels", "imagenet_weight_files", "imagenet_weights_path",
           "load_imagenet_weights"]
