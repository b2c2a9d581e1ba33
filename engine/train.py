"""Training loop: steps, checkpoints, evaluation during training, DDP, time budget.

    cfg = apply_overrides(load_config("my.ini"), {"solver.max_iter": 1000})
    summary = train(cfg)                 # or train(cfg, resume=True) to continue

Everything is driven by the config ([solver], [data], [eval] sections; see config.ini).
Under `torchrun` each process trains on its shard of every global batch
(solver.batch_size images per iteration in total) with DistributedDataParallel; only rank 0
logs and writes files. The optimizer and schedule are engine/optim.py, the initial model
and data sets engine/initialise.py, the logs and bars engine/monitor.py.

Exact resume: a checkpoint holds the model, optimizer, schedule and AMP scaler states, the
iteration, every RNG state and the data position (epoch, batches done in it), so training
N + M iterations in one go or N, stop, resume, M gives the same weights (on CPU; CUDA
kernels may be non-deterministic).

Outputs in solver.output_dir: model_<iter>.pth checkpoints (the last keep_last),
log.jsonl (one JSON object per log_every iterations: iter, lr, time, the losses averaged
over those iterations; and eval results), loss.png (loss curves and AP over training);
with evaluation during training, model_best.pth (the checkpoint, same format, of the
evaluation with the best segm AP, bbox AP for box-only models); with [solver]
tensorboard = true, TensorBoard scalars in tensorboard/.

Early stopping: with [solver] patience = N > 0 the run ends after N evaluations in a row
without improvement of that AP (by more than patience_delta over the best before each),
with a line saying so; the final checkpoint is written and marked ("early_stop"), so
`train(cfg, resume=True)` on it trains no further (it says so and returns) unless the
config's patience now allows more evaluations; model_best.pth stays the best one.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
from easydict import EasyDict
from torch import nn

from engine import distributed as dist_utils
from engine.checkpoint import (atomic_save, resume_training, rng_state, save_checkpoint,
                               training_state)
from engine.initialise import (RunConfigError, build_datasets,  # noqa: F401
                               build_initial_model, build_train_loader, prepare_run,
                               seed_everything)
from engine.monitor import (JsonLog, LossWindow, MissingPackageError,  # noqa: F401
                            evaluations_in_log, open_monitor, peak_memory_mib,
                            summary_writer_class)
from engine.optim import LRSchedule, build_optimizer, build_schedule  # noqa: F401

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask")


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; training stopped."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


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
        MaskRCNN, unwrapped from DDP), early_stop (the checkpoint's "early_stop" record
        when [solver] patience ended the run, else None)).
    Raises:
        NonFiniteLossError when a loss becomes NaN/inf (the last good checkpoint stays).
        FileNotFoundError naming the files tried when resuming and none of them loads.
        RunConfigError for a config that cannot train on its data (num_classes other than
        the data's; patience without evaluations).
    """
    distributed = dist_utils.init_distributed()
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    main = rank == 0
    device = dist_utils.device_for_rank()
    solver = cfg.solver
    # every rank checks (an error on rank 0 alone would leave the others waiting)
    summary_writer = summary_writer_class() if solver.tensorboard else None
    if solver.batch_size % world:
        raise ValueError(f"[solver] batch_size = {solver.batch_size} is not divisible by the "
                         f"{world} processes")
    out_dir = Path(solver.output_dir)
    cfg, model, train_set, val_set = prepare_run(cfg, main, rank, device)
    _check_patience(cfg, val_set)
    optimizer = build_optimizer(solver, model)
    schedule = build_schedule(solver, optimizer)
    use_amp = bool(solver.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    last_ckpt, (start_iter, elapsed, epoch, batch_in_epoch), stopped_at = resume_training(
        out_dir, resume, main, rank, model, optimizer, schedule, scaler)
    if stopped_at is not None and 0 < solver.patience <= stopped_at["evaluations"]:
        if main:
            print(f"{out_dir}: the run ended by early stopping at iteration "
                  f"{stopped_at['iteration']} ({stopped_at['evaluations']} evaluations "
                  f"without improvement; best {stopped_at['metric']} "
                  f"{stopped_at['best_ap']:.4f} at iteration "
                  f"{stopped_at['best_iteration']}, model_best.pth): nothing to train. To "
                  f"train on, --resume with [solver] patience above "
                  f"{stopped_at['evaluations']} (or 0: off)")
        return dict(iterations=start_iter, last_losses={}, checkpoint=str(last_ckpt),
                    elapsed_s=elapsed, eval_s=0.0, metrics=None, model=model,
                    early_stop=stopped_at)

    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    loader = build_train_loader(train_set, solver, cfg.data.num_workers, world, distributed)
    batches_per_epoch = len(loader)

    log = JsonLog(out_dir / "log.jsonl", main, start_iter)
    budget_s = solver.max_minutes * 60.0
    bar, monitor = open_monitor(main, progress, summary_writer, out_dir, solver.max_iter,
                                budget_s, device, start_iter, elapsed)
    ctx = _Loop(cfg, model, optimizer, schedule, scaler, device, use_amp, main, log,
                train_set, val_set, monitor, progress and main)
    if last_ckpt is not None:       # the evaluations so far: best AP, patience used
        ctx.tracker.replay(dist_utils.broadcast_object(
            evaluations_in_log(log.path, ctx.best_kind) if main else None))

    iteration, eval_s, saved_iter = start_iter, 0.0, start_iter if last_ckpt else -1
    stopped = False
    window = LossWindow()
    last_losses: dict = {}
    ckpt_path: Optional[Path] = last_ckpt
    metrics = None
    t_start = time.perf_counter() - elapsed
    try:
        def done() -> bool:
            return stopped or iteration >= solver.max_iter or \
                (budget_s > 0 and elapsed >= budget_s)

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
                    metrics = ctx.evaluate(iteration, epoch, batch_in_epoch, elapsed)
                    eval_s += time.perf_counter() - t0
                    stopped = ctx.tracker.exhausted
                if done():
                    break
        elapsed = time.perf_counter() - t_start - eval_s
        if window.count:                      # the last iterations, stopped by the budget
            record = window.record(iteration, schedule.last_lr, elapsed)
            log.write(record)
            monitor.log(record, elapsed)
        if stopped:                 # the final checkpoint says so: resume trains no further
            ctx.early_stop = ctx.tracker.record(iteration, ctx.best_kind)
            monitor.early_stop(iteration, ctx.best_kind, ctx.tracker.stale, ctx.tracker.best)
        if saved_iter != iteration or stopped:
            ckpt_path = ctx.save(iteration, epoch, batch_in_epoch, elapsed, ckpt_path)
        bar.close()
        if val_set is not None and not stopped:    # stopped: just evaluated
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
                eval_s=eval_s, metrics=metrics, model=_unwrap(model),
                early_stop=ctx.early_stop)


