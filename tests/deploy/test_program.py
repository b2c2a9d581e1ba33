"""torch.export (.pt2) and the `maskrcnn export` command: a checkpoint trained here is
exported by the CLI, loaded with torch.export.load in a fresh process (which imports
`deploy` first: that registers the maskrcnn:: custom ops the program calls) and run at
three image sizes other than the traced one, one without detections; eager is the
oracle. Also the CLI's ONNX path and its usage errors, and (opt-in: minutes of C++
compilation) an AOTInductor package. Shapes: D detections.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.cli import main
from maskrcnn import MaskRCNN
from tests.deploy.helpers import assert_same_detections, eager

REPO = Path(__file__).resolve().parents[2]
KEYS = ("boxes", "labels", "scores", "masks")

# Run in a fresh interpreter: nothing of this test process (ops, modules) is inherited.
LOAD_AND_RUN = """
import sys, torch
import deploy   # registers maskrcnn::roi_align_multilevel and maskrcnn::nms
program = deploy.load_program(sys.argv[1])
images = torch.load(sys.argv[2])
with torch.no_grad():
    outputs = [[t.clone() for t in program.module()(image)] for image in images]
torch.save(outputs, sys.argv[3])
"""


def _check_images(val_images):
    """Two resized shapes images and a blank one (no detections): not 128 x 128."""
    resized = [F.interpolate(img[None], size=s, mode="bilinear", align_corners=False)[0]
               .clamp(0, 1) for img, s in zip(val_images[:2], ((150, 110), (90, 170)))]
    return resized + [torch.full((3, 140, 160), 0.5)]


def test_pt2_loads_in_a_fresh_process_and_matches_eager(trained, tmp_path, capsys):
    checkpoint, val_images = trained
    out = tmp_path / "model.pt2"
    assert main(["export", "--weights", str(checkpoint), "--format", "pt2", "--out",
                 str(out), "--example-size", "128", "128"]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    images = _check_images(val_images)
    torch.save(images, tmp_path / "images.pt")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(out), str(tmp_path / "images.pt"),
         str(tmp_path / "outputs.pt")], cwd=REPO, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    model = MaskRCNN(pretrained=str(checkpoint)).eval()
    counts = []
    for image, values in zip(images, outputs):
        expected = eager(model, image)
        assert_same_detections(expected, dict(zip(KEYS, values)),
                               f"pt2 at {tuple(image.shape[1:])}")
        counts.append(len(expected["scores"]))
    assert min(counts[:2]) >= 1 and counts[2] == 0, f"detections per image {counts}"


def test_cli_onnx(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install "
                                              "'.[export]' (make test installs it)")
    import deploy
    checkpoint, val_images = trained
    out = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(checkpoint), "--format", "onnx", "--out",
                 str(out), "--set", "box_score_thresh=0.3"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = MaskRCNN(pretrained=str(checkpoint), box_score_thresh=0.3).eval()
    image = _check_images(val_images)[0]
    assert_same_detections(eager(model, image), deploy.OnnxPredictor(out, threads=2)(image),
                           "CLI onnx export with --set box_score_thresh=0.3")


@pytest.mark.parametrize("args, message", [
    (["--weights", "missing.pth", "--format", "onnx", "--out", "m.onnx"], "not found"),
    (["--weights", "coco", "--format", "onnx", "--out", "m.pt2"], "writes a .onnx file"),
    (["--weights", "coco", "--format", "pt2", "--out", "m.onnx"], "writes a .pt2 file"),
    (["--weights", "coco", "--format", "tflite", "--out", "m.onnx"], "invalid choice"),
])
def test_cli_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(["export", *args])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("MASKRCNN_TEST_AOTI"),
                    reason="AOTInductor compiles C++ for 5-10 minutes on 2 cores: set "
                           "MASKRCNN_TEST_AOTI=1 to run it")
def test_aoti_package_matches_eager(trained, tmp_path):
    import deploy
    checkpoint, val_images = trained
    model = MaskRCNN(pretrained=str(checkpoint)).eval()
    path = deploy.aoti_package(model, tmp_path / "model_aoti.pt2", example_size=(128, 128))
    runner = torch._inductor.aoti_load_package(str(path))
    for image in _check_images(val_images):
        with torch.no_grad():
            values = runner(image)
        assert_same_detections(eager(model, image), dict(zip(KEYS, values)),
                               f"AOTInductor at {tuple(image.shape[1:])}")
