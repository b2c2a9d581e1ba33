"""NMS and batched NMS against torchvision.ops (the oracle): identical kept indices in the
same order, on the native library and the pure-PyTorch fallback.

Random inputs are drawn fresh from seeds; the seed is in every assertion message.
"""
import pytest
import torch
import torchvision

import libs
from libs import ops

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]


def realistic_boxes(g, n, dtype=torch.float32, clusters=True, near_fraction=0.5):
    """n boxes in a 1333 x 800 image, log-uniform sizes 2..400 px, aspect 1/3..3, a
    fraction ``near_fraction`` of them jittered copies of n/20 "objects" (heavy overlap, as
    detectors emit), and uniform scores."""
    cx = torch.rand(n, generator=g, dtype=torch.float64) * 1333
    cy = torch.rand(n, generator=g, dtype=torch.float64) * 800
    size = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * 5.3) * 2
    aspect = torch.exp((torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2.2)
    w, h = size * aspect.sqrt(), size / aspect.sqrt()
    if clusters and n > 1:
        objects = max(1, n // 20)
        src = torch.randint(0, objects, (n,), generator=g)
        near = torch.rand(n, generator=g) < near_fraction
        jitter = lambda v: v[src] * (1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
        cx = torch.where(near, cx[src] + 0.05 * w[src] * torch.randn(n, generator=g,
                                                                      dtype=torch.float64), cx)
        cy = torch.where(near, cy[src] + 0.05 * h[src] * torch.randn(n, generator=g,
                                                                      dtype=torch.float64), cy)
        w = torch.where(near, jitter(w), w).abs()
        h = torch.where(near, jitter(h), h).abs()
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).to(dtype)
    scores = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    return boxes, scores


def assert_same(got, expected, msg):
    """Identical kept indices, same order; the message says where they first differ."""
    got, expected = got.cpu(), expected.cpu()
    assert got.dtype == torch.int64, msg
    if torch.equal(got, expected):
        return
    m = min(got.numel(), expected.numel())
    diff = (got[:m] != expected[:m]).nonzero()
    first = int(diff[0]) if diff.numel() else m
    raise AssertionError(f"{msg}: kept {got.numel()} vs torchvision {expected.numel()}; "
                         f"first difference at position {first}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_random_many_seeds(kernel_backend, device, dtype):
    sizes = [0, 1, 2, 3, 7, 64, 65, 300, 1000, 3000]
    for seed, n in enumerate(sizes * 2):
        if kernel_backend == "fallback" and n > 1000:
            continue  # the fallback's Python loop is slow; 1000 covers several blocks
        g = torch.Generator().manual_seed(seed)
        boxes, scores = realistic_boxes(g, n, dtype, clusters=seed % 2 == 0)
        thr = THRESHOLDS[seed % len(THRESHOLDS)]
        expected = torchvision.ops.nms(boxes, scores, thr)
        got = libs.nms(boxes.to(device), scores.to(device), thr)
        assert_same(got, expected, f"seed={seed} n={n} thr={thr}")


def test_nms_large_any_thread_count(kernel_backend, device):
    """17,000 clustered boxes (several compactions of the alive list in the native
    kernel); the same result with 1 and 2 torch threads. (The fallback's Python loop runs
    a smaller case.)"""
    n = 17000 if kernel_backend == "native" else 2000
    g = torch.Generator().manual_seed(42)
    boxes, scores = realistic_boxes(g, n, near_fraction=0.95)  # few survivors: torchvision is quick
    expected = torchvision.ops.nms(boxes, scores, 0.5)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = libs.nms(boxes.to(device), scores.to(device), 0.5)
            assert_same(got, expected, f"n={n} threads={threads}")
    finally:
        torch.set_num_threads(before)


def test_nms_exact_duplicates_and_ties(kernel_backend, device):
    g = torch.Generator().manual_seed(3)
    boxes, _ = realistic_boxes(g, 200)
    boxes = torch.cat([boxes, boxes, boxes[:50]])  # exact duplicates
    # Four score levels: many ties, broken by index (stable order) in both libraries.
    scores = torch.randint(0, 4, (boxes.shape[0],), generator=g).float()
    for thr in THRESHOLDS:
        expected = torchvision.ops.nms(boxes, scores, thr)
        got = libs.nms(boxes.to(device), scores.to(device), thr)
        assert_same(got, expected, f"thr={thr}")
    # All scores equal: kept boxes come out in index order.
    same = torch.ones(boxes.shape[0])
    got = libs.nms(boxes.to(device), same.to(device), 0.5).cpu()
    assert_same(got, torchvision.ops.nms(boxes, same, 0.5), "equal scores")
    assert torch.equal(got, got.sort().values)


def test_nms_all_and_none_suppressed(kernel_backend, device):
    # All suppressed: 50 copies of one box keep only the best-scored one.
    box = torch.tensor([[10.0, 20.0, 110.0, 70.0]]).repeat(50, 1)
    scores = torch.rand(50, generator=torch.Generator().manual_seed(0))
    got = libs.nms(box.to(device), scores.to(device), 0.5).cpu()
    assert got.tolist() == [int(scores.argmax())]
    assert_same(got, torchvision.ops.nms(box, scores, 0.5), "all suppressed")
    # None suppressed: a grid of disjoint boxes keeps everything, by descending score.
    ys, xs = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    grid = torch.stack([xs * 20, ys * 20, xs * 20 + 10, ys * 20 + 10], -1).reshape(-1, 4)
    scores = torch.rand(100, generator=torch.Generator().manual_seed(1))
    got = libs.nms(grid.to(device), scores.to(device), 0.0).cpu()
    assert got.tolist() == torch.argsort(scores, descending=True).tolist()
    assert_same(got, torchvision.ops.nms(grid, scores, 0.0), "none suppressed")
    # Threshold 1.0: IoU is never > 1, so even duplicates survive.
    got = libs.nms(box.to(device), scores[:50].to(device), 1.0).cpu()
    assert got.numel() == 50


def test_nms_empty(kernel_backend, device):
    for dtype in (torch.float32, torch.float64):
        got = libs.nms(torch.zeros(0, 4, dtype=dtype, device=device),
                       torch.zeros(0, dtype=dtype, device=device), 0.5)
        assert got.shape == (0,) and got.dtype == torch.int64 and got.device.type == device.type
        got = libs.batched_nms(torch.zeros(0, 4, device=device), torch.zeros(0, device=device),
                               torch.zeros(0, dtype=torch.int64, device=device), 0.5)
        assert got.shape == (0,) and got.dtype == torch.int64


def test_nms_degenerate_boxes(kernel_backend, device):
    """Zero-area boxes (points, lines) and inverted boxes: IoU 0/0 is NaN, which never
    suppresses; inverted boxes give negative areas. torchvision decides every case."""
    g = torch.Generator().manual_seed(9)
    boxes, scores = realistic_boxes(g, 300)
    kind = torch.randint(0, 4, (300,), generator=g)
    boxes[kind == 1, 2] = boxes[kind == 1, 0]                   # zero width
    boxes[kind == 2, 2:] = boxes[kind == 2, :2]                 # a point
    boxes[kind == 3] = boxes[kind == 3][:, [2, 3, 0, 1]]         # inverted
    boxes = torch.cat([boxes, torch.tensor([[5.0, 5, 5, 5]] * 4)])  # identical points
    scores = torch.cat([scores, torch.tensor([0.5] * 4)])
    for thr in THRESHOLDS:
        expected = torchvision.ops.nms(boxes, scores, thr)
        got = libs.nms(boxes.to(device), scores.to(device), thr)
        assert_same(got, expected, f"thr={thr}")
    points = torch.tensor([[1.0, 1, 1, 1]] * 3, device=device)
    assert libs.nms(points, torch.ones(3, device=device), 0.0).tolist() == [0, 1, 2]


def test_nms_iou_exactly_at_threshold(kernel_backend, device):
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # IoU(0, 1) = 100 / 200 = 0.5 is not > 0.5: kept. IoU(1, 2) = 200 / 300.
    for thr in (0.5, 0.49, 0.6, 2 / 3):
        expected = torchvision.ops.nms(boxes, scores, thr)
        got = libs.nms(boxes.to(device), scores.to(device), thr)
        assert_same(got, expected, f"thr={thr}")
    assert libs.nms(boxes.to(device), scores.to(device), 0.5).tolist() == [0, 1]
    assert libs.nms(boxes.to(device), scores.to(device), 0.49).tolist() == [0, 2]


def test_nms_non_contiguous_inputs(kernel_backend, device):
    g = torch.Generator().manual_seed(5)
    boxes, scores = realistic_boxes(g, 400)
    big = torch.zeros(400, 9)
    big[:, 1:9:2] = boxes            # boxes as a strided column view
    sview = torch.stack([scores, -scores], 1)[:, 0]   # strided scores
    bview = big[:, 1:9:2]
    assert not bview.is_contiguous() and not sview.is_contiguous()
    expected = torchvision.ops.nms(boxes, scores, 0.5)
    assert_same(libs.nms(bview.to(device), sview.to(device), 0.5), expected, "strided")
    # transposed storage
    bt = boxes.t().contiguous().t()
    assert not bt.is_contiguous()
    assert_same(libs.nms(bt.to(device), scores.to(device), 0.5), expected, "transposed")


def test_nms_half_runs_in_float(kernel_backend, device):
    g = torch.Generator().manual_seed(8)
    boxes, scores = realistic_boxes(g, 300)
    boxes, scores = boxes.round().half(), scores.half()   # integers: exact in half
    expected = torchvision.ops.nms(boxes.float(), scores.float(), 0.5)
    got = libs.nms(boxes.to(device), scores.to(device), 0.5)
    assert_same(got, expected, "half")


def check_batched(g, n, classes, device, dtype=torch.float32, ties=False, msg=""):
    boxes, scores = realistic_boxes(g, n, dtype)
    if ties:
        scores = torch.randint(0, 5, (n,), generator=g).to(dtype)
    idxs = torch.randint(0, classes, (n,), generator=g)
    thr = [0.3, 0.5, 0.7][n % 3]
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, thr)
    got = libs.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), thr).cpu()
    if not ties and scores.unique().numel() == n:
        assert_same(got, expected, f"{msg} n={n} classes={classes}")
        return
    # torchvision's per-class loop orders ties with an unstable sort (random float32
    # scores of 25000 boxes hold some ties too): compare the kept set, and check ours is
    # ordered by (score desc, index asc).
    assert sorted(got.tolist()) == sorted(expected.tolist()), f"{msg} n={n}"
    key = [(-float(scores[i]), i) for i in got.tolist()]
    assert key == sorted(key), f"{msg} n={n}: not by descending score, then index"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_nms_both_paths(kernel_backend, device, dtype):
    """Below and above libs._LOOP_ABOVE (offset trick / per-class loop), as torchvision
    switches at the same size on the CPU."""
    limit = libs._LOOP_ABOVE[device.type]
    sizes = [1, 50, limit, limit + 1]
    if kernel_backend == "native":
        sizes.append(2500)  # the fallback's Python loop covers the loop path at limit + 1
    if device.type == "cuda":
        sizes.append(limit + 500)
    for seed, n in enumerate(sizes):
        for classes in (1, 3, 91):
            g = torch.Generator().manual_seed(1000 * seed + classes)
            check_batched(g, n, classes, device, dtype, msg=f"seed={seed}")


