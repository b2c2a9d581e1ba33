"""COCO evaluation: bbox and segm AP with pycocotools, results in the COCO results format.

    metrics = evaluate(model, CocoInstances(json, images), batch_size=2)
    metrics["segm"]["AP"]            # fractions in [0, 1] (-1: no GT of that size range)

Detections become COCO results (original COCO category ids, boxes [x, y, w, h], masks
binarised at mask_threshold (probability >= threshold) and RLE-encoded) and are scored
by COCOeval against the dataset's own annotations, crowd regions included. Under
torch.distributed each rank runs its shard of the images and rank 0 gathers the results.

Validation loss: the model in eval mode called with targets returns (detections, losses),
the same five losses as training computed on the eval-mode proposals, without switching
BatchNorm or dropout to training mode. `evaluate(..., compute_loss=True)` averages them
over the set in the same pass as the detections (result key "loss").
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine import distributed as dist_utils

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


# ------------------------------------------------------------------ COCO results format

def encode_mask(mask: np.ndarray) -> dict:
    """Binary uint8[H, W] -> COCO RLE with `counts` as str (JSON serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def detections_to_coco(detection: dict, image_id: int, cat_ids: Sequence[int],
                       mask_threshold: float = 0.5) -> list[dict]:
    """One image's detections as COCO result dicts.

    Args:
        detection: dict(boxes Tensor[D, 4] (x1, y1, x2, y2), labels Tensor[D] in 1..K,
            scores Tensor[D], optional masks: Tensor[D, 1, H, W] probabilities, or a list
            of D COCO RLE dicts (engine.Predictor's), used as they are).
        cat_ids: COCO category ids; label l is cat_ids[l - 1].
    Returns:
        [dict(image_id, category_id, bbox [x, y, w, h], score, segmentation RLE?)].
    """
    boxes = detection["boxes"].detach().float().cpu()
    labels = detection["labels"].detach().cpu().tolist()
    scores = detection["scores"].detach().float().cpu().tolist()
    masks = detection.get("masks")
    if isinstance(masks, Tensor):
        masks = (masks.detach()[:, 0] >= mask_threshold).to(torch.uint8).cpu().numpy()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results = []
    for i, (label, score) in enumerate(zip(labels, scores)):
        if not 1 <= label <= len(cat_ids):
            raise ValueError(f"detection label {label} is outside 1..{len(cat_ids)} "
                             f"(the dataset's categories)")
        result = {"image_id": int(image_id), "category_id": int(cat_ids[label - 1]),
                  "bbox": [round(v, 3) for v in xywh[i]], "score": round(float(score), 5)}
        if masks is not None:
            result["segmentation"] = (dict(masks[i]) if isinstance(masks[i], dict)
                                      else encode_mask(masks[i]))
        results.append(result)
    return results


# ------------------------------------------------------------------------- COCOeval

def coco_evaluate(coco_gt: COCO, results: list[dict], iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Optional[Sequence[int]] = None, class_names=None
                  ) -> tuple[dict, dict]:
    """Run COCOeval for each IoU type.

    Returns:
        (metrics {iou_type: {AP, AP50, AP75, APs, APm, APl}},
         per_category {iou_type: {class name: AP}}); all 0.0 when there are no results
        (pycocotools cannot load an empty list).
    """
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else list(image_ids)
    cat_ids = sorted(coco_gt.getCatIds())
    names = list(class_names) if class_names else [coco_gt.cats[c]["name"] for c in cat_ids]
    metrics, per_category = {}, {}
    for iou_type in iou_types:
        usable = [r for r in results if iou_type != "segm" or "segmentation" in r]
        if not usable:
            metrics[iou_type] = {k: 0.0 for k in METRIC_NAMES}
            per_category[iou_type] = {n: 0.0 for n in names}
            continue
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints a lot
            coco_dt = coco_gt.loadRes([dict(r) for r in usable])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats[:6])}
        per_category[iou_type] = _per_category_ap(ev, cat_ids, names)
    return metrics, per_category


def _per_category_ap(ev: COCOeval, cat_ids: list[int], names: list[str]) -> dict:
    """AP (IoU .50:.95, all areas, 100 detections) per category, as detectron2 does:
    the mean of the precision entries that exist (-1 where a class has no GT)."""
    precision = ev.eval["precision"]          # [T, R, K, A, M]
    out = {}
    for k, (cat_id, name) in enumerate(zip(cat_ids, names)):
        if cat_id not in ev.params.catIds:
            continue
        p = precision[:, :, ev.params.catIds.index(cat_id), 0, -1]
        p = p[p > -1]
        out[name] = float(p.mean()) if p.size else -1.0
    return out


