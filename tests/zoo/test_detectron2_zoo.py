"""detectron2's model-zoo architectures through our loader and presets: same detections.

detectron2 is the oracle (tests/zoo/detectron2_oracle.py): each architecture is built from
its own config (yaml for the 3x models, LazyConfig for LSJ) with calibrated random
weights and saved as a model-zoo .pkl; we load that file with the matching preset in
exact mode (fuse_bn=False) and compare on an image whose short side is the test size
(detectron2 resizes outside the model): same labels, scores within 1e-4, boxes within
1e-2 px, binary masks with IoU >= 0.99. The same with pretrained="coco" through the
downloader (file:// URL, content check, recorded sha256). Skipped, with the reason, when
detectron2 is not installed (`make test` installs it from ../shared/oracles/).
Shapes: D detections, H x W the image.
"""
from dataclasses import replace

import pytest
import torch

from convert import zoo
from maskrcnn import MaskRCNN

d2 = pytest.importorskip("tests.zoo.detectron2_oracle",
                         reason="detectron2 (the oracle) is not installed")
torch.set_num_threads(2)

H, W = 320, 427
# Few proposals and detections keep the CPU time low and the score gaps wide (see the
# oracle's CLS_LOGIT_STD); the same values go to both sides.
D2_KW = dict(pre_nms_topk_test=300, post_nms_topk_test=150, detections_per_image=15)
OURS_KW = dict(min_size=H, max_size=2 * W, rpn_pre_nms_top_n_test=300,
               rpn_post_nms_top_n_test=150, box_detections_per_img=15)


def _mask_iou(a, b):
    inter = (a & b).flatten(1).sum(1)
    union = (a | b).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0)


