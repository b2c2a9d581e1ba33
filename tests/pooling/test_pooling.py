"""pooling.RoIAlign / MultiScaleRoIAlign against torchvision.ops.RoIAlign /
MultiScaleRoIAlign (the oracle), forward and gradients, on the native library and the
fallback; the level rules against hand-computed levels."""
from collections import OrderedDict

import pytest
import torch
import torchvision

from libs import ops
from pooling import MultiScaleRoIAlign, RoIAlign, level_scales, map_levels
from tests.libs.conftest import require_native

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
NAMES = ["p2", "p3", "p4", "p5"]
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def pyramid(g, image_sizes, channels, dtype, device, divisor=32):
    """P2..P5 (strides 4..32) of the padded batch: the max (h, w), rounded up to 32."""
    hp = -(-max(h for h, _ in image_sizes) // divisor) * divisor
    wp = -(-max(w for _, w in image_sizes) // divisor) * divisor
    return [torch.randn(len(image_sizes), channels, hp // s, wp // s, generator=g,
                        dtype=dtype).to(device) for s in (4, 8, 16, 32)]


def random_boxes(g, n, h, w, dtype):
    """n boxes with log-uniform sides 1..2000 px (every level, and beyond both ends),
    mostly inside an h x w image, some crossing its border."""
    side = torch.exp(torch.rand(n, 2, generator=g, dtype=torch.float64) * 7.6)
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * (w * 1.1) - 0.05 * w
    y1 = torch.rand(n, generator=g, dtype=torch.float64) * (h * 1.1) - 0.05 * h
    return torch.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], 1).to(dtype)


def tolerance(dtype, kernel_backend, device) -> dict:
    """TOL, looser for the pure-PyTorch fallback in float32 on CUDA: PyTorch's CUDA ops
    round differently from the CPU oracle (up to 3e-5 off on an H200, on far-out boxes);
    the native CUDA kernel meets the CPU tolerance."""
    if kernel_backend == "fallback" and device.type == "cuda" and dtype != torch.float64:
        return dict(atol=1e-4, rtol=1e-4)
    return TOL[dtype]


def torchvision_pool(features, boxes, image_sizes, output_size, sampling_ratio):
    """torchvision's pooler run on the CPU, result on the features' device: its CUDA
    kernel is built with FMA contraction, which moves far-out sample points by an ulp
    (values ~2e-5 off); ours are built without, like the CPU oracle."""
    tv = torchvision.ops.MultiScaleRoIAlign(NAMES[:len(features)], output_size, sampling_ratio)
    out = tv(OrderedDict(zip(NAMES, [f.cpu() for f in features])), [b.cpu() for b in boxes],
             image_sizes)
    return out.to(features[0].device)


def grads(fn, features, weight):
    leaves = [f.detach().clone().requires_grad_() for f in features]
    out = fn(leaves)
    (out * weight).sum().backward()
    return out.detach(), [f.grad for f in leaves]


