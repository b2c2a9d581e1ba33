"""The config files that ship with the package: the defaults (config.ini), the demo recipe
(demo.ini) and the model-zoo presets (zoo/<source>/<model>.ini).

    shipped("config.ini")                  the package's defaults, an absolute Path
    shipped("zoo/torchvision/maskrcnn_resnet50_fpn.ini")
    repo_relative("configs/demo.ini")      a path as written in the repository, or None

They are package data of this package, found with importlib.resources, so an installed
wheel reads its own copies whatever the working directory. config.ini lives at the
repository root (where users read it); setup.py copies it in here when it builds a
wheel, and a source checkout (a dev or editable install) reads it from the root.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Optional, Union

# pip installs packages unzipped, so the package's resources are plain files.
_HERE = Path(str(files(__package__)))
# The repository root when this is a source checkout (never an installed site-packages:
# a stray config.ini there must not be mistaken for the defaults).
_SOURCE_ROOT = _HERE.parent if (_HERE.parent / "setup.py").is_file() else None


def shipped(name: str) -> Path:
    """The absolute path of the shipped config `name` (relative to this package, e.g.
    "config.ini", "demo.ini", "zoo/detectron2/mask_rcnn_R_50_FPN_3x.ini").

    Raises FileNotFoundError when the package does not ship it."""
    path = _HERE.joinpath(*Path(name).parts)
    if path.is_file():
        return path
    if name == "config.ini" and _SOURCE_ROOT is not None:
        return _SOURCE_ROOT / "config.ini"
    raise FileNotFoundError(f"config {name!r} is not shipped with the package ({_HERE})")


def repo_relative(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The shipped file a relative path names as written in the repository ("config.ini",
    "configs/demo.ini", "configs/zoo/..."), or None when it names no shipped file."""
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts:
        return None
    if parts == ("config.ini",):
        name = "config.ini"
    elif len(parts) > 1 and parts[0] == "configs":
        name = "/".join(parts[1:])
    else:
        return None
    try:
        return shipped(name)
    except FileNotFoundError:
        return None
