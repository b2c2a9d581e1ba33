"""COCO evaluation: bbox and segm AP with pycocotools, results in the COCO results format.

    metrics = evaluate(model, CocoInstances(json, images), batch_size=2)
    metrics["segm"]["AP"]            # fractions in [0, 1] (-1: no GT of that size range)

Detections become COCO results (original COCO category ids, boxes [x, y, w, h], masks
binarised at mask_threshold (probability >= threshold) and RLE-encoded) and are scored
by COCOeval against the dataset's own annotations, crowd regions included. Under
torch.distributed each rank runs its shard of the images and rank 0 gathers the results.

Per category: AP from pycocotools' `precision` array ([T, R, K, A, M]: IoU thresholds,
recall thresholds, categories, areas, max detections), the mean of its entries that exist
for category k at all areas and 100 detections, as pycocotools' summarize computes the
overall AP; `pr_curves` / `write_pr_plots` draw the same array as precision-recall curves.

Unreadable images (engine.data.ImageError: missing, truncated, not an image, wrong size):
`evaluate(..., on_error="skip")` names each in a warning line and scores the readable
images only (COCOeval's imgIds restricted to them, so their GT is not counted as missed);
on_error="raise" (default) raises the error. The dataset is read through a DataLoader
(num_workers processes) that returns a bad image as a marker instead of raising in the
worker (see _Marked).

Validation loss: the model in eval mode called with targets returns (detections, losses),
the same five losses as training computed on the eval-mode proposals, without switching
BatchNorm or dropout to training mode. `evaluate(..., compute_loss=True)` averages them
over the set in the same pass as the detections (result key "loss").
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from engine import distributed as dist_utils
from engine.formats import write_coco
from engine.data import ImageError, collate

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

def run_cocoeval(coco_gt: COCO, results: list[dict], iou_types: Sequence[str] = IOU_TYPES,
                 image_ids: Optional[Sequence[int]] = None) -> dict:
    """COCOeval (evaluate, accumulate, summarize) for each IoU type, over image_ids only
    (default: every image of coco_gt).

    Returns:
        {iou_type: the COCOeval (its `stats`, `eval["precision"]` [T, R, K, A, M]), or
        None when there are no results of that type (pycocotools cannot load an empty
        list)}.
    """
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else list(image_ids)
    runs = {}
    for iou_type in iou_types:
        usable = [r for r in results if iou_type != "segm" or "segmentation" in r]
        if not usable:
            runs[iou_type] = None
            continue
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints a lot
            coco_dt = coco_gt.loadRes([dict(r) for r in usable])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        runs[iou_type] = ev
    return runs


def coco_evaluate(coco_gt: COCO, results: list[dict], iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Optional[Sequence[int]] = None, class_names=None
                  ) -> tuple[dict, dict]:
    """Run COCOeval for each IoU type (see run_cocoeval).

    Returns:
        (metrics {iou_type: {AP, AP50, AP75, APs, APm, APl}},
         per_category {class name: {iou_type: AP, ..., "instances": GT count}}); AP 0.0
        for an IoU type without results, -1 for a category without GT in image_ids.
    """
    runs = run_cocoeval(coco_gt, results, iou_types, image_ids)
    return summarize_runs(runs, coco_gt, image_ids, class_names)


def summarize_runs(runs: dict, coco_gt: COCO, image_ids: Optional[Sequence[int]] = None,
                   class_names=None) -> tuple[dict, dict]:
    """(metrics, per_category) of run_cocoeval's runs, as coco_evaluate returns them."""
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else list(image_ids)
    cat_ids = sorted(coco_gt.getCatIds())
    keys = category_keys(coco_gt, class_names)
    counts = _instances(coco_gt, image_ids)
    per_category = {key: {"instances": counts.get(c, 0)} for c, key in zip(cat_ids, keys)}
    metrics = {}
    for iou_type, ev in runs.items():
        if ev is None:
            metrics[iou_type] = {k: 0.0 for k in METRIC_NAMES}
            aps = {c: (0.0 if counts.get(c) else -1.0) for c in cat_ids}
        else:
            metrics[iou_type] = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats[:6])}
            aps = _per_category_ap(ev)
        for c, key in zip(cat_ids, keys):
            per_category[key][iou_type] = aps.get(c, -1.0)
    return metrics, per_category


