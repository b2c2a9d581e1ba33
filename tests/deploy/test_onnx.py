"""ONNX export (deploy.export_onnx) run in ONNX Runtime and OpenVINO against the eager model: the same
detections (labels, scores within 1e-4, boxes within 1e-2 px, mask IoU >= 0.99) at image
sizes other than the one traced with, including an image without detections.

Oracles: a converted torchvision model with calibrated random weights (tv_model), and a
checkpoint trained here (trained), also run with detectron2's rules (aligned RoIAlign,
adaptive sampling, detectron2 anchors / proposal filter / grid_sample pasting, BGR 0-255
input) so both paste and RoIAlign variants are covered. Shapes: D detections.
"""
import importlib.util
import warnings
from pathlib import Path

import numpy as np
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
from tools.tracing import resized_size  # noqa: E402
from tools.transform import _linear_taps  # noqa: E402

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


class _SizeArithmetic(torch.nn.Module):
    """The traced resize's size arithmetic alone: resized_size of image [1, H, W] (TV_KW's
    320 / 512) and the bilinear taps from H to Hr and W to Wr (out_h [Hr], out_w [Wr])."""

    def forward(self, image, out_h, out_w):
        h, w = image.shape[-2], image.shape[-1]
        return (torch.stack(resized_size(h, w, 320, 512)),
                *_linear_taps(h, out_h.shape[0], image.device),
                *_linear_taps(w, out_w.shape[0], image.device))


def _size_arithmetic_runner(path, runtime):
    """run([image, out_h, out_w] numpy arrays) -> the outputs as numpy arrays."""
    if runtime == "openvino":
        import openvino as ov
        compiled = ov.Core().compile_model(str(path), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32"})
        return lambda feed: list(compiled(feed).values())
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, dict(zip(("image", "out_h", "out_w"), feed)))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_size_arithmetic_matches_eager(runtime, tmp_path):
    """Resized sizes and resize taps equal eager's in each runtime, at sizes whose float64
    scale lands on an integer (300 * (320 / 200) = 480, 389 * (512 / 389) =
    511.99999999999994) and random ones: OpenVINO computes float64 in float32 (479 at
    300 x 200) and integer division through float32 (tools/intmath.py)."""
    path = tmp_path / "sizes.onnx"
    dims = {"image": {1: "h", 2: "w"}, "out_h": {0: "hr"}, "out_w": {0: "wr"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_SizeArithmetic(), (torch.zeros(1, 240, 320), torch.zeros(320),
                                              torch.zeros(426)), str(path), dynamo=False,
                          opset_version=deploy.OPSET, input_names=list(dims),
                          dynamic_axes=dims)
    g = torch.Generator().manual_seed(0)
    sizes = [(300, 200), (389, 200), (200, 389), (303, 400), (97, 411), (155, 157),
             (481, 641), (333, 1000), (1, 4000), (6000, 1)]
    sizes += [tuple(s) for s in torch.randint(1, 3000, (40, 2), generator=g).tolist()]
    run = _size_arithmetic_runner(path, runtime)
    for h, w in sizes:
        hr, wr = resized_size(h, w, 320, 512)
        got = run([np.zeros((1, h, w), np.float32), np.zeros(hr, np.float32),
                   np.zeros(wr, np.float32)])
        want = [torch.tensor([hr, wr]), *_linear_taps(h, hr, "cpu"),
                *_linear_taps(w, wr, "cpu")]
        for name, a, b in zip(["sizes"] + ["i0", "i1", "w0", "w1"] * 2, got, want):
            assert torch.equal(torch.from_numpy(a), b), f"{name} at {(h, w)} in {runtime}"


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
