"""Training: schedule values, loss goes down, exact resume, NaN stop, time budget, log."""
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.train import LRSchedule, NonFiniteLossError, build_optimizer, train
import maskrcnn
from maskrcnn import build_model


def _schedule(**kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return LRSchedule(opt, **kw), opt


def test_step_schedule_with_warmup_hand_values():
    sched, opt = _schedule(lr=0.1, schedule="step", max_iter=100, warmup_iters=10,
                           warmup_factor=0.001, steps=(50, 80), gamma=0.1)
    expected = {0: 0.1 * 0.001, 5: 0.1 * (0.001 * 0.5 + 0.5), 10: 0.1, 49: 0.1,
                50: 0.01, 79: 0.01, 80: 0.001, 99: 0.001}
    for it, lr in expected.items():
        assert sched.step(it) == pytest.approx(lr, rel=1e-12), it
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)


def test_cosine_schedule_and_time_budget_hand_values():
    sched, _ = _schedule(lr=1.0, schedule="cosine", max_iter=100, min_lr_factor=0.1)
    assert sched.step(0) == pytest.approx(1.0)
    assert sched.step(50) == pytest.approx(0.1 + 0.9 * 0.5)          # cos(pi / 2) = 0
    assert sched.step(100) == pytest.approx(0.1)
    # with a 10 s budget, 5 s spent is half-way even at iteration 10 of 1000
    sched, _ = _schedule(lr=1.0, schedule="cosine", max_iter=1000, min_lr_factor=0.1,
                         budget_s=10.0)
    assert sched.step(10, elapsed_s=5.0) == pytest.approx(0.55)
    assert sched.step(10, elapsed_s=20.0) == pytest.approx(0.1)      # clamped at the end
    assert sched.step(500, elapsed_s=1.0) == pytest.approx(0.55)     # iterations lead
    with pytest.raises(ValueError, match="lr_schedule.*linear"):
        _schedule(lr=1.0, schedule="linear")


def test_optimizers(tiny_cfg):
    cfg = tiny_cfg(optimizer="adamw", momentum=0.85, weight_decay=0.05)
    model = build_model(cfg)
    opt = build_optimizer(cfg.solver, model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.85, 0.999)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_train
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    cfg = tiny_cfg(optimizer="rmsprop")
    with pytest.raises(ValueError, match="optimizer.*rmsprop"):
        build_optimizer(cfg.solver, model)