def category_keys(coco_gt: COCO, class_names=None) -> list[str]:
    """A unique name per category id (sorted ids): its class name, with " (id N)" added
    where two categories share a name (the per-category results are keyed by it)."""
    cat_ids = sorted(coco_gt.getCatIds())
    names = (list(class_names) if class_names
             else [str(coco_gt.cats[c].get("name", c)) for c in cat_ids])
    return [f"{n} (id {c})" if names.count(n) > 1 else n for c, n in zip(cat_ids, names)]


def _instances(coco_gt: COCO, image_ids: Sequence[int]) -> dict:
    """{category id: non-crowd GT instances in image_ids} (what a category's AP scores)."""
    counts: dict = {}
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if not ann.get("iscrowd", 0):
                counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    return counts


def _per_category_ap(ev: COCOeval) -> dict:
    """{category id: AP} (IoU .50:.95, all areas, 100 detections) as pycocotools'
    summarize computes the overall AP, per category: the mean of the precision entries
    that exist (-1 where a category has no GT)."""
    precision = ev.eval["precision"]          # [T, R, K, A, M]
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[cat_id] = float(p.mean()) if p.size else -1.0
    return out


def pr_curves(ev: COCOeval, coco_gt: COCO, class_names=None) -> dict:
    """Precision-recall curves (all areas, 100 detections) from ev.eval["precision"].

    Returns:
        dict(recall float[R] (ev.params.recThrs),
             overall {"IoU=0.50:0.95" | "IoU=0.50" | "IoU=0.75": precision float[R]}: the
                 mean over the categories with GT (and over the IoU thresholds), so a
                 curve's mean over recall is the AP (AP50, AP75) pycocotools reports,
             per_category {category key: precision float[R]}: the mean over the IoU
                 thresholds; categories without GT have no curve).
    """
    precision = ev.eval["precision"][:, :, :, 0, -1]            # [T, R, K]
    thresholds = ev.params.iouThrs
    overall = {"IoU=0.50:0.95": _mean_valid(precision, axes=(0, 2))}
    for iou in (0.50, 0.75):
        t = int(np.argmin(np.abs(thresholds - iou)))
        overall[f"IoU={iou:.2f}"] = _mean_valid(precision[t], axes=(1,))
    keys = dict(zip(sorted(coco_gt.getCatIds()), category_keys(coco_gt, class_names)))
    per_category = {}
    for k, cat_id in enumerate(ev.params.catIds):
        if (precision[:, :, k] > -1).any():
            per_category[keys[cat_id]] = _mean_valid(precision[:, :, k], axes=(0,))
    return dict(recall=np.asarray(ev.params.recThrs, dtype=np.float64), overall=overall,
                per_category=per_category)


def _mean_valid(p: np.ndarray, axes: tuple) -> np.ndarray:
    """Mean over `axes` of the entries > -1 (pycocotools' "absent"); 0 where none."""
    valid = p > -1
    total = np.where(valid, p, 0.0).sum(axis=axes)
    count = valid.sum(axis=axes)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def write_pr_plots(runs: dict, coco_gt: COCO, folder, class_names=None) -> dict:
    """PR curve PNGs of run_cocoeval's runs into folder: pr_<iou_type>.png (overall, at
    IoU 0.50:0.95, 0.50 and 0.75) and pr_<iou_type>_per_category.png (a curve per
    category, IoU 0.50:0.95).

    Returns:
        {png path: {label: (recall float[R], precision float[R])} as drawn}.
    """
    from tools.visualize import plot_pr_curves
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for iou_type, ev in runs.items():
        if ev is None:
            continue
        curves = pr_curves(ev, coco_gt, class_names)
        for suffix, group, what in (("", "overall", "overall"),
                                    ("_per_category", "per_category", "per category, "
                                                                      "IoU=0.50:0.95")):
            path = folder / f"pr_{iou_type}{suffix}.png"
            drawn[path] = plot_pr_curves(curves["recall"], curves[group], path,
                                         title=f"{iou_type} precision-recall ({what})")
    return drawn


def format_table(metrics: dict, per_category: Optional[dict] = None) -> str:
    """A plain-text table: one row per IoU type; then, with per_category ({name:
    {iou_type: AP, "instances": n}}), a row per category: its AP per IoU type and its
    GT instances."""
    lines = [f"{'':6s}" + "".join(f"{k:>8s}" for k in METRIC_NAMES)]
    for iou_type, values in metrics.items():
        if iou_type in IOU_TYPES:
            lines.append(f"{iou_type:6s}" + "".join(_pct(values[k], 8)
                                                     for k in METRIC_NAMES))
    if per_category:
        first = next(iter(per_category.values()))
        types = [t for t in IOU_TYPES if t in first]
        width = max([len(n) for n in per_category] + [8])
        lines.append("")
        lines.append(f"{'category':{width}s}" + "".join(f"{t + ' AP':>10s}" for t in types)
                     + f"{'instances':>11s}")
        for name, row in per_category.items():
            lines.append(f"{name:{width}s}" + "".join(_pct(row[t], 10) for t in types)
                         + f"{row.get('instances', 0):>11d}")
    return "\n".join(lines)


