"""ONNX export (deploy.export_onnx) run in ONNX Runtime and OpenVINO against the eager model: the same
detections (labels, scores within 1e-4, boxes within 1e-2 px, mask IoU >= 0.99) at image
sizes other than the one traced with, including an image without detections.

Oracles: a converted torchvision model with calibrated random weights (tv_model), and a
checkpoint trained here (trained), also run with detectron2's rules (aligned RoIAlign,
adaptive sampling, detectron2 anchors / proposal filter / grid_sample pasting, BGR 0-255
input) so both paste and RoIAlign variants are covered. Shapes: D detections.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx", reason="onnx is not installed: pip install '.[export]' "
                                   "(make test installs it)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install "
                                          "'.[export]' (make test installs it)")

import deploy  # noqa: E402
from maskrcnn import MaskRCNN  # noqa: E402
from tests.deploy.conftest import CHECK_SIZES, EXPORT_SIZE, images  # noqa: E402
from tests.deploy.helpers import assert_same_detections, eager  # noqa: E402

# detectron2's inference rules, applied over the trained checkpoint's config.
DETECTRON2_RULES = dict(roi_aligned=True, roi_level_rule="detectron2", box_sampling_ratio=0,
                        mask_sampling_ratio=0, anchor_rule="detectron2",
                        rpn_box_filter="detectron2", rpn_min_size=0.0, box_min_size=0.0,
                        box_drop_empty=True, mask_paste="detectron2", input_format="BGR",
                        pixel_scale=255.0, image_mean="123.675, 116.28, 103.53",
                        image_std="58.395, 57.12, 57.375")


# The runtimes every exported file runs in: ONNX Runtime, and OpenVINO (make test installs
# it; the README promises both).
RUNTIMES = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="openvino is not installed: pip install openvino (make test installs it)"))]


def _runtime(path, runtime):
    if runtime == "openvino":
        return deploy.OpenVinoPredictor(path, threads=2)
    return deploy.OnnxPredictor(path, threads=2)


def _export(model, tmp_path_factory, name, size):
    path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
    return deploy.export_onnx(model, path, example_size=size)


def _shapes_images(val_images):
    """Three sizes other than the traced 128 x 128: two resized shapes images and a blank
    (uniform grey) one, on which the trained model detects nothing."""
    resized = [F.interpolate(img[None], size=s, mode="bilinear", align_corners=False)[0]
               .clamp(0, 1) for img, s in zip(val_images[:2], ((150, 110), (90, 170)))]
    return resized + [torch.full((3, 140, 160), 0.5)]


@pytest.fixture(scope="module")
def tv_onnx(tv_model, tmp_path_factory):
    return _export(tv_model, tmp_path_factory, "tv", EXPORT_SIZE)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_torchvision_model_matches_eager(tv_model, tv_onnx, runtime):
    predictor = _runtime(tv_onnx, runtime)
    counts = []
    for size, image in zip(CHECK_SIZES, images(CHECK_SIZES, seed=11)):
        expected = eager(tv_model, image)
        assert_same_detections(expected, predictor(image),
                               f"torchvision model at {size} in {runtime}")
        counts.append(len(expected["scores"]))
    assert min(counts) >= 5, f"too few detections to compare: {counts}"


@pytest.fixture(scope="module", params=["torchvision", "detectron2"])
def trained_onnx(request, trained, tmp_path_factory):
    """(rules, model, .onnx path) of the trained checkpoint under each rule set."""
    checkpoint, _ = trained
    overrides = DETECTRON2_RULES if request.param == "detectron2" else {}
    model = MaskRCNN(pretrained=checkpoint, **overrides).eval()
    return request.param, model, _export(model, tmp_path_factory, f"trained_{request.param}",
                                         (128, 128))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_trained_checkpoint_matches_eager(trained, trained_onnx, runtime):
    _, val_images = trained
    rules, model, path = trained_onnx
    predictor = _runtime(path, runtime)
    counts = []
    for image in _shapes_images(val_images):
        expected = eager(model, image)
        assert_same_detections(expected, predictor(image), f"trained ({rules} rules) at "
                               f"{tuple(image.shape[1:])} in {runtime}")
        counts.append(len(expected["scores"]))
    assert min(counts[:2]) >= 1 and counts[2] == 0, \
        f"detections per image {counts}: the oracle needs objects, then none"


PRESETS = sorted(str(p) for p in
                 (Path(__file__).resolve().parents[2] / "configs" / "zoo").glob("*/*.ini"))


@pytest.fixture(scope="module")
def preset_exports(tmp_path_factory):
    """preset -> (.onnx path, eager detections, image): each preset exported once for
    both runtimes (the model itself is not kept: seven zoo-sized models at once would not
    fit)."""
    cache = {}

    def get(preset):
        if preset not in cache:
            torch.manual_seed(0)
            model = MaskRCNN(config=preset, min_size=160, max_size=256,
                             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                             box_detections_per_img=5, box_score_thresh=0.0).eval()
            path = deploy.export_onnx(model, tmp_path_factory.mktemp("preset") / "model.onnx",
                                      example_size=(128, 160))
            image = images([(150, 120)], seed=3)[0]
            cache[preset] = path, eager(model, image), image
        return cache[preset]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.split("zoo/")[-1][:-4])
def test_every_zoo_preset_exports(preset, runtime, preset_exports):
    """Random weights (no downloads): each preset's architecture exports, runs in ONNX
    Runtime and in OpenVINO at another size and gives eager's detection count and mask
    shape. Scores of random weights sit in near-ties, so only the counts and shapes are
    compared."""
    path, expected, image = preset_exports(preset)
    out = _runtime(path, runtime)(image)
    assert len(out["scores"]) == len(expected["scores"])
    assert tuple(out["masks"].shape) == tuple(expected["masks"].shape)
    assert torch.isfinite(out["boxes"]).all()


def test_model_built_from_parts_exports(trained, tmp_path):
    """A GeneralizedRCNN assembled by hand (no config) exports: the export traces the
    modules themselves, it reads nothing from model.cfg."""
    from generalized_rcnn import GeneralizedRCNN
    checkpoint, val_images = trained
    built = MaskRCNN(pretrained=checkpoint).eval()
    model = GeneralizedRCNN(built.backbone, built.rpn, built.roi_heads, built.transform).eval()
    assert model.cfg is None
    path = deploy.export_onnx(model, tmp_path / "parts.onnx", example_size=(128, 128))
    predictor = _runtime(path, "onnxruntime")
    counts = []
    for image in _shapes_images(val_images)[:2]:
        expected = eager(model, image)
        assert_same_detections(expected, predictor(image), "hand-built model")
        counts.append(len(expected["scores"]))
    assert min(counts) >= 1, f"detections per image {counts}: nothing compared"
