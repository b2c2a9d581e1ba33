"""convert/detectron2.py: detectron2 Mask R-CNN state dicts under our names and layout.

detectron2 is the oracle: the five model-zoo architectures are built with random weights
(tests/zoo/detectron2_oracle.py); their state dicts are converted and checked key by key
against the mapping's invariants, and name by name / shape by shape against our model
built from the matching preset (configs/zoo/detectron2/<name>.ini).
K object classes (80, COCO's, as in the presets).
"""
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch

from convert.detectron2 import (convert_detectron2_state, detectron2_num_classes,
                           is_detectron2_state)

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[2]
NAMES = ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_101_FPN_3x", "mask_rcnn_X_101_32x8d_FPN_3x",
         "mask_rcnn_R_50_FPN_400ep_LSJ", "mask_rcnn_R_101_FPN_400ep_LSJ"]
K = 80
DROPPED = ("pixel_mean", "pixel_std", "proposal_generator.anchor_generator.cell_anchors.0")
PREDICTORS = {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
              "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
              "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}


@pytest.fixture(scope="module")
def oracle():
    """tests/zoo/detectron2_oracle.py; skips the test when detectron2 is not installed."""
    from tests.zoo import detectron2_oracle
    return detectron2_oracle


@pytest.fixture(scope="module", params=NAMES)
def d2_state(oracle, request):
    """(config name, detectron2 state dict with random values everywhere, its
    conversion). Every float tensor is replaced by a random one: detectron2 initialises
    biases and norms to constants, under which a wrong row order or a swapped buffer
    would go unnoticed."""
    model, settings = oracle.build_d2_model(request.param)
    assert settings["num_classes"] == K
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
             for k, v in model.state_dict().items()}
    return request.param, state, convert_detectron2_state(state)