def _assert_same(ours, ref, what):
    assert len(ref["boxes"]) >= 5, f"{what}: detectron2 made few detections: weak test"
    assert len(ref["labels"].unique()) > 1, f"{what}: one class only: weak test"
    # The fast path rounds differently (~1e-5): wider gaps keep the order a property of
    # the models, not of the rounding.
    assert d2.min_score_gap(ref["scores"]) > 5e-5, f"{what}: near-tied scores"
    assert torch.equal(ours["labels"], ref["labels"]), f"{what}: labels differ"
    torch.testing.assert_close(ours["scores"], ref["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["boxes"], ref["boxes"], rtol=0, atol=1e-2)
    iou = _mask_iou(ours["masks"][:, 0] > 0.5, ref["masks"])
    assert iou.min() >= 0.99, f"{what}: mask IoU {iou.min():.4f}"


def _d2_pkl(name, path, seed=0):
    """(detectron2 model, image, path of its model-zoo .pkl)."""
    model, _ = d2.build_d2_model(name, seed=seed, **D2_KW)
    image = d2.make_image(H, W, seed=seed)
    d2.calibrate(model, [image, d2.make_image(H, W, seed=seed + 100)])
    d2.save_model_zoo_pkl(model, path)
    return model, image


@pytest.mark.slow
@pytest.mark.parametrize("name", d2.NAMES)
def test_model_zoo_pkl_matches_detectron2(name, tmp_path):
    path = tmp_path / "model_final.pkl"
    model, image = _d2_pkl(name, path)
    ours = MaskRCNN(pretrained=str(path), config=zoo.ZOO[f"detectron2/{name}"].preset,
                    fuse_bn=False, **OURS_KW).eval()
    assert ours.categories[1] == ("person", 1) and ours.categories[80] == ("toothbrush", 90)
    with torch.no_grad():
        out = ours([d2.bgr_to_rgb01(image)])[0]
    ref = d2.run_d2(model, image)
    _assert_same(out, ref, name)
    # Exact mode is detectron2's arithmetic: the same ops in the same order (the softmax
    # over a permuted class axis may round one ulp apart).
    assert (out["scores"] - ref["scores"]).abs().max() <= 1e-6
    assert (out["boxes"] - ref["boxes"]).abs().max() <= 1e-4
    assert torch.equal(out["masks"][:, 0] > 0.5, ref["masks"])


@pytest.mark.slow
def test_coco_through_the_downloader_matches_detectron2(tmp_path, monkeypatch):
    """pretrained="coco" (ResNet-101: the R101 LSJ entry) end to end: download over
    file://, content check, sha256 recorded, convert, same detections; a changed cached
    file is then refused."""
    name = "detectron2/mask_rcnn_R_101_FPN_400ep_LSJ"
    source = tmp_path / "published" / zoo.ZOO[name].filename
    source.parent.mkdir()
    model, image = _d2_pkl(name.split("/")[1], source, seed=3)
    monkeypatch.setitem(zoo.ZOO, name, replace(zoo.ZOO[name], url=source.as_uri()))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("MASKRCNN_OFFLINE", raising=False)
    ours = MaskRCNN(num_classes=80, pretrained="coco", fuse_bn=False, **OURS_KW).eval()
    cached = zoo.cached_file(zoo.ZOO[name])
    assert cached.is_file() and zoo.sha256_file(cached) in (
        cached.parent / (cached.name + ".sha256")).read_text()
    with torch.no_grad():
        out = ours([d2.bgr_to_rgb01(image)])[0]
    _assert_same(out, d2.run_d2(model, image), name)
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x00")
    with pytest.raises(zoo.ChecksumError, match="changed since it was verified"):
        MaskRCNN(pretrained="coco")


@pytest.mark.slow
def test_fast_path_matches_detectron2_within_tolerance(tmp_path):
    """The default (fused, Winograd) path on detectron2 weights: same detections, with
    rounding-level differences only."""
    name = "mask_rcnn_R_50_FPN_3x"
    path = tmp_path / "model_final.pkl"
    model, image = _d2_pkl(name, path, seed=5)
    ours = MaskRCNN(pretrained=str(path), config=zoo.ZOO[f"detectron2/{name}"].preset,
                    **OURS_KW).eval()
    assert ours.cfg.backbone.fuse_bn
    with torch.no_grad():
        out = ours([d2.bgr_to_rgb01(image)])[0]
    _assert_same(out, d2.run_d2(model, image), name)


def test_a_content_check_failure_is_never_loaded(tmp_path, monkeypatch):
    """A detectron2 download whose arrays do not fit the preset is refused, and nothing is
    left in the cache."""
    name = "detectron2/mask_rcnn_R_50_FPN_3x"
    source = tmp_path / "model_final_f10217.pkl"
    d2.save_model_zoo_pkl(d2.build_d2_model("mask_rcnn_R_101_FPN_3x", **D2_KW)[0], source)
    monkeypatch.setitem(zoo.ZOO, name, replace(zoo.ZOO[name], url=source.as_uri()))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("MASKRCNN_OFFLINE", raising=False)
    with pytest.raises(zoo.ChecksumError, match="content"):
        MaskRCNN(pretrained=name)
    assert not zoo.cached_file(zoo.ZOO[name]).exists()
    assert not list(zoo.cache_dir().glob("*partial*"))


def test_detectron2_training_checkpoint_loads_like_the_pkl(tmp_path):
    """detectron2's own training checkpoints (torch.save of {"model": tensors, ...})
    load with weights_only and give the same model as its model-zoo .pkl."""
    name = "mask_rcnn_R_50_FPN_3x"
    model, image = _d2_pkl(name, tmp_path / "model_final.pkl", seed=7)
    torch.save({"model": model.state_dict(), "iteration": 269999, "scheduler": {}},
               tmp_path / "model_final.pth")
    preset = zoo.ZOO[f"detectron2/{name}"].preset
    from_pkl = MaskRCNN(pretrained=str(tmp_path / "model_final.pkl"), config=preset)
    from_pth = MaskRCNN(pretrained=str(tmp_path / "model_final.pth"), config=preset)
    for key, value in from_pkl.state_dict().items():
        assert torch.equal(value, from_pth.state_dict()[key]), key
    assert from_pth.categories == from_pkl.categories
