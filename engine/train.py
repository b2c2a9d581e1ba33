"""Training loop: optimizer, learning-rate schedule, checkpoints, logs, DDP, time budget.

    cfg = apply_overrides(load_config("my.ini"), {"solver.max_iter": 1000})
    summary = train(cfg)                 # or train(cfg, resume=True) to continue

Everything is driven by the config ([solver], [data], [eval] sections; see config.ini).
Under `torchrun` each process trains on its shard of every global batch
(solver.batch_size images per iteration in total) with DistributedDataParallel; only rank 0
logs and writes files.

Exact resume: a checkpoint holds the model, optimizer, schedule and AMP scaler states, the
iteration, every RNG state and the data position (epoch, batches done in it), so training
N + M iterations in one go or N, stop, resume, M gives the same weights (on CPU; CUDA
kernels may be non-deterministic).

Outputs in solver.output_dir: model_<iter>.pth checkpoints (the last keep_last),
log.jsonl (one JSON object per log_every iterations: iter, lr, time, the losses averaged
over those iterations; and eval results), loss.png (loss curves and AP over training);
with evaluation during training, model_best.pth (the checkpoint, same format, of the
evaluation with the best segm AP, bbox AP for box-only models); with [solver]
tensorboard = true, TensorBoard scalars in tensorboard/ (losses, lr, AP).

Watching a run (rank 0): with progress=True a tqdm bar (losses, lr, s/iter, ETA, peak
memory) and a bar over the images at each evaluation; with progress=False one flushed
stdout line per log_every iterations instead:

    iter 40/900  loss=2.1034 rpn_cls=0.3121 ... lr=2.000e-03 s/iter=0.412 eta=0:05:54 max_mem=812MiB

(max_mem: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on the CPU).
Each evaluation prints one line with its AP, and the best so far.
"""
from __future__ import annotations

import bisect
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from easydict import EasyDict
from torch import nn

from builder import build_model
from configs import apply_overrides
from engine import distributed as dist_utils
from engine.checkpoint import (atomic_save, latest_checkpoint, load_checkpoint,
                              load_latest_checkpoint, plain, rng_state, save_checkpoint,
                              set_rng_state)

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask")


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; training stopped."""


# ------------------------------------------------------------------ optimizer + schedule

def build_optimizer(solver: EasyDict, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW (beta1 = momentum) over trainable params.

    Normalisation weights and biases get no weight decay (as detectron2 and timm)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # 1-D: norm scales/shifts and biases
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": solver.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    name = solver.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=solver.lr, betas=(solver.momentum, 0.999))
    raise ValueError(f"[solver] optimizer = {solver.optimizer!r}: expected sgd or adamw")


class LRSchedule:
    """Linear warm-up (in iterations) times step or cosine decay over the run's progress.

    progress = max(iteration / max_iter, elapsed_s / budget_s) when a time budget is set
    (budget_s > 0), else iteration / max_iter; so cosine reaches lr * min_lr_factor exactly
    at whichever end comes first, and step decay at progress steps[i] / max_iter.

    Args:
        optimizer: its param groups' "lr" is set by `step`.
        lr: base learning rate; schedule: "step" or "cosine".
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, schedule: str = "step",
                 max_iter: int = 90000, warmup_iters: int = 0, warmup_factor: float = 1.0,
                 steps: tuple = (), gamma: float = 0.1, min_lr_factor: float = 0.0,
                 budget_s: float = 0.0):
        if schedule not in ("step", "cosine"):
            raise ValueError(f"[solver] lr_schedule = {schedule!r}: expected step or cosine")
        if max_iter < 1:
            raise ValueError(f"[solver] max_iter = {max_iter}: must be >= 1")
        self.optimizer, self.lr, self.schedule = optimizer, float(lr), schedule
        self.max_iter, self.warmup_iters = int(max_iter), int(warmup_iters)
        self.warmup_factor, self.gamma = float(warmup_factor), float(gamma)
        self.steps = sorted(int(s) for s in steps)
        self.min_lr_factor, self.budget_s = float(min_lr_factor), float(budget_s)
        self.last_lr = self.lr

    def progress(self, iteration: int, elapsed_s: float = 0.0) -> float:
        p = iteration / self.max_iter
        if self.budget_s > 0:
            p = max(p, elapsed_s / self.budget_s)
        return min(max(p, 0.0), 1.0)

    def factor(self, iteration: int, elapsed_s: float = 0.0) -> float:
        p = self.progress(iteration, elapsed_s)
        if self.schedule == "step":
            fractions = [s / self.max_iter for s in self.steps]
            f = self.gamma ** bisect.bisect_right(fractions, p)
        else:
            f = self.min_lr_factor + (1 - self.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * p))
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            f *= self.warmup_factor * (1 - alpha) + alpha
        return f

    def step(self, iteration: int, elapsed_s: float = 0.0) -> float:
        """Set the learning rate of iteration `iteration` (0-based) and return it."""
        self.last_lr = self.lr * self.factor(iteration, elapsed_s)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        return self.last_lr

    def state_dict(self) -> dict:
        return {"last_lr": self.last_lr}

    def load_state_dict(self, state: dict) -> None:
        self.last_lr = float(state["last_lr"])


