"""Inference time and memory: our MaskRCNN vs torchvision's, with the same weights.

    python bench/inference.py                  # ResNet-50-FPN, CPU, 2 threads
    python bench/inference.py --depth 101 --runs 7
    python bench/inference.py --device cuda --batch 8

Both models are torchvision's Mask R-CNN architecture with random (seeded) weights and a
frozen-BatchNorm backbone; ours is converted from it with MaskRCNN.from_torchvision, so
both do the same work. The class biases are calibrated on the image (as the parity tests
do) so about 100 detections of varied classes pass the score threshold. Input: --batch
copies of one 800 x 1066 image (no resize at the default min/max size 800/1333), eval
mode, no_grad; ours runs with every optimisation on (its defaults).

Time: both models in this one process, calls alternating (so load from other processes
hits both alike), median over --runs calls after --warmup calls (CUDA: synchronised).
Parity: max |ours - torchvision| of boxes, scores and masks on the last call, labels equal.
Memory: each model also runs in its own child process (--warmup + 2 calls), so the peak
resident set size (VmHWM) is that model's alone: the process peak and the increase
during inference over the RSS after building (the peak is reset there); on CUDA,
torch.cuda.max_memory_allocated during inference.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0    # kB
    raise KeyError(field)


def rss_mb() -> float:
    """Peak resident set size of this process (VmHWM). Not ru_maxrss: Linux carries that
    over from the parent across fork + exec, so a child would report the parent's peak."""
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> float:
    """Reset the peak to the current RSS (Linux clear_refs 5); returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except (OSError, KeyError):
        return rss_mb()


def peak_memory(device, run, calls: int) -> dict:
    """Calls run() `calls` times; returns the process's peak RSS (MB), its rise over the
    RSS before the first call ("rise_mb") and, on CUDA, the peak allocated memory."""
    import torch

    base = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(calls):
        run()
    result = dict(peak_rss_mb=rss_mb(), rise_mb=rss_mb() - base)
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


def memory_columns(mem: dict, rise_width: int) -> str:
    """Table cells: peak RSS, the rise during the measured calls, CUDA peak ("-" if none)."""
    rss = f"{mem['peak_rss_mb']:12.0f} {mem['rise_mb']:{rise_width}.0f}" if mem else \
        f"{'-':>12} {'-':>{rise_width}}"
    cuda = f"{mem['cuda_peak_mb']:13.0f}" if "cuda_peak_mb" in mem else f"{'-':>13}"
    return f"{rss} {cuda}"


def build_torchvision(depth: int, num_classes: int, seed: int = 0):
    """torchvision's Mask R-CNN, ResNet-{depth}-FPN, frozen BatchNorm, random weights
    (seeded), K + 1 outputs; damped so the features stay O(100) at any depth."""
    import torch
    from torchvision.models.detection import MaskRCNN as TvMaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None)
    if True:
        with torch.no_grad():
            # 23+ residual blocks with identity BatchNorm blow the features up: damp them
            # (as tests/test_maskrcnn.py does for ResNet-101).
            for block in backbone.body.modules():
                if isinstance(block, Bottleneck):
                    block.bn3.weight.fill_(0.2)
    return TvMaskRCNN(backbone, num_classes=num_classes + 1)


def normalise_batchnorm(tv, image) -> None:
    """Set every backbone BatchNorm's running statistics to the per-channel mean and
    variance of its input on `image`, as a trained network's are: activations stay O(1)
    instead of growing block after block (random weights with identity BatchNorm reach
    ~250), so float rounding is not amplified into the box deltas and mask logits."""
    import torch

    def set_stats(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    norms = [m for m in tv.backbone.body.modules() if hasattr(m, "running_var")]
    hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
    try:
        with torch.no_grad():
            images, _ = tv.transform([image])
            tv.backbone.body(images.tensors)
    finally:
        for hook in hooks:
            hook.remove()


def calibrate(tv, image) -> None:
    """Random weights give near-constant class scores; set the class biases from the
    logits on `image` so the classes compete (varied labels, ~100 detections above the
    0.05 threshold), and the RPN bias so the proposals pass its thresholds
    (tests/test_maskrcnn.py does the same)."""
    import torch

    was_training = tv.training
    tv.eval()
    with torch.no_grad():
        tv.rpn.head.cls_logits.bias.fill_(1.0)
        images, _ = tv.transform([image])
        features = tv.backbone(images.tensors)
        # Objectness logits with std 1, so proposal scores are not near-ties (whose
        # order would be decided by rounding).
        head = tv.rpn.head
        objectness = torch.cat([head.cls_logits(head.conv(f)).flatten()
                                for f in features.values()])
        head.cls_logits.weight.div_((objectness - head.cls_logits.bias[0]).std())
        proposals, _ = tv.rpn(images, features)
        pooled = tv.roi_heads.box_roi_pool(features, proposals, images.image_sizes)
        logits, _ = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
        predictor = tv.roi_heads.box_predictor.cls_score
        scale = 1.5 / logits.std(0).mean()
        predictor.weight.mul_(scale)
        predictor.bias.mul_(scale).sub_(logits.mean(0) * scale)
        predictor.bias[1:] += 1.0
    tv.train(was_training)


def convert(tv):
    """Ours with torchvision's weights and hyper-parameters."""
    from maskrcnn import MaskRCNN
    return MaskRCNN.from_torchvision(tv, fuse_bn=True)


