"""Backbones: ResNet / ResNeXt trunks and the FPN."""
from .fpn import FPN, FPNS
from .resnet import (TRUNKS, ResNetTrunk, imagenet_weight_files, imagenet_weights_path,
                     load_imagenet_weights, load_pretrained_trunk, resnet_out_channels)
from .resnet_fpn import ResNetFPN, build_resnet_fpn_backbone

__all__ = ["FPN", "FPNS", "TRUNKS", "ResNetTrunk", "ResNetFPN", "build_resnet_fpn_backbone",
           "load_pretrained_trunk", "resnet_out_channels", "imagenet_weight_files", "imagenet_weights_path",
           "load_imagenet_weights"]
