"""The class list follows the data ([model] num_classes = auto) and fine-tuning a
pretrained model on new classes from a config of three lines (README, "Fine-tune on your
classes")."""
import pytest
import torch

import convert.pretrained
import convert.zoo
from configs import load_config
from engine.checkpoint import plain
from engine.cli import main
from engine.initialise import RunConfigError, prepare_run
from maskrcnn import MaskRCNN, build_model

# The class-dependent tensors: their first dimension counts classes (+1 background; x4
# for box deltas). Spelled out here as the test's oracle of what must not load.
CLASS_LAYERS = ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
                "roi_heads.mask_predictor.mask_fcn_logits")


def _three_lines(path, pretrained, shapes_data):
    tj, ti = shapes_data["train"]
    path.write_text(f"[model]\npretrained = {pretrained}\n"
                    f"[data]\ntrain_json = {tj}\ntrain_images = {ti}\n")
    return path


def test_num_classes_auto_takes_the_data_and_a_mismatch_is_an_error(
        tiny_cfg, write_ini, capsys, tmp_path):
    cfg, model, _, _ = prepare_run(tiny_cfg(num_classes="auto"), True, 0,
                                   torch.device("cpu"))
    assert cfg.model.num_classes == 3 and model.num_classes == 3     # shapes: 3 kinds
    assert "3 (circle, square, triangle)" in capsys.readouterr().out
    for wrong in (2, 5):            # fewer or more classes than the data's categories
        with pytest.raises(RunConfigError) as err:
            prepare_run(tiny_cfg(num_classes=wrong), True, 0, torch.device("cpu"))
        assert f"num_classes = {wrong} but" in str(err.value)
        assert "has 3 categories" in str(err.value) and "num_classes = auto" in str(err.value)
    # the command: a usage error (exit 2) with that message, no traceback
    ini = write_ini(tiny_cfg(num_classes=5), tmp_path / "five.ini")
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", str(ini), "--no-progress"])
    assert stop.value.code == 2
    assert "num_classes = 5 but" in capsys.readouterr().err


def test_three_line_config_finetunes_our_checkpoint_on_the_data_classes(
        tiny_cfg, shapes_data, monkeypatch, capsys, tmp_path):
    """pretrained = a planted file of ours (5 classes, with its config): the run's model
    has the data's 3 classes, every other tensor equals the file's, and the class layers
    are new."""
    monkeypatch.chdir(tmp_path)             # config.ini's default val_json is not here
    torch.manual_seed(7)
    source_cfg = tiny_cfg(num_classes=5)
    source = build_model(source_cfg).state_dict()
    planted = tmp_path / "five_classes.pth"
    torch.save({"model": source, "config": plain(source_cfg)}, planted)
    cfg, model, train_set, val_set = prepare_run(
        load_config(_three_lines(tmp_path / "my.ini", planted, shapes_data)), True, 0,
        torch.device("cpu"))
    assert model.num_classes == 3 and val_set is None
    assert cfg.backbone.backbone == "resnet18"          # the file's architecture
    tuned = model.state_dict()
    assert tuned.keys() == source.keys()
    for key, value in tuned.items():
        if key.startswith(CLASS_LAYERS):
            factor = 4 if "bbox_pred" in key else 1
            assert value.shape[0] == 4 * factor and source[key].shape[0] == 6 * factor, key
        else:
            assert torch.equal(value, source[key]), key
    err = capsys.readouterr().err
    assert "num_classes 3 differs from the checkpoint's 5" in err
    assert all(name in err for name in CLASS_LAYERS)     # one line names what was skipped
    assert "training without evaluation" in err


def test_three_line_config_with_coco_loads_all_but_the_class_layers(
        shapes_data, monkeypatch, capsys, tmp_path):
    """pretrained = coco: the zoo's preset architecture (ResNet-101-FPN, built on the
    meta device: shapes only, no memory or time) with the data's classes. The planted
    zoo file is the preset's own 80-class state; everything loads except the six
    class-dependent tensors."""
    monkeypatch.chdir(tmp_path)
    entry = convert.zoo.resolve_name("coco", "resnet101")
    with torch.device("meta"):
        zoo_state = MaskRCNN(config=str(entry.preset_path)).state_dict()
    assert zoo_state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 81
    fetched = []
    monkeypatch.setattr(convert.zoo, "fetch",
                        lambda e, check_content=None: fetched.append(e.name) or "planted")
    monkeypatch.setattr(convert.pretrained, "read_model_weights",
                        lambda path: convert.pretrained.ModelWeights(zoo_state, "detectron2"))
    with torch.device("meta"):
        cfg, model, _, _ = prepare_run(
            load_config(_three_lines(tmp_path / "my.ini", "coco", shapes_data)), True, 0,
            torch.device("meta"))
    assert fetched == [entry.name] and model.num_classes == 3
    assert cfg.backbone.backbone == "resnet101" and cfg.model.pretrained == "coco"
    ours = model.state_dict()
    loaded, _ = convert.pretrained.fit_state(
        ours, convert.pretrained.ModelWeights(zoo_state, "detectron2"), "zoo", print)
    skipped = set(ours) - set(loaded)
    assert skipped == {f"{layer}.{p}" for layer in CLASS_LAYERS for p in ("weight", "bias")}
    assert ours["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4 * 4
    assert ours["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4
    assert "skipped its class-specific layers" in capsys.readouterr().err


def test_auto_without_data_takes_the_weights_classes(tiny_cfg, tmp_path):
    """MaskRCNN(pretrained=a plain state dict, no config in it): num_classes = auto is
    the file's class count, and everything loads (its predictors too)."""
    torch.manual_seed(3)
    source_cfg = tiny_cfg(num_classes=5)
    source = build_model(source_cfg).state_dict()
    torch.save(source, tmp_path / "state.pth")
    model = MaskRCNN(pretrained=str(tmp_path / "state.pth"),
                     config={**source_cfg, "model": {**source_cfg.model,
                                                     "num_classes": "auto"}})
    assert model.num_classes == 5 and model.cfg.model.num_classes == 5
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key]), key
    assert MaskRCNN(config=dict(tiny_cfg(num_classes="auto"))).num_classes == 80   # COCO's
