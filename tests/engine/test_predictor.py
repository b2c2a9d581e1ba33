"""engine.Predictor: batch invariance, mask formats against the model's own dense masks
(pycocotools decodes the RLE), bad files, runtimes, video, and the predict CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from engine import Predictor
from engine.predict import SkippedImageWarning, load_model, window_to_rle
from tools.paste import MaskWindow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_and_images(trained):
    """The trained demo-recipe model and 8 held-out scenes resized to mixed sizes and
    aspect ratios (several share a padded input size, so batches really batch)."""
    path, images = trained
    model, _ = load_model(path)
    scales = [(1.0, 1.0), (1.5, 1.0), (0.75, 0.75), (1.0, 1.0), (2.0, 2.0), (1.0, 1.3),
              (1.0, 1.0), (0.9, 1.6)]
    mixed = [F.interpolate(im[None], scale_factor=s, mode="bilinear")[0].clamp(0, 1)
             for im, s in zip(images, scales)]
    return path, model, mixed


def _pair(a, b):
    """The issue's pairing: labels equal, scores within 1e-4, boxes within 1e-2 px."""
    assert len(a["labels"]) == len(b["labels"])
    assert torch.equal(a["labels"], b["labels"])
    assert torch.allclose(a["scores"], b["scores"], atol=1e-4, rtol=0)
    assert torch.allclose(a["boxes"], b["boxes"], atol=1e-2, rtol=0)


def test_results_do_not_depend_on_the_batch_size(model_and_images, monkeypatch):
    _, model, images = model_and_images
    calls = []
    real = type(model).forward

    def spy(self, batch, *args, **kwargs):
        calls.append(len(batch))
        return real(self, batch, *args, **kwargs)
    monkeypatch.setattr(type(model), "forward", spy)
    alone = Predictor(model, batch_size=1)(images)
    assert sum(len(r["labels"]) for r in alone) >= len(images), "the scenes have objects"
    for batch_size in (3, 8):
        calls.clear()
        batched = Predictor(model, batch_size=batch_size)(images)
        assert max(calls) > 1, "some images shared a model call"
        for a, b in zip(alone, batched):
            _pair(a, b)


@pytest.mark.parametrize("paste", ["torchvision", "detectron2"])
def test_every_mask_format_is_the_thresholded_dense_mask(model_and_images, paste):
    path, _, images = model_and_images
    model, _ = load_model(path, overrides={"mask_paste": paste})
    forms = {f: Predictor(model, mask_format=f, mask_threshold=0.5)(images[:4])
             for f in ("rle", "crop", "dense")}
    with torch.no_grad():
        for i, image in enumerate(images[:4]):
            expected = model([image])[0]
            binary = (expected["masks"][:, 0] >= 0.5).numpy()
            rle = forms["rle"][i]
            assert torch.equal(rle["boxes"], expected["boxes"])
            assert torch.equal(rle["scores"], expected["scores"])
            decoded = mask_utils.decode(rle["masks"]) if rle["masks"] else \
                np.zeros(binary.shape[1:] + (0,), np.uint8)
            assert np.array_equal(decoded.transpose(2, 0, 1), binary)
            assert np.array_equal(forms["dense"][i]["masks"].numpy(), binary)
            for d, (x0, y0, crop) in enumerate(forms["crop"][i]["masks"]):
                full = np.zeros_like(binary[d])
                full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop.numpy()
                assert np.array_equal(full, binary[d])


def test_window_to_rle_matches_pycocotools():
    g = np.random.default_rng()
    for _ in range(300):
        height, width = g.integers(1, 40, 2)
        h, w = g.integers(0, height + 1), g.integers(0, width + 1)
        y0, x0 = g.integers(0, height - h + 1), g.integers(0, width - w + 1)
        crop = g.random((h, w)) < g.random()
        full = np.zeros((height, width), np.uint8)
        full[y0:y0 + h, x0:x0 + w] = crop
        expected = mask_utils.encode(np.asfortranarray(full))
        got = window_to_rle(MaskWindow(int(x0), int(y0), torch.from_numpy(crop)),
                            int(height), int(width))
        assert got["counts"] == expected["counts"].decode() and got["size"] == [height, width]


