"""config.ini, load_config, overrides, and that every key is read by some code."""
import inspect

import pytest
import torch
from torchvision.models.detection import MaskRCNN as TvMaskRCNN

import maskrcnn
from maskrcnn import (CONSTRUCTOR_KEYS, DEFAULT_CONFIG, MODEL_SECTIONS, TRAINING_KEYS, MaskRCNN,
                      apply_overrides, build_model, load_config)

torch.set_num_threads(2)
SMALL = dict(backbone="resnet18")   # cheap to build; the config logic is the same


def _write(tmp_path, text, name="user.ini"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_typed():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.model.num_classes == 80 and cfg.model.mask_on is True
    assert cfg.backbone.backbone == "resnet101" and cfg.backbone.trainable_layers == 3
    assert cfg.transform.image_mean == (0.485, 0.456, 0.406)
    assert cfg.transform.train_min_size == (800,)
    assert cfg.anchors.anchor_sizes == (32, 64, 128, 256, 512)
    assert isinstance(cfg.rpn.rpn_score_thresh, float)
    assert cfg.roi_heads.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)
    assert cfg.solver.steps == (60000, 80000) and cfg.data.skip_empty is True
    assert cfg.solver.output_dir == "outputs"


def test_defaults_equal_torchvision():
    tv = {k: p.default for k, p in inspect.signature(TvMaskRCNN.__init__).parameters.items()}
    cfg = load_config(DEFAULT_CONFIG)
    flat = {k: v for section in cfg.values() for k, v in section.items()}
    same_name = [k for k in flat if tv.get(k, None) not in (None, inspect.Parameter.empty)]
    assert len(same_name) >= 18, same_name
    for key in same_name:
        assert flat[key] == tv[key], key
    assert flat["min_size"] == 800 and flat["max_size"] == 1333
    assert flat["box_smooth_l1_beta"] == pytest.approx(1 / 9)


def test_keys_are_unique_across_sections():
    keys = [k for section in load_config(DEFAULT_CONFIG).values() for k in section]
    assert len(keys) == len(set(keys))


def test_user_config_sets_a_subset(tmp_path):
    path = _write(tmp_path, "[rpn]\nrpn_nms_thresh = 0.6\n[transform]\n"
                            "train_min_size = 640, 672, 704\n")
    cfg = load_config(path)
    assert cfg.rpn.rpn_nms_thresh == 0.6
    assert cfg.transform.train_min_size == (640, 672, 704)
    assert cfg.rpn.rpn_fg_iou_thresh == 0.7          # untouched default


