"""Inference time and memory: our MaskRCNN vs torchvision's, with the same weights.

    python bench/inference.py                 # ResNet-50-FPN, CPU (2 threads), GPU if present
    python bench/inference.py --depth 101 --runs 10

Both models are torchvision's Mask R-CNN architecture with random (seeded) weights and a
frozen-BatchNorm backbone; ours is converted from it with MaskRCNN.from_torchvision, so
both do the same work (the detection counts are printed). Input: one 800 x 1066 image
(no resize at the default min/max size 800/1333), batch 1, eval mode, no_grad.

Time: median over --runs forward passes after --warmup passes (CUDA: synchronised).
Memory: each (model, device) runs in its own child process of this script, so the peak
resident set size (resource.getrusage ru_maxrss) is that model's alone. Reported are the
process peak and the increase during inference (peak after the runs minus the peak
after building the model); on CUDA, torch.cuda.max_memory_allocated during inference.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(which: str, depth: int, num_classes: int):
    import torch
    from torchvision.models.detection import MaskRCNN as TvMaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None)
    tv = TvMaskRCNN(backbone, num_classes=num_classes + 1).eval()
    if which == "torchvision":
        return tv
    if ROOT not in sys.path:
        sys.path.append(ROOT)
    from maskrcnn import MaskRCNN
    return MaskRCNN.from_torchvision(tv).eval()


def child(args) -> dict:
    """Time one model on one device; print a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _build(args.model, args.depth, args.num_classes).to(device)
    height, width = args.size
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1))
    image = image.to(device)
    base_rss = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, detections = [], 0
    with torch.no_grad():
        for i in range(args.warmup + args.runs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = model([image])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
            detections = len(out[0]["boxes"])
    result = dict(model=args.model, device=device.type, ms=1000 * statistics.median(times),
                  detections=detections, peak_rss_mb=_rss_mb(),
                  inference_rss_mb=_rss_mb() - base_rss)
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


def _run_child(args, model: str, device: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model,
           "--device", device, "--depth", str(args.depth), "--runs", str(args.runs),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--num-classes", str(args.num_classes), "--size", *map(str, args.size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} on {device} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101, 152))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--devices", default="auto", help="cpu, cuda, or auto (both if CUDA)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return

    import torch
    devices = ["cpu"] if args.devices == "auto" else args.devices.split(",")
    if args.devices == "auto" and torch.cuda.is_available():
        devices.append("cuda")
    print(f"Mask R-CNN ResNet-{args.depth}-FPN, image {args.size[0]}x{args.size[1]}, batch 1, "
          f"median of {args.runs} runs after {args.warmup} warm-up, CPU threads "
          f"{args.threads}, one child process per row")
    header = f"{'device':6} {'model':12} {'ms/image':>9} {'ours/tv':>8} {'dets':>5} " \
             f"{'peak RSS MB':>12} {'+infer MB':>10} {'CUDA peak MB':>13}"
    print(header)
    print("-" * len(header))
    for device in devices:
        rows = {m: _run_child(args, m, device) for m in ("torchvision", "ours")}
        for name, r in rows.items():
            ratio = r["ms"] / rows["torchvision"]["ms"]
            cuda = f"{r['cuda_peak_mb']:13.0f}" if "cuda_peak_mb" in r else f"{'-':>13}"
            print(f"{device:6} {name:12} {r['ms']:9.1f} {ratio:8.2f} {r['detections']:5d} "
                  f"{r['peak_rss_mb']:12.0f} {r['inference_rss_mb']:10.0f} {cuda}")


if __name__ == "__main__":
    main()
