"""The fused inference path (layers/conv.py, backbones/fused_trunk.py) against the unfused modules (oracle:
torch's own conv + norm layers, and the trunk's training-style forward)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backbones.fused_trunk as fused_trunk
import layers.conv as fused
from backbones import build_resnet_fpn_backbone
from layers import EXACT, FastPath, FrozenBatchNorm2d
from layers.conv import fold_conv_norm, norm_scale_shift

# Folding and oneDNN fusing without Winograd: what the folding tests compare.
FOLDED = FastPath(fuse_bn=True, winograd=False)

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
    backbone = build_resnet_fpn_backbone(depth=depth, norm=norm, fast_path=FOLDED).eval()
    _randomise(backbone)
    if not onednn:
        monkeypatch.setattr(fused, "use_onednn", lambda x: False)
        monkeypatch.setattr(fused_trunk, "use_onednn", lambda x: False)
    x = torch.randn(2, 3, 96, 128)
    trunk = backbone.body
    with torch.no_grad():
        assert trunk.uses_fused_path()
        got = backbone(x)
        trunk.fast_path = EXACT
        assert not trunk.uses_fused_path()
        expected = backbone(x)
    assert len(got) == 5
    for level, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape
        _rel_close(a, b, 1e-5, f"P{level + 2}")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_overwrite_residual_gives_the_same_map_in_the_residual(seed):
    """conv_act(overwrite_residual=True) (oneDNN's in-place sum) against the new-map
    call and against F.conv2d + add + ReLU; with a gradient needed the residual is left
    alone."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    groups = pick([1, 1, 4])
    c_in, c_out = groups * pick([4, 8, 16]), groups * pick([8, 16])
    kernel, stride, relu = pick([1, 3]), pick([1, 2]), pick([True, False])
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups,
                     bias=False)
    norm = FrozenBatchNorm2d(c_out)
    _randomise(norm, seed)
    x = torch.randn(2, c_in, int(torch.randint(5, 30, (1,), generator=g)),
                    int(torch.randint(5, 30, (1,), generator=g)), generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        folded = fold_conv_norm(conv, norm)
        plain = norm(conv(x))
        residual = torch.randn(plain.shape, generator=g).contiguous(
            memory_format=torch.channels_last)
        oracle = plain + residual
        oracle = oracle.relu() if relu else oracle
        new_map = fused.conv_act(x, folded, relu, residual)
        kept = residual.clone()
        got = fused.conv_act(x, folded, relu, residual, overwrite_residual=True)
    what = f"seed {seed}: groups {groups}, {c_in}->{c_out}, k{kernel} s{stride} relu {relu}"
    # The sum post-op may add the bias and the residual in another order than the binary
    # post-op: two roundings, each at most half an ulp of the largest partial sum.
    bound = torch.finfo(torch.float32).eps * (plain.abs() + kept.abs()).max()
    assert (got - new_map).abs().max() <= bound, what
    assert got.data_ptr() == residual.data_ptr(), f"{what}: not written in place"
    _rel_close(got, oracle, 1e-5, what)
    before = kept.clone()
    y = fused.conv_act(x, fold_conv_norm(conv, norm, detach=False), relu, kept,
                       overwrite_residual=True)
    assert y.requires_grad and torch.equal(kept, before), f"{what}: residual changed"


@pytest.mark.parametrize("depth", [18, 50])
def test_in_place_residuals_leave_the_returned_stages_intact(depth):
    """Blocks add into their input in place after the first of each stage: C2..C5 (the
    stages the trunk returns) must still be what the unfused trunk computes."""
    torch.manual_seed(depth)
    backbone = build_resnet_fpn_backbone(depth=depth, fast_path=FOLDED).eval()
    _randomise(backbone, depth)
    trunk = backbone.body
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        got = fused_trunk.fused_trunk_forward(trunk, x)
        trunk.fast_path = EXACT
        expected = trunk(x)
    for level, (a, b) in enumerate(zip(got, expected, strict=True)):
        _rel_close(a, b, 1e-5, f"depth {depth} C{level + 2}")


def test_fused_weights_follow_weight_changes():
    torch.manual_seed(0)
    backbone = build_resnet_fpn_backbone(depth=18, fast_path=FOLDED).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        backbone(x)
        backbone.body.layer3[0].bn1.weight.mul_(3.0)  # in place: no stale folded weights
        backbone.body.layer4[1].conv2.weight.add_(0.01)
        got = backbone(x)
        backbone.body.fast_path = EXACT
        expected = backbone(x)
    for a, b in zip(got, expected):
        _rel_close(a, b, 1e-5, "after in-place weight changes")


def test_training_and_grad_use_the_unfused_modules():
    torch.manual_seed(0)
    backbone = build_resnet_fpn_backbone(depth=18, norm="bn", fast_path=FOLDED)
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
    backbone = build_resnet_fpn_backbone(depth=depth, trainable_layers=trainable,
                                         fast_path=FOLDED).train()
    _randomise(backbone)
    x = torch.randn(2, 3, 64, 96)
    results = []
    for fuse in (True, False):
        backbone.zero_grad(set_to_none=True)
        backbone.body.fast_path = FOLDED if fuse else EXACT
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
    backbone = build_resnet_fpn_backbone(depth=18, fast_path=FOLDED).eval()
    head = MaskHead(16, (16, 16), fast_path=FOLDED)
    predictor = MaskPredictor(16, 8, 4, fast_path=FOLDED)
    x = torch.randn(1, 3, 96, 128)
    rois = torch.randn(5, 16, 14, 14)
    with torch.no_grad():
        c = backbone.body(x)
        got = backbone.fpn(c), predictor(head(rois))
        backbone.fpn.fast_path = head.fast_path = predictor.fast_path = EXACT
        expected = backbone.fpn(c), predictor(head(rois))
    for a, b in zip(got[0], expected[0]):
        _rel_close(a, b, 1e-5, "FPN")
    assert got[1].shape == (5, 4, 28, 28)
    _rel_close(got[1], expected[1], 1e-5, "mask logits")


# ----------------------------------------------------------------------------- Winograd

def _count_winograd(monkeypatch):
    """Counts conv3x3_winograd calls made through layers.conv."""
    calls = []
    real = fused.kernel_ops.conv3x3_winograd

    def counting(*args):
        calls.append(tuple(args[1].shape))
        return real(*args)
    monkeypatch.setattr(fused.kernel_ops, "conv3x3_winograd", counting)
    return calls


def _set_winograd(module, on):
    for m in module.modules():
        if hasattr(m, "fast_path"):
            m.fast_path = FastPath(fuse_bn=m.fast_path.fuse_bn, winograd=on)


def test_winograd_applies_only_to_3x3_stride1_pad1_convs():
    x = torch.randn(1, 16, 48, 48)
    def conv(**kw):
        return fold_conv_norm(nn.Conv2d(16, 16, **{"kernel_size": 3, "padding": 1, **kw}),
                              detach=False)
    assert fused.winograd_applies(x, conv())
    assert not fused.winograd_applies(x, conv(stride=2))
    assert not fused.winograd_applies(x, conv(kernel_size=1, padding=0))
    assert not fused.winograd_applies(x, conv(dilation=2, padding=2))
    assert not fused.winograd_applies(x, conv(groups=2))
    assert not fused.winograd_applies(x.double(), conv())          # float32 only
    assert not fused.winograd_applies(torch.randn(1, 12, 48, 48),
                                      fold_conv_norm(nn.Conv2d(12, 16, 3, padding=1), detach=False))


def test_winograd_only_for_maps_with_enough_tiles():
    """Small maps (ResNet layer4: 63 tiles at 800 px) keep the direct conv."""
    conv = fold_conv_norm(nn.Conv2d(512, 512, 3, padding=1), detach=False)
    assert not fused.winograd_applies(torch.randn(1, 512, 25, 34), conv)     # 63 tiles
    assert fused.winograd_applies(torch.randn(1, 512, 64, 64), conv)         # 256 tiles
    small = fold_conv_norm(nn.Conv2d(16, 16, 3, padding=1), detach=False)
    assert not fused.winograd_applies(torch.randn(1, 16, 40, 48), small)     # 120 tiles
    assert fused.winograd_applies(torch.randn(2, 16, 32, 32), small)         # 128 tiles


@pytest.mark.parametrize("depth", [18, 50])
def test_winograd_inference_close_to_plain_modules(depth, monkeypatch):
    """Trunk (frozen-BN folded) and FPN with Winograd 3x3 convs against the plain
    modules: equal up to the transforms' float32 rounding."""
    torch.manual_seed(depth)
    backbone = build_resnet_fpn_backbone(depth=depth).eval()
    _randomise(backbone)
    x = torch.randn(2, 3, 160, 192)      # P2 40x48: 240 tiles, enough for Winograd
    calls = _count_winograd(monkeypatch)
    with torch.no_grad():
        _set_winograd(backbone, True)
        got = backbone(x)
        assert len(calls) > 0 and (256, 256, 3, 3) in calls   # the FPN output convs
        _set_winograd(backbone, False)
        backbone.body.fast_path = EXACT
        expected = backbone(x)
    for level, (a, b) in enumerate(zip(got, expected)):
        _rel_close(a, b, 2e-4, f"P{level + 2}")


def test_winograd_training_forward_and_grads_close_to_plain(monkeypatch):
    torch.manual_seed(3)
    backbone = build_resnet_fpn_backbone(depth=18, trainable_layers=3).train()
    _randomise(backbone)
    x = torch.randn(2, 3, 128, 160)      # P2 32x40: 160 tiles, enough for Winograd
    calls = _count_winograd(monkeypatch)
    results = []
    for on in (True, False):
        backbone.zero_grad(set_to_none=True)
        _set_winograd(backbone, on)
        backbone.body.fast_path = FastPath(fuse_bn=on, winograd=on)
        out = backbone(x)
        sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in out) \
            .backward()
        results.append(([o.detach() for o in out],
                        {n: p.grad.clone() for n, p in backbone.named_parameters()
                         if p.grad is not None}))
        if on:
            assert len(calls) > 0
    (out_w, grads_w), (out_p, grads_p) = results
    for a, b in zip(out_w, out_p):
        _rel_close(a, b, 2e-4, "training forward")
    assert grads_w.keys() == grads_p.keys()
    for name in grads_p:
        _rel_close(grads_w[name], grads_p[name], 1e-3, f"grad {name}")