def build_schedule(solver: EasyDict, optimizer: torch.optim.Optimizer) -> LRSchedule:
    return LRSchedule(optimizer, solver.lr, solver.lr_schedule, solver.max_iter,
                      solver.warmup_iters, solver.warmup_factor, solver.steps, solver.gamma,
                      solver.min_lr_factor, solver.max_minutes * 60.0)


# --------------------------------------------------------------------------- helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _is_disabled(path: Any) -> bool:
    return path is None or str(path).strip().lower() in ("", "none")


def build_datasets(cfg: EasyDict):
    """(train CocoInstances, val CocoInstances or None) from cfg.data."""
    from engine.data import CocoInstances
    d = cfg.data
    for key in ("train_json", "train_images"):
        if not Path(d[key]).exists():
            raise FileNotFoundError(f"[data] {key} = {d[key]}: not found")
    train_set = CocoInstances(d.train_json, d.train_images, train=True,
                              skip_empty=d.skip_empty, flip_prob=d.flip_prob, lsj=d.lsj,
                              lsj_scale=d.lsj_scale, lsj_size=d.lsj_size)
    if len(train_set) == 0:
        raise ValueError(f"[data] train_json = {d.train_json}: no usable training images")
    val_set = None
    if not _is_disabled(d.val_json):
        for key in ("val_json", "val_images"):
            if not Path(d[key]).exists():
                raise FileNotFoundError(f"[data] {key} = {d[key]}: not found (set "
                                        f"val_json = none to train without evaluation)")
        val_set = CocoInstances(d.val_json, d.val_images, train=False)
    return train_set, val_set


