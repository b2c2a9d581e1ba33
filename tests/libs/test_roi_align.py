"""RoIAlign against torchvision.ops (the oracle), on the native library and the fallback.

Fuzz tests draw fresh inputs from a few seeds; the seed is in every assertion message.
"""
import shutil
import warnings

import pytest
import torch
import torchvision

import libs
from libs import _loader, ops
from tests.libs.conftest import require_native

SEEDS = [0, 1, 2]
SCALES = [1.0, 0.5, 0.25, 1 / 32]
# Where bit-identity is not promised (below): a few float32 / float64 roundings.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def assert_matches_torchvision(got, expected, backend, device, msg):
    """What is promised against torchvision: the native CPU kernels are bit-identical to
    its CPU kernel (same operations in the same order, built with -ffp-contract=off);
    the fallback (gathers, index_add_: another summation order) and CUDA (torchvision's
    CUDA kernel contracts to FMA) agree to rounding (TOL)."""
    if backend == "native" and device.type == "cpu":
        diff = (got - expected).abs().max().item() if got.numel() else 0.0
        assert torch.equal(got, expected), f"{msg}: not bit-identical (max diff {diff})"
    else:
        torch.testing.assert_close(got, expected, **TOL[got.dtype], msg=msg)


def random_rois(g, K, N, H, W, scale, dtype):
    """RoIs over N images for an H x W map at `scale`: ordinary, partly/wholly outside,
    tiny, zero-size and huge ones (all with x2 >= x1, y2 >= y1: torchvision's aligned
    adaptive grid breaks on negative sizes)."""
    img_w, img_h = W / scale, H / scale
    kind = torch.randint(0, 6, (K,), generator=g)
    x1 = (torch.rand(K, generator=g, dtype=torch.float64) * 1.4 - 0.2) * img_w
    y1 = (torch.rand(K, generator=g, dtype=torch.float64) * 1.4 - 0.2) * img_h
    bw = torch.rand(K, generator=g, dtype=torch.float64) * 0.8 * img_w
    bh = torch.rand(K, generator=g, dtype=torch.float64) * 0.8 * img_h
    tiny = kind == 1
    bw[tiny] *= 0.5 / img_w / scale
    bh[tiny] *= 0.5 / img_h / scale
    zero = kind == 2
    bw[zero] = 0
    bh[zero] = 0
    huge = kind == 3
    x1[huge] = -1.5 * img_w
    y1[huge] = -1.5 * img_h
    bw[huge] = 4 * img_w
    bh[huge] = 4 * img_h
    outside = kind == 4
    x1[outside] = img_w + 3 / scale
    boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], 1)
    batch = torch.randint(0, N, (K, 1), generator=g).double()
    return torch.cat([batch, boxes], 1).to(dtype)