def test_winograd_rpn_head_and_mask_head_close_to_plain(monkeypatch):
    from heads import MaskHead
    from proposal import RPNHead
    torch.manual_seed(0)
    rpn_head, mask_head = RPNHead(16, 3), MaskHead(16, (16, 8))
    # 280 and 128 tiles, 10 x 16 tiles of 16x16 maps: all large enough for Winograd
    features = [torch.randn(2, 16, 40, 56), torch.randn(2, 16, 32, 32)]
    rois = torch.randn(10, 16, 16, 16, requires_grad=True)
    calls = _count_winograd(monkeypatch)
    results = []
    for on in (True, False):
        _set_winograd(rpn_head, on)
        _set_winograd(mask_head, on)
        objectness, deltas = rpn_head(features)
        masks = mask_head(rois)
        loss = sum(o.sum() for o in objectness) + sum((d ** 2).sum() for d in deltas) + \
            (masks * torch.linspace(-1, 1, masks.numel()).reshape(masks.shape)).sum()
        params = list(rpn_head.parameters()) + list(mask_head.parameters()) + [rois]
        results.append(([t.detach() for t in objectness + deltas + [masks]],
                        torch.autograd.grad(loss, params)))
    assert len(calls) == 2 + 2                  # 2 RPN levels + 2 mask head convs
    for a, b in zip(results[0][0], results[1][0]):
        _rel_close(a, b, 2e-4, "heads forward")
    for a, b in zip(results[0][1], results[1][1]):
        _rel_close(a, b, 1e-3, "heads grads")


