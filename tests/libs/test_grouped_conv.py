"""maskrcnn::grouped_conv3x3 (libs/csrc/grouped_conv_cpu.cpp) against F.conv2d, and its
dispatch from the fused inference path (layers/conv.py) in a ResNeXt trunk.

Tolerance. Each output is a sum of n = 9 * (C / groups) + 1 products and bias; the kernel
adds them in another order than oneDNN / PyTorch and with FMA. Each float32 sum is within
gamma_n * S of the exact value (gamma_n = n u / (1 - n u), u = 2^-24, S = sum of the terms'
magnitudes: conv2d(|x|, |w|) + |b|), so two of them differ by at most 2 gamma_n S; the
oracle runs in float64 (its own error ~1e-16 S), so |got - exact| <= gamma_n S is asserted
per element, a bound that holds whatever the summation order.
"""
import pytest
import torch
import torch.nn.functional as F

import backbones.fused_trunk as fused_trunk  # noqa: F401  (the trunk the dispatch serves)
import layers.conv as fused
from backbones import build_resnet_fpn_backbone
from layers import EXACT, FastPath
from libs import _loader, ops

from .conftest import require_native

torch.set_num_threads(2)
U32 = 2.0 ** -24


@pytest.fixture(autouse=True)
def native():
    require_native("cpu")
    assert ops.grouped_conv_available()


@pytest.fixture(params=["avx2", "scalar"])
def kernel_copy(request):
    """Each test runs the AVX2 + FMA copy (where the CPU has them) and the scalar one."""
    ops.force_grouped_conv_scalar(request.param == "scalar")
    yield request.param
    ops.force_grouped_conv_scalar(False)


def _draw(g, width, n=None, groups=None, h=None, w=None):
    def pick(v, lo, hi):
        return v if v is not None else int(torch.randint(lo, hi + 1, (1,), generator=g))
    n, groups, h, w = pick(n, 1, 2), pick(groups, 1, 6), pick(h, 1, 29), pick(w, 1, 31)
    c = groups * width
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(c, width, 3, 3, generator=g) / (3 * width ** 0.5)
    bias = torch.randn(c, generator=g)
    return x, weight, bias, groups


def _assert_within_bound(got, x, weight, bias, groups, relu, what):
    """|got - exact| <= gamma_n * S elementwise (module docstring); ReLU only shrinks it."""
    x64, w64, b64 = x.double(), weight.double(), bias.double()
    exact = F.conv2d(x64, w64, b64, padding=1, groups=groups)
    if relu:
        exact = exact.relu()
    n = 9 * weight.shape[1] + 1
    gamma = n * U32 / (1 - n * U32)
    magnitude = F.conv2d(x64.abs(), w64.abs(), b64.abs(), padding=1, groups=groups)
    err = (got.double() - exact).abs()
    assert got.shape == exact.shape, what
    assert bool((err <= gamma * magnitude + 1e-30).all()), \
        f"{what}: max err {err.max().item():.3g}, bound {(gamma * magnitude).max().item():.3g}"


@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fuzz_against_conv2d(width, seed, kernel_copy):
    g = torch.Generator().manual_seed(seed)
    for trial in range(6):
        x, weight, bias, groups = _draw(g, width)
        relu = bool(trial % 2)
        layout = ("channels_last", "nchw", "noncontiguous")[trial % 3]
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "noncontiguous":   # every other column of a wider map
            x = torch.cat([x, x], dim=3)[..., ::2]
        what = (f"seed={seed} trial={trial} {kernel_copy} x={tuple(x.shape)} groups={groups} "
                f"relu={relu} {layout}")
        got = ops.grouped_conv3x3(x, weight, bias, groups, relu)
        assert got.is_contiguous(memory_format=torch.channels_last), what
        _assert_within_bound(got, x, weight, bias, groups, relu, what)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 17), (13, 1), (2, 2), (3, 13), (7, 30)])
def test_small_and_odd_maps(h, w, kernel_copy):
    """Maps narrower than the register blocks (12 / 6 pixels) and 4-pixel tails, borders
    on both sides of one pixel."""
    g = torch.Generator().manual_seed(100 * h + w)
    for width in (8, 16):
        x, weight, bias, groups = _draw(g, width, n=2, groups=3, h=h, w=w)
        got = ops.grouped_conv3x3(x, weight, bias, groups, True)
        _assert_within_bound(got, x, weight, bias, groups, True,
                             f"seed={100 * h + w} {kernel_copy} {h}x{w} width {width}")


def test_relu_keeps_nan_and_zeroes_negatives():
    x = torch.zeros(1, 8, 4, 4)
    x[0, 0, 0, 0] = float("nan")        # reaches outputs (0..1, 0..1) (0 * NaN is NaN)
    weight = torch.zeros(8, 8, 3, 3)
    weight[:, 0, 1, 1] = 1.0
    bias = torch.full((8,), -1.0)
    got = ops.grouped_conv3x3(x, weight, bias, 1, True)
    assert torch.isnan(got[0, :, 0, 0]).all()
    assert (got[0, :, 3, 3] == 0).all()


