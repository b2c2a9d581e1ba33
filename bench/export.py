"""Exported Mask R-CNN R50-FPN against eager, one 800 x 1066 image, 2 threads, one process.

    python bench/export.py [--runs 3] [--threads 2] [--out bench_export]

Rows: ours eager (the fast path), ONNX Runtime on our export (deploy.export_onnx),
ONNX Runtime on torchvision's own export of maskrcnn_resnet50_fpn (torch.onnx.export,
dynamo=False), and OpenVINO on both ONNX files when `openvino` is installed. The weights
are random (no downloads), calibrated as the tests do (tests/zoo/torchvision_oracle.py) so
that the model makes 100 detections and mask pasting costs what it costs on real images;
ours is converted from the same torchvision model. Time: median of --runs after one
warm-up run. Ratios: time / ours eager.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deploy  # noqa: E402
from maskrcnn import MaskRCNN  # noqa: E402
from tests.zoo.torchvision_oracle import calibrate, damp_residual_blocks  # noqa: E402

SIZE = (800, 1066)


def timed(fn, runs: int) -> tuple[float, int]:
    """(median seconds over runs after one warm-up, detections of the last run)."""
    out = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def torchvision_model(image):
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    damp_residual_blocks(tv.backbone)
    return calibrate(tv, image)


def export_torchvision(tv, image, path: Path) -> Path:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tv, ([image],), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["boxes", "labels", "scores",
                                                               "masks"],
                          dynamic_axes={"image": {1: "height", 2: "width"}})
    return path


def count(out) -> int:
    """Detections in an eager output (a list of dicts) or a predictor's dict."""
    return int((out[0] if isinstance(out, list) else out)["boxes"].shape[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_export", help="folder for the .onnx files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(0))
    tv = torchvision_model(image)
    ours = MaskRCNN.from_torchvision(tv).eval()
    ours_onnx = deploy.export_onnx(ours, out / "ours.onnx", example_size=(480, 640))
    tv_onnx = export_torchvision(tv, image, out / "torchvision.onnx")

    rows = []

    def add(name, fn):
        try:
            seconds, result = timed(fn, args.runs)
            rows.append((name, seconds, count(result)))
        except Exception as err:          # a backend that cannot run a model: say why
            rows.append((name, None, f"failed: {type(err).__name__}: {str(err)[:120]}"))
        print(rows[-1], flush=True)

    with torch.no_grad():
        add("ours, eager (PyTorch)", lambda: ours([image]))
        add("torchvision, eager (PyTorch)", lambda: tv([image]))
    add("ours, ONNX Runtime", lambda r=deploy.OnnxPredictor(ours_onnx, args.threads): r(image))
    add("torchvision export, ONNX Runtime",
        lambda r=deploy.OnnxPredictor(tv_onnx, args.threads): r(image))
    try:
        import openvino  # noqa: F401
        for name, path in (("ours", ours_onnx), ("torchvision export", tv_onnx)):
            try:
                runner = deploy.OpenVinoPredictor(path, args.threads)
            except Exception as err:
                rows.append((f"{name}, OpenVINO", None, f"failed to compile: "
                                                        f"{str(err)[:120]}"))
                continue
            add(f"{name}, OpenVINO", lambda r=runner: r(image))
    except ImportError:
        rows.append(("OpenVINO", None, "not installed"))

    base = rows[0][1]
    print(f"\n{SIZE[0]}x{SIZE[1]} image, {args.threads} threads, median of {args.runs}\n")
    print(f"| {'runtime':38s} | {'seconds':>7s} | {'vs ours eager':>13s} | detections |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 15}|------------|")
    for name, seconds, note in rows:
        if seconds is None:
            print(f"| {name:38s} | {'-':>7s} | {'-':>13s} | {note} |")
        else:
            print(f"| {name:38s} | {seconds:7.2f} | {seconds / base:12.2f}x | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
