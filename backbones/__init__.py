"""Backbones: ResNet trunks, FrozenBatchNorm2d, FPN."""
from .fpn import FPN
from .norm import FrozenBatchNorm2d, norm_layer_factory
from .resnet import (ResNetTrunk, imagenet_weight_files, imagenet_weights_path,
                     load_imagenet_weights, resnet_out_channels)
from .resnet_fpn import (ResNetFPN, build_resnet_fpn_backbone,
                         convert_torchvision_backbone_state_dict,
                         load_torchvision_backbone_state)

__all__ = ["FPN", "FrozenBatchNorm2d", "norm_layer_factory", "ResNetTrunk", "ResNetFPN",
           "build_resnet_fpn_backbone", "resnet_out_channels", "imagenet_weight_files",
           "imagenet_weights_path", "load_imagenet_weights",
           "convert_torchvision_backbone_state_dict", "load_torchvision_backbone_state"]