def format_table(metrics: dict, per_category: Optional[dict] = None) -> str:
    """A plain-text table: one row per IoU type, then the per-category AP."""
    lines = [f"{'':6s}" + "".join(f"{k:>8s}" for k in METRIC_NAMES)]
    for iou_type, values in metrics.items():
        if iou_type in IOU_TYPES:
            lines.append(f"{iou_type:6s}" + "".join(_pct(values[k], 8)
                                                     for k in METRIC_NAMES))
    if per_category:
        types = [t for t in IOU_TYPES if t in per_category]
        names = list(per_category[types[0]]) if types else []
        width = max([len(n) for n in names] + [8])
        lines.append("")
        lines.append(f"{'category':{width}s}" + "".join(f"{t + ' AP':>10s}" for t in types))
        for name in names:
            lines.append(f"{name:{width}s}" + "".join(
                _pct(per_category[t][name], 10) for t in types))
    return "\n".join(lines)


def _pct(value: float, width: int) -> str:
    """AP in percent; "-" for pycocotools' -1 (no GT in that range)."""
    return f"{'-':>{width}s}" if value < 0 else f"{value * 100:{width}.1f}"


# ------------------------------------------------------------------------- inference

@torch.no_grad()
def run_inference(model, dataset, batch_size: int = 1, device="cpu",
                  mask_threshold: float = 0.5, progress: bool = True,
                  compute_loss: bool = False) -> tuple[list[dict], dict]:
    """This rank's shard of the dataset through model.eval().

    Returns:
        (COCO results of the shard, summed losses {name: float} plus "num_images" when
        compute_loss, else {}).
    """
    device = torch.device(device)
    model.eval()
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    indices = list(range(rank, len(dataset), world))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        # over this rank's images; leave=None: kept when alone (maskrcnn eval), cleared
        # when it sits below the training bar (evaluation during training)
        bar = tqdm(total=len(indices), desc="eval", unit="img", leave=None,
                   dynamic_ncols=True, file=sys.stderr)
    results, loss_sums = [], {}
    try:
        for batch in batches:
            samples = [dataset[i] for i in batch]
            images = [img.to(device) for img, _ in samples]
            if compute_loss:
                targets = [{k: v.to(device) for k, v in t.items() if torch.is_tensor(v)}
                           for _, t in samples]
                detections, losses = model(images, targets)
                for k, v in losses.items():
                    loss_sums[k] = loss_sums.get(k, 0.0) + float(v) * len(batch)
                loss_sums["num_images"] = loss_sums.get("num_images", 0) + len(batch)
            else:
                detections = model(images)
            for (_, target), det in zip(samples, detections):
                results += detections_to_coco(det, target["image_id"], dataset.cat_ids,
                                              mask_threshold)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return results, loss_sums


def evaluate(model, dataset, batch_size: int = 1, device="cpu", mask_threshold: float = 0.5,
             progress: bool = True, compute_loss: bool = False, details: bool = False,
             results_path: Optional[str] = None, table: Optional[bool] = None) -> dict:
    """COCO bbox (and segm, when the model predicts masks) AP of model on dataset.

    Args:
        model: a MaskRCNN (put in eval mode here).
        dataset: a CocoInstances with train=False (every image, its `coco` the GT).
        progress: a tqdm bar over the images on stderr (rank 0).
        compute_loss: also average the validation losses (result key "loss").
        details: also return "per_category" {iou_type: {class name: AP}}.
        results_path: write the COCO results JSON (rank 0) there.
        table: print the AP table with the per-category AP (rank 0); None: as progress.
    Returns:
        {"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...}} fractions in [0, 1]
        (-1 where the set has no GT of that size range, as pycocotools), the same on every
        rank.
    """
    results, loss_sums = run_inference(model, dataset, batch_size, device, mask_threshold,
                                       progress, compute_loss)
    gathered = dist_utils.all_gather_object((results, loss_sums))
    out: Any = None
    if dist_utils.is_main_process():
        results = [r for part, _ in gathered for r in part]
        if results_path:
            Path(results_path).parent.mkdir(parents=True, exist_ok=True)
            Path(results_path).write_text(json.dumps(results))
        has_masks = getattr(getattr(model, "roi_heads", None), "mask_on", True)
        # Box-only ground truth has nothing to score masks against (pycocotools would fail).
        gt_masks = all(a.get("segmentation") for a in dataset.coco.dataset["annotations"])
        iou_types = IOU_TYPES if has_masks and gt_masks else ("bbox",)
        metrics, per_category = coco_evaluate(dataset.coco, results, iou_types,
                                              image_ids=dataset.ids,
                                              class_names=dataset.class_names)
        out = dict(metrics)
        if compute_loss:
            total: dict = {}
            for _, sums in gathered:
                for k, v in sums.items():
                    total[k] = total.get(k, 0.0) + v
            n = max(total.pop("num_images", 0), 1)
            out["loss"] = {k: v / n for k, v in total.items()}
        if details:
            out["per_category"] = per_category
        if progress if table is None else table:
            print(format_table(metrics, per_category))
    return dist_utils.broadcast_object(out)
