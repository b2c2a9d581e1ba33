"""Early stopping ([solver] patience): the run ends at the expected evaluation, keeps
model_best.pth, and `--resume` afterwards trains no further."""
import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint
from engine.cli import main
from engine.train import train


def _metrics(ap):
    fill = {"AP": ap, "AP50": ap, "AP75": ap, "APs": -1.0, "APm": ap, "APl": ap}
    return {"bbox": dict(fill), "segm": dict(fill)}


def _script(monkeypatch, aps) -> list:
    """engine.evaluate.evaluate returns these segm APs, one per call (then fails).
    Returns the list that receives a copy of the evaluated weights at each call."""
    import engine.evaluate
    script, seen = iter(aps), []

    def evaluate(model, dataset, **kw):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return _metrics(next(script))
    monkeypatch.setattr(engine.evaluate, "evaluate", evaluate)
    import tools.visualize        # loss.png: matplotlib's seconds, not what is tested
    monkeypatch.setattr(tools.visualize, "plot_training", lambda *args: None)
    return seen


def _expected_stop(aps, patience, delta):
    """(evaluation index that stops, 1-based; best AP; its index): a readable replay of
    the rule. An evaluation improves when its AP beats the best before it by more than
    delta; the run stops after `patience` evaluations in a row that do not; model_best
    follows every strictly higher AP."""
    best, best_at, stale = None, None, 0
    for n, ap in enumerate(aps, 1):
        stale = 0 if best is None or ap > best + delta else stale + 1
        if best is None or ap > best:
            best, best_at = ap, n
        if stale >= patience:
            return n, best, best_at
    return None, best, best_at


def _snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_patience_stops_at_the_expected_evaluation_and_resume_does_not_train(
        tiny_cfg, shapes_data, write_ini, monkeypatch, capsys, tmp_path):
    # 0.3 at evaluation 2; 0.32 beats it (model_best moves to evaluation 3) but not by
    # more than 0.05, so it counts against patience, as does 0.31 -> stop at evaluation 4
    aps, patience, delta = [0.1, 0.3, 0.32, 0.31, 0.2, 0.9], 2, 0.05
    stop_at, best_ap, best_at = _expected_stop(aps, patience, delta)
    assert (stop_at, best_at) == (4, 3)                    # the oracle, by hand
    vj, vi = shapes_data["val"]
    evaluated = _script(monkeypatch, aps)
    common = dict(max_iter=6, eval_every=1, patience_delta=delta, batch_size=1,
                  val_json=str(vj), val_images=str(vi))
    cfg = tiny_cfg(patience=patience, **common)
    summary = train(cfg, progress=False)
    out = Path(cfg.solver.output_dir)
    # eval_every 1: evaluation n is at iteration n
    assert summary["iterations"] == stop_at
    assert [p.name for p in list_checkpoints(out)] == [f"model_{stop_at:07d}.pth"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(r["iter"] for r in records) == stop_at
    assert [r["iter"] for r in records if "eval" in r] == list(range(1, stop_at + 1))
    line = (f"early stop at iteration {stop_at}: segm AP did not improve for {patience} "
            f"evaluations (best {best_ap:.4f} at iteration {best_at})")
    assert line in capsys.readouterr().out
    # model_best.pth holds the weights the best evaluation saw
    best = load_checkpoint(out / "model_best.pth")
    assert best["iteration"] == best_at and "early_stop" not in best
    assert len(evaluated) == stop_at
    for key, value in evaluated[best_at - 1].items():
        assert torch.equal(best["model"][key], value), key
    assert not torch.equal(best["model"]["roi_heads.box_predictor.cls_score.weight"],
                           evaluated[-1]["roi_heads.box_predictor.cls_score.weight"])
    last = load_checkpoint(out / f"model_{stop_at:07d}.pth")
    assert last["early_stop"] == {
        "iteration": stop_at, "metric": "segm AP", "evaluations": patience,
        "best_ap": best_ap, "best_iteration": best_at, "patience": patience,
        "patience_delta": delta}
    assert summary["early_stop"] == last["early_stop"]

    # `maskrcnn train --resume` on the same config: says so, exits 0, changes no file
    before = _snapshot(out)
    ini = write_ini(cfg, tmp_path / "run.ini")
    assert main(["train", "--config", str(ini), "--resume", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"early stopping at iteration {stop_at}" in said and "nothing to train" in said
    assert _snapshot(out) == before and len(evaluated) == stop_at

    # The stop is the config's doing: with patience raised to 3 --resume trains on, and
    # the two evaluations without gain so far count (replayed from log.jsonl): the third
    # (0.2 at iteration 5) stops, as it would have in one run with patience 3.
    assert _expected_stop(aps, 3, delta)[0] == 5
    resumed = train(tiny_cfg(patience=3, **common), resume=True, progress=False)
    assert resumed["iterations"] == 5 and len(evaluated) == 5
    assert resumed["early_stop"]["evaluations"] == 3
    assert resumed["early_stop"]["best_iteration"] == best_at


def test_patience_without_evaluations_is_a_clear_error(tiny_cfg):
    from engine.train import RunConfigError
    with pytest.raises(RunConfigError, match=r"patience = 2 needs evaluations.*eval_every"):
        train(tiny_cfg(patience=2, eval_every=1), progress=False)      # val_json = none
    with pytest.raises(RunConfigError, match="patience_delta = -0.1"):
        train(tiny_cfg(patience_delta=-0.1), progress=False)
