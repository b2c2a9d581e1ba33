"""Model zoo: COCO-pretrained Mask R-CNN checkpoints and their presets.

    ZOO[name]            a ZooEntry: preset config, URL, published hash, COCO AP, source
    resolve_name(p, b)   "coco" / a zoo name -> its ZooEntry; anything else -> None (a path)
    fetch(entry)         the checkpoint in the torch hub cache, downloaded and verified once
                         (tools.download.fetch; content checks read through convert.weights)
    read_checkpoint(p)   a torch .pth, detectron2 .pkl or safetensors file as a dict of
                         tensors; never runs code (convert.weights.read_file)
    categories_for(src)  model label -> (COCO name, COCO category id)

The download, cache and safe-unpickling layer is tools/download.py; its names are
re-exported here so that the zoo reads as one module.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Optional

import configs
from convert.weights import COCO_CATEGORIES, categories_for, read_file  # noqa: F401
from tools import download
from tools.download import (OFFLINE_ENV, SOURCES, ChecksumError, DownloadError,  # noqa: F401
                            UnsafeCheckpointError, cache_dir, cached_file, sha256_file)

# The folder holding the top-level packages: the repository root in a checkout.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# How the zoo reads a file (patched by tests that forbid reading).
_read = read_file
read_checkpoint = read_file


class ZooEntry(download.ZooEntry):
    """One pretrained checkpoint (see tools.download.ZooEntry for the fields), with what
    its preset and source say: the preset's path and the categories."""

    @property
    def preset_path(self) -> Path:
        """The preset config as an absolute path: the package's shipped copy (see
        configs.shipped), wherever the package is installed."""
        return configs.shipped(Path(self.preset).relative_to("configs").as_posix())

    @property
    def categories(self) -> dict[int, tuple[str, int]]:
        """Model label -> (COCO name, COCO category id); see categories_for."""
        return categories_for(self.source)


def _torchvision(model: str, sha256: str, box_ap: float, mask_ap: float,
                 backbone: str) -> ZooEntry:
    """A torchvision weights file: <model>_coco-<sha256 prefix>.pth."""
    return ZooEntry(name=f"torchvision/{model}", preset=f"configs/zoo/torchvision/{model}.ini",
                    url=f"{_TV}/{model}_coco-{sha256}.pth", sha256=sha256, box_ap=box_ap,
                    mask_ap=mask_ap, source="torchvision", backbone=backbone)


def _detectron2(model: str, folder: str, file: str, box_ap: float, mask_ap: float,
                backbone: str) -> ZooEntry:
    """A detectron2 model-zoo file: <folder>/<model>/<run>/model_final_<hash>.pkl (no hash
    published: checked by content, see fetch)."""
    return ZooEntry(name=f"detectron2/{model}", preset=f"configs/zoo/detectron2/{model}.ini",
                    url=f"{_D2}/{folder}/{model}/{file}", sha256=None, box_ap=box_ap,
                    mask_ap=mask_ap, source="detectron2", backbone=backbone)


_TV = "https://download.pytorch.org/models"
_D2 = "https://dl.fbaipublicfiles.com/detectron2"
_IS, _NB = "COCO-InstanceSegmentation", "new_baselines"     # detectron2's zoo folders
# APs: torchvision's weights meta and detectron2's MODEL_ZOO.md (tests check both).
ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    _torchvision("maskrcnn_resnet50_fpn", "bf2d0c1e", 37.9, 34.6, "resnet50"),
    _torchvision("maskrcnn_resnet50_fpn_v2", "73cbd019", 47.4, 41.8, "resnet50"),
    _detectron2("mask_rcnn_R_50_FPN_3x", _IS, "137849600/model_final_f10217.pkl",
                41.0, 37.2, "resnet50"),
    _detectron2("mask_rcnn_R_101_FPN_3x", _IS, "138205316/model_final_a3ec72.pkl",
                42.9, 38.6, "resnet101"),
    _detectron2("mask_rcnn_X_101_32x8d_FPN_3x", _IS, "139653917/model_final_2d9806.pkl",
                44.3, 39.5, "resnext101"),
    _detectron2("mask_rcnn_R_50_FPN_400ep_LSJ", _NB, "42019571/model_final_14d201.pkl",
                47.4, 42.5, "resnet50"),
    _detectron2("mask_rcnn_R_101_FPN_400ep_LSJ", _NB, "42073830/model_final_f96b26.pkl",
                48.9, 43.7, "resnet101"),
]}

# pretrained="coco": the best checkpoint for each backbone.
COCO_FOR_BACKBONE: dict[str, str] = {
    "resnet101": "detectron2/mask_rcnn_R_101_FPN_400ep_LSJ",
    "resnet50": "detectron2/mask_rcnn_R_50_FPN_400ep_LSJ",
    "resnext101": "detectron2/mask_rcnn_X_101_32x8d_FPN_3x",
}


def resolve_name(pretrained: str, backbone: str) -> Optional[ZooEntry]:
    """The zoo entry `pretrained` names, or None when it is not a zoo name (a file path).

    "coco" means COCO_FOR_BACKBONE[backbone]; a zoo name ("detectron2/...") its entry.

    Raises:
        ValueError: "coco" for a backbone without COCO weights (lists those with), or a
            string starting with "torchvision/" / "detectron2/" that is not in ZOO (lists
            the closest and all valid names).
    """
    if pretrained == "coco":
        if backbone not in COCO_FOR_BACKBONE:
            raise ValueError(f"pretrained='coco': no COCO checkpoint for backbone "
                             f"{backbone!r}; backbones with one: "
                             f"{', '.join(sorted(COCO_FOR_BACKBONE))}")
        return ZOO[COCO_FOR_BACKBONE[backbone]]
    if pretrained in ZOO:
        return ZOO[pretrained]
    # A mistyped zoo name must not be taken for a (missing) file path.
    if pretrained.startswith(tuple(f"{s}/" for s in SOURCES)):
        close = difflib.get_close_matches(pretrained, list(ZOO), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"pretrained={pretrained!r} is not in the model zoo.{hint} "
                         f"Valid names: {', '.join(ZOO)}")
    return None


def fetch(entry: download.ZooEntry, progress: bool = True,
          check_content: Optional[Callable[[dict], None]] = None) -> Path:
    """tools.download.fetch, reading files for content checks with convert.weights."""
    return download.fetch(entry, progress, check_content, read=_read)


# ------------------------------------------------------------------------ listings

def describe_zoo() -> list[dict]:
    """One row per entry for `maskrcnn zoo`: name, preset, box_ap, mask_ap, cached, path."""
    rows = []
    for entry in ZOO.values():
        path = cached_file(entry)
        rows.append({"name": entry.name, "preset": entry.preset, "box_ap": entry.box_ap,
                     "mask_ap": entry.mask_ap, "cached": path.is_file(), "path": str(path)})
    return rows


def zoo_markdown_table() -> str:
    """The zoo as a markdown table (name, preset, box AP, mask AP, source, URL)."""
    lines = ["| name | preset | box AP | mask AP | source | URL |",
             "|---|---|---:|---:|---|---|"]
    for e in ZOO.values():
        lines.append(f"| `{e.name}` | `{e.preset}` | {e.box_ap:.1f} | {e.mask_ap:.1f} "
                     f"| {e.source} | [{e.filename}]({e.url}) |")
    return "\n".join(lines) + "\n"
