"""What a training run starts from: the seeds, the data sets and the model's initial
weights ([model] pretrained, [solver] init_weights, [data])."""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from easydict import EasyDict
from torch import nn

from builder import build_model
from configs.loader import AUTO, defaults, with_num_classes
from engine.checkpoint import load_checkpoint


class RunConfigError(ValueError):
    """The config cannot train on its data as written (the message names the keys, the
    values and what to set instead)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _is_disabled(path: Any) -> bool:
    return path is None or str(path).strip().lower() in ("", "none")


def build_datasets(cfg: EasyDict, verbose: bool = True):
    """(train CocoInstances, val CocoInstances or None) from cfg.data: COCO JSONs as they
    are, the other formats ([data] format) through engine.formats.to_coco; the validation
    set gets the training set's classes. val is None also when val_json / val_images are
    config.ini's COCO defaults and absent (a note says so). With [data] check_data, both
    are checked (check_before_training) before the model is built."""
    from engine.data import CocoInstances
    d = cfg.data
    train_source, train_root = data_source(d, "train", d.classes)
    train_set = CocoInstances(train_source, train_root, train=True,
                              skip_empty=d.skip_empty, flip_prob=d.flip_prob, lsj=d.lsj,
                              lsj_scale=d.lsj_scale, lsj_size=d.lsj_size)
    val_set = None
    if _default_val_set_missing(d):
        if verbose:
            print(f"note: training without evaluation: [data] val_json = {d.val_json} is "
                  f"config.ini's default and does not exist; set val_json and val_images "
                  f"to evaluate (and for model_best.pth), or val_json = none",
                  file=sys.stderr)
    elif not _is_disabled(d.val_json):
        val_source, val_root = data_source(d, "val", train_set.class_names)
        val_set = CocoInstances(val_source, val_root, train=False)
    if d.check_data:     # before the emptiness test: the report says why it is empty
        check_before_training(train_set, val_set, d)
    if len(train_set) == 0:
        raise ValueError(f"[data] train_json = {d.train_json}: no usable training images")
    return train_set, val_set


def data_source(d: EasyDict, split: str, classes):
    """(COCO JSON path or dict, image folder) of [data] {split}_json / {split}_images."""
    from engine.formats import FORMATS, FormatError, to_coco
    fmt = str(d.format).strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"[data] format = {d.format}: use one of {', '.join(FORMATS)}")
    source, images = d[f"{split}_json"], d[f"{split}_images"]
    hint = " (set val_json = none to train without evaluation)" if split == "val" else ""
    if not Path(source).exists():
        raise FileNotFoundError(f"[data] {split}_json = {source}: not found{hint}")
    # coco needs the image folder; the other formats find their images (none allowed)
    given = not _is_disabled(images)
    if (given or fmt == "coco") and not (given and Path(images).exists()):
        extra = "" if fmt == "coco" else f" (with format = {fmt}, none is allowed)"
        raise FileNotFoundError(f"[data] {split}_images = {images}: not found{extra}{hint}")
    if fmt == "coco":
        return source, images
    try:
        return to_coco(fmt, source, None if _is_disabled(images) else images, split=split,
                       classes=classes)
    except FormatError as err:
        raise ValueError(f"[data] format = {fmt}, {split}_json = {source}: {err}") from err


def check_before_training(train_set, val_set, d: EasyDict) -> None:
    """[data] check_data: engine.check's fast checks (image headers, not pixels) of the
    data sets as loaded. Raises engine.check.DataCheckError (its report() is the table)
    on errors; prints the warnings' table to stderr (rank 0)."""
    from engine.check import DataCheckError, check_sets, format_report, has_errors
    from engine.distributed import is_main_process
    sets = [("train", d.train_json, train_set.coco.dataset, train_set.image_dir)]
    if val_set is not None:
        sets.append(("val", d.val_json, val_set.coco.dataset, val_set.image_dir))
    checked = check_sets(sets, fast=True, progress=is_main_process())
    if has_errors(checked):
        raise DataCheckError(checked, "[data] check_data")
    if is_main_process() and any(c.findings for c in checked):
        print(format_report(checked, details=False, stats=False) + "\n(maskrcnn check-data "
              "--config FILE prints the details; [data] check_data = false skips the "
              "check)", file=sys.stderr)


