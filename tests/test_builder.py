"""builder.py: every slot is a table. An unknown name is a one-line error listing the
valid names; each shipped entry builds exactly what the builder built before the tables
(the reference below is the previous builder's code, with today's classes); an entry added
to a table at run time is picked by its config key."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import builder
from backbones import FPNS, TRUNKS, build_resnet_fpn_backbone
from builder import build_fast_path, build_parts, lookup, lookup_numbered
from heads import (BOX_HEADS, BOX_PREDICTORS, MASK_HEADS, MASK_PREDICTORS, PASTE_MASKS,
                   BoxPredictor, MaskHead, MaskPredictor, RoIHeads, build_box_head)
from heads.mask_head import paste_masks_in_image
from layers import FrozenBatchNorm2d
from maskrcnn import DEFAULT_CONFIG, MaskRCNN, apply_overrides, load_config
from pooling import LEVEL_RULES, ROI_POOLERS, MultiScaleRoIAlign, map_levels
from proposal import RPN, RPN_HEADS, AnchorGenerator, RPNHead
from proposal.anchors import CELL_ANCHORS, base_anchors
from proposal.rpn import PROPOSAL_FILTERS

torch.set_num_threads(2)

# Small and cheap (resnet18, 32 FPN channels), but every slot present.
SMALL = {"model.num_classes": 3, "backbone.backbone": "resnet18",
         "backbone.fpn_channels": 32, "box_head.representation_size": 64,
         "mask_head.mask_layers": (32, 32), "mask_head.mask_dim_reduced": 16}

# (section, key, table, what the error calls it)
SLOTS = [
    ("backbone", "backbone", TRUNKS, "trunk"),
    ("backbone", "fpn", FPNS, "FPN"),
    ("anchors", "anchor_rule", CELL_ANCHORS, "anchor rule"),
    ("rpn", "rpn_head", RPN_HEADS, "RPN head"),
    ("rpn", "rpn_box_filter", PROPOSAL_FILTERS, "proposal filter"),
    ("roi_heads", "roi_level_rule", LEVEL_RULES, "level rule"),
    ("box_head", "box_roi_pool", ROI_POOLERS, "RoI pooler"),
    ("box_head", "box_head", BOX_HEADS, "box head"),
    ("box_head", "box_predictor", BOX_PREDICTORS, "box predictor"),
    ("mask_head", "mask_roi_pool", ROI_POOLERS, "RoI pooler"),
    ("mask_head", "mask_head", MASK_HEADS, "mask head"),
    ("mask_head", "mask_predictor", MASK_PREDICTORS, "mask predictor"),
    ("mask_head", "mask_paste", PASTE_MASKS, "mask paste"),
]


def _cfg(**overrides):
    return apply_overrides(load_config(DEFAULT_CONFIG), {**SMALL, **overrides})


def test_every_slot_has_a_config_key_and_a_default_entry():
    cfg = load_config(DEFAULT_CONFIG)
    for section, key, table, _ in SLOTS:
        name = cfg[section][key]
        assert name in table or re.sub(r"\d+", "N", name, count=1) in table, (key, name)


@pytest.mark.parametrize("section, key, table, what", SLOTS, ids=[s[1] for s in SLOTS])
def test_unknown_name_is_one_line_listing_the_valid_names(section, key, table, what):
    with pytest.raises(ValueError) as err:
        build_parts(_cfg(**{f"{section}.{key}": "nope"}))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"[{section}] {key} = 'nope' is not a known {what}; "
                              f"valid names: {', '.join(table)}"), message


def test_numbered_names():
    assert lookup_numbered(TRUNKS, "resnet101", "backbone", "backbone", "trunk") == \
        (TRUNKS["resnetN"], 101)
    assert lookup_numbered(TRUNKS, "resnext50", "backbone", "backbone", "trunk") == \
        (TRUNKS["resnextN"], 50)
    assert lookup_numbered(BOX_HEADS, "2fc", "box_head", "box_head", "box head") == \
        (BOX_HEADS["2fc"], None)
    assert lookup_numbered(BOX_HEADS, "0conv1fc", "box_head", "box_head", "box head") == \
        (BOX_HEADS["Nconv1fc"], 0)
    for name in ("resnet", "vgg16", "4fc", "conv1fc"):
        with pytest.raises(ValueError, match=r"valid names: .*\(N: a number\)$"):
            lookup_numbered({**TRUNKS, **BOX_HEADS}, name, "s", "k", "thing")
    with pytest.raises(ValueError, match=r"^\[s\] k = 'c' is not a known thing; "
                                         r"valid names: a, b$"):
        lookup({"a": 1, "b": 2}, "c", "s", "k", "thing")


def test_box_head_names_of_the_regex_still_build():
    """Every name the former regex accepted ("2fc", "Nconv1fc" for N >= 0), through
    build_box_head and through the config."""
    assert type(build_box_head("2fc", 8, 7, 16)).__name__ == "TwoMLPHead"
    for n in (0, 1, 4, 12):
        head = build_box_head(f"{n}conv1fc", 8, 7, 16, conv_dim=8)
        assert type(head).__name__ == "ConvFCHead" and len(head.convs) == n
    with pytest.raises(ValueError, match="box_head must be"):
        build_box_head("3fc", 8, 7, 16)


# The builder before the tables (builder.py at its parent commit), calling today's
# classes directly: the reference the shipped entries must reproduce.
def _reference_parts(cfg):
    from backbones.resnet import FAMILY_WIDTHS
    b, a, r = cfg.backbone, cfg.anchors, cfg.rpn
    family, depth = re.fullmatch(r"(resnet|resnext)(\d+)", b.backbone).groups()
    groups, width = FAMILY_WIDTHS[family]
    fast_path = build_fast_path(cfg)
    backbone = build_resnet_fpn_backbone(
        depth=int(depth), groups=b.groups or groups, width_per_group=b.width_per_group or width,
        norm=b.norm, trainable_layers=b.trainable_layers, out_channels=b.fpn_channels,
        fast_path=fast_path, stride_in_1x1=b.stride_in_1x1, fpn_norm=b.fpn_norm)
    for m in backbone.body.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = b.norm_eps
    anchors = AnchorGenerator(sizes=a.anchor_sizes, aspect_ratios=a.aspect_ratios,
                              rule=a.anchor_rule)
    head = RPNHead(b.fpn_channels, anchors.num_anchors_per_location()[0],
                   num_convs=r.rpn_head_convs, fast_path=fast_path)
    rpn = RPN(anchor_generator=anchors, head=head, **{k: r[k] for k in builder.RPN_KEYS})
    m, h, bh, mh = cfg.model, cfg.roi_heads, cfg.box_head, cfg.mask_head
    channels = b.fpn_channels
    pool_kw = dict(aligned=h.roi_aligned, canonical_scale=h.roi_canonical_scale,
                   canonical_level=h.roi_canonical_level, level_rule=h.roi_level_rule)
    box_head = build_box_head(bh.box_head, channels, bh.box_pool_size, bh.representation_size,
                              bh.box_conv_dim, bh.box_norm, fast_path)
    mask_parts = ()
    if m.mask_on:
        mask_parts = (
            MultiScaleRoIAlign(mh.mask_pool_size, mh.mask_sampling_ratio, **pool_kw),
            MaskHead(channels, tuple(mh.mask_layers), mh.mask_dilation, mh.mask_norm,
                     fast_path),
            MaskPredictor(mh.mask_layers[-1], mh.mask_dim_reduced, m.num_classes + 1,
                          fast_path))
    roi_heads = RoIHeads(
        MultiScaleRoIAlign(bh.box_pool_size, bh.box_sampling_ratio, **pool_kw), box_head,
        BoxPredictor(bh.representation_size, m.num_classes + 1), *mask_parts,
        box_fg_iou_thresh=h.box_fg_iou_thresh, box_bg_iou_thresh=h.box_bg_iou_thresh,
        box_batch_size_per_image=h.box_batch_size_per_image,
        box_positive_fraction=h.box_positive_fraction, bbox_reg_weights=h.bbox_reg_weights,
        box_loss=bh.box_loss, box_smooth_l1_beta=bh.box_smooth_l1_beta,
        box_score_thresh=h.box_score_thresh, box_nms_thresh=h.box_nms_thresh,
        box_detections_per_img=h.box_detections_per_img, box_min_size=h.box_min_size,
        box_drop_empty=h.box_drop_empty)
    return backbone, rpn, roi_heads


@pytest.mark.parametrize("overrides", [
    {},
    {"backbone.backbone": "resnext50", "backbone.fpn_norm": "gn", "box_head.box_head":
     "2conv1fc", "box_head.box_conv_dim": 32, "box_head.box_norm": "gn",
     "rpn.rpn_head_convs": 2, "roi_heads.roi_level_rule": "detectron2",
     "roi_heads.roi_aligned": True, "mask_head.mask_norm": "gn"},
    {"backbone.backbone": "resnet50", "backbone.groups": 2, "backbone.width_per_group": 16,
     "backbone.stride_in_1x1": True, "box_head.box_head": "0conv1fc",
     "model.mask_on": False},
], ids=["default", "resnext_conv_head", "grouped_no_mask"])
def test_shipped_entries_build_what_the_builder_built_before(overrides):
    cfg = _cfg(**overrides)
    torch.manual_seed(0)
    ours = build_parts(cfg)[:3]
    torch.manual_seed(0)
    reference = _reference_parts(cfg)
    for part, ref in zip(ours, reference):
        got, exp = part.state_dict(), ref.state_dict()
        assert list(got) == list(exp)
        for key in exp:
            assert got[key].shape == exp[key].shape and torch.equal(got[key], exp[key]), key
        assert [(n, type(m)) for n, m in part.named_modules()] == \
            [(n, type(m)) for n, m in ref.named_modules()]
        assert [p.requires_grad for p in part.parameters()] == \
            [p.requires_grad for p in ref.parameters()]
        assert repr(part) == repr(ref)


# A variant per slot, added at run time: the kwargs it was called with are recorded.
CALLS = {}


def _recording(name, constructor):
    def build(**kwargs):
        CALLS[name] = kwargs
        return constructor(**kwargs)
    return build


class UpsampleMaskHead(MaskHead):
    """A user's mask head: the shipped one, then a parameter-free 1x1 average."""


