"""The model zoo's torchvision entries end to end, and loading's failure modes.

torchvision is the oracle: a Mask R-CNN v1 / v2 with calibrated random weights is saved as
torchvision saves its COCO checkpoints; a zoo entry pointing at it by a file:// URL (with
its real sha256 prefix) is downloaded into a temporary torch hub cache, verified, converted
and run, and its detections are compared with torchvision's own. No test touches the
network. Shapes: D detections.
"""
import hashlib
import pickle
from dataclasses import replace

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

from convert import zoo
from maskrcnn import MaskRCNN
from tests.zoo.torchvision_oracle import calibrate, coco_v1_like, damp_residual_blocks

torch.set_num_threads(2)
# Test-time overrides: they apply over the preset (small images keep the CPU time low).
SMALL = dict(min_size=320, max_size=512, rpn_pre_nms_top_n_test=300,
             rpn_post_nms_top_n_test=150, box_detections_per_img=20)
TV_KW = dict(min_size=320, max_size=512, rpn_pre_nms_top_n_test=300,
             rpn_post_nms_top_n_test=150, box_detections_per_img=20)
V1 = "torchvision/maskrcnn_resnet50_fpn"
V2 = "torchvision/maskrcnn_resnet50_fpn_v2"


def _images():
    g = torch.Generator().manual_seed(7)
    return [torch.rand(3, 240, 320, generator=g), torch.rand(3, 300, 200, generator=g)]


def _tv_v1():
    """torchvision's COCO v1 model as its weights run: frozen BatchNorm with eps 0."""
    return coco_v1_like(_images()[0], **TV_KW)


def _tv_v2():
    torch.manual_seed(1)
    tv = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91,
                                  **TV_KW).eval()
    with torch.no_grad():      # BatchNorm statistics that keep the features O(1)
        for module in tv.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    damp_residual_blocks(tv.backbone)
    return calibrate(tv, _images()[0])


@pytest.fixture(scope="module")
def tv_models():
    return {V1: _tv_v1(), V2: _tv_v2()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no MASKRCNN_OFFLINE."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("MASKRCNN_OFFLINE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _publish(tmp_path, monkeypatch, name, state) -> zoo.ZooEntry:
    """Save `state` as torchvision publishes weights (file name with the sha256 prefix)
    and point the zoo entry `name` at it by a file:// URL."""
    raw = tmp_path / "published.pth"
    torch.save(state, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    path = tmp_path / f"{name.split('/')[1]}_coco-{digest[:8]}.pth"
    raw.rename(path)
    entry = replace(zoo.ZOO[name], url=path.as_uri(), sha256=digest[:8])
    monkeypatch.setitem(zoo.ZOO, name, entry)
    return entry


def mask_iou(a, b):
    """Tensor[D]: IoU of binary masks Tensor[D, 1, H, W] pairwise (two empty masks: 1)."""
    inter = (a & b).flatten(1).sum(1)
    union = (a | b).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0)


# Exact mode's masks (MaskRCNN.from_torchvision): probabilities within one float32
# rounding step of torchvision's, i.e. one ulp of 1.0 at most twice (the sigmoid of the
# selected channel, then the paste), as tests/test_maskrcnn.py's EXACT_MASK_ATOL.
EXACT_MASK_ATOL = 2 * torch.finfo(torch.float32).eps


def _assert_same_detections(ours, ref, exact=False):
    """exact (fuse_bn=False): torchvision's arithmetic, so boxes, labels and scores equal
    to the last bit and masks within EXACT_MASK_ATOL. Else (the fast path) within the
    fused convolutions' rounding."""
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert len(b["boxes"]) > 3, "torchvision made (almost) no detections: weak test"
        assert torch.equal(a["labels"], b["labels"]), f"image {i}: labels differ"
        if exact:
            for key in ("boxes", "scores"):
                diff = ((a[key] - b[key]).abs().max().item()
                        if a[key].shape == b[key].shape else "shapes differ")
                assert torch.equal(a[key], b[key]), f"image {i}: {key} differ ({diff})"
            torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=EXACT_MASK_ATOL,
                                       msg=f"image {i}: masks (exact mode)")
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-2)
        assert mask_iou(a["masks"] > 0.5, b["masks"] > 0.5).min() >= 0.99, f"image {i}"
    assert len(torch.cat([r["labels"] for r in ref]).unique()) > 1, "one class only"


@pytest.mark.slow
@pytest.mark.parametrize("name", [V1, V2])
@pytest.mark.parametrize("fuse_bn", [False, True], ids=["exact", "fast"])
def test_zoo_entry_end_to_end(tv_models, hub, tmp_path, monkeypatch, capsys, name, fuse_bn):
    tv = tv_models[name]
    entry = _publish(tmp_path, monkeypatch, name, tv.state_dict())
    model = MaskRCNN(pretrained=name, fuse_bn=fuse_bn, **SMALL).eval()
    assert (hub / entry.filename).is_file(), "not cached under the published file name"
    assert not [p for p in hub.iterdir() if "partial" in p.name]
    assert model.num_classes == 90 and model.categories[1] == ("person", 1)
    assert model.categories[12] == ("N/A", 12)
    assert model.transform.min_size == 320, "test-time overrides must apply over the preset"
    with torch.no_grad():
        _assert_same_detections(model(_images()), tv(_images()), exact=not fuse_bn)
    # A second build takes the verified cached file (the source may be gone).
    (tmp_path / entry.filename).unlink()
    again = MaskRCNN(pretrained=name, fuse_bn=fuse_bn, **SMALL)
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key