def interleaved_times(fns: dict[str, Callable[[], object]], warmup: int, runs: int,
                      sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions alternating call by call (and
    the order flipping every round) so load from other processes hits all alike."""
    names = list(fns)
    times = {n: [] for n in names}
    for i in range(warmup + runs):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(values: list[float]) -> float:
    return 1000.0 * statistics.median(values)


# ------------------------------------------------------------------------- inference

ABLATIONS = ("none", "trunk", "heads", "winograd", "all")


def apply_ablation(ours, ablate: str):
    """Turns one optimisation of ours off: "trunk" (no BatchNorm folding), "heads" (no
    fused FPN / mask head convs), "winograd" (direct 3x3 convs instead of Winograd), "all"
    (all three) or "none" (ours as shipped). Returns ours."""
    if ablate not in ABLATIONS:
        raise ValueError(f"ablate must be one of {ABLATIONS}, got {ablate!r}")
    if ablate in ("trunk", "all"):
        ours.backbone.body.fuse_inference = False
    if ablate in ("heads", "all"):
        import backbones.fused
        backbones.fused.HEADS_FAST_PATH = False
    if ablate in ("winograd", "all"):
        for module in ours.modules():
            if hasattr(module, "winograd"):
                module.winograd = False
    return ours


def build_pair(depth: int, num_classes: int, image, device):
    """(torchvision model, ours), eval mode, on `device`, same calibrated weights."""
    tv = build_torchvision(depth, num_classes)
    calibrate(tv, image)
    return tv.eval().to(device), convert(tv).eval().to(device)


def load_model(which: str, depth: int, num_classes: int, weights: str):
    """torchvision's model with the calibrated weights saved by the parent (no forward
    pass here, so the child's peak RSS is inference's alone), or ours converted from it."""
    import torch
    tv = build_torchvision(depth, num_classes)
    tv.load_state_dict(torch.load(weights, weights_only=True))
    if which == "torchvision":
        return tv
    return convert(tv)


def run_memory_children(script: str, args, tv, extra: list[str]) -> dict:
    """{model: the child's JSON result} for torchvision and ours, weights passed by file."""
    import tempfile

    import torch
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "tv.pt")
        torch.save({k: v.cpu() for k, v in tv.state_dict().items()}, weights)
        results = {}
        for model in ("torchvision", "ours"):
            cmd = [sys.executable, script, "--child", "--model", model, "--weights", weights,
                   "--device", args.device, "--depth", str(args.depth),
                   "--batch", str(args.batch), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--num-classes", str(args.num_classes),
                   "--size", *map(str, args.size), *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"{model} on {args.device} failed:\n{proc.stderr[-3000:]}")
            results[model] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def _image(args):
    import torch
    height, width = args.size
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(1))


def parity(ours_out: list[dict], tv_out: list[dict]) -> dict:
    """Max abs differences over images when both give the same detections in the same
    order (labels equal, each pair's box IoU >= 0.9); else (float rounding reordering
    near-tied detections, as TF32 convolutions on a GPU do) the detections are matched
    one to one (same label, box IoU >= 0.9, greedily by IoU) and the differences taken
    over the matched pairs; "matched" counts them."""
    result = dict(same_order=True, boxes=0.0, scores=0.0, masks=0.0, matched=0, total=0)
    for a, b in zip(ours_out, tv_out):
        result["total"] += max(len(a["labels"]), len(b["labels"]))
        pairs = _same_order(a, b)
        if pairs is None:
            result["same_order"] = False
            pairs = _matched_pairs(a, b)
        result["matched"] += len(pairs[0])
        for key in ("boxes", "scores", "masks"):
            if len(pairs[0]):
                diff = (a[key][pairs[0]].float() - b[key][pairs[1]].float()).abs().max()
                result[key] = max(result[key], diff.item())
    return result