def _coarsest_level(sizes, canonical_scale, canonical_level, eps):
    return torch.full_like(sizes, 100.0)        # clamped to the coarsest level


# (section, key, table, entry to add, where it shows in the model)
VARIANTS = [
    ("backbone", "backbone", TRUNKS, "mytrunkN",
     lambda model: CALLS["mytrunkN"]["depth"] == 18 and set(CALLS["mytrunkN"]) == {
         "depth", "norm", "trainable_layers", "fast_path", "groups", "width_per_group",
         "stride_in_1x1"}),
    ("backbone", "fpn", FPNS, "myfpn",
     lambda model: set(CALLS["myfpn"]) == {"in_channels_list", "out_channels", "norm",
                                           "fast_path"}),
    ("rpn", "rpn_head", RPN_HEADS, "myrpnhead",
     lambda model: set(CALLS["myrpnhead"]) == {"in_channels", "num_anchors", "num_convs",
                                               "fast_path"}),
    ("box_head", "box_roi_pool", ROI_POOLERS, "mypool",
     lambda model: CALLS["mypool"]["output_size"] == 7 and set(CALLS["mypool"]) == {
         "output_size", "sampling_ratio", "aligned", "canonical_scale", "canonical_level",
         "level_rule"}),
    ("box_head", "box_head", BOX_HEADS, "myboxhead",
     lambda model: set(CALLS["myboxhead"]) == {"in_channels", "pool_size",
                                               "representation_size", "conv_dim", "norm",
                                               "fast_path"}),
    ("box_head", "box_predictor", BOX_PREDICTORS, "mypredictor",
     lambda model: CALLS["mypredictor"] == {"in_channels": 64, "num_classes": 4}),
    ("mask_head", "mask_roi_pool", ROI_POOLERS, "mymaskpool",
     lambda model: CALLS["mymaskpool"]["output_size"] == 14),
    ("mask_head", "mask_head", MASK_HEADS, "upsample",
     lambda model: isinstance(model.roi_heads.mask_head, UpsampleMaskHead) and set(
         CALLS["upsample"]) == {"in_channels", "layers", "dilation", "norm", "fast_path"}),
    ("mask_head", "mask_predictor", MASK_PREDICTORS, "mymaskpredictor",
     lambda model: set(CALLS["mymaskpredictor"]) == {"in_channels", "dim_reduced",
                                                     "num_classes", "fast_path"}),
]
SHIPPED = {"mytrunkN": TRUNKS["resnetN"], "myfpn": FPNS["fpn"],
           "myrpnhead": RPN_HEADS["standard"], "mypool": ROI_POOLERS["multiscale"],
           "myboxhead": BOX_HEADS["2fc"], "mypredictor": BOX_PREDICTORS["fastrcnn"],
           "mymaskpool": ROI_POOLERS["multiscale"], "upsample": UpsampleMaskHead,
           "mymaskpredictor": MASK_PREDICTORS["deconv"]}