def layout(x, kind):
    if kind == "contiguous":
        return x
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    # non-contiguous: a strided view of a larger tensor
    big = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] + 3,
                      dtype=x.dtype, device=x.device)
    big[:, :, ::2, 1:-2] = x
    view = big[:, :, ::2, 1:-2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_backward_fuzz(kernel_backend, device, dtype, scale, sampling_ratio, aligned):
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        N = int(torch.randint(1, 4, (1,), generator=g))
        C = int(torch.randint(1, 5, (1,), generator=g))
        H = int(torch.randint(1, 24, (1,), generator=g))
        W = int(torch.randint(1, 24, (1,), generator=g))
        PH = int(torch.randint(1, 6, (1,), generator=g))
        PW = int(torch.randint(1, 6, (1,), generator=g))
        x = torch.randn(N, C, H, W, generator=g, dtype=dtype).to(device)
        rois = random_rois(g, 24, N, H, W, scale, dtype).to(device)
        msg = f"seed={seed} N,C,H,W={N, C, H, W} PH,PW={PH, PW}"
        expected = torchvision.ops.roi_align(x, rois, (PH, PW), scale, sampling_ratio, aligned)
        got = libs.roi_align(x, rois, (PH, PW), scale, sampling_ratio, aligned)
        assert_matches_torchvision(got, expected, kernel_backend, device, msg)

        grad = torch.randn(expected.shape, generator=g, dtype=dtype).to(device)
        xt = x.clone().requires_grad_()
        torchvision.ops.roi_align(xt, rois, (PH, PW), scale, sampling_ratio, aligned).backward(grad)
        xo = x.clone().requires_grad_()
        libs.roi_align(xo, rois, (PH, PW), scale, sampling_ratio, aligned).backward(grad)
        assert_matches_torchvision(xo.grad, xt.grad, kernel_backend, device, msg + " (grad)")


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layouts(kernel_backend, device, dtype, kind):
    for seed in SEEDS:
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(2, 5, 17, 13, generator=g, dtype=dtype).to(device)
        rois = random_rois(g, 40, 2, 17, 13, 0.5, dtype).to(device)
        expected = torchvision.ops.roi_align(x, rois, 4, 0.5, -1, True)
        xl = layout(x, kind).detach().requires_grad_()
        got = libs.roi_align(xl, rois, 4, 0.5, -1, True)
        assert got.is_contiguous()
        msg = f"seed={100 + seed} layout={kind}"
        assert_matches_torchvision(got, expected, kernel_backend, device, msg)
        got.sum().backward()
        xt = x.detach().clone().requires_grad_()
        torchvision.ops.roi_align(xt, rois, 4, 0.5, -1, True).sum().backward()
        assert_matches_torchvision(xl.grad, xt.grad, kernel_backend, device, msg + " (grad)")


def cpu_has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


# (forced path, layout of the maps) -> (forward path, backward path) that must run. The
# single-map backward always writes NCHW gradients; the multi-level one writes the
# layout of its maps (the NHWC backward paths).
PATH_CASES = {
    ("blocked", "contiguous"): ("blocked", "blocked"),
    ("blocked", "channels_last"): ("blocked", "blocked_nhwc"),
    ("unblocked", "contiguous"): ("unblocked_nchw", "unblocked_nchw"),
    ("unblocked", "channels_last"): ("unblocked_nhwc", "unblocked_nhwc"),
}
# C = 32 and 70 (a partly filled last block of 32), 5 (fewer channels than one block),
# 17 (an unblocked NCHW block of 16 plus a remainder); dense small maps and a few RoIs
# on a large map.
PATH_SHAPES = [(32, 60, 9, 11), (70, 80, 14, 10), (70, 2, 90, 80), (5, 40, 12, 13),
               (17, 3, 40, 50)]


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2", "scalar"])
@pytest.mark.parametrize("case", sorted(PATH_CASES), ids="-".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_cpu_path_bit_identical(monkeypatch, roi_align_path, dtype, case, avx2):
    """Each CPU path, forced (libs.ops.force_roi_align_path), is the one that runs (both
    entry points: one map, and the multi-level op) and equals torchvision bit for bit,
    forward and backward, with and without the AVX2 copies."""
    monkeypatch.delenv("MASKRCNN_FORCE_FALLBACK", raising=False)
    force, kind = case
    fwd_path, bwd_path = PATH_CASES[case]
    roi_align_path(force, avx2=avx2)
    extra = {"avx2"} if avx2 and force == "blocked" and cpu_has_avx2() else set()
    for seed, (C, K, H, W) in enumerate(PATH_SHAPES):
        g = torch.Generator().manual_seed(300 + seed)
        x = torch.randn(2, C, H, W, generator=g, dtype=dtype)
        rois = random_rois(g, K, 2, H, W, 0.5, dtype)
        for sr, aligned in ((2, False), (-1, True)):
            msg = f"seed={300 + seed} C,K,H,W={C, K, H, W} sr={sr} aligned={aligned}"
            expected = torchvision.ops.roi_align(x, rois, (5, 4), 0.5, sr, aligned)
            grad = torch.randn(expected.shape, generator=g, dtype=dtype)
            xt = x.detach().clone().requires_grad_()
            torchvision.ops.roi_align(xt, rois, (5, 4), 0.5, sr, aligned).backward(grad)

            xl = layout(x, kind).detach().requires_grad_()
            got = libs.roi_align(xl, rois, (5, 4), 0.5, sr, aligned)
            assert ops.roi_align_paths_taken() == {fwd_path} | extra, msg
            assert torch.equal(got, expected), msg
            got.backward(grad)
            nchw_bwd = "blocked" if force == "blocked" else "unblocked_nchw"
            assert ops.roi_align_paths_taken() == {nchw_bwd} | extra, msg
            assert torch.equal(xl.grad, xt.grad), msg + " (grad)"

            xm = layout(x, kind).detach().requires_grad_()
            levels = torch.zeros(K, dtype=torch.int64)
            got = ops.roi_align_multilevel([xm], rois, levels, [0.5], 5, 4, sr, aligned)
            assert ops.roi_align_paths_taken() == {fwd_path} | extra, msg + " (multilevel)"
            assert torch.equal(got, expected), msg + " (multilevel)"
            got.backward(grad)
            assert ops.roi_align_paths_taken() == {bwd_path} | extra, msg + " (multilevel)"
            assert torch.equal(xm.grad, xt.grad), msg + " (multilevel grad)"


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_automatic_cpu_path_choice(monkeypatch, roi_align_path, kind):
    """Without forcing: C >= 32 with RoIs dense on a small map takes the blocked path,
    a few RoIs on a large map or C < 32 the unblocked one; NHWC gradients always take
    the blocked (in-place) backward; every level of a pyramid chooses for itself."""
    monkeypatch.delenv("MASKRCNN_FORCE_FALLBACK", raising=False)
    roi_align_path(None)
    unblocked = "unblocked_nchw" if kind == "contiguous" else "unblocked_nhwc"
    cases = [((64, 80, 9, 11), "blocked"), ((64, 1, 90, 80), unblocked),
             ((16, 80, 9, 11), unblocked)]
    for seed, ((C, K, H, W), path) in enumerate(cases):
        g = torch.Generator().manual_seed(400 + seed)
        x = layout(torch.randn(2, C, H, W, generator=g), kind)
        rois = random_rois(g, K, 2, H, W, 1.0, torch.float32)
        got = libs.roi_align(x, rois, 7, 1.0, 2, False)
        assert ops.roi_align_paths_taken() - {"avx2"} == {path}, f"seed={400 + seed}"
        assert torch.equal(got, torchvision.ops.roi_align(x, rois, 7, 1.0, 2, False))
    # a pyramid: level 0 sparse (one RoI on a large map), level 1 dense
    g = torch.Generator().manual_seed(410)
    maps = [layout(torch.randn(2, 64, 90, 80, generator=g), kind).requires_grad_(),
            layout(torch.randn(2, 64, 9, 11, generator=g), kind).requires_grad_()]
    rois = torch.cat([random_rois(g, 1, 2, 90, 80, 1.0, torch.float32),
                      random_rois(g, 80, 2, 9, 11, 1.0, torch.float32)])
    levels = torch.tensor([0] + [1] * 80)
    out = ops.roi_align_multilevel(maps, rois, levels, [1.0, 1.0], 7, 7, 2, False)
    assert ops.roi_align_paths_taken() - {"avx2"} == {"blocked", unblocked}
    out.backward(torch.randn(out.shape, generator=g))
    expected = {"blocked", "unblocked_nchw"} if kind == "contiguous" else {"blocked_nhwc"}
    assert ops.roi_align_paths_taken() - {"avx2"} == expected


def test_force_path_rejects_unknown_names(roi_align_path):
    with pytest.raises(ValueError, match="path must be one of"):
        ops.force_roi_align_path("fast")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_cpu_path_bad_rois_give_zero_rows(monkeypatch, threads, seed):
    """The channel-blocked CPU kernel (C >= 32, RoIs dense on a small map) writes every
    output row: rows of RoIs with a batch index outside [0, N) or NaN coordinates are
    zero (the output starts uninitialised), the others equal torchvision bit for bit."""
    monkeypatch.delenv("MASKRCNN_FORCE_FALLBACK", raising=False)
    require_native("cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 48, 13, 17, generator=g)
    rois = random_rois(g, 300, 2, 13, 17, 1.0, torch.float32)
    bad = torch.randperm(300, generator=g)[:30]
    rois[bad[:10], 0] = 2.0
    rois[bad[10:20], 0] = -1.0
    rois[bad[20:], 1 + torch.randint(0, 4, (10,), generator=g)] = float("nan")
    good = torch.ones(300, dtype=torch.bool)
    good[bad] = False
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = libs.roi_align(x, rois, (7, 7), 1.0, 2, False)
    finally:
        torch.set_num_threads(before)
    assert ops.roi_align_paths_taken() - {"avx2"} == {"blocked"}, f"seed={seed}"
    expected = torchvision.ops.roi_align(x, rois[good], (7, 7), 1.0, 2, False)
    assert torch.equal(got[good], expected), f"seed={seed}"
    assert torch.equal(got[~good], torch.zeros_like(got[~good])), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half(kernel_backend, device, dtype):
    """CUDA kernels take half types; the CPU kernels do not, so on the CPU half inputs
    always go to the fallback (which computes in float32), native library or not."""
    if device.type == "cpu":
        assert ops._native(torch.zeros(1, dtype=dtype)) is None
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=g)
    rois = random_rois(g, 20, 2, 16, 16, 0.5, torch.float32)
    xh, rh = x.to(dtype), rois.to(dtype)
    # The oracle sees the same rounded inputs (features and boxes rounded to `dtype`), so
    # the rounding of the inputs, which moves the samples by up to half a pixel, is not
    # part of the comparison. Both sides then compute in float32 (the kernels accumulate
    # in float); ours rounds the float32 result to `dtype` once, which is off by at most
    # half a unit in the last place of `dtype`; float32 differences in the last bits (the
    # fallback sums in another order) may move that rounding to the next value: one unit
    # in the last place, rtol = eps(dtype). atol covers results within a few float32
    # roundings of zero.
    expected = torchvision.ops.roi_align(xh.float(), rh.float(), 5, 0.5, 2, True)
    got = libs.roi_align(xh.to(device), rh.to(device), 5, 0.5, 2, True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), expected, atol=1e-5,
                               rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_float32_boxes_pool_in_float32(kernel_backend, device, dtype, seed):
    """Autocast's case (half features, float32 boxes): the boxes are not rounded to half
    (up to half a pixel off at 1000 px); the maps are pooled in float32, then the result
    rounded to the features' dtype, as torchvision's autocast rule does."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 40, 60, generator=g).to(dtype)
    rois = random_rois(g, 30, 2, 40, 60, 1 / 16, torch.float32)
    rois[:, 1:] += 500.25     # coordinates where float16 steps are half a pixel
    expected = torchvision.ops.roi_align(x.float(), rois, 7, 1 / 16, 2, True).to(dtype)
    got = libs.roi_align(x.to(device), rois.to(device), 7, 1 / 16, 2, True)
    assert got.dtype == dtype
    # float32 results may differ in the last bit, so the rounding to half by one step
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=torch.finfo(dtype).eps,
                               msg=f"seed={seed}")


def test_list_of_boxes_form(kernel_backend, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 20, 20, generator=g).to(device)
    boxes = [random_rois(g, k, 1, 20, 20, 1.0, torch.float32)[:, 1:].to(device)
             for k in (5, 0, 7)]
    expected = torchvision.ops.roi_align(x, boxes, 3, 1.0, 2)
    got = libs.roi_align(x, boxes, 3, 1.0, 2)
    assert_matches_torchvision(got, expected, kernel_backend, device, "seed=3")
    rois = libs.boxes_to_rois(boxes)
    assert rois[:, 0].tolist() == [0.0] * 5 + [2.0] * 7


def test_empty(kernel_backend, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g).to(device).requires_grad_()
    out = libs.roi_align(x, torch.zeros(0, 5, device=device), (2, 3), 1.0, 2)
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert libs.roi_align(x, [torch.zeros(0, 4, device=device)] * 2, 2).shape == (0, 3, 2, 2)
    empty_map = torch.zeros(1, 3, 0, 5, device=device)
    rois = torch.tensor([[0, 0, 0, 4, 4.0]], device=device)
    assert torch.equal(libs.roi_align(empty_map, rois, 2), torch.zeros(1, 3, 2, 2, device=device))


def _roi_align_loop(x, rois, scale, pooled, sampling_ratio, aligned):
    """RoIAlign written out as torchvision's CPU kernel reads (roi_align_kernel.cpp), one
    output value at a time in Python floats: the independent oracle where torchvision
    itself cannot be called (negative-size RoIs) and libs.reference is the fallback under
    test. x: Tensor[N, C, H, W]; rois: Tensor[K, 5] -> Tensor[K, C, pooled, pooled]."""
    import math
    _, C, H, W = x.shape
    v = x.detach().cpu().double().tolist()

    def bilinear(plane, y, xx):
        if y < -1.0 or y > H or xx < -1.0 or xx > W:
            return 0.0
        y, xx = max(y, 0.0), max(xx, 0.0)
        y_lo, x_lo = int(y), int(xx)
        if y_lo >= H - 1:
            y_lo = y_hi = H - 1
            y = float(y_lo)
        else:
            y_hi = y_lo + 1
        if x_lo >= W - 1:
            x_lo = x_hi = W - 1
            xx = float(x_lo)
        else:
            x_hi = x_lo + 1
        ly, lx = y - y_lo, xx - x_lo
        hy, hx = 1.0 - ly, 1.0 - lx
        return (hy * hx * plane[y_lo][x_lo] + hy * lx * plane[y_lo][x_hi]
                + ly * hx * plane[y_hi][x_lo] + ly * lx * plane[y_hi][x_hi])

    out = torch.zeros(len(rois), C, pooled, pooled, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.detach().cpu().double().tolist()):
        start_w, start_h = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = x2 * scale - offset - start_w, y2 * scale - offset - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pooled, roi_w / pooled
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled)
        count = max(grid_h * grid_w, 1)
        for c in range(C):
            plane = v[int(b)][c]
            for ph in range(pooled):
                for pw in range(pooled):
                    total = 0.0
                    for iy in range(grid_h):            # empty when grid_h <= 0
                        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                        for ix in range(grid_w):
                            xx = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                            total += bilinear(plane, y, xx)
                    out[k, c, ph, pw] = total / count
    return out.to(x.dtype)


def test_degenerate_aligned_rois(kernel_backend, device):
    """Negative-size RoIs with aligned=True: no clamp, an empty adaptive grid, zero output
    (never a negative allocation); with aligned=False they are clamped to 1x1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 10, 10, generator=g, dtype=torch.float64).to(device)
    rois = torch.tensor([[0, 6, 6, 2, 2], [0, 6, 2, 2, 6], [0, 3, 3, 3, 3]],
                        device=device, dtype=torch.float64)
    for sr in (-1, 2):
        for aligned in (False, True):
            got = libs.roi_align(x, rois, 3, 1.0, sr, aligned)
            # not libs.reference: with kernel_backend "fallback" that is the code under test
            ref = _roi_align_loop(x, rois, 1.0, 3, sr, aligned).to(device)
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
            assert torch.isfinite(got).all()
        assert torch.equal(libs.roi_align(x, rois[:2], 3, 1.0, -1, True),
                           torch.zeros(2, 2, 3, 3, device=device, dtype=torch.float64))


def test_nan_coordinates_contribute_zero(kernel_backend, device):
    x = torch.ones(1, 1, 4, 4, device=device)
    rois = torch.tensor([[0, float("nan"), 0, 2, 2]], device=device)
    out = libs.roi_align(x, rois, 1, 1.0, 1)
    assert torch.equal(out, torch.zeros_like(out))


def test_hand_computed_aligned_ramp(kernel_backend, device):
    """v[h, w] = 10 h + w is linear, so bilinear sampling returns 10 y + x exactly."""
    ramp = (10 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None, :]).to(device)
    x = ramp[None, None]
    rois = torch.tensor([[0, 1, 1, 3, 3]], dtype=torch.float32, device=device)
    # aligned=False: bins [1,2], [2,3]; one sample per bin at the bin centre 1.5, 2.5.
    assert libs.roi_align(x, rois, 2, 1.0, 1, False).flatten().tolist() == [16.5, 17.5, 26.5, 27.5]
    # aligned=True: the box shifts by -0.5 -> centres at 1.0, 2.0.
    assert libs.roi_align(x, rois, 2, 1.0, 1, True).flatten().tolist() == [11.0, 12.0, 21.0, 22.0]
    # One bin: the centre (2, 2) vs (1.5, 1.5).
    assert libs.roi_align(x, rois, 1, 1.0, 1, False).item() == 22.0
    assert libs.roi_align(x, rois, 1, 1.0, 1, True).item() == 16.5
    # Near the edge the sample clamps to the last row/column: (3.75, 3.75) reads v[3, 3].
    edge = torch.tensor([[0, 3, 3, 4.5, 4.5]], device=device)
    assert libs.roi_align(x, edge, 1, 1.0, 1, False).item() == 33.0
    # Beyond W (x > 4) a sample contributes zero but still counts in the average:
    # x samples 3.75 (reads column 3) and 5.25 (outside); y samples clamp to row 3.
    outside = torch.tensor([[0, 3.0, 3.0, 6.0, 3.5]], device=device)
    assert libs.roi_align(x, outside, 1, 1.0, 2, False).item() == (33 + 0 + 33 + 0) / 4
    far = torch.tensor([[0, 10, 10, 12, 12]], dtype=torch.float32, device=device)
    assert libs.roi_align(x, far, 2, 1.0, 2, False).abs().sum().item() == 0.0