CASES = [
    # image sizes (h, w) of the batch, boxes per image
    ([(480, 640)], [60]),
    ([(512, 600), (480, 640), (300, 420)], [40, 0, 25]),   # an image without boxes
    ([(256, 320), (200, 330)], [0, 0]),                      # no boxes at all
    ([(333, 500), (500, 333), (400, 400), (128, 96)], [30, 17, 0, 9]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_multiscale_matches_torchvision(kernel_backend, device, dtype, case):
    image_sizes, counts = CASES[case]
    for seed in (0, 1):
        g = torch.Generator().manual_seed(10 * case + seed)
        features = pyramid(g, image_sizes, 6, dtype, device)
        boxes = [random_boxes(g, n, h, w, dtype).to(device)
                 for n, (h, w) in zip(counts, image_sizes)]
        output_size, sr = [(7, 7), (14, 14), (3, 5)][seed + case % 2], [2, 0, -1][case % 3]
        weight = torch.randn((sum(counts), 6) + output_size, generator=g, dtype=dtype)
        weight = weight.to(device)
        ours = MultiScaleRoIAlign(output_size, sr)
        expected, expected_grads = grads(
            lambda f: torchvision_pool(f, boxes, image_sizes, output_size, sr), features, weight)
        got, got_grads = grads(lambda f: ours(f, boxes, image_sizes), features, weight)
        msg = f"seed={10 * case + seed} sizes={image_sizes} counts={counts}"
        assert got.shape == (sum(counts), 6) + output_size, msg
        tol = tolerance(dtype, kernel_backend, device)
        torch.testing.assert_close(got, expected, **tol, msg=msg)
        for level, (a, b) in enumerate(zip(got_grads, expected_grads, strict=True)):
            torch.testing.assert_close(a, b, **tol, msg=f"{msg} grad of P{level + 2}")


@pytest.mark.parametrize("seed", [40, 41])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multiscale_half_features_under_autocast_boxes(kernel_backend, device, dtype, seed):
    """Half features (autocast) with float32 boxes: pooled in float32 from the unrounded
    boxes, result and feature gradients in the features' dtype; the oracle is
    torchvision's pooler on the float32 maps, rounded to the dtype."""
    g = torch.Generator().manual_seed(seed)
    image_sizes = [(800, 1066), (640, 900)]
    features = [f.to(dtype) for f in pyramid(g, image_sizes, 4, torch.float32, device)]
    boxes = [random_boxes(g, n, h, w, torch.float32).to(device)
             for n, (h, w) in zip((30, 20), image_sizes)]
    weight = torch.randn(50, 4, 7, 7, generator=g).to(device, dtype)
    got, got_grads = grads(lambda f: MultiScaleRoIAlign(7, 2)(f, boxes, image_sizes),
                           features, weight)
    expected, expected_grads = grads(
        lambda f: torchvision_pool(f, boxes, image_sizes, (7, 7), 2),
        [f.float() for f in features], weight)
    assert got.dtype == dtype and all(gr.dtype == dtype for gr in got_grads)
    # float32 results may differ in the last bit, so the rounding to half by one step
    base = tolerance(torch.float32, kernel_backend, device)
    tol = dict(atol=base["atol"], rtol=max(base["rtol"], torch.finfo(dtype).eps))
    torch.testing.assert_close(got, expected.to(dtype), **tol, msg=f"seed={seed}")
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b.to(dtype), **tol, msg=f"seed={seed} grad")


def test_multiscale_every_level_used(kernel_backend):
    """The fuzz boxes above do reach every level, including clamps at both ends."""
    g = torch.Generator().manual_seed(4)
    boxes = [random_boxes(g, 200, 480, 640, torch.float32)]
    raw = torch.floor(4 + torch.log2(torch.sqrt(
        (boxes[0][:, 2] - boxes[0][:, 0]) * (boxes[0][:, 3] - boxes[0][:, 1])) / 224) + 1e-6)
    assert (raw < 2).any() and (raw > 5).any()
    levels = map_levels(boxes, 2, 5, 224, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}


def test_multiscale_compiles_fullgraph(kernel_backend, device):
    """The multi-level op has a fake kernel and no host sync: torch.compile traces the
    whole module (forward and backward) without a graph break."""
    torch._dynamo.reset()
    image_sizes = [(300, 400), (256, 256)]
    g = torch.Generator().manual_seed(21)
    features = pyramid(g, image_sizes, 4, torch.float32, device)
    boxes = [random_boxes(g, n, h, w, torch.float32).to(device)
             for n, (h, w) in zip((20, 11), image_sizes)]
    weight = torch.randn(31, 4, 7, 7, generator=g).to(device)
    pool = MultiScaleRoIAlign(7, 2)
    compiled = torch.compile(lambda f: pool(f, boxes, image_sizes), backend="aot_eager",
                             fullgraph=True)
    expected, eg = grads(lambda f: torchvision_pool(f, boxes, image_sizes, (7, 7), 2),
                         features, weight)
    got, gg = grads(compiled, features, weight)
    tol = tolerance(torch.float32, kernel_backend, device)
    torch.testing.assert_close(got, expected, **tol)
    for a, b in zip(gg, eg, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_multilevel_op_opcheck_and_gradgradcheck(kernel_backend, device, one_thread):
    g = torch.Generator().manual_seed(22)
    feats = [torch.randn(2, 2, 6, 5, generator=g, dtype=torch.float64).to(device),
             torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64).to(device)]
    rois = torch.tensor([[0, 1, 1, 20, 16], [1, 0, 2, 9, 9], [1, 4, 4, 30, 24],
                         [0, 2, 3, 5, 7]], dtype=torch.float64, device=device)
    levels = torch.tensor([1, 0, 1, 0], device=device)
    args = (feats, rois, levels, [0.25, 0.125], 3, 2, 2, True)
    torch.library.opcheck(ops.roi_align_multilevel, args)
    leaves = [f.clone().requires_grad_() for f in feats]
    fn = lambda a, b: ops.roi_align_multilevel([a, b], *args[1:])  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves))
    # Every row equals single-level torchvision RoIAlign on its level (on every torch).
    out = fn(*feats)
    for k in range(4):
        lvl = int(levels[k])
        exp = torchvision.ops.roi_align(feats[lvl], rois[k:k + 1], (3, 2), args[3][lvl], 2,
                                        True)
        torch.testing.assert_close(out[k:k + 1], exp, **TOL[torch.float64])
    if TORCH_VERSION < (2, 14):
        # torch 2.11's custom-op autograd appends a None to the backward's grads when the
        # op returns a tensor list, then rejects the count (seen on 2.11; 2.14 works).
        pytest.skip(f"gradgradcheck: torch {torch.__version__} < 2.14 cannot double-"
                    "differentiate a custom op returning a tensor list (the rest ran)")
    assert torch.autograd.gradgradcheck(fn, tuple(leaves))


