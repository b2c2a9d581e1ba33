"""Detection overlays: torchvision's draw_segmentation_masks / draw_bounding_boxes, and
labels that carry the score."""
import numpy as np
import torch

from tools import visualize
from tools.visualize import PALETTE, detection_labels, draw_detections


def _scene():
    """A 120x160 textured image (exact multiples of 1/255) and three detections: two
    overlapping ones (labels 1 and 2) and one, on the right, below the score threshold."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 120, 160), generator=g).float() / 255
    masks = torch.zeros(3, 1, 120, 160)
    masks[0, 0, 32:78, 12:58] = 0.9        # "person", 0.87
    masks[1, 0, 62:108, 42:98] = 0.7       # "dog", 0.93: overlaps the person's mask
    masks[2, 0, 20:60, 115:155] = 0.9      # below the threshold: not drawn
    det = dict(boxes=torch.tensor([[10.0, 30.0, 60.0, 80.0], [40.0, 60.0, 100.0, 110.0],
                                   [113.0, 18.0, 157.0, 62.0]]),
               labels=torch.tensor([1, 2, 1]), scores=torch.tensor([0.87, 0.93, 0.2]),
               masks=masks)
    return image, det


def _pixels(image):
    return (image * 255).round().permute(1, 2, 0).numpy().astype(int)


def test_masks_change_only_their_pixels(monkeypatch, tmp_path):
    image, det = _scene()
    calls = {}
    real_boxes, real_labels = visualize.draw_bounding_boxes, visualize._draw_labels

    def boxes_spy(pixels, boxes, *args, **kwargs):
        calls["boxes"] = (boxes.clone(), kwargs.get("colors"))
        return real_boxes(pixels, boxes, *args, **kwargs)

    def labels_spy(out, boxes, texts, colors):
        calls["labels"] = list(texts)
        return real_labels(out, boxes, texts, colors)
    monkeypatch.setattr(visualize, "draw_bounding_boxes", boxes_spy)
    monkeypatch.setattr(visualize, "_draw_labels", labels_spy)

    overlay = draw_detections(image, det, ["person", "dog"], alpha=0.5)
    overlay.save(tmp_path / "overlay.png")
    out, src = np.asarray(overlay).astype(int), _pixels(image)
    assert out.shape == src.shape
    # labels carry the score, highest score first; the low-scoring one is not drawn
    assert calls["labels"] == ["dog 0.93", "person 0.87"]
    # boxes through torchvision, the highest-scoring one drawn last (on top)
    assert torch.equal(calls["boxes"][0], det["boxes"][[0, 1]])
    assert calls["boxes"][1] == [PALETTE[0], PALETTE[1]]
    # inside a drawn mask: blended with its colour
    person, dog = np.array(PALETTE[0]), np.array(PALETTE[1])
    assert np.abs(out[40, 20] - (0.5 * src[40, 20] + 0.5 * person)).max() <= 1
    assert np.abs(out[95, 80] - (0.5 * src[95, 80] + 0.5 * dog)).max() <= 1
    # the overlap shows the higher-scoring detection (the dog), blended once
    assert np.abs(out[70, 50] - (0.5 * src[70, 50] + 0.5 * dog)).max() <= 1
    inside = (det["masks"][:2, 0] > 0.5).any(0).numpy()
    assert (out[inside] != src[inside]).any(axis=1).mean() > 0.99
    # far from every drawn detection: unchanged, the low-scoring one's mask included
    assert (out[:, 105:] == src[:, 105:]).all()
    assert (out[112:, :] == src[112:, :]).all()
    # box outlines in the class colour; white label text on the box colour above the box
    assert (out[80, 30] == person).all() and (out[110, 70] == dog).all()
    above_dog = out[60 - 13:60, 40:80]
    assert (above_dog == dog).all(axis=-1).sum() > 50                # the label's background
    assert (above_dog >= 220).all(axis=-1).sum() > 10                # its (anti-aliased) text


def test_nothing_drawn_below_the_threshold():
    image, det = _scene()
    out = np.asarray(draw_detections(image, det, ["person", "dog"], score_threshold=0.95))
    assert (out == _pixels(image)).all()
    nomask = {k: v for k, v in det.items() if k != "masks"}
    out = np.asarray(draw_detections(image, nomask, ["person", "dog"])).astype(int)
    assert (out[40, 20] == _pixels(image)[40, 20]).all()       # no mask: boxes only
    assert (out[80, 30] == np.array(PALETTE[0])).all()


def test_label_texts():
    _, det = _scene()
    assert detection_labels(det, ["person", "dog"]) == ["person 0.87", "dog 0.93",
                                                        "person 0.20"]
    # a label without a name is shown by its number
    assert detection_labels(det, ["person"], [1]) == ["2 0.93"]
