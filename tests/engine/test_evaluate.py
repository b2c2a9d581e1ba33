"""COCO evaluation against pycocotools run directly, and the validation loss."""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from engine.data import CocoInstances
from engine.evaluate import detections_to_coco, evaluate, format_table
from maskrcnn import build_model


class Oracle(torch.nn.Module):
    """A stand-in model: returns the detections registered for each image (by content)."""

    def __init__(self, detections_by_image):
        super().__init__()
        self.detections = detections_by_image

    def forward(self, images, targets=None):
        return [self.detections[_key(img)] for img in images]


def _key(image):
    return image.numpy().tobytes()


@pytest.fixture
def val_set(shapes_data):
    return CocoInstances(*shapes_data["val"], train=False)


def _gt_detections(dataset):
    """Per image the GT as detections: score 1, masks as [M, 1, H, W] probabilities."""
    out = {}
    for i in range(len(dataset)):
        image, target = dataset[i]
        out[_key(image)] = dict(boxes=target["boxes"], labels=target["labels"],
                                scores=torch.ones(len(target["labels"])),
                                masks=target["masks"][:, None].float())
    return out


def test_ground_truth_as_predictions_scores_one(val_set):
    metrics = evaluate(Oracle(_gt_detections(val_set)), val_set, batch_size=2,
                       progress=False, details=True)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(1.0)
        present = {val_set.coco.cats[a["category_id"]]["name"]
                   for a in val_set.coco.anns.values()}
        for name, ap in metrics["per_category"][iou_type].items():
            assert ap == pytest.approx(1.0 if name in present else -1.0), name
    table = format_table(metrics, metrics["per_category"])
    assert "segm" in table and "circle" in table and "100.0" in table


def _direct_cocoeval(coco_gt, results, iou_type):
    """pycocotools by hand: loadRes, COCOeval, stats[:6]."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6]


def test_perturbed_predictions_score_what_pycocotools_says(val_set):
    rng = np.random.default_rng(0)
    detections, results = {}, []
    for i in range(len(val_set)):
        image, target = val_set[i]
        m = len(target["labels"])
        keep = torch.arange(m)[::2]                              # drop every other one
        boxes = target["boxes"][keep] + torch.tensor([3.0, -2.0, 3.0, 1.0])   # shifted
        masks = torch.roll(target["masks"][keep], shifts=2, dims=-1)           # moved
        labels = target["labels"][keep].clone()
        if len(labels) > 1:
            labels[-1] = labels[-1] % 3 + 1                      # a wrong class
        scores = torch.tensor(rng.uniform(0.3, 1.0, len(keep)), dtype=torch.float32)
        detections[_key(image)] = dict(boxes=boxes, labels=labels, scores=scores,
                                       masks=masks[:, None].float() * 0.9)
        for b, lab, s, mk in zip(boxes.tolist(), labels.tolist(), scores.tolist(), masks):
            rle = mask_utils.encode(np.asfortranarray(mk.numpy().astype(np.uint8)))
            results.append({"image_id": target["image_id"],
                            "category_id": val_set.cat_ids[lab - 1],
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "score": s, "segmentation": rle})
    metrics = evaluate(Oracle(detections), val_set, progress=False)
    for iou_type in ("bbox", "segm"):
        expected = _direct_cocoeval(val_set.coco, results, iou_type)
        got = [metrics[iou_type][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert got == pytest.approx(expected.tolist(), abs=1e-4), iou_type
        assert 0.05 < metrics[iou_type]["AP50"] < 0.95                   # not trivial


def test_results_format_and_mask_threshold():
    masks = torch.zeros(2, 1, 4, 5)
    masks[0, 0, 1, 1:4] = torch.tensor([0.5, 0.49, 0.9])
    det = dict(boxes=torch.tensor([[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 1.0, 1.0]]),
               labels=torch.tensor([2, 1]), scores=torch.tensor([0.9, 0.2]), masks=masks)
    out = detections_to_coco(det, image_id=7, cat_ids=[11, 22], mask_threshold=0.5)
    assert [r["category_id"] for r in out] == [22, 11]             # original COCO ids
    assert out[0]["bbox"] == [1.0, 2.0, 3.0, 4.0] and out[0]["image_id"] == 7
    binary = mask_utils.decode(out[0]["segmentation"])
    expected = np.zeros((4, 5), np.uint8)
    expected[1, 1] = expected[1, 3] = 1                            # >= 0.5 is foreground
    assert np.array_equal(binary, expected)
    assert isinstance(out[0]["segmentation"]["counts"], str)       # JSON serialisable
    with pytest.raises(ValueError, match="label 3"):
        detections_to_coco(dict(det, labels=torch.tensor([3, 1])), 7, [11, 22])


def test_no_detections_scores_zero(val_set):
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                 scores=torch.zeros(0), masks=torch.zeros(0, 1, 64, 64))
    detections = {k: empty for k in _gt_detections(val_set)}
    metrics = evaluate(Oracle(detections), val_set, progress=False)
    assert metrics["segm"]["AP"] == 0.0 and metrics["bbox"]["AP50"] == 0.0


@pytest.mark.slow
def test_validation_loss_is_the_mean_eval_mode_loss(tiny_cfg, val_set, tmp_path):
    torch.manual_seed(0)
    # every anchor / RoI sampled: the losses do not depend on the RNG
    model = build_model(tiny_cfg(rpn_batch_size_per_image=4096,
                                 box_batch_size_per_image=4096)).eval()
    metrics = evaluate(model, val_set, batch_size=1, progress=False, compute_loss=True,
                       results_path=str(tmp_path / "results.json"))
    expected = {}
    with torch.no_grad():
        for i in range(len(val_set)):
            image, target = val_set[i]
            _, losses = model([image], [target])
            for k, v in losses.items():
                expected[k] = expected.get(k, 0.0) + float(v) / len(val_set)
    assert metrics["loss"].keys() == expected.keys() and len(expected) == 5
    for k in expected:
        assert metrics["loss"][k] == pytest.approx(expected[k], rel=1e-5), k
    assert (tmp_path / "results.json").is_file()


def test_progress_bar_and_table_are_separate_switches(val_set, capsys):
    oracle = Oracle(_gt_detections(val_set))
    evaluate(oracle, val_set, batch_size=1, progress=True, table=False)
    out, err = capsys.readouterr()
    assert "eval" in err and "4/4" in err and out == ""        # the bar, over the 4 images
    evaluate(oracle, val_set, batch_size=1, progress=False)
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")
    evaluate(oracle, val_set, batch_size=2, progress=True)      # the table by default
    out, err = capsys.readouterr()
    assert "4/4" in err and out.count("segm") == 2 and "category" in out
