"""Prediction on files / folders, overlays, the training plot."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine import predict as predict_mod
from engine.checkpoint import atomic_save, load_checkpoint
from engine.train import train
from tools.visualize import PALETTE, draw_detections, plot_training


def _tiny_checkpoint(tiny_cfg, tmp_path):
    summary = train(tiny_cfg(max_iter=1, box_score_thresh=0.0), progress=False)
    state = load_checkpoint(summary["checkpoint"])
    state["class_names"] = ["alpha", "beta", "gamma"]
    state["cat_ids"] = [7, 8, 9]
    return atomic_save(state, tmp_path / "renamed.pth")


def test_predict_files_and_folders(tiny_cfg, shapes_data, tmp_path, monkeypatch):
    weights = _tiny_checkpoint(tiny_cfg, tmp_path)
    model, meta = predict_mod.load_model(weights)
    assert meta["class_names"] == ["alpha", "beta", "gamma"] and not model.training
    drawn = []
    real_draw = predict_mod.draw_detections

    def spy(image, detection, class_names, *args):
        drawn.append(list(class_names))
        return real_draw(image, detection, class_names, *args)
    monkeypatch.setattr(predict_mod, "draw_detections", spy)

    image_dir = shapes_data["val"][1]
    files = sorted(image_dir.glob("*.png"))
    extra = tmp_path / "extra" / files[0].name            # same stem as one in the folder
    extra.parent.mkdir()
    Image.open(files[0]).convert("L").save(extra)          # grayscale input works too
    out = tmp_path / "pred"
    path = predict_mod.predict(model, [image_dir, extra], out, meta["class_names"],
                               meta["cat_ids"], score_threshold=0.0, progress=False)
    results = json.loads(path.read_text())
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(files) + 1 and f"{files[0].stem}_1.png" in pngs
    for f in files:
        assert Image.open(out / f.name).size == Image.open(f).size
    assert results, "box_score_thresh 0 gives detections"
    assert {r["category_id"] for r in results} <= {7, 8, 9}
    assert {r["image_id"] for r in results} <= set(range(1, len(files) + 2))
    assert all(r["file_name"] in {str(f) for f in files} | {str(extra)} for r in results)
    assert all(len(r["bbox"]) == 4 and "segmentation" in r for r in results)
    assert drawn and all(names == ["alpha", "beta", "gamma"] for names in drawn)
    with pytest.raises(FileNotFoundError, match="nope"):
        predict_mod.collect_images([tmp_path / "nope"])


def test_not_a_training_checkpoint_is_a_clear_error(tmp_path):
    atomic_save({"weights": torch.ones(1)}, tmp_path / "raw.pth")
    with pytest.raises(ValueError, match="raw.pth.*not a training checkpoint"):
        predict_mod.load_model(tmp_path / "raw.pth")


def test_overlay_pixels():
    image = torch.full((3, 20, 30), 0.5)
    mask = torch.zeros(1, 1, 20, 30)
    mask[0, 0, 5:15, 10:20] = 0.8
    det = dict(boxes=torch.tensor([[8.0, 3.0, 22.0, 17.0]]), labels=torch.tensor([2]),
               scores=torch.tensor([0.9]), masks=mask)
    out = np.asarray(draw_detections(image, det, ["a", "b"], alpha=0.5)).astype(int)
    color = np.array(PALETTE[1])
    assert np.abs(out[13, 18] - (0.5 * 128 + 0.5 * color)).max() <= 1    # blended mask
    assert (out[19, 0] == 128).all()                                      # untouched
    assert (out[15, 8] == color).all()                                    # box outline
    low = draw_detections(image, dict(det, scores=torch.tensor([0.1])), ["a", "b"])
    assert (np.asarray(low) == 128).all()                # below the score threshold


def test_plot_training(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"iter": i, "lr": 0.1, "time": i, "loss": 3.0 / i,
              "losses": {"loss_cls": 1.0 / i, "loss_mask": 2.0 / i}} for i in range(1, 6)]
    lines.append({"iter": 5, "eval": {"bbox": {"AP": 0.1, "AP50": 0.2},
                                      "segm": {"AP": 0.1, "AP50": 0.3}}})
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    path = plot_training(log, tmp_path / "plot.png")
    assert Image.open(path).size[0] > Image.open(path).size[1]            # two panels
    assert plot_training(tmp_path / "missing.jsonl", tmp_path / "x.png") is None


@pytest.mark.slow
def test_predict_progress_bar_over_a_folder(tiny_cfg, shapes_data, tmp_path, capsys):
    model, meta = predict_mod.load_model(_tiny_checkpoint(tiny_cfg, tmp_path))
    image_dir = shapes_data["val"][1]
    n = len(list(image_dir.glob("*.png")))
    capsys.readouterr()
    for progress in (True, False):
        predict_mod.predict(model, [image_dir], tmp_path / f"p{progress}", meta["class_names"],
                            meta["cat_ids"], progress=progress)
        err = capsys.readouterr().err
        assert ("predict" in err and f"{n}/{n}" in err) == progress, err
