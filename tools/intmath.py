"""Size arithmetic of a traced forward in integers that every runtime of the exported
graph computes exactly, reproducing the float rounding of eager's arithmetic.

The exported ONNX file also runs in OpenVINO, whose CPU plugin (2026.4, seen on one-op
graphs) computes float64 as float32, int64 as int32, float32 Divide within an ulp (a
quarter of the quotients of small integers are off), and integer Divide, Mod and
comparisons through float32: exact below 2^24 only. So these helpers take int64 tensors
of image sides below 2^15 and resized sides up to 2^13, keep every product below 2^31,
divide only through `int_divmod` and compare large values only through `int_less`;
ONNX Runtime and PyTorch compute the same integers. Used when traced by
tools.tracing.resized_size and tools.transform.bilinear_resize; checked against Python's
floats in tests/tools/test_intmath.py, in both runtimes in tests/deploy/test_onnx.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["int_less", "int_divmod", "ilog2", "pow2", "float_pow2", "floor_log2_ratio",
           "float64_floor_times_ratio", "float32_ratio"]


def int_less(x: Tensor, y: Tensor) -> Tensor:
    """x < y of int64 tensors with |x - y| < 2^31, as the sign of x - y (a float32 keeps
    an integer's sign; x and y themselves compare exactly as float32 below 2^24 only)."""
    return x - y < 0


def int_divmod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(a // b, a % b) of int64 tensors, 0 <= a < 2^31, 1 <= b < 2^22, a // b < 2^22:
    Divide's quotient (OpenVINO's, through float32, within 2 of the true one) corrected
    by its remainder, which integer Mul and Sub compute exactly."""
    q = torch.div(a, b, rounding_mode="trunc")      # positive: trunc is floor, one Div
    r = a - q * b
    for _ in range(2):
        under, over = r < 0, ~int_less(r, b)        # signs: exact compares
        q = q + over.to(torch.int64) - under.to(torch.int64)
        r = torch.where(over, r - b, torch.where(under, r + b, r))
    return q, r


def _powers_of_two(device) -> Tensor:
    """Tensor[31] int64: 2^0 .. 2^30."""
    return 2 ** torch.arange(31, dtype=torch.int64, device=device)


def ilog2(x: Tensor) -> Tensor:
    """floor(log2(x)) of int64 x in [1, 2^24), by comparisons (exact, unlike Log)."""
    return (x[..., None] >= _powers_of_two(x.device)).to(torch.int64).sum(-1) - 1


def pow2(e: Tensor) -> Tensor:
    """2^e of int64 e in [0, 30] (a Gather: ONNX's BitShift takes unsigned types only)."""
    return _powers_of_two(e.device)[e]


def float_pow2(e: Tensor) -> Tensor:
    """2^e as float32 of int64 e in [-64, 63], exactly (a Gather from a constant table:
    Pow may round)."""
    table = torch.tensor([2.0 ** k for k in range(-64, 64)], device=e.device)
    return table[e + 64]


def floor_log2_ratio(num: Tensor, den: Tensor) -> Tensor:
    """floor(log2(num / den)) of int64 num, den in [1, 2^15): the leading bits' positions,
    less one where num's bits below its leading one are smaller than den's."""
    a, b = ilog2(num), ilog2(den)
    return a - b - int_less(num * pow2(b), den * pow2(a)).to(torch.int64)


def _pow2_mod(e: Tensor, m: Tensor) -> Tensor:
    """2^e mod m for int64 0 <= e < 128 and 1 <= m < 2^15: 2^(e's top 3 bits) from the
    table, then square-and-multiply over the low 4. (Starting from a constant 1 would
    put a Div(1, m) before a Mul by m, which ONNX Runtime 1.32's DivMulFusion rewrites
    to m / m, wrong for integers.)"""
    acc = int_divmod(pow2(torch.div(e, 16, rounding_mode="trunc")), m)[1]
    for bit in range(3, -1, -1):
        acc = int_divmod(acc * acc, m)[1]
        odd = torch.div(e, 2 ** bit, rounding_mode="trunc") % 2 == 1
        acc = torch.where(odd, int_divmod(acc * 2, m)[1], acc)
    return acc


def float64_floor_times_ratio(side: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """floor(side * (num / den)) exactly as Python's float64 computes it, for int64 side
    and den in [1, 2^15) and num in [1, 2^13] with side * num / den <= 2^13 (a side
    resized with min_size or max_size num).

    The exact quotient k = floor(side * num / den) is the answer unless den divides
    side * num and float64 rounds below the integer k (389 * (512 / 389) is
    511.99999999999994): fl(num / den) = (num * 2^E - r) / (den * 2^E) when rounded down
    (E = 52 - floor(log2(num / den)) for the 53-bit mantissa, r = num * 2^E mod den in
    (0, den / 2); no ties below den = 2^40) puts side * fl(num / den) side * r /
    (den * 2^E) below k, and the product rounds back to k only within half the float64
    gap below k: 2^(e_k - 53), or 2^(e_k - 54) when k = 2^e_k (a tie rounds to k, whose
    last mantissa bit is 0)."""
    k, rest = int_divmod(side * num, den)
    e_q = floor_log2_ratio(num, den)
    r = int_divmod(int_divmod(num, den)[1] * _pow2_mod(52 - e_q, den), den)[1]
    rounded_down = (r > 0) & (2 * r < den)
    e_k = ilog2(k.clamp(min=1))
    # side * r / (den * 2^E) > half gap  <=>  halves * side * r > den * 2^(e_k - e_q)
    halves = torch.where(k == pow2(e_k), torch.full_like(k, 4), torch.full_like(k, 2))
    q, q_rest = int_divmod(halves * side * r, den)
    limit = pow2(e_k - e_q)
    falls = (q > limit) | ((q == limit) & (q_rest > 0))
    return k - ((rest == 0) & rounded_down & falls).to(torch.int64)


def float32_ratio(num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """float32(num / den) as (S, p), the float S * 2^-p with S in [2^23, 2^24], for int64
    1-element num, den in [1, 2^15): S = num * 2^p / den rounded to nearest, by long
    division in steps of at most 16 bits (OpenVINO's float32 Divide is an ulp off for a
    quarter of the quotients). No ties: a quotient half-way between floats would need
    num >= 2^24."""
    p = 23 - floor_log2_ratio(num, den)                     # in [9, 37]
    q, r = int_divmod(num, den)
    for step in range(3):
        bits = pow2((p - 16 * step).clamp(0, 16))
        digit, r = int_divmod(r * bits, den)
        q = q * bits + digit
    return q + (2 * r > den).to(torch.int64), p