def build_initial_model(cfg: EasyDict, verbose: bool = True) -> nn.Module:
    """The model to train: with [model] pretrained set (coco, a zoo name, a checkpoint of
    any supported format, imagenet), MaskRCNN(pretrained=...) with cfg's num_classes (a
    zoo model brings its preset's architecture; the returned model's cfg is the merged
    one, and other classes than the checkpoint's re-initialise only the predictors).
    Else build_model(cfg) initialised as [solver] init_weights says: none (random),
    imagenet (ImageNet backbone from the torch hub cache), a training checkpoint (its
    model weights whose shapes match, e.g. to fine-tune with other classes) or a file of
    ImageNet ResNet weights."""
    pretrained = cfg.model.pretrained
    if pretrained is not None and str(pretrained).lower() != "none":
        from maskrcnn import MaskRCNN
        return MaskRCNN(num_classes=cfg.model.num_classes, pretrained=str(pretrained),
                        config=cfg)
    init = str(cfg.solver.init_weights).strip()
    if _is_disabled(init):
        if cfg.backbone.norm == "frozen_bn" and verbose:
            print("warning: norm = frozen_bn with random init: the frozen BatchNorm "
                  "statistics are random and training cannot fix them; use norm = bn or gn, "
                  "or [solver] init_weights = imagenet", file=sys.stderr)
        return build_model(cfg)
    if init == "imagenet":
        return build_model(cfg, pretrained_backbone="imagenet")
    if not Path(init).is_file():
        raise FileNotFoundError(f"[solver] init_weights = {init}: file not found")
    state = load_checkpoint(init)
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict)):
        return build_model(cfg, pretrained_backbone=init)
    model = build_model(cfg)
    own = model.state_dict()
    usable = {k: v for k, v in state["model"].items()
              if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    if verbose:
        print(f"init_weights {init}: {len(usable)} tensors loaded"
              + (f", {len(skipped)} kept at random init ({', '.join(skipped[:4])}"
                 f"{', ...' if len(skipped) > 4 else ''})" if skipped else ""))
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class JsonLog:
    """output_dir/log.jsonl, written by rank 0 only; on resume the lines after the
    resumed iteration (from the interrupted run) are dropped."""

    def __init__(self, path: Path, enabled: bool, start_iter: int = 0):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_iter > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("iter", 0) <= start_iter:
                        kept.append(line)
                except ValueError:
                    continue
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- train

def train(cfg: EasyDict, resume: bool = False, progress: bool = True) -> dict:
    """Train a Mask R-CNN as configured by cfg; see the module docstring.

    Args:
        cfg: a full config (maskrcnn.load_config, with overrides applied).
        resume: continue from the newest checkpoint in solver.output_dir that loads (a
            newer one cut short by a full disk or a copy is skipped with a warning; a
            fresh start when there is none).
        progress: show a tqdm bar (rank 0).
    Returns:
        dict(iterations, last_losses {name: float}, checkpoint (path of the last one, or
        None), elapsed_s (training time, evaluation excluded), eval_s, metrics (the last
        evaluation's {"bbox": {...}, "segm": {...}}, or None), model (the trained
        MaskRCNN, unwrapped from DDP)).
    Raises:
        NonFiniteLossError when a loss becomes NaN/inf (the last good checkpoint stays).
        FileNotFoundError naming the files tried when resuming and none of them loads.
    """
    distributed = dist_utils.init_distributed()
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    main = rank == 0
    device = dist_utils.device_for_rank()
    solver = cfg.solver
    # every rank checks (an error on rank 0 alone would leave the others waiting)
    summary_writer = _summary_writer_class() if solver.tensorboard else None
    if solver.batch_size % world:
        raise ValueError(f"[solver] batch_size = {solver.batch_size} is not divisible by the "
                         f"{world} processes")
    out_dir = Path(solver.output_dir)
    train_set, val_set = build_datasets(cfg)
    if cfg.model.num_classes != train_set.num_classes:
        if main:
            print(f"note: model.num_classes = {cfg.model.num_classes} but {cfg.data.train_json}"
                  f" has {train_set.num_classes} categories; using {train_set.num_classes}")
        cfg = apply_overrides(cfg, {"model.num_classes": train_set.num_classes})

    seed_everything(solver.seed + rank)
    model = build_initial_model(cfg, verbose=main).to(device)
    cfg = model.cfg       # a zoo model's preset architecture, with this config's values
    optimizer = build_optimizer(solver, model)
    schedule = build_schedule(solver, optimizer)
    use_amp = bool(solver.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_iter, epoch, batch_in_epoch, elapsed = 0, 0, 0, 0.0
    # loaded on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
    last_ckpt, state = load_latest_checkpoint(out_dir, verbose=main) if resume else (None, None)
    if last_ckpt is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_iter, elapsed = state["iteration"], state["elapsed_s"]
        epoch, batch_in_epoch = state["data"]["epoch"], state["data"]["batch_in_epoch"]
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        if main:
            print(f"resuming from {last_ckpt} (iteration {start_iter})")
    elif not resume and main and latest_checkpoint(out_dir) is not None:
        print(f"note: {out_dir} holds checkpoints of an earlier run; starting fresh (pass "
              f"--resume to continue it)", file=sys.stderr)

    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    from engine.data import build_loader
    loader = build_loader(train_set, batch_size=solver.batch_size // world, shuffle=True,
                          num_workers=cfg.data.num_workers, seed=solver.seed,
                          distributed=distributed)
    loader.sampler.set_epoch(0)
    batches_per_epoch = len(loader)

    log = JsonLog(out_dir / "log.jsonl", main, start_iter)
    budget_s = solver.max_minutes * 60.0
    bar = _progress_bar(progress and main, start_iter, solver.max_iter, budget_s, device)
    writer = None
    if summary_writer is not None and main:
        # purge_step: TensorBoard hides what an interrupted run logged after the resume point
        writer = summary_writer(str(out_dir / "tensorboard"), flush_secs=30,
                                purge_step=start_iter + 1 if start_iter else None)
    monitor = _Monitor(main, not progress, bar, writer, solver.max_iter, budget_s, device,
                       start_iter, elapsed)
    ctx = _Loop(cfg, model, optimizer, schedule, scaler, device, use_amp, main, log,
                train_set, val_set, monitor, progress and main)
    if last_ckpt is not None:
        ctx.best = dist_utils.broadcast_object(
            _best_in_log(log.path, ctx.best_kind) if main else None)

    iteration, eval_s, saved_iter = start_iter, 0.0, start_iter if last_ckpt else -1
    window = _LossWindow()
    last_losses: dict = {}
    ckpt_path: Optional[Path] = last_ckpt
    metrics = None
    t_start = time.perf_counter() - elapsed
    try:
        def done() -> bool:
            return iteration >= solver.max_iter or (budget_s > 0 and elapsed >= budget_s)

        while not done():
            loader.sampler.set_epoch(epoch, start_batch=batch_in_epoch)
            for images, targets in loader:
                lr = schedule.step(iteration, elapsed)
                last_losses = ctx.step(iteration, images, targets, ckpt_path)
                iteration += 1
                batch_in_epoch += 1
                if batch_in_epoch >= batches_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                elapsed = time.perf_counter() - t_start - eval_s
                if distributed and budget_s > 0:
                    # every rank uses rank 0's clock: same lr, and all stop together
                    elapsed = dist_utils.broadcast_object(elapsed)
                bar.update(iteration, elapsed, last_losses, lr)
                window.add(last_losses)
                if iteration % max(solver.log_every, 1) == 0 or iteration == solver.max_iter:
                    record = window.record(iteration, lr, elapsed)
                    log.write(record)
                    monitor.log(record, elapsed)
                if solver.checkpoint_every > 0 and iteration % solver.checkpoint_every == 0:
                    ckpt_path = ctx.save(iteration, epoch, batch_in_epoch, elapsed, ckpt_path)
                    saved_iter = iteration
                if cfg.eval.eval_every > 0 and iteration % cfg.eval.eval_every == 0 \
                        and not done() and val_set is not None:
                    t0 = time.perf_counter()
                    ctx.evaluate(iteration, epoch, batch_in_epoch, elapsed)
                    eval_s += time.perf_counter() - t0
                if done():
                    break
        elapsed = time.perf_counter() - t_start - eval_s
        if window.count:                      # the last iterations, stopped by the budget
            record = window.record(iteration, schedule.last_lr, elapsed)
            log.write(record)
            monitor.log(record, elapsed)
        if saved_iter != iteration:
            ckpt_path = ctx.save(iteration, epoch, batch_in_epoch, elapsed, ckpt_path)
        bar.close()
        if val_set is not None:
            t0 = time.perf_counter()
            metrics = ctx.evaluate(iteration, epoch, batch_in_epoch, elapsed)
            eval_s += time.perf_counter() - t0
        if main:
            from tools.visualize import plot_training
            plot_training(out_dir / "log.jsonl", out_dir / "loss.png")
    finally:
        bar.close()
        monitor.close()
    return dict(iterations=iteration, last_losses=last_losses,
                checkpoint=str(ckpt_path) if ckpt_path else None, elapsed_s=elapsed,
                eval_s=eval_s, metrics=metrics, model=_unwrap(model))


class _Loop:
    """One training step, checkpointing and evaluation, sharing the run's state."""

    def __init__(self, cfg, model, optimizer, schedule, scaler, device, use_amp, main, log,
                 train_set, val_set, monitor, progress):
        self.cfg, self.model, self.optimizer, self.schedule = cfg, model, optimizer, schedule
        self.scaler, self.device, self.use_amp, self.main = scaler, device, use_amp, main
        self.log, self.train_set, self.val_set = log, train_set, val_set
        self.monitor, self.progress = monitor, progress
        # model_best.pth follows this AP; best: (AP, iteration) of the best evaluation
        self.best_kind = "segm" if cfg.model.mask_on else "bbox"
        self.best: Optional[tuple] = None

    def step(self, iteration: int, images, targets, ckpt_path) -> dict:
        """Forward, NaN/inf check, backward, (clip), optimizer step. Returns the losses
        (averaged over ranks) as floats."""
        model, device = self.model, self.device
        model.train()
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                    for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=device.type, enabled=self.use_amp):
            loss_dict = model(images, targets)
        total = sum(loss_dict.values())
        values = dist_utils.all_reduce_mean({k: float(v.detach()) for k, v in
                                             loss_dict.items()})
        if not all(math.isfinite(v) for v in values.values()):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise NonFiniteLossError(
                f"training stopped at iteration {iteration + 1}: a loss is not finite "
                f"({shown}). The last good checkpoint is {ckpt_path or 'none (none saved)'}; "
                f"try a lower [solver] lr, a longer warmup_iters or clip_grad > 0.")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.solver.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.solver.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return values

    def state(self, iteration, epoch, batch_in_epoch, elapsed, rngs) -> dict:
        """The checkpoint content (see engine/checkpoint.py); rngs: every rank's RNG state."""
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else {},
            "iteration": iteration,
            "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch},
            "elapsed_s": float(elapsed),
            "rng": rngs,
            "cat_ids": [int(c) for c in self.train_set.cat_ids],
            "class_names": [str(n) for n in self.train_set.class_names],
            "config": plain(self.cfg),
        }

    def save(self, iteration, epoch, batch_in_epoch, elapsed, previous) -> Optional[Path]:
        rngs = dist_utils.all_gather_object(rng_state())
        if not self.main:
            dist_utils.barrier()
            return previous
        path = save_checkpoint(self.state(iteration, epoch, batch_in_epoch, elapsed, rngs),
                               self.cfg.solver.output_dir, iteration,
                               self.cfg.solver.keep_last)
        dist_utils.barrier()
        return path

    def evaluate(self, iteration: int, epoch: int, batch_in_epoch: int,
                 elapsed: float) -> dict:
        """COCO AP on the val set (a bar over its images with progress), logged; writes
        model_best.pth when the AP of best_kind beats every earlier evaluation's; prints
        one line (rank 0)."""
        from engine.evaluate import evaluate
        rng = rng_state()              # the training state's, as a checkpoint now holds
        metrics = evaluate(_unwrap(self.model), self.val_set,
                           batch_size=self.cfg.eval.eval_batch_size, device=self.device,
                           mask_threshold=self.cfg.eval.mask_threshold,
                           progress=self.progress, table=False)
        self.log.write({"iter": iteration, "eval": metrics})
        kind = self.best_kind if self.best_kind in metrics else "bbox"
        ap = float(metrics[kind]["AP"])
        improved = self.best is None or ap > self.best[0]    # same on every rank
        if improved:
            self.best = (ap, iteration)
            rngs = dist_utils.all_gather_object(rng)
            if self.main:
                atomic_save(self.state(iteration, epoch, batch_in_epoch, elapsed, rngs),
                            Path(self.cfg.solver.output_dir) / "model_best.pth")
            dist_utils.barrier()
        self.monitor.evaluation(iteration, metrics, kind, self.best, improved)
        self.model.train()
        return metrics


