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

Zoo mode, ours against the SOURCE framework of a model-zoo entry (convert.zoo.ZOO):

    python bench/inference.py --zoo detectron2/mask_rcnn_R_50_FPN_3x --runs 3
    python bench/inference.py --zoo torchvision/maskrcnn_resnet50_fpn_v2 --exact

The source's own model (torchvision's maskrcnn_resnet50_fpn[_v2] architecture as its COCO
weights run, or detectron2's model-zoo config via tests/zoo/detectron2_oracle.py) gets
random weights calibrated to make ~100 detections (real weights are not downloaded); they
are saved as the source publishes them (torchvision state dict / detectron2 .pkl) and
ours is built from that file with the entry's preset, `MaskRCNN(pretrained=file,
config=preset)`. The preset's test-time settings stay (1000 proposals, 100 detections).
One image, --size (800 x 1066: no resize on either side); torchvision and ours take it as
RGB in [0, 1], detectron2 its BGR 0-255 version, the model called as its model zoo runs
it ([{"image", "height", "width"}], eval mode, no_grad). Ours runs its fast path; --exact
adds ours with fuse_bn=False (the source's arithmetic). Timing and memory children as
above; ratio = source ms / row ms. Parity on the last call (detections matched by label
and box IoU >= 0.9 when the near-tied scores order them differently): labels equal, max
|score| and box differences, min IoU of the binary masks (probability > 0.5).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import replace
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
    """Random weights calibrated to make ~100 detections of varied classes on `image`
    (the tests' oracle: tests/zoo/torchvision_oracle.py), in eval mode."""
    from tests.zoo.torchvision_oracle import calibrate as calibrate_oracle

    was_training = tv.training
    calibrate_oracle(tv.eval(), image)
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
    heads = [m for name, m in ours.named_modules()
             if hasattr(m, "fast_path") and not name.startswith("backbone.body")]
    if ablate in ("trunk", "all"):
        ours.backbone.body.fast_path = replace(ours.backbone.body.fast_path, fuse_bn=False)
    for module in heads if ablate in ("heads", "all") else []:
        module.fast_path = replace(module.fast_path, fuse_bn=False)
    for module in ours.modules() if ablate in ("winograd", "all") else []:
        if hasattr(module, "fast_path"):
            module.fast_path = replace(module.fast_path, winograd=False)
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


# ------------------------------------------------------------------------- zoo mode

D2_IMAGE_SEED = 0        # detectron2_oracle.make_image seeds: the bench image, and a
D2_CALIB_SEED = 100      # second image the calibration also sees (as the tests do)
ZOO_ROWS = {"ours": ("ours", True), "ours-exact": ("ours (exact)", False)}  # fuse_bn


def _zoo_entry(name: str):
    from convert import zoo
    return zoo.ZOO[name]


def _d2_oracle():
    """tests/zoo/detectron2_oracle; exits 2 with a message when detectron2 is missing."""
    import importlib.util
    why = "detectron2 is not installed"
    if importlib.util.find_spec("detectron2") is not None:
        try:
            from tests.zoo import detectron2_oracle
            return detectron2_oracle
        except BaseException as err:      # pytest.importorskip raises Skipped
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            why = f"detectron2 does not import ({type(err).__name__}: {err})"
    print(f"bench/inference.py --zoo: {why}; the detectron2 entries need it as the source "
          "framework (see tests/zoo/detectron2_oracle.py for the wheel to install)",
          file=sys.stderr)
    sys.exit(2)


def _tv_zoo_architecture(name: str):
    """torchvision's model for a torchvision zoo entry as its COCO weights run, random
    weights: v1 with FrozenBatchNorm2d eps 0 and 3 trainable layers (what
    maskrcnn_resnet50_fpn builds when given weights), v2 as maskrcnn_resnet50_fpn_v2."""
    import torch
    from torchvision.models.detection import MaskRCNN as TvMaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    if name == "torchvision/maskrcnn_resnet50_fpn_v2":
        return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    if name != "torchvision/maskrcnn_resnet50_fpn":
        raise ValueError(f"no torchvision architecture for {name!r}")
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    for module in backbone.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = 0.0
    return TvMaskRCNN(backbone, num_classes=91)


def _calibrate_tv_zoo(tv, image) -> None:
    """As build_torchvision + calibrate do for the default bench (last BatchNorm of each
    block at 0.2); v2's BatchNorm layers (backbone, FPN, heads) also get running
    statistics that keep the features O(1) (tests/zoo/test_torchvision_zoo.py _tv_v2)."""
    import torch
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(1)
    with torch.no_grad():
        for module in tv.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        for block in tv.backbone.body.modules():
            if isinstance(block, Bottleneck):
                block.bn3.weight.fill_(0.2)
    calibrate(tv, image)


def _zoo_image(args, source: str) -> dict:
    """The bench image: "ours" (RGB [0, 1] [3, H, W]), "source" (what the source model
    takes: the same tensor for torchvision; detectron2's input dict, BGR 0-255 CHW float)
    and "calib" (what its calibration takes)."""
    import torch
    if source == "torchvision":
        image = _image(args)
        return dict(ours=image, source=image, calib=image)
    d2 = _d2_oracle()
    height, width = args.size
    bgr = d2.make_image(height, width, seed=D2_IMAGE_SEED)           # uint8 [H, W, 3]
    chw = torch.as_tensor(bgr).permute(2, 0, 1).float().contiguous()
    return dict(ours=d2.bgr_to_rgb01(bgr), calib=bgr,
                source=dict(image=chw, height=height, width=width))


def build_zoo_source(name: str, args, image: dict, weights: str):
    """The source framework's model for zoo entry `name` with random weights calibrated
    on the bench image (eval mode, CPU); saves them to `weights` as the source publishes
    them (a torchvision state dict, a detectron2 model-zoo .pkl)."""
    import torch
    entry = _zoo_entry(name)
    if entry.source == "torchvision":
        tv = _tv_zoo_architecture(name).eval()
        _run_at_image_size([tv], args)        # calibrated at the size it runs at
        _calibrate_tv_zoo(tv, image["calib"])
        torch.save(tv.state_dict(), weights)
        return tv
    d2 = _d2_oracle()
    model, _ = d2.build_d2_model(name.split("/", 1)[1])     # the config's test settings
    height, width = args.size
    d2.calibrate(model, [image["calib"], d2.make_image(height, width, seed=D2_CALIB_SEED)])
    d2.save_model_zoo_pkl(model, weights)
    return model.eval()


def load_zoo_source(name: str, weights: str):
    """The source framework's model for `name` with the weights saved by build_zoo_source
    (memory children: no calibration pass in their process)."""
    import torch
    from convert import zoo
    entry = _zoo_entry(name)
    if entry.source == "torchvision":
        model = _tv_zoo_architecture(name)
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        model, _ = _d2_oracle().build_d2_model(name.split("/", 1)[1])
        model.load_state_dict(zoo.read_checkpoint(weights)["model"])
    return model.eval()


def load_zoo_ours(name: str, weights: str, fuse_bn: bool):
    """Ours from the source's weight file and the entry's preset, as a user loads it."""
    from maskrcnn import MaskRCNN
    return MaskRCNN(pretrained=weights, config=str(_zoo_entry(name).preset_path),
                    fuse_bn=fuse_bn).eval()


def _run_at_image_size(models: list, args) -> str:
    """At the default 800 x 1066 nothing is resized (the presets' and torchvision's test
    size is short side 800, long side at most 1333; detectron2 resizes outside the model).
    Another --size is run at that size by every model: torchvision's and ours' resize
    targets are set to it (a quick check, not the preset's workload). Returns a note
    saying so, or ""."""
    short, long = min(args.size), max(args.size)
    note = ""
    for model in models:
        transform = getattr(model, "transform", None)
        if transform is None:                                 # detectron2
            continue
        min_size = transform.min_size
        min_size = min_size[-1] if isinstance(min_size, (tuple, list)) else min_size
        if short == min_size and long <= transform.max_size:
            continue
        note = (f"note: {args.size[0]}x{args.size[1]} is not at the test size (short side "
                f"{min_size}, long at most {transform.max_size}): every model runs it at "
                "its own size (resize targets set to it), not the preset's workload")
        transform.min_size = (short,) if isinstance(transform.min_size, (tuple, list)) \
            else short
        transform.max_size = long
    return note


def _zoo_call(model, image, batch: int, device):
    """A no-argument call of `model` on `batch` copies of `image` (a tensor, or
    detectron2's input dict), inputs prepared once, outside the timed call."""
    if isinstance(image, dict):
        inputs = [dict(image, image=image["image"].to(device))] * batch
    else:
        inputs = [image.to(device)] * batch
    return lambda: model(inputs)


def detections(out: dict) -> dict:
    """One image's detections as boxes, scores, labels (1..K) and binary masks
    [D, H, W]: from ours / torchvision (masks [D, 1, H, W] probabilities, > 0.5) or from
    detectron2 ({"instances": Instances}, pred_classes 0..K-1, pred_masks pasted bool)."""
    if "instances" in out:
        inst = out["instances"]
        return dict(boxes=inst.pred_boxes.tensor.float(), scores=inst.scores,
                    labels=inst.pred_classes.long() + 1, masks=inst.pred_masks.bool())
    masks = out["masks"]
    masks = masks[:, 0] > 0.5 if masks.dim() == 4 else masks.bool()
    return dict(boxes=out["boxes"].float(), scores=out["scores"], labels=out["labels"],
                masks=masks)


def zoo_parity(ours_out: list[dict], ref_out: list[dict]) -> dict:
    """Ours against the source over images: labels_equal (the same labels in the same
    order), same_order (and boxes pairwise IoU >= 0.9, see _same_order); otherwise the
    detections are matched one to one by label and box IoU >= 0.9 (_matched_pairs).
    Over the pairs: max |score| and box (px) differences and the min IoU of the binary
    masks (two empty masks: 1)."""
    import torch
    result = dict(labels_equal=True, same_order=True, matched=0, total=0, scores=0.0,
                  boxes=0.0, mask_iou=1.0)
    for a, b in zip(ours_out, ref_out):
        a, b = detections(a), detections(b)
        result["total"] += max(len(a["labels"]), len(b["labels"]))
        result["labels_equal"] &= bool(torch.equal(a["labels"], b["labels"]))
        pairs = _same_order(a, b)
        if pairs is None:
            result["same_order"] = False
            pairs = _matched_pairs(a, b)
        result["matched"] += len(pairs[0])
        if not len(pairs[0]):
            continue
        for key in ("scores", "boxes"):
            diff = (a[key][pairs[0]].float() - b[key][pairs[1]].float()).abs().max().item()
            result[key] = max(result[key], diff)
        ma, mb = a["masks"][pairs[0]].flatten(1), b["masks"][pairs[1]].flatten(1)
        inter, union = (ma & mb).sum(1), (ma | mb).sum(1)
        iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)
        result["mask_iou"] = min(result["mask_iou"], iou.min().item())
    return result


def run_zoo_memory_children(script: str, args, weights: str, models: list[str]) -> dict:
    """{model: the child's JSON result}, each model alone in a child process (see
    memory_child), built from the weight file."""
    results = {}
    for model in models:
        cmd = [sys.executable, script, "--child", "--zoo", args.zoo, "--model", model,
               "--weights", weights, "--device", args.device, "--batch", str(args.batch),
               "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--size", *map(str, args.size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{model} ({args.zoo}) on {args.device} failed:\n"
                               f"{proc.stderr[-3000:]}")
        results[model] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def zoo_memory_child(args) -> dict:
    """One model of a zoo comparison alone in this process (see memory_child)."""
    import gc

    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    source = _zoo_entry(args.zoo).source
    image = _zoo_image(args, source)
    if args.model == "source":
        model, image = load_zoo_source(args.zoo, args.weights), image["source"]
    else:
        model = load_zoo_ours(args.zoo, args.weights, fuse_bn=ZOO_ROWS[args.model][1])
        image = image["ours"]
    _run_at_image_size([model], args)
    model = model.to(device)
    gc.collect()
    with torch.no_grad():
        return peak_memory(device, _zoo_call(model, image, args.batch, device),
                           args.warmup + 2)


def zoo_main(args, command: str) -> None:
    """--zoo NAME: ours against the source framework on the same weights (see the module
    docstring)."""
    import tempfile

    import torch
    start = time.perf_counter()
    entry = _zoo_entry(args.zoo)
    source = entry.source
    print(f"command: {command}", flush=True)
    torch.set_num_threads(args.threads)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    image = _zoo_image(args, source)
    rows = ["ours", "ours-exact"] if args.exact else ["ours"]
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "tv.pth" if source == "torchvision"
                               else "model_final.pkl")
        print(f"building {source}'s model and calibrating it ...", file=sys.stderr, flush=True)
        models = {source: build_zoo_source(args.zoo, args, image, weights).to(device)}
        for row in rows:
            models[row] = load_zoo_ours(args.zoo, weights, ZOO_ROWS[row][1]).to(device)
        size_note = _run_at_image_size(list(models.values()), args)
        outputs = {}

        def call(name):
            fn = _zoo_call(models[name], image["source" if name == source else "ours"],
                           args.batch, device)

            def timed():
                outputs[name] = fn()
            return timed

        sync = ((lambda: torch.cuda.synchronize(device)) if device.type == "cuda"
                else (lambda: None))
        print("timing ...", file=sys.stderr, flush=True)
        with torch.no_grad():
            times = interleaved_times({name: call(name) for name in models}, args.warmup,
                                      args.runs, sync)
        checks = {row: zoo_parity(outputs[row], outputs[source]) for row in rows}
        memory = {}
        if not args.no_memory:
            print("memory children ...", file=sys.stderr, flush=True)
            memory = run_zoo_memory_children(os.path.abspath(__file__), args, weights,
                                             ["source", *rows])
            memory[source] = memory.pop("source")

    print(f"Mask R-CNN zoo entry {args.zoo} (random weights calibrated to ~100 detections; "
          f"the preset's test settings), {args.device}, batch {args.batch} x "
          f"{args.size[0]}x{args.size[1]}, median of {args.runs} interleaved runs after "
          f"{args.warmup} warm-up, CPU threads {args.threads}"
          f"{', no TF32' if args.no_tf32 else ''}")
    header = (f"{'model':13} {'ms/call':>9} {'src/this':>8} {'dets':>5} {'labels=':>7} "
              f"{'matched':>8} {'max|dscore|':>11} {'max|dbox|px':>11} {'min maskIoU':>11} "
              f"{'peak RSS MB':>12} {'+infer MB':>10} {'CUDA peak MB':>13}")
    if size_note:
        print(size_note)
    print(header)
    print("-" * len(header))
    source_ms = median_ms(times[source])
    for name in (source, *rows):
        ms = median_ms(times[name])
        dets = sum(len(detections(o)["labels"]) for o in outputs[name]) // args.batch
        if name == source:
            cells = f"{'-':>7} {'-':>8} {'-':>11} {'-':>11} {'-':>11}"
        else:
            c = checks[name]
            cells = (f"{'yes' if c['labels_equal'] else 'no':>7} "
                     f"{str(c['matched']) + '/' + str(c['total']):>8} {c['scores']:11.2e} "
                     f"{c['boxes']:11.2e} {c['mask_iou']:11.4f}")
        label = ZOO_ROWS[name][0] if name in ZOO_ROWS else name
        print(f"{label:13} {ms:9.1f} {source_ms / ms:8.3f} {dets:5d} {cells} "
              f"{memory_columns(memory.get(name, {}), 10)}")
    print("src/this: source ms / this row's ms. parity on the last call against "
          f"{source}: labels= the same labels in the same order; otherwise (near-tied "
          "scores ordered differently) detections are matched one to one by label and box "
          "IoU >= 0.9, and the differences are over the matched pairs: "
          + ", ".join(f"{ZOO_ROWS[r][0]} same order {checks[r]['same_order']}" for r in rows))
    if args.no_memory:
        print("memory: skipped (--no-memory)")
    else:
        print("memory: each model alone in a child process, built from the saved weights "
              f"({args.warmup} warm-up + 2 calls)")
    print("all times (ms):", {ZOO_ROWS[k][0] if k in ZOO_ROWS else k:
                              [round(1000 * t) for t in v] for k, v in times.items()})
    print(f"wall time {time.perf_counter() - start:.0f} s (build, calibration, timing"
          f"{'' if args.no_memory else ', memory children'})")


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
    parser.add_argument("--zoo", metavar="NAME", default=None,
                        help="a convert.zoo.ZOO entry (e.g. detectron2/mask_rcnn_R_50_FPN_3x): "
                             "ours against its source framework on the same (random, "
                             "calibrated) weights; --depth and --num-classes do not apply")
    parser.add_argument("--exact", action="store_true",
                        help="--zoo: also ours with fuse_bn=False (the source's arithmetic)")
    args = parser.parse_args(argv)
    if args.zoo is not None:
        from convert import zoo
        if args.zoo not in zoo.ZOO:
            parser.error(f"--zoo {args.zoo!r}: not a zoo entry; one of: {', '.join(zoo.ZOO)}")
        if args.ablate != "none" or args.memory_only:
            parser.error("--zoo does not take --ablate or --memory-only")
    elif args.exact:
        parser.error("--exact needs --zoo")
    if args.child:
        print(json.dumps(zoo_memory_child(args) if args.zoo else memory_child(args)))
        return
    if args.zoo is not None:
        command = shlex.join(sys.orig_argv if argv is None
                             else [sys.executable, os.path.relpath(__file__), *argv])
        zoo_main(args, command)
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
