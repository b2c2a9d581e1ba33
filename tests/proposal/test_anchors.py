"""proposal/anchors.py against torchvision's AnchorGenerator."""
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator

from proposal import AnchorGenerator
from proposal.anchors import base_anchors
from tools.structures import ImageList

SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5


def test_base_anchors_hand_computed():
    # ratio 1: (-16, -16, 16, 16); ratio 0.5: w = 32 / sqrt(.5) = 45.25 -> half 22.6 -> 23,
    # h = 32 * sqrt(.5) = 22.6 -> half 11.3 -> 11.
    cell = base_anchors((32,), (0.5, 1.0, 2.0))
    assert cell.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0],
                             [-11.0, -23.0, 11.0, 23.0]]


@pytest.mark.parametrize("image_hw, grids", [
    ((128, 160), [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]),
    ((100, 132), [(25, 33), (13, 17), (7, 9), (4, 5), (2, 3)]),  # not divisible
])
def test_matches_torchvision(image_hw, grids):
    images = ImageList(torch.zeros(2, 3, *image_hw), [image_hw, (90, 120)])
    features = [torch.zeros(2, 4, h, w) for h, w in grids]
    ours = AnchorGenerator((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))(images, features)
    theirs = TVAnchorGenerator(SIZES, RATIOS)(images, features)
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.shape == (3 * sum(h * w for h, w in grids), 4)
        assert torch.equal(a, b)


def test_several_sizes_per_level_and_dtype():
    sizes, ratios = ((16, 24), (48, 64)), ((0.5, 1.0), (1.0, 2.0, 3.0))
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    features = [torch.zeros(1, 4, 8, 8, dtype=torch.float64), torch.zeros(1, 4, 4, 4)]
    gen = AnchorGenerator(sizes, ratios)
    assert gen.num_anchors_per_location() == [4, 6]
    ours = gen(images, features)[0]
    assert ours.dtype == torch.float64
    assert torch.equal(ours, TVAnchorGenerator(sizes, ratios)(images, features)[0])


def test_level_count_mismatch():
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    with pytest.raises(ValueError):
        AnchorGenerator()(images, [torch.zeros(1, 4, 16, 16)])


def test_image_list_to_keeps_sizes():
    images = ImageList(torch.zeros(1, 3, 8, 8), [(8, 6)])
    moved = images.to("cpu")
    assert moved.image_sizes == [(8, 6)] and moved.tensors.shape == (1, 3, 8, 8)
    assert len(moved) == 1