def _default_val_set_missing(d: EasyDict) -> bool:
    """Whether [data] val_json / val_images are config.ini's COCO defaults, left as they
    are (a config of one's own data names only train_json and train_images), and absent."""
    default = defaults().data
    return (d.val_json, d.val_images) == (default.val_json, default.val_images) and \
        not (Path(d.val_json).exists() and Path(d.val_images).exists())


def build_initial_model(cfg: EasyDict, verbose: bool = True) -> nn.Module:
    """The model to train: with [model] pretrained set (coco, a zoo name, a checkpoint of
    any supported format, imagenet), MaskRCNN(pretrained=...) with cfg's num_classes (a
    zoo model brings its preset's architecture; the returned model's cfg is the merged
    one, and other classes than the checkpoint's re-initialise only the predictors).
    Else build_model(cfg) initialised as [solver] init_weights says: none (random),
    imagenet (ImageNet backbone from the torch hub cache), a training checkpoint (its
    model weights whose shapes match, e.g. to fine-tune with other classes) or a file of
    ImageNet ResNet weights."""
    pretrained = cfg.model.pretrained
    if pretrained is not None and str(pretrained).lower() != "none":
        from maskrcnn import MaskRCNN
        return MaskRCNN(num_classes=cfg.model.num_classes, pretrained=str(pretrained),
                        config=cfg)
    init = str(cfg.solver.init_weights).strip()
    if _is_disabled(init):
        if cfg.backbone.norm == "frozen_bn" and verbose:
            print("warning: norm = frozen_bn with random init: the frozen BatchNorm "
                  "statistics are random and training cannot fix them; use norm = bn or gn, "
                  "or [solver] init_weights = imagenet", file=sys.stderr)
        return build_model(cfg)
    if init == "imagenet":
        return build_model(cfg, pretrained_backbone="imagenet")
    if not Path(init).is_file():
        raise FileNotFoundError(f"[solver] init_weights = {init}: file not found")
    state = load_checkpoint(init)
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict)):
        return build_model(cfg, pretrained_backbone=init)
    model = build_model(cfg)
    own = model.state_dict()
    usable = {k: v for k, v in state["model"].items()
              if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    if verbose:
        print(f"init_weights {init}: {len(usable)} tensors loaded"
              + (f", {len(skipped)} kept at random init ({', '.join(skipped[:4])}"
                 f"{', ...' if len(skipped) > 4 else ''})" if skipped else ""))
    return model


def prepare_run(cfg: EasyDict, main: bool, rank: int,
                device: torch.device) -> tuple[EasyDict, nn.Module, Any, Any]:
    """(cfg, model on `device`, train set, val set or None) of a run. The classes are
    the training set's (num_classes = auto; see classes_from_data); the returned cfg is
    the model's: a zoo model's preset architecture with this config's values."""
    train_set, val_set = build_datasets(cfg, verbose=main)
    cfg = classes_from_data(cfg, train_set, main)
    seed_everything(cfg.solver.seed + rank)
    model = build_initial_model(cfg, verbose=main).to(device)
    return model.cfg, model, train_set, val_set


def classes_from_data(cfg: EasyDict, train_set, verbose: bool = True) -> EasyDict:
    """cfg with [model] num_classes = auto set to the training set's K (its 'categories',
    annotated or not; rank 0 prints them). An integer num_classes must equal K: labels
    beyond the data's categories would have no name and no COCO id to evaluate with, and
    categories beyond num_classes no output.

    Raises:
        RunConfigError naming both numbers and the file when they differ.
    """
    k, found = cfg.model.num_classes, train_set.num_classes
    if k == AUTO:
        if verbose:
            names = ", ".join(train_set.class_names[:10])
            more = f", ... ({found} in all)" if found > 10 else ""
            print(f"classes from {cfg.data.train_json}: {found} ({names}{more})")
        return with_num_classes(cfg, found)
    if k != found:
        raise RunConfigError(
            f"[model] num_classes = {k} but [data] train_json = {cfg.data.train_json} has "
            f"{found} categories; set num_classes = auto (or {found}) to train on the "
            f"data's classes")
    return cfg


def build_train_loader(train_set, solver: EasyDict, num_workers: int, world: int,
                       distributed: bool):
    """The training DataLoader at epoch 0: this rank's share of each global batch of
    solver.batch_size images, in an order seeded by solver.seed (engine.data.build_loader)."""
    from engine.data import build_loader
    loader = build_loader(train_set, batch_size=solver.batch_size // world, shuffle=True,
                          num_workers=num_workers, seed=solver.seed, distributed=distributed)
    loader.sampler.set_epoch(0)
    return loader
