"""Configs: the shipped config files (config.ini, demo.ini, zoo presets: files.py) and
the config language that reads them (loader.py)."""
from .files import repo_relative, shipped
from .loader import (CONSTRUCTOR_KEYS, DEFAULT_CONFIG, MODEL_SECTIONS, apply_overrides,
                     defaults, load_config, resolve_config)

__all__ = ["shipped", "repo_relative", "DEFAULT_CONFIG", "MODEL_SECTIONS",
           "CONSTRUCTOR_KEYS", "load_config", "apply_overrides", "defaults",
           "resolve_config"]
