"""Shared checks of the deploy tests: an exported model's detections against the eager
model's (the oracle). Shapes: D detections, H/W image size."""
import torch


# The tolerances: same detections, score within 1e-4, box within 1e-2 px, mask IoU
# >= 0.99 once binarised at 0.5.
SCORE_TOL, BOX_TOL, MASK_IOU = 1e-4, 1e-2, 0.99


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-detection IoU Tensor[D] of masks Tensor[D, 1, H, W] binarised at 0.5 (1 where
    both are empty)."""
    a, b = a.flatten(1) >= 0.5, b.flatten(1) >= 0.5
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def assert_same_detections(eager: dict, exported: dict, what: str) -> None:
    """eager: model([image])[0]; exported: the same keys from an exported model."""
    n, m = len(eager["scores"]), len(exported["scores"])
    assert n == m, f"{what}: {n} eager detections, {m} exported"
    assert torch.equal(eager["labels"], exported["labels"].to(torch.int64)), \
        f"{what}: labels differ"
    score = (eager["scores"] - exported["scores"]).abs().max().item() if n else 0.0
    box = (eager["boxes"] - exported["boxes"]).abs().max().item() if n else 0.0
    assert score <= SCORE_TOL, f"{what}: scores differ by {score:.3g}"
    assert box <= BOX_TOL, f"{what}: boxes differ by {box:.3g} px"
    if "masks" in eager:
        assert exported["masks"].shape == eager["masks"].shape, \
            f"{what}: masks {tuple(exported['masks'].shape)} vs {tuple(eager['masks'].shape)}"
        if n:
            iou = mask_iou(eager["masks"], exported["masks"]).min().item()
            assert iou >= MASK_IOU, f"{what}: mask IoU {iou:.4f}"


def eager(model, image: torch.Tensor) -> dict:
    with torch.no_grad():
        return model([image])[0]


def pair_detections(eager: dict, exported: dict, score_tol: float = SCORE_TOL,
                    box_tol: float = BOX_TOL) -> list[tuple[int, int]]:
    """(i, j) pairs of eager detection i and exported detection j with the same label,
    score within score_tol and box within box_tol px; greedy in eager's order, each
    exported detection used once (the order of equal scores is free)."""
    used, pairs = set(), []
    for i in range(len(eager["scores"])):
        for j in range(len(exported["scores"])):
            if j not in used and int(eager["labels"][i]) == int(exported["labels"][j]) \
                    and abs(float(eager["scores"][i] - exported["scores"][j])) <= score_tol \
                    and float((eager["boxes"][i] - exported["boxes"][j]).abs().max()) <= box_tol:
                used.add(j)
                pairs.append((i, j))
                break
    return pairs


def pairs_with_masks(eager: dict, exported: dict, score_tol: float, box_tol: float,
                     min_mask_iou: float, what: str,
                     pixel_slack: int = 0) -> list[tuple[int, int]]:
    """pair_detections, asserting mask IoU >= min_mask_iou on every pair, or at most
    pixel_slack pixels differing (a mask of a few dozen pixels cannot reach 0.98 with
    one pixel flipped, and a tiny box turns the float rounding of its corners into the
    largest shifts of the mask's samples)."""
    pairs = pair_detections(eager, exported, score_tol, box_tol)
    if pairs:
        i, j = (torch.tensor(index) for index in zip(*pairs))
        a, b = eager["masks"][i].flatten(1) >= 0.5, exported["masks"][j].flatten(1) >= 0.5
        iou = mask_iou(eager["masks"][i], exported["masks"][j])
        off = (a ^ b).sum(1)
        bad = torch.where((iou < min_mask_iou) & (off > pixel_slack))[0]
        assert len(bad) == 0, (f"{what}: mask IoU {iou[bad[0]].item():.4f} "
                               f"({int(off[bad[0]])} pixels differ)")
    return pairs
