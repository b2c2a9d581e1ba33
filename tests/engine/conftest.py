"""Fixtures for the training / evaluation / prediction / CLI tests: a tiny model recipe
(resnet18, 32-channel FPN, 64 px images, few proposals) and tiny shapes data sets."""
import pytest
import torch

from maskrcnn import DEFAULT_CONFIG, apply_overrides, load_config

torch.set_num_threads(2)

# Cheap enough for a few CPU iterations per test; GN: no BatchNorm statistics to worry about.
TINY_MODEL = {
    "backbone": "resnet18", "norm": "gn", "fpn_channels": 32, "representation_size": 64,
    "mask_layers": "32,", "mask_dim_reduced": 32, "min_size": 64, "train_min_size": "64,",
    "max_size": 64, "anchor_sizes": "8, 16, 32, 64, 128", "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50, "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 32, "box_detections_per_img": 20,
}


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """{"train": (json, dir), "val": (json, dir)}: 8 + 4 images of 64 px, 3 classes."""
    from engine.shapes import make_shapes
    root = tmp_path_factory.mktemp("shapes")
    return {"train": make_shapes(root, "train", 8, 64, 3, seed=0),
            "val": make_shapes(root, "val", 4, 64, 3, seed=1000)}


@pytest.fixture(scope="session")
def bad_images_data(shapes_data, tmp_path_factory):
    """The 8 training shapes images with four of them spoiled: (json, image dir, {file
    name: reason} of the spoiled ones). 1.jpg is a truncated JPEG (the JSON names it),
    2.png a text file, 3.png empty (zero bytes), 4.png missing; 5..8.png are intact."""
    import json
    import shutil

    from PIL import Image
    tj, ti = shapes_data["train"]
    root = tmp_path_factory.mktemp("bad_images")
    folder = root / "images"
    shutil.copytree(ti, folder)
    data = json.loads(tj.read_text())
    first = next(im for im in data["images"] if im["file_name"] == "1.png")
    first["file_name"] = "1.jpg"
    Image.open(folder / "1.png").convert("RGB").save(folder / "1.jpg", quality=90)
    jpeg = (folder / "1.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (folder / "2.png").write_text("not an image\n")
    (folder / "3.png").write_bytes(b"")
    (folder / "4.png").unlink()
    (root / "data.json").write_text(json.dumps(data))
    bad = {"1.jpg": "truncated", "2.png": "not an image", "3.png": "empty file",
           "4.png": "missing"}
    return root / "data.json", folder, bad


@pytest.fixture
def tiny_cfg(shapes_data, tmp_path):
    """make(**overrides) -> a full config training the tiny model on shapes_data in
    tmp_path/out (no evaluation unless val_json is overridden)."""
    def make(**overrides):
        (tj, ti), (vj, vi) = shapes_data["train"], shapes_data["val"]
        base = dict(TINY_MODEL, num_classes=3, train_json=str(tj), train_images=str(ti),
                    val_json="none", val_images=str(vi), num_workers=0, batch_size=2,
                    max_iter=4, warmup_iters=0, lr=0.01, checkpoint_every=1000, log_every=1,
                    output_dir=str(tmp_path / "out"), flip_prob=0.5)
        base.update(overrides)
        return apply_overrides(load_config(DEFAULT_CONFIG), base)
    return make


def _ini_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) + ","     # "64," is a one-element tuple
    return str(value)


def _write_ini(cfg, path):
    """cfg's keys that differ from config.ini, as a config file for `maskrcnn train`."""
    defaults = load_config(DEFAULT_CONFIG)
    lines = []
    for section, keys in cfg.items():
        changed = [f"{k} = {_ini_value(v)}" for k, v in keys.items()
                   if v != defaults[section][k]]
        lines += [f"[{section}]", *changed] if changed else []
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def write_ini():
    """write_ini(cfg, path) -> path: a full config as a config file (its non-default keys)."""
    return _write_ini


class FakeClock:
    """time.perf_counter as engine.train reads it, advanced by `step_s` per training step
    and by nothing else: a time budget then stops after budget / step_s iterations on
    any machine and under any load. Multiples of step_s are exact in binary floats when
    step_s is a power-of-two fraction (0.5, 0.25...), so elapsed times compare exactly."""

    def __init__(self, step_s: float):
        self.step_s, self.now = step_s, 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch):
    """fake_clock(step_s) -> FakeClock installed in engine.train (time.perf_counter) and
    advanced after each _Loop.step."""
    import types

    import engine.train as train_module

    def install(step_s: float) -> FakeClock:
        clock = FakeClock(step_s)
        monkeypatch.setattr(train_module, "time",
                            types.SimpleNamespace(perf_counter=clock.perf_counter))
        real_step = train_module._Loop.step

        def step(self, *args, **kwargs):
            losses = real_step(self, *args, **kwargs)
            clock.now += clock.step_s
            return losses
        monkeypatch.setattr(train_module._Loop, "step", step)
        return clock
    return install
