"""libs.conv3x3 / maskrcnn::conv3x3_winograd (Winograd F(4x4, 3x3)) against F.conv2d.

The oracle is PyTorch's direct convolution: in float64 the Winograd result must agree to
rounding (~1e-13), in float32 to the few-ulp error bound of the transforms. Shapes are
fresh random draws: sizes that are not multiples of the 4x4 tile, 1-pixel maps, bands
of tiles that span several images, non-contiguous inputs.
"""
import pytest
import torch
import torch.nn.functional as F

import libs
from libs import _loader, ops

from .conftest import require_native


@pytest.fixture(autouse=True)
def native():
    require_native("cpu")
    assert ops.winograd_available()


def _draw(g, dtype, n=None, c=None, k=None, h=None, w=None):
    def pick(v, lo, hi):
        return v if v is not None else int(torch.randint(lo, hi + 1, (1,), generator=g))
    n, h, w = pick(n, 1, 3), pick(h, 1, 23), pick(w, 1, 23)
    c, k = (v if v is not None else 8 * pick(None, 1, 3) for v in (c, k))
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(k, c, 3, 3, generator=g, dtype=dtype) / (3 * c ** 0.5)
    bias = torch.randn(k, generator=g, dtype=dtype)
    return x, weight, bias


def _reference(x, weight, bias, relu):
    y = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    return y.relu() if relu else y


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("relu", [False, True])
def test_float64_equals_direct_conv_fuzz(relu, seed):
    g = torch.Generator().manual_seed(seed)
    for draw in range(12):
        x, weight, bias = _draw(g, torch.float64)
        msg = f"seed={seed} draw={draw} x={list(x.shape)} weight={list(weight.shape)}"
        y = libs.conv3x3(x, weight, bias, relu=relu)
        assert y.shape == (x.shape[0], weight.shape[0], *x.shape[2:]), msg
        assert y.is_contiguous(memory_format=torch.channels_last), msg
        torch.testing.assert_close(y, _reference(x, weight, bias, relu), rtol=0, atol=1e-11,
                                   msg=msg)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("relu", [False, True])
def test_float32_within_winograd_rounding_fuzz(relu, seed):
    g = torch.Generator().manual_seed(seed)
    for draw in range(12):
        x, weight, bias = _draw(g, torch.float32)
        y = libs.conv3x3(x, weight, bias, relu=relu)
        ref = _reference(x, weight, bias, relu)
        direct = (F.conv2d(x, weight, bias, padding=1) - ref).abs().max().item() \
            if not relu else 0.0
        # F(4x4, 3x3) in float32: a few times the direct conv's error, ~1e-5 of the
        # outputs' scale (these are O(1)).
        err = (y.double() - ref).abs().max().item()
        assert err <= 2e-4, (f"seed={seed} draw={draw}", err)
        if direct:
            assert err <= 50 * direct + 1e-6, (f"seed={seed} draw={draw}", err, direct)


def test_bands_spanning_images_and_many_bands(monkeypatch):
    """Small bands: the tile rows of one GEMM cross image borders, and a map needs many
    bands (forward and backward)."""
    g = torch.Generator().manual_seed(5)
    for band_tiles in (1, 3, 7):
        monkeypatch.setattr(ops, "_WINOGRAD_BAND_TILES", band_tiles)
        x, weight, bias = _draw(g, torch.float64, n=3, h=9, w=6)
        x.requires_grad_(True)
        weight.requires_grad_(True)
        y = libs.conv3x3(x, weight, bias)
        torch.testing.assert_close(y, _reference(x, weight, bias, False), rtol=0, atol=1e-11)
        grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
        gx, gw = torch.autograd.grad(y, (x, weight), grad)
        rx, rw = torch.autograd.grad(F.conv2d(x, weight, bias, padding=1), (x, weight), grad)
        torch.testing.assert_close(gx, rx, rtol=0, atol=1e-10)
        torch.testing.assert_close(gw, rw, rtol=0, atol=1e-10)


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_float64(relu, monkeypatch):
    monkeypatch.setattr(ops, "_WINOGRAD_BAND_TILES", 4)   # several bands
    g = torch.Generator().manual_seed(7)
    x, weight, bias = _draw(g, torch.float64, n=2, c=8, k=8, h=6, w=5)
    args = [t.requires_grad_(True) for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda *a: libs.conv3x3(*a, relu=relu), args)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_gradients_match_direct_conv(seed):
    g = torch.Generator().manual_seed(seed)
    x, weight, bias = _draw(g, torch.float32, n=2, c=16, k=24, h=13, w=18)
    args = [t.requires_grad_(True) for t in (x, weight, bias)]
    y = libs.conv3x3(*args, relu=True)
    grad = torch.randn(y.shape, generator=g)
    ours = torch.autograd.grad(y, args, grad)
    ref_args = [t.detach().double().requires_grad_(True) for t in args]
    ref = torch.autograd.grad(_reference(*ref_args, True), ref_args, grad.double())
    for name, a, b in zip(("input", "weight", "bias"), ours, ref):
        scale = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        assert err <= 1e-4 * scale + 1e-5, f"seed={seed} grad {name}: {err} (scale {scale})"


