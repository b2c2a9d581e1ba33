"""torch.library custom ops ``maskrcnn::roi_align``, ``maskrcnn::roi_align_backward``,
``maskrcnn::roi_align_multilevel`` (+ backward), ``maskrcnn::nms`` and
``maskrcnn::conv3x3_winograd`` (+ backward; CPU float32, with F.conv2d as its fallback) and
``maskrcnn::grouped_conv3x3`` (inference only; CPU float32, F.conv2d as its fallback).

Each op has one schema, a fake (meta) kernel for torch.compile / export, an autograd
formula, and device kernels that call the compiled library of the tensor's device through
cffi (``libs._loader``) or, when that library is not built, the pure-PyTorch reference
(``libs.reference``). The thin user-facing wrappers with argument checks live in
``libs/__init__.py``.

Shapes: N images, C channels, H/W feature size, K RoIs, PH/PW pooled size, n boxes.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _loader, reference

__all__ = ["roi_align", "roi_align_backward", "roi_align_multilevel",
           "roi_align_multilevel_backward", "nms", "conv3x3_winograd",
           "conv3x3_winograd_backward", "winograd_available", "force_roi_align_path",
           "roi_align_paths_taken", "ROI_ALIGN_CPU_PATHS", "grouped_conv3x3",
           "grouped_conv_available", "force_grouped_conv_scalar",
           "GROUPED_CONV_GROUP_WIDTHS"]

# dtype codes of the C ABI; CPU kernels take the first two.
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CPU_DTYPES = (torch.float32, torch.float64)


def _ptr(t: Tensor, ctype: str = "void*"):
    return _loader.ffi.cast(ctype, t.data_ptr())


def _native(t: Tensor):
    """The library for ``t``'s device when it supports ``t``'s dtype, else None."""
    dev = t.device.type
    if dev == "cpu" and t.dtype not in _CPU_DTYPES:
        return None
    if dev not in ("cpu", "cuda") or t.dtype not in _DTYPE_CODE:
        return None
    return _loader.get_lib(dev)


def _stream(device: torch.device):
    return _loader.ffi.cast("void*", torch.cuda.current_stream(device).cuda_stream)


# ----------------------------------------------------------------------------- roi_align

@torch.library.custom_op("maskrcnn::roi_align", mutates_args=())
def roi_align(input: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
              pooled_w: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign. input Tensor[N, C, H, W], rois Tensor[K, 5] -> Tensor[K, C, PH, PW]."""
    return _roi_align_impl(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio,
                           aligned)


