"""MaskRCNN.forward on malformed and edge-case inputs.

Every input either raises a ValueError that names the image (or target) index, the
problem and the fix, or gives a correct result of the documented structure: boxes
Tensor[D, 4] finite and inside the original image, scores in [0, 1], labels in 1..K,
masks Tensor[D, 1, H, W] at the ORIGINAL image size. Never an internal error, never a
non-finite output.
Shapes: K object classes, D detections.
"""
import copy

import pytest
import torch

from maskrcnn import MaskRCNN

torch.set_num_threads(2)
K = 3
MAX_DETS = 20
SMALL = dict(backbone="resnet18", fpn_channels=32, min_size=64, max_size=128,
             representation_size=64, mask_layers="32,", mask_dim_reduced=32,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
             box_detections_per_img=MAX_DETS, norm="bn")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MaskRCNN(num_classes=K, **SMALL).eval()


def _image(h=40, w=50, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _target(h=40, w=50, **replace):
    target = {"boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0], [10.0, 5.0, 45.0, 35.0]]),
              "labels": torch.tensor([1, 2]),
              "masks": torch.zeros(2, h, w, dtype=torch.uint8)}
    target["masks"][0, 3:30, 2:20] = 1
    target["masks"][1, 5:35, 10:45] = 1
    return {**target, **replace}


def _with_nan(image, value=float("nan")):
    image = image.clone()
    image[1, 5, 7] = value
    return image


def _check_detections(out, sizes):
    """The documented eval output: one dict per image, finite, of the original size. Every
    image must have at least one detection: the checks below loop over detections, and
    on none they would check nothing (the random model scores every class ~1/(K + 1),
    far above the 0.05 threshold, so every image does get some)."""
    assert isinstance(out, list) and len(out) == len(sizes)
    for i, (det, (h, w)) in enumerate(zip(out, sizes)):
        boxes, scores, labels, masks = det["boxes"], det["scores"], det["labels"], det["masks"]
        d = len(boxes)
        assert 1 <= d <= MAX_DETS, f"image {i}: {d} detections (none: the checks are vacuous)"
        assert boxes.shape == (d, 4) and boxes.dtype == torch.float32, (i, boxes.shape)
        assert scores.shape == (d,) and labels.shape == (d,) and labels.dtype == torch.int64
        assert masks.shape == (d, 1, h, w), f"image {i}: masks {tuple(masks.shape)}"
        for name, t in det.items():
            assert torch.isfinite(t).all(), f"image {i}: non-finite {name}"
        assert ((scores >= 0) & (scores <= 1)).all(), f"image {i}: scores {scores}"
        assert ((labels >= 1) & (labels <= K)).all(), f"image {i}: labels {labels}"
        assert ((masks >= 0) & (masks <= 1)).all(), f"image {i}: mask values"
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all(), f"image {i}: {boxes}"
        assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all(), \
            f"image {i}: boxes outside {w}x{h}: {boxes}"
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


def _run(model, images, targets=None):
    with torch.no_grad():
        return model(images, targets)


# ------------------------------------------------------------------- malformed input

def _bad_cases():
    """(id, images, targets, regex on the message); the regex names the index."""
    img = _image()
    rgb = "expected RGB floats in \\[0, 1\\]"
    return [
        # what `images` is
        ("3-D tensor, not a list", img, None, "images must be a list.*model\\(\\[image\\]\\)"),
        ("4-D batch tensor", img[None].repeat(2, 1, 1, 1), None,
         "images must be a list.*Tensor\\[2, 3, 40, 50\\].*list\\(images\\)"),
        ("dict", {"image": img}, None, "images must be a list.*dict"),
        ("None", None, None, "images must be a list.*NoneType"),
        # list entries
        ("None entry", [img, None], None, "image 1: expected a Tensor\\[3, H, W\\].*NoneType"),
        ("string entry", ["x"], None, "image 0: expected a Tensor.*str"),
        ("list entry", [img.tolist()], None, "image 0: expected a Tensor.*list"),
        ("numpy entry", [img.numpy()], None, "image 0: expected a Tensor.*ndarray"),
        ("batched entry", [img, img[None]], None,
         "image 1: expected a 3-D Tensor\\[3, H, W\\], got shape \\(1, 3, 40, 50\\).*list"),
        ("2-D image", [torch.rand(40, 50)], None, "image 0: expected a 3-D.*expand"),
        ("1-D image", [torch.rand(50)], None, "image 0: expected a 3-D"),
        ("0-D image", [torch.tensor(0.5)], None, "image 0: expected a 3-D"),
        ("1 channel", [img, torch.rand(1, 40, 50)], None,
         "image 1: expected 3 channels.*expand\\(3, -1, -1\\)"),
        ("4 channels", [img, torch.rand(4, 40, 50)], None, "image 1: expected 3 channels.*\\[:3\\]"),
        ("channels last", [torch.rand(40, 50, 3)], None,
         "image 0: expected 3 channels.*permute\\(2, 0, 1\\)"),
        ("zero height", [img, torch.rand(3, 0, 50)], None, "image 1: .*empty.*at least 1"),
        ("zero width", [torch.rand(3, 40, 0)], None, "image 0: .*empty.*at least 1"),
        ("zero both", [torch.rand(3, 0, 0)], None, "image 0: .*empty"),
        ("sparse", [img.to_sparse()], None, "image 0: .*sparse.*to_dense"),
        # dtypes
        ("uint8", [(img * 255).to(torch.uint8)], None, f"image 0: {rgb}.*uint8.*/ 255"),
        ("int64", [img, (img * 255).long()], None, f"image 1: {rgb}.*int64"),
        ("int32 0/1", [img.round().int()], None, f"image 0: {rgb}.*int32"),
        ("bool", [img > 0.5], None, f"image 0: {rgb}.*bool"),
        ("complex", [img.to(torch.complex64)], None, f"image 0: {rgb}.*complex64"),
        # values
        ("all NaN", [torch.full((3, 40, 50), float("nan"))], None,
         f"image 0: 6000 NaN values out of 6000.*{rgb}"),
        ("one NaN", [img, _with_nan(img)], None, f"image 1: 1 NaN values.*{rgb}"),
        ("+inf", [_with_nan(img, float("inf"))], None, f"image 0: 1 infinite values.*{rgb}"),
        ("-inf", [_with_nan(img, -float("inf"))], None, f"image 0: 1 infinite values.*{rgb}"),
        ("NaN float16", [_with_nan(img).half()], None, "image 0: 1 NaN"),
        ("0-255 floats", [img, img * 255], None,
         f"image 1: values span \\[.*, 2.*\\], {rgb}.*divide by 255"),
        ("0-255 float64", [(img * 255).double()], None, f"image 0: values span.*{rgb}.*255"),
        ("mean/std normalised", [(img - 0.45) / 0.225], None,
         f"image 0: values span \\[-.*{rgb}.*normalises"),
        ("negative", [img - 1], None, f"image 0: values span \\[-.*{rgb}"),
        ("huge float64", [_with_nan(img.double(), 1e300)], None, f"image 0: values span.*{rgb}"),
        # devices
        ("other device", [img, img.to("meta")], None,
         "image 1: on meta but the model is on cpu.*to\\('cpu'\\)"),
        # targets in eval mode (a validation loss)
        ("targets a dict", [img], _target(), "targets must be a list.*dict"),
        ("targets count", [img, img], [_target()], "2 images but 1 targets.*one target"),
        ("target None", [img], [None], "target 0: expected a dict.*NoneType"),
        ("target a tensor", [img], [torch.zeros(2, 4)], "target 0: expected a dict.*Tensor"),
        ("boxes a list", [img], [_target(boxes=[[2.0, 3.0, 20.0, 30.0]] * 2)],
         "target 0: boxes must be a Tensor.*list"),
        ("labels a list", [img], [_target(labels=[1, 2])], "target 0: labels must be a Tensor"),
        ("masks None", [img], [_target(masks=None)], "target 0: masks must be a Tensor"),
        ("boxes 1-D", [img], [_target(boxes=torch.tensor([2.0, 3.0, 20.0, 30.0]))],
         "target 0: boxes must be a float Tensor\\[M, 4\\]"),
        ("boxes int", [img], [_target(boxes=torch.tensor([[2, 3, 20, 30], [1, 1, 9, 9]]))],
         "target 0: boxes must be a float"),
        ("boxes NaN", [img, img], [_target(), _target(boxes=torch.tensor(
            [[2.0, 3.0, 20.0, 30.0], [1.0, float("nan"), 9.0, 9.0]]))],
         "target 1: box 1 .* is not finite"),
        ("boxes inf", [img], [_target(boxes=torch.tensor(
            [[2.0, 3.0, float("inf"), 30.0], [1.0, 1.0, 9.0, 9.0]]))],
         "target 0: box 0 .* is not finite"),
        ("x2 < x1", [img], [_target(boxes=torch.tensor([[10.0, 5, 30, 20], [30, 5, 10, 20]]))],
         "target 0: box 1 .*x2 <= x1"),
        ("labels float", [img], [_target(labels=torch.tensor([1.0, 2.0]))],
         "target 0: labels must be an int64"),
        ("label 0", [img], [_target(labels=torch.tensor([0, 1]))], "target 0: labels must be in 1..3"),
        ("masks 0/255", [img], [_target(masks=_target()["masks"] * 255)],
         "target 0: masks must be 0/1.*255"),
        ("masks size", [img], [_target(masks=torch.zeros(2, 40, 51, dtype=torch.uint8))],
         "target 0: masks must be Tensor\\[M, 40, 50\\]"),
        ("masks 2-D", [img], [_target(masks=torch.ones(40, 50, dtype=torch.uint8))],
         "target 0: masks must be Tensor\\[M, 40, 50\\].*\\(40, 50\\)"),
        ("masks complex", [img], [_target(masks=_target()["masks"].to(torch.complex64))],
         "target 0: masks must be 0/1.*complex64"),
        ("no objects as 1-D", [img], [_target(boxes=torch.zeros(0), labels=torch.zeros(
            0, dtype=torch.int64), masks=torch.zeros(0, 40, 50, dtype=torch.uint8))],
         "target 0: boxes must be a float Tensor\\[M, 4\\], got \\(0,\\).*zeros\\(0, 4\\)"),
        ("count", [img], [_target(labels=torch.tensor([1]))], "target 0: count mismatch"),
        ("missing masks", [img], [{"boxes": _target()["boxes"], "labels": _target()["labels"]}],
         "target 0: missing \\['masks'\\]"),
        ("target on other device", [img], [_target(labels=torch.tensor([1, 2], device="meta"))],
         "target 0: labels on meta but image 0 is on cpu"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_malformed_input_raises_value_error(model, case):
    _, images, targets, message = case
    with pytest.raises(ValueError, match=message):
        _run(model, images, targets)


@pytest.mark.parametrize("case", [c for c in _bad_cases() if c[2] is not None],
                         ids=[c[0] for c in _bad_cases() if c[2] is not None])
def test_malformed_targets_raise_in_training_mode_too(model, case):
    _, images, targets, message = case
    with pytest.raises(ValueError, match=message):
        copy.deepcopy(model).train()(images, targets)


# ------------------------------------------------------------------- valid edge input

@pytest.mark.parametrize("size", [(1, 1), (1, 2), (8, 2000), (2000, 8), (1, 5000), (40, 50)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_extreme_sizes_give_finite_detections_of_the_original_size(model, size):
    out = _run(model, [_image(*size)])
    _check_detections(out, [size])


def test_batch_of_mixed_sizes_dtypes_and_extremes(model):
    images = [_image(40, 50), _image(1, 1, seed=1).double(), _image(8, 2000, seed=2).half(),
              _image(33, 17, seed=3).bfloat16()]
    out = _run(model, images)
    _check_detections(out, [tuple(img.shape[-2:]) for img in images])
    assert sum(len(d["boxes"]) for d in out) > 0, "no detections at all: the checks are vacuous"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_compute_in_the_weights_dtype(model, dtype):
    """float64 / float16 / bfloat16 images are converted to the model's dtype: the result
    is the float32 image's (up to the input's own rounding).

    The reference is the same image converted to float32 by the test, so the input's own
    rounding is the same on both sides. The tolerance that leaves for each dtype is zero:
    float16 and bfloat16 values are all float32 values, and a float64 image made from a
    float32 one converts back exactly, so converting first (what the model promises)
    gives the float32 computation to the bit; any arithmetic in the input dtype before
    the conversion (a float16 normalisation, a bfloat16 resize) would not."""
    image = _image().to(dtype)
    # the dtype's own rounding: at most half an ulp of 1.0 (values in [0, 1]), and exact
    # in float32, so the reference sees the very values the model gets after conversion
    assert (image.float() - _image()).abs().max() <= torch.finfo(dtype).eps / 2
    assert torch.equal(image.float().to(dtype), image)
    out = _run(model, [image])
    ref = _run(model, [image.float()])
    _check_detections(out, [(40, 50)])
    assert len(ref[0]["boxes"]) > 0, "the reference made no detections: vacuous"
    assert len(out[0]["boxes"]) == len(ref[0]["boxes"]), dtype
    for key in ("boxes", "scores", "labels", "masks"):
        assert out[0][key].dtype == ref[0][key].dtype, (dtype, key)
        assert torch.equal(out[0][key], ref[0][key]), f"{dtype}: {key} differ"


def test_values_exactly_0_and_1_and_constant_images(model):
    image = _image().round()                       # only 0.0 and 1.0
    assert image.min() == 0 and image.max() == 1
    images = [image, torch.zeros(3, 40, 50), torch.ones(3, 30, 20)]
    _check_detections(_run(model, images), [(40, 50), (40, 50), (30, 20)])


def test_small_rounding_overshoot_is_accepted(model):
    """Bicubic resampling overshoots [0, 1] a little; that is not the 0-255 mistake."""
    image = (_image() * 1.1 - 0.05)                # [-0.05, 1.05]
    _check_detections(_run(model, [image]), [(40, 50)])


def test_tuple_and_non_contiguous_images(model):
    image = _image(50, 40).transpose(1, 2)         # [3, 40, 50], not contiguous
    ref = _run(model, [image.contiguous()])
    out = _run(model, (image,))
    _check_detections(out, [(40, 50)])
    torch.testing.assert_close(out[0]["boxes"], ref[0]["boxes"])
    expanded = torch.rand(1, 40, 50).expand(3, -1, -1)    # grayscale made RGB, stride 0
    _check_detections(_run(model, [expanded]), [(40, 50)])


def test_eval_with_valid_targets_returns_detections_and_finite_losses(model):
    images = [_image(), _image(8, 2000, seed=1)]
    wide = {"boxes": torch.tensor([[10.0, 1.0, 900.0, 7.0]]), "labels": torch.tensor([3]),
            "masks": torch.zeros(1, 8, 2000, dtype=torch.uint8)}
    wide["masks"][0, 1:7, 10:900] = 1
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 40, 50, dtype=torch.bool)}
    for targets in ([_target(), wide], [empty, wide]):
        detections, losses = _run(model, images, targets)
        _check_detections(detections, [(40, 50), (8, 2000)])
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box",
                               "loss_mask"}
        for name, value in losses.items():
            assert torch.isfinite(value), f"{name} = {value}"


def test_training_step_on_extreme_sizes(model):
    """The size fix holds in training mode too (masks resized with the image)."""
    wide = {"boxes": torch.tensor([[10.0, 1.0, 900.0, 7.0]]), "labels": torch.tensor([3]),
            "masks": torch.zeros(1, 8, 2000, dtype=torch.uint8)}
    wide["masks"][0, 1:7, 10:900] = 1
    trained = copy.deepcopy(model).train()        # BatchNorm statistics change
    losses = trained([_image(8, 2000), _image()], [wide, _target()])
    assert all(torch.isfinite(v) for v in losses.values()), losses


def test_inputs_are_not_modified(model):
    image = _image().double()
    before = image.clone()
    targets = [_target()]
    boxes = targets[0]["boxes"].clone()
    _run(model, [image], targets)
    assert image.dtype == torch.float64 and torch.equal(image, before)
    assert torch.equal(targets[0]["boxes"], boxes)


def test_empty_list_gives_no_detections(model):
    with torch.no_grad():
        assert model([]) == []
    model.train()
    try:
        with pytest.raises(ValueError, match="images is empty"):
            model([], [])
    finally:
        model.eval()
