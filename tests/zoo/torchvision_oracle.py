"""torchvision's Mask R-CNN as a test oracle: random weights calibrated so that they make
real detections (varied labels, spread-out scores) on small images."""
import torch
from torchvision.models.detection import MaskRCNN as TvMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBN


def calibrate(tv, image):
    """Random weights give near-constant class scores; set the class biases from the
    logits on one image so the classes compete (varied labels, spread-out scores) and
    the RPN bias so the proposals pass its thresholds."""
    with torch.no_grad():
        tv.rpn.head.cls_logits.bias.fill_(1.0)
        images, _ = tv.transform([image])
        features = tv.backbone(images.tensors)
        # Objectness logits with std 1, so proposal scores are not near-ties (whose
        # order would be decided by rounding).
        head = tv.rpn.head
        objectness = torch.cat([head.cls_logits(head.conv(f)).flatten()
                                for f in features.values()])
        head.cls_logits.weight.div_((objectness - head.cls_logits.bias[0]).std())
        proposals, _ = tv.rpn(images, features)
        pooled = tv.roi_heads.box_roi_pool(features, proposals, images.image_sizes)
        logits, _ = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
        predictor = tv.roi_heads.box_predictor.cls_score
        scale = 1.5 / logits.std(0).mean()
        predictor.weight.mul_(scale)
        predictor.bias.mul_(scale).sub_(logits.mean(0) * scale)
        predictor.bias[1:] += 1.0
    return tv


def damp_residual_blocks(backbone):
    """Residual blocks with identity BatchNorm grow the features block after block (to
    ~250 in ResNet-50); float rounding (ours runs BatchNorm folded into the convs) is
    then amplified far beyond what trained weights show. Trained ResNets have small
    last-BatchNorm scales: use 0.2 (features stay O(1))."""
    with torch.no_grad():
        for block in backbone.body.modules():
            if isinstance(block, Bottleneck):
                block.bn3.weight.fill_(0.2)


def coco_v1_like(image, seed=0, **tv_kwargs):
    """torchvision's R50-FPN v1 as its COCO weights run (frozen BatchNorm with eps 0, 91
    classes), random weights damped and calibrated on `image`, eval mode."""
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=TvFrozenBN, trainable_layers=3)
    for module in backbone.modules():
        if isinstance(module, TvFrozenBN):
            module.eps = 0.0
    damp_residual_blocks(backbone)
    return calibrate(TvMaskRCNN(backbone, num_classes=91, **tv_kwargs).eval(), image)


def coco_v2_like(images, seed=0, logit_std=3.0, **tv_kwargs):
    """torchvision's maskrcnn_resnet50_fpn_v2 (BatchNorm in the trunk, FPN, RPN, box and
    mask heads; 91 classes) with random weights: every BatchNorm's statistics measured on
    `images` (list of Tensor[3, H, W]), the class and mask logits scaled to std
    `logit_std`, eval mode. The issue's export case: min_size=512, max_size=704, logit_std 3."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
    torch.manual_seed(seed)
    tv = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91,
                                  **tv_kwargs)
    for norm in tv.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.reset_running_stats()
            norm.momentum = None              # the plain average over the batches seen
    with torch.no_grad():
        tv.eval()
        batch, _ = tv.transform(images)
        tv.backbone.train()
        tv.backbone(batch.tensors)            # the trunk's and FPN's statistics
        tv.eval()
        features = tv.backbone(batch.tensors)
        proposals, _ = tv.rpn(batch, features)
        heads = tv.roi_heads
        heads.train()                         # the heads' statistics, on real proposals
        heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        heads.mask_head(heads.mask_roi_pool(features, proposals, batch.image_sizes))
        tv.eval()
        pooled = heads.box_roi_pool(features, proposals, batch.image_sizes)
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        scale = logit_std / logits.std()
        heads.box_predictor.cls_score.weight.mul_(scale)
        heads.box_predictor.cls_score.bias.mul_(scale)
        # Mask logits of std logit_std too: random heads give logits of 1e2..1e3, whose
        # rounding (1e-4 relative) would decide pixels near the 0.5 boundary.
        pooled = heads.mask_roi_pool(features, proposals, batch.image_sizes)
        mask_logits = heads.mask_predictor(heads.mask_head(pooled))
        last = heads.mask_predictor.mask_fcn_logits
        scale = logit_std / mask_logits.std()
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return tv