def _check_patience(cfg: EasyDict, val_set) -> None:
    """[solver] patience needs evaluations during training to count."""
    s = cfg.solver
    if s.patience < 0 or s.patience_delta < 0:
        raise RunConfigError(f"[solver] patience = {s.patience}, patience_delta = "
                             f"{s.patience_delta}: both must be >= 0 (patience 0: off)")
    if s.patience > 0 and (val_set is None or cfg.eval.eval_every <= 0):
        raise RunConfigError(
            f"[solver] patience = {s.patience} needs evaluations during training: set "
            f"[data] val_json / val_images and [eval] eval_every > 0 (now "
            f"val_json = {cfg.data.val_json}, eval_every = {cfg.eval.eval_every}), or "
            f"patience = 0")


class ApTracker:
    """The AP model_best.pth follows, over a run's evaluations: `best` (AP, iteration)
    and, for early stopping, `stale`: evaluations since the last one whose AP beat the
    best before it by more than `delta`."""

    def __init__(self, patience: int, delta: float):
        self.patience, self.delta = patience, delta
        self.best: Optional[tuple] = None
        self.stale = 0

    def update(self, ap: float, iteration: int) -> bool:
        """Count one evaluation; returns whether its AP is a new best (model_best.pth)."""
        gained = self.best is None or ap > self.best[0] + self.delta
        self.stale = 0 if gained else self.stale + 1
        improved = self.best is None or ap > self.best[0]
        if improved:
            self.best = (ap, iteration)
        return improved

    def replay(self, evaluations: list) -> None:
        """Count a resumed run's earlier evaluations: [(iteration, AP)] in order."""
        for iteration, ap in evaluations:
            self.update(ap, iteration)

    @property
    def exhausted(self) -> bool:
        """Whether [solver] patience ends the run now."""
        return self.patience > 0 and self.stale >= self.patience

    def record(self, iteration: int, kind: str) -> dict:
        """The checkpoint's "early_stop" entry (plain values: weights_only-safe); kind:
        the AP's IoU type, segm or bbox."""
        return {"iteration": int(iteration), "metric": f"{kind} AP",
                "evaluations": int(self.stale),
                "best_ap": float(self.best[0]), "best_iteration": int(self.best[1]),
                "patience": int(self.patience), "patience_delta": float(self.delta)}


class _Loop:
    """One training step, checkpointing and evaluation, sharing the run's state."""

    def __init__(self, cfg, model, optimizer, schedule, scaler, device, use_amp, main, log,
                 train_set, val_set, monitor, progress):
        self.cfg, self.model, self.optimizer, self.schedule = cfg, model, optimizer, schedule
        self.scaler, self.device, self.use_amp, self.main = scaler, device, use_amp, main
        self.log, self.train_set, self.val_set = log, train_set, val_set
        self.monitor, self.progress = monitor, progress
        # model_best.pth (and early stopping) follows this AP
        self.best_kind = "segm" if cfg.model.mask_on else "bbox"
        self.tracker = ApTracker(cfg.solver.patience, cfg.solver.patience_delta)
        self.early_stop: Optional[dict] = None     # set when patience ends the run

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
        state = training_state(_unwrap(self.model), self.optimizer, self.schedule,
                               self.scaler if self.use_amp else None, self.train_set,
                               self.cfg, iteration, (epoch, batch_in_epoch), elapsed, rngs)
        if self.early_stop is not None:
            state["early_stop"] = dict(self.early_stop)
        return state

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
        improved = self.tracker.update(float(metrics[kind]["AP"]), iteration)  # every rank
        if improved:
            rngs = dist_utils.all_gather_object(rng)
            if self.main:
                atomic_save(self.state(iteration, epoch, batch_in_epoch, elapsed, rngs),
                            Path(self.cfg.solver.output_dir) / "model_best.pth")
            dist_utils.barrier()
        self.monitor.evaluation(iteration, metrics, kind, self.tracker.best, improved)
        self.model.train()
        return metrics
