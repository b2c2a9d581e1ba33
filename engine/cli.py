"""The `maskrcnn` command: train, eval, predict, demo, check-data, doctor.

    maskrcnn train --config my.ini --set solver.lr=0.01 --set solver.max_iter=1000 [--resume]
    maskrcnn eval --weights outputs/model_0001000.pth --data val.json --images val/
    maskrcnn predict --weights outputs/model_0001000.pth img1.png folder/ --out preds/
    maskrcnn predict --weights coco photo.jpg           # the COCO model of the zoo
    maskrcnn zoo                                        # the zoo: AP, cached or not
    maskrcnn export-weights --weights outputs/model_0001000.pth --out model.safetensors
    maskrcnn export --weights coco --format onnx --out model.onnx   # or --format pt2
    maskrcnn export --weights W --format onnx --int8 --calibration my_images/ --out m.onnx
    maskrcnn demo [--out outputs/demo] [--iters 2400 | --minutes 10]
    maskrcnn doctor [--json]                            # versions, kernels, GPUs, cache
    maskrcnn convert-data --from labelme data/labelme --out train.json   # or voc / yolo
    maskrcnn check-data --data train.json --images train/ [--val-data val.json --val-images val/]
    maskrcnn check-data --config my.ini [--fast] [--json]   # the sets of [data]; exit 1 on errors

    torchrun --nproc-per-node 4 -m engine.cli train --config my.ini     # DDP, one GPU each

Bad arguments (unknown config key, wrong type, missing file) end with an argparse usage
error (exit code 2) that names the problem. An output that cannot be created (under a
regular file, in a read-only folder) is one line `maskrcnn <command>: error: ...` naming
it, exit code 2, found before any work; a failure while running (an unreadable image with
`eval --on-error raise`) is such a line with exit code 1: a command raises `CliError` and
main() prints it, never a traceback. A training run stopped by a NaN/inf loss exits with
code 1 after printing the iteration and the loss values.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import configs
from configs import DEFAULT_CONFIG, apply_overrides, load_config
from maskrcnn import __version__

# The demo recipe shipped with the package (found wherever it is installed).
DEMO_CONFIG = configs.shipped("demo.ini")
# The target for the demo (held-out synthetic shapes, 10 minutes on 2 cores).
DEMO_TARGET = {"AP": 0.40, "AP50": 0.60}
# Seconds per demo iteration on the reference machine (2 CPU cores, idle; docs/demo.md):
# only for the expected time printed before training.
DEMO_SECONDS_PER_ITER = {"cpu": 0.25}
# Images `maskrcnn export --int8` calibrates on by default: each runs once through the
# float graph. Demo model, box / mask AP change against float: 8 images -0.0037 / -0.0018,
# 32 -0.0023 / -0.0017, 128 -0.0031 / -0.0061 (MinMax ranges widen with rare outliers);
# docs/benchmarks.md, INT8.
CALIBRATION_COUNT = 32


# ----------------------------------------------------------------------------- parser

def _add_set(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help=f"override a config key ({what}); bare keys work too (key names "
                        f"are unique across sections); repeatable")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu or cuda:0 (default: cuda if available, "
                        "else cpu)")


def _add_inference_options(p: argparse.ArgumentParser, what: str) -> None:
    """--device, --set and --no-progress of the commands that run a model on images."""
    _add_device(p)
    _add_set(p, what)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar over the images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn", description="Mask R-CNN: train, evaluate, predict, demo.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a model from a config file",
                       description="Train on the data set named in the config (COCO JSON, "
                                   "labelme, Pascal VOC or YOLO-seg: [data] format); "
                                   "checkpoints, log.jsonl and loss.png go "
                                   "to [solver] output_dir. Run under torchrun for DDP.")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="config file (any subset of config.ini's keys)")
    _add_set(p, "applied over --config")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the newest checkpoint in output_dir")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar: one line per [solver] log_every iterations instead "
                        "(for log files: SLURM, nohup, CI)")
    p.set_defaults(func=cmd_train, command_parser=p)

    p = sub.add_parser("eval", help="COCO bbox/segm AP of a checkpoint on a data set",
                       description="Evaluate a checkpoint with pycocotools (bbox and segm "
                                   "AP, per-category AP) and write the COCO results JSON.")
    p.add_argument("--weights", required=True, metavar="FILE", help="training checkpoint")
    p.add_argument("--data", required=True, metavar="JSON", help="COCO instances JSON")
    p.add_argument("--images", required=True, metavar="DIR", help="image directory")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: the checkpoint's eval_batch_size)")
    p.add_argument("--mask-threshold", type=float, default=None,
                   help="mask probability >= this is foreground (default: the "
                        "checkpoint's mask_threshold)")
    p.add_argument("--results", metavar="FILE", default=None,
                   help="write the detections here in the COCO results format")
    p.add_argument("--metrics", metavar="FILE", default=None,
                   help="write the metrics (with per-category AP and the skipped images) "
                        "here as JSON")
    p.add_argument("--plots", metavar="DIR", default=None,
                   help="write precision-recall curves here: pr_<bbox|segm>.png (overall, "
                        "IoU 0.50:0.95, 0.50, 0.75) and pr_<bbox|segm>_per_category.png "
                        "(default: beside --metrics when given, else none)")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="an unreadable image (missing, truncated, not an image, wrong "
                        "size): skip it with a warning and score the other images "
                        "(default), or stop with an error naming it")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="image reading processes (default: the checkpoint's num_workers)")
    p.add_argument("--loss", action="store_true",
                   help="also report the validation loss (model.eval() with targets)")
    _add_inference_options(p, "model inference keys, e.g. box_score_thresh=0.01")
    p.set_defaults(func=cmd_eval, command_parser=p)

    p = sub.add_parser("predict", help="overlays + COCO results JSON for image files",
                       description="Run a model on image files, folders and globs (an "
                                   "engine.Predictor): <out>/results.json (COCO results with "
                                   "file_name, masks as RLE), <out>/<image>.png overlays and/"
                                   "or <out>/results.jsonl (one line per image). Unreadable "
                                   "images are skipped, named in a warning and the summary.")
    p.add_argument("--weights", required=True, metavar="W",
                   help="training checkpoint, exported weights, 'coco', a zoo name (see "
                        "`maskrcnn zoo`) or an exported .onnx (--runtime onnxruntime or "
                        "openvino)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (their images, non-recursive) or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--format", default="coco,overlays", metavar="LIST",
                   help=f"what to write, comma-separated from {', '.join(OUTPUT_FORMATS)} "
                        f"(default coco,overlays)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="images per model call (results do not depend on it; default 1)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="threads decoding images ahead of the model (default 2; 0: none)")
    p.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "openvino"),
                   help="torch (default), or the model exported to ONNX and run in ONNX "
                        "Runtime / OpenVINO")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="run images larger than PX x PX as overlapping tiles (large aerial, "
                        "microscopy or document images; memory follows the tile)")
    p.add_argument("--tile-overlap", type=float, default=0.2, metavar="F",
                   help="fraction of a tile shared with its neighbours (default 0.2)")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="detections drawn in overlays score at least this (default 0.5)")
    p.add_argument("--mask-threshold", type=float, default=0.5,
                   help="mask probability >= this is foreground (default 0.5)")
    _add_inference_options(p, "model inference keys")
    p.set_defaults(func=cmd_predict, command_parser=p)

    p = sub.add_parser("export-weights", help="model-only weights file of a checkpoint",
                       description="Write a training checkpoint's model weights, config and "
                                   "categories as a safetensors file (no optimizer or RNG "
                                   "state); MaskRCNN(pretrained=FILE) and "
                                   "MaskRCNN.from_checkpoint(FILE) load it like the "
                                   "checkpoint.")
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="training checkpoint (outputs/model_*.pth)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the weights file to write (e.g. model.safetensors); replaced "
                        "atomically")
    p.set_defaults(func=cmd_export_weights, command_parser=p)

    p = sub.add_parser("export", help="ONNX / torch.export file for deployment",
                       description="Export a model for inference without this library: the "
                                   "image transform, RPN, RoI heads, NMS and mask pasting in "
                                   "one graph that takes an RGB [0, 1] image Tensor[3, H, W] "
                                   "of any size (batch 1). onnx: ONNX Runtime, OpenVINO; "
                                   "pt2: torch.export (torch.export.load after `import libs`). "
                                   "See README.md, Export.")
    p.add_argument("--weights", required=True, metavar="W",
                   help="what MaskRCNN(pretrained=W) takes: a zoo name ('coco', see `maskrcnn "
                        "zoo`), our checkpoint or weights file, or a torchvision / "
                        "detectron2 file (with --config naming its preset)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="config / preset for the weights (e.g. configs/zoo/torchvision/"
                        "maskrcnn_resnet50_fpn.ini for a torchvision file)")
    p.add_argument("--format", required=True, choices=("onnx", "pt2"),
                   help="onnx (ONNX opset 17, TorchScript exporter) or pt2 (torch.export "
                        "ExportedProgram)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--example-size", type=int, nargs=2, default=(480, 640),
                   metavar=("H", "W"), help="image size traced with (the graph takes any "
                                            "size; default 480 640)")
    p.add_argument("--int8", action="store_true",
                   help="onnx only: INT8 for the CPU (ONNX Runtime static quantization, "
                        "QDQ, per-channel weights) calibrated on --calibration images; "
                        "see README.md, Export: INT8")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="with --int8: a folder of your images (like those the model will "
                        "see) to calibrate the activation ranges on")
    p.add_argument("--calibration-count", type=int, default=CALIBRATION_COUNT, metavar="N",
                   help=f"with --int8: calibrate on N images of the folder, spread over its "
                        f"sorted listing (default {CALIBRATION_COUNT})")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar over the calibration images")
    _add_set(p, "test-time keys, e.g. box_score_thresh=0.3, applied before export")
    p.set_defaults(func=cmd_export, command_parser=p)

    p = sub.add_parser("zoo", help="list the COCO-pretrained models",
                       description="The model zoo: each entry's name (for pretrained= and "
                                   "--weights), published COCO AP and whether its file is in "
                                   "the torch hub cache.")
    p.set_defaults(func=cmd_zoo, command_parser=p)

    p = sub.add_parser("demo", help="train + evaluate on generated shapes (make demo)",
                       description="Generate the synthetic shapes data set, train a fixed "
                                   "number of iterations (config.ini + configs/demo.ini + "
                                   "--set; seeded, so the AP does not depend on the machine), "
                                   "evaluate on the held-out shapes and write metrics.json, "
                                   "overlays/, loss.png and log.jsonl to --out.")
    p.add_argument("--out", default="outputs/demo", metavar="DIR",
                   help="output directory (default outputs/demo)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--iters", type=int, default=None, metavar="N",
                        help="training iterations (default: demo.demo_iters)")
    budget.add_argument("--minutes", type=float, default=None, metavar="M",
                        help="train for a wall-clock budget in minutes instead, evaluation "
                             "excluded (default: demo.demo_minutes, 0 = none); the AP then "
                             "depends on the machine's speed and load")
    _add_set(p, "applied over configs/demo.ini")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar: one line per [solver] log_every iterations instead "
                        "(for log files: SLURM, nohup, CI)")
    p.set_defaults(func=cmd_demo, command_parser=p)

    p = sub.add_parser("check-data", help="a data set's problems, before training on it",
                       description="Check a COCO-format data set (and its val set) for the "
                                   "mistakes that train quietly to AP 0: ids, files, sizes "
                                   "(EXIF orientation), crowd, boxes (convention, outside), "
                                   "masks, categories. A table per set, then each finding "
                                   "with its fix. Exit status 1 when there are errors, 0 "
                                   "with warnings only.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="JSON",
                        help="annotations (a COCO JSON; the source of --format otherwise)")
    source.add_argument("--config", metavar="FILE",
                        help="take the train and val sets from this config's [data]")
    p.add_argument("--images", metavar="DIR", help="image directory of --data")
    p.add_argument("--val-data", metavar="JSON", help="validation annotations")
    p.add_argument("--val-images", metavar="DIR", help="image directory of --val-data")
    p.add_argument("--format", default="coco", choices=("coco", "labelme", "voc", "yolo"),
                   help="annotation format of --data / --val-data (default coco; "
                        "--images may then be left out where the format finds its images)")
    p.add_argument("--min-instances", type=int, default=None, metavar="N",
                   help="report categories with fewer non-crowd instances (default 10)")
    p.add_argument("--fast", action="store_true",
                   help="read image headers only (as `maskrcnn train` does), not every "
                        "image's pixels (truncated files go unnoticed)")
    p.add_argument("--json", action="store_true", help="the findings as JSON on stdout")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar over the images")
    _add_set(p, "applied over --config")
    p.set_defaults(func=cmd_check_data, command_parser=p)

    p = sub.add_parser("doctor", help="what this installation has (for you or a bug report)",
                       description="Versions, the kernel libraries (loaded or why not), the "
                                   "CUDA architectures against each visible GPU, CPU "
                                   "features, threads, optional extras and the zoo cache. "
                                   "Exit status 1 when a visible device has no native "
                                   "kernel.")
    p.add_argument("--json", action="store_true", help="the report as JSON (for bug reports)")
    p.add_argument("--verify-zoo", action="store_true",
                   help="re-hash the cached zoo files against their sha256 (seconds per file)")
    p.set_defaults(func=cmd_doctor, command_parser=p)
    _add_convert_data(sub)
    return parser


def _add_convert_data(sub) -> None:
    p = sub.add_parser("convert-data", help="labelme / VOC / YOLO-seg annotations -> COCO JSON",
                       description="Write a COCO instances JSON (polygons or RLE) of a "
                                   "labelme folder, a Pascal VOC root or list, or a YOLO "
                                   "data.yaml; the rules per format are in README "
                                   "'Train on your data'. Training reads these formats "
                                   "directly too ([data] format).")
    p.add_argument("--from", dest="fmt", required=True, choices=("labelme", "voc", "yolo"),
                   help="the source's format")
    p.add_argument("source", metavar="SRC",
                   help="labelme: folder of JSONs; voc: VOC root or ImageSets list file; "
                        "yolo: data.yaml")
    p.add_argument("--split", default="train", choices=("train", "val"),
                   help="voc root / yolo: which split's list or entry (default train)")
    p.add_argument("--images", metavar="DIR", default=None,
                   help="labelme: folder to find images by name in (and to decode embedded "
                        "imageData to); voc: image folder (default <root>/JPEGImages); "
                        "yolo: the split's image folder instead of data.yaml's")
    p.add_argument("--classes", default=None, metavar="FILE|NAMES",
                   help="class names in category-id order: a file with one per line "
                        "(labelme's labels.txt) or 'a, b, c' (default: the format's order)")
    p.add_argument("--out", required=True, metavar="JSON", help="the COCO JSON to write")
    p.set_defaults(func=cmd_convert_data, command_parser=p)


class CliError(Exception):
    """A command's one-line failure: main() prints `maskrcnn <command>: error: <message>`
    on stderr (no traceback) and exits with `code` (2: a bad argument found before any
    work, as argparse; 1: a failure while running)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(" ".join(str(message).split("\n")))
        self.code = code


