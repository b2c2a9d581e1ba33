"""engine/video.py: a clip made here is written, read back and checked against its source
frames and against PyAV's own decoding; errors name the file; JSONL lines parse; frames
are annotated from results whose masks are COCO RLE."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av", reason="PyAV is not installed: pip install '.[video]' "
                                      "(make test installs it)")
from pycocotools import mask as mask_utils  # noqa: E402

from engine.video import (JsonlWriter, VideoError, VideoReader, VideoWriter,  # noqa: E402
                          draw_frame, is_video)
from tools.visualize import draw_detections  # noqa: E402

N, W, H, FPS, SIDE = 7, 64, 48, 12, 10
RED = (230, 30, 30)


def square_at(i):
    """(x, y) of frame i's square's top-left corner: it moves right and down."""
    return 4 + 6 * i, 6 + 3 * i


def make_frame(i, width=W, height=H):
    """[H, W, 3] uint8: a grey-blue background, a red SIDE x SIDE square at square_at(i)."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = (40, 60, 110)
    x, y = square_at(i)
    frame[y:y + SIDE, x:x + SIDE] = RED
    return frame


def red_centre(frame):
    """Centre (x, y) of the pixels that are clearly red, frame [H, W, 3] uint8."""
    f = frame.astype(int)
    ys, xs = np.nonzero((f[..., 0] > 150) & (f[..., 1] < 100) & (f[..., 2] < 100))
    return xs.mean(), ys.mean()


def decode_with_pyav(path):
    """The oracle: every frame as PyAV decodes it, [H, W, 3] uint8 RGB."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def write_clip(path, width=W, height=H, codec=None, kinds=("tensor",)):
    """Writes N frames, each given as kinds[i % len(kinds)] (tensor, numpy or pil)."""
    with VideoWriter(path, FPS, width, height, codec=codec) as writer:
        for i in range(N):
            frame = make_frame(i, width, height)
            kind = kinds[i % len(kinds)]
            writer.write(torch.from_numpy(frame).permute(2, 0, 1) if kind == "tensor"
                         else Image.fromarray(frame) if kind == "pil" else frame)
    return writer


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_clip(path)
    return path


def test_round_trip_mp4(clip):
    with VideoReader(clip) as reader:
        assert (reader.width, reader.height, reader.fps, reader.frames) == (W, H, FPS, N)
        frames = list(reader)
    assert [i for i, _ in frames] == list(range(N))
    oracle = decode_with_pyav(clip)
    assert len(oracle) == N
    for (i, frame), decoded in zip(frames, oracle):
        assert frame.dtype == torch.uint8 and frame.shape == (3, H, W)
        assert torch.equal(frame.permute(1, 2, 0), torch.from_numpy(decoded))
        # lossy H.264: close to the source, the square where it was drawn
        source = make_frame(i)
        assert np.abs(decoded.astype(int) - source).mean() < 4
        x, y = square_at(i)
        assert red_centre(decoded) == pytest.approx((x + 4.5, y + 4.5), abs=0.5)
    assert [f for f in clip.parent.iterdir() if f.name.startswith(".")] == []


def test_second_pass_starts_again(clip):
    with VideoReader(clip) as reader:
        first = [frame for _, frame in reader]
        second = [frame for _, frame in reader]
    assert len(second) == N and all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("suffix", [".avi", ".webm", ".mkv"])
def test_other_containers(tmp_path, suffix):
    """Each suffix's default codec writes N frames that PyAV decodes to the source."""
    path = tmp_path / f"clip{suffix}"
    write_clip(path, kinds=("numpy", "pil"))
    oracle = decode_with_pyav(path)
    with VideoReader(path) as reader:
        assert (reader.width, reader.height, reader.fps) == (W, H, FPS)
        assert reader.frames in (N, None)
        assert len(list(reader)) == N
    assert len(oracle) == N
    for i, decoded in enumerate(oracle):
        assert np.abs(decoded.astype(int) - make_frame(i)).mean() < 6
        x, y = square_at(i)
        assert red_centre(decoded) == pytest.approx((x + 4.5, y + 4.5), abs=0.5)


def test_odd_size_is_padded(tmp_path):
    """63 x 47 frames become a 64 x 48 video: the last column / row repeated."""
    path = tmp_path / "odd.mp4"
    writer = write_clip(path, width=W - 1, height=H - 1)
    assert writer.size == (W, H) and writer.frames_written == N
    oracle = decode_with_pyav(path)
    assert len(oracle) == N and oracle[0].shape == (H, W, 3)
    for i, decoded in enumerate(oracle):
        source = make_frame(i, W - 1, H - 1)
        padded = np.pad(source, ((0, 1), (0, 1), (0, 0)), mode="edge")
        assert np.abs(decoded.astype(int) - padded).mean() < 4


def test_writer_is_atomic(tmp_path):
    """An exception inside the block leaves the old file and no temp file behind."""
    path = tmp_path / "out.mp4"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with VideoWriter(path, FPS, W, H) as writer:
            writer.write(make_frame(0))
            raise RuntimeError("stop")
    assert path.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["out.mp4"]


