"""Pictures: detection overlays (masks, boxes, class names, scores) and training curves.

    overlay = draw_detections(image, detection, class_names, score_threshold=0.5)
    overlay.save("out.png")
    plot_training("outputs/log.jsonl", "outputs/loss.png")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

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
    """Overlay of the detections scoring >= score_threshold.

    Args:
        image: Tensor[3, H, W] in [0, 1].
        detection: dict(boxes Tensor[D, 4] (x1, y1, x2, y2), labels Tensor[D] in 1..K,
            scores Tensor[D], optional masks Tensor[D, 1, H, W] probabilities).
        class_names: name of label l is class_names[l - 1].
    """
    base = np.asarray(to_pil(image)).astype(np.float32)
    keep = (detection["scores"] >= score_threshold).nonzero().flatten().tolist()
    masks = detection.get("masks")
    for i in keep:
        if masks is not None:
            color = np.array(_color(int(detection["labels"][i])), dtype=np.float32)
            m = (masks[i, 0] >= mask_threshold).cpu().numpy()
            base[m] = (1 - alpha) * base[m] + alpha * color
    out = Image.fromarray(base.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i in keep:
        label = int(detection["labels"][i])
        color = _color(label)
        x1, y1, x2, y2 = [float(v) for v in detection["boxes"][i]]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=1)
        name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
        text = f"{name} {float(detection['scores'][i]):.2f}"
        tx, ty = x1, max(y1 - 11, 0)
        box = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(box, fill=color)
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)
    return out


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