def _same_order(a: dict, b: dict, min_iou: float = 0.9):
    """(indices, indices) of all detections when a and b list the same ones in the same
    order (equal labels, pairwise box IoU >= min_iou), else None."""
    import torch
    from torchvision.ops import box_iou
    if a["labels"].shape != b["labels"].shape or not bool((a["labels"] == b["labels"]).all()):
        return None
    if len(a["boxes"]) and bool((box_iou(a["boxes"].float(), b["boxes"].float())
                                 .diagonal() < min_iou).any()):
        return None
    index = torch.arange(len(a["labels"]), device=a["labels"].device)
    return index, index


def _matched_pairs(a: dict, b: dict, min_iou: float = 0.9):
    """Greedy one-to-one matching of a's and b's detections by box IoU, same label only."""
    import torch
    from torchvision.ops import box_iou
    iou = box_iou(a["boxes"].float(), b["boxes"].float())
    iou[a["labels"][:, None] != b["labels"][None, :]] = 0
    rows, cols = [], []
    while iou.numel() and bool(iou.max() >= min_iou):
        flat = int(iou.argmax())
        i, j = divmod(flat, iou.shape[1])
        rows.append(i)
        cols.append(j)
        iou[i, :] = 0
        iou[:, j] = 0
    device = a["boxes"].device
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.tensor(cols, dtype=torch.int64, device=device))


def memory_child(args) -> dict:
    """One model alone in this process: peak RSS (and CUDA peak) around inference."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    image = _image(args)
    model = load_model(args.model, args.depth, args.num_classes, args.weights)
    if args.model == "ours":
        model = apply_ablation(model, args.ablate)
    model = model.eval().to(device)
    images = [image.to(device)] * args.batch
    with torch.no_grad():
        return peak_memory(device, lambda: model(images), args.warmup + 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101, 152))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS children")
    parser.add_argument("--ablate", default="none", choices=ABLATIONS,
                        help="turn an optimisation of ours off (see apply_ablation)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="CUDA: float32 convolutions and matmuls without TF32 (the "
                             "default rounds inputs to 10-bit mantissas; parity runs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default="", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true",
                        help="only the per-model memory children (no timing)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(args)))
        return
    if args.memory_only:
        import torch
        tv, _ = build_pair(args.depth, args.num_classes, _image(args), "cpu")
        memory = run_memory_children(os.path.abspath(__file__), args, tv,
                                     ["--ablate", args.ablate])
        print(f"ResNet-{args.depth}-FPN inference memory, {args.device}, batch {args.batch}:",
              json.dumps(memory))
        return

    import torch
    torch.set_num_threads(args.threads)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    image = _image(args)
    tv, ours = build_pair(args.depth, args.num_classes, image, device)
    ours = apply_ablation(ours, args.ablate)
    images = [image.to(device)] * args.batch
    outputs = {}

    def call(name, model):
        def fn():
            outputs[name] = model(images)
        return fn

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        times = interleaved_times({"torchvision": call("torchvision", tv),
                                   "ours": call("ours", ours)}, args.warmup, args.runs, sync)
    check = parity(outputs["ours"], outputs["torchvision"])
    memory = {} if args.no_memory else run_memory_children(
        os.path.abspath(__file__), args, tv, ["--ablate", args.ablate])

    print(f"Mask R-CNN ResNet-{args.depth}-FPN inference, {args.device}, batch {args.batch} "
          f"x {args.size[0]}x{args.size[1]}, median of {args.runs} interleaved runs after "
          f"{args.warmup} warm-up, CPU threads {args.threads}, ablate {args.ablate}"
          f"{', no TF32' if args.no_tf32 else ''}")
    header = (f"{'model':12} {'ms/call':>9} {'ours/tv':>8} {'speed-up':>8} {'dets':>5} "
              f"{'peak RSS MB':>12} {'+infer MB':>10} {'CUDA peak MB':>13}")
    print(header)
    print("-" * len(header))
    tv_ms = median_ms(times["torchvision"])
    for name in ("torchvision", "ours"):
        ms = median_ms(times[name])
        dets = sum(len(o["boxes"]) for o in outputs[name]) // args.batch
        print(f"{name:12} {ms:9.1f} {ms / tv_ms:8.3f} {tv_ms / ms:8.2f} {dets:5d} "
              f"{memory_columns(memory.get(name, {}), 10)}")
    print(f"parity: same detections in the same order {check['same_order']}, matched "
          f"{check['matched']}/{check['total']} (same label, IoU >= 0.9), max |diff| boxes "
          f"{check['boxes']:.2e} px, scores {check['scores']:.2e}, masks {check['masks']:.2e}")
    print("all times (ms):", {k: [round(1000 * t) for t in v] for k, v in times.items()})


if __name__ == "__main__":
    main()
