"""Winograd 3x3 convolution (libs.conv3x3) against PyTorch's direct one (oneDNN on CPU).

    python bench/winograd.py                 # 2 threads, forward and forward + backward
    python bench/winograd.py --threads 1 --runs 9

Shapes are the 3x3 stride-1 convolutions of Mask R-CNN on an 800 x 1066 image (padded to
800 x 1088): the FPN output / RPN convs on P2..P4, a ResNet layer1..layer4 conv2, and the
mask head's convs on 100 RoIs of 14 x 14. Both run on channels-last float32 inputs with
bias and ReLU (F.conv2d + relu_ for PyTorch, fused into the output transform for ours);
the table gives the median of --runs alternating calls and the largest difference from
the float64 result for each, so the speed and the rounding cost are read side by side.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, N, C_in, C_out, H, W)
SHAPES = [
    ("FPN/RPN P2", 1, 256, 256, 200, 272),
    ("FPN/RPN P3", 1, 256, 256, 100, 136),
    ("FPN/RPN P4", 1, 256, 256, 50, 68),
    ("layer1 conv2", 1, 64, 64, 200, 272),
    ("layer2 conv2", 1, 128, 128, 100, 136),
    ("layer3 conv2", 1, 256, 256, 50, 68),
    ("layer4 conv2", 1, 512, 512, 25, 34),
    ("mask head", 100, 256, 256, 14, 14),
]


def _times(fns: dict, runs: int) -> dict:
    """Median seconds of each callable, calls alternating, after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_shape(shape, runs: int, backward: bool):
    import torch
    import torch.nn.functional as F

    import libs
    _, n, c, k, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
    bias = torch.randn(k, generator=g)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu()
    direct = lambda: F.conv2d(x, weight, bias, padding=1).relu_()  # noqa: E731
    wino = lambda: libs.conv3x3(x, weight, bias, relu=True)         # noqa: E731
    errors = [(fn().double() - ref).abs().max().item() for fn in (direct, wino)]
    fns = {"direct": direct, "winograd": wino}
    if backward:
        params = [t.requires_grad_(True) for t in (x, weight, bias)]
        grad = torch.randn(ref.shape, generator=g).contiguous(
            memory_format=torch.channels_last)

        def step(fn):
            def run():
                torch.autograd.grad(fn(*params), params, grad)
            return run
        fns = {"direct": step(lambda a, b, c: F.relu(F.conv2d(a, b, c, padding=1))),
               "winograd": step(lambda a, b, c: libs.conv3x3(a, b, c, relu=True))}
    times = _times(fns, runs)
    return times["direct"], times["winograd"], errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    from libs import ops
    torch.set_num_threads(args.threads)
    if not ops.winograd_available():
        sys.exit("the CPU kernels are not built: run `python libs/build_libs.py`")
    print(f"3x3 conv + bias + ReLU, float32 channels-last, CPU threads {args.threads}, "
          f"median of {args.runs}")
    header = (f"{'conv':14} {'N x C -> K x HxW':>24} {'pass':>8} {'direct ms':>10} "
              f"{'winograd ms':>12} {'speed-up':>9} {'err direct':>11} {'err wino':>9}")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        name, n, c, k, h, w = shape
        for backward in (False, True):
            d, wg, (e_d, e_w) = bench_shape(shape, args.runs, backward)
            print(f"{name:14} {f'{n} x {c} -> {k} x {h}x{w}':>24} "
                  f"{'fwd+bwd' if backward else 'fwd':>8} {1000 * d:10.1f} {1000 * wg:12.1f} "
                  f"{d / wg:8.2f}x {e_d:11.1e} {e_w:9.1e}")


if __name__ == "__main__":
    main()
