"""Pictures: detection overlays (masks, boxes, class names, scores), training curves and
precision-recall curves.

    overlay = draw_detections(image, detection, class_names, score_threshold=0.5)
    overlay.save("out.png")
    plot_training("outputs/log.jsonl", "outputs/loss.png")
    plot_pr_curves(recall, {"circle": precision}, "pr.png")   # arrays in, PNG out
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

# Distinct colours (tab10), one per class label (cycled).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def to_pil(image: Tensor) -> Image.Image:
    """Tensor[3, H, W] float in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def draw_detections(image: Tensor, detection: dict, class_names: Sequence[str],
                    score_threshold: float = 0.5, mask_threshold: float = 0.5,
                    alpha: float = 0.45) -> Image.Image:
    """Overlay of the detections scoring >= score_threshold: masks blended in their
    class colour (torchvision.utils.draw_segmentation_masks; where masks overlap, the
    higher-scoring detection's colour), box outlines (draw_bounding_boxes) and a label
    "name score" ("person 0.87") on the box's colour just above the box (inside it at
    the image's top edge), where it hides none of a small object's mask.

    Args:
        image: Tensor[3, H, W] in [0, 1].
        detection: dict(boxes Tensor[D, 4] (x1, y1, x2, y2), labels Tensor[D] in 1..K,
            scores Tensor[D], optional masks Tensor[D, 1, H, W] probabilities).
        class_names: name of label l is class_names[l - 1] (else the label's number).
    Returns:
        An RGB PIL image of the input's size; pixels no detection touches keep their
        value.
    """
    image = image.detach().float().clamp(0, 1).cpu()
    scores = detection["scores"].detach().float().cpu()
    # highest score first: drawn on top, and its colour wins where masks overlap
    keep = [i for i in scores.argsort(descending=True, stable=True).tolist()
            if scores[i] >= score_threshold]
    if not keep:
        return to_pil(image)
    labels = [int(detection["labels"][i]) for i in keep]
    colors = [_color(label) for label in labels]
    masks = detection.get("masks")
    if masks is not None:
        masks = masks.detach().cpu()
        masks = masks[:, 0] if masks.dim() == 4 else masks
        drawn = masks[keep] >= mask_threshold
        covered = torch.zeros(drawn.shape[1:], dtype=torch.bool)
        for m in drawn:                          # each pixel shows one (the top) mask
            m &= ~covered
            covered |= m
        # floats in, so pixels outside every mask come back unchanged
        image = draw_segmentation_masks(image, drawn, alpha=alpha, colors=colors)
    pixels = (image * 255).round().clamp(0, 255).to(torch.uint8)
    boxes = detection["boxes"].detach().float().cpu()[keep]
    # lowest score first, so the highest-scoring outline ends on top
    pixels = draw_bounding_boxes(pixels, boxes.flip(0), colors=colors[::-1], width=1)
    out = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    _draw_labels(out, boxes, detection_labels(detection, class_names, keep), colors)
    return out


def detection_labels(detection: dict, class_names: Sequence[str],
                     indices: Optional[Sequence[int]] = None) -> list[str]:
    """The label texts of draw_detections, "name score" (e.g. "person 0.87"), for the
    detections `indices` (default: all)."""
    if indices is None:
        indices = range(len(detection["scores"]))
    texts = []
    for i in indices:
        label = int(detection["labels"][i])
        name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
        texts.append(f"{name} {float(detection['scores'][i]):.2f}")
    return texts


def _draw_labels(out: Image.Image, boxes: Tensor, texts: Sequence[str],
                 colors: Sequence[tuple]) -> None:
    """Each text in white on its colour, above its box's top-left corner (inside the box
    when the box touches the image's top; moved left when it would run off the right
    edge). Drawn last first, so the highest-scoring detection's label is on top."""
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for box, text, color in reversed(list(zip(boxes.tolist(), texts, colors))):
        x1, y1 = box[0], box[1]
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx, ty = max(min(x1, out.width - right - 1), 0), max(y1 - bottom - 1, 0)
        draw.rectangle(draw.textbbox((tx, ty), text, font=font), fill=color)
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)


def _color(label: int) -> tuple:
    return PALETTE[(label - 1) % len(PALETTE)]


def read_log(path) -> list[dict]:
    """The records of a log.jsonl (unreadable lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_training(log_path, out_path, title: Optional[str] = None) -> Optional[Path]:
    """PNG of the loss curves (total and each term, log scale) and, when the log holds
    evaluations, bbox/segm AP over iterations. Returns the path (None without records)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if "losses" in r]
    evals = [r for r in records if "eval" in r]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4),
                             squeeze=False)
    ax = axes[0, 0]
    iters = [r["iter"] for r in train]
    if train:
        ax.plot(iters, [r["loss"] for r in train], label="total", color="black", lw=1.5)
        for key in train[-1]["losses"]:
            ax.plot(iters, [r["losses"].get(key, float("nan")) for r in train],
                    label=key, lw=1)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0, 1]
        for iou_type in ("bbox", "segm"):
            pts = [(r["iter"], r["eval"][iou_type]["AP"], r["eval"][iou_type]["AP50"])
                   for r in evals if iou_type in r["eval"]]
            if pts:
                x, ap, ap50 = zip(*pts)
                ax.plot(x, ap, marker="o", label=f"{iou_type} AP")
                ax.plot(x, ap50, marker="x", ls="--", label=f"{iou_type} AP50")
        ax.set_xlabel("iteration")
        ax.set_ylabel("AP")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_pr_curves(recall, curves: dict, out_path, title: Optional[str] = None) -> dict:
    """PNG of precision-recall curves on one axes, each labelled with its mean precision
    (the AP, for pycocotools' 101-point curves).

    Args:
        recall: float[R] recall values (the x of every curve).
        curves: {label: precision float[R]}.
    Returns:
        {label: (x float[R], y float[R])}: the data of the lines as drawn (read back from
        the figure).
    """
    import numpy as np
    from matplotlib.figure import Figure     # no pyplot: no global state, faster import

    # many curves (COCO's 80 categories): the legend in columns right of the axes
    columns = 0 if len(curves) <= 10 else -(-len(curves) // 30)
    width = 6 + 1.7 * columns
    fig = Figure(figsize=(width, 4.5))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.6 / width, right=1 - (0.15 + 1.7 * columns) / width,
                        bottom=0.11, top=0.93)
    for i, (label, precision) in enumerate(curves.items()):
        # the 10 colours repeat: each round of them in another line style
        ax.plot(recall, precision, lw=1.5, ls=("-", "--", ":", "-.")[i // 10 % 4],
                label=f"{label} (AP {100 * float(np.mean(precision)):.1f})")
    drawn = {label: (np.asarray(line.get_xdata(), dtype=np.float64),
                     np.asarray(line.get_ydata(), dtype=np.float64))
             for label, line in zip(curves, ax.get_lines())}
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if columns:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=columns)
    elif curves:
        ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return drawn