def test_writer_rejects_bad_frames(tmp_path):
    with VideoWriter(tmp_path / "out.mp4", FPS, W, H) as writer:
        with pytest.raises(ValueError, match="63x48"):
            writer.write(make_frame(0, W - 1, H))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(torch.zeros(3, H, W))
        writer.write(make_frame(0))
    assert len(decode_with_pyav(tmp_path / "out.mp4")) == 1
    with pytest.raises(VideoError, match="nope.mp4.*no encoder 'x264-missing'"):
        VideoWriter(tmp_path / "nope.mp4", FPS, W, H, codec="x264-missing")
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "nope.mp4", 0, W, H)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.mp4"]


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(VideoError, match="missing.mp4: no such video file"):
        VideoReader(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    with pytest.raises(VideoError, match="notes.mp4: not a readable video") as info:
        VideoReader(text)
    assert "\n" not in str(info.value)
    assert issubclass(VideoError, ValueError)


def test_missing_pyav_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)        # import av now fails
    with pytest.raises(ImportError, match=r"pip install 'mask-rcnn-pytorch\[video\]'"):
        VideoReader(tmp_path / "clip.mp4")


def test_is_video():
    assert is_video("a/b/clip.MP4") and is_video("x.webm") and is_video("x.avi")
    assert not is_video("photo.jpg") and not is_video("mp4")


def test_jsonl_lines_are_flushed_and_parse(tmp_path):
    path = tmp_path / "sub" / "clip.jsonl"
    rle = mask_utils.encode(np.asfortranarray(np.eye(4, dtype=np.uint8)))   # bytes counts
    with JsonlWriter(path) as lines:
        lines.write({"frame": 0, "boxes": torch.tensor([[1.5, 2.0, 3.0, 4.0]]),
                     "scores": np.array([0.5], np.float32), "masks": [rle]})
        # readable while the writer is open: a stream can be tailed
        assert json.loads(path.read_text())["boxes"] == [[1.5, 2.0, 3.0, 4.0]]
        lines.write({"frame": 1, "boxes": [], "labels": torch.zeros(0, dtype=torch.int64)})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 1] and records[1]["labels"] == []
    decoded = mask_utils.decode(records[0]["masks"][0])      # str counts decode again
    assert np.array_equal(decoded, np.eye(4, dtype=np.uint8))


def square_result(i):
    """A prediction for frame i: the square's box and its RLE mask, one box-only
    detection below the score threshold."""
    x, y = square_at(i)
    mask = np.zeros((H, W), np.uint8)
    mask[y:y + SIDE, x:x + SIDE] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")           # as JSON carries it
    return {"frame": i, "boxes": [[x, y, x + SIDE - 1, y + SIDE - 1], [0, 0, 5, 5]],
            "labels": [1, 2], "scores": [0.9, 0.2], "masks": [rle, rle]}, mask


def test_draw_frame_decodes_rle_masks():
    """draw_frame on RLE masks draws what draw_detections draws on the dense masks."""
    image = torch.from_numpy(make_frame(2)).permute(2, 0, 1)
    result, mask = square_result(2)
    drawn = draw_frame(image, result, ["square", "other"], score_threshold=0.5)
    dense = dict(boxes=torch.tensor(result["boxes"], dtype=torch.float32),
                 labels=torch.tensor(result["labels"]), scores=torch.tensor(result["scores"]),
                 masks=torch.from_numpy(np.stack([mask, mask])).float()[:, None])
    expected = draw_detections(image.float() / 255, dense, ["square", "other"], 0.5)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, H, W)
    assert torch.equal(drawn, torch.from_numpy(np.asarray(expected)).permute(2, 0, 1))
    # boxes only (no masks): the outline is drawn, the square's inside is not tinted
    plain = draw_frame(image, {k: v for k, v in result.items() if k != "masks"}, ["square"])
    x, y = square_at(2)
    assert torch.equal(plain[:, y + 5, x + 5], image[:, y + 5, x + 5])
    assert not torch.equal(drawn[:, y + 5, x + 5], image[:, y + 5, x + 5])
    assert not torch.equal(plain[:, y + SIDE - 1, x + 5], image[:, y + SIDE - 1, x + 5])


def test_annotated_round_trip(clip, tmp_path):
    """N frames in, N annotated frames and N JSONL lines out."""
    out_video, out_lines = tmp_path / "out" / "clip.mp4", tmp_path / "out" / "clip.jsonl"
    with VideoReader(clip) as reader, \
            VideoWriter(out_video, reader.fps, reader.width, reader.height) as writer, \
            JsonlWriter(out_lines) as lines:
        for index, frame in reader:
            result, _ = square_result(index)
            writer.write(draw_frame(frame, result, ["square"]))
            lines.write(result)
    annotated = decode_with_pyav(out_video)
    records = [json.loads(line) for line in out_lines.read_text().splitlines()]
    assert len(annotated) == N and [r["frame"] for r in records] == list(range(N))
    source = decode_with_pyav(clip)
    for i, (before, after) in enumerate(zip(source, annotated)):
        x, y = square_at(i)
        inside = (slice(y + 2, y + SIDE - 2), slice(x + 2, x + SIDE - 2))
        # the mask tint changes the square; far from it the frame is as it was
        assert np.abs(after[inside].astype(int) - before[inside]).mean() > 20
        assert np.abs(after[-6:, -6:].astype(int) - before[-6:, -6:]).mean() < 4
