"""Checkpoints: atomic writes, keep_last, weights_only loading (one-line errors for unsafe
or corrupt files), skipping a corrupt newest one on resume, RNG round trip."""
import os
import random

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt
from tools.download import UnsafeCheckpointError


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


class Malicious:
    """A pickle that would run a shell command if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line_error(exc_type, path):
    """load_checkpoint(path)'s error message, checked to be one line naming the file."""
    with pytest.raises(exc_type) as err:
        ckpt.load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_pickled_object_is_refused_in_one_line(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": Payload()}, path)
    message = _one_line_error(UnsafeCheckpointError, path)
    assert "Payload" in message and "never runs code" in message, message
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(1)}, "x": Malicious(marker)}, path)
    message = _one_line_error(UnsafeCheckpointError, path)
    assert "system" in message and not marker.exists(), message
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "missing.pth")


def test_truncated_or_garbage_checkpoint_is_a_one_line_error_naming_it(tmp_path):
    path = ckpt.atomic_save({"w": torch.ones(1000)}, tmp_path / "model_0000002.pth")
    data = path.read_bytes()
    for content in (data[: len(data) // 2], b"", b"<html>404</html>"):
        path.write_bytes(content)
        message = _one_line_error(ValueError, path)
        assert "truncated" in message or "not a checkpoint" in message, message


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def test_load_latest_skips_corrupt_newest_with_a_warning(tmp_path, capsys):
    for it in (1, 2, 3):
        ckpt.save_checkpoint({"iteration": it}, tmp_path, it, keep_last=0)
    _truncate(tmp_path / "model_0000003.pth")             # a full disk, a cut copy
    # a killed save's temp file is newer than everything but never a candidate
    (tmp_path / ".model_0000004.pth.abc.tmp").write_bytes(b"PK half")
    path, state = ckpt.load_latest_checkpoint(tmp_path)
    assert path.name == "model_0000002.pth" and state["iteration"] == 2
    err = capsys.readouterr().err
    assert "model_0000003.pth" in err and "truncated" in err and err.count("\n") == 1, err
    assert ckpt.load_latest_checkpoint(tmp_path / "empty") == (None, None)


def test_load_latest_fails_naming_every_file_when_none_loads(tmp_path):
    for it in (1, 2):
        ckpt.save_checkpoint({"iteration": it}, tmp_path, it)
        _truncate(ckpt.checkpoint_path(tmp_path, it))
    with pytest.raises(FileNotFoundError) as err:
        ckpt.load_latest_checkpoint(tmp_path, verbose=False)
    message = str(err.value)
    assert "\n" not in message, message
    for word in ("model_0000001.pth", "model_0000002.pth", "truncated", str(tmp_path)):
        assert word in message, message


def test_save_removes_temp_files_of_a_killed_save(tmp_path):
    stale = [tmp_path / ".model_0000002.pth.x1y2.tmp", tmp_path / ".last_checkpoint.z.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    ckpt.save_checkpoint({"iteration": 2}, tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint",
                                                          "model_0000002.pth"]


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