def test_single_level_and_aligned(kernel_backend, device):
    """One level: plain RoIAlign at the inferred scale. aligned=True (absent from
    torchvision's module): each box pooled with torchvision.ops.roi_align at its level."""
    image_sizes = [(320, 480), (300, 450)]
    g = torch.Generator().manual_seed(8)
    features = pyramid(g, image_sizes, 3, torch.float64, device)
    boxes = [random_boxes(g, n, h, w, torch.float64).to(device)
             for n, (h, w) in zip((15, 12), image_sizes)]
    got = MultiScaleRoIAlign(5, 2)(features[1:2], boxes, image_sizes)
    expected = torchvision_pool(features[1:2], boxes, image_sizes, (5, 5), 2)
    torch.testing.assert_close(got, expected, **TOL[torch.float64])

    got = MultiScaleRoIAlign(5, 2, aligned=True)(features, boxes, image_sizes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype,
                                            device=device), b], 1)
                      for i, b in enumerate(boxes)])
    side = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.clamp(torch.floor(4 + torch.log2(side / 224) + 1e-6), 2, 5).long() - 2
    for r in range(rois.shape[0]):
        lvl = int(levels[r])
        exp = torchvision.ops.roi_align(features[lvl], rois[r:r + 1], 5, 1 / 2 ** (lvl + 2), 2,
                                        True)
        torch.testing.assert_close(got[r:r + 1], exp, **TOL[torch.float64], msg=f"row {r}")


def side_boxes(sides):
    """Squares with the given sides (float64, so the eps cases are exact enough)."""
    s = torch.tensor(sides, dtype=torch.float64)
    return torch.stack([torch.zeros_like(s), torch.zeros_like(s), s, s], 1)


# side -> level, by hand: floor(4 + log2(side / 224)) clamped to 2..5. The two rules only
# differ just below a power-of-two boundary: side = 224 * 2**-5e-7 has log2 = -5e-7, so
# torchvision's +1e-6 after the log lifts it to 4; detectron2's +1e-8 inside does not.
NEAR = 224 * 2 ** -5e-7
HAND = [(1.0, 2, 2), (56.0, 2, 2), (111.9, 2, 2), (112.0, 3, 3), (223.0, 3, 3),
        (224.0, 4, 4), (NEAR, 4, 3), (447.9, 4, 4), (448.0, 5, 5), (NEAR * 2, 5, 4),
        (3000.0, 5, 5)]


def test_level_rules_hand_computed():
    boxes = [side_boxes([s for s, _, _ in HAND[:4]]), side_boxes([s for s, _, _ in HAND[4:]])]
    tv = map_levels(boxes, 2, 5, 224, 4, "torchvision")
    d2 = map_levels(boxes, 2, 5, 224, 4, "detectron2")
    assert tv.tolist() == [lv - 2 for _, lv, _ in HAND]
    assert d2.tolist() == [lv - 2 for _, _, lv in HAND]
    # canonical 112 -> P4 moves everything one level up (clamped at P5).
    assert map_levels([side_boxes([56.0, 112.0, 224.0, 448.0])], 2, 5, 112, 4).tolist() == \
        [1, 2, 3, 3]


def test_detectron2_rule_pools_from_its_level(kernel_backend, device):
    sides = [s for s, _, _ in HAND]
    boxes = [side_boxes(sides).to(device)]
    image_sizes = [(3008, 3008)]
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(1, 2, 3008 // s, 3008 // s, generator=g, dtype=torch.float64)
                .to(device) for s in (4, 8, 16, 32)]
    got = MultiScaleRoIAlign(3, 1, level_rule="detectron2")(features, boxes, image_sizes)
    for r, (side, _, level) in enumerate(HAND):
        roi = torch.tensor([[0, 0, 0, side, side]], dtype=torch.float64, device=device)
        exp = torchvision.ops.roi_align(features[level - 2], roi, 3, 1 / 2 ** level, 1)
        torch.testing.assert_close(got[r:r + 1], exp, **TOL[torch.float64], msg=f"side={side}")


