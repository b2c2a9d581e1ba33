"""Smoke tests of libmrcnn_cpu.so through cffi, the way libs/ loads it: the header parses
as a cdef, hand-computed RoIAlign / NMS cases, error paths, thread invariance."""
import importlib.util
import math
import os
import re
import struct

import cffi
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = os.path.join(ROOT, "libs", "csrc", "mrcnn_kernels.h")


def _build_libs():
    spec = importlib.util.spec_from_file_location(
        "mrcnn_build_libs_abi", os.path.join(ROOT, "libs", "build_libs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cdef_text():
    """The header minus preprocessor lines and the extern "C" braces (what libs/ does)."""
    lines = []
    for line in open(HEADER).read().splitlines():
        s = line.strip()
        if s.startswith("#") or s in ('extern "C" {', "}"):
            continue
        lines.append(line)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def api():
    bl = _build_libs()
    path = bl.build_cpu(bl.DEFAULT_OUT)  # "up to date" when `make libs` already ran
    ffi = cffi.FFI()
    ffi.cdef(cdef_text())
    return ffi, ffi.dlopen(path)


def err(api):
    ffi, lib = api
    return ffi.string(lib.mrc_last_error()).decode()


# The whole C ABI (mrcnn_kernels.h), exactly: every exported function's C type. A change
# here is an ABI change: bump MRC_ABI_VERSION (common.h) and libs/_loader.ABI_VERSION.
_I64 = "int64_t"
SIGNATURES = {
    "mrc_abi_version": "int(*)(void)",
    "mrc_last_error": "const char *(*)(void)",
    "mrc_roi_align_forward_cpu":
        f"int(*)(int, const void *, const void *, void *, {', '.join([_I64] * 7)}, double, "
        f"{_I64}, int, int, int)",
    "mrc_roi_align_backward_cpu":
        f"int(*)(int, const void *, const void *, void *, {', '.join([_I64] * 7)}, double, "
        f"{_I64}, int, int)",
    "mrc_roi_align_multilevel_forward_cpu":
        f"int(*)(int, {_I64}, void * *, const {_I64} *, const {_I64} *, const double *, "
        f"const void *, const {_I64} *, void *, {', '.join([_I64] * 6)}, int, int, int)",
    "mrc_roi_align_multilevel_backward_cpu":
        f"int(*)(int, {_I64}, void * *, const {_I64} *, const {_I64} *, const double *, "
        f"const void *, const void *, const {_I64} *, {', '.join([_I64] * 6)}, int, int, "
        f"int)",
    "mrc_roi_align_cpu_force": "int(*)(int, int)",
    "mrc_roi_align_cpu_paths_taken": "int(*)(void)",
    "mrc_nms_cpu": f"int(*)(int, const void *, const double *, {_I64}, double, {_I64} *, "
                   f"{_I64} *)",
    "mrc_winograd_weight_cpu": f"int(*)(int, const void *, void *, {_I64}, {_I64}, int)",
    "mrc_winograd_input_cpu":
        f"int(*)(int, const void *, void *, {', '.join([_I64] * 7)}, int)",
    "mrc_winograd_output_cpu":
        f"int(*)(int, const void *, const void *, void *, {', '.join([_I64] * 7)}, int, int)",
    "mrc_winograd_output_adjoint_cpu":
        f"int(*)(int, const void *, void *, {', '.join([_I64] * 7)}, int)",
    "mrc_winograd_input_adjoint_cpu":
        f"int(*)(int, const void *, void *, {', '.join([_I64] * 7)}, int)",
    "mrc_grouped_conv3x3_cpu":
        f"int(*)(int, const void *, const void *, const void *, void *, {', '.join([_I64] * 5)}, "
        f"int, int)",
    "mrc_grouped_conv3x3_cpu_force_scalar": "int(*)(int)",
    "mrc_cuda_abi_version": "int(*)(void)",
    "mrc_cuda_last_error": "const char *(*)(void)",
    "mrc_roi_align_forward_cuda":
        f"int(*)(int, const void *, const void *, void *, {', '.join([_I64] * 7)}, double, "
        f"{_I64}, int, int, void *)",
    "mrc_roi_align_backward_cuda":
        f"int(*)(int, const void *, const void *, void *, {', '.join([_I64] * 7)}, double, "
        f"{_I64}, int, int, void *)",
    "mrc_nms_cuda": f"int(*)(int, const void *, {_I64}, double, uint64_t *, {_I64} *, "
                    f"{_I64} *, void *)",
}
# Values of the path constants of the CPU RoIAlign test hooks (also part of the ABI).
CONSTANTS = {"MRC_ROI_PATH_BLOCKED": 1, "MRC_ROI_PATH_BLOCKED_NHWC": 2,
             "MRC_ROI_PATH_UNBLOCKED_NCHW": 4, "MRC_ROI_PATH_UNBLOCKED_NHWC": 8,
             "MRC_ROI_PATH_AVX2": 16, "MRC_ROI_FORCE_AUTO": 0, "MRC_ROI_FORCE_BLOCKED": 1,
             "MRC_ROI_FORCE_UNBLOCKED": 2}


def header_prototypes():
    """name -> (return type, parameter list) of every function the header declares."""
    text = re.sub(r"/\*.*?\*/", "", cdef_text(), flags=re.S)
    found = re.findall(r"^\s*((?:const\s+)?\w+\s*\**)\s*(mrc_\w+)\s*\(([^)]*)\)\s*;",
                       text, flags=re.M)
    return {name: (ret, args) for ret, name, args in found}


def test_header_declares_exactly_the_abi():
    """The header declares exactly the functions of SIGNATURES, each with its C type (as
    cffi parses it: parameter names dropped, types normalised)."""
    ffi = cffi.FFI()
    ffi.cdef(cdef_text())
    protos = header_prototypes()
    assert sorted(protos) == sorted(SIGNATURES)
    for name, (ret, args) in protos.items():
        got = ffi.typeof(f"{ret} (*)({args})")
        assert got is ffi.typeof(SIGNATURES[name]), (name, got.cname, SIGNATURES[name])
    consts = ffi.dlopen(None)  # cffi exposes the header's enum values on any library
    for name, value in CONSTANTS.items():
        assert getattr(consts, name) == value, name


def test_cpu_library_exports_the_declared_signatures(api):
    """Every CPU function of the ABI is in the built library with the header's type."""
    ffi, lib = api
    for name, sig in SIGNATURES.items():
        if "cuda" in name:
            continue
        assert ffi.typeof(getattr(lib, name)) is ffi.typeof(sig), name


def test_cpu_path_hooks(api):
    """mrc_roi_align_cpu_force takes 0 (auto), 1 (blocked), 2 (unblocked) and rejects
    the rest; the paths taken are reset by every call (0 after a call with no work)."""
    ffi, lib = api
    try:
        assert lib.mrc_roi_align_cpu_force(3, 1) != 0 and "invalid path" in err(api)
        assert lib.mrc_roi_align_cpu_force(-1, 1) != 0
        for path, bit in ((1, lib.MRC_ROI_PATH_BLOCKED), (2, lib.MRC_ROI_PATH_UNBLOCKED_NCHW)):
            assert lib.mrc_roi_align_cpu_force(path, 0) == 0
            forward(api, [(0, 0, 0, 2, 2)], 1, 1, 1, 0)
            assert lib.mrc_roi_align_cpu_paths_taken() == bit
        assert lib.mrc_roi_align_cpu_force(0, 1) == 0
        assert lib.mrc_roi_align_forward_cpu(1, ffi.NULL, ffi.NULL, ffi.NULL, 1, 1, 4, 4, 0, 2,
                                             2, 1.0, 0, 0, 0, 1) == 0
        assert lib.mrc_roi_align_cpu_paths_taken() == 0
    finally:
        lib.mrc_roi_align_cpu_force(0, 1)


def ramp(ffi, dtype="double"):
    """4x4 plane v[y, x] = 4 * y + x (N = C = 1)."""
    return ffi.new(f"{dtype}[]", [4.0 * y + x for y in range(4) for x in range(4)])


def forward(api, rois, PH, PW, sr, aligned, dtype="double", inp=None, N=1, C=1, H=4, W=4,
            nt=0, channels_last=0):
    ffi, lib = api
    code = {"double": 1, "float": 0}[dtype]
    inp = inp if inp is not None else ramp(ffi, dtype)
    r = ffi.new(f"{dtype}[]", [v for row in rois for v in row])
    out = ffi.new(f"{dtype}[]", len(rois) * C * PH * PW)
    rc = lib.mrc_roi_align_forward_cpu(code, inp, r, out, N, C, H, W, len(rois), PH, PW, 1.0,
                                       sr, aligned, channels_last, nt)
    assert rc == 0, err(api)
    return list(out)


@pytest.mark.parametrize("dtype", ["double", "float"])
def test_roi_align_forward_hand_cases(api, dtype):
    # one sample at (1, 1): exactly v[1, 1] = 5
    assert forward(api, [(0, 0, 0, 2, 2)], 1, 1, 1, 0, dtype) == [5.0]
    # aligned: shifted by -0.5, sample at (0.5, 0.5): 4 * 0.5 + 0.5
    assert forward(api, [(0, 0, 0, 2, 2)], 1, 1, 1, 1, dtype) == [2.5]
    # 2x2 bins, 2x2 samples: bin 0 samples at 0.5, 1.5 (mean 1); bin 1 at 2.5 and 3.5,
    # which is clamped to 3 (mean 2.75); the ramp is linear so the mean of v is v(mean)
    out = forward(api, [(0, 0, 0, 4, 4)], 2, 2, 2, 0, dtype)
    assert out == [4 * 1 + 1, 4 * 1 + 2.75, 4 * 2.75 + 1, 4 * 2.75 + 2.75]
    # adaptive grid (ceil(4 / 2) = 2) gives the same
    assert forward(api, [(0, 0, 0, 4, 4)], 2, 2, 0, 0, dtype) == out
    assert forward(api, [(0, 0, 0, 4, 4)], 2, 2, -1, 0, dtype) == out


def test_roi_align_bad_rois_give_zeros(api):
    nan = float("nan")
    rois = [(1, 0, 0, 2, 2),        # batch index out of range
            (-2, 0, 0, 2, 2),       # negative batch index
            (nan, 0, 0, 2, 2),      # NaN batch index
            (0, nan, 0, 2, 2),      # NaN coordinate
            (0, 0, 0, nan, nan),
            (0, 1e30, 1e30, 2e30, 2e30),   # far outside
            (0, 3, 3, 1, 1)]        # negative size (aligned: no clamp)
    for aligned in (0, 1):
        for sr in (-1, 2):
            out = forward(api, rois, 2, 2, sr, aligned)
            assert out[:6 * 4] == [0.0] * 24, (aligned, sr, out)
            assert all(math.isfinite(v) for v in out)


def test_roi_align_huge_roi_terminates(api):
    out = forward(api, [(0, -1e12, -1e12, 1e12, 1e12)], 7, 7, 0, 0)
    assert all(math.isfinite(v) for v in out)


def test_roi_align_channels_last_matches(api):
    ffi, _ = api
    N, C, H, W = 2, 3, 5, 6
    vals = [math.sin(i * 0.37) for i in range(N * C * H * W)]
    nchw = ffi.new("double[]", vals)
    nhwc = ffi.new("double[]", [vals[((n * C + c) * H + y) * W + x] for n in range(N)
                                for y in range(H) for x in range(W) for c in range(C)])
    rois = [(0, 0.3, 0.2, 4.1, 3.3), (1, -0.5, 1.0, 6.5, 5.5), (1, 2, 2, 2.5, 2.5)]
    for aligned in (0, 1):
        a = forward(api, rois, 3, 2, -1, aligned, inp=nchw, N=N, C=C, H=H, W=W)
        b = forward(api, rois, 3, 2, -1, aligned, inp=nhwc, N=N, C=C, H=H, W=W,
                    channels_last=1)
        assert a == b


def backward(api, grads, rois, N, C, H, W, PH, PW, sr, aligned, nt):
    ffi, lib = api
    go = ffi.new("double[]", grads)
    r = ffi.new("double[]", [v for row in rois for v in row])
    gi = ffi.new("double[]", N * C * H * W)
    rc = lib.mrc_roi_align_backward_cpu(1, go, r, gi, N, C, H, W, len(rois), PH, PW, 1.0, sr,
                                        aligned, nt)
    assert rc == 0, err(api)
    return list(gi)


def test_roi_align_backward_hand_case(api):
    # the single sample sits exactly on pixel (1, 1): all the gradient goes there
    gi = backward(api, [3.0], [(0, 0, 0, 2, 2)], 1, 1, 4, 4, 1, 1, 1, 0, 1)
    assert gi[1 * 4 + 1] == 3.0 and sum(gi) == 3.0
    # aligned: sample at (0.5, 0.5), a quarter to each of the four pixels
    gi = backward(api, [4.0], [(0, 0, 0, 2, 2)], 1, 1, 4, 4, 1, 1, 1, 1, 1)
    assert [gi[0], gi[1], gi[4], gi[5]] == [1.0, 1.0, 1.0, 1.0] and sum(gi) == 4.0


@pytest.mark.parametrize("C", [5, 40])
def test_roi_align_backward_independent_of_threads(api, C):
    """Large enough (K*C*PH*PW >= 2**18) that the kernel uses the threads it is given;
    C = 5: per-plane kernel, C = 40: channel-blocked kernel."""
    N, H, W, PH, PW = 2, 9, 11, 7, 7
    K = 2 ** 18 // (C * PH * PW) + 1
    rois = [((i * 7) % N, (i * 1.3) % 8 - 1, (i * 0.7) % 6 - 1, (i * 1.3) % 8 + 3.1,
             (i * 0.7) % 6 + 2.9) for i in range(K)]
    grads = [math.cos(i * 0.11) for i in range(len(rois) * C * PH * PW)]
    ref = backward(api, grads, rois, N, C, H, W, PH, PW, -1, 1, 1)
    for nt in (2, 3, 8):
        got = backward(api, grads, rois, N, C, H, W, PH, PW, -1, 1, nt)
        assert [struct.pack("d", v) for v in got] == [struct.pack("d", v) for v in ref]


def nms(api, boxes, thr, dtype="float", scores=None):
    """Boxes in descending score order unless scores are given."""
    ffi, lib = api
    b = ffi.new(f"{dtype}[]", [v for box in boxes for v in box])
    s = ffi.new("double[]", scores if scores is not None
                else [float(len(boxes) - i) for i in range(len(boxes))])
    keep = ffi.new("int64_t[]", max(len(boxes), 1))
    nk = ffi.new("int64_t *")
    rc = lib.mrc_nms_cpu({"float": 0, "double": 1}[dtype], b, s, len(boxes), thr, keep, nk)
    assert rc == 0, err(api)
    return list(keep)[: nk[0]]


@pytest.mark.parametrize("dtype", ["float", "double"])
def test_nms_hand_cases(api, dtype):
    boxes = [(0, 0, 10, 10), (1, 1, 11, 11), (20, 20, 30, 30)]  # IoU(0, 1) = 81/119 = 0.68
    assert nms(api, boxes, 0.5, dtype) == [0, 2]
    assert nms(api, boxes, 0.7, dtype) == [0, 1, 2]
    if dtype == "double":  # IoU exactly equal to the threshold: strictly greater suppresses
        assert nms(api, boxes, 81 / 119, dtype) == [0, 1, 2]
    assert nms(api, [], 0.5, dtype) == []
    dup = [(0, 0, 1, 1)] * 4
    assert nms(api, dup, 0.5, dtype) == [0]
    assert nms(api, dup, 1.0, dtype) == [0, 1, 2, 3]
    # zero-area boxes: IoU 0/0 = NaN never suppresses
    assert nms(api, [(1, 1, 1, 1)] * 3, 0.0, dtype) == [0, 1, 2]
    # the kernel sorts: stable by descending score, NaN first; returns input indices
    nan = float("nan")
    far = [(10.0 * i, 0, 10.0 * i + 5, 5) for i in range(6)]
    assert nms(api, far, 0.5, dtype, scores=[0.1, 0.7, nan, 0.7, 0.9, nan]) == [2, 5, 4, 1, 3, 0]
    assert nms(api, boxes, 0.5, dtype, scores=[0.1, 0.2, 0.3]) == [2, 1]


def test_error_paths(api):
    ffi, lib = api
    buf = ffi.new("double[]", 64)
    out = ffi.new("double[]", 64)
    assert lib.mrc_roi_align_forward_cpu(7, buf, buf, out, 1, 1, 4, 4, 1, 2, 2, 1.0, 0, 0, 0,
                                         1) != 0
    assert "dtype" in err(api) and "7" in err(api)
    assert lib.mrc_roi_align_forward_cpu(2, buf, buf, out, 1, 1, 4, 4, 1, 2, 2, 1.0, 0, 0, 0,
                                         1) != 0
    assert "float16" in err(api) and "CPU" in err(api)
    assert lib.mrc_roi_align_forward_cpu(1, buf, buf, out, 1, 1, 4, 4, 1, 0, 2, 1.0, 0, 0, 0,
                                         1) != 0
    assert "pooled" in err(api)
    assert lib.mrc_roi_align_backward_cpu(1, buf, buf, out, -1, 1, 4, 4, 1, 2, 2, 1.0, 0, 0,
                                          1) != 0
    assert "negative" in err(api)
    assert lib.mrc_roi_align_forward_cpu(1, buf, ffi.NULL, out, 1, 1, 4, 4, 1, 2, 2, 1.0, 0, 0,
                                         0, 1) != 0
    assert "null" in err(api)
    keep = ffi.new("int64_t[]", 4)
    nk = ffi.new("int64_t *")
    assert lib.mrc_nms_cpu(5, buf, buf, 2, 0.5, keep, nk) != 0 and "dtype" in err(api)
    assert lib.mrc_nms_cpu(0, buf, buf, -1, 0.5, keep, nk) != 0 and "negative" in err(api)
    assert lib.mrc_nms_cpu(0, buf, ffi.NULL, 2, 0.5, keep, nk) != 0 and "scores" in err(api)
    # empty inputs succeed
    assert lib.mrc_roi_align_forward_cpu(1, ffi.NULL, ffi.NULL, ffi.NULL, 1, 1, 4, 4, 0, 2, 2,
                                         1.0, 0, 0, 0, 1) == 0
    assert lib.mrc_nms_cpu(0, ffi.NULL, ffi.NULL, 0, 0.5, ffi.NULL, nk) == 0 and nk[0] == 0


def test_matches_torchvision_bitwise(api):
    import torch
    import torchvision.ops as tvops

    ffi, lib = api
    g = torch.Generator().manual_seed(0)
    for dtype, code in ((torch.float32, 0), (torch.float64, 1)):
        x = torch.randn(2, 4, 12, 15, generator=g, dtype=dtype)
        xy = torch.rand(30, 2, generator=g, dtype=dtype) * 30 - 3
        wh = torch.rand(30, 2, generator=g, dtype=dtype) * 20
        rois = torch.cat([torch.randint(0, 2, (30, 1), generator=g).to(dtype), xy, xy + wh], 1)
        for aligned in (False, True):
            for sr in (-1, 2):
                ref = tvops.roi_align(x, rois, (3, 4), 0.5, sr, aligned)
                out = torch.empty_like(ref)
                P = lambda t: ffi.cast("void *", t.data_ptr())
                assert lib.mrc_roi_align_forward_cpu(code, P(x), P(rois), P(out), 2, 4, 12, 15,
                                                     30, 3, 4, 0.5, sr, aligned, 0, 2) == 0
                assert torch.equal(out, ref), (dtype, aligned, sr)
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(30, generator=g, dtype=dtype)
        keep = torch.empty(30, dtype=torch.int64)
        nk = torch.zeros(1, dtype=torch.int64)
        s64 = scores.double()
        assert lib.mrc_nms_cpu(code, ffi.cast("void *", boxes.data_ptr()),
                               ffi.cast("double *", s64.data_ptr()), 30, 0.3,
                               ffi.cast("int64_t *", keep.data_ptr()),
                               ffi.cast("int64_t *", nk.data_ptr())) == 0
        assert torch.equal(keep[: nk.item()], tvops.nms(boxes, scores, 0.3))


def test_multilevel_rows_levels_and_orphans(api):
    """Each RoI's row comes from its own level at that level's scale; a level outside
    [0, L) gives a zero row; the backward sends each row's gradient to its level only."""
    import torch
    import torchvision.ops as tvops

    ffi, lib = api
    P = lambda t, c="void *": ffi.cast(c, t.data_ptr())  # noqa: E731
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(2, 3, 8, 10, generator=g, dtype=torch.float64),
            torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)]
    scales = [0.5, 0.25]
    rois = torch.tensor([[0, 1, 1, 12, 9], [1, 2, 0, 7, 5], [1, 0, 0, 16, 16],
                         [0, 3, 3, 9, 9]], dtype=torch.float64)
    levels = torch.tensor([1, 0, 7, 0])
    out = torch.full((4, 3, 2, 2), float("nan"), dtype=torch.float64)
    ptrs = ffi.new("void*[]", [P(m) for m in maps])
    hs, ws = ffi.new("int64_t[]", [8, 4]), ffi.new("int64_t[]", [10, 5])
    sc = ffi.new("double[]", scales)
    assert lib.mrc_roi_align_multilevel_forward_cpu(1, 2, ptrs, hs, ws, sc, P(rois),
                                                    P(levels, "int64_t *"), P(out), 2, 3, 4,
                                                    2, 2, 2, 0, 0, 2) == 0, err(api)
    for k, lvl in enumerate(levels.tolist()):
        if lvl > 1:
            assert torch.equal(out[k], torch.zeros(3, 2, 2)), k
        else:
            exp = tvops.roi_align(maps[lvl], rois[k:k + 1], 2, scales[lvl], 2)
            assert torch.equal(out[k:k + 1], exp), k
    # channels_last = 1: the same maps stored NHWC give the same rows.
    nhwc = [m.permute(0, 2, 3, 1).contiguous() for m in maps]
    out_cl = torch.full_like(out, float("nan"))
    assert lib.mrc_roi_align_multilevel_forward_cpu(
        1, 2, ffi.new("void*[]", [P(m) for m in nhwc]), hs, ws, sc, P(rois),
        P(levels, "int64_t *"), P(out_cl), 2, 3, 4, 2, 2, 2, 0, 1, 2) == 0, err(api)
    assert torch.equal(out_cl, out)
    grad = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    grads = [torch.full_like(m, float("nan")) for m in maps]  # overwritten
    gptrs = ffi.new("void*[]", [P(t) for t in grads])
    assert lib.mrc_roi_align_multilevel_backward_cpu(1, 2, gptrs, hs, ws, sc, P(grad),
                                                     P(rois), P(levels, "int64_t *"), 2, 3,
                                                     4, 2, 2, 2, 0, 0, 2) == 0, err(api)
    for lvl in (0, 1):
        sel = (levels == lvl).nonzero().flatten()
        x = maps[lvl].clone().requires_grad_()
        tvops.roi_align(x, rois[sel], 2, scales[lvl], 2).backward(grad[sel])
        assert torch.equal(grads[lvl], x.grad), lvl
    assert lib.mrc_roi_align_multilevel_forward_cpu(1, 0, ptrs, hs, ws, sc, P(rois),
                                                    P(levels, "int64_t *"), P(out), 2, 3, 4,
                                                    2, 2, 2, 0, 0, 2) != 0
    assert "L >= 1" in err(api)


def test_abi_version_is_coherent(api):
    """libs/_loader.py, common.h and the built library agree (a stale build is refused)."""
    from libs import _loader

    _, lib = api
    common = open(os.path.join(ROOT, "libs", "csrc", "common.h")).read()
    assert re.search(r"#define MRC_ABI_VERSION (\d+)", common).group(1) == str(
        _loader.ABI_VERSION)
    assert lib.mrc_abi_version() == _loader.ABI_VERSION
