"""Checkpoint conversion: other frameworks' Mask R-CNN weights in our parameter names.

    torchvision.py   torchvision's MaskRCNN (v1, v2): hyper-parameters and weights
    detectron2.py    detectron2's model-zoo .pkl and training .pth state dicts
    pretrained.py    any supported checkpoint: format detected from the content, read
                     without running code, fitted to a model and loaded
"""
