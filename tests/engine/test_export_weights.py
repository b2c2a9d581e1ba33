"""Model-only weights files (safetensors): `maskrcnn export-weights`, and loading them with
MaskRCNN(pretrained=...) / MaskRCNN.from_checkpoint like a training checkpoint."""
import json
import struct

import pytest
import torch

from convert.pretrained import read_model_weights
from convert.weights import is_safetensors, read_safetensors
from engine.checkpoint import atomic_save, plain
from engine.cli import build_parser, main
from engine.export import export_weights
from maskrcnn import MaskRCNN

# Not the defaults (resnet101, 256 channels): a load that ignored the stored config would
# build another architecture, and the weights would not fit it.
SMALL = dict(backbone="resnet18", fpn_channels=64, representation_size=128, min_size=64,
             max_size=96, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
             box_detections_per_img=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, training checkpoint path): a checkpoint shaped like engine/train.py's, with
    optimizer state (SGD momentum) beside the model."""
    torch.manual_seed(0)
    model = MaskRCNN(num_classes=2, **SMALL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()                       # momentum buffers: the optimizer's state
    path = tmp_path_factory.mktemp("ckpt") / "model_0001000.pth"
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "iteration": 1000, "config": plain(model.cfg),
                 "class_names": ["cat", "dog"], "cat_ids": [7, 9]}, path)
    return model, path


def test_export_then_load_like_the_checkpoint(trained, tmp_path, capsys):
    source, checkpoint = trained
    out = tmp_path / "sub" / "model.bin"       # any name: the format is told by content
    assert main(["export-weights", "--weights", str(checkpoint), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert is_safetensors(out) and not is_safetensors(checkpoint)
    assert [p.name for p in out.parent.iterdir()] == ["model.bin"]    # no temp file left
    # model only: the optimizer's momentum (one buffer per parameter) is not in it
    assert out.stat().st_size < 0.7 * checkpoint.stat().st_size

    raw = read_safetensors(out)
    assert raw["iteration"] == 1000 and raw["config"] == json.loads(json.dumps(plain(source.cfg)))
    weights = read_model_weights(out)
    assert weights.source == "maskrcnn"
    assert weights.categories == {1: ("cat", 7), 2: ("dog", 9)}
    for loaded in (MaskRCNN(pretrained=str(out)), MaskRCNN.from_checkpoint(out)):
        assert loaded.cfg.backbone.backbone == "resnet18" and loaded.num_classes == 2
        assert loaded.cfg.backbone.fpn_channels == 64
        assert plain(loaded.cfg.backbone) == plain(source.cfg.backbone)
        assert loaded.categories == {1: ("cat", 7), 2: ("dog", 9)}
        state = loaded.state_dict()
        assert state.keys() == source.state_dict().keys()
        for key, value in source.state_dict().items():
            assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    assert MaskRCNN.from_checkpoint(out, box_score_thresh=0.6).roi_heads.box_score_thresh == 0.6
    # the same detections as the model it came from
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = source.eval()([image])[0]
        b = MaskRCNN.from_checkpoint(out).eval()([image])[0]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_export_errors_name_the_file(trained, tmp_path, capsys):
    _, checkpoint = trained
    out = tmp_path / "model.safetensors"
    missing = tmp_path / "nope.pth"
    err = _usage_error(capsys, ["export-weights", "--weights", str(missing), "--out", str(out)])
    assert "--weights" in err and "nope.pth" in err and "not found" in err

    plain_state = atomic_save({"weights": torch.ones(2)}, tmp_path / "raw.pth")
    err = _usage_error(capsys, ["export-weights", "--weights", str(plain_state),
                                "--out", str(out)])
    assert "raw.pth" in err and "not a training checkpoint" in err
    no_config = atomic_save({"model": {"w": torch.ones(2)}}, tmp_path / "noconf.pth")
    err = _usage_error(capsys, ["export-weights", "--weights", str(no_config),
                                "--out", str(out)])
    assert "noconf.pth" in err and "'config'" in err

    garbage = tmp_path / "page.pth"
    garbage.write_text("<html>not found</html>")
    err = _usage_error(capsys, ["export-weights", "--weights", str(garbage), "--out", str(out)])
    assert "page.pth" in err and "not a checkpoint" in err

    err = _usage_error(capsys, ["export-weights", "--weights", str(checkpoint),
                                "--out", str(tmp_path)])
    assert "--out" in err and "folder" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")                     # --out under a file: cannot be created
    err = _usage_error(capsys, ["export-weights", "--weights", str(checkpoint),
                                "--out", str(blocker / "model.safetensors")])
    assert "--out" in err and "model.safetensors" in err
    assert not out.exists()

    # an exported file is not a training checkpoint to export again
    export_weights(checkpoint, out)
    err = _usage_error(capsys, ["export-weights", "--weights", str(out),
                                "--out", str(tmp_path / "again.safetensors")])
    assert "model.safetensors" in err and "already" in err


def test_corrupt_weights_file_is_a_clear_error(trained, tmp_path):
    _, checkpoint = trained
    out = export_weights(checkpoint, tmp_path / "model.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])   # an interrupted copy
    assert is_safetensors(cut)
    with pytest.raises(ValueError, match="cut.safetensors.*truncated"):
        MaskRCNN(pretrained=str(cut))
    header = b'{"__metadata__": {"config": "{oops"}}'
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="bad.safetensors.*'config'.*JSON"):
        read_model_weights(bad)


def test_help_documents_export_weights(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    with pytest.raises(SystemExit) as exit_info:
        main(["export-weights", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in sub.choices["export-weights"]._actions:
        assert action.help
        for option in action.option_strings:
            assert option in text


def test_predict_takes_an_exported_weights_file(trained, tmp_path):
    """load_model (maskrcnn predict / eval --weights) reads exported files like
    checkpoints: the architecture, categories and test-time overrides."""
    from engine.predict import load_model
    _, checkpoint = trained
    out = tmp_path / "model.safetensors"
    assert main(["export-weights", "--weights", str(checkpoint), "--out", str(out)]) == 0
    model, meta = load_model(out, overrides={"box_score_thresh": 0.3})
    assert meta["class_names"] == ["cat", "dog"] and meta["cat_ids"] == [7, 9]
    assert model.roi_heads.box_score_thresh == 0.3 and not model.training
    assert model.cfg.backbone.backbone == "resnet18"