def test_local_torchvision_state_dict_with_preset(tv_models, tmp_path, capsys):
    tv = tv_models[V2]
    path = tmp_path / "v2.pth"
    torch.save(tv.state_dict(), path)
    model = MaskRCNN(pretrained=str(path), config=zoo.ZOO[V2].preset, **SMALL).eval()
    with torch.no_grad():
        _assert_same_detections(model(_images()), tv(_images()))


def test_other_num_classes_reinitialises_only_the_predictors(tv_models, tmp_path, capsys):
    tv = tv_models[V1]
    path = tmp_path / "v1.pth"
    torch.save(tv.state_dict(), path)
    model = MaskRCNN(pretrained=str(path), config=zoo.ZOO[V1].preset, num_classes=5)
    assert "num_classes 5 differs from the checkpoint's 90" in capsys.readouterr().err
    assert model.categories is None
    assert model.roi_heads.box_predictor.cls_score.out_features == 6
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 6
    ours = model.state_dict()
    assert torch.equal(ours["backbone.body.layer3.4.conv2.weight"],
                       tv.state_dict()["backbone.body.layer3.4.conv2.weight"])
    assert torch.equal(ours["roi_heads.mask_predictor.conv5_mask.weight"],
                       tv.state_dict()["roi_heads.mask_predictor.conv5_mask.weight"])


def test_wrong_preset_names_the_parameter(tv_models, tmp_path):
    path = tmp_path / "v1.pth"
    torch.save(tv_models[V1].state_dict(), path)
    with pytest.raises(ValueError, match="does not fit|has shape") as err:
        MaskRCNN(pretrained=str(path), config=zoo.ZOO[V2].preset)
    assert str(path) in str(err.value)


def test_corrupt_cached_file_is_refused(tv_models, hub, tmp_path, monkeypatch):
    entry = _publish(tmp_path, monkeypatch, V1, tv_models[V1].state_dict())
    hub.mkdir(parents=True)
    (hub / entry.filename).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(zoo.ChecksumError, match="sha256"):
        MaskRCNN(pretrained=V1)


def test_offline_names_url_and_path(hub, monkeypatch):
    monkeypatch.setenv("MASKRCNN_OFFLINE", "1")
    entry = zoo.ZOO[V2]
    with pytest.raises(FileNotFoundError) as err:
        MaskRCNN(pretrained=V2)
    assert entry.url in str(err.value) and str(hub / entry.filename) in str(err.value)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _Evil()}}))
    with pytest.raises(zoo.UnsafeCheckpointError, match="model_final.pkl"):
        MaskRCNN(pretrained=str(path), config=zoo.ZOO["detectron2/mask_rcnn_R_50_FPN_3x"].preset)
    assert "must never run" not in capsys.readouterr().out


def test_coco_resolves_per_backbone_and_rejects_conflicts():
    assert zoo.resolve_name("coco", "resnet101").name == "detectron2/mask_rcnn_R_101_FPN_400ep_LSJ"
    assert zoo.resolve_name("coco", "resnet50").name == "detectron2/mask_rcnn_R_50_FPN_400ep_LSJ"
    assert zoo.resolve_name("coco", "resnext101").name == "detectron2/mask_rcnn_X_101_32x8d_FPN_3x"
    with pytest.raises(ValueError, match="resnet18"):
        MaskRCNN(pretrained="coco", backbone="resnet18")
    with pytest.raises(ValueError, match="conflicts"):
        MaskRCNN(pretrained="detectron2/mask_rcnn_R_50_FPN_3x", backbone="resnet101")


def test_cli_predict_and_zoo_with_a_zoo_name(tv_models, hub, tmp_path, monkeypatch, capsys):
    from PIL import Image
    from engine.cli import main
    from engine.predict import load_model
    entry = _publish(tmp_path, monkeypatch, V1, tv_models[V1].state_dict())
    image = (_images()[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "photo.png")
    sets = ["--set", "min_size=320", "max_size=512", "box_detections_per_img=20"]
    assert main(["predict", "--weights", V1, str(tmp_path / "photo.png"), "--out",
                 str(tmp_path / "out"), "--no-progress", *sets]) == 0
    results = __import__("json").loads((tmp_path / "out" / "results.json").read_text())
    assert results and all(1 <= r["category_id"] <= 90 for r in results)
    _, meta = load_model(V1, overrides={"min_size": 320})
    assert meta["class_names"][0] == "person" and meta["cat_ids"][:2] == [1, 2]
    capsys.readouterr()
    assert main(["zoo"]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith(V1 + " "))
    assert row.split()[1:] == ["37.9", "34.6", "yes"], row
    assert entry.filename and "detectron2/mask_rcnn_R_101_FPN_400ep_LSJ" in listing