def _bad_folder(root: Path, good: list) -> Path:
    """Good PNGs next to a truncated JPEG, a text file named .jpg and a 0-byte PNG."""
    folder = root / "mixed"
    folder.mkdir()
    for i, image in enumerate(good):
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i}.png")
    jpeg = folder / "truncated.jpg"
    Image.fromarray((good[0].permute(1, 2, 0) * 255).byte().numpy()).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    (folder / "notes.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return folder


BAD = {"truncated.jpg", "notes.jpg", "empty.png"}


def test_bad_files_in_a_folder_are_skipped_and_named_once(model_and_images, tmp_path):
    path, model, images = model_and_images
    folder = _bad_folder(tmp_path, images[:3])
    predictor = Predictor(model, batch_size=2, workers=2)
    with pytest.warns(SkippedImageWarning) as record:
        results = list(predictor.run(folder))
    named = [Path(str(w.message).split()[1].rstrip(":")).name for w in record
             if issubclass(w.category, SkippedImageWarning)]
    assert sorted(named) == sorted(BAD)
    assert sorted(Path(r["file_name"]).name for r in results) == ["0.png", "1.png", "2.png"]
    assert [r["image_id"] for r in results] == sorted(r["image_id"] for r in results)
    summary = predictor.summary()
    assert all(summary.count(name) == 1 for name in BAD) and "predicted 3 images" in summary


def _cli(*args, cwd=ROOT):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "engine.cli", "predict", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env)


def test_predict_cli_bad_inputs(model_and_images, tmp_path, capsys):
    path, _, images = model_and_images
    folder = _bad_folder(tmp_path, images[:2])
    out = tmp_path / "out"
    run = _cli("--weights", path, folder, "--out", out, "--format", "coco,jsonl",
               "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    for name in BAD:      # once as a warning line, once in the summary
        assert run.stderr.count(name) == 1 and run.stdout.count(name) == 1, name
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["file_name"]).name for r in lines) == ["0.png", "1.png"]
    json.loads((out / "results.json").read_text())
    # one explicit unreadable file, a missing path, an --out that cannot be created
    from engine.cli import main
    for args, name in (([folder / "empty.png", "--out", out], "empty.png"),
                       ([tmp_path / "missing.png", "--out", out], "missing.png"),
                       ([folder / "0.png", "--out", folder / "0.png" / "sub"], "0.png/sub")):
        assert main(["predict", "--weights", path, *map(str, args), "--no-progress"]) != 0
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "error:" in err and name in err, err


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_runtimes_give_the_eager_results(model_and_images, runtime, tmp_path):
    pytest.importorskip("onnxruntime" if runtime == "onnxruntime" else "openvino")
    path, model, images = model_and_images
    eager = Predictor(model, mask_format="dense")(images)
    exported = Predictor(path, runtime=runtime, mask_format="dense", threads=1)
    assert exported.class_names == Predictor(model).class_names
    for a, b in zip(eager, exported(images)):
        _pair(a, b)
        for m, n in zip(a["masks"], b["masks"]):
            union = (m | n).sum()
            assert union == 0 or (m & n).sum() / union >= 0.99


def test_video_round_trip(trained, tmp_path):
    pytest.importorskip("av")
    from engine.video import VideoReader, VideoWriter
    path, images = trained
    clip = tmp_path / "clip.mp4"
    frames = [(im * 255).byte() for im in images[:5]]        # 128 x 128 scenes
    with VideoWriter(clip, 5, 128, 128) as writer:
        for frame in frames:
            writer.write(frame)
    out = tmp_path / "out"
    run = _cli("--weights", path, clip, "--out", out, "--no-progress", "--batch-size", "2")
    assert run.returncode == 0, run.stderr
    with VideoReader(out / "clip.mp4") as reader:
        annotated = [frame for _, frame in reader]
    lines = [json.loads(x) for x in (out / "clip.jsonl").read_text().splitlines()]
    assert len(annotated) == len(frames) and [r["frame"] for r in lines] == list(range(5))
    assert all(len(r["masks"]) == len(r["boxes"]) for r in lines)
