"""backbones/ against torchvision's resnet_fpn_backbone / Mask R-CNN backbone (our oracle)."""
import os

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d as TVFrozenBatchNorm2d

from backbones import FPN, build_resnet_fpn_backbone, imagenet_weight_files
from convert.torchvision import (convert_torchvision_backbone_state_dict,
                                 load_torchvision_backbone_state)
from layers import FrozenBatchNorm2d

TV_NAMES = ["0", "1", "2", "3", "pool"]


def randomise_norms(module, seed=0):
    """Give BatchNorm-like buffers/params non-trivial values so parity tests mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (TVFrozenBatchNorm2d, nn.BatchNorm2d)):
            n = m.weight.shape[0]
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def assert_same_pyramid(ours, tv_out):
    assert len(ours) == 5
    for p, name in zip(ours, TV_NAMES, strict=True):
        expected = tv_out[name]
        assert p.shape == expected.shape
        scale = expected.abs().max().clamp(min=1.0)
        torch.testing.assert_close(p / scale, expected / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("depth", [18, 50])
def test_matches_torchvision_resnet_fpn_backbone(depth):
    torch.manual_seed(0)
    tv = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=3)
    randomise_norms(tv)
    ours = build_resnet_fpn_backbone(depth=depth)
    load_torchvision_backbone_state(ours, tv)
    ours.eval(), tv.eval()
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        out = ours(x)
        assert_same_pyramid(out, tv(x))
    assert ours.out_channels == 256
    assert [p.shape[-2:] for p in out] == [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]


def test_matches_maskrcnn_backbone_with_batchnorm():
    # Without weights torchvision's Mask R-CNN uses trainable BatchNorm2d in all stages.
    torch.manual_seed(1)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone
    randomise_norms(tv, seed=1)
    ours = build_resnet_fpn_backbone(depth=50, norm="bn", trainable_layers=5)
    load_torchvision_backbone_state(ours, tv.state_dict())
    ours.eval(), tv.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert_same_pyramid(ours(x), tv(x))


def test_state_dict_key_mapping():
    tv_state = {"body.conv1.weight": 1, "fpn.inner_blocks.2.0.weight": 2,
                "fpn.layer_blocks.0.0.bias": 3, "fpn.inner_blocks.1.bias": 4}
    assert convert_torchvision_backbone_state_dict(tv_state) == {
        "body.conv1.weight": 1, "fpn.lateral_convs.2.weight": 2,
        "fpn.output_convs.0.bias": 3, "fpn.lateral_convs.1.bias": 4}


def test_frozen_bn_eps_copied_from_torchvision():
    tv = resnet_fpn_backbone(backbone_name="resnet18", weights=None)
    for m in tv.modules():
        if isinstance(m, TVFrozenBatchNorm2d):
            m.eps = 0.0  # as torchvision sets for its COCO Mask R-CNN v1 weights
    ours = build_resnet_fpn_backbone(depth=18)
    load_torchvision_backbone_state(ours, tv)
    eps = {m.eps for m in ours.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert eps == {0.0}


@pytest.mark.parametrize("trainable_layers", range(6))
def test_trainable_layers_match_torchvision(trainable_layers):
    tv = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                             trainable_layers=trainable_layers)
    ours = build_resnet_fpn_backbone(depth=18, norm="bn", trainable_layers=trainable_layers)
    tv_names = {k for k, p in tv.body.named_parameters() if p.requires_grad}
    our_names = {k for k, p in ours.body.named_parameters() if p.requires_grad}
    assert our_names == tv_names
    assert all(p.requires_grad for p in ours.fpn.parameters())


def test_frozen_stages_keep_batchnorm_in_eval():
    ours = build_resnet_fpn_backbone(depth=18, norm="bn", trainable_layers=3).train()
    assert not ours.body.bn1.training and not ours.body.layer1[0].bn1.training
    assert ours.body.layer2[0].bn1.training and ours.fpn.training


def test_invalid_arguments():
    with pytest.raises(ValueError):
        build_resnet_fpn_backbone(depth=42)
    with pytest.raises(ValueError):
        build_resnet_fpn_backbone(depth=18, trainable_layers=6)
    with pytest.raises(ValueError):
        build_resnet_fpn_backbone(depth=18, norm="ln")


def test_group_norm_trunk_trains_from_scratch():
    torch.manual_seed(0)
    ours = build_resnet_fpn_backbone(depth=18, norm="gn", trainable_layers=5)
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in ours.modules())
    out = ours(torch.randn(2, 3, 64, 64))
    sum(p.sum() for p in out).backward()
    assert ours.body.conv1.weight.grad is not None


# ---------------------------------------------------------------- FrozenBatchNorm2d

def test_frozen_bn_matches_batchnorm_eval_and_torchvision():
    bn = nn.BatchNorm2d(8)
    randomise_norms(bn)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    tv = TVFrozenBatchNorm2d(8)
    tv.load_state_dict(frozen.state_dict())
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    frozen.train()  # train mode changes nothing
    assert torch.equal(frozen(x), tv(x))
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    assert list(frozen.parameters()) == []
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    assert frozen.eps == 1e-5


# ---------------------------------------------------------------- FPN alone

def test_fpn_shapes_on_odd_sizes():
    torch.manual_seed(0)
    fpn = FPN([8, 16, 32, 64], out_channels=16)
    feats = [torch.randn(1, c, s, s + 1) for c, s in zip([8, 16, 32, 64], [25, 13, 7, 4])]
    out = fpn(feats)
    assert [tuple(o.shape[-2:]) for o in out] == [(25, 26), (13, 14), (7, 8), (4, 5), (2, 3)]
    assert fpn.lateral_convs[0].bias.abs().sum() == 0


# ---------------------------------------------------------------- pretrained weights

def test_pretrained_from_path(tmp_path):
    torch.manual_seed(2)
    imagenet = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(imagenet.state_dict(), path)
    ours = build_resnet_fpn_backbone(depth=18, pretrained=str(path))
    for key, value in ours.body.state_dict().items():
        assert torch.equal(value, imagenet.state_dict()[key]), key
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_resnet_fpn_backbone(depth=18, pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="GroupNorm"):
        build_resnet_fpn_backbone(depth=18, norm="gn", pretrained=str(path))


def test_pretrained_imagenet_downloads_verifies_and_caches(tmp_path, monkeypatch):
    """"imagenet" goes through the zoo's downloader: offline it names the file, URL and
    path; online (a file:// URL here) it downloads, checks the sha256 prefix in the file
    name, caches, and a cached file is used without the source."""
    import hashlib

    from backbones import resnet as resnet_module
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    folder = tmp_path / "hub" / "checkpoints"
    name = imagenet_weight_files(18)[0]
    assert name == "resnet18-f37072fd.pth"
    assert imagenet_weight_files(101, 32, 8)[0].startswith("resnext101_32x8d-")
    assert imagenet_weight_files(50)[0] == "resnet50-0676ba61.pth"
    assert imagenet_weight_files(101)[0] == "resnet101-63fe2227.pth"
    monkeypatch.setenv("MASKRCNN_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        build_resnet_fpn_backbone(depth=18, pretrained="imagenet")
    assert name in str(err.value) and str(folder / name) in str(err.value)

    monkeypatch.delenv("MASKRCNN_OFFLINE")
    torch.manual_seed(3)
    source = tmp_path / "published.pth"
    torch.save(resnet18(weights=None).state_dict(), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    published = source.rename(tmp_path / f"resnet18-{digest}.pth")
    monkeypatch.setattr(resnet_module, "_imagenet_urls", lambda *a: [published.as_uri()])
    ours = build_resnet_fpn_backbone(depth=18, pretrained="imagenet")
    assert torch.equal(ours.body.conv1.weight, torch.load(published)["conv1.weight"])
    assert (folder / published.name).is_file()
    (folder / published.name).write_bytes(published.read_bytes()[:-10])   # corrupted
    with pytest.raises(ValueError, match="sha256"):
        build_resnet_fpn_backbone(depth=18, pretrained="imagenet")