@pytest.mark.parametrize("text, words", [
    ("[nonsense]\nx = 1\n", ["user.ini", "nonsense"]),
    ("[rpn]\nrpn_nms_treshold = 0.6\n", ["user.ini", "[rpn]", "rpn_nms_treshold", "0.6"]),
    ("[model]\nnum_classes = abc\n", ["user.ini", "[model]", "num_classes", "'abc'", "int"]),
    ("[backbone]\ntrainable_layers = 2.5\n", ["trainable_layers", "'2.5'", "int"]),
    ("[model]\nmask_on = maybe\n", ["mask_on", "'maybe'", "bool"]),
    ("[transform]\nimage_mean = 0.4, x, 0.4\n", ["image_mean", "tuple[float]"]),
    ("[rpn]\nrpn_nms_thresh = high\n", ["[rpn]", "rpn_nms_thresh", "'high'", "float"]),
])
def test_bad_config_names_file_section_key_value_type(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_config(path)
    for word in words:
        assert word in str(err.value)


def test_overrides_bare_and_dotted():
    model = MaskRCNN(num_classes=3, box_score_thresh=0.3, **SMALL,
                     **{"rpn.rpn_nms_thresh": 0.5, "transform.image_std": [1, 1, 1]})
    assert model.num_classes == 3 and model.cfg.model.num_classes == 3
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.box_score_thresh == 0.3
    assert model.cfg.rpn.rpn_nms_thresh == 0.5
    assert model.transform.image_std == (1.0, 1.0, 1.0)
    assert model.backbone.body.depth == 18


def test_bad_overrides():
    cfg = load_config(DEFAULT_CONFIG)
    with pytest.raises(ValueError, match="no_such_key"):
        apply_overrides(cfg, {"no_such_key": 1})
    with pytest.raises(ValueError, match="rpn.nope"):
        apply_overrides(cfg, {"rpn.nope": 1})
    with pytest.raises(ValueError, match="box_score_thresh"):
        apply_overrides(cfg, {"box_score_thresh": "high"})
    with pytest.raises(ValueError, match="num_classes"):
        apply_overrides(cfg, {"num_classes": 2.5})
    assert apply_overrides(cfg, {"box_score_thresh": "0.2"}).roi_heads.box_score_thresh == 0.2


def test_ambiguous_override_names_key(monkeypatch):
    monkeypatch.setattr(maskrcnn, "_schema", lambda: {"a": {"x": ("int", "1")},
                                                      "b": {"x": ("int", "2")}})
    with pytest.raises(ValueError, match="'x' is ambiguous"):
        maskrcnn._find_key("x")
    assert maskrcnn._find_key("b.x") == ("b", "x")


def test_config_path_and_loaded_dict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # "config.ini" resolves to the package's
    model = MaskRCNN(config="config.ini", **SMALL)
    assert model.num_classes == 80
    cfg = apply_overrides(load_config(DEFAULT_CONFIG), {"num_classes": 5, **SMALL})
    assert MaskRCNN(config=cfg).num_classes == 5
    user = _write(tmp_path, "[model]\nnum_classes = 7\n[backbone]\nbackbone = resnet18\n")
    assert MaskRCNN(config=str(user)).num_classes == 7
    with pytest.raises(FileNotFoundError):
        MaskRCNN(config="missing.ini")


class _Recorder:
    """Wraps an EasyDict and records every "section.key" read through attributes."""

    def __init__(self, data, seen, prefix=""):
        self.__dict__.update(_data=data, _seen=seen, _prefix=prefix)

    def __getattr__(self, name):
        value = self._data[name]
        if isinstance(value, dict):
            return _Recorder(value, self._seen, name)
        self._seen.add(f"{self._prefix}.{name}")
        return value


def test_every_key_is_read():
    cfg = apply_overrides(load_config(DEFAULT_CONFIG), SMALL)
    seen = set()
    build_model(_Recorder(cfg, seen))
    model_keys = {f"{s}.{k}" for s in MODEL_SECTIONS for k in cfg[s]}
    assert seen == model_keys - set(CONSTRUCTOR_KEYS), model_keys ^ seen
    all_keys = {f"{s}.{k}" for s in cfg for k in cfg[s]}
    assert set(TRAINING_KEYS) | model_keys == all_keys
    assert set(CONSTRUCTOR_KEYS) <= model_keys
    assert not set(TRAINING_KEYS) & model_keys and len(set(TRAINING_KEYS)) == len(TRAINING_KEYS)


def test_pretrained_imagenet_offline_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("MASKRCNN_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="ImageNet"):
        MaskRCNN(pretrained="imagenet", **SMALL)


def test_pretrained_checkpoint(tmp_path):
    source = MaskRCNN(num_classes=2, norm="frozen_bn", **SMALL)
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    torch.save(source.state_dict(), tmp_path / "raw.pth")
    for name in ("ckpt.pth", "raw.pth"):
        loaded = MaskRCNN(num_classes=2, pretrained=str(tmp_path / name), **SMALL)
        for (key, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), key
    with pytest.raises(FileNotFoundError):
        MaskRCNN(pretrained=str(tmp_path / "nope.pth"), **SMALL)


def test_no_weights_trains_every_stage_with_batchnorm(tmp_path):
    """Without pretrained weights, frozen BatchNorm would keep random statistics and the
    frozen stages random weights: norm bn and all stages, as torchvision does, unless the
    user sets them (argument, config file or loaded config)."""
    from backbones import FrozenBatchNorm2d
    model = MaskRCNN(num_classes=2, **SMALL)
    assert (model.cfg.backbone.norm, model.cfg.backbone.trainable_layers) == ("bn", 5)
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert MaskRCNN(num_classes=2, norm="frozen_bn", **SMALL).cfg.backbone.norm == "frozen_bn"
    assert MaskRCNN(num_classes=2, trainable_layers=3, **SMALL).cfg.backbone.norm == "bn"
    assert MaskRCNN(num_classes=2, trainable_layers=3, **SMALL).cfg.backbone.trainable_layers == 3
    path = tmp_path / "mine.ini"
    path.write_text("[backbone]\nnorm = frozen_bn\n")
    assert MaskRCNN(config=str(path), **SMALL).cfg.backbone.norm == "frozen_bn"
    explicit = apply_overrides(load_config(DEFAULT_CONFIG), {"norm": "gn"})
    assert MaskRCNN(config=explicit, **SMALL).cfg.backbone.norm == "gn"


def test_our_checkpoint_rebuilds_its_architecture(tmp_path):
    """A training checkpoint carries its config: pretrained= (and from_checkpoint) rebuild
    that architecture and keep its categories, whatever the defaults say."""
    from tools.checkpoint import atomic_save, plain
    small = dict(SMALL, backbone="resnet18", fpn_channels=64, representation_size=128)
    source = MaskRCNN(num_classes=2, **small)
    path = atomic_save({"model": source.state_dict(), "config": plain(source.cfg),
                        "class_names": ["cat", "dog"], "cat_ids": [7, 9]}, tmp_path / "c.pth")
    for loaded in (MaskRCNN(pretrained=str(path)), MaskRCNN.from_checkpoint(path)):
        assert loaded.cfg.backbone.backbone == "resnet18" and loaded.num_classes == 2
        assert loaded.categories == {1: ("cat", 7), 2: ("dog", 9)}
        for key, value in source.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
    scored = MaskRCNN.from_checkpoint(path, box_score_thresh=0.6)
    assert scored.roi_heads.box_score_thresh == 0.6