def test_every_learned_key_converts_once_and_unchanged(d2_state):
    _, state, ours = d2_state
    assert is_detectron2_state(state) and not is_detectron2_state(ours)
    assert detectron2_num_classes(state) == K
    assert len(ours) == len(state)                       # nothing dropped, nothing merged
    # Every tensor outside the class predictors reaches ours unchanged, exactly once.
    plain = {id(v) for k, v in ours.items() if not k.startswith(
        ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits."))}
    for key, value in state.items():
        if key not in PREDICTORS:
            assert id(value) in plain, f"{key} is missing or changed"
    assert len(plain) == len(state) - len(PREDICTORS)


def test_background_rows(d2_state):
    _, state, ours = d2_state
    p = "roi_heads.box_predictor."
    for suffix in ("weight", "bias"):
        d2_cls, cls = state[p + "cls_score." + suffix], ours[p + "cls_score." + suffix]
        assert cls.shape == d2_cls.shape == (K + 1,) + d2_cls.shape[1:]
        assert torch.equal(cls[0], d2_cls[-1])           # background: last -> first
        assert torch.equal(cls[1:], d2_cls[:-1])         # class k: row k-1 -> row k
        d2_box, box = state[p + "bbox_pred." + suffix], ours[p + "bbox_pred." + suffix]
        assert d2_box.shape[0] == 4 * K and box.shape == (4 * (K + 1),) + d2_box.shape[1:]
        assert not box[:4].any() and torch.equal(box[4:], d2_box)
        d2_mask = state["roi_heads.mask_head.predictor." + suffix]
        mask = ours["roi_heads.mask_predictor.mask_fcn_logits." + suffix]
        assert d2_mask.shape[0] == K and mask.shape == (K + 1,) + d2_mask.shape[1:]
        assert not mask[0].any() and torch.equal(mask[1:], d2_mask)


# Spot checks of the names, written out (not derived from the converter's rules).
SPOTS = {
    "backbone.bottom_up.stem.conv1.weight": "backbone.body.conv1.weight",
    "backbone.bottom_up.stem.conv1.norm.running_var": "backbone.body.bn1.running_var",
    "backbone.bottom_up.res2.0.shortcut.weight": "backbone.body.layer1.0.downsample.0.weight",
    "backbone.bottom_up.res3.0.shortcut.norm.weight": "backbone.body.layer2.0.downsample.1.weight",
    "backbone.bottom_up.res4.5.conv2.weight": "backbone.body.layer3.5.conv2.weight",
    "backbone.bottom_up.res5.2.conv3.norm.bias": "backbone.body.layer4.2.bn3.bias",
    "backbone.fpn_lateral2.weight": "backbone.fpn.lateral_convs.0.weight",
    "backbone.fpn_output5.weight": "backbone.fpn.output_convs.3.weight",
    "proposal_generator.rpn_head.objectness_logits.bias": "rpn.head.cls_logits.bias",
    "proposal_generator.rpn_head.anchor_deltas.weight": "rpn.head.bbox_pred.weight",
    "roi_heads.box_head.fc1.weight": "roi_heads.box_head.fc6.weight",
    "roi_heads.mask_head.mask_fcn1.weight": "roi_heads.mask_head.0.0.weight",
    "roi_heads.mask_head.mask_fcn4.weight": "roi_heads.mask_head.3.0.weight",
    "roi_heads.mask_head.deconv.bias": "roi_heads.mask_predictor.conv5_mask.bias",
}
SPOTS_3X = {
    "backbone.fpn_lateral3.bias": "backbone.fpn.lateral_convs.1.bias",
    "proposal_generator.rpn_head.conv.weight": "rpn.head.convs.0.weight",
    "roi_heads.box_head.fc2.bias": "roi_heads.box_head.fc7.bias",
    "roi_heads.mask_head.mask_fcn2.bias": "roi_heads.mask_head.1.0.bias",
}
SPOTS_LSJ = {   # norms in the FPN and the heads, 2 RPN convs, 4conv1fc box head
    "backbone.fpn_lateral4.norm.running_mean": "backbone.fpn.lateral_norms.2.running_mean",
    "backbone.fpn_output3.norm.num_batches_tracked":
        "backbone.fpn.output_norms.1.num_batches_tracked",
    "backbone.bottom_up.res2.1.conv1.norm.num_batches_tracked":
        "backbone.body.layer1.1.bn1.num_batches_tracked",
    "proposal_generator.rpn_head.conv.conv0.weight": "rpn.head.convs.0.weight",
    "proposal_generator.rpn_head.conv.conv1.bias": "rpn.head.convs.1.bias",
    "roi_heads.box_head.conv1.weight": "roi_heads.box_head.convs.0.weight",
    "roi_heads.box_head.conv4.norm.weight": "roi_heads.box_head.norms.3.weight",
    "roi_heads.mask_head.mask_fcn3.norm.running_var": "roi_heads.mask_head.2.1.running_var",
}


def test_spot_names(d2_state):
    name, state, ours = d2_state
    spots = {**SPOTS, **(SPOTS_LSJ if "LSJ" in name else SPOTS_3X)}
    for d2_key, our_key in spots.items():
        assert our_key in ours, f"{d2_key}: expected {our_key}"
        assert ours[our_key] is state[d2_key], f"{d2_key} -> {our_key}: other value"
    if "LSJ" in name:
        assert "roi_heads.box_head.fc7.weight" not in ours
        assert ours["backbone.body.bn1.num_batches_tracked"].dtype == torch.int64


def test_converted_state_matches_our_model(d2_state):
    """Our model built from the preset has exactly the converted names and shapes, and
    loads the converted state strictly."""
    from maskrcnn import MaskRCNN
    name, _, converted = d2_state
    preset = ROOT / "configs" / "zoo" / "detectron2" / f"{name}.ini"
    assert preset.is_file(), f"preset {preset.relative_to(ROOT)} does not exist"
    ours = MaskRCNN(config=str(preset)).eval()
    expected = ours.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    assert not missing and not unexpected, (
        f"{len(missing)} missing, e.g. {missing[:5]}; {len(unexpected)} unexpected, "
        f"e.g. {unexpected[:5]}")
    shapes = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in converted.items()
              if v.shape != expected[k].shape]
    assert not shapes, f"{len(shapes)} shapes differ (key, converted, ours): {shapes[:5]}"
    ours.load_state_dict(converted, strict=True)


def test_model_zoo_pickle_with_old_buffers(oracle, tmp_path):
    """A model-zoo .pkl (numpy arrays) converts; the non-learned buffers that older
    checkpoints carry (pixel mean / std, cell anchors) are dropped."""
    model, _ = oracle.build_d2_model("mask_rcnn_R_50_FPN_3x")
    path = tmp_path / "model_final.pkl"
    oracle.save_model_zoo_pkl(model, path)
    with open(path, "rb") as f:
        blob = pickle.load(f)
    assert blob["__author__"] == "test"
    state = dict(blob["model"])
    state["pixel_mean"] = state["pixel_std"] = torch.zeros(3, 1, 1).numpy()
    for i in range(5):
        state[f"proposal_generator.anchor_generator.cell_anchors.{i}"] = torch.zeros(3, 4).numpy()
    converted = convert_detectron2_state(state)
    reference = convert_detectron2_state(model.state_dict())
    assert converted.keys() == reference.keys()
    for key, value in reference.items():
        assert isinstance(converted[key], torch.Tensor) and torch.equal(converted[key], value)
    assert not any(k in converted for k in DROPPED)
    # Against the .pkl's own arrays, not the converter run twice: every array outside the
    # class predictors reaches the result unchanged (as a multiset of values: names are
    # test_spot_names' and test_converted_state_matches_our_model's business), and the
    # predictors are the arrays with the rows moved as detectron2 lays them out: background
    # last in cls_score (ours first), no background box / mask (ours zeros, first).
    arrays = blob["model"]

    def fingerprint(t):
        t = torch.as_tensor(t)
        return (str(t.dtype), tuple(t.shape), t.numpy().tobytes())
    expected = Counter(fingerprint(v) for k, v in arrays.items() if k not in PREDICTORS)
    got = Counter(fingerprint(v) for k, v in converted.items() if not k.startswith(
        ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")))
    assert got == expected, f"{sum((got - expected).values())} arrays changed or added"
    for suffix in ("weight", "bias"):
        cls = torch.from_numpy(arrays[f"roi_heads.box_predictor.cls_score.{suffix}"])
        box = torch.from_numpy(arrays[f"roi_heads.box_predictor.bbox_pred.{suffix}"])
        mask = torch.from_numpy(arrays[f"roi_heads.mask_head.predictor.{suffix}"])
        assert torch.equal(converted[f"roi_heads.box_predictor.cls_score.{suffix}"],
                           torch.cat([cls[-1:], cls[:-1]]))
        assert torch.equal(converted[f"roi_heads.box_predictor.bbox_pred.{suffix}"],
                           torch.cat([torch.zeros_like(box[:4]), box]))
        assert torch.equal(converted[f"roi_heads.mask_predictor.mask_fcn_logits.{suffix}"],
                           torch.cat([torch.zeros_like(mask[:1]), mask]))


def _tiny_state():
    """A minimal detectron2-named state dict: K = 2 classes, D = 3 features."""
    return {
        "backbone.bottom_up.stem.conv1.weight": torch.zeros(4, 3, 7, 7),
        "roi_heads.box_predictor.cls_score.weight": torch.arange(9.0).view(3, 3),
        "roi_heads.box_predictor.cls_score.bias": torch.tensor([1.0, 2.0, 0.0]),
        "roi_heads.box_predictor.bbox_pred.weight": torch.ones(8, 3),
        "roi_heads.box_predictor.bbox_pred.bias": torch.ones(8),
        "roi_heads.mask_head.predictor.weight": torch.ones(2, 3, 1, 1),
        "roi_heads.mask_head.predictor.bias": torch.ones(2),
    }


def test_tiny_state_values():
    ours = convert_detectron2_state(_tiny_state())
    assert detectron2_num_classes(_tiny_state()) == 2
    assert ours["roi_heads.box_predictor.cls_score.bias"].tolist() == [0.0, 1.0, 2.0]
    assert ours["roi_heads.box_predictor.cls_score.weight"][:, 0].tolist() == [6.0, 0.0, 3.0]
    assert ours["roi_heads.box_predictor.bbox_pred.bias"].tolist() == [0.0] * 4 + [1.0] * 8
    assert ours["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape == (3, 3, 1, 1)
    assert ours["roi_heads.mask_predictor.mask_fcn_logits.bias"].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("key", ["backbone.bottom_up.res6.0.conv1.weight",
                                 "roi_heads.keypoint_head.conv_fcn1.weight",
                                 "backbone.fpn_lateral2.weight_extra", "module.pixel_mean"])
def test_unknown_key_raises_naming_it(key):
    state = _tiny_state()
    state[key] = torch.zeros(1)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_detectron2_state(state)


def test_class_agnostic_predictors_raise():
    state = _tiny_state()
    state["roi_heads.box_predictor.bbox_pred.weight"] = torch.ones(4, 3)
    with pytest.raises(ValueError, match="bbox_pred.weight: 4 rows"):
        convert_detectron2_state(state)
    state = _tiny_state()
    state["roi_heads.mask_head.predictor.bias"] = torch.ones(1)
    with pytest.raises(ValueError, match="class-agnostic"):
        convert_detectron2_state(state)


def test_not_a_mask_rcnn_state():
    assert not is_detectron2_state({"backbone.body.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="cls_score.bias"):
        convert_detectron2_state({"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)})