@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck_float64(kernel_backend, device, aligned, one_thread):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 7, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    rois = torch.tensor([[0, 0.3, 0.6, 5.2, 6.1], [1, 1.7, 0.2, 3.3, 2.9], [1, -2, -1, 9, 8]],
                        dtype=torch.float64, device=device)
    # On CUDA the fallback's index_add_ sums in arbitrary order (atomics): rounding only.
    nondet = 1e-12 if device.type == "cuda" else 0.0
    assert torch.autograd.gradcheck(
        lambda inp: libs.roi_align(inp, rois, (3, 2), 1.0, -1, aligned), (x,),
        nondet_tol=nondet)
    assert torch.autograd.gradgradcheck(
        lambda inp: libs.roi_align(inp, rois, 2, 0.5, 2, aligned), (x,), nondet_tol=nondet)


@pytest.mark.parametrize("channels", [16, 40])
def test_cpu_backward_bit_identical_across_threads(kernel_backend, channels):
    """16 channels: the per-plane kernel; 40: the channel-blocked kernel (padded block).
    K * C * 7 * 7 >= 2**18, so the kernels do use the threads (smaller calls run on one)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, channels, 30, 30, generator=g, requires_grad=True)
    rois = random_rois(g, 400, 2, 30, 30, 0.5, torch.float32)
    grad = torch.randn(400, channels, 7, 7, generator=g)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x.grad = None
            libs.roi_align(x, rois, 7, 0.5, 2, True).backward(grad)
            grads.append(x.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_torch_compile_fullgraph(kernel_backend, device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, 12, generator=g).to(device).requires_grad_()
    rois = torch.tensor([[0, 1, 1, 9, 9], [1, 2, 0, 20, 8.0]], device=device)

    def f(inp, r):
        return libs.roi_align(inp, r, 3, 0.5, 2, True).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(x, rois)
    got.backward()
    grad = x.grad.clone()
    x.grad = None
    f(x, rois).backward()
    # the same kernels run compiled or not: the same bits
    assert torch.equal(got, f(x, rois))
    assert torch.equal(grad, x.grad)


def test_opcheck(kernel_backend, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    rois = torch.tensor([[0, 1, 1, 7, 6], [1, 0, 2, 5, 9.0]], device=device,
                        dtype=torch.float64)
    torch.library.opcheck(ops.roi_align, (x, rois, 0.5, 3, 2, 2, True))
    grad = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64).to(device)
    torch.library.opcheck(ops.roi_align_backward, (grad, rois, 0.5, 3, 2, 2, True, 2, 3, 9, 8))


def test_argument_errors():
    x = torch.zeros(1, 2, 5, 5)
    rois = torch.tensor([[0, 0, 0, 2, 2.0]])
    with pytest.raises(ValueError, match="4-D float"):
        libs.roi_align(x[0], rois, 2)
    with pytest.raises(ValueError, match="4-D float"):
        libs.roi_align(x.long(), rois, 2)
    with pytest.raises(ValueError, match=r"Tensor\[K, 5\]"):
        libs.roi_align(x, rois[:, 1:], 2)
    with pytest.raises(ValueError, match=r"boxes\[1\] must be a Tensor\[L, 4\]"):
        libs.roi_align(x, [rois[:, 1:], rois], 2)
    with pytest.raises(ValueError, match="output_size must be positive"):
        libs.roi_align(x, rois, (0, 2))
    with pytest.raises(ValueError, match="output_size"):
        libs.roi_align(x, rois, "seven")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"boxes are on cuda:0 but input is on cpu: "
                                             r"move them with .to\(input.device\)"):
            libs.roi_align(x, rois.cuda(), 2)
    with pytest.raises(ValueError, match="boxes are on meta but input is on cpu"):
        libs.roi_align(x, rois.to("meta"), 2)


def test_native_error_code_becomes_runtime_error(monkeypatch):
    monkeypatch.delenv("MASKRCNN_FORCE_FALLBACK", raising=False)
    require_native("cpu")
    lib = _loader.get_lib("cpu")
    assert lib is not None, libs.backend_info()
    null = _loader.ffi.NULL
    rc = lib.mrc_roi_align_forward_cpu(9, null, null, null, 1, 1, 1, 1, 1, 1, 1, 1.0, 1, 0, 0, 1)
    assert rc != 0
    with pytest.raises(RuntimeError, match="roi_align forward failed") as info:
        _loader.check(lib, "cpu", rc, "roi_align forward")
    assert len(str(info.value)) > len("maskrcnn roi_align forward failed (code 1): ")


def test_missing_library_warns_once_then_picks_up_late_build(monkeypatch, tmp_path):
    monkeypatch.delenv("MASKRCNN_FORCE_FALLBACK", raising=False)
    require_native("cpu")        # the late build copied in below: fails when not built
    real = _loader.BUILD_DIR / "libmrcnn_cpu.so"
    monkeypatch.setattr(_loader, "BUILD_DIR", tmp_path)
    _loader.reset_for_tests()
    try:
        x = torch.arange(16.0).reshape(1, 1, 4, 4)
        rois = torch.tensor([[0, 0, 0, 3, 3.0]])
        with pytest.warns(RuntimeWarning, match=r"`python libs/build_libs.py`"):
            first = libs.roi_align(x, rois, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            libs.roi_align(x, rois, 2)  # no second warning
            libs.nms(torch.tensor([[0, 0, 1, 1.0]]), torch.tensor([1.0]), 0.5)
        assert libs.backend_info()["cpu"].startswith("fallback")
        shutil.copy(real, tmp_path / "libmrcnn_cpu.so")  # "built later"
        # fallback then native: agreement to rounding is what is promised
        torch.testing.assert_close(libs.roi_align(x, rois, 2), first, **TOL[x.dtype])
        assert libs.backend_info()["cpu"].startswith("native")
    finally:
        _loader.reset_for_tests()


def test_force_fallback_env(monkeypatch):
    monkeypatch.setenv("MASKRCNN_FORCE_FALLBACK", "1")
    assert _loader.get_lib("cpu") is None
    assert libs.backend_info()["cpu"].startswith("fallback (MASKRCNN_FORCE_FALLBACK")
