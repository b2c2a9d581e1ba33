"""Checkpoints: atomic writes, keep_last, weights_only loading, RNG round trip."""
import os
import random

import numpy as np
import pytest
import torch

from tools import checkpoint as ckpt


def test_save_keeps_last_and_points_to_newest(tmp_path):
    for it in (10, 20, 30, 40):
        ckpt.save_checkpoint({"iteration": it, "w": torch.full((2,), float(it))}, tmp_path,
                             it, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last_checkpoint", "model_0000030.pth", "model_0000040.pth"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "model_0000040.pth"
    assert torch.equal(ckpt.load_checkpoint(latest)["w"], torch.full((2,), 40.0))


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model_0000001.pth"
    ckpt.atomic_save({"v": torch.ones(1)}, path)

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"v": torch.zeros(1)}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load_checkpoint(path)["v"], torch.ones(1))   # old content
    assert [p.name for p in tmp_path.iterdir()] == ["model_0000001.pth"]  # no temp file


class Payload:
    """Any pickled object: weights_only loading must refuse it."""


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": Payload()}, path)
    with pytest.raises(ValueError, match="evil.pth.*refused"):
        ckpt.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "missing.pth")


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()                               # a cached gaussian in numpy's state
    path = ckpt.atomic_save({"rng": ckpt.rng_state()}, tmp_path / "rng.pth")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)],
                np.random.randn())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
    assert np.random.randn() == expected[3]


def test_plain_config_is_weights_only_safe(tmp_path):
    from maskrcnn import DEFAULT_CONFIG, load_config
    cfg = load_config(DEFAULT_CONFIG)
    path = ckpt.atomic_save({"config": ckpt.plain(cfg)}, tmp_path / "c.pth")
    loaded = ckpt.load_checkpoint(path)["config"]
    assert type(loaded) is dict and loaded["rpn"]["rpn_nms_thresh"] == 0.7
    assert loaded["anchors"]["anchor_sizes"] == [32, 64, 128, 256, 512]