def format_skipped(skipped: Sequence[dict], total: int, shown: int = 10) -> str:
    """One line: "skipped 2 of 40 images: a.jpg (truncated), b.png (not an image); AP
    covers the other 38" (the first `shown` files named)."""
    named = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped[:shown])
    if len(skipped) > shown:
        named += f" and {len(skipped) - shown} more"
    return (f"skipped {len(skipped)} of {total} images: {named}; AP covers the other "
            f"{total - len(skipped)}")


def _pct(value: float, width: int) -> str:
    """AP in percent; "-" for pycocotools' -1 (no GT in that range)."""
    return f"{'-':>{width}s}" if value < 0 else f"{value * 100:{width}.1f}"


# ------------------------------------------------------------------------- inference

ON_ERROR = ("raise", "skip")


class _Marked(Dataset):
    """dataset[i], except that an unreadable image (ImageError) comes back as a marker
    (None, dict(image_id, file, path, reason, error)) instead of an exception.

    Why a marker rather than a pre-check: an exception in a DataLoader worker ends the
    whole loader, and a pre-check would decode every image twice (a truncated JPEG only
    fails on a full decode). The marker costs nothing, crosses the worker boundary as
    plain strings, and the main process decides: skip the image or raise."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except ImageError as exc:
            ids = getattr(self.dataset, "ids", None)
            image_id = int(ids[index]) if ids is not None else int(index)
            coco = getattr(self.dataset, "coco", None)
            file = (coco.imgs[image_id]["file_name"] if coco is not None
                    else Path(exc.path or str(index)).name)
            return None, dict(image_id=image_id, file=str(file), reason=exc.reason,
                              path=str(exc.path or file), error=str(exc))


@torch.no_grad()
def run_inference(model, dataset, batch_size: int = 1, device="cpu",
                  mask_threshold: float = 0.5, progress: bool = True,
                  compute_loss: bool = False, on_error: str = "raise",
                  num_workers: int = 0) -> tuple[list[dict], dict, list[dict]]:
    """This rank's shard of the dataset through model.eval().

    Args:
        on_error: an unreadable image (the dataset raises engine.data.ImageError; a
            CocoInstances with its default on_error="raise" does): "raise" it, or "skip"
            it with a warning line naming it.
        num_workers: DataLoader worker processes reading the images (0: this process).
    Returns:
        (COCO results of the shard, summed losses {name: float} plus "num_images" when
        compute_loss, else {}, skipped images [dict(image_id, file, path, reason,
        error)]).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"run_inference: on_error={on_error!r}; use one of {ON_ERROR}")
    device = torch.device(device)
    model.eval()
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    indices = list(range(rank, len(dataset), world))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = DataLoader(_Marked(dataset), batch_sampler=batches, collate_fn=collate,
                        num_workers=num_workers)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        # over this rank's images; leave=None: kept when alone (maskrcnn eval), cleared
        # when it sits below the training bar (evaluation during training)
        bar = tqdm(total=len(indices), desc="eval", unit="img", leave=None,
                   dynamic_ncols=True, file=sys.stderr)
    results, loss_sums, skipped = [], {}, []
    try:
        for images, targets in loader:
            samples = [(img, t) for img, t in zip(images, targets) if img is not None]
            for bad in (t for img, t in zip(images, targets) if img is None):
                if on_error == "raise":
                    raise ImageError(bad["error"], bad["path"], bad["reason"])
                skipped.append(bad)
                _warn(bar, f"warning: skipping image {bad['file']} (id {bad['image_id']}, "
                           f"{bad['reason']}): {bad['error']}")
            if samples:
                results += _infer(model, samples, device, dataset.cat_ids, mask_threshold,
                                  loss_sums if compute_loss else None)
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    return results, loss_sums, skipped


