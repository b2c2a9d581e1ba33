"""The config language: config.ini's schema, typed parsing, overrides, and how a model's
config is resolved from the defaults, a user's file, a zoo preset or a checkpoint.

The schema is the shipped config.ini itself: every key's type is inferred from its
default value (int, float, bool, str, tuple[int], tuple[float], or any for "none").

    cfg = load_config("my.ini")                 # EasyDict {section: {key: value}}
    cfg = apply_overrides(cfg, {"min_size": 640, "solver.lr": 0.01})

The model sections (MODEL_SECTIONS) are read by builder.py; the others by the tools
(train, data, eval, demo).
"""
from __future__ import annotations

import configparser
import copy
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

from easydict import EasyDict

from .files import repo_relative, shipped

# The package's own config.ini (configs.shipped finds it with importlib.resources in a
# wheel, at the repository root in a checkout), never a config.ini of the working
# directory.
DEFAULT_CONFIG = shipped("config.ini")

# Sections read by builder.build_model; every other section belongs to the tools.
MODEL_SECTIONS = ("model", "backbone", "transform", "anchors", "rpn", "roi_heads",
                  "box_head", "mask_head")

# Model-section keys that MaskRCNN's constructor reads (the builder reads the others).
CONSTRUCTOR_KEYS = ("model.pretrained",)


_INT = re.compile(r"^[+-]?\d+$")
# A default of "auto" types the key as an int that may also stay "auto" (decided at run
# time, e.g. [model] num_classes from the training data).
AUTO = "auto"
_AUTO_INT = "int or auto"

_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _infer_type(text: str) -> str:
    """Type tag of a value in the default config: the schema."""
    text = text.strip()
    if text.lower() == "none":
        return "any"
    if text.lower() == AUTO:
        return _AUTO_INT
    if text.lower() in ("true", "false"):
        return "bool"
    if "," in text:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return "tuple[int]" if all(_INT.match(t) for t in items) else "tuple[float]"
    if _INT.match(text):
        return "int"
    return "float" if _is_float(text) else "str"


def _parse_text(text: str, kind: str) -> Any:
    """Parse a config string as `kind`; raises ValueError (caller adds the context)."""
    text = text.strip()
    if kind == "any":
        return None if text.lower() == "none" else _parse_text(text, _infer_type(text))
    if kind == _AUTO_INT:
        return AUTO if text.lower() == AUTO else _parse_text(text, "int")
    if kind == "int":
        if not _INT.match(text):
            raise ValueError
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bool":
        return _BOOLS[text.lower()]
    if kind == "str":
        return text
    items = [t.strip() for t in text.split(",")]
    if items and items[-1] == "":
        items = items[:-1]                 # "800," is a one-element tuple
    if not items:
        raise ValueError
    return tuple(_parse_text(t, kind[6:-1]) for t in items)


def _coerce(value: Any, kind: str) -> Any:
    """A Python value (an override) as `kind`; strings are parsed like config text."""
    if isinstance(value, str) and kind != "str":
        return _parse_text(value, kind)
    if kind == "any":
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind in ("int", _AUTO_INT) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind.startswith("tuple"):
        items = value if isinstance(value, (list, tuple)) else (value,)
        return tuple(_coerce(v, kind[6:-1]) for v in items)
    raise ValueError


@lru_cache(maxsize=1)
def _schema() -> dict[str, dict[str, tuple[str, str]]]:
    """{section: {key: (type tag, default text)}} from the shipped config.ini."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    if not parser.read(DEFAULT_CONFIG):     # read() skips a missing file silently
        raise FileNotFoundError(f"the package's default config is missing: {DEFAULT_CONFIG}")
    return {s: {k: (_infer_type(v), v) for k, v in parser[s].items()}
            for s in parser.sections()}


def defaults() -> EasyDict:
    return EasyDict({s: {k: _parse_text(text, kind) for k, (kind, text) in keys.items()}
                     for s, keys in _schema().items()})


def load_config(path: Union[str, os.PathLike] = DEFAULT_CONFIG) -> EasyDict:
    """Read a config file over the defaults of the shipped config.ini. A relative path
    is taken relative to the working directory, as written (see resolve_config for the
    fallback to the shipped files).

    Returns:
        EasyDict {section: {key: typed value}} with every key of the schema.
    Raises:
        ValueError naming file, section, key, value and expected type for an unknown
        section or key or a value of the wrong type. FileNotFoundError if missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path)
    schema, cfg = _schema(), defaults()
    for section in parser.sections():
        if section not in schema:
            raise ValueError(f"{path}: unknown section [{section}] "
                             f"(known: {', '.join(schema)})")
        for key, text in parser[section].items():
            if key not in schema[section]:
                raise ValueError(f"{path}: [{section}] unknown key {key!r} = {text!r}")
            kind = schema[section][key][0]
            try:
                cfg[section][key] = _parse_text(text, kind)
            except (ValueError, KeyError):
                raise ValueError(f"{path}: [{section}] {key} = {text!r}: expected {kind}") \
                    from None
    return cfg


