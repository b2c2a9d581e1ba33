"""Checkpoints that survive faults: `maskrcnn train --resume` after a truncated newest
checkpoint (a full disk, an interrupted copy) and after a SIGKILL at any moment, a
checkpoint write included, ends with the weights an uninterrupted run gets, bit for bit."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint
from engine.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from engine.cli import main

PACKAGE_DIR = Path(__file__).resolve().parents[2]   # the repository root


def _truncate(path):
    """What a full disk or an interrupted copy leaves: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _iters_logged(out):
    return [json.loads(line)["iter"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_skips_a_truncated_newest_checkpoint(tiny_cfg, tmp_path, capsys, write_ini):
    """The issue's report: `--resume` died with torch's "PytorchStreamReader failed
    reading zip archive", naming no file. Now it warns and resumes from the one before."""
    cfg = tiny_cfg(max_iter=2, checkpoint_every=1, keep_last=3)
    out = tmp_path / "out"
    ini = write_ini(cfg, tmp_path / "tiny.ini")
    assert main(["train", "--config", str(ini), "--no-progress"]) == 0
    _truncate(checkpoint_path(out, 2))
    capsys.readouterr()
    assert main(["train", "--config", str(ini), "--no-progress", "--resume",
                 "--set", "max_iter=3"]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "model_0000002.pth" in line]
    assert len(warning) == 1 and "truncated" in warning[0], captured.err
    assert f"resuming from {checkpoint_path(out, 1)} (iteration 1)" in captured.out
    assert load_checkpoint(checkpoint_path(out, 2))["iteration"] == 2    # written anew
    assert load_checkpoint(checkpoint_path(out, 3))["iteration"] == 3
    assert _iters_logged(out) == [1, 2, 3]


def test_resume_with_no_valid_checkpoint_names_the_files_tried(tiny_cfg, tmp_path, capsys,
                                                               write_ini):
    """No checkpoint loads: a one-line usage error naming each file and why."""
    cfg = tiny_cfg(max_iter=2, checkpoint_every=1, keep_last=3)
    ini = write_ini(cfg, tmp_path / "tiny.ini")
    assert main(["train", "--config", str(ini), "--no-progress"]) == 0
    for it in (1, 2):
        _truncate(checkpoint_path(tmp_path / "out", it))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(ini), "--no-progress", "--resume"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    for word in ("model_0000001.pth", "model_0000002.pth", "truncated"):
        assert word in error, error


# ------------------------------------------------------------------------- SIGKILL

# One thread per process: on a shared machine two OpenMP threads per process can run ten
# times slower; the reference runs the same way, so the arithmetic is the same. Unbuffered:
# the test polls the output for "resuming from".
THREADS = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(ini, log, *args, env=None):
    """`python -m engine.cli train` in a subprocess, stdout + stderr to `log`."""
    command = [sys.executable, "-m", "engine.cli", "train", "--config", str(ini),
               "--no-progress", *args]
    with open(log, "w") as f:
        return subprocess.Popen(command, cwd=PACKAGE_DIR, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **THREADS, **(env or {})})


def _wait_for(condition, proc, what, timeout_s=60.0):
    """Poll until condition() (True) or proc ended (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return True


def _kill(proc):
    """SIGKILL `proc`, and check that the kill is what ended it (not a run that had
    already finished: os.kill on an exited, unreaped child succeeds silently)."""
    assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.returncode


def _last_iter_logged(out):
    """The highest iteration in out/log.jsonl so far (0 if none); a line being written
    (not yet a whole JSON object) is skipped."""
    last = 0
    path = out / "log.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            last = max(last, json.loads(line).get("iter", 0))
        except ValueError:
            continue
    return last


def _assert_no_half_written_checkpoint(out):
    for path in list_checkpoints(out):
        load_checkpoint(path)                 # raises on a truncated file


def _assert_identical(a, b, where="checkpoint"):
    """Same nested structure with bit-identical tensors and equal other values."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bit_identical(tiny_cfg, tmp_path, write_ini):
    """`maskrcnn train` in a subprocess, SIGKILLed inside a checkpoint write, right after
    a checkpoint appears and at random moments, resumed with --resume each time: the
    final checkpoint equals an uninterrupted run's bit for bit, no file under a checkpoint
    name is ever half-written and no temp file is left."""
    common = dict(max_iter=10, checkpoint_every=2, keep_last=2, warmup_iters=2, steps="5,",
                  flip_prob=0.5)
    reference, out = tmp_path / "reference", tmp_path / "out"
    ref_ini = write_ini(tiny_cfg(output_dir=str(reference), **common), tmp_path / "ref.ini")
    ini = write_ini(tiny_cfg(output_dir=str(out), **common), tmp_path / "tiny.ini")
    straight = _start(ref_ini, tmp_path / "reference.log")
    assert straight.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()
    logs = iter(tmp_path / f"run{i}.log" for i in range(100))
    moments = []        # shown when an assertion fails

    # 1. killed inside atomic_save: model_0000004.pth is in its temp file, not renamed yet
    log = next(logs)
    run = _start(ini, log, env={checkpoint.KILL_SAVING_ENV: "model_0000004.pth"})
    assert run.wait(timeout=120) == -signal.SIGKILL, log.read_text()
    moments.append("while writing model_0000004.pth")
    assert list(out.glob(".model_0000004.pth.*.tmp")), sorted(out.iterdir())
    assert [p.name for p in list_checkpoints(out)] == ["model_0000002.pth"]
    assert (out / "last_checkpoint").read_text().strip() == "model_0000002.pth"
    _assert_no_half_written_checkpoint(out)

    # 2. killed as soon as the next checkpoint is renamed into place (during the
    # last_checkpoint write, the pruning or the next iteration)
    log = next(logs)
    run = _start(ini, log, "--resume")
    assert _wait_for(checkpoint_path(out, 4).is_file, run, "model_0000004.pth"), \
        log.read_text()
    _kill(run)
    moments.append("just after model_0000004.pth appeared")
    _assert_no_half_written_checkpoint(out)

    # 3. killed at (seeded) random moments of a resumed run: a short random delay after
    # a random iteration past everything already logged (so the line is this run's, and
    # at least one iteration, the final checkpoint and the plot are still to come: the
    # kill cannot miss; _kill asserts it is what ended the run)
    rng = random.Random(22)
    for _ in range(2):
        before = _last_iter_logged(out)
        assert before <= 8, f"the earlier kills left too little to kill: {moments}"
        target = min(rng.randint(before + 1, before + 2), 9)
        delay = rng.uniform(0.0, 0.1)
        log = next(logs)
        run = _start(ini, log, "--resume")
        assert _wait_for(lambda: _last_iter_logged(out) >= target, run, f"iteration {target}"), \
            (moments, log.read_text())
        assert "resuming from" in log.read_text(), log.read_text()
        time.sleep(delay)
        moments.append(f"{delay:.3f} s after iteration {target}")
        _kill(run)
        _assert_no_half_written_checkpoint(out)

    # then one resume to the end
    log = next(logs)
    run = _start(ini, log, "--resume")
    assert run.wait(timeout=120) == 0, (moments, log.read_text())
    assert "resuming from" in log.read_text(), log.read_text()

    final_a = load_checkpoint(checkpoint_path(reference, 10))
    final_b = load_checkpoint(checkpoint_path(out, 10))
    for state in (final_a, final_b):
        del state["elapsed_s"], state["config"]          # wall time; output_dir
    _assert_identical(final_a, final_b, f"checkpoint killed {moments}")
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == [], moments
    assert [p.name for p in list_checkpoints(out)] == ["model_0000008.pth",
                                                       "model_0000010.pth"], moments
    assert _iters_logged(out) == list(range(1, 11)), moments