def test_layouts_and_views():
    """NCHW, channels-last and strided views give the same result (the op copies what
    it must); the weight may be a non-contiguous view too."""
    g = torch.Generator().manual_seed(11)
    big = torch.randn(2, 16, 14, 22, generator=g, dtype=torch.float64)
    weight_t = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64).transpose(0, 1)
    bias = torch.randn(8, generator=g, dtype=torch.float64)
    for x in (big, big.contiguous(memory_format=torch.channels_last), big[:, :, ::2, 1::2],
              big[:, 4:12]):
        x = x[:, :16] if x.shape[1] == 16 else x
        weight = weight_t if x.shape[1] == 16 else weight_t[:, :8]
        y = libs.conv3x3(x, weight, bias)
        torch.testing.assert_close(y, _reference(x, weight, bias, False), rtol=0, atol=1e-11)


def test_empty_batch_and_one_pixel_maps():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 8, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.zeros(0, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    y = libs.conv3x3(x, weight, bias)
    assert y.shape == (0, 8, 5, 5)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.shape == x.shape
    for h, w in ((1, 1), (1, 9), (7, 1)):
        x = torch.randn(2, 8, h, w, generator=g, dtype=torch.float64)
        torch.testing.assert_close(libs.conv3x3(x, weight, bias),
                                   _reference(x, weight, bias, False), rtol=0, atol=1e-11)


def test_channels_not_multiple_of_8_fall_back_to_direct_conv():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 10, 11, generator=g)
    weight = torch.randn(12, 3, 3, 3, generator=g)
    bias = torch.randn(12, generator=g)
    y = libs.conv3x3(x, weight, bias, relu=True)
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, padding=1).relu(), rtol=0, atol=0)


def test_nan_is_never_hidden():
    """A NaN input makes every output that reads it NaN, ReLU included (as in torch).
    Winograd mixes whole tiles, so the rest of that output's 4x4 tile is NaN too."""
    x = torch.zeros(1, 8, 8, 8, dtype=torch.float64)
    x[0, 0, 1, 1] = float("nan")
    weight = torch.ones(8, 8, 3, 3, dtype=torch.float64)
    y = libs.conv3x3(x, weight, None, relu=True)
    ref = F.conv2d(x, weight, padding=1).relu()
    assert ref.isnan().any() and (y.isnan() | ~ref.isnan()).all()
    assert not y[:, :, 4:, :].isnan().any() and not y[:, :, :, 4:].isnan().any()


def test_weight_transform_matches_readable_reference():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 24, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ops._weight_u(_loader.get_lib("cpu"), weight),
                               ops.winograd_weight(weight), rtol=0, atol=1e-14)
    # and winograd_weight_grad is its adjoint: <U(w), d> == <w, U^T(d)>
    d = torch.randn(36, 24, 16, generator=g, dtype=torch.float64)
    lhs = (ops.winograd_weight(weight) * d).sum()
    rhs = (weight * ops.winograd_weight_grad(d)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x, weight, bias = _draw(g, torch.float64, n=2, c=8, k=16, h=5, w=7)
    torch.library.opcheck(ops.conv3x3_winograd, (x, weight, bias, True))
    grad = torch.randn(2, 16, 5, 7, generator=g, dtype=torch.float64)
    torch.library.opcheck(ops.conv3x3_winograd_backward, (grad, x, weight))


@pytest.mark.parametrize("case", ["input_1d", "weight_5x5", "weight_channels", "bias_shape",
                                  "dtype_mix"])
def test_argument_errors(case):
    x = torch.randn(1, 8, 6, 6)
    weight, bias = torch.randn(8, 8, 3, 3), torch.randn(8)
    if case == "input_1d":
        x = torch.randn(8)
    elif case == "weight_5x5":
        weight = torch.randn(8, 8, 5, 5)
    elif case == "weight_channels":
        weight = torch.randn(8, 16, 3, 3)
    elif case == "bias_shape":
        bias = torch.randn(4)
    else:
        weight = weight.double()
    with pytest.raises(ValueError, match="conv3x3"):
        libs.conv3x3(x, weight, bias)


def test_raw_abi_rejects_bad_arguments():
    lib = _loader.get_lib("cpu")
    buf = torch.zeros(36 * 8 * 8)
    p = _loader.ffi.cast("void*", buf.data_ptr())
    null = _loader.ffi.NULL
    cases = [
        (lambda: lib.mrc_winograd_input_cpu(2, p, p, 1, 8, 8, 8, 0, 1, 2, 1), "not supported"),
        (lambda: lib.mrc_winograd_input_cpu(0, p, p, 1, 8, 8, 12, 0, 1, 2, 1), "multiple of 8"),
        (lambda: lib.mrc_winograd_output_cpu(0, p, null, p, 1, 8, 8, 8, 1, 2, 2, 0, 1),
         "do not fit"),
        (lambda: lib.mrc_winograd_input_adjoint_cpu(0, p, p, 1, 8, 8, 8, 0, 1, 3, 1),
         "do not fit"),
        (lambda: lib.mrc_winograd_weight_cpu(0, null, p, 8, 8, 1), "null pointer"),
    ]
    for call, message in cases:
        assert call() != 0
        assert message in _loader.ffi.string(lib.mrc_last_error()).decode()