def _fixed_batch_loss(model, dataset):
    """Training-mode loss on the whole (tiny) set with a fixed sampling seed."""
    torch.manual_seed(123)
    images, targets = zip(*[dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return float(sum(model.train()(list(images), list(targets)).values()))


@pytest.mark.slow
def test_short_training_lowers_the_loss(tiny_cfg):
    from engine.data import CocoInstances
    cfg = tiny_cfg(max_iter=12, lr=1e-3, warmup_iters=2, flip_prob=0.0, optimizer="adamw")
    dataset = CocoInstances(cfg.data.train_json, cfg.data.train_images, train=True)
    torch.manual_seed(cfg.solver.seed)
    before = _fixed_batch_loss(build_model(cfg), dataset)   # train() inits the same way
    summary = train(cfg, progress=False)
    after = _fixed_batch_loss(summary["model"], dataset)
    assert summary["iterations"] == 12
    assert after < 0.7 * before, (before, after)
    records = [json.loads(line) for line in
               open(f"{cfg.solver.output_dir}/log.jsonl").read().splitlines()]
    assert [r["iter"] for r in records] == list(range(1, 13))
    assert set(records[0]["losses"]) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls",
                                         "loss_box", "loss_mask"}
    assert records[-1]["loss"] == pytest.approx(sum(records[-1]["losses"].values()))
    assert (summary["model"].num_classes, len(records)) == (3, 12)


@pytest.mark.slow
def test_resume_gives_identical_weights(tiny_cfg, tmp_path):
    # 8 images, batch 2: 4 batches per epoch; stop mid-epoch (3), cross an epoch on resume;
    # flips, warm-up and a step decay straddle the stop.
    common = dict(max_iter=7, warmup_iters=2, steps="5,", lr=0.01, flip_prob=0.5,
                  checkpoint_every=3, keep_last=5, clip_grad=1.0)
    straight = train(tiny_cfg(output_dir=str(tmp_path / "a"), **common), progress=False)
    first = train(tiny_cfg(output_dir=str(tmp_path / "b"), **{**common, "max_iter": 3}),
                  progress=False)
    assert first["iterations"] == 3
    resumed = train(tiny_cfg(output_dir=str(tmp_path / "b"), **common), resume=True,
                    progress=False)
    assert resumed["iterations"] == 7
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a = load_checkpoint(straight["checkpoint"])
    state_b = load_checkpoint(resumed["checkpoint"])
    assert state_a["data"] == state_b["data"] == {"epoch": 1, "batch_in_epoch": 3}
    mom_a = state_a["optimizer"]["state"]
    mom_b = state_b["optimizer"]["state"]
    assert all(torch.equal(mom_a[k]["momentum_buffer"], mom_b[k]["momentum_buffer"])
               for k in mom_a)
    assert state_b["class_names"] == ["circle", "square", "triangle"]
    assert state_b["cat_ids"] == [1, 2, 3]
    assert state_b["config"]["solver"]["max_iter"] == 7
    # the resumed log is continuous: iterations 1..7 once each
    log = open(tmp_path / "b" / "log.jsonl").read().splitlines()
    assert [json.loads(line)["iter"] for line in log] == list(range(1, 8))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, monkeypatch):
    forward = maskrcnn.GeneralizedRCNN.forward
    calls = {"n": 0}

    def poisoned(self, images, targets=None):
        out = forward(self, images, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:
                out["loss_box"] = out["loss_box"] * float("nan")
        return out
    monkeypatch.setattr(maskrcnn.GeneralizedRCNN, "forward", poisoned)
    cfg = tiny_cfg(max_iter=10, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, progress=False)
    message = str(err.value)
    for word in ("iteration 4", "loss_box=nan", "loss_cls=", "loss_mask=",
                 "model_0000002.pth"):
        assert word in message, message
    names = [p.name for p in list_checkpoints(cfg.solver.output_dir)]
    assert names == ["model_0000002.pth"]
    state = load_checkpoint(f"{cfg.solver.output_dir}/model_0000002.pth")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())


def test_time_budget_stops_training_and_ends_cosine(tiny_cfg, fake_clock):
    """A fake clock (each step takes 0.5 s of it, nothing else any): the budget of 4 s
    stops training after exactly 8 iterations, whatever the machine's speed or load."""
    budget_s = 4.0
    clock = fake_clock(0.5)
    cfg = tiny_cfg(max_iter=100000, max_minutes=budget_s / 60, lr_schedule="cosine",
                   min_lr_factor=0.0, log_every=1)
    summary = train(cfg, progress=False)
    records = [json.loads(line) for line in
               open(f"{cfg.solver.output_dir}/log.jsonl").read().splitlines()]
    times = [0.0] + [r["time"] for r in records]
    longest = max(b - a for a, b in zip(times, times[1:]))
    assert 1 <= summary["iterations"] == len(records) < 100000
    # stops at the first iteration end at or after the budget: 8 steps of 0.5 s
    assert summary["iterations"] == int(budget_s / clock.step_s) == 8
    assert times == [clock.step_s * i for i in range(9)]
    assert summary["elapsed_s"] == budget_s
    assert budget_s <= summary["elapsed_s"] <= budget_s + longest + 1.0
    lrs = [r["lr"] for r in records]
    assert lrs[0] == 0.01
    # each iteration's lr is the cosine of the time spent when it starts, over the budget
    for start, lr in zip(times, lrs):
        expected = 0.01 * 0.5 * (1 + math.cos(math.pi * min(start / budget_s, 1.0)))
        assert lr == pytest.approx(expected, abs=1e-5)
    last = list_checkpoints(cfg.solver.output_dir)[-1]
    assert load_checkpoint(last)["iteration"] == summary["iterations"]


