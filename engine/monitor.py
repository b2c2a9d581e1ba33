"""Watching a training run (rank 0): log.jsonl, the console, TensorBoard, progress bars.

With progress=True a tqdm bar (losses, lr, s/iter, ETA, peak memory) and a bar over the
images at each evaluation; with progress=False one flushed stdout line per log_every
iterations instead:

    iter 40/900  loss=2.1034 rpn_cls=0.3121 ... lr=2.000e-03 s/iter=0.412 eta=0:05:54 max_mem=812MiB

(max_mem: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on the CPU).
Each evaluation prints one line with its AP, and the best so far. With [solver]
tensorboard = true, TensorBoard scalars go to tensorboard/ (losses, lr, AP).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch


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


class LossWindow:
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


class ProgressBar:
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


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter; [solver] tensorboard = true without the
    tensorboard package is an error at the start of training, saying what to do."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingPackageError(
            f"[solver] tensorboard = true needs the tensorboard package ({err}): "
            f"pip install tensorboard, or set [solver] tensorboard = false") from err
    return SummaryWriter


def evaluations_in_log(path: Path, kind: str) -> list[tuple[int, float]]:
    """(iteration, `kind` AP) of log.jsonl's evaluations, in the log's order."""
    found = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                found.append((int(record["iter"]), float(record["eval"][kind]["AP"])))
            except (ValueError, KeyError, TypeError):
                continue
    return found


class Monitor:
    """What rank 0 shows of a run: one flushed console line per log interval when the
    bar is off, TensorBoard scalars when a writer is given, one line per evaluation."""

    def __init__(self, main: bool, console: bool, bar: ProgressBar, writer,
                 max_iter: int, budget_s: float, device: torch.device, start_iter: int,
                 start_elapsed: float):
        self.main, self.console, self.bar, self.writer = main, console, bar, writer
        self.max_iter, self.budget_s, self.device = max_iter, budget_s, device
        self.last_iter, self.last_elapsed = start_iter, start_elapsed

    def log(self, record: dict, elapsed: float) -> None:
        """record: a LossWindow record (losses averaged over the interval)."""
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

    def early_stop(self, iteration: int, kind: str, evaluations: int, best: tuple) -> None:
        """The line of a run ended by [solver] patience; best: (AP, iteration)."""
        if self.main:
            self._print(f"early stop at iteration {iteration}: {kind} AP did not improve "
                        f"for {evaluations} evaluations (best {best[0]:.4f} at iteration "
                        f"{best[1]})")

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


def open_monitor(main: bool, progress: bool, summary_writer, out_dir: Path, max_iter: int,
                 budget_s: float, device: torch.device, start_iter: int,
                 start_elapsed: float) -> tuple[ProgressBar, Monitor]:
    """The run's progress bar (rank 0 with progress) and its Monitor: console lines when
    the bar is off, TensorBoard scalars when summary_writer (a SummaryWriter class) is
    given."""
    bar = ProgressBar(progress and main, start_iter, max_iter, budget_s, device)
    writer = None
    if summary_writer is not None and main:
        # purge_step: TensorBoard hides what an interrupted run logged after the resume point
        writer = summary_writer(str(out_dir / "tensorboard"), flush_secs=30,
                                purge_step=start_iter + 1 if start_iter else None)
    return bar, Monitor(main, not progress, bar, writer, max_iter, budget_s, device,
                        start_iter, start_elapsed)
