"""tools/intmath.py against Python's floats and PyTorch's float32 arithmetic (the oracles),
over every size pair of a grid and random sizes up to the documented limits (image sides
below 2^15, resized sides up to 2^13). In eager PyTorch: tests/deploy/test_onnx.py runs
the same arithmetic in ONNX Runtime and OpenVINO."""
import math

import torch

from tools.intmath import float32_ratio, float64_floor_times_ratio, int_divmod, int_less
from tools.tracing import resized_size
from tools.transform import _linear_taps

# (min_size, max_size): the zoo's and the tests', and the extremes.
SIZE_RULES = ((320, 512), (800, 1333), (512, 704), (1024, 1024), (160, 256), (1, 1),
              (2, 3), (8192, 8192))


def _size_pairs(seed: int, grid: int = 120, count: int = 4000):
    """Every (h, w) in [1, grid]^2 and `count` random pairs below 2^15."""
    sides = torch.arange(1, grid + 1)
    h, w = torch.meshgrid(sides, sides, indexing="ij")
    g = torch.Generator().manual_seed(seed)
    return (torch.cat([h.reshape(-1), torch.randint(1, 2 ** 15, (count,), generator=g)]),
            torch.cat([w.reshape(-1), torch.randint(1, 2 ** 15, (count,), generator=g)]))


def test_int_divmod_and_less():
    g = torch.Generator().manual_seed(0)
    b = torch.randint(1, 2 ** 22, (10000,), generator=g)
    a = torch.randint(0, 2 ** 31, (10000,), generator=g).clamp(max=b * (2 ** 22 - 1))
    q, r = int_divmod(a, b)
    assert torch.equal(q, a // b) and torch.equal(r, a % b)
    assert torch.equal(int_less(a, b), a < b)


def test_float64_floor_times_ratio_is_pythons():
    """floor(side * (num / den)) in float64: 389 * (512 / 389) = 511.99999999999994 -> 511,
    300 * (320 / 200) = 480 -> 480; exact and inexact quotients alike."""
    for min_size, max_size in SIZE_RULES:
        h, w = _size_pairs(seed=min_size)
        short, long = torch.minimum(h, w), torch.maximum(h, w)
        by_min = min_size * long <= max_size * short
        num = torch.where(by_min, min_size, max_size)
        den = torch.where(by_min, short, long)
        for side in (h, w):
            got = float64_floor_times_ratio(side, num, den).tolist()
            want = [math.floor(s * (n / d)) for s, n, d in
                    zip(side.tolist(), num.tolist(), den.tolist())]
            assert got == want, f"{min_size}, {max_size}"


def test_resized_size_traced_equals_eager():
    """The 0-d tensor form (what the ONNX exporter traces) gives eager's ints."""
    for h, w in ((300, 200), (389, 200), (200, 389), (303, 400), (97, 411), (333, 1000),
                 (1, 30000), (30000, 7), (1, 1)):
        for min_size, max_size in ((320, 512), (800, 1333)):
            traced = resized_size(torch.tensor(h), torch.tensor(w), min_size, max_size)
            assert tuple(int(s) for s in traced) == resized_size(h, w, min_size, max_size)


def test_float32_ratio_is_correctly_rounded():
    num, den = _size_pairs(seed=1)
    mantissa, shift = float32_ratio(num, den)
    got = mantissa.to(torch.float64) * torch.pow(2.0, -shift.to(torch.float64))
    want = num.to(torch.float32) / den.to(torch.float32)      # IEEE division
    assert torch.equal(got.to(torch.float32), want)
    assert torch.equal(got, want.to(torch.float64))           # S * 2^-p is that float


def _pytorch_taps(in_size: int, out_size: int):
    """PyTorch's CPU bilinear arithmetic: the float32 scale in / out, and scale *
    (dst + 0.5) - 0.5 rounded once (its fused multiply-add; exact in float64 first)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    dst = torch.arange(out_size, dtype=torch.float64)
    src = ((dst + 0.5) * scale.double() - 0.5).float().clamp(min=0)
    i0 = src.long().clamp(max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    lam = (src - i0.float()).clamp(0, 1)
    return i0, i1, 1 - lam, lam


def test_linear_taps_are_pytorchs():
    g = torch.Generator().manual_seed(2)
    pairs = [(a, b) for a in range(1, 40) for b in range(1, 40)]
    pairs += [(300, 480), (200, 320), (2 ** 15 - 1, 1), (1, 2 ** 13), (2 ** 15 - 1, 2 ** 13)]
    pairs += list(zip(torch.randint(1, 2 ** 15, (300,), generator=g).tolist(),
                      torch.randint(1, 2 ** 13 + 1, (300,), generator=g).tolist()))
    for in_size, out_size in pairs:
        for got, want in zip(_linear_taps(in_size, out_size, "cpu"),
                             _pytorch_taps(in_size, out_size)):
            assert torch.equal(got, want), (in_size, out_size)
