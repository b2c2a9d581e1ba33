"""The fused inference path (backbones/fused.py) against the unfused modules (oracle:
torch's own conv + norm layers, and the trunk's training-style forward)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backbones.fused as fused
from backbones import FrozenBatchNorm2d, build_resnet_fpn_backbone
from backbones.fused import fold_conv_norm, norm_scale_shift

torch.set_num_threads(2)


def _randomise(module, seed=0):
    """Non-trivial norm statistics, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = m.running_var.shape[0]
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.2)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _rel_close(a, b, rtol=1e-5, what=""):
    scale = b.abs().max().clamp(min=1.0)
    diff = ((a - b).abs().max() / scale).item()
    assert diff <= rtol, f"{what}: relative diff {diff} > {rtol}"


@pytest.mark.parametrize("norm_cls", [FrozenBatchNorm2d, nn.BatchNorm2d])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_folded_conv_equals_conv_then_norm(norm_cls, conv_bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=conv_bias)
    norm = norm_cls(16)
    _randomise(norm)
    norm.eval()
    x = torch.randn(2, 8, 17, 19)
    with torch.no_grad():
        expected = norm(conv(x))
        f = fold_conv_norm(conv, norm)
        got = F.conv2d(x, f.weight, f.bias, f.stride, f.padding, f.dilation, f.groups)
    _rel_close(got, expected, 1e-5, "folded conv")


def test_norm_scale_shift_matches_hand_computed_values():
    norm = FrozenBatchNorm2d(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 1.0]))
        norm.bias.copy_(torch.tensor([1.0, -1.0]))
        norm.running_mean.copy_(torch.tensor([3.0, 0.5]))
        norm.running_var.copy_(torch.tensor([4.0, 0.25]))
    scale, shift = norm_scale_shift(norm)
    # scale = w / sqrt(var), shift = b - mean * scale
    assert scale.tolist() == [1.0, 2.0] and shift.tolist() == [-2.0, -2.0]
    with pytest.raises(TypeError, match="GroupNorm"):
        norm_scale_shift(nn.GroupNorm(1, 2))


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "conv2d"])
@pytest.mark.parametrize("depth,norm", [(18, "frozen_bn"), (50, "frozen_bn"), (50, "bn")])
def test_fused_trunk_equals_unfused(depth, norm, onednn, monkeypatch):
    torch.manual_seed(depth)
    backbone = build_resnet_fpn_backbone(depth=depth, norm=norm).eval()
    _randomise(backbone)
    if not onednn:
        monkeypatch.setattr(fused, "use_onednn", lambda x: False)
    x = torch.randn(2, 3, 96, 128)
    trunk = backbone.body
    with torch.no_grad():
        assert trunk.uses_fused_path()
        got = backbone(x)
        trunk.fuse_inference = False
        assert not trunk.uses_fused_path()
        expected = backbone(x)
    assert len(got) == 5
    for level, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape
        _rel_close(a, b, 1e-5, f"P{level + 2}")


def test_fused_weights_follow_weight_changes():
    torch.manual_seed(0)
    backbone = build_resnet_fpn_backbone(depth=18).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        backbone(x)
        backbone.body.layer3[0].bn1.weight.mul_(3.0)  # in place: no stale folded weights
        backbone.body.layer4[1].conv2.weight.add_(0.01)
        got = backbone(x)
        backbone.body.fuse_inference = False
        expected = backbone(x)
    for a, b in zip(got, expected):
        _rel_close(a, b, 1e-5, "after in-place weight changes")


def test_training_and_grad_use_the_unfused_modules():
    torch.manual_seed(0)
    backbone = build_resnet_fpn_backbone(depth=18, norm="bn")
    x = torch.randn(2, 3, 64, 64)
    backbone.train()
    assert not backbone.body.uses_fused_path()
    backbone(x)[0].sum().backward()
    assert backbone.body.layer4[0].conv1.weight.grad is not None
    backbone.eval()
    assert not backbone.body.uses_fused_path()      # grad enabled: gradients must flow
    with torch.no_grad():
        assert backbone.body.uses_fused_path()
    gn = build_resnet_fpn_backbone(depth=18, norm="gn").eval()
    with torch.no_grad():
        assert not gn.body.uses_fused_path()          # GroupNorm cannot be folded
        assert len(gn(x)) == 5


@pytest.mark.parametrize("depth,trainable", [(18, 3), (50, 3), (18, 5), (18, 0)])
def test_training_forward_and_grads_equal_unfused(depth, trainable):
    """Frozen-BatchNorm training: frozen stages run without autograd, trainable ones fold
    the norms in-graph; outputs and weight gradients equal the plain modules'."""
    torch.manual_seed(depth)
    backbone = build_resnet_fpn_backbone(depth=depth, trainable_layers=trainable).train()
    _randomise(backbone)
    x = torch.randn(2, 3, 64, 96)
    results = []
    for fuse in (True, False):
        backbone.zero_grad(set_to_none=True)
        backbone.body.fuse_inference = fuse
        out = backbone(x)
        sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in out) \
            .backward()
        grads = {n: p.grad.clone() for n, p in backbone.named_parameters()
                 if p.grad is not None}
        results.append(([o.detach() for o in out], grads))
    (out_f, grads_f), (out_u, grads_u) = results
    for a, b in zip(out_f, out_u):
        _rel_close(a, b, 1e-5, "training forward")
    assert grads_f.keys() == grads_u.keys()
    assert any(n.startswith("body.") for n in grads_u) == (trainable > 0)
    for name in grads_u:
        _rel_close(grads_f[name], grads_u[name], 1e-4, f"grad {name}")


def test_config_key_fuse_bn_switches_the_fused_paths():
    from maskrcnn import MaskRCNN
    on = MaskRCNN(num_classes=2, backbone="resnet18").eval()
    off = MaskRCNN(num_classes=2, backbone="resnet18", fuse_bn=False).eval()
    with torch.no_grad():
        assert on.backbone.body.uses_fused_path()
        assert not off.backbone.body.uses_fused_path()


def test_fpn_and_mask_head_fast_path_equal_plain_modules(monkeypatch):
    """FPN (lateral conv + top-down add in one call) and mask head (conv + ReLU) on the
    oneDNN fast path against the same modules run plainly."""
    from heads import MaskHead, MaskPredictor
    torch.manual_seed(0)
    backbone = build_resnet_fpn_backbone(depth=18).eval()
    head, predictor = MaskHead(16, (16, 16)), MaskPredictor(16, 8, 4)
    x = torch.randn(1, 3, 96, 128)
    rois = torch.randn(5, 16, 14, 14)
    with torch.no_grad():
        c = backbone.body(x)
        got = backbone.fpn(c), predictor(head(rois))
        monkeypatch.setattr(fused, "HEADS_FAST_PATH", False)
        expected = backbone.fpn(c), predictor(head(rois))
    for a, b in zip(got[0], expected[0]):
        _rel_close(a, b, 1e-5, "FPN")
    assert got[1].shape == (5, 4, 28, 28)
    _rel_close(got[1], expected[1], 1e-5, "mask logits")