def _roi_align_impl(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    lib = _native(input)
    if lib is None:
        if input.dtype in (torch.float16, torch.bfloat16):
            # The reference computes in float (accumulation in half loses too much).
            return reference.roi_align_forward(
                input.float(), rois.float(), spatial_scale, pooled_h, pooled_w,
                sampling_ratio, aligned).to(input.dtype)
        return reference.roi_align_forward(input, rois, spatial_scale, pooled_h, pooled_w,
                                           sampling_ratio, aligned)
    N, C, H, W = input.shape
    K = rois.shape[0]
    if input.is_contiguous():
        channels_last = 0
    elif input.is_contiguous(memory_format=torch.channels_last):
        channels_last = 1
    else:
        input, channels_last = input.contiguous(), 0
    rois = rois.to(input.dtype).contiguous()
    out = input.new_empty((K, C, pooled_h, pooled_w))
    if out.numel() == 0:
        return out
    if input.numel() == 0:
        return out.zero_()
    args = (_DTYPE_CODE[input.dtype], _ptr(input), _ptr(rois), _ptr(out), N, C, H, W, K,
            pooled_h, pooled_w, float(spatial_scale), int(sampling_ratio), int(aligned),
            channels_last)
    if input.device.type == "cpu":
        rc = lib.mrc_roi_align_forward_cpu(*args, torch.get_num_threads())
    else:
        with torch.cuda.device(input.device):
            rc = lib.mrc_roi_align_forward_cuda(*args, _stream(input.device))
    _loader.check(lib, input.device.type, rc, "roi_align forward")
    return out


@roi_align.register_fake
def _(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    torch._check(input.dim() == 4, lambda: "roi_align: input must be [N, C, H, W]")
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "roi_align: rois must be [K, 5]")
    return input.new_empty((rois.shape[0], input.shape[1], pooled_h, pooled_w))


@torch.library.custom_op("maskrcnn::roi_align_backward", mutates_args=())
def roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_h: int,
                       pooled_w: int, sampling_ratio: int, aligned: bool, batch_size: int,
                       channels: int, height: int, width: int) -> Tensor:
    """Gradient of roi_align w.r.t. input: grad Tensor[K, C, PH, PW] -> Tensor[N, C, H, W]."""
    lib = _native(grad)
    shape = (batch_size, channels, height, width)
    if lib is None:
        if grad.dtype in (torch.float16, torch.bfloat16):
            return reference.roi_align_backward(
                grad.float(), rois.float(), spatial_scale, pooled_h, pooled_w,
                sampling_ratio, aligned, *shape).to(grad.dtype)
        return reference.roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w,
                                            sampling_ratio, aligned, *shape)
    grad = grad.contiguous()
    rois = rois.to(grad.dtype).contiguous()
    # The CPU kernel overwrites every element; the CUDA one accumulates.
    grad_input = grad.new_empty(shape) if grad.device.type == "cpu" else grad.new_zeros(shape)
    if grad_input.numel() == 0:
        return grad_input
    if grad.numel() == 0:
        return grad_input.zero_()
    args = (_DTYPE_CODE[grad.dtype], _ptr(grad), _ptr(rois), _ptr(grad_input), *shape,
            rois.shape[0], pooled_h, pooled_w, float(spatial_scale), int(sampling_ratio),
            int(aligned))
    if grad.device.type == "cpu":
        rc = lib.mrc_roi_align_backward_cpu(*args, torch.get_num_threads())
    else:
        # Float atomics unless the user asked for determinism.
        deterministic = int(torch.are_deterministic_algorithms_enabled())
        with torch.cuda.device(grad.device):
            rc = lib.mrc_roi_align_backward_cuda(*args, deterministic, _stream(grad.device))
    _loader.check(lib, grad.device.type, rc, "roi_align backward")
    return grad_input


@roi_align_backward.register_fake
def _(grad, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, batch_size,
      channels, height, width):
    return grad.new_empty((batch_size, channels, height, width))


