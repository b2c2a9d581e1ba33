"""The optimizer and the learning-rate schedule of a training run ([solver] section).

    optimizer = build_optimizer(cfg.solver, model)    # SGD or AdamW, no decay on norms/biases
    schedule = build_schedule(cfg.solver, optimizer)
    lr = schedule.step(iteration, elapsed_s)          # sets every param group's lr
"""
from __future__ import annotations

import bisect
import math

import torch
from easydict import EasyDict
from torch import nn


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
