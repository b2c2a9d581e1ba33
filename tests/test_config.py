"""config.ini, load_config, overrides, and that every key changes what the code does
(model sections) or is read by the tools (solver, data, eval, demo)."""
import configparser
import inspect

import pytest
import torch
from easydict import EasyDict
from torchvision.models.detection import MaskRCNN as TvMaskRCNN

import configs.loader
from configs.loader import find_key
from maskrcnn import DEFAULT_CONFIG, MaskRCNN, apply_overrides, load_config

torch.set_num_threads(2)
SMALL = dict(backbone="resnet18")   # cheap to build; the config logic is the same


def _write(tmp_path, text, name="user.ini"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_typed():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.model.num_classes == "auto" and cfg.model.mask_on is True
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
    ("[model]\nnum_classes = abc\n", ["user.ini", "[model]", "num_classes", "'abc'",
                                       "int or auto"]),
    ("[model]\nnum_classes = 2.5\n", ["num_classes", "'2.5'", "int or auto"]),
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


def test_num_classes_is_auto_or_an_int(tmp_path):
    """num_classes = auto (the default: the data's or the weights' classes) or K."""
    assert load_config(_write(tmp_path, "[model]\nnum_classes = 7\n")).model.num_classes == 7
    assert load_config(_write(tmp_path, "[model]\nnum_classes = auto\n")).model.num_classes \
        == "auto"
    cfg = load_config(DEFAULT_CONFIG)
    assert apply_overrides(cfg, {"num_classes": "12"}).model.num_classes == 12
    assert apply_overrides(cfg, {"num_classes": 12}).model.num_classes == 12
    assert apply_overrides(cfg, {"num_classes": "auto"}).model.num_classes == "auto"
    with pytest.raises(ValueError, match="expects int or auto"):
        apply_overrides(cfg, {"num_classes": "many"})


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
    monkeypatch.setattr(configs.loader, "_schema", lambda: {"a": {"x": ("int", "1")},
                                                      "b": {"x": ("int", "2")}})
    with pytest.raises(ValueError, match="'x' is ambiguous"):
        find_key("x")
    assert find_key("b.x") == ("b", "x")


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


# ------------------------------------------- every model key changes what the model does
#
# For each key of the model sections: build a small model with the base value and with
# another valid value (same seed), and observe a difference in one of
#   "structure": parameter / buffer names, shapes and requires_grad;
#   "eval":      the detections on a fixed image in eval mode, the weights copied from
#                the base model (so only the key differs);
#   "train":     the five losses on a fixed image and target in training mode, the weights
#                copied and the samplers' RNG seeded alike;
#   "pooler":    the built box RoI pooler on boxes at the two level rules' boundaries.
# A context adds overrides to both sides where a key only acts with another setting (e.g.
# box_conv_dim only with an Nconv1fc box head). test_effects_are_deterministic shows that
# an unchanged config observes no difference, so a difference is the key's doing.

# Spelled out, not imported from maskrcnn: these name config.ini's sections.
MODEL_SECTIONS = ("model", "backbone", "transform", "anchors", "rpn", "roi_heads",
                  "box_head", "mask_head")
TOOL_SECTIONS = ("solver", "data", "eval", "demo")


def _ini_keys(sections):
    """{key: section} of config.ini's keys in `sections`, read as text (so a key the
    loader dropped is still listed)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    assert parser.read(DEFAULT_CONFIG)
    return {key: section for section in sections for key in parser[section]}


def _dotted(overrides):
    """Bare key names as "section.key": num_classes and pretrained are also MaskRCNN
    arguments, and only the dotted form goes through the config."""
    where = _ini_keys(MODEL_SECTIONS)
    return {f"{where[k]}.{k}": v for k, v in overrides.items()}


# Small and fast, and not the shipped defaults where those would cost time. Image 120x170
# -> 192x272 (min_size), padded to 192x288 (size_divisible 32; 64 would give 320), P2 of
# 48x72 = 216 Winograd tiles (>= 128: the Winograd convs run); fpn_channels and the mask
# widths are multiples of 32 (GroupNorm's groups).
EFFECT_BASE = dict(num_classes=2, backbone="resnet18", norm="frozen_bn", trainable_layers=3,
                   fpn_channels=32, min_size=192, max_size=320, train_min_size=(192,),
                   rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                   rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                   box_batch_size_per_image=64, box_detections_per_img=30,
                   representation_size=64, mask_layers=(32, 32), mask_dim_reduced=16)
CONTEXTS = {
    "": {},
    "resnet50": dict(backbone="resnet50"),              # bottleneck-only keys
    "conv_box_head": dict(box_head="2conv1fc"),         # keys of an Nconv1fc box head
    "exact": dict(fuse_bn=False),                       # frozen_bn_op acts in exact mode
    "rpn_min_size": dict(rpn_min_size=20.0),            # detectron2's filter ignores it
    "low_bg_iou": dict(box_bg_iou_thresh=0.2),          # room to lower box_fg_iou_thresh
    # box_min_size 0 keeps empty boxes, and the base's box deltas push every box off the
    # image (clipped to nothing): what box_drop_empty drops.
    "empty_boxes": dict(box_min_size=0.0),
}

# (key, another valid value, how the effect is observed, context)
EFFECT_CASES = [
    ("num_classes", 3, "structure", ""),
    ("mask_on", False, "structure", ""),
    ("pretrained", "a checkpoint", "pretrained", ""),
    ("backbone", "resnet34", "structure", ""),
    ("groups", 2, "structure", "resnet50"),
    ("width_per_group", 32, "structure", "resnet50"),
    ("stride_in_1x1", True, "eval", "resnet50"),
    ("norm", "bn", "structure", ""),
    ("norm_eps", 0.1, "eval", ""),
    ("frozen_bn_op", "detectron2", "eval", "exact"),
    ("fpn_norm", "gn", "structure", ""),
    ("trainable_layers", 1, "structure", ""),
    ("fpn_channels", 64, "structure", ""),
    ("fuse_bn", False, "eval", ""),
    ("winograd", False, "eval", ""),
    ("min_size", 160, "eval", ""),
    ("train_min_size", (160,), "train", ""),
    ("max_size", 240, "eval", ""),
    ("input_format", "BGR", "eval", ""),
    ("pixel_scale", 255.0, "eval", ""),
    ("image_mean", (0.5, 0.5, 0.5), "eval", ""),
    ("image_std", (0.25, 0.25, 0.25), "eval", ""),
    ("size_divisible", 64, "eval", ""),
    ("anchor_sizes", (16, 32, 64, 128, 256), "eval", ""),
    ("aspect_ratios", (0.25, 1.0, 4.0), "eval", ""),
    ("anchor_rule", "detectron2", "eval", ""),
    ("rpn_head_convs", 2, "structure", ""),
    ("rpn_pre_nms_top_n_train", 50, "train", ""),
    ("rpn_pre_nms_top_n_test", 50, "eval", ""),
    ("rpn_post_nms_top_n_train", 20, "train", ""),
    ("rpn_post_nms_top_n_test", 20, "eval", ""),
    ("rpn_nms_thresh", 0.3, "eval", ""),
    ("rpn_fg_iou_thresh", 0.5, "train", ""),
    ("rpn_bg_iou_thresh", 0.1, "train", ""),
    ("rpn_batch_size_per_image", 32, "train", ""),
    ("rpn_positive_fraction", 0.01, "train", ""),          # 2 positives at most
    ("rpn_score_thresh", 0.99, "eval", ""),                 # random RPN: scores near 0.5
    ("rpn_min_size", 20.0, "eval", ""),
    ("rpn_box_filter", "detectron2", "eval", "rpn_min_size"),
    ("box_fg_iou_thresh", 0.3, "train", "low_bg_iou"),
    ("box_bg_iou_thresh", 0.3, "train", ""),
    ("box_batch_size_per_image", 16, "train", ""),
    ("box_positive_fraction", 0.02, "train", ""),           # 1 of the >= 2 GT positives
    ("bbox_reg_weights", (1.0, 1.0, 1.0, 1.0), "eval", ""),
    ("box_score_thresh", 0.4, "eval", ""),                  # 3 classes: scores near 1/3
    ("box_nms_thresh", 0.2, "eval", ""),
    ("box_detections_per_img", 5, "eval", ""),
    ("box_min_size", 40.0, "eval", ""),
    ("box_drop_empty", True, "eval", "empty_boxes"),
    ("roi_aligned", True, "eval", ""),
    ("roi_level_rule", "detectron2", "pooler", ""),
    ("roi_canonical_scale", 56, "eval", ""),
    ("roi_canonical_level", 5, "eval", ""),
    ("box_head", "2conv1fc", "structure", ""),
    ("box_conv_dim", 64, "structure", "conv_box_head"),
    ("box_norm", "gn", "structure", "conv_box_head"),
    ("box_pool_size", 5, "structure", ""),
    ("box_sampling_ratio", 1, "eval", ""),
    ("representation_size", 32, "structure", ""),
    ("box_loss", "l1", "train", ""),
    ("box_smooth_l1_beta", 1.0, "train", ""),
    ("mask_pool_size", 7, "eval", ""),
    ("mask_sampling_ratio", 1, "eval", ""),
    ("mask_layers", (32,), "structure", ""),
    ("mask_dilation", 2, "eval", ""),
    ("mask_norm", "gn", "structure", ""),
    ("mask_dim_reduced", 8, "structure", ""),
    ("mask_paste_padding", 0, "eval", ""),
    ("mask_paste", "detectron2", "eval", ""),
    # Slots whose table ships one entry: a variant registered at run time (VARIANTS) is
    # picked by the key.
    ("fpn", "variant", "structure", ""),
    ("rpn_head", "variant", "structure", ""),
    ("box_roi_pool", "variant", "structure", ""),
    ("box_predictor", "variant", "structure", ""),
    ("mask_roi_pool", "variant", "structure", ""),
    ("mask_head", "variant", "structure", ""),
    ("mask_predictor", "variant", "structure", ""),
]


def _tagged(constructor):
    """A table entry that builds what `constructor` builds plus a buffer: a variant that
    changes the model's structure, and nothing else."""
    def build(**kwargs):
        module = constructor(**kwargs)
        module.register_buffer("variant_tag", torch.zeros(1))
        return module
    return build


def _variant_tables():
    """{config key: (its table, the shipped entry)} of the one-entry slots."""
    from backbones import FPNS
    from heads import BOX_PREDICTORS, MASK_HEADS, MASK_PREDICTORS
    from pooling import ROI_POOLERS
    from proposal import RPN_HEADS
    return {"fpn": (FPNS, "fpn"), "rpn_head": (RPN_HEADS, "standard"),
            "box_roi_pool": (ROI_POOLERS, "multiscale"),
            "box_predictor": (BOX_PREDICTORS, "fastrcnn"),
            "mask_head": (MASK_HEADS, "fcn"), "mask_predictor": (MASK_PREDICTORS, "deconv")}


@pytest.fixture(scope="module", autouse=True)
def registered_variants():
    """Registers "variant" in the one-entry tables for this module's tests (the lookup
    happens at build time, so an entry added at run time is accepted)."""
    tables = [table for table, _ in _variant_tables().values()]
    for table, shipped in _variant_tables().values():
        table["variant"] = _tagged(table[shipped])
    yield
    for table in tables:
        table.pop("variant", None)

TRAIN_SEED = 7        # the RPN and RoI samplers' draws, the same on both sides


def _effect_image():
    return torch.rand(3, 120, 170, generator=torch.Generator().manual_seed(0))


def _effect_target():
    boxes = torch.tensor([[20.0, 15.0, 80.0, 70.0], [90.0, 40.0, 160.0, 110.0]])
    masks = torch.zeros(2, 120, 170, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        m[y1:y2, x1:x2] = 1
    return dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks)


def _build_effect_model(context, key=None, value=None):
    overrides = {**EFFECT_BASE, **CONTEXTS[context]}
    if key is not None:
        overrides[key] = value
    torch.manual_seed(0)
    return MaskRCNN(config=None, **_dotted(overrides))


def _prepare_base(model, context):
    """Frozen BatchNorm with non-trivial statistics (random init has mean 0, var 1,
    scale 1: norm_eps and frozen_bn_op would hardly show); the context's weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                n = m.weight.shape[0]
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        if context == "empty_boxes":
            # dx = 1000 / wx = 100 box widths to the right of every proposal
            model.roi_heads.box_predictor.bbox_pred.bias[0::4] = 1000.0
    return model


def _structure(model):
    params = {n: (tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: (tuple(b.shape), None) for n, b in model.named_buffers()}
    return {**params, **buffers}


def _eval_outputs(model):
    model.eval()
    with torch.no_grad():
        return model([_effect_image()])[0]


def _train_losses(model):
    model.train()
    torch.manual_seed(TRAIN_SEED)
    return {k: v.detach() for k, v in model([_effect_image()], [_effect_target()]).items()}


def _pooled_at_level_boundaries(model):
    """The built box pooler on squares just below the P3/P4 and P4/P5 sides, where
    torchvision's rule (+1e-6 after the log) and detectron2's (+1e-8 inside) pick
    different levels (see tests/pooling/test_pooling.py)."""
    g = torch.Generator().manual_seed(3)
    channels = EFFECT_BASE["fpn_channels"]
    features = [torch.randn(1, channels, 512 // s, 512 // s, generator=g) for s in (4, 8, 16, 32)]
    sides = torch.tensor([224 * 2 ** -5e-7, 448 * 2 ** -5e-7], dtype=torch.float64)
    boxes = torch.stack([torch.full_like(sides, 10.0), torch.full_like(sides, 10.0),
                         10.0 + sides, 10.0 + sides], 1).float()
    with torch.no_grad():
        return {"pooled": model.roi_heads.box_roi_pool(features, [boxes], [(512, 512)])}


OBSERVE = {"structure": _structure, "eval": _eval_outputs, "train": _train_losses,
           "pooler": _pooled_at_level_boundaries}


def _difference(a, b):
    """'' when a and b ({name: tensor or value}) are the same, else what differs."""
    if set(a) != set(b):
        return f"names differ: {sorted(set(a) ^ set(b))[:6]}"
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
            if not torch.equal(x, y):
                return f"{name}: values differ"
        elif x != y:
            return f"{name}: {x} vs {y}"
    return ""


class _EffectLab:
    """Base models (one per context) and their observations, built once per module."""

    def __init__(self):
        self.models, self.seen = {}, {}

    def base(self, context):
        if context not in self.models:
            self.models[context] = _prepare_base(_build_effect_model(context), context)
        return self.models[context]

    def observed(self, how, context):
        if (how, context) not in self.seen:
            self.seen[how, context] = OBSERVE[how](self.base(context))
        return self.seen[how, context]


@pytest.fixture(scope="module")
def effect_lab():
    return _EffectLab()


def test_effect_cases_cover_every_model_key():
    keys = [case[0] for case in EFFECT_CASES]
    assert len(keys) == len(set(keys)), "a key listed twice"
    missing = set(_ini_keys(MODEL_SECTIONS)) - set(keys)
    assert not missing, f"config.ini keys without an effect case: {sorted(missing)}"
    assert not set(keys) - set(_ini_keys(MODEL_SECTIONS)), "a case for no config.ini key"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(DEFAULT_CONFIG)
    assert tuple(parser.sections()) == MODEL_SECTIONS + TOOL_SECTIONS


def test_effects_are_deterministic(effect_lab):
    """The base model built again (same seed, same preparation) observes exactly what the
    cached one did, and has outputs a key can change (detections, non-zero box losses)."""
    again = _prepare_base(_build_effect_model(""), "")
    for how in ("structure", "eval", "train"):
        assert _difference(OBSERVE[how](again), effect_lab.observed(how, "")) == "", how
    assert len(effect_lab.observed("eval", "")["boxes"]) > 20
    assert all(v > 0 for v in effect_lab.observed("train", "").values())


@pytest.mark.parametrize("key, value, how, context", EFFECT_CASES,
                         ids=[case[0] for case in EFFECT_CASES])
def test_every_model_key_changes_the_model(effect_lab, tmp_path, key, value, how, context):
    base = effect_lab.base(context)
    if how == "pretrained":
        torch.manual_seed(1)
        saved = MaskRCNN(config=None, **_dotted(EFFECT_BASE)).state_dict()
        torch.save(saved, tmp_path / "weights.pth")
        # a loaded config: the key itself, not MaskRCNN's pretrained argument
        path = str(tmp_path / "weights.pth")
        cfg = apply_overrides(load_config(DEFAULT_CONFIG),
                              {**_dotted(EFFECT_BASE), "model.pretrained": path})
        loaded = MaskRCNN(config=cfg).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in saved.items())
        assert _difference(loaded, _build_effect_model("").state_dict()), \
            "pretrained: the weights equal a model built without it"
        return
    variant = _build_effect_model(context, key, value)
    if how != "structure":
        # same weights as the base: only the key differs (a failure here means the key
        # changes the structure: observe it as "structure")
        variant.load_state_dict(base.state_dict())
    before = effect_lab.observed(how, context)
    assert _difference(OBSERVE[how](variant), before), \
        f"{key} = {value!r} (base {context or 'default'} context) changes nothing in {how}"

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


def test_pretrained_as_an_override_key_loads(tmp_path):
    """model.pretrained given as a config key (override or file) loads like the argument;
    the argument wins over the key, the key over the config file."""
    source = MaskRCNN(num_classes=2, norm="frozen_bn", **SMALL)
    torch.save(source.state_dict(), tmp_path / "raw.pth")
    ini = tmp_path / "user.ini"
    ini.write_text(f"[model]\npretrained = {tmp_path / 'missing.pth'}\n")
    for kwargs in ({"model.pretrained": str(tmp_path / "raw.pth")},
                   {"config": ini, "model.pretrained": str(tmp_path / "raw.pth")},
                   {"pretrained": str(tmp_path / "raw.pth"),
                    "model.pretrained": str(tmp_path / "missing.pth")}):
        loaded = MaskRCNN(num_classes=2, **SMALL, **kwargs)
        assert loaded.cfg.model.pretrained == str(tmp_path / "raw.pth")
        for (key, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), (kwargs, key)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        MaskRCNN(num_classes=2, config=ini, **SMALL)


def test_no_weights_trains_every_stage_with_batchnorm(tmp_path):
    """Without pretrained weights, frozen BatchNorm would keep random statistics and the
    frozen stages random weights: norm bn and all stages, as torchvision does, unless the
    user sets them (argument, config file or loaded config)."""
    from layers import FrozenBatchNorm2d
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
    from engine.checkpoint import atomic_save, plain
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


# ------------------------------------------ every tool key is read (solver, data, eval)

def _recording(cfg, reads):
    """cfg as EasyDicts that add the name of every key read (attribute or item) to
    `reads`. Only dunder methods: EasyDict turns other class attributes into items."""
    class Recording(EasyDict):
        def __getattribute__(self, name):
            if dict.__contains__(self, name):
                reads.add(name)
            return super().__getattribute__(name)

        def __getitem__(self, name):
            reads.add(name)
            return dict.__getitem__(self, name)

    return Recording({section: Recording(keys) for section, keys in cfg.items()})


def test_every_solver_data_eval_key_is_read_by_training(tmp_path):
    """One iteration of engine.train.train on a tiny synthetic set, with a checkpoint
    and the final evaluation: every [solver], [data] and [eval] key is read. (Read, not
    shown to act: their effects are tested in tests/tools, and an effect test per key
    would need a training run each.)"""
    from engine.shapes import make_shapes
    from engine.train import train
    train_json, train_images = make_shapes(tmp_path, "train", 2, 64, 2, seed=0)
    val_json, val_images = make_shapes(tmp_path, "val", 1, 64, 2, seed=1)
    cfg = apply_overrides(load_config(DEFAULT_CONFIG), {
        "backbone": "resnet18", "norm": "frozen_bn", "trainable_layers": 0,
        "fpn_channels": 32, "representation_size": 32,
        "mask_layers": (32,), "mask_dim_reduced": 32, "min_size": 64, "max_size": 64,
        "train_min_size": (64,), "rpn_pre_nms_top_n_train": 100,
        "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 50,
        "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 32,
        "box_detections_per_img": 10, "num_classes": 2,
        "train_json": str(train_json), "train_images": str(train_images),
        "val_json": str(val_json), "val_images": str(val_images), "num_workers": 0,
        "batch_size": 1, "max_iter": 1, "warmup_iters": 1, "checkpoint_every": 1,
        "log_every": 1, "output_dir": str(tmp_path / "out")})
    reads = set()
    summary = train(_recording(cfg, reads), progress=False)
    assert summary["iterations"] == 1 and summary["metrics"] is not None
    unread = set(_ini_keys(("solver", "data", "eval"))) - reads
    assert not unread, f"keys no training code read: {sorted(unread)}"


def test_every_demo_key_reaches_the_demo_run(tmp_path, monkeypatch):
    """run_demo with the data generator and the training stubbed out: each [demo] value
    reaches them (image counts, size and classes; the iteration count as max_iter, or the
    time budget as max_minutes with the iteration cap out of the way)."""
    import engine.shapes
    import engine.train
    from engine.cli import run_demo
    made, trained = [], []

    def fake_make_shapes(root, split, num_images, image_size, num_classes, seed=0):
        made.append((split, num_images, image_size, num_classes))
        (root / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.json").write_text("{}")
        return root / f"{split}.json", root / split

    def fake_train(cfg, progress=True):
        trained.append(cfg)
        raise engine.train.NonFiniteLossError("stub: no training in this test")

    monkeypatch.setattr(engine.shapes, "make_shapes", fake_make_shapes)
    monkeypatch.setattr(engine.train, "train", fake_train)
    demo = dict(demo_iters=17, demo_minutes=0.25, demo_image_size=48, demo_num_classes=2,
                demo_num_train=7, demo_num_val=5)
    defaults = load_config(DEFAULT_CONFIG).demo
    assert set(demo) == set(_ini_keys(("demo",)))
    assert all(defaults[k] != v for k, v in demo.items()), "pick non-default values"
    cfg = apply_overrides(load_config(DEFAULT_CONFIG), demo)
    assert run_demo(cfg, tmp_path / "demo", progress=False) is None    # the stub's error
    assert made == [("train", 7, 48, 2), ("val", 5, 48, 2)]
    assert trained[0].solver.max_minutes == 0.25 and trained[0].model.num_classes == 2
    assert trained[0].solver.max_iter == 10 ** 6
    # an explicit iteration count (--iters) wins over the config's budget
    assert run_demo(cfg, tmp_path / "demo", progress=False, iters=9) is None
    assert trained[-1].solver.max_iter == 9 and trained[-1].solver.max_minutes == 0.0
    cfg = apply_overrides(cfg, {"demo_minutes": 0.0})
    assert run_demo(cfg, tmp_path / "demo", progress=False) is None
    assert trained[-1].solver.max_iter == 17 and trained[-1].solver.max_minutes == 0.0