@pytest.mark.parametrize("kwargs,expected", [({}, True), ({"winograd": False}, False),
                                             ({"fuse_bn": False}, False)])
def test_config_key_winograd_switches_every_winograd_conv(kwargs, expected):
    from maskrcnn import MaskRCNN
    model = MaskRCNN(num_classes=2, backbone="resnet18", **kwargs)
    flags = [m.fast_path.winograd for m in model.modules() if hasattr(m, "fast_path")]
    # trunk, FPN, RPN head, mask head, mask predictor: one value from the config
    assert len(flags) == 5 and all(f is expected for f in flags)


@pytest.mark.parametrize("side", [7, 14])
def test_roi_sized_maps_never_take_winograd(side):
    """Box-head (7x7) and mask-head (14x14) maps lose to the direct conv however many
    RoIs there are (docs/benchmarks.md): they stay on oneDNN."""
    from layers.conv import FoldedConv, MIN_WINOGRAD_SIDE, winograd_applies
    assert side < MIN_WINOGRAD_SIDE
    conv = FoldedConv(torch.randn(256, 256, 3, 3), torch.zeros(256), (1, 1), (1, 1),
                      (1, 1), 1)
    assert not winograd_applies(torch.randn(1000, 256, side, side), conv)
    assert winograd_applies(torch.randn(8, 256, 28, 28), conv)