def test_batched_nms_ties_and_duplicates(kernel_backend, device):
    limit = libs._LOOP_ABOVE[device.type]
    for seed, n in enumerate([200, limit + 300]):
        g = torch.Generator().manual_seed(50 + seed)
        check_batched(g, n, 7, device, ties=True, msg=f"seed={50 + seed}")
    # The same box in two classes survives in both; within one class only once.
    box = torch.tensor([[0.0, 0, 10, 10]] * 4, device=device)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], device=device)
    idxs = torch.tensor([0, 1, 0, 1], device=device)
    assert libs.batched_nms(box, scores, idxs, 0.5).tolist() == [0, 1]


def test_batched_nms_loop_path_is_taken(monkeypatch, kernel_backend, device):
    """The two batched paths give the same answer on the same input (forced each way)."""
    g = torch.Generator().manual_seed(77)
    boxes, scores = realistic_boxes(g, 600)
    idxs = torch.randint(0, 20, (600,), generator=g)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    calls = []
    real_loop = libs._batched_nms_loop

    def spy(*args):
        calls.append(1)
        return real_loop(*args)

    monkeypatch.setattr(libs, "_batched_nms_loop", spy)
    for limit in (10 ** 9, 100):
        monkeypatch.setitem(libs._LOOP_ABOVE, device.type, limit)
        got = libs.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)
        assert_same(got, expected, f"loop above {limit}")
    assert len(calls) == 1


