"""The exports equal eager at every image size: one graph traced at one size, run at odd,
portrait and landscape sizes, sizes whose resize scale lands within 1e-4 of an integer
(where float32 arithmetic would resize to another size than eager's float64), and both
max_size-bound and min_size-bound sizes; in ONNX Runtime and as the torch.export program.

Oracle: the eager model itself (tests/deploy/helpers.eager), on calibrated torchvision v1
and v2 models and a calibrated detectron2 R50-FPN 3x checkpoint. At least 98% of the
detections pair (the issue's pairing: same label, score within 1e-3, box within 0.05 px;
random weights amplify the rounding of eager's Winograd convs against the export's direct
ones to ~2e-4 in scores) and the paired masks have IoU >= 0.98 (or differ in one pixel:
a 36-pixel mask of a 6-pixel box has one pixel flipped by its corners' rounding). Where pairs are missing, the only cause allowed is one the exporter
cannot express: a tie in scores (equal scores order freely in NMS, top-k and sort), so
every unpaired detection must have a score tied with another detection.
"""
import pytest
import torch

pytest.importorskip("onnx", reason="the [export] extra (make test installs it)")
pytest.importorskip("onnxruntime", reason="the [export] extra (make test installs it)")

import deploy  # noqa: E402
from maskrcnn import MaskRCNN  # noqa: E402
from tests.deploy.conftest import EXPORT_SIZE, images  # noqa: E402
from tests.deploy.helpers import eager, pairs_with_masks  # noqa: E402

PAIRED, MASK_IOU_MIN, TIE = 0.98, 0.98, 1e-6
SCORE_TOL, BOX_TOL = 1e-3, 0.05

# min_size 320, max_size 512 (tv_model and the detectron2 model below):
SWEEP = (
    (303, 400),   # landscape, min_size-bound: 303 * (320 / 303) = 319.99999999999994
    (400, 303),   # portrait, the same
    (200, 389),   # landscape, max_size-bound: 389 * (512 / 389) = 511.99999999999994
    (389, 200),   # portrait, the same
    (97, 411),    # odd, max_size-bound
    (155, 157),   # odd, min_size-bound, upscaled
    (481, 641),   # odd, downscaled
    (333, 1000),  # wide
)
# The torchvision v2 case (min_size 512, max_size 704, traced at 384 x 512): the
# sizes where the export used to differ, and one unresized (512 x 680). The .pt2 program
# is swept on v1 and detectron2 (a v2 torch.export costs half a minute more).
V2_SWEEP = ((389, 517), (517, 389), (600, 800), (333, 1000), (512, 680))


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    """These random BatchNorm-everywhere weights amplify rounding: eager's convolutions
    round differently with 1 and 2 threads, enough to move one v2 mask (IoU 0.86 at
    600 x 800 with 1 thread). The sweeps were calibrated with 2, as `make test` ran them
    before its xdist workers took one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _check_sweep(model, run, sizes, what, seed=5):
    """Eager vs run(image) at each size: >= PAIRED of all detections paired, paired masks
    IoU >= MASK_IOU_MIN, every unpaired detection in a score tie."""
    total = paired = 0
    for size, image in zip(sizes, images(sizes, seed=seed)):
        expected, got = eager(model, image), run(image)
        pairs = pairs_with_masks(expected, got, SCORE_TOL, BOX_TOL, MASK_IOU_MIN,
                                 f"{what} at {size}", pixel_slack=1)
        total, paired = total + len(expected["scores"]), paired + len(pairs)
        for side, index in ((expected, 0), (got, 1)):
            done = {p[index] for p in pairs}
            scores = side["scores"]
            for k in set(range(len(scores))) - done:
                gaps = (scores - scores[k]).abs()
                gaps[k] = float("inf")
                assert len(scores) > 1 and gaps.min() <= TIE, \
                    f"{what} at {size}: detection {k} ({'eager' if index == 0 else 'export'}" \
                    f", score {float(scores[k]):.7f}) unpaired without a score tie"
    assert total >= 10 * len(sizes), f"{what}: {total} detections, a weak test"
    assert paired >= PAIRED * total, f"{what}: {paired} of {total} detections paired"


def _onnx(model, tmp_path, size):
    path = deploy.export_onnx(model, tmp_path / "model.onnx", example_size=size)
    # ONNX Runtime 1.32's layout pass changes one mask of the v2 sweep (detection 79 at
    # 333 x 1000: IoU 0.81) while PyTorch running the same traced graph gives eager's:
    # the graph is right, the pass is not (deploy.OnnxPredictor, layout_optimizations).
    return deploy.OnnxPredictor(path, threads=2, layout_optimizations=False)


def _program(model, size):
    module = deploy.exported_program(model, example_size=size).module()

    def run(image):
        with torch.no_grad():
            return deploy.program.outputs_as_dict(module(image))
    return run


@pytest.fixture(scope="module")
def v2_model():
    """The issue's torchvision v2 case, converted with MaskRCNN.from_torchvision in exact
    mode. The fast path's Winograd convs round differently from direct convs, and these
    random BatchNorm-everywhere weights amplify that to 0.4 in single mask probabilities
    (eager fast vs eager exact, scores still within 1e-3); the export computes with direct
    convs (layers.EXPORT), so the eager side it must equal is the exact mode."""
    from tests.zoo.torchvision_oracle import coco_v2_like
    tv = coco_v2_like(images([(384, 512), (512, 680)], seed=1), min_size=512, max_size=704)
    return MaskRCNN.from_torchvision(tv, fuse_bn=False).eval()


@pytest.fixture(scope="module")
def d2_model(tmp_path_factory):
    """detectron2's R50-FPN 3x, calibrated random weights, loaded from its model-zoo .pkl
    with the preset (detectron2's rules: BGR 0..255, aligned RoIAlign, its level rule,
    anchors, proposal filter and grid_sample pasting)."""
    d2 = pytest.importorskip("tests.zoo.detectron2_oracle",
                             reason="detectron2 (make test installs it)")
    from convert.zoo import ZOO
    name = "mask_rcnn_R_50_FPN_3x"
    model, _ = d2.build_d2_model(name, seed=0, detections_per_image=30)
    d2.calibrate(model, [d2.make_image(320, 427, seed=0), d2.make_image(320, 427, seed=1)])
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    d2.save_model_zoo_pkl(model, path)
    return MaskRCNN(pretrained=str(path), config=ZOO[f"detectron2/{name}"].preset,
                    min_size=320, max_size=512, box_detections_per_img=30).eval()


@pytest.mark.slow
def test_torchvision_v1_every_size(tv_model, tmp_path):
    _check_sweep(tv_model, _onnx(tv_model, tmp_path, EXPORT_SIZE), SWEEP, "v1 ONNX")
    _check_sweep(tv_model, _program(tv_model, EXPORT_SIZE), SWEEP[:4], "v1 .pt2")


@pytest.mark.slow
def test_torchvision_v2_every_size(v2_model, tmp_path):
    _check_sweep(v2_model, _onnx(v2_model, tmp_path, (384, 512)), V2_SWEEP, "v2 ONNX")


@pytest.mark.slow
def test_detectron2_every_size(d2_model, tmp_path):
    _check_sweep(d2_model, _onnx(d2_model, tmp_path, EXPORT_SIZE), SWEEP, "d2 ONNX")
    _check_sweep(d2_model, _program(d2_model, EXPORT_SIZE), SWEEP[:4], "d2 .pt2")