class _LossWindow:
    """Mean losses over the iterations since the last log line (smoother curves)."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, losses: dict) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def record(self, iteration: int, lr: float, elapsed: float) -> dict:
        losses = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return {"iter": iteration, "lr": lr, "time": round(elapsed, 3),
                "loss": sum(losses.values()), "losses": losses}


class _progress_bar:
    """tqdm bar with losses, lr, s/iter, ETA (by iterations, or by the time budget) and
    peak memory."""

    def __init__(self, enabled: bool, start: int, max_iter: int, budget_s: float,
                 device: Optional[torch.device] = None):
        self.bar = None
        self.budget_s, self.max_iter, self.start = budget_s, max_iter, start
        self.device = device or torch.device("cpu")
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm
            # with a time budget the bar runs over seconds (max_iter is then just a cap)
            total, unit = (int(budget_s), "s") if budget_s > 0 else (max_iter, "it")
            self.bar = tqdm(total=total, initial=0 if budget_s > 0 else start, desc="train",
                            unit=unit, dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}" + unit +
                            " [{elapsed}{postfix}]")

    def update(self, iteration: int, elapsed: float, losses: dict, lr: float) -> None:
        if self.bar is None:
            return
        rate = (time.perf_counter() - self.t0) / max(iteration - self.start, 1)
        eta = (self.max_iter - iteration) * rate
        if self.budget_s > 0:
            eta = min(eta, max(self.budget_s - elapsed, 0.0))
        self.bar.n = min(int(elapsed), self.bar.total) if self.budget_s > 0 else iteration
        self.bar.set_postfix_str(
            f"it={iteration} loss={sum(losses.values()):.3f} "
            + " ".join(f"{k[5:]}={v:.3f}" for k, v in losses.items())
            + f" lr={lr:.2e} s/iter={rate:.3f} eta={_fmt_s(eta)} "
              f"max_mem={peak_memory_mib(self.device):.0f}MiB", refresh=False)
        self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------- watching a run

def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB: torch.cuda.max_memory_allocated on a
    CUDA device, else the peak resident set size (ru_maxrss; /proc VmHWM where the
    resource module is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # B / KiB
    except ImportError:                                    # Windows
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 10
        except OSError:
            pass
    return 0.0


class MissingPackageError(ImportError):
    """An optional package that the config asks for is not installed."""


def _summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter; [solver] tensorboard = true without the
    tensorboard package is an error at the start of training, saying what to do."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingPackageError(
            f"[solver] tensorboard = true needs the tensorboard package ({err}): "
            f"pip install tensorboard, or set [solver] tensorboard = false") from err
    return SummaryWriter


def _best_in_log(path: Path, kind: str) -> Optional[tuple]:
    """(AP, iteration) of the best `kind` AP among log.jsonl's evaluations, or None."""
    best = None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                ap = float(record["eval"][kind]["AP"])
            except (ValueError, KeyError, TypeError):
                continue
            if best is None or ap > best[0]:
                best = (ap, int(record["iter"]))
    return best