def _output_path(option: str, path, folder: bool = False) -> Path:
    """path checked before any work: a file output must not be a folder (a folder
    output not a file), and the nearest existing folder above it must be writable, so the
    output can be created there. Raises CliError (code 2) naming the option and path."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise CliError(f"{option} {path}: is a file; name a folder", 2)
    if not folder and path.is_dir():
        raise CliError(f"{option} {path}: is a folder; name the file to write", 2)
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"{option} {path}: cannot be created: {existing} is a file, not a "
                       f"folder", 2)
    target = path if path.exists() else existing
    if not os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
        raise CliError(f"{option} {path}: cannot be created: no permission to write in "
                       f"{target}", 2)
    return path


def _parse_sets(parser, sets: Sequence[Sequence[str]]) -> dict:
    overrides = {}
    for item in (s for group in sets for s in group):
        if "=" not in item:
            parser.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides


def _config(parser, path, sets) -> "EasyDict":  # noqa: F821
    try:
        cfg = load_config(path)
        return apply_overrides(cfg, _parse_sets(parser, sets))
    except FileNotFoundError as err:
        parser.error(str(err))
    except ValueError as err:
        parser.error(str(err))


def _device(parser, name: Optional[str]):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        parser.error(f"--device {name!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name!r}: CUDA is not available")
    return device


def _need_file(parser, option: str, path, folder: bool = False) -> None:
    ok = Path(path).is_dir() if folder else Path(path).is_file()
    if not ok:
        parser.error(f"{option} {path}: {'folder' if folder else 'file'} not found")


# ---------------------------------------------------------------------------- commands

def cmd_train(args, parser) -> int:
    from engine.initialise import RunConfigError
    from engine.train import MissingPackageError, NonFiniteLossError, train
    _need_file(parser, "--config", args.config)
    cfg = _config(parser, args.config, args.sets)
    from engine.check import DataCheckError
    from engine.distributed import is_main_process
    try:
        summary = train(cfg, resume=args.resume, progress=args.progress)
    except DataCheckError as err:
        if is_main_process():
            print(err.report(), file=sys.stderr)
            print(f"error: {err}\n(training stopped before it started; [data] check_data = "
                  f"false skips the check)", file=sys.stderr)
        return 1
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, MissingPackageError, RunConfigError) as err:
        parser.error(str(err))
    if is_main_process():
        _print_summary(summary)
    return 0


def _inference_overrides(parser, sets) -> dict:
    overrides = _parse_sets(parser, sets)
    try:
        apply_overrides(load_config(DEFAULT_CONFIG), overrides)
    except ValueError as err:
        parser.error(str(err))
    return overrides


def cmd_eval(args, parser) -> int:
    from engine import distributed as dist_utils
    from engine.data import CocoInstances, ImageError
    from engine.evaluate import evaluate
    from engine.predict import is_zoo_name, load_model
    if not is_zoo_name(args.weights):
        _need_file(parser, "--weights", args.weights)
    _need_file(parser, "--data", args.data)
    _need_file(parser, "--images", args.images, folder=True)
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num-workers {args.num_workers}: must be >= 0")
    plots = args.plots or (str(Path(args.metrics).parent) if args.metrics else None)
    for option, path, folder in (("--results", args.results, False),
                                 ("--metrics", args.metrics, False),
                                 ("--plots", plots, True)):
        if path:
            _output_path(option, path, folder)
    overrides = _inference_overrides(parser, args.sets)
    dist_utils.init_distributed()
    device = (dist_utils.device_for_rank() if args.device is None
              else _device(parser, args.device))
    try:
        model, meta = load_model(args.weights, device, overrides)
    except ValueError as err:
        parser.error(f"--weights {err}")
    try:
        dataset = CocoInstances(args.data, args.images, train=False)
    except ValueError as err:
        parser.error(f"--data {err}")
    if [int(c) for c in dataset.cat_ids] != [int(c) for c in meta["cat_ids"]]:
        parser.error(f"--data {args.data}: category ids {dataset.cat_ids} differ from the "
                     f"checkpoint's {meta['cat_ids']} (the model's classes)")
    cfg = meta["config"]
    workers = cfg.data.num_workers if args.num_workers is None else args.num_workers
    try:
        metrics = evaluate(
            model, dataset,
            batch_size=args.batch_size or cfg.eval.eval_batch_size, device=device,
            mask_threshold=(cfg.eval.mask_threshold if args.mask_threshold is None
                            else args.mask_threshold),
            progress=args.progress, table=False, compute_loss=args.loss, details=True,
            results_path=args.results, on_error=args.on_error, num_workers=workers,
            plots_dir=plots)
    except ImageError as err:
        hint = "; --on-error skip scores the other images" if args.on_error == "raise" else ""
        raise CliError(f"{err}{hint}") from None
    except OSError as err:      # an output that could not be written after all (disk full)
        raise CliError(str(err)) from None
    if dist_utils.is_main_process():
        _report_eval(metrics, args, plots, len(dataset))
    return 0


def _report_eval(metrics: dict, args, plots: Optional[str], total: int) -> None:
    """The AP tables, the validation loss, the skipped images; the metrics JSON."""
    from engine.evaluate import format_skipped, format_table
    print(format_table(metrics, metrics["per_category"]))
    if "loss" in metrics:
        print("validation loss: " + ", ".join(f"{k}={v:.4f}"
                                              for k, v in metrics["loss"].items()))
    if metrics["skipped"]:
        print(format_skipped(metrics["skipped"], total))
    if plots:
        print(f"precision-recall curves: {plots}/pr_*.png")
    if args.metrics:
        try:
            Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics).write_text(json.dumps(metrics, indent=2))
        except OSError as err:
            raise CliError(f"--metrics {args.metrics}: {err.strerror or err}") from None


OUTPUT_FORMATS = ("coco", "overlays", "jsonl")


def cmd_predict(args, parser) -> int:
    from engine.images import collect_inputs
    from engine.predict import Predictor
    from engine.video import VIDEO_SUFFIXES
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in OUTPUT_FORMATS]
    if bad or not formats:
        parser.error(f"--format {args.format}: choose from {', '.join(OUTPUT_FORMATS)}")
    overrides = _inference_overrides(parser, args.sets)
    device = _device(parser, args.device)
    out = _output_path("--out", args.out, folder=True)
    try:
        predictor = Predictor(args.weights, batch_size=args.batch_size, device=device,
                              runtime=args.runtime, tile=args.tile,
                              tile_overlap=args.tile_overlap,
                              mask_threshold=args.mask_threshold, workers=args.workers,
                              overrides=overrides)
        files = collect_inputs(args.images, VIDEO_SUFFIXES)    # missing paths: before --out
        _check_single_image(args.images)
        out.mkdir(parents=True, exist_ok=True)
        writers = _prediction_writers(formats, out, predictor, args.score_threshold)
        with _warnings_as_lines():
            for _ in predictor.run(files, writers, progress=args.progress):
                pass
    except FileNotFoundError as err:
        raise CliError(str(err), 2) from None
    except (ValueError, ImportError) as err:
        raise CliError(str(err), 1) from None
    print(predictor.summary())
    if predictor.count == 0 and predictor.failures:
        raise CliError("no image could be read", 1)
    files = [str(w.path) for w in writers if hasattr(w, "path")] + \
        [str(p) for w in writers for p in getattr(w, "written", [])]
    print(f"wrote {', '.join(files)}"
          f"{' and overlays in ' + str(out) if 'overlays' in formats else ''}")
    return 0


def _check_single_image(images: Sequence[str]) -> None:
    """One image named on its own is read first: if it cannot be, that is the error
    (in a folder, a bad image is skipped with a warning instead)."""
    from engine.data import ImageError
    from engine.images import decode_image_file
    from engine.video import is_video
    if len(images) == 1 and Path(images[0]).is_file() and not is_video(images[0]):
        try:
            decode_image_file(images[0])
        except ImageError as err:
            raise CliError(str(err), 1) from None


def _prediction_writers(formats: Sequence[str], out: Path, predictor, score_threshold):
    from engine.predict import (CocoResultsWriter, JsonlResultsWriter, OverlayWriter,
                                VideoResultsWriter)
    table = {"coco": lambda: CocoResultsWriter(out / "results.json", predictor.cat_ids),
             "overlays": lambda: OverlayWriter(out, predictor.class_names, score_threshold),
             "jsonl": lambda: JsonlResultsWriter(out / "results.jsonl")}
    # input videos always give <out>/<stem>.mp4 annotated and <stem>.jsonl per frame
    return [table[f]() for f in formats] + [
        VideoResultsWriter(out, predictor.class_names, score_threshold)]


@contextlib.contextmanager
def _warnings_as_lines():
    """Skipped-input warnings printed as one 'warning: ...' line each (no source line),
    above any progress bar; other warnings as usual."""
    from engine.predict import SkippedImageWarning
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, SkippedImageWarning):
            return default(message, category, filename, lineno, file, line)
        from tqdm import tqdm
        tqdm.write(f"warning: {message}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("always", SkippedImageWarning)
        warnings.showwarning = show
        yield


def cmd_export_weights(args, parser) -> int:
    from engine.export import export_weights
    _need_file(parser, "--weights", args.weights)
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out}: is a folder; name the file to write "
                     f"(e.g. {Path(args.out) / 'model.safetensors'})")
    try:
        path = export_weights(args.weights, args.out)
    except (FileNotFoundError, ValueError) as err:
        parser.error(f"--weights {err}")
    except OSError as err:
        parser.error(f"--out {err}")
    size, source = path.stat().st_size, Path(args.weights).stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB; the checkpoint {args.weights} is "
          f"{source / 2**20:.1f} MiB)")
    return 0


def _check_int8_options(args, parser) -> None:
    """--int8 goes with --format onnx and --calibration; those two only with --int8."""
    if args.int8 and args.format != "onnx":
        parser.error(f"--int8: INT8 is an ONNX Runtime quantization; use it with --format "
                     f"onnx (not --format {args.format})")
    if args.int8 and args.calibration is None:
        parser.error("--int8 needs --calibration DIR: a folder of your images to calibrate "
                     "the activation ranges on")
    if not args.int8 and args.calibration is not None:
        parser.error(f"--calibration {args.calibration}: only with --int8")
    if args.calibration_count < 1:
        parser.error(f"--calibration-count {args.calibration_count}: must be >= 1")


def _calibration_images(parser, folder: str, count: int) -> list:
    """`count` images of `folder` (evenly spread over its sorted listing, so a folder
    sorted by class or scene is sampled across) as RGB [0, 1] Tensor[3, H, W]."""
    from engine.data import ImageError, load_rgb
    from engine.images import collect_inputs
    _need_file(parser, "--calibration", folder, folder=True)
    try:
        files = collect_inputs(folder)
    except FileNotFoundError as err:
        parser.error(f"--calibration {folder}: {err}")
    picked = [files[i * len(files) // min(count, len(files))]
              for i in range(min(count, len(files)))]
    try:
        return [load_rgb(f) for f in picked]
    except ImageError as err:
        parser.error(f"--calibration {folder}: {err}")


def _export_int8(model, out: Path, size, images: list, progress: bool) -> Path:
    """The float ONNX export in a temporary folder, quantized into `out`."""
    import tempfile

    import deploy
    with tempfile.TemporaryDirectory(prefix="maskrcnn_int8_") as tmp:
        float_path = deploy.export_onnx(model, Path(tmp) / "float.onnx", example_size=size)
        return deploy.quantize_onnx(float_path, out, images, progress=progress)


def cmd_export(args, parser) -> int:
    from maskrcnn import MaskRCNN
    from engine.predict import is_zoo_name
    _check_int8_options(args, parser)
    if not is_zoo_name(args.weights):
        _need_file(parser, "--weights", args.weights)
    if args.config is not None:
        _need_file(parser, "--config", args.config)
    out = Path(args.out)
    suffix = {"onnx": ".onnx", "pt2": ".pt2"}[args.format]
    if out.is_dir() or out.suffix != suffix:
        hint = out / f"model{suffix}" if out.is_dir() else out.with_suffix(suffix)
        parser.error(f"--out {args.out}: --format {args.format} writes a {suffix} file; "
                     f"name it e.g. {hint}")
    overrides = _inference_overrides(parser, args.sets)
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401  (before minutes of loading: the exporter needs it)
        except ImportError:
            parser.error("--format onnx needs the onnx package: pip install "
                         "'mask-rcnn-pytorch[export]' (or onnx onnxruntime)")
    images = (_calibration_images(parser, args.calibration, args.calibration_count)
              if args.int8 else None)
    from tools.download import DownloadError
    try:
        model = MaskRCNN(pretrained=args.weights, config=args.config, **overrides).eval()
    except (FileNotFoundError, ValueError, DownloadError) as err:
        parser.error(f"--weights {args.weights}: {err}")
    import deploy
    size = tuple(args.example_size)
    t0 = time.perf_counter()
    try:
        if args.int8:
            path = _export_int8(model, out, size, images, args.progress)
        elif args.format == "onnx":
            path = deploy.export_onnx(model, out, example_size=size)
        else:
            path = deploy.export_program(model, out, example_size=size)
    except ImportError as err:
        parser.error(f"--format {args.format}: {err}")
    except OSError as err:
        parser.error(f"--out {err}")
    kind = f"{args.format}, INT8 calibrated on {len(images)} images" if args.int8 \
        else args.format
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {kind}) in "
          f"{time.perf_counter() - t0:.1f} s: input image float32 [3, H, W] RGB in [0, 1]; "
          f"outputs boxes, labels, scores" + (", masks" if model.cfg.model.mask_on else ""))
    return 0


def cmd_zoo(args, parser) -> int:
    from convert.zoo import COCO_FOR_BACKBONE, cache_dir, describe_zoo
    rows = describe_zoo()
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  box AP  mask AP  cached")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['box_ap']:>6.1f}  {r['mask_ap']:>7.1f}  "
              f"{'yes' if r['cached'] else 'no'}")
    coco = ", ".join(f"{b}: {n}" for b, n in COCO_FOR_BACKBONE.items())
    print(f"\npretrained='coco' by backbone: {coco}\ncache: {cache_dir()}")
    return 0


def cmd_check_data(args, parser) -> int:
    from engine import check
    min_instances = check.MIN_INSTANCES if args.min_instances is None else args.min_instances
    if min_instances < 0:
        parser.error(f"--min-instances {args.min_instances}: must be >= 0")
    try:
        sets = _check_data_sets(args, parser)
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.error(str(err))
    checked = check.check_sets(sets, min_instances, fast=args.fast, progress=args.progress)
    print(check.report_json(checked) if args.json else check.format_report(checked))
    return 1 if check.has_errors(checked) else 0


def _check_data_sets(args, parser) -> list:
    """[(name, source, coco dict, image root)] of `maskrcnn check-data`'s arguments: a
    config's [data] sets read as training reads them (any [data] format), or --data /
    --images (and --val-data / --val-images) in --format."""
    from engine.data import read_coco_json
    from engine.formats import to_coco
    if args.config is not None:
        from engine.initialise import _is_disabled, data_source
        _need_file(parser, "--config", args.config)
        d = _config(parser, args.config, args.sets).data
        splits = ["train"] + ([] if _is_disabled(d.val_json) else ["val"])
        sets, classes = [], d.classes
        for split in splits:
            source, root = data_source(d, split, classes)
            coco = source if isinstance(source, dict) else read_coco_json(source)
            classes = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
            sets.append((split, d[f"{split}_json"], coco, root))
        return sets
    if args.images is None and args.format == "coco":
        parser.error("--data needs --images (the image directory)")
    if (args.val_data is None) != (args.val_images is None) and args.format == "coco":
        parser.error("--val-data and --val-images go together")
    pairs = [("train", args.data, args.images)]
    if args.val_data is not None:
        pairs.append(("val", args.val_data, args.val_images))
    return [(name, source, read_coco_json(source), images) if args.format == "coco"
            else (name, source, *to_coco(args.format, source, images, split=name))
            for name, source, images in pairs]


def cmd_doctor(args, parser) -> int:
    from engine import doctor
    return doctor.main(json_output=args.json, verify_zoo=args.verify_zoo)


def cmd_convert_data(args, parser) -> int:
    from engine.formats import FormatError, summary, to_coco, write_coco
    if not Path(args.source).exists():
        parser.error(f"SRC {args.source}: not found")
    try:
        coco, image_root = to_coco(args.fmt, args.source, args.images, split=args.split,
                                   classes=args.classes)
        path = write_coco(coco, args.out)
    except FormatError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"--out {args.out}: {err}")
    print(f"wrote {path}: {summary(coco)}; images relative to {image_root} "
          f"(maskrcnn eval --images / [data] train_images)")
    return 0


def cmd_demo(args, parser) -> int:
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes {args.minutes}: must be > 0")
    if args.iters is not None and args.iters <= 0:
        parser.error(f"--iters {args.iters}: must be > 0")
    cfg = _config(parser, DEMO_CONFIG, args.sets)
    try:
        summary = run_demo(cfg, Path(args.out), args.minutes, args.progress, args.iters)
    except FileNotFoundError as err:
        parser.error(str(err))
    return 0 if summary is not None else 1


# ------------------------------------------------------------------------------- demo

def run_demo(cfg, out: Path, minutes: Optional[float] = None, progress: bool = True,
             iters: Optional[int] = None):
    """The `make demo` job (see the module docstring and docs/demo.md): `iters` training
    iterations (default demo.demo_iters), or a wall-clock budget of `minutes` (default
    demo.demo_minutes unless `iters` is given; > 0 replaces the iteration count). Returns
    the summary dict
    (metrics, timings), or None when training stopped on a NaN/inf loss."""
    import torch
    from engine import distributed as dist_utils
    from engine.shapes import make_shapes
    from engine.train import NonFiniteLossError, train
    d = cfg.demo
    if minutes is None:   # an iteration count asked for explicitly overrides a config budget
        minutes = 0.0 if iters is not None else d.demo_minutes
    minutes, iters = float(minutes), int(d.demo_iters if iters is None else iters)
    # a time budget ends the run by itself: the iteration cap is then out of the way
    max_iter = 10 ** 6 if minutes > 0 else iters
    num_val = d.get("demo_num_val", 64)
    out.mkdir(parents=True, exist_ok=True)
    dist_utils.init_distributed()
    main = dist_utils.is_main_process()
    t0 = time.perf_counter()
    if main:
        _clean_previous_run(out)
        make_shapes(out / "data", "train", d.demo_num_train, d.demo_image_size,
                    d.demo_num_classes, seed=cfg.solver.seed)
        make_shapes(out / "data", "val", num_val, d.demo_image_size, d.demo_num_classes,
                    seed=cfg.solver.seed + 1000)
        shutil.copy(out / "data" / "val.json", out / "val.json")
    dist_utils.barrier()
    data_s = time.perf_counter() - t0
    cfg = apply_overrides(cfg, {
        "data.train_json": str(out / "data" / "train.json"),
        "data.train_images": str(out / "data" / "train"),
        "data.val_json": str(out / "data" / "val.json"),
        "data.val_images": str(out / "data" / "val"),
        "model.num_classes": d.demo_num_classes, "solver.output_dir": str(out),
        "solver.max_minutes": minutes, "solver.max_iter": max_iter})
    if main:
        cuda = torch.cuda.is_available()
        where = "cuda" if cuda else f"cpu ({torch.get_num_threads()} threads)"
        print(f"demo: {d.demo_num_train} train / {num_val} val shapes images "
              f"({d.demo_image_size}px, {d.demo_num_classes} classes) in {out / 'data'}; "
              f"{_demo_length(minutes, iters, cuda)} on {where}", flush=True)
    try:
        summary = train(cfg, progress=progress)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    if main:
        (out / "metrics.json").write_text(json.dumps(summary["metrics"], indent=2))
        _demo_overlays(summary["model"], cfg, out / "overlays")
        _print_demo_summary(summary, data_s, minutes, out)
    return summary


def _demo_length(minutes: float, iters: int, cuda: bool) -> str:
    if minutes > 0:
        return f"training for {minutes:g} min"
    text = f"training {iters} iterations"
    if not cuda:   # the reference speed is a CPU one
        per_iter = DEMO_SECONDS_PER_ITER["cpu"]
        text += (f" (expected: about {iters * per_iter / 60:.0f} min on 2 idle CPU cores, "
                 f"{per_iter} s/iteration, plus about 1 min of data and evaluation)")
    return text


def _clean_previous_run(out: Path) -> None:
    """A new demo run starts fresh: old checkpoints would look newer than the new ones."""
    for p in list(out.glob("model_*.pth")) + [out / "last_checkpoint", out / "log.jsonl",
                                              out / "metrics.json"]:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / "overlays", ignore_errors=True)


def _demo_overlays(model, cfg, folder: Path, count: int = 8) -> None:
    import torch
    from engine.data import CocoInstances
    from tools.visualize import draw_detections
    dataset = CocoInstances(cfg.data.val_json, cfg.data.val_images, train=False)
    device = next(model.parameters()).device
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        for i in range(min(count, len(dataset))):
            image, target = dataset[i]
            det = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
            draw_detections(image, det, dataset.class_names,
                            mask_threshold=cfg.eval.mask_threshold
                            ).save(folder / f"{target['image_id']}.png")


def _print_summary(summary: dict) -> None:
    from engine.evaluate import format_table
    it, secs = summary["iterations"], summary["elapsed_s"]
    stopped = " (stopped early)" if summary.get("early_stop") else ""
    print(f"trained {it} iterations{stopped} in {secs:.1f} s; last checkpoint "
          f"{summary['checkpoint']}")
    if summary.get("metrics"):
        print(format_table(summary["metrics"]))


def _print_demo_summary(summary: dict, data_s: float, minutes: float, out: Path) -> None:
    from engine.evaluate import format_table
    m = summary["metrics"]
    it, train_s = summary["iterations"], summary["elapsed_s"]
    budget = f" (budget {minutes * 60:.0f} s)" if minutes > 0 else ""
    rows = [("data generation", f"{data_s:.1f} s"),
            ("training", f"{train_s:.1f} s{budget}, {it} iterations, "
                         f"{train_s / max(it, 1):.3f} s/iter"),
            ("evaluation", f"{summary['eval_s']:.1f} s"),
            ("segm AP / AP50", f"{m['segm']['AP']:.3f} / {m['segm']['AP50']:.3f}"),
            ("bbox AP / AP50", f"{m['bbox']['AP']:.3f} / {m['bbox']['AP50']:.3f}")]
    met = all(m["segm"][k] >= v for k, v in DEMO_TARGET.items())
    rows.append(("target (segm AP >= 0.40, AP50 >= 0.60)", "met" if met else "not met"))
    width = max(len(k) for k, _ in rows)
    print("\n" + format_table(m))
    print()
    for k, v in rows:
        print(f"{k:{width}s}  {v}")
    print(f"\noutputs: {out / 'metrics.json'}, {out / 'overlays'}/, {out / 'loss.png'}, "
          f"{out / 'log.jsonl'}, {out / 'val.json'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # errors found after parsing are usage errors of the subcommand's parser
        return args.func(args, args.command_parser)
    except CliError as err:
        print(f"maskrcnn {args.command}: error: {err}", file=sys.stderr)
        return err.code
    finally:
        from engine.distributed import cleanup
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