def find_key(name: str) -> tuple[str, str]:
    """(section, key) of an override name: a bare key (unique) or "section.key"."""
    schema = _schema()
    if "." in name:
        section, key = name.split(".", 1)
        if section in schema and key in schema[section]:
            return section, key
        raise ValueError(f"unknown config key {name!r}")
    sections = [s for s in schema if name in schema[s]]
    if len(sections) != 1:
        problem = "unknown" if not sections else f"ambiguous (in {sections})"
        raise ValueError(f"config key {name!r} is {problem}; use 'section.key'")
    return sections[0], name


def apply_overrides(cfg: EasyDict, overrides: dict[str, Any]) -> EasyDict:
    """A copy of `cfg` with `overrides` ({bare key or "section.key": value}) applied,
    each value checked against the schema's type (strings are parsed)."""
    cfg = copy.deepcopy(cfg)
    for name, value in overrides.items():
        section, key = find_key(name)
        kind = _schema()[section][key][0]
        try:
            cfg[section][key] = _coerce(value, kind)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"override {name}={value!r}: [{section}] {key} expects "
                             f"{kind}") from None
    return EasyDict(cfg)


def with_num_classes(cfg: EasyDict, count: int) -> EasyDict:
    """cfg with [model] num_classes = auto made `count` (the classes of the training data
    or of the pretrained weights; builder.COCO_NUM_CLASSES when nothing tells). An
    integer num_classes is kept: cfg itself is returned."""
    if cfg.model.num_classes != AUTO:
        return cfg
    return apply_overrides(cfg, {"model.num_classes": count})


def configured_backbone(cfg: EasyDict, overrides: dict[str, Any]) -> str:
    for name in ("backbone", "backbone.backbone"):
        if name in overrides:
            return str(overrides[name])
    return cfg.backbone.backbone


def overlay_config(base: EasyDict, user: EasyDict, overrides: dict[str, Any],
                    what: str) -> EasyDict:
    """`base` (a zoo preset, or the config stored in a checkpoint), with the user's config
    values that differ from the shipped defaults laid over it (test-time settings, data,
    solver). The architecture is the base's: a backbone override that names another one
    is an error."""
    cfg = copy.deepcopy(base)
    backbone = overrides.pop("backbone", overrides.pop("backbone.backbone", None))
    if backbone is not None and backbone != cfg.backbone.backbone:
        raise ValueError(f"backbone={backbone!r} conflicts with {what} "
                         f"({cfg.backbone.backbone}); leave backbone out, or pick a model "
                         f"for {backbone!r}")
    default = defaults()
    for section, keys in user.items():
        for key, value in keys.items():
            own = (section, key) in (("backbone", "backbone"), ("model", "num_classes"),
                                     ("model", "pretrained"))
            if not own and value != default[section][key]:
                cfg[section][key] = value
    return cfg


def known_keys(config: dict) -> dict:
    """A stored config without the sections and keys this version no longer has."""
    schema = _schema()
    return {s: {k: v for k, v in keys.items() if k in schema.get(s, {})}
            for s, keys in config.items() if s in schema}


def explicit_keys(config: Union[str, os.PathLike, dict, None],
                   overrides: dict[str, Any]) -> set[str]:
    """"section.key" of every key the user set: in overrides, in the config file, or (a
    loaded config) with a value other than the default."""
    keys = {".".join(find_key(name)) for name in overrides}
    if isinstance(config, dict):
        default = defaults()
        keys |= {f"{s}.{k}" for s, values in config.items() for k, v in values.items()
                 if s in default and k in default[s] and v != default[s][k]}
    elif config is not None:
        path = Path(config)
        path = path if path.exists() else (repo_relative(path) or path)
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        parser.read(path)
        keys |= {f"{s}.{k}" for s in parser.sections() for k in parser[s]}
    return keys


# Trained from scratch, frozen BatchNorm keeps random statistics and frozen stages keep
# random weights; torchvision too trains every stage with BatchNorm when given no weights.
FROM_SCRATCH = {"backbone.norm": "bn", "backbone.trainable_layers": 5}


def trainable_without_weights(cfg: EasyDict, explicit: set[str]) -> EasyDict:
    """No pretrained weights: trainable norm and all stages, unless the user set them."""
    cfg = copy.deepcopy(cfg)
    for name, value in FROM_SCRATCH.items():
        section, key = name.split(".")
        if name not in explicit and cfg[section][key] == defaults()[section][key]:
            cfg[section][key] = value
    return cfg


def resolve_config(config: Union[str, os.PathLike, dict, None]) -> EasyDict:
    """None (the package's defaults), a loaded dict, or a path. A relative path is the
    working directory's file; when there is none there and it names a shipped file as
    written in the repository ("config.ini", "configs/demo.ini", "configs/zoo/..."), the
    package's copy is read."""
    if config is None:
        return load_config(DEFAULT_CONFIG)
    if isinstance(config, dict):
        # Re-check a loaded config over the defaults, as if its values were overrides.
        flat = {f"{s}.{k}": v for s, keys in config.items() for k, v in keys.items()}
        return apply_overrides(defaults(), flat)
    path = Path(config)
    if not path.exists():
        path = repo_relative(path) or path
    return load_config(path)
