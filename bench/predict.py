"""Prediction speed and INT8 accuracy on the CPU, one process. Sections:

    python bench/predict.py latency [--runs 7] [--threads 2] [--models r50 demo]
    python bench/predict.py int8-ap [--checkpoint /tmp/demo_full/model_best.pth]
    python bench/predict.py throughput [--images 32] [--runs 3] [--threads 2]

latency: one 800x1066 image, --threads threads: eager float (our MaskRCNN, its fast path),
ONNX Runtime float and INT8 (deploy.quantize_onnx, its defaults), OpenVINO float (and
OpenVINO on the INT8 file). Median of --runs after one warm-up run; ratios against eager
and INT8 against ONNX Runtime float. Models:
  r50   Mask R-CNN R50-FPN converted from torchvision's maskrcnn_resnet50_fpn with random
        weights calibrated to make 100 detections (as bench/export.py); INT8 calibrated on
        4 random 800x1066 images;
  demo  the demo checkpoint (ResNet-18, FPN 64, trained on 128 px shapes) at min_size 800 /
        max_size 1333, on a mosaic of 128 px shapes scenes; INT8 calibrated on 32 shapes
        training-split images (seed 2000, not the held-out set).

int8-ap: bbox / segm AP (pycocotools, engine.evaluate) of the demo checkpoint on its
held-out set in ONNX Runtime, float and INT8, for each choice of what stays float
(VARIANTS; "default" is what quantize_onnx does), with each variant's ONNX Runtime time on
the demo model's 800x1066 mosaic. Calibration: --calibration-count shapes training-split
images generated with seed 2000 (the demo trains on seed 0, holds out seed 1000).

throughput: images/s over --images JPEGs of mixed sizes (480x640 to 1200x1600 mosaics of
held-out shapes scenes) with an overlay PNG written per image, the demo checkpoint,
--threads torch threads: the one-by-one loop `maskrcnn predict` ran before the Predictor
(decode, model, draw and save in turn) against engine.Predictor (batch 1 and 4, two
decoding threads, the overlays drawn in its writer thread). Best of --runs.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deploy  # noqa: E402
from bench.export import count, timed, torchvision_model  # noqa: E402
from maskrcnn import MaskRCNN  # noqa: E402

SIZE = (800, 1066)
DEMO_CHECKPOINT = "/tmp/demo_full/model_best.pth"
CALIBRATION_SEED = 2000
# What stays float, the choices measured by int8-ap: quantize_onnx keyword arguments.
VARIANTS = {
    "default": {},
    "all ORT op types": dict(op_types=None, keep_float=()),
    "Conv/Gemm, heads' outputs too": dict(keep_float=()),
    "backbone + FPN only": dict(keep_float=("/model/rpn", "/model/roi_heads")),
}


# ----------------------------------------------------------------------------- shared

def shapes_images(folder: Path, split: str, n: int, seed: int, num_classes: int = 3) -> list:
    """n generated 128 px shapes images (engine.shapes) as Tensor[3, 128, 128]."""
    from engine.data import load_rgb
    from engine.shapes import make_shapes
    _, images = make_shapes(folder, split, n, 128, num_classes, seed=seed)
    return [load_rgb(p) for p in sorted(Path(images).glob("*.png"))][:n]


def mosaic(tiles: list, size=SIZE) -> torch.Tensor:
    """Tensor[3, H, W]: 128 px tiles side by side, row by row, cropped to size."""
    rows, cols = -(-size[0] // 128), -(-size[1] // 128)
    grid = torch.cat([torch.cat(tiles[r * cols:(r + 1) * cols], dim=2) for r in range(rows)],
                     dim=1)
    return grid[:, :size[0], :size[1]].contiguous()


def demo_model(checkpoint: str, large: bool) -> MaskRCNN:
    """The demo checkpoint, at its own 128 px sizes or at min 800 / max 1333."""
    sizes = dict(min_size=800, max_size=1333) if large else {}
    return MaskRCNN(pretrained=checkpoint, **sizes).eval()


def export_pair(model, folder: Path, name: str, calibration: list, **variant) -> tuple:
    """(float .onnx, INT8 .onnx) of model in folder."""
    float_path = deploy.export_onnx(model, folder / f"{name}.onnx", example_size=(128, 128))
    int8_path = deploy.quantize_onnx(float_path, folder / f"{name}.int8.onnx", calibration,
                                     progress=False, **variant)
    return float_path, int8_path


# ---------------------------------------------------------------------------- latency

def r50_setup(folder: Path, image: torch.Tensor) -> tuple:
    """(eager model, float .onnx, INT8 .onnx) of the calibrated random R50-FPN."""
    ours = MaskRCNN.from_torchvision(torchvision_model(image)).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.rand(3, *SIZE, generator=g) for _ in range(4)]
    return (ours, *export_pair(ours, folder, "r50", calibration))


def demo_setup(folder: Path, checkpoint: str) -> tuple:
    """(eager model, float .onnx, INT8 .onnx, mosaic image) of the demo checkpoint."""
    model = demo_model(checkpoint, large=True)
    calibration = shapes_images(folder / "shapes", "train", 32, CALIBRATION_SEED)
    tiles = shapes_images(folder / "shapes", "mosaic", 63, CALIBRATION_SEED + 1)
    return (model, *export_pair(model, folder, "demo800", calibration), mosaic(tiles))


def latency_rows(model, float_path, int8_path, image, runs: int, threads: int) -> list:
    """[(runtime, seconds or None, detections or why not)] of the runtimes."""
    runtimes = [
        ("eager float (PyTorch)", lambda: lambda x: model([x])),
        ("ONNX Runtime float", lambda: deploy.OnnxPredictor(float_path, threads)),
        ("ONNX Runtime INT8", lambda: deploy.OnnxPredictor(int8_path, threads)),
        ("OpenVINO float", lambda: deploy.OpenVinoPredictor(float_path, threads)),
        ("OpenVINO on the INT8 file", lambda: deploy.OpenVinoPredictor(int8_path, threads))]
    rows = []
    for name, make in runtimes:
        try:
            runner = make()
            with torch.no_grad():
                seconds, out = timed(lambda: runner(image), runs)
            rows.append((name, seconds, count(out)))
        except Exception as err:          # a runtime that cannot run a model: say why
            rows.append((name, None, f"failed: {type(err).__name__}: {str(err)[:120]}"))
        print(f"  {rows[-1]}", flush=True)
    return rows


def print_latency(title: str, rows: list) -> None:
    seconds = {name: s for name, s, _ in rows}
    base, ort = seconds["eager float (PyTorch)"], seconds["ONNX Runtime float"]
    print(f"\n{title}\n")
    print(f"| {'runtime':27s} | {'seconds':>7s} | {'vs eager':>8s} | {'vs ORT float':>12s} "
          f"| detections |")
    print(f"|{'-' * 29}|{'-' * 9}|{'-' * 10}|{'-' * 14}|------------|")
    for name, s, note in rows:
        if s is None:
            print(f"| {name:27s} | {'-':>7s} | {'-':>8s} | {'-':>12s} | {note} |")
            continue
        vs_eager = f"{s / base:7.2f}x" if base else "-"
        speedup = f"{ort / s:10.2f}x" if ort else "-"
        print(f"| {name:27s} | {s:7.3f} | {vs_eager:>8s} | {speedup:>12s} | {note} |")
    print("(vs ORT float: ONNX Runtime float time / this time, > 1 is faster)")


def latency(args) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"{SIZE[0]}x{SIZE[1]}, {args.threads} threads, median of {args.runs} after a "
              f"warm-up")
    for name in args.models:
        print(f"{name}: export and quantize ...", flush=True)
        if name == "r50":
            image = torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(0))
            model, float_path, int8_path = r50_setup(out, image)
            title = f"R50-FPN (torchvision-converted, calibrated random weights), {header}"
        else:
            model, float_path, int8_path, image = demo_setup(out, args.checkpoint)
            title = (f"demo checkpoint (ResNet-18, FPN 64) at min_size 800, shapes mosaic, "
                     f"{header}")
        print_latency(title, latency_rows(model, float_path, int8_path, image, args.runs,
                                          args.threads))
    return 0


# ---------------------------------------------------------------------------- int8-ap

class _Runner:
    """A predictor called as engine.evaluate calls a model: runner(images) -> [dict]."""

    def __init__(self, predictor):
        self.predictor = predictor

    def eval(self):
        return self

    def __call__(self, images):
        return [self.predictor(image) for image in images]


def _ap(predictor, dataset) -> tuple[float, float]:
    from engine.evaluate import evaluate
    metrics = evaluate(_Runner(predictor), dataset, progress=False)
    return metrics["bbox"]["AP"], metrics["segm"]["AP"]


def int8_ap(args) -> int:
    from engine.data import CocoInstances
    torch.set_num_threads(args.threads)
    for path in (args.checkpoint, args.val_json, args.val_images):
        if not Path(path).exists():
            sys.exit(f"{path} not found: train the demo with `maskrcnn demo --out "
                     f"/tmp/demo_full` (or pass --checkpoint / --val-json / --val-images)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = CocoInstances(args.val_json, args.val_images, train=False)
    calibration = shapes_images(out / "shapes", "train", args.calibration_count,
                                CALIBRATION_SEED, dataset.num_classes)
    small, large = demo_model(args.checkpoint, False), demo_model(args.checkpoint, True)
    image = mosaic(shapes_images(out / "shapes", "mosaic", 63, CALIBRATION_SEED + 1))
    float_small = deploy.export_onnx(small, out / "demo.onnx", example_size=(128, 128))
    float_large = deploy.export_onnx(large, out / "demo800.onnx", example_size=(128, 128))
    rows = [("float", float_small, float_large)]
    for name, variant in VARIANTS.items():
        if name in args.variants:
            tag = re.sub(r"\W+", "_", name).strip("_")
            rows.append((name, *(deploy.quantize_onnx(
                path, out / f"{path.stem}.{tag}.int8.onnx", calibration, progress=False,
                **variant) for path in (float_small, float_large))))
    print(f"\n{len(dataset)} held-out images ({args.val_json}), INT8 calibrated on "
          f"{len(calibration)} training-split images; time: ONNX Runtime, {args.threads} "
          f"threads, demo model at min_size 800 on a {SIZE[0]}x{SIZE[1]} shapes mosaic, "
          f"median of {args.runs}\n")
    print(f"| {'ONNX Runtime model':32s} | bbox AP | segm AP | d bbox | d segm | seconds | "
          f"vs float |")
    print(f"|{'-' * 34}|---------|---------|--------|--------|---------|----------|")
    base = None
    for name, path_small, path_large in rows:
        box, segm = _ap(deploy.OnnxPredictor(path_small, args.threads), dataset)
        runner = deploy.OnnxPredictor(path_large, args.threads)
        seconds, _ = timed(lambda: runner(image), args.runs)
        base = base or (box, segm, seconds)
        print(f"| {name:32s} | {box:7.4f} | {segm:7.4f} | {box - base[0]:+6.4f} | "
              f"{segm - base[1]:+6.4f} | {seconds:7.3f} | {base[2] / seconds:7.2f}x |",
              flush=True)
    return 0


# ----------------------------------------------------------------------------- throughput

def jpeg_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """count JPEGs of mixed sizes (480x640 to 1200x1600), each a mosaic of held-out
    shapes scenes, so the model finds objects and the overlays have something to draw."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    scenes = shapes_images(folder / "scenes", "val", 16, 1000)
    out = folder / "jpegs"
    out.mkdir(parents=True, exist_ok=True)
    sizes = [(480, 640), (600, 800), (768, 1024), (900, 1200), (1200, 1600), (640, 480)]
    for i in range(count):
        h, w = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
        need = -(-h // 128) * -(-w // 128)
        picture = mosaic([scenes[(i + k) % len(scenes)] for k in range(need)], (h, w))
        array = (picture.permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(out / f"{i:03d}.jpg", quality=90)
    return out


def one_by_one(model, files, out: Path, class_names) -> None:
    """The loop `maskrcnn predict` ran before the Predictor: decode, model, draw, save,
    one image after the other in one thread."""
    from engine.data import load_rgb
    from tools.visualize import draw_detections
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for path in files:
            image = load_rgb(path)
            detection = model([image])[0]
            draw_detections(image, detection, class_names, 0.5).save(out / f"{path.stem}.png")


def predictor_run(model, files, out: Path, class_names, batch_size: int, workers: int) -> None:
    from engine.predict import OverlayWriter, Predictor
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model, batch_size=batch_size, workers=workers)
    for _ in predictor.run(files, [OverlayWriter(out, class_names)]):
        pass


def throughput(args) -> int:
    """Images/s over a folder of JPEGs: the one-by-one loop vs the Predictor (batched,
    decoding and drawing in threads), the same model, threads and overlays."""
    import tempfile
    from engine.predict import load_model
    torch.set_num_threads(args.threads)
    model, meta = load_model(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        folder = jpeg_folder(Path(tmp), args.images)
        files = sorted(folder.glob("*.jpg"))
        runs = [("old loop (dense masks; decode, model, draw in turn)",
                 lambda o: one_by_one(model, files, o, meta["class_names"]))]
        runs.append(("Predictor workers=0 (one by one, no threads)",
                     lambda o: predictor_run(model, files, o, meta["class_names"], 1, 0)))
        for batch_size, workers in ((1, 2), (4, 2)):
            runs.append((f"Predictor batch {batch_size}, {workers} decode threads + writer",
                         lambda o, b=batch_size, w=workers: predictor_run(
                             model, files, o, meta["class_names"], b, w)))
        rows = []
        for name, fn in runs:
            times = []
            for r in range(args.runs):
                t0 = time.perf_counter()
                fn(Path(tmp) / f"out{len(rows)}_{r}")
                times.append(time.perf_counter() - t0)
            rows.append((name, len(files) / min(times)))
    base = rows[1][1]
    print(f"\nfolder throughput: {args.images} JPEGs of mixed sizes, overlays written, "
          f"{args.threads} torch threads, best of {args.runs}")
    print(f"{'':52s} {'images/s':>9s} {'vs workers=0':>13s}")
    for name, rate in rows:
        print(f"{name:52s} {rate:9.2f} {rate / base:12.2f}x")
    return 0


# ------------------------------------------------------------------------------- main

SECTIONS = {"latency": latency, "int8-ap": int8_ap, "throughput": throughput}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    p = sub.add_parser("latency", help="one 800x1066 image: eager, ONNX Runtime float / "
                                       "INT8, OpenVINO")
    p.add_argument("--models", nargs="+", choices=("r50", "demo"), default=["r50", "demo"])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT, help="the demo model")
    p.add_argument("--out", default="bench_predict", help="folder for the .onnx files")
    p = sub.add_parser("int8-ap", help="held-out AP of float vs INT8 ONNX Runtime")
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    p.add_argument("--val-json", default="/tmp/demo_full/val.json")
    p.add_argument("--val-images", default="/tmp/demo_full/data/val")
    p.add_argument("--calibration-count", type=int, default=32)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_predict")
    p = sub.add_parser("throughput", help="a folder of JPEGs: the one-by-one loop vs the "
                                          "Predictor (batched, decode and draw threads)")
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    return SECTIONS[args.section](args)


if __name__ == "__main__":
    sys.exit(main())