@pytest.mark.parametrize("section, key, table, name, shows", VARIANTS,
                         ids=[v[1] for v in VARIANTS])
def test_a_variant_added_at_run_time_is_picked_by_its_key(monkeypatch, section, key, table,
                                                          name, shows):
    monkeypatch.setitem(table, name, _recording(name, SHIPPED[name]))
    CALLS.clear()
    value = "mytrunk18" if name == "mytrunkN" else name
    model = MaskRCNN(config=None, **{**SMALL, f"{section}.{key}": value})
    assert name in CALLS and shows(model)
    # and the error of an unknown name now lists it
    with pytest.raises(ValueError, match=re.escape(name)):
        build_parts(_cfg(**{f"{section}.{key}": "nope"}))


def test_a_variant_mask_head_runs(monkeypatch):
    monkeypatch.setitem(MASK_HEADS, "upsample", UpsampleMaskHead)
    model = MaskRCNN(config=None, **{**SMALL, "mask_head.mask_head": "upsample",
                                     "transform.min_size": 128, "transform.max_size": 192})
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(0))])
    assert out[0]["masks"].shape[-2:] == (100, 120)


def test_function_tables_added_at_run_time_are_used(monkeypatch):
    """Level rule, anchor rule and mask paste: tables of functions, named down to the
    module that calls them."""
    monkeypatch.setitem(LEVEL_RULES, "coarsest", _coarsest_level)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 300.0, 300.0]])]
    assert map_levels(boxes, 2, 5, 224, 4, "coarsest").tolist() == [3, 3]
    cfg = _cfg(**{"roi_heads.roi_level_rule": "coarsest"})
    roi_heads = build_parts(cfg)[2]
    assert roi_heads.box_roi_pool.level_rule == "coarsest"
    assert roi_heads.mask_roi_pool.level_rule == "coarsest"

    cells = []
    monkeypatch.setitem(CELL_ANCHORS, "mine",
                        lambda s, r: cells.append(s) or base_anchors(s, r))
    rpn = build_parts(_cfg(**{"anchors.anchor_rule": "mine"}))[1]
    assert rpn.anchor_generator.rule == "mine" and len(cells) == 5

    monkeypatch.setitem(PASTE_MASKS, "mine", paste_masks_in_image)
    transform = build_parts(_cfg(**{"mask_head.mask_paste": "mine"}))[3]
    assert transform.mask_paste == "mine"
    monkeypatch.setitem(PROPOSAL_FILTERS, "mine", PROPOSAL_FILTERS["torchvision"])
    assert build_parts(_cfg(**{"rpn.rpn_box_filter": "mine"}))[1].rpn_box_filter == "mine"