def test_other_group_widths_fall_back_to_conv2d():
    x = torch.randn(1, 12, 5, 6)
    weight, bias = torch.randn(12, 4, 3, 3), torch.randn(12)
    got = ops.grouped_conv3x3(x, weight, bias, 3, False)
    torch.testing.assert_close(got, F.conv2d(x, weight, bias, padding=1, groups=3))


def test_c_abi_refuses_unsupported_group_widths():
    lib, ffi = _loader.get_lib("cpu"), _loader.ffi
    x, y = torch.zeros(1, 4, 4, 12), torch.zeros(1, 4, 4, 12)
    w, b = torch.zeros(12, 4, 3, 3), torch.zeros(12)
    p = [ffi.cast("void*", t.data_ptr()) for t in (x, w, b, y)]
    assert lib.mrc_grouped_conv3x3_cpu(0, *p, 1, 4, 4, 12, 3, 0, 1) != 0
    assert "C / groups 8 or 16" in ffi.string(lib.mrc_last_error()).decode()
    assert lib.mrc_grouped_conv3x3_cpu(1, *p, 1, 4, 4, 16, 2, 0, 1) != 0   # float64


def test_applies_only_to_supported_convs():
    x = torch.randn(1, 256, 100, 100)

    def conv(c=256, groups=32, stride=1, padding=1, dilation=1, k=3):
        return fused.FoldedConv(torch.randn(c, 256 // groups, k, k), torch.zeros(c),
                                (stride, stride), (padding, padding),
                                (dilation, dilation), groups)
    assert fused.grouped_kernel_applies(x, conv())
    assert fused.grouped_kernel_applies(x, conv(groups=16))       # 16 per group
    assert not fused.grouped_kernel_applies(x, conv(groups=8))    # 32 per group
    assert not fused.grouped_kernel_applies(x, conv(groups=1))
    assert not fused.grouped_kernel_applies(x, conv(stride=2))
    assert not fused.grouped_kernel_applies(x, conv(padding=2))
    assert not fused.grouped_kernel_applies(x, conv(dilation=2))
    assert not fused.grouped_kernel_applies(x, conv(k=1, padding=0))
    assert not fused.grouped_kernel_applies(x, conv(c=512))       # C_out != C_in
    assert not fused.grouped_kernel_applies(x[..., :99], conv())  # map too small


def _count_grouped(monkeypatch):
    calls = []
    real = ops.grouped_conv3x3

    def counting(x, weight, bias, groups, relu):
        calls.append((tuple(x.shape), groups))
        return real(x, weight, bias, groups, relu)
    monkeypatch.setattr(fused.kernel_ops, "grouped_conv3x3", counting)
    return calls


def _resnext(seed):
    torch.manual_seed(seed)
    backbone = build_resnet_fpn_backbone(depth=50, groups=32, width_per_group=8,
                                         fast_path=FastPath(fuse_bn=True, winograd=False))
    backbone = backbone.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # non-trivial norms, so folding has something to fold
        for name, buf in backbone.body.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    return backbone


@pytest.fixture
def any_map_size(monkeypatch):
    """Small test images: let the kernel run on every map size."""
    monkeypatch.setattr(fused, "MIN_GROUPED_KERNEL_PIXELS", 0)


def test_resnext_trunk_dispatches_and_matches_unfused(monkeypatch, any_map_size):
    """X-50 32x8d: layer1's 3 grouped convs (8 per group) and layer2's 3 stride-1 ones
    (16 per group; its first block's is stride 2) run the kernel, and the FPN outputs
    equal the unfused modules' (fuse_bn=False) to float32 rounding."""
    backbone = _resnext(11)
    x = torch.randn(1, 3, 96, 128)
    calls = _count_grouped(monkeypatch)
    with torch.no_grad():
        got = backbone(x)
        assert sorted(set(calls)) == [((1, 256, 24, 32), 32), ((1, 512, 12, 16), 32)]
        assert len(calls) == 6
        backbone.body.fast_path = EXACT
        expected = backbone(x)
    assert len(calls) == 6          # the exact path never calls it
    for level, (a, b) in enumerate(zip(got, expected)):
        scale = b.abs().max().clamp(min=1.0)
        diff = ((a - b).abs().max() / scale).item()
        assert diff <= 1e-5, f"P{level + 2}: relative diff {diff}"


def test_grad_keeps_onednn_for_the_trained_stages(monkeypatch, any_map_size):
    backbone = _resnext(12)
    x = torch.randn(1, 3, 64, 64)
    calls = _count_grouped(monkeypatch)
    out = backbone(x)   # gradients on: only the frozen layer1 (no grad needed) runs it
    assert calls and {shape[1] for shape, _ in calls} == {256}
    sum(o.sum() for o in out).backward()     # layer2..4 went through differentiable ops
    assert backbone.body.layer2[1].conv2.weight.grad is not None
