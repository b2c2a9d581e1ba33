"""COCO evaluation against pycocotools run directly, and the validation loss."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.data import CocoInstances, ImageError
from engine.evaluate import (detections_to_coco, evaluate, format_skipped, format_table,
                             write_pr_plots)
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
        for name, row in metrics["per_category"].items():
            assert row[iou_type] == pytest.approx(1.0 if name in present else -1.0), name
    table = format_table(metrics, metrics["per_category"])
    assert "segm" in table and "circle" in table and "100.0" in table


def _direct_eval(coco_gt, results, iou_type):
    """pycocotools by hand: loadRes, COCOeval (default imgIds: every image of coco_gt),
    evaluate, accumulate, summarize."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _direct_cocoeval(coco_gt, results, iou_type):
    """stats[:6] (AP, AP50, AP75, APs, APm, APl) of pycocotools by hand."""
    return _direct_eval(coco_gt, results, iou_type).stats[:6]


def _perturbed(dataset, seed=0):
    """Detections that score between 0 and 1 for the dataset's readable images: every
    other GT instance, shifted, one with a wrong class; random scores. Returns
    ({image key: detection}, the same as COCO results written by hand)."""
    rng = np.random.default_rng(seed)
    detections, results = {}, []
    for i in range(len(dataset)):
        try:
            image, target = dataset[i]
        except ImageError:
            continue
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
                            "category_id": dataset.cat_ids[lab - 1],
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "score": s, "segmentation": rle})
    return detections, results


def test_perturbed_predictions_score_what_pycocotools_says(val_set):
    detections, results = _perturbed(val_set)
    metrics = evaluate(Oracle(detections), val_set, progress=False)
    for iou_type in ("bbox", "segm"):
        expected = _direct_cocoeval(val_set.coco, results, iou_type)
        got = [metrics[iou_type][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert got == pytest.approx(expected.tolist(), abs=1e-4), iou_type
        assert 0.05 < metrics[iou_type]["AP50"] < 0.95                   # not trivial


def _valid_mean(p, axis):
    """Mean over axis of the entries > -1 (pycocotools' summarize rule), by hand."""
    out = []
    for row in np.moveaxis(p, axis, -1).reshape(-1, p.shape[axis]):
        kept = row[row > -1]
        out.append(kept.mean() if kept.size else 0.0)
    return np.array(out).reshape(np.delete(p.shape, axis))


def test_per_category_ap_and_pr_curves_come_from_pycocotools_precision(shapes_data, tmp_path):
    # the 8 training images: every class has GT, and the perturbation scores them apart
    dataset = CocoInstances(*shapes_data["train"], train=False)
    detections, results = _perturbed(dataset, seed=1)
    metrics = evaluate(Oracle(detections), dataset, batch_size=3, progress=False,
                       details=True)
    per_category = metrics["per_category"]
    names = {c["id"]: c["name"] for c in dataset.coco.dataset["categories"]}
    anns = dataset.coco.dataset["annotations"]
    for iou_type in ("bbox", "segm"):
        ev = _direct_eval(dataset.coco, results, iou_type)
        precision = ev.eval["precision"]                      # [T, R, K, A, M]
        aps = []
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, 2]                      # all areas, 100 detections
            expected = p[p > -1].mean()
            assert per_category[names[cat_id]][iou_type] == pytest.approx(expected, abs=1e-12)
            aps.append(expected)
        assert 0 < min(aps) < max(aps) < 0.95               # not trivial: distinct, not 0
        # what was drawn: the precision array's curves, each averaging to its AP
        drawn = write_pr_plots({iou_type: ev}, dataset.coco, tmp_path)
        assert sorted(drawn) == [tmp_path / f"pr_{iou_type}.png",
                                 tmp_path / f"pr_{iou_type}_per_category.png"]
        assert all(path.stat().st_size > 1000 for path in drawn)
        overall = drawn[tmp_path / f"pr_{iou_type}.png"]
        recall = np.linspace(0, 1, 101)
        p = precision[:, :, :, 0, 2]                                       # [T, R, K]
        expected = {"IoU=0.50": _valid_mean(p[0], 1), "IoU=0.75": _valid_mean(p[5], 1),
                    "IoU=0.50:0.95": _valid_mean(p.transpose(1, 0, 2).reshape(101, -1), 1)}
        assert overall.keys() == expected.keys()
        for label, curve in expected.items():
            assert np.allclose(overall[label][0], recall)
            assert np.allclose(overall[label][1], curve, atol=1e-12), label
        assert overall["IoU=0.50:0.95"][1].mean() == pytest.approx(ev.stats[0], abs=1e-12)
        assert overall["IoU=0.50"][1].mean() == pytest.approx(ev.stats[1], abs=1e-12)
        per_cat = drawn[tmp_path / f"pr_{iou_type}_per_category.png"]
        for k, cat_id in enumerate(ev.params.catIds):
            assert np.allclose(per_cat[names[cat_id]][1], _valid_mean(p[:, :, k], 0))
    for cat_id, name in names.items():
        assert per_category[name]["instances"] == sum(
            1 for a in anns if a["category_id"] == cat_id and not a.get("iscrowd"))
    table = format_table(metrics, per_category)
    row = next(line for line in table.splitlines() if line.startswith("circle"))
    assert row.split() == ["circle", f"{100 * per_category['circle']['bbox']:.1f}",
                           f"{100 * per_category['circle']['segm']:.1f}",
                           str(per_category["circle"]["instances"])]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_images_are_skipped_and_ap_covers_the_rest(bad_images_data, tmp_path,
                                                              capsys, num_workers):
    json_path, image_dir, bad = bad_images_data
    dataset = CocoInstances(json_path, image_dir, train=False)
    detections, results = _perturbed(dataset)
    metrics = evaluate(Oracle(detections), dataset, batch_size=3, progress=False,
                       on_error="skip", num_workers=num_workers)
    assert {s["file"]: s["reason"] for s in metrics["skipped"]} == bad
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 4 and all(sum(f in w for f in bad) == 1 for w in warnings)
    assert format_skipped(metrics["skipped"], len(dataset)) == (
        "skipped 4 of 8 images: 1.jpg (truncated), 2.png (not an image), 3.png (empty "
        "file), 4.png (missing); AP covers the other 4")
    # pycocotools on a JSON without the bad images (and their annotations)
    data = json.loads(json_path.read_text())
    kept = {im["id"] for im in data["images"] if im["file_name"] not in bad}
    data["images"] = [im for im in data["images"] if im["id"] in kept]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    (tmp_path / "reduced.json").write_text(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        reduced = COCO(str(tmp_path / "reduced.json"))
    for iou_type in ("bbox", "segm"):
        expected = _direct_cocoeval(reduced, results, iou_type)
        got = [metrics[iou_type][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert got == pytest.approx(expected.tolist(), abs=1e-12), iou_type
        assert 0.05 < metrics[iou_type]["AP"] < 0.95


def test_unreadable_image_raises_by_default(bad_images_data):
    dataset = CocoInstances(*bad_images_data[:2], train=False)
    with pytest.raises(ImageError, match="1.jpg") as info:
        evaluate(Oracle({}), dataset, progress=False)
    assert info.value.reason == "truncated"


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