def test_level_rule_table_is_the_former_arithmetic():
    """LEVEL_RULES' entries are the former if/elif's expressions, bit for bit."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        s = torch.rand(1000, generator=g, dtype=dtype) * 1000 + 0.5
        s = torch.cat([s, torch.tensor([224.0, 448.0, 112.0, 224 * 2 ** -5e-7], dtype=dtype)])
        tv = torch.floor(4 + torch.log2(s / 224) + torch.tensor(1e-6, dtype=s.dtype))
        d2 = torch.floor(4 + torch.log2(s / 224 + 1e-8))
        assert torch.equal(LEVEL_RULES["torchvision"](s, 224, 4, 1e-6), tv)
        assert torch.equal(LEVEL_RULES["detectron2"](s, 224, 4, 1e-6), d2)


def test_pooler_and_builder_name_unknown_level_rules():
    with pytest.raises(ValueError, match=r"level_rule must be 'torchvision' or "
                                         r"'detectron2', got 'fpn'"):
        MultiScaleRoIAlign(7, 2, level_rule="fpn")


def test_table_kwargs_documented_in_architecture_md():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    for name in ("TRUNKS", "FPNS", "CELL_ANCHORS", "RPN_HEADS", "PROPOSAL_FILTERS",
                 "LEVEL_RULES", "ROI_POOLERS", "BOX_HEADS", "BOX_PREDICTORS", "MASK_HEADS",
                 "MASK_PREDICTORS", "PASTE_MASKS"):
        assert name in text, name


def test_trunk_keeps_nn_module_contract():
    trunk = TRUNKS["resnextN"](depth=50, norm="frozen_bn", trainable_layers=3,
                               groups=0, width_per_group=0)
    assert isinstance(trunk, nn.Module)
    assert (trunk.groups, trunk.width_per_group) == (32, 8)
    assert trunk.out_channels_list == [256, 512, 1024, 2048]
