#!/usr/bin/env python3
"""Kernel benchmark: our RoIAlign / NMS (libs, pooling) against torchvision.ops, in one
process, on the same inputs.

    python bench/kernels.py [--quick] [--runs N] [--threads T] [--no-cuda]

Prints a Markdown table: op, shape, ours ms, torchvision ms, speed-up (torchvision / ours),
for the CPU (``torch.set_num_threads(T)``, default 2) and, when a GPU is visible, CUDA.
Each time is the median of ``--runs`` timed calls after warm-up calls, ours and
torchvision's alternating. Results of both sides are compared before timing (a wrong
fast kernel is not a result).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import libs  # noqa: E402
from libs import ops  # noqa: E402
from pooling import MultiScaleRoIAlign  # noqa: E402

IMAGE_H, IMAGE_W = 800, 1344          # a resized COCO image (padded to a multiple of 32)
STRIDES = (4, 8, 16, 32)              # P2..P5


def realistic_boxes(g, n, *, near_fraction=0.5):
    """Detector-like boxes in the image: log-uniform sides 8..512 px, aspect 1/3..3, a
    fraction of them jittered copies of n/20 objects (overlap, as proposals have)."""
    side = torch.exp(torch.rand(n, generator=g) * 4.16) * 8
    aspect = torch.exp((torch.rand(n, generator=g) - 0.5) * 2.2)
    w, h = side * aspect.sqrt(), side / aspect.sqrt()
    cx = torch.rand(n, generator=g) * IMAGE_W
    cy = torch.rand(n, generator=g) * IMAGE_H
    src = torch.randint(0, max(1, n // 20), (n,), generator=g)
    near = torch.rand(n, generator=g) < near_fraction
    cx = torch.where(near, cx[src] + 0.1 * w[src] * torch.randn(n, generator=g), cx)
    cy = torch.where(near, cy[src] + 0.1 * h[src] * torch.randn(n, generator=g), cy)
    w = torch.where(near, w[src] * (1 + 0.1 * torch.randn(n, generator=g)), w).abs()
    h = torch.where(near, h[src] * (1 + 0.1 * torch.randn(n, generator=g)), h).abs()
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, IMAGE_W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, IMAGE_H)
    return boxes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_ms(ours, theirs, device, runs, warmup):
    """Median ms of each, timed alternately (ours, theirs, ours, ...) so that a change
    in the machine's load during the run hits both sides alike."""
    for _ in range(warmup):
        ours()
        theirs()
    sync(device)
    times = ([], [])
    for _ in range(runs):
        for fn, out in zip((ours, theirs), times):
            start = time.perf_counter()
            fn()
            sync(device)
            out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def check(name, ours, theirs, exact=False):
    if exact:
        ok = torch.equal(ours.cpu(), theirs.cpu())
    else:
        ok = torch.allclose(ours.float().cpu(), theirs.float().cpu(), atol=1e-4, rtol=1e-4)
    if not ok:
        raise SystemExit(f"bench/kernels.py: {name}: ours and torchvision disagree; "
                         "run the tests (pytest tests/libs tests/pooling)")


def cases(device, quick):
    """(op, shape, ours fn, torchvision fn) for one device; inputs built once."""
    g = torch.Generator().manual_seed(0)
    C = 256
    x = torch.randn(1, C, IMAGE_H // 4, IMAGE_W // 4, generator=g).to(device)
    rois = torch.cat([torch.zeros(1000, 1), realistic_boxes(g, 1000)], 1).to(device)
    out = []

    def fwd_ours():
        return libs.roi_align(x, rois, 7, 0.25, 2)

    def fwd_tv():
        return torchvision.ops.roi_align(x, rois, 7, 0.25, 2)

    check("roi_align forward", fwd_ours(), fwd_tv())
    out.append(("RoIAlign fwd", f"1000 RoIs, C={C}, 7x7, sr 2, 1x{C}x200x336",
                fwd_ours, fwd_tv))

    pyramid = [torch.randn(1, C, IMAGE_H // s, IMAGE_W // s, generator=g).to(device)
               for s in STRIDES]
    boxes = [rois[:, 1:]]
    sizes = [(IMAGE_H, IMAGE_W)]
    ours_ms = MultiScaleRoIAlign(7, 2)
    tv_ms = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    named = OrderedDict(zip(["p2", "p3", "p4", "p5"], pyramid))

    def fpn_ours():
        return ours_ms(pyramid, boxes, sizes)

    def fpn_tv():
        return tv_ms(named, boxes, sizes)

    check("MultiScaleRoIAlign", fpn_ours(), fpn_tv())
    out.append(("MultiScaleRoIAlign fwd", f"1000 RoIs, C={C}, 7x7, sr 2, P2..P5",
                fpn_ours, fpn_tv))

    K = 512
    grad = torch.randn(K, C, 14, 14, generator=g).to(device)
    r = rois[:K].contiguous()
    shape = tuple(x.shape)

    def bwd_ours():
        return ops.roi_align_backward(grad, r, 0.25, 14, 14, 2, False, *shape)

    def bwd_tv():
        return torch.ops.torchvision._roi_align_backward(grad, r, 0.25, 14, 14, *shape, 2,
                                                         False)

    check("roi_align backward", bwd_ours(), bwd_tv())
    out.append(("RoIAlign bwd", f"{K} RoIs, C={C}, 14x14, sr 2, 1x{C}x200x336",
                bwd_ours, bwd_tv))

    for n in (1000, 5000) if quick else (1000, 5000, 20000):
        b = realistic_boxes(g, n).to(device)
        s = torch.rand(n, generator=g).to(device)

        def nms_ours(b=b, s=s):
            return libs.nms(b, s, 0.5)

        def nms_tv(b=b, s=s):
            return torchvision.ops.nms(b, s, 0.5)

        check(f"nms n={n}", nms_ours(), nms_tv(), exact=True)
        out.append(("NMS", f"{n} boxes, IoU 0.5", nms_ours, nms_tv))
    return out


def run(device, runs, warmup, quick):
    rows = []
    for op, shape, ours, theirs in cases(device, quick):
        ours_ms, tv_ms = paired_ms(ours, theirs, device, runs, warmup)
        rows.append((device.type, op, shape, ours_ms, tv_ms))
        print(f"  {device.type:4s} {op:24s} ours {ours_ms:9.2f} ms  torchvision "
              f"{tv_ms:9.2f} ms  x{tv_ms / ours_ms:.1f}", file=sys.stderr, flush=True)
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores visible"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, no 20k-box NMS")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per case (median)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--no-cuda", action="store_true", help="CPU only even with a GPU")
    args = ap.parse_args(argv)
    runs = args.runs or (3 if args.quick else 7)
    warmup = 1
    torch.set_num_threads(args.threads)
    info = libs.backend_info()
    print(f"# Kernel benchmark\n\nmachine: {machine()}; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}; CPU threads {torch.get_num_threads()}; "
          f"median of {runs} runs after {warmup} warm-up\n"
          f"backends: cpu = {info['cpu']}; cuda = {info['cuda']}\n")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))
    rows = []
    for device in devices:
        rows += run(device, runs, warmup, args.quick)
    print("| device | op | shape | ours ms | torchvision ms | speed-up |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for dev, op, shape, ours_ms, tv_ms in rows:
        print(f"| {dev} | {op} | {shape} | {ours_ms:.2f} | {tv_ms:.2f} | "
              f"{tv_ms / ours_ms:.1f}x |")
    if not torch.cuda.is_available():
        print("\n(no GPU visible: CUDA columns not measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
