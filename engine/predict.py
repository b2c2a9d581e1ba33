"""Prediction on image files or folders with a trained checkpoint or a zoo model.

    model, meta = load_model("outputs/model_0090000.pth")   # or load_model("coco")
    predict(model, ["photo.jpg", "folder/"], "predictions/", meta["class_names"],
            meta["cat_ids"])

Writes one overlay PNG per image (<out>/<image stem>.png: masks, boxes, class names and
scores of the detections scoring >= score_threshold) and <out>/results.json: every
detection in the COCO results format (image_id is the image's 1-based position in the
input order, category_id the checkpoint's original COCO id), each with the image's
`file_name` added.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from builder import build_model
from configs import apply_overrides, resolve_config
from configs.loader import known_keys
from convert import zoo
from convert.weights import is_safetensors
from engine.checkpoint import load_checkpoint
from engine.evaluate import detections_to_coco
from maskrcnn import MaskRCNN
from tools.visualize import draw_detections

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def load_model(weights, device="cpu", overrides: Optional[dict] = None):
    """The MaskRCNN of a training checkpoint (eval mode) and its metadata.

    Args:
        weights: a checkpoint written by engine/train.py (it holds the config and the
            class mapping; loaded with weights_only=True), a weights file exported from
            one (`maskrcnn export-weights`), or "coco" / a model-zoo name (convert.zoo.ZOO:
            downloaded once, verified, with its COCO categories).
        overrides: config keys to change for inference (e.g. box_score_thresh).
    Returns:
        (model, dict(class_names, cat_ids, config, iteration)).
    """
    if is_zoo_name(weights) or is_safetensors(weights):
        return _load_pretrained(weights, device, overrides or {})
    state = load_checkpoint(weights)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{weights}: not a training checkpoint of this library (expected "
                         f"the keys 'model' and 'config'; got "
                         f"{sorted(state)[:8] if isinstance(state, dict) else type(state)})")
    cfg = apply_overrides(resolve_config(known_keys(state["config"])), overrides or {})
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{weights}: the weights do not fit the model its config "
                         f"describes: {str(err)[:300]}") from None
    model.to(device).eval()
    k = model.num_classes
    meta = dict(class_names=list(state.get("class_names") or [str(i) for i in range(1, k + 1)]),
                cat_ids=list(state.get("cat_ids") or range(1, k + 1)), config=cfg,
                iteration=state.get("iteration"))
    return model, meta


def is_zoo_name(weights) -> bool:
    """"coco" or a name of convert.zoo.ZOO (anything else is a file path)."""
    return str(weights) == "coco" or str(weights) in zoo.ZOO


def _load_pretrained(weights, device, overrides: dict):
    """A zoo model or an exported weights file: MaskRCNN(pretrained=...) rebuilds it."""
    model = MaskRCNN(pretrained=str(weights), **overrides).to(device).eval()
    labels = range(1, model.num_classes + 1)
    categories = model.categories or {}
    meta = dict(class_names=[categories.get(i, (str(i), i))[0] for i in labels],
                cat_ids=[categories.get(i, (str(i), i))[1] for i in labels],
                config=model.cfg, iteration=None)
    return model, meta


def collect_images(paths: Sequence[Union[str, Path]]) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"image file or folder not found: {p}")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in "
                                f"{[str(p) for p in paths]}")
    return found


@torch.no_grad()
def predict(model, paths: Sequence[Union[str, Path]], out_dir, class_names: Sequence[str],
            cat_ids: Sequence[int], score_threshold: float = 0.5,
            mask_threshold: float = 0.5, device="cpu", progress: bool = True) -> Path:
    """Overlay PNGs and results.json for every image; returns the JSON's path."""
    from engine.data import load_rgb
    files = collect_images(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    results = []
    stems: dict[str, int] = {}
    iterator = files
    if progress:
        from tqdm import tqdm
        iterator = tqdm(files, desc="predict", dynamic_ncols=True)
    for image_id, path in enumerate(iterator, start=1):
        image = load_rgb(path)
        detection = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        for r in detections_to_coco(detection, image_id, cat_ids, mask_threshold):
            r["file_name"] = str(path)
            results.append(r)
        # two inputs with the same stem (a.png, a.jpg) must not overwrite each other
        n = stems.get(path.stem, 0)
        stems[path.stem] = n + 1
        name = path.stem if n == 0 else f"{path.stem}_{n}"
        draw_detections(image, detection, class_names, score_threshold,
                        mask_threshold).save(out_dir / f"{name}.png")
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results))
    return json_path
