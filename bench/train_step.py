"""Training-step time and memory: our MaskRCNN vs torchvision's, with the same weights.

    python bench/train_step.py                   # ResNet-50-FPN, CPU, 2 threads
    python bench/train_step.py --depth 101 --runs 5
    python bench/train_step.py --device cuda     # with AMP (float16 autocast + GradScaler)

One step = forward (train mode, 5 losses) + backward of their sum + SGD step (lr 0.01,
momentum 0.9, weight decay 1e-4) over the trainable parameters (torchvision's default
freezing: conv1 and layer1 frozen, frozen BatchNorm). Batch: --batch images of 800 x 1066
(no resize) with ~--objects random objects each (boxes, labels, filled-ellipse masks).
Models as in bench/inference.py (random seeded weights, calibrated, ours converted with
MaskRCNN.from_torchvision).

Time: both models in this one process, steps alternating, each step seeded the same so
both draw the same RoI / anchor samples; median over --runs steps after --warmup steps.
Parity: the five losses of the first step (same weights, same sample) are compared.
Memory: each model also runs --warmup + 2 steps in its own child process: peak RSS (and
the CUDA peak of torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inference import (apply_ablation, build_torchvision, calibrate,  # noqa: E402
                       convert, interleaved_times, load_model, median_ms, memory_columns,
                       peak_memory, run_memory_children)


# torchvision's loss names -> ours.
TV_LOSS_NAMES = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_box",
                 "loss_classifier": "loss_cls", "loss_box_reg": "loss_box",
                 "loss_mask": "loss_mask"}


def make_batch(batch: int, objects: int, size, num_classes: int, seed: int = 0):
    """(images, targets): per image Tensor[3, H, W] in [0, 1] and dict(boxes Tensor[M, 4],
    labels Tensor[M] int64 in 1..K, masks Tensor[M, H, W] uint8 filled ellipses)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    height, width = size
    images, targets = [], []
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=g))
        wh = torch.rand(objects, 2, generator=g) * 0.35 + 0.05        # 5..40% of a side
        wh = wh * torch.tensor([width, height])
        xy = torch.rand(objects, 2, generator=g) * (torch.tensor([width, height]) - wh)
        boxes = torch.cat([xy, xy + wh], dim=1).floor()
        masks = []
        for x1, y1, x2, y2 in boxes.tolist():
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            masks.append((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).to(torch.uint8))
        labels = torch.randint(1, num_classes + 1, (objects,), generator=g)
        targets.append(dict(boxes=boxes, labels=labels, masks=torch.stack(masks)))
    return images, targets


def _to(images, targets, device):
    return ([i.to(device) for i in images],
            [{k: v.to(device) for k, v in t.items()} for t in targets])


def build_pair(depth: int, num_classes: int, image, device):
    """(torchvision, ours) in train mode with the same calibrated weights."""
    tv = build_torchvision(depth, num_classes)
    calibrate(tv, image)
    return tv.train().to(device), convert(tv).train().to(device)


class Stepper:
    """One SGD training step of `model`, AMP on CUDA."""

    def __init__(self, model, images, targets, device, amp: bool):
        import torch
        self.model, self.images, self.targets = model, images, targets
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.amp = amp
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        self.device = device
        self.seed = 0
        self.last_losses = None

    def __call__(self):
        import torch
        torch.manual_seed(self.seed)        # the same samples for both models
        self.seed += 1
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            losses = self.model(self.images, self.targets)
        total = sum(losses.values())
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()
        if self.last_losses is None:
            self.last_losses = {k: float(v.detach()) for k, v in losses.items()}


def memory_child(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, targets = make_batch(args.batch, args.objects, args.size, args.num_classes)
    model = load_model(args.model, args.depth, args.num_classes, args.weights)
    if args.model == "ours":
        model = apply_ablation(model, args.ablate)
    model = model.train().to(device)
    step = Stepper(model, *_to(images, targets, device), device, device.type == "cuda")
    return peak_memory(device, step, args.warmup + 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101, 152))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=10, help="objects per image")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (AMP)")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS children")
    parser.add_argument("--ablate", default="none", choices=("none", "winograd"),
                        help="turn an optimisation of ours off")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print each model's top ops (torch.profiler)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(args)))
        return

    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, targets = make_batch(args.batch, args.objects, args.size, args.num_classes)
    tv, ours = build_pair(args.depth, args.num_classes, images[0], device)
    ours = apply_ablation(ours, args.ablate)
    images, targets = _to(images, targets, device)
    amp = device.type == "cuda"
    steps = {"torchvision": Stepper(tv, images, targets, device, amp),
             "ours": Stepper(ours, images, targets, device, amp)}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = interleaved_times(steps, args.warmup, args.runs, sync)
    memory = {} if args.no_memory else run_memory_children(
        os.path.abspath(__file__), args, tv,
        ["--objects", str(args.objects), "--ablate", args.ablate])

    print(f"Mask R-CNN ResNet-{args.depth}-FPN training step, {args.device}"
          f"{' AMP' if amp else ''}, batch {args.batch} x {args.size[0]}x{args.size[1]}, "
          f"{args.objects} objects per image, median of {args.runs} interleaved steps after "
          f"{args.warmup} warm-up, CPU threads {args.threads}, ablate {args.ablate}")
    header = (f"{'model':12} {'ms/step':>9} {'ours/tv':>8} {'speed-up':>8} "
              f"{'peak RSS MB':>12} {'+step MB':>9} {'CUDA peak MB':>13}")
    print(header)
    print("-" * len(header))
    tv_ms = median_ms(times["torchvision"])
    for name in ("torchvision", "ours"):
        ms = median_ms(times[name])
        print(f"{name:12} {ms:9.1f} {ms / tv_ms:8.3f} {tv_ms / ms:8.2f} "
              f"{memory_columns(memory.get(name, {}), 9)}")
    a, b = steps["ours"].last_losses, steps["torchvision"].last_losses
    b = {TV_LOSS_NAMES.get(k, k): v for k, v in b.items()}
    diffs = {k: abs(a[k] - b[k]) for k in b}
    print("first-step losses (torchvision):", {k: round(v, 5) for k, v in b.items()})
    print("max |ours - torchvision| per loss:", {k: f"{v:.1e}" for k, v in diffs.items()})
    print("all times (ms):", {k: [round(1000 * t) for t in v] for k, v in times.items()})
    if args.profile:
        for name, step in steps.items():
            print_profile(name, step, device)


def print_profile(name: str, step, device, steps: int = 2, rows: int = 20) -> None:
    """The ops taking the most time over `steps` steps (self time, device time on CUDA)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{name}: top ops over {steps} steps by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