def test_level_scales_rule():
    # 2 ** round(log2(feature_h / max image h)); padding (800 -> 832) does not matter.
    sizes = [(200, 336), (100, 168), (50, 84), (25, 42)]
    assert level_scales(sizes, [(800, 1333), (640, 1000)]) == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert level_scales([(208, 336)], [(800, 1333)]) == [1 / 4]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"level_rule must be 'torchvision' or "
                                         r"'detectron2', got 'fpn'"):
        MultiScaleRoIAlign(7, 2, level_rule="fpn")
    with pytest.raises(ValueError, match="level_rule must be"):
        map_levels([side_boxes([10.0])], 2, 5, 224, 4, "area")
    pool = MultiScaleRoIAlign(7, 2)
    with pytest.raises(ValueError, match="features must be a non-empty list"):
        pool([], [side_boxes([10.0])], [(64, 64)])
    with pytest.raises(ValueError, match="image_sizes"):
        pool([torch.zeros(1, 1, 16, 16)], [side_boxes([10.0]).float()], [])
    with pytest.raises(ValueError, match=r"boxes\[0\] must be a Tensor\[L, 4\]"):
        pool([torch.zeros(1, 1, 16, 16)], [torch.zeros(3, 5)], [(64, 64)])


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_module_matches_torchvision(kernel_backend, device, aligned):
    g = torch.Generator().manual_seed(30)
    x = torch.randn(3, 5, 40, 52, generator=g).to(device)
    boxes = [random_boxes(g, n, 160, 208, torch.float32).to(device) for n in (9, 0, 14)]
    ours = RoIAlign((4, 6), 0.25, 2, aligned)
    tv = torchvision.ops.RoIAlign((4, 6), 0.25, 2, aligned)
    weight = torch.randn(23, 5, 4, 6, generator=g).to(device)
    for rois in (boxes, torchvision.ops._utils.convert_boxes_to_roi_format(boxes)):
        expected, (eg,) = grads(lambda f: tv(f[0], rois), [x], weight)
        got, (gg,) = grads(lambda f: ours(f[0], rois), [x], weight)
        torch.testing.assert_close(got, expected, **TOL[torch.float32])
        torch.testing.assert_close(gg, eg, **TOL[torch.float32])
    assert "spatial_scale=0.25" in repr(ours)


@pytest.mark.parametrize("seed", [50, 51])
@pytest.mark.parametrize("channels", [8, 48])
def test_multiscale_channels_last_features(kernel_backend, device, channels, seed):
    """Channels-last pyramids (what the fused inference convs produce) are pooled as they
    are, on the blocked (C >= 32) and the plain path: same values as torchvision's on the
    NCHW maps, and gradients reach the channels-last features."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(256, 320), (240, 300)]
    features = pyramid(g, sizes, channels, torch.float32, device)
    boxes = [random_boxes(g, n, h, w, torch.float32).to(device)
             for n, (h, w) in zip((300, 200), sizes)]
    weight = torch.randn((500, channels, 7, 7), generator=g).to(device)
    expected, eg = grads(lambda f: torchvision_pool(f, boxes, sizes, (7, 7), 2), features,
                         weight)
    cl = [f.contiguous(memory_format=torch.channels_last) for f in features]
    assert not cl[0].is_contiguous()
    got, gg = grads(lambda f: MultiScaleRoIAlign(7, 2)(f, boxes, sizes), cl, weight)
    tol = tolerance(torch.float32, kernel_backend, device)
    torch.testing.assert_close(got, expected, **tol, msg=f"seed={seed}")
    for a, b in zip(gg, eg, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=f"seed={seed} grad")
    if kernel_backend == "native" and device.type == "cpu":
        # the gradients come back in the maps' layout (no copy in the convs' backward)
        assert all(a.is_contiguous(memory_format=torch.channels_last) for a in gg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multiscale_fused_cpu_kernel_bit_identical(monkeypatch, dtype):
    """C >= 32 and enough RoIs: the native CPU kernel pools all levels in one parallel
    region (levels with too few samples go through the per-level path). The result and
    the gradients equal torchvision's bit for bit, with 1 and 2 threads."""
    monkeypatch.delenv("MASKRCNN_FORCE_FALLBACK", raising=False)
    require_native("cpu")
    cases = [(32, [150, 90], [(512, 640), (480, 600)]), (40, [400, 0, 10],
                                                           [(300, 400), (256, 256), (128, 96)])]
    before = torch.get_num_threads()
    try:
        for seed, (C, counts, sizes) in enumerate(cases):
            g = torch.Generator().manual_seed(500 + seed)
            features = pyramid(g, sizes, C, dtype, "cpu")
            boxes = [random_boxes(g, n, h, w, dtype) for n, (h, w) in zip(counts, sizes)]
            weight = torch.randn((sum(counts), C, 7, 7), generator=g, dtype=dtype)
            expected, eg = grads(lambda f: torchvision_pool(f, boxes, sizes, (7, 7), 2),
                                 features, weight)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                got, gg = grads(lambda f: MultiScaleRoIAlign(7, 2)(f, boxes, sizes), features,
                                weight)
                msg = f"seed={500 + seed} C={C} threads={threads}"
                assert torch.equal(got, expected), msg
                assert all(torch.equal(a, b) for a, b in zip(gg, eg, strict=True)), msg
    finally:
        torch.set_num_threads(before)