class _Monitor:
    """What rank 0 shows of a run: one flushed console line per log interval when the
    bar is off, TensorBoard scalars when a writer is given, one line per evaluation."""

    def __init__(self, main: bool, console: bool, bar: _progress_bar, writer,
                 max_iter: int, budget_s: float, device: torch.device, start_iter: int,
                 start_elapsed: float):
        self.main, self.console, self.bar, self.writer = main, console, bar, writer
        self.max_iter, self.budget_s, self.device = max_iter, budget_s, device
        self.last_iter, self.last_elapsed = start_iter, start_elapsed

    def log(self, record: dict, elapsed: float) -> None:
        """record: a _LossWindow record (losses averaged over the interval)."""
        if not self.main:
            return
        iteration = record["iter"]
        s_iter = (elapsed - self.last_elapsed) / max(iteration - self.last_iter, 1)
        self.last_iter, self.last_elapsed = iteration, elapsed
        if self.console:
            eta = max(self.max_iter - iteration, 0) * s_iter
            if self.budget_s > 0:
                eta = min(eta, max(self.budget_s - elapsed, 0.0))
            self._print(
                f"iter {iteration}/{self.max_iter}  loss={record['loss']:.4f} "
                + " ".join(f"{k[5:] if k.startswith('loss_') else k}={v:.4f}"
                           for k, v in record["losses"].items())
                + f" lr={record['lr']:.3e} s/iter={s_iter:.3f} eta={_fmt_s(eta)} "
                  f"max_mem={peak_memory_mib(self.device):.0f}MiB")
        if self.writer is not None:
            self.writer.add_scalar("loss/total", record["loss"], iteration)
            for k, v in record["losses"].items():
                self.writer.add_scalar(f"loss/{k}", v, iteration)
            self.writer.add_scalar("lr", record["lr"], iteration)

    def evaluation(self, iteration: int, metrics: dict, kind: str, best: tuple,
                   improved: bool) -> None:
        """One line: AP and AP50 of each IoU type (the one model_best.pth follows
        first), the best so far and whether model_best.pth was just written."""
        if not self.main:
            return
        from engine.evaluate import IOU_TYPES, METRIC_NAMES
        types = [kind] + [t for t in IOU_TYPES if t in metrics and t != kind]
        shown = "  ".join(f"{t} AP={metrics[t]['AP']:.4f} AP50={metrics[t]['AP50']:.4f}"
                          for t in types)
        note = (f"new best {kind} AP: saved model_best.pth" if improved
                else f"best {kind} AP={best[0]:.4f} @ iter {best[1]}")
        self._print(f"eval @ iter {iteration}/{self.max_iter}: {shown}  ({note})")
        if self.writer is not None:
            for t in types:
                for name in METRIC_NAMES:
                    if metrics[t][name] >= 0:                 # -1: no GT of that size
                        self.writer.add_scalar(f"eval/{t}_{name}", metrics[t][name],
                                               iteration)
            self.writer.flush()

    def _print(self, line: str) -> None:
        if self.bar.bar is not None:          # above the bar, without breaking it
            from tqdm import tqdm
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