def _infer(model, samples: list, device, cat_ids, mask_threshold: float,
           loss_sums: Optional[dict]) -> list[dict]:
    """COCO results of one batch of (image, target) samples; with loss_sums, adds the
    batch's losses (weighted by its images) and "num_images" to it."""
    images = [img.to(device) for img, _ in samples]
    if loss_sums is not None:
        targets = [{k: v.to(device) for k, v in t.items() if torch.is_tensor(v)}
                   for _, t in samples]
        detections, losses = model(images, targets)
        for k, v in losses.items():
            loss_sums[k] = loss_sums.get(k, 0.0) + float(v) * len(samples)
        loss_sums["num_images"] = loss_sums.get("num_images", 0) + len(samples)
    else:
        detections = model(images)
    results = []
    for (_, target), det in zip(samples, detections):
        results += detections_to_coco(det, target["image_id"], cat_ids, mask_threshold)
    return results


def _warn(bar, line: str) -> None:
    """A line on stderr, above the progress bar when there is one (without breaking it)."""
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def evaluate(model, dataset, batch_size: int = 1, device="cpu", mask_threshold: float = 0.5,
             progress: bool = True, compute_loss: bool = False, details: bool = False,
             results_path: Optional[str] = None, table: Optional[bool] = None,
             on_error: str = "raise", num_workers: int = 0,
             plots_dir: Optional[str] = None) -> dict:
    """COCO bbox (and segm, when the model predicts masks) AP of model on dataset.

    Args:
        model: a MaskRCNN (put in eval mode here).
        dataset: a CocoInstances with train=False (every image, its `coco` the GT) and
            on_error="raise" (its default; this function handles the errors).
        progress: a tqdm bar over the images on stderr (rank 0).
        compute_loss: also average the validation losses (result key "loss").
        details: also return "per_category" {class name: {iou_type: AP, "instances":
            GT count}} and "skipped".
        results_path: write the COCO results JSON (rank 0) there.
        table: print the AP table with the per-category AP (rank 0); None: as progress.
        on_error: an unreadable image: "raise" engine.data.ImageError, or "skip" it
            (a warning line each) and score the readable images only (COCOeval's imgIds
            restricted to them).
        num_workers: DataLoader worker processes reading the images.
        plots_dir: write precision-recall curve PNGs there (write_pr_plots).
    Returns:
        {"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...}} fractions in [0, 1]
        (-1 where the set has no GT of that size range, as pycocotools), plus "skipped"
        [dict(image_id, file, path, reason, error)] when details or any was skipped; the
        same on every rank.
    """
    results, loss_sums, skipped = run_inference(model, dataset, batch_size, device,
                                                mask_threshold, progress, compute_loss,
                                                on_error, num_workers)
    gathered = dist_utils.all_gather_object((results, loss_sums, skipped))
    skipped = sorted((s for _, _, part in gathered for s in part), key=lambda s: s["image_id"])
    if skipped and len(skipped) == len(dataset):      # every rank knows: all stop together
        raise ImageError(f"no readable image in {getattr(dataset, 'json_path', 'the data')}"
                         f": {format_skipped(skipped, len(dataset))}", skipped[0]["path"],
                         "none readable")
    out: Any = None
    if dist_utils.is_main_process():
        results = [r for part, _, _ in gathered for r in part]
        if results_path:
            write_coco(results, results_path)
        has_masks = getattr(getattr(model, "roi_heads", None), "mask_on", True)
        # Box-only ground truth has nothing to score masks against (pycocotools would fail).
        gt_masks = all(a.get("segmentation") for a in dataset.coco.dataset["annotations"])
        iou_types = IOU_TYPES if has_masks and gt_masks else ("bbox",)
        bad = {s["image_id"] for s in skipped}
        image_ids = [i for i in dataset.ids if i not in bad]
        runs = run_cocoeval(dataset.coco, results, iou_types, image_ids)
        metrics, per_category = summarize_runs(runs, dataset.coco, image_ids,
                                               dataset.class_names)
        out = dict(metrics)
        if compute_loss:
            out["loss"] = _mean_losses([sums for _, sums, _ in gathered])
        if details:
            out["per_category"] = per_category
        if details or skipped:
            out["skipped"] = skipped
        if plots_dir:
            write_pr_plots(runs, dataset.coco, plots_dir, dataset.class_names)
        if progress if table is None else table:
            print(format_table(metrics, per_category))
    return dist_utils.broadcast_object(out)


def _mean_losses(parts: Sequence[dict]) -> dict:
    """The per-image mean of the ranks' summed losses (each with "num_images")."""
    total: dict = {}
    for sums in parts:
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + v
    n = max(total.pop("num_images", 0), 1)
    return {k: v / n for k, v in total.items()}