@pytest.mark.slow
def test_evaluation_during_training_is_logged_and_plotted(tiny_cfg, shapes_data):
    vj, vi = shapes_data["val"]
    cfg = tiny_cfg(max_iter=2, eval_every=1, val_json=str(vj), val_images=str(vi))
    summary = train(cfg, progress=False)
    records = [json.loads(line) for line in
               open(f"{cfg.solver.output_dir}/log.jsonl").read().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["iter"] for r in evals] == [1, 2]               # every 1, and at the end
    assert set(summary["metrics"]) == {"bbox", "segm"}
    assert set(summary["metrics"]["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    png = open(f"{cfg.solver.output_dir}/loss.png", "rb").read(8)
    assert png == b"\x89PNG\r\n\x1a\n"
    assert summary["eval_s"] > 0


def test_missing_training_data_is_a_clear_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train_json=str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="train_json.*nope.json"):
        train(cfg, progress=False)
    with pytest.raises(ValueError, match="lr_schedule.*linear"):
        train(tiny_cfg(lr_schedule="linear"), progress=False)


def test_init_weights_from_a_checkpoint_with_other_classes(tiny_cfg, tmp_path):
    from engine.checkpoint import atomic_save
    torch.manual_seed(42)
    source = build_model(tiny_cfg(num_classes=5)).state_dict()
    path = atomic_save({"model": source}, tmp_path / "five_classes.pth")
    summary = train(tiny_cfg(init_weights=str(path), max_iter=1, lr=0.0), progress=False)
    trained = summary["model"].state_dict()
    same = [k for k in trained if trained[k].shape == source[k].shape]
    assert len(same) > 0.9 * len(trained)
    for key in same:                                  # lr 0: still the loaded weights
        assert torch.equal(trained[key], source[key]), key
    cls = "roi_heads.box_predictor.cls_score.weight"
    assert trained[cls].shape[0] == 4 and source[cls].shape[0] == 6
    with pytest.raises(FileNotFoundError, match="init_weights.*missing.pth"):
        train(tiny_cfg(init_weights=str(tmp_path / "missing.pth")), progress=False)


def test_pretrained_key_finetunes_with_other_classes(tiny_cfg, tmp_path, capsys):
    """[model] pretrained (here a plain state dict file; "coco" and zoo names take the same
    path) loads everything but the class-specific predictors, which get fresh weights
    for the data set's classes, and the checkpoint records the config used."""
    from engine.checkpoint import load_checkpoint
    torch.manual_seed(43)
    source = build_model(tiny_cfg(num_classes=5)).state_dict()
    path = tmp_path / "five_classes_state.pth"
    torch.save(source, path)
    summary = train(tiny_cfg(pretrained=str(path), max_iter=1, lr=0.0), progress=False)
    assert "num_classes 3 differs from the checkpoint's 5" in capsys.readouterr().err
    trained = summary["model"].state_dict()
    for key in trained:
        if key.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn")):
            assert trained[key].shape[0] != source[key].shape[0], key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(trained[key], source[key]), key
    saved = load_checkpoint(summary["checkpoint"])
    assert saved["config"]["model"]["pretrained"] == str(path)
    assert saved["config"]["model"]["num_classes"] == 3


# ------------------------------------------------------------- watching a run (issue)

def _log_records(cfg):
    return [json.loads(line) for line in
            open(f"{cfg.solver.output_dir}/log.jsonl").read().splitlines()]


def _fields(line):
    """'iter 2/4  loss=1.2 rpn_cls=0.3 ...' -> (2, 4, {"loss": "1.2", ...})."""
    head, _, rest = line.partition("  ")
    done, total = head.split()[1].split("/")
    return int(done), int(total), dict(tok.split("=", 1) for tok in rest.split())


def _seconds(hms):
    h, m, s = (int(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s


class _FlushSpy(io.StringIO):
    """sys.stdout stand-in recording what had been written at each flush()."""

    def __init__(self):
        super().__init__()
        self.flushed = []

    def flush(self):
        self.flushed.append(self.getvalue())
        super().flush()


def test_without_bar_one_flushed_console_line_per_log_interval(tiny_cfg, monkeypatch):
    import resource
    spy = _FlushSpy()
    monkeypatch.setattr(sys, "stdout", spy)
    cfg = tiny_cfg(max_iter=4, log_every=2)
    train(cfg, progress=False)
    lines = [ln for ln in spy.getvalue().splitlines() if ln.startswith("iter ")]
    records = _log_records(cfg)
    assert [r["iter"] for r in records] == [2, 4]
    assert [_fields(ln)[:2] for ln in lines] == [(2, 4), (4, 4)]       # one per interval
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = [0.0] + [r["time"] for r in records]
    for k, (line, record) in enumerate(zip(lines, records)):
        # pushed out at once (SLURM / nohup / CI: stdout is a file, block-buffered)
        assert any(s.endswith(line + "\n") for s in spy.flushed), line
        it, _, f = _fields(line)
        assert float(f["loss"]) == pytest.approx(record["loss"], abs=1e-4)
        for name, value in record["losses"].items():                  # every loss term
            assert float(f[name[5:]]) == pytest.approx(value, abs=1e-4), name
        assert float(f["lr"]) == pytest.approx(record["lr"], rel=1e-3)
        s_iter = (times[k + 1] - times[k]) / 2                         # 2 iterations each
        assert float(f["s/iter"]) == pytest.approx(s_iter, rel=0.02, abs=2e-3)
        assert abs(_seconds(f["eta"]) - (4 - it) * s_iter) <= 1.0
        assert f["max_mem"].endswith("MiB") and 0 < float(f["max_mem"][:-3]) <= peak_mib + 1
    assert _seconds(_fields(lines[-1])[2]["eta"]) == 0


@pytest.mark.slow
def test_with_bar_no_console_lines_but_bars_for_training_and_evaluation(
        tiny_cfg, shapes_data, capsys):
    vj, vi = shapes_data["val"]
    train(tiny_cfg(max_iter=2, log_every=1, eval_every=1, val_json=str(vj),
                   val_images=str(vi)), progress=True)
    out, err = capsys.readouterr()
    assert not [ln for ln in out.splitlines() if ln.startswith("iter ")]
    assert "train:" in err and "max_mem=" in err and "s/iter=" in err       # bar postfix
    assert "eval" in err and "4/4" in err             # the 4 val images, each evaluation
    assert len([ln for ln in out.splitlines() if ln.startswith("eval @ iter")]) == 2


@pytest.mark.slow
def test_evaluation_bar_is_off_without_progress(tiny_cfg, shapes_data, capsys):
    vj, vi = shapes_data["val"]
    train(tiny_cfg(max_iter=1, val_json=str(vj), val_images=str(vi)), progress=False)
    out, err = capsys.readouterr()
    assert "4/4" not in err and "eval:" not in err
    assert [ln for ln in out.splitlines() if ln.startswith("eval @ iter 1/1: segm AP=")]


def _metrics(segm, bbox):
    fill = lambda ap: {"AP": ap, "AP50": min(ap + 0.1, 1.0), "AP75": ap, "APs": -1.0,
                       "APm": ap, "APl": ap}
    return {"bbox": fill(bbox), **({"segm": fill(segm)} if segm is not None else {})}


@pytest.mark.parametrize("mask_on, segm, bbox, best_iter", [
    (True, [0.2, 0.5, 0.3, 0.4], [0.9, 0.1, 0.8, 0.95], 2),     # segm AP decides
    (False, None, [0.3, 0.1, 0.6, 0.6], 3),                    # box-only: bbox AP; ties keep
])
def test_best_checkpoint_follows_the_ap_and_each_evaluation_prints_a_line(
        tiny_cfg, shapes_data, monkeypatch, capsys, mask_on, segm, bbox, best_iter):
    import engine.evaluate
    import engine.train
    vj, vi = shapes_data["val"]
    script = iter(_metrics(s, b) for s, b in zip(segm or [None] * 4, bbox))
    monkeypatch.setattr(engine.evaluate, "evaluate", lambda model, dataset, **kw: next(script))
    saved = []
    real_save = engine.train.atomic_save

    def spy(obj, path):
        saved.append((Path(path).name, obj["iteration"]))
        return real_save(obj, path)
    monkeypatch.setattr(engine.train, "atomic_save", spy)
    cfg = tiny_cfg(max_iter=4, eval_every=1, checkpoint_every=1, keep_last=0,
                   mask_on=mask_on, val_json=str(vj), val_images=str(vi))
    train(cfg, progress=False)
    out_dir = Path(cfg.solver.output_dir)
    kind = "segm" if mask_on else "bbox"
    aps = segm if mask_on else bbox
    best_so_far = [i + 1 for i, ap in enumerate(aps) if ap > max(aps[:i], default=-1)]
    assert saved == [("model_best.pth", i) for i in best_so_far]       # atomic, on gains
    best = load_checkpoint(out_dir / "model_best.pth")
    regular = load_checkpoint(out_dir / f"model_{best_iter:07d}.pth")
    assert best.keys() == regular.keys() and best["iteration"] == best_iter
    assert best["data"] == regular["data"] and best["config"] == regular["config"]
    for key in regular["model"]:
        assert torch.equal(best["model"][key], regular["model"][key]), key
    assert [p.name for p in list_checkpoints(out_dir)][-1] == "model_0000004.pth"
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("eval @")]
    assert len(lines) == 4                                  # 3 periodic + the final one
    for i, line in enumerate(lines):
        assert line.startswith(f"eval @ iter {i + 1}/4: {kind} AP={aps[i]:.4f}"), line
        assert f"bbox AP={bbox[i]:.4f}" in line
        assert ("model_best.pth" in line) == (i + 1 in best_so_far), line


@pytest.mark.slow
def test_best_checkpoint_of_a_real_evaluation_loads_for_inference(tiny_cfg, shapes_data):
    from engine.predict import load_model
    vj, vi = shapes_data["val"]
    cfg = tiny_cfg(max_iter=1, val_json=str(vj), val_images=str(vi))
    summary = train(cfg, progress=False)
    model, meta = load_model(Path(cfg.solver.output_dir) / "model_best.pth")
    assert meta["iteration"] == 1 and meta["class_names"] == ["circle", "square", "triangle"]
    trained = summary["model"].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.slow
def test_tensorboard_scalars_equal_the_log(tiny_cfg, shapes_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    vj, vi = shapes_data["val"]
    cfg = tiny_cfg(max_iter=2, log_every=1, eval_every=1, tensorboard=True,
                   val_json=str(vj), val_images=str(vi))
    train(cfg, progress=False)
    events = EventAccumulator(f"{cfg.solver.output_dir}/tensorboard")
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)}
               for tag in events.Tags()["scalars"]}
    records = _log_records(cfg)
    train_records = [r for r in records if "losses" in r]
    assert [r["iter"] for r in train_records] == [1, 2]
    for r in train_records:
        assert scalars["loss/total"][r["iter"]] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars["lr"][r["iter"]] == pytest.approx(r["lr"], rel=1e-6)
        for name, value in r["losses"].items():
            assert scalars[f"loss/{name}"][r["iter"]] == pytest.approx(value, rel=1e-6)
    evals = [r for r in records if "eval" in r]
    assert [r["iter"] for r in evals] == [1, 2]
    for r in evals:
        for kind in ("segm", "bbox"):
            for metric in ("AP", "AP50"):
                assert scalars[f"eval/{kind}_{metric}"][r["iter"]] == pytest.approx(
                    r["eval"][kind][metric], abs=1e-6)


def test_tensorboard_missing_is_a_clear_error_at_start(tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # not installed
    cfg = tiny_cfg(tensorboard=True)
    with pytest.raises(ImportError) as err:
        train(cfg, progress=False)
    assert "[solver] tensorboard = true" in str(err.value)
    assert "pip install tensorboard" in str(err.value)
    assert not Path(cfg.solver.output_dir).exists()                 # before any training
    assert train(tiny_cfg(max_iter=1), progress=False)["iterations"] == 1   # off: fine