def _setup_roi_align(ctx, inputs, output):
    input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.params = (spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
    ctx.input_shape = tuple(input.shape)


def _roi_align_grad(ctx, grad):
    # The RoIs are treated as constants (as in torchvision): no gradient to box coordinates.
    (rois,) = ctx.saved_tensors
    grad_input = roi_align_backward(grad, rois, *ctx.params, *ctx.input_shape)
    return grad_input, None, None, None, None, None, None


roi_align.register_autograd(_roi_align_grad, setup_context=_setup_roi_align)


def _setup_roi_align_backward(ctx, inputs, output):
    grad, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = inputs[:7]
    ctx.save_for_backward(rois)
    ctx.params = (spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)


def _roi_align_backward_grad(ctx, grad_grad_input):
    # The backward is linear in `grad`; its adjoint is the forward (double backward).
    (rois,) = ctx.saved_tensors
    return (roi_align(grad_grad_input, rois, *ctx.params),) + (None,) * 10


roi_align_backward.register_autograd(_roi_align_backward_grad,
                                     setup_context=_setup_roi_align_backward)


# ------------------------------------------------------- CPU roi_align paths (test hooks)

# Names of the CPU RoIAlign paths (MRC_ROI_PATH_* of mrcnn_kernels.h; docs/kernels.md).
ROI_ALIGN_CPU_PATHS = ("blocked", "blocked_nhwc", "unblocked_nchw", "unblocked_nhwc")
_FORCE_CODE = {None: "MRC_ROI_FORCE_AUTO", "blocked": "MRC_ROI_FORCE_BLOCKED",
               "unblocked": "MRC_ROI_FORCE_UNBLOCKED"}


def _cpu_lib_for_hooks(what: str):
    """The native CPU library for test hook `what`; RuntimeError naming the build command
    when it is not built."""
    lib = _loader.get_lib("cpu")
    if lib is None:
        raise RuntimeError(f"{what} needs the native CPU library "
                           "(python libs/build_libs.py)")
    return lib


def force_roi_align_path(path: Optional[str], avx2: bool = True) -> None:
    """Test hook: the path the CPU RoIAlign calls that follow take, process-wide.

    path: None (automatic, the default), "blocked" (the channel-blocked paths wherever they
    can run, whatever C and the sample density) or "unblocked" (never a blocked path; NCHW
    or NHWC by the input's layout). avx2=False keeps the AVX2 kernel copies off. Results
    are bit-identical on every path; roi_align_paths_taken() says which one ran."""
    if path not in _FORCE_CODE:
        raise ValueError(f"force_roi_align_path: path must be one of {list(_FORCE_CODE)}, "
                         f"got {path!r}")
    lib = _cpu_lib_for_hooks("force_roi_align_path")
    _loader.check(lib, "cpu", lib.mrc_roi_align_cpu_force(getattr(lib, _FORCE_CODE[path]),
                                                          int(bool(avx2))),
                  "force_roi_align_path")


def roi_align_paths_taken() -> frozenset:
    """The paths (names of ROI_ALIGN_CPU_PATHS, plus "avx2" when a blocked path ran its
    AVX2 copy) that this thread's latest native CPU RoIAlign call took: one per level with
    RoIs; empty when it pooled nothing."""
    lib = _cpu_lib_for_hooks("roi_align_paths_taken")
    bits = lib.mrc_roi_align_cpu_paths_taken()
    names = {name: getattr(lib, "MRC_ROI_PATH_" + name.upper())
             for name in ROI_ALIGN_CPU_PATHS + ("avx2",)}
    return frozenset(name for name, bit in names.items() if bits & bit)


# ------------------------------------------------------------------ multi-level roi_align

@torch.library.custom_op("maskrcnn::roi_align_multilevel", mutates_args=())
def roi_align_multilevel(features: List[Tensor], rois: Tensor, levels: Tensor,
                         scales: List[float], pooled_h: int, pooled_w: int,
                         sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign over a pyramid in one call: RoI k is pooled from ``features[levels[k]]`` at
    ``scales[levels[k]]``.

    features: L x Tensor[N, C, H_l, W_l] (one dtype and device); rois: Tensor[K, 5];
    levels: Tensor[K] int64 in [0, L) -> Tensor[K, C, PH, PW], rows in RoI order.
    """
    K, C = rois.shape[0], features[0].shape[1]
    lib = _native(features[0])
    if lib is None or features[0].device.type != "cpu":
        return _multilevel_loop(features, rois, levels, scales, pooled_h, pooled_w,
                                sampling_ratio, aligned)
    N = features[0].shape[0]
    maps, channels_last = _one_layout(features)
    rois = rois.to(maps[0].dtype).contiguous()
    levels = levels.to(torch.int64).contiguous()
    out = maps[0].new_empty((K, C, pooled_h, pooled_w))
    if out.numel() == 0:
        return out
    ptrs = _loader.ffi.new("void*[]", [_ptr(m) for m in maps])
    heights = _loader.ffi.new("int64_t[]", [m.shape[2] for m in maps])
    widths = _loader.ffi.new("int64_t[]", [m.shape[3] for m in maps])
    scl = _loader.ffi.new("double[]", [float(v) for v in scales])
    rc = lib.mrc_roi_align_multilevel_forward_cpu(
        _DTYPE_CODE[maps[0].dtype], len(maps), ptrs, heights, widths, scl, _ptr(rois),
        _ptr(levels, "int64_t*"), _ptr(out), N, C, K, pooled_h, pooled_w, int(sampling_ratio),
        int(aligned), int(channels_last), torch.get_num_threads())
    _loader.check(lib, "cpu", rc, "roi_align_multilevel forward")
    return out


def _channels_last(features: List[Tensor]) -> bool:
    """All maps channels-last (what the CPU convs produce; copying P2 to NCHW would cost
    as much as pooling it), and not all of them plain NCHW as well."""
    return all(f.is_contiguous(memory_format=torch.channels_last) for f in features) and \
        not all(f.is_contiguous() for f in features)


def _one_layout(features: List[Tensor]) -> tuple:
    """(maps, channels_last): the maps as they are when all are channels-last, else all
    NCHW-contiguous."""
    if _channels_last(features):
        return list(features), True
    return [f.contiguous() for f in features], False


def _multilevel_loop(features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio,
                     aligned):
    """Per-level calls (CUDA, the fallback, half types on the CPU)."""
    K, C = rois.shape[0], features[0].shape[1]
    out = features[0].new_zeros((K, C, pooled_h, pooled_w))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx = torch.nonzero(levels == level).flatten()
        if idx.numel():
            out[idx] = _roi_align_impl(feature, rois[idx], scale, pooled_h, pooled_w,
                                       sampling_ratio, aligned).to(out.dtype)
    return out


@roi_align_multilevel.register_fake
def _(features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned):
    torch._check(len(features) == len(scales), lambda: "one scale per level")
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_h, pooled_w))


@torch.library.custom_op("maskrcnn::roi_align_multilevel_backward", mutates_args=())
def roi_align_multilevel_backward(grad: Tensor, rois: Tensor, levels: Tensor,
                                  scales: List[float], pooled_h: int, pooled_w: int,
                                  sampling_ratio: int, aligned: bool, batch_size: int,
                                  channels: int, heights: List[int], widths: List[int],
                                  channels_last: bool = False) -> List[Tensor]:
    """Gradient of roi_align_multilevel: grad Tensor[K, C, PH, PW] -> one Tensor[N, C, H_l,
    W_l] per level (channels-last memory when ``channels_last``: the layout of the
    forward's maps, so the convolutions' backward gets its own layout)."""
    shapes = [(batch_size, channels, h, w) for h, w in zip(heights, widths)]
    lib = _native(grad)
    # channels-last results on the CPU only (what the fake kernel promises)
    fmt = torch.channels_last if channels_last and grad.device.type == "cpu" \
        else torch.contiguous_format
    if lib is None or grad.device.type != "cpu":
        grads = []
        for level, (scale, shape) in enumerate(zip(scales, shapes)):
            idx = torch.nonzero(levels == level).flatten()
            grads.append(roi_align_backward(grad[idx], rois[idx], scale, pooled_h, pooled_w,
                                            sampling_ratio, aligned, *shape)
                         .contiguous(memory_format=fmt))
        return grads
    grad = grad.contiguous()
    rois = rois.to(grad.dtype).contiguous()
    levels = levels.to(torch.int64).contiguous()
    # The kernel overwrites every element (zero where no RoI samples).
    grads = [torch.empty(shape, dtype=grad.dtype, memory_format=fmt) for shape in shapes]
    if grad.numel() == 0:
        return [g.zero_() for g in grads]
    ptrs = _loader.ffi.new("void*[]", [_ptr(g) for g in grads])
    hs = _loader.ffi.new("int64_t[]", list(heights))
    ws = _loader.ffi.new("int64_t[]", list(widths))
    scl = _loader.ffi.new("double[]", [float(v) for v in scales])
    rc = lib.mrc_roi_align_multilevel_backward_cpu(
        _DTYPE_CODE[grad.dtype], len(grads), ptrs, hs, ws, scl, _ptr(grad), _ptr(rois),
        _ptr(levels, "int64_t*"), batch_size, channels, rois.shape[0], pooled_h, pooled_w,
        int(sampling_ratio), int(aligned), int(channels_last), torch.get_num_threads())
    _loader.check(lib, "cpu", rc, "roi_align_multilevel backward")
    return grads


@roi_align_multilevel_backward.register_fake
def _(grad, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned, batch_size,
      channels, heights, widths, channels_last=False):
    cpu_cl = channels_last and grad.device.type == "cpu"
    fmt = torch.channels_last if cpu_cl else torch.contiguous_format
    return [grad.new_empty((batch_size, channels, h, w)).contiguous(memory_format=fmt)
            for h, w in zip(heights, widths)]


def _setup_multilevel(ctx, inputs, output):
    features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    ctx.params = (scales, pooled_h, pooled_w, sampling_ratio, aligned)
    ctx.shape = (features[0].shape[0], features[0].shape[1],
                 [f.shape[2] for f in features], [f.shape[3] for f in features],
                 _channels_last(features))


def _multilevel_grad(ctx, grad):
    rois, levels = ctx.saved_tensors
    grads = roi_align_multilevel_backward(grad, rois, levels, *ctx.params, *ctx.shape)
    return list(grads), None, None, None, None, None, None, None


roi_align_multilevel.register_autograd(_multilevel_grad, setup_context=_setup_multilevel)


def _setup_multilevel_backward(ctx, inputs, output):
    grad, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned = inputs[:8]
    batch_size, channels, heights, widths = inputs[8:12]
    ctx.save_for_backward(rois, levels)
    ctx.params = (scales, pooled_h, pooled_w, sampling_ratio, aligned)
    ctx.shapes = [(batch_size, channels, h, w) for h, w in zip(heights, widths)]
    ctx.like = grad.new_empty(())


def _multilevel_backward_grad(ctx, grad_grads):
    # Linear in `grad`; its adjoint is the forward (double backward).
    rois, levels = ctx.saved_tensors
    grad_grads = [g if g is not None else ctx.like.new_zeros(shape)
                  for g, shape in zip(grad_grads, ctx.shapes)]
    return (roi_align_multilevel(grad_grads, rois, levels, *ctx.params),) + (None,) * 12


roi_align_multilevel_backward.register_autograd(_multilevel_backward_grad,
                                                setup_context=_setup_multilevel_backward)


# ----------------------------------------------------------------------------------- nms

@torch.library.custom_op("maskrcnn::nms", mutates_args=())
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS. boxes Tensor[n, 4], scores Tensor[n] -> kept indices int64, by score."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    dev = boxes.device.type
    if dev == "cpu" and boxes.dtype not in _CPU_DTYPES:
        boxes = boxes.float()
    lib = _native(boxes)
    if lib is None:
        return reference.nms(boxes, scores, iou_threshold)
    code = _DTYPE_CODE[boxes.dtype]
    if dev == "cpu":
        # The kernel sorts and gathers itself: no torch op (each costs more than a whole
        # 1000-box NMS when its thread pool has to wake up).
        boxes = boxes.contiguous()
        scores = scores.to(torch.float64).contiguous()  # exact for every float dtype
        keep = torch.empty(n, dtype=torch.int64)
        num_kept = torch.zeros(1, dtype=torch.int64)
        rc = lib.mrc_nms_cpu(code, _ptr(boxes), _ptr(scores, "double*"), n,
                             float(iou_threshold), _ptr(keep, "int64_t*"),
                             _ptr(num_kept, "int64_t*"))
        _loader.check(lib, dev, rc, "nms")
        return keep[:int(num_kept.item())]
    # Stable: equal scores keep their original order, as torchvision's.
    order = torch.sort(scores, descending=True, stable=True)[1]
    sorted_boxes = boxes[order].contiguous()
    words = (n + 63) // 64
    mask = torch.empty(n * words, dtype=torch.int64, device=boxes.device)  # uint64 bits
    keep = torch.empty(n, dtype=torch.int64, device=boxes.device)
    num_kept = torch.zeros(1, dtype=torch.int64, device=boxes.device)
    with torch.cuda.device(boxes.device):
        rc = lib.mrc_nms_cuda(code, _ptr(sorted_boxes), n, float(iou_threshold),
                              _ptr(mask, "uint64_t*"), _ptr(keep, "int64_t*"),
                              _ptr(num_kept, "int64_t*"), _stream(boxes.device))
    _loader.check(lib, dev, rc, "nms")
    return order[keep[:int(num_kept.item())]]  # the one host sync


@nms.register_fake
def _(boxes, scores, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "nms: boxes must be [n, 4]")
    ctx = torch.library.get_ctx()
    k = ctx.new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


# ------------------------------------------------------------------ conv3x3 (Winograd)

# Lavin & Gray's F(4x4, 3x3): U = G g G^T turns a 3x3 filter g into a 6x6 one (the input
# and output transforms B^T, A^T live in libs/csrc/winograd_cpu.cpp).
_WINOGRAD_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
# Tiles per band: V and M stay a few MB (in cache, and no big temporaries) while the
# GEMMs are still large enough to run at full speed (docs/benchmarks.md, "Structure
# refactor of the kernels").
_WINOGRAD_BAND_TILES = 512


def winograd_weight(weight: Tensor) -> Tensor:
    """weight Tensor[K, C, 3, 3] -> U Tensor[36, C, K], U[6 a + b] = (G g G^T)[a, b]
    (readable reference of mrc_winograd_weight_cpu)."""
    g = weight.new_tensor(_WINOGRAD_G)
    u = torch.einsum("ak,oikl,bl->abio", g, weight, g)
    return u.reshape(36, weight.shape[1], weight.shape[0])


def winograd_weight_grad(grad_u: Tensor) -> Tensor:
    """The adjoint of winograd_weight: Tensor[36, C, K] -> Tensor[K, C, 3, 3]."""
    g = grad_u.new_tensor(_WINOGRAD_G)
    return torch.einsum("ak,abio,bl->oikl", g, grad_u.reshape(6, 6, *grad_u.shape[1:]), g)


def _weight_u(lib, weight: Tensor) -> Tensor:
    """winograd_weight in one pass: the einsum of the readable version makes several
    passes and temporaries over the weights (docs/benchmarks.md)."""
    K, C = weight.shape[:2]
    code = _DTYPE_CODE[weight.dtype]
    weight_ckk = weight.permute(1, 2, 3, 0).contiguous()   # output channels innermost
    u = weight.new_empty((36, C, K))
    _loader.check(lib, "cpu", lib.mrc_winograd_weight_cpu(
        code, _ptr(weight_ckk, "void*"), _ptr(u, "void*"), K, C, torch.get_num_threads()),
        "winograd weight transform")
    return u


def winograd_available() -> bool:
    """The CPU library (with the Winograd transforms) is built and loaded."""
    return _loader.get_lib("cpu") is not None


def _winograd_lib(input: Tensor, weight: Tensor):
    """The CPU library when the transforms take these tensors (CPU float32 / float64, one
    dtype, channel counts positive multiples of 8), else None: F.conv2d computes it."""
    if input.device.type != "cpu" or input.dtype not in _CPU_DTYPES or \
            weight.dtype != input.dtype:
        return None
    C, K = input.shape[1], weight.shape[0]
    if C == 0 or K == 0 or C % 8 or K % 8:
        return None
    return _loader.get_lib("cpu")


def _bands(batch: int, height: int, width: int):
    """(tiles_w, [(first tile row, tile rows)]) covering the batch's tile rows (numbered
    through the batch, so a band may span several small maps)."""
    tiles_h, tiles_w = (height + 3) // 4, (width + 3) // 4
    total = batch * tiles_h
    rows = max(1, _WINOGRAD_BAND_TILES // tiles_w)
    return tiles_w, [(r, min(rows, total - r)) for r in range(0, total, rows)]


def _band_planes(like: Tensor, N: int, H: int, W: int, C: int, K: int):
    """For each band of tiles: (first tile row, tile rows, tiles_w, V Tensor[36, P, C],
    M Tensor[36, P, K]), V and M views of two buffers reused by every band."""
    tiles_w, bands = _bands(N, H, W)
    most = 36 * bands[0][1] * tiles_w
    v_buf, m_buf = like.new_empty(most * C), like.new_empty(most * K)
    for row0, rows in bands:
        tiles = rows * tiles_w
        yield (row0, rows, tiles_w, v_buf[:36 * tiles * C].view(36, tiles, C),
               m_buf[:36 * tiles * K].view(36, tiles, K))


@torch.library.custom_op("maskrcnn::conv3x3_winograd", mutates_args=())
def conv3x3_winograd(input: Tensor, weight: Tensor, bias: Tensor, relu: bool) -> Tensor:
    """relu?(conv2d(input, weight, bias, padding=1)) by Winograd F(4x4, 3x3).

    input Tensor[N, C, H, W], weight Tensor[K, C, 3, 3], bias Tensor[K] ->
    Tensor[N, K, H, W] channels-last. The transforms take CPU float32 / float64 with C and
    K multiples of 8; anything else (and a missing library) runs F.conv2d.
    """
    lib = _winograd_lib(input, weight)
    if lib is None:
        y = torch.nn.functional.conv2d(input, weight, bias, padding=1)
        return (y.relu_() if relu else y).contiguous(memory_format=torch.channels_last)
    N, C, H, W = input.shape
    K, code = weight.shape[0], _DTYPE_CODE[input.dtype]
    x = input.contiguous(memory_format=torch.channels_last)
    u = _weight_u(lib, weight)
    bias = bias.contiguous()
    y = torch.empty((N, K, H, W), dtype=x.dtype, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    nt = torch.get_num_threads()
    for row0, rows, tiles_w, v, m in _band_planes(x, N, H, W, C, K):
        _loader.check(lib, "cpu", lib.mrc_winograd_input_cpu(
            code, _ptr(x, "void*"), _ptr(v, "void*"), N, H, W, C, row0, rows, tiles_w, nt),
            "winograd input transform")
        torch.bmm(v, u, out=m)
        _loader.check(lib, "cpu", lib.mrc_winograd_output_cpu(
            code, _ptr(m, "void*"), _ptr(bias, "void*"), _ptr(y, "void*"), N, H, W, K, row0,
            rows, tiles_w, int(relu), nt), "winograd output transform")
    return y


@conv3x3_winograd.register_fake
def _(input, weight, bias, relu):
    return input.new_empty((input.shape[0], weight.shape[0], *input.shape[2:])).contiguous(
        memory_format=torch.channels_last)


@torch.library.custom_op("maskrcnn::conv3x3_winograd_backward", mutates_args=())
def conv3x3_winograd_backward(grad: Tensor, input: Tensor, weight: Tensor) -> List[Tensor]:
    """Gradients of conv3x3_winograd (before its ReLU): grad Tensor[N, K, H, W] ->
    [grad_input Tensor[N, C, H, W] channels-last, grad_weight Tensor[K, C, 3, 3],
    grad_bias Tensor[K]]. The GEMMs run in the Winograd domain too (4x fewer FLOPs)."""
    lib = _winograd_lib(input, weight)
    if lib is None:
        gi = torch.nn.grad.conv2d_input(input.shape, weight, grad, padding=1)
        gw = torch.nn.grad.conv2d_weight(input, weight.shape, grad, padding=1)
        return [gi.contiguous(memory_format=torch.channels_last), gw, grad.sum((0, 2, 3))]
    N, C, H, W = input.shape
    K, code = weight.shape[0], _DTYPE_CODE[input.dtype]
    x = input.contiguous(memory_format=torch.channels_last)
    dy = grad.contiguous(memory_format=torch.channels_last)
    u_t = _weight_u(lib, weight).transpose(1, 2)                  # [36, K, C] view
    dx = torch.zeros_like(x, memory_format=torch.channels_last)  # the adjoint adds into it
    du = x.new_zeros((36, C, K))
    if x.numel() == 0 or dy.numel() == 0:
        return [dx, winograd_weight_grad(du), dy.sum((0, 2, 3))]
    nt = torch.get_num_threads()
    for row0, rows, tiles_w, v, dm in _band_planes(x, N, H, W, C, K):
        _loader.check(lib, "cpu", lib.mrc_winograd_output_adjoint_cpu(
            code, _ptr(dy, "void*"), _ptr(dm, "void*"), N, H, W, K, row0, rows, tiles_w, nt),
            "winograd output adjoint")
        # V is recomputed rather than saved (it is 2.25x the input's size).
        _loader.check(lib, "cpu", lib.mrc_winograd_input_cpu(
            code, _ptr(x, "void*"), _ptr(v, "void*"), N, H, W, C, row0, rows, tiles_w, nt),
            "winograd input transform")
        du.baddbmm_(v.transpose(1, 2), dm)
        torch.bmm(dm, u_t, out=v)                                  # dV, in V's buffer
        _loader.check(lib, "cpu", lib.mrc_winograd_input_adjoint_cpu(
            code, _ptr(v, "void*"), _ptr(dx, "void*"), N, H, W, C, row0, rows, tiles_w, nt),
            "winograd input adjoint")
    return [dx, winograd_weight_grad(du), dy.sum((0, 2, 3))]


@conv3x3_winograd_backward.register_fake
def _(grad, input, weight):
    return [torch.empty_like(input, memory_format=torch.channels_last),
            torch.empty_like(weight), weight.new_empty(weight.shape[0])]


def _setup_winograd(ctx, inputs, output):
    input, weight, bias, relu = inputs
    ctx.save_for_backward(input, weight, output if relu else None)


def _winograd_grad(ctx, grad):
    input, weight, output = ctx.saved_tensors
    if output is not None:
        grad = grad * (output > 0)
    gi, gw, gb = conv3x3_winograd_backward(grad, input, weight)
    return gi, gw, gb, None


conv3x3_winograd.register_autograd(_winograd_grad, setup_context=_setup_winograd)


# ------------------------------------------------------- grouped conv3x3 (inference only)

# Channels per group the native kernel takes (libs/csrc/grouped_conv_cpu.cpp).
GROUPED_CONV_GROUP_WIDTHS = (8, 16)


def grouped_conv_available() -> bool:
    """The CPU library (with the grouped 3x3 kernel) is built and loaded."""
    return _loader.get_lib("cpu") is not None


def _grouped_lib(input: Tensor, weight: Tensor, groups: int):
    """The CPU library when the kernel takes these tensors (CPU float32, C_in == C_out,
    C / groups in GROUPED_CONV_GROUP_WIDTHS, 3x3 weight of that grouping), else None."""
    if input.device.type != "cpu" or input.dtype != torch.float32 or \
            weight.dtype != torch.float32 or input.dim() != 4:
        return None
    C = input.shape[1]
    if groups <= 0 or C % groups or C // groups not in GROUPED_CONV_GROUP_WIDTHS or \
            tuple(weight.shape) != (C, C // groups, 3, 3):
        return None
    return _loader.get_lib("cpu")


@torch.library.custom_op("maskrcnn::grouped_conv3x3", mutates_args=())
def grouped_conv3x3(input: Tensor, weight: Tensor, bias: Tensor, groups: int,
                    relu: bool) -> Tensor:
    """relu?(conv2d(input, weight, bias, padding=1, groups=groups)), for inference.

    input Tensor[N, C, H, W], weight Tensor[C, C / groups, 3, 3], bias Tensor[C] ->
    Tensor[N, C, H, W] channels-last. The native kernel takes CPU float32 with
    C / groups in GROUPED_CONV_GROUP_WIDTHS; anything else (and a missing library) runs
    F.conv2d. No autograd formula: calling it on tensors that need gradients raises.
    """
    lib = _grouped_lib(input, weight, groups)
    if lib is None:
        y = torch.nn.functional.conv2d(input, weight, bias, padding=1, groups=groups)
        return (y.relu_() if relu else y).contiguous(memory_format=torch.channels_last)
    N, C, H, W = input.shape
    x = input.contiguous(memory_format=torch.channels_last)
    weight, bias = weight.contiguous(), bias.contiguous()
    y = torch.empty((N, C, H, W), dtype=x.dtype, memory_format=torch.channels_last)
    _loader.check(lib, "cpu", lib.mrc_grouped_conv3x3_cpu(
        _DTYPE_CODE[x.dtype], _ptr(x), _ptr(weight), _ptr(bias), _ptr(y), N, H, W, C,
        groups, int(relu), torch.get_num_threads()), "grouped conv3x3")
    return y


@grouped_conv3x3.register_fake
def _(input, weight, bias, groups, relu):
    return torch.empty_like(input, memory_format=torch.channels_last)


def force_grouped_conv_scalar(on: bool) -> None:
    """Test hook: the grouped conv3x3 calls that follow run the portable scalar kernel
    (on=True) instead of the AVX2 + FMA one, process-wide."""
    lib = _cpu_lib_for_hooks("force_grouped_conv_scalar")
    _loader.check(lib, "cpu", lib.mrc_grouped_conv3x3_cpu_force_scalar(int(bool(on))),
                  "force_grouped_conv_scalar")