def test_argument_errors():
    boxes = torch.rand(5, 4)
    scores = torch.rand(5)
    idxs = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"boxes must be a Tensor\[n, 4\].*\[5, 3\]"):
        libs.nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match=r"boxes must be a Tensor\[n, 4\].*list"):
        libs.nms([[0, 0, 1, 1]], scores, 0.5)
    with pytest.raises(ValueError, match=r"scores must be a Tensor\[n\] with n = 5.*\[4\]"):
        libs.nms(boxes, scores[:4], 0.5)
    with pytest.raises(ValueError, match=r"scores must be a Tensor\[n\].*\[5, 1\]"):
        libs.nms(boxes, scores[:, None], 0.5)
    with pytest.raises(ValueError, match="boxes must be floating point, got torch.int64"):
        libs.nms(boxes.long(), scores, 0.5)
    with pytest.raises(ValueError, match="scores are on meta but boxes are on cpu"):
        libs.nms(boxes, scores.to("meta"), 0.5)
    with pytest.raises(ValueError, match=r"idxs must be a Tensor\[n\] with n = 5.*\[3\]"):
        libs.batched_nms(boxes, scores, idxs[:3], 0.5)
    with pytest.raises(ValueError, match=r"idxs are on meta but boxes are on cpu"):
        libs.batched_nms(boxes, scores, idxs.to("meta"), 0.5)
    with pytest.raises(ValueError, match=r"scores must be a Tensor\[n\] with n = 5"):
        libs.batched_nms(boxes, scores[:2], idxs, 0.5)


def test_nms_opcheck_and_compile(kernel_backend, device):
    g = torch.Generator().manual_seed(12)
    boxes, scores = realistic_boxes(g, 60)
    boxes, scores = boxes.to(device), scores.to(device)
    torch.library.opcheck(ops.nms, (boxes, scores, 0.5),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()

    def f(b, s):
        return libs.nms(b, s, 0.5)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert_same(compiled(boxes, scores), torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.5),
                "compiled")


def test_nms_nan_and_infinite_scores(kernel_backend, device):
    """NaN scores sort first (torch.sort's order), infinities at their ends."""
    g = torch.Generator().manual_seed(13)
    boxes, scores = realistic_boxes(g, 120)
    scores[::7] = float("nan")
    scores[3::11] = float("inf")
    scores[5::13] = -float("inf")
    for thr in (0.3, 0.7):
        expected = torchvision.ops.nms(boxes, scores, thr)
        assert_same(libs.nms(boxes.to(device), scores.to(device), thr), expected, f"thr={thr}")
