"""Model zoo: the table against its sources, categories, name resolution, the verified
download cache (file:// URLs only: no test touches the network) and safe reading."""
import hashlib
import pickle
import re
import struct
import urllib.request
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection import (MaskRCNN_ResNet50_FPN_V2_Weights,
                                          MaskRCNN_ResNet50_FPN_Weights)

from convert import zoo

REPO = Path(__file__).resolve().parents[2]
# detectron2's source at the commit the zoo table was taken from (the oracle for its URLs
# and APs), as a tarball beside the checkout: shared/oracles in the repository or next to it.
D2_SRC_NAME = "detectron2-src-02b5c4e"
D2_SRC_TARBALLS = [REPO / "shared" / "oracles" / f"{D2_SRC_NAME}.tar.gz",
                   REPO.parent / "shared" / "oracles" / f"{D2_SRC_NAME}.tar.gz"]


@pytest.fixture(scope="session")
def d2_model_zoo_md(tmp_path_factory) -> Path:
    """detectron2's MODEL_ZOO.md, extracted (that one file) from the source tarball into a
    temporary folder; skips only when no tarball is there."""
    import tarfile
    tarball = next((p for p in D2_SRC_TARBALLS if p.is_file()), None)
    if tarball is None:
        pytest.skip("detectron2's source (the oracle for the zoo's detectron2 URLs and APs) "
                    f"is absent: none of {[str(p) for p in D2_SRC_TARBALLS]}")
    dest = tmp_path_factory.mktemp("d2src")
    member = f"{D2_SRC_NAME}/MODEL_ZOO.md"
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, members=[tar.getmember(member)], filter="data")
    return dest / member


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path (TORCH_HOME; set_dir's override cleared)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)   # restored by monkeypatch
    monkeypatch.delenv(zoo.OFFLINE_ENV, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def make_entry(url: str, source: str = "torchvision", sha256=None) -> zoo.ZooEntry:
    return zoo.ZooEntry(name=f"{source}/tiny", preset=f"configs/zoo/{source}/tiny.ini",
                        url=url, sha256=sha256, box_ap=1.0, mask_ap=2.0, source=source,
                        backbone="resnet50")


def d2_state() -> dict:
    """A detectron2-style model-zoo dict."""
    return {"model": {"backbone.bottom_up.stem.conv1.weight": np.ones((4, 3, 1, 1), "f4"),
                      "roi_heads.box_predictor.cls_score.bias": np.arange(5, dtype="f4")},
            "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}


def serve(tmp_path: Path, name: str, data: bytes) -> Path:
    """A 'remote' file to download from (by its file:// URL)."""
    src = tmp_path / "remote" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    return src


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name) \
        if folder.is_dir() else []


def forbid_download(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("fetch downloaded although the file is cached")
    monkeypatch.setattr(urllib.request, "urlopen", no)


def forbid_reading(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("the checkpoint was read although it should not be")
    monkeypatch.setattr(zoo, "_read", no)


class PrintOnLoad:
    """Unpickling this calls print("pwned"): a stand-in for arbitrary code."""

    def __reduce__(self):
        return (print, ("pwned",))


# ----------------------------------------------------------------------- the table

def test_zoo_names_presets_and_coco_defaults():
    assert sorted(zoo.ZOO) == sorted([
        "torchvision/maskrcnn_resnet50_fpn", "torchvision/maskrcnn_resnet50_fpn_v2",
        "detectron2/mask_rcnn_R_50_FPN_3x", "detectron2/mask_rcnn_R_101_FPN_3x",
        "detectron2/mask_rcnn_X_101_32x8d_FPN_3x", "detectron2/mask_rcnn_R_50_FPN_400ep_LSJ",
        "detectron2/mask_rcnn_R_101_FPN_400ep_LSJ"])
    for name, e in zoo.ZOO.items():
        assert e.name == name and e.preset == f"configs/zoo/{name}.ini"
        assert e.source == name.split("/")[0]
        assert e.preset_path == REPO / e.preset
        assert e.filename == e.url.rsplit("/", 1)[1]
        assert (e.sha256 is None) == (e.source == "detectron2")
    for backbone, name in zoo.COCO_FOR_BACKBONE.items():
        assert zoo.ZOO[name].backbone == backbone
    assert zoo.ZOO["detectron2/mask_rcnn_X_101_32x8d_FPN_3x"].backbone == "resnext101"
    assert zoo.ZOO["detectron2/mask_rcnn_R_101_FPN_3x"].backbone == "resnet101"


@pytest.mark.parametrize("name, weights", [
    ("torchvision/maskrcnn_resnet50_fpn", MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
    ("torchvision/maskrcnn_resnet50_fpn_v2", MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1)])
def test_torchvision_entries_match_torchvision(name, weights):
    e = zoo.ZOO[name]
    metrics = weights.meta["_metrics"]["COCO-val2017"]
    assert e.url == weights.url
    assert (e.box_ap, e.mask_ap) == (metrics["box_map"], metrics["mask_map"])
    # torch.hub's convention: the name's "-<hex>" suffix is the sha256 prefix.
    assert e.sha256 == re.search(r"-([0-9a-f]+)\.pth$", weights.url).group(1)


def test_detectron2_entries_match_model_zoo_md(d2_model_zoo_md):
    text = d2_model_zoo_md.read_text()
    entries = [e for e in zoo.ZOO.values() if e.source == "detectron2"]
    assert len(entries) == 5
    for e in entries:
        model = e.name.split("/", 1)[1]
        row = re.search(rf"<!-- ROW: {re.escape(model)} -->(.*?)</tr>", text, re.S)
        assert row, f"{model} has no row in MODEL_ZOO.md"
        cells = re.findall(r'<td align="center">([^<]*)</td>', row.group(1))
        # ... box AP, mask AP, model id, then the links cell (not a plain cell).
        box_ap, mask_ap, model_id = cells[-3:]
        assert (e.box_ap, e.mask_ap) == (float(box_ap), float(mask_ap)), model
        urls = re.findall(r'href="(https://[^"]+\.pkl)"', row.group(1))
        assert urls == [e.url], model
        assert f"/{model_id}/" in e.url


# ----------------------------------------------------------------------- categories

def test_coco_categories_from_torchvision_meta():
    names = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert len(zoo.COCO_CATEGORIES) == 80
    assert zoo.COCO_CATEGORIES[0] == (1, "person")
    assert zoo.COCO_CATEGORIES[-1] == (90, "toothbrush")
    ids = [cid for cid, _ in zoo.COCO_CATEGORIES]
    assert ids == sorted(ids) and 12 not in ids
    assert all(names[cid] == name for cid, name in zoo.COCO_CATEGORIES)


def test_categories_for_detectron2_are_contiguous():
    cats = zoo.categories_for("detectron2")
    assert sorted(cats) == list(range(1, 81))
    assert cats[1] == ("person", 1)
    assert cats[12] == ("stop sign", 13)   # COCO id 12 is unused: labels shift past it
    assert cats[80] == ("toothbrush", 90)
    assert zoo.ZOO["detectron2/mask_rcnn_R_50_FPN_3x"].categories == cats


def test_categories_for_torchvision_are_coco_ids():
    names = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    cats = zoo.categories_for("torchvision")
    assert sorted(cats) == list(range(1, 91))
    assert cats[1] == ("person", 1) and cats[90] == ("toothbrush", 90)
    assert cats[12] == ("N/A", 12)
    assert all(cats[i] == (names[i], i) for i in range(1, 91))
    assert sum(name == "N/A" for name, _ in cats.values()) == 10
    with pytest.raises(ValueError, match="unknown zoo source 'caffe2'"):
        zoo.categories_for("caffe2")


# ----------------------------------------------------------------------- resolve_name

def test_resolve_name():
    assert zoo.resolve_name("coco", "resnet101").name == \
        "detectron2/mask_rcnn_R_101_FPN_400ep_LSJ"
    assert zoo.resolve_name("coco", "resnet50").name == \
        "detectron2/mask_rcnn_R_50_FPN_400ep_LSJ"
    assert zoo.resolve_name("coco", "resnext101").name == \
        "detectron2/mask_rcnn_X_101_32x8d_FPN_3x"
    for name in zoo.ZOO:
        assert zoo.resolve_name(name, "resnet101") is zoo.ZOO[name]
    assert zoo.resolve_name("weights/model_final.pth", "resnet50") is None
    assert zoo.resolve_name("imagenet", "resnet50") is None


def test_resolve_name_errors():
    with pytest.raises(ValueError, match="resnet18") as err:
        zoo.resolve_name("coco", "resnet18")
    assert "resnet101, resnet50, resnext101" in str(err.value)
    with pytest.raises(ValueError, match="not in the model zoo") as err:
        zoo.resolve_name("detectron2/mask_rcnn_R_50_FPN_3x.ini", "resnet50")
    assert "Did you mean 'detectron2/mask_rcnn_R_50_FPN_3x'" in str(err.value)
    assert all(name in str(err.value) for name in zoo.ZOO)
    with pytest.raises(ValueError, match="not in the model zoo"):
        zoo.resolve_name("torchvision/maskrcnn_resnet101_fpn", "resnet101")


# ----------------------------------------------------------------------- fetch

def test_cache_dir_follows_torch_home(hub):
    assert zoo.cache_dir() == hub
    e = zoo.ZOO["torchvision/maskrcnn_resnet50_fpn"]
    assert zoo.cached_file(e) == hub / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"


@pytest.mark.parametrize("progress", [False, True])
def test_fetch_file_url_end_to_end(hub, tmp_path, monkeypatch, capsys, progress):
    data = b"x" * 3_000_000   # several download chunks
    src = serve(tmp_path, "weights-abc.pth", data)
    digest = hashlib.sha256(data).hexdigest()
    entry = make_entry(src.as_uri(), sha256=digest[:8])
    path = zoo.fetch(entry, progress=progress)
    assert path == hub / "weights-abc.pth"
    assert path.read_bytes() == data
    assert leftovers(hub) == [] and not (hub / "weights-abc.pth.sha256").exists()
    err = capsys.readouterr().err
    if progress:
        assert "weights-abc.pth" in err and "100%" in err
    else:
        assert err == ""
    # Cached now: verified by hash, not downloaded again.
    forbid_download(monkeypatch)
    assert zoo.fetch(entry, progress=progress) == path


def test_fetch_sha_mismatch_saves_nothing(hub, tmp_path):
    src = serve(tmp_path, "weights-0000.pth", b"not the published file")
    entry = make_entry(src.as_uri(), sha256="00000000")
    with pytest.raises(zoo.ChecksumError) as err:
        zoo.fetch(entry, progress=False)
    message = str(err.value)
    assert "00000000" in message and hashlib.sha256(src.read_bytes()).hexdigest() in message
    assert str(hub / "weights-0000.pth") in message
    assert list(hub.iterdir()) == []   # neither the final name nor a partial file


def test_fetch_rename_is_atomic(hub, tmp_path, monkeypatch):
    """While the download is verified, nothing sits under the final name."""
    src = serve(tmp_path, "model_final.pkl", pickle.dumps(d2_state()))
    entry = make_entry(src.as_uri(), source="detectron2")
    final = hub / "model_final.pkl"
    seen = []

    def check(state):
        seen.append((final.exists(), leftovers(hub)))
        raise ValueError("unexpected keys")
    with pytest.raises(zoo.ChecksumError, match="unexpected keys"):
        zoo.fetch(entry, progress=False, check_content=check)
    assert len(seen) == 1
    assert seen[0][0] is False and len(seen[0][1]) == 1   # verified as a partial file
    assert seen[0][1][0].startswith("model_final.pkl.partial-")
    assert list(hub.iterdir()) == []   # partial deleted, no sidecar


def test_fetch_corrupt_cached_file_is_refused_unread(hub, tmp_path, monkeypatch):
    entry = make_entry((tmp_path / "weights-1234abcd.pth").as_uri(), sha256="1234abcd")
    hub.mkdir(parents=True)
    (hub / "weights-1234abcd.pth").write_bytes(b"half a file")
    forbid_download(monkeypatch)
    forbid_reading(monkeypatch)
    with pytest.raises(zoo.ChecksumError) as err:
        zoo.fetch(entry, progress=False)
    message = str(err.value)
    assert "1234abcd" in message and hashlib.sha256(b"half a file").hexdigest() in message
    assert f"rm {hub / 'weights-1234abcd.pth'}" in message and "retry" in message
    assert (hub / "weights-1234abcd.pth").read_bytes() == b"half a file"   # not replaced


def test_fetch_detectron2_content_check_and_sidecar(hub, tmp_path, monkeypatch):
    data = pickle.dumps(d2_state(), protocol=4)
    src = serve(tmp_path, "model_final_abc123.pkl", data)
    entry = make_entry(src.as_uri(), source="detectron2")
    states = []
    path = zoo.fetch(entry, progress=False, check_content=states.append)
    assert path == hub / "model_final_abc123.pkl" and path.read_bytes() == data
    assert len(states) == 1
    w = states[0]["model"]["roi_heads.box_predictor.cls_score.bias"]
    assert isinstance(w, torch.Tensor) and torch.equal(w, torch.arange(5.0))
    sidecar = hub / "model_final_abc123.pkl.sha256"
    assert sidecar.read_text() == f"{hashlib.sha256(data).hexdigest()}  {path.name}\n"
    assert leftovers(hub) == []

    # Later loads compare the hash only: no download, no unpickling.
    forbid_download(monkeypatch)
    forbid_reading(monkeypatch)
    assert zoo.fetch(entry, progress=False, check_content=states.append) == path
    assert len(states) == 1

    # Tampered with (same size, one byte changed): refused.
    tampered = bytearray(data)
    tampered[-20] ^= 0xFF
    path.write_bytes(bytes(tampered))
    with pytest.raises(zoo.ChecksumError, match="changed since it was verified") as err:
        zoo.fetch(entry, progress=False)
    assert str(sidecar) in str(err.value) and f"rm {path} {sidecar}" in str(err.value)


def test_fetch_cached_detectron2_without_sidecar(hub, tmp_path, monkeypatch):
    """A file put into the cache by hand: content-checked once, then recorded."""
    entry = make_entry((tmp_path / "model_final_x.pkl").as_uri(), source="detectron2")
    hub.mkdir(parents=True)
    path = hub / "model_final_x.pkl"
    forbid_download(monkeypatch)

    path.write_bytes(pickle.dumps({"model": {"w": PrintOnLoad()}}))
    with pytest.raises(zoo.ChecksumError, match="builtins.print"):
        zoo.fetch(entry, progress=False)
    assert not (hub / "model_final_x.pkl.sha256").exists()

    def wrong(state):
        raise KeyError("roi_heads.mask_head.predictor.weight")
    path.write_bytes(pickle.dumps(d2_state()))
    with pytest.raises(zoo.ChecksumError, match="roi_heads.mask_head.predictor.weight"):
        zoo.fetch(entry, progress=False, check_content=wrong)
    assert not (hub / "model_final_x.pkl.sha256").exists()

    assert zoo.fetch(entry, progress=False, check_content=lambda s: None) == path
    assert (hub / "model_final_x.pkl.sha256").read_text().split()[0] == \
        hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_malicious_download_runs_nothing(hub, tmp_path, capsys):
    src = serve(tmp_path, "model_final_evil.pkl", pickle.dumps({"model": PrintOnLoad()}))
    entry = make_entry(src.as_uri(), source="detectron2")
    with pytest.raises(zoo.ChecksumError, match="builtins.print"):
        zoo.fetch(entry, progress=False)
    assert "pwned" not in capsys.readouterr().out
    assert list(hub.iterdir()) == []


def test_fetch_offline_names_url_and_path(hub, monkeypatch):
    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")
    forbid_download(monkeypatch)
    entry = zoo.ZOO["detectron2/mask_rcnn_R_50_FPN_3x"]
    with pytest.raises(FileNotFoundError) as err:
        zoo.fetch(entry)
    message = str(err.value)
    assert entry.url in message and str(hub / "model_final_f10217.pkl") in message
    assert entry.name in message and "MASKRCNN_OFFLINE=1" in message
    assert not hub.exists() or leftovers(hub) == []


def test_fetch_failing_url(hub, tmp_path):
    missing = tmp_path / "remote" / "nowhere-12345678.pth"
    entry = make_entry(missing.as_uri(), sha256="12345678")
    with pytest.raises(zoo.DownloadError) as err:
        zoo.fetch(entry, progress=False)
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert missing.as_uri() in message and "No such file" in message
    assert f"put it at {hub / 'nowhere-12345678.pth'}" in message
    assert list(hub.iterdir()) == []


# ----------------------------------------------------------------------- read_checkpoint

@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_read_detectron2_pickle(tmp_path, protocol):
    state = d2_state()
    state["model"]["big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    state["model"]["int"] = np.array([1, 2], dtype=np.int64)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(state, protocol=protocol))
    out = zoo.read_checkpoint(path)
    assert out["__author__"] == "Detectron2 Model Zoo" and out["matching_heuristics"] is True
    assert set(out["model"]) == set(state["model"])
    for name, array in state["model"].items():
        t = out["model"][name]
        assert isinstance(t, torch.Tensor) and t.shape == array.shape
        assert np.array_equal(t.numpy(), array)
    out["model"]["int"] += 1   # writable tensors (no read-only numpy buffer behind them)
    assert out["model"]["big_endian"].dtype == torch.float32


def py2_pickle(values: np.ndarray) -> bytes:
    """What Python 2's cPickle writes for {"model": {"w": float32 array}, "__author__": ..}:
    protocol 2, numpy.core names, the array data as a py2 str (SHORT_BINSTRING/BINSTRING)."""
    def s(b):
        return b"U" + bytes([len(b)]) + b
    data = values.astype("<f4").tobytes()
    dtype = (b"cnumpy\ndtype\n" + s(b"f4") + b"\x89\x88\x87R(K\x03" + s(b"<")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b")
             + b"\x87R(K\x01K" + bytes([len(values)]) + b"\x85" + dtype + b"\x89T"
             + struct.pack("<i", len(data)) + data + b"tb")
    return (b"\x80\x02}(" + s(b"model") + b"}(" + s(b"w") + array + b"u"
            + s(b"__author__") + s(b"Detectron") + b"u.")


def test_read_python2_pickle(tmp_path):
    path = tmp_path / "old.pkl"
    path.write_bytes(py2_pickle(np.array([0.5, 1.5, -2.0], dtype="f4")))
    out = zoo.read_checkpoint(path)
    assert out["__author__"] == "Detectron"
    assert torch.equal(out["model"]["w"], torch.tensor([0.5, 1.5, -2.0]))


def test_read_malicious_pickle_runs_nothing(tmp_path, capsys):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": PrintOnLoad()}}, protocol=2))
    with pytest.raises(zoo.UnsafeCheckpointError) as err:
        zoo.read_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "builtins.print" in message
    assert "pwned" not in capsys.readouterr().out


def test_read_pickle_refuses_other_codecs(tmp_path):
    # _codecs.encode is allowed for protocol-2 bytes, but only with latin1.
    blob = (b"\x80\x02}(X\x01\x00\x00\x00wc_codecs\nencode\n"
            b"X\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86Ru.")   # {"w": encode("a", "rot13")}
    path = tmp_path / "codec.pkl"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match="rot13"):
        zoo.read_checkpoint(path)


def test_read_torch_files(tmp_path):
    path = tmp_path / "state.pth"
    torch.save({"w": torch.arange(3.0)}, path)
    assert torch.equal(zoo.read_checkpoint(path)["w"], torch.arange(3.0))
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(zoo.read_checkpoint(legacy)["w"], torch.ones(2))
    # Content decides, not the extension.
    renamed = tmp_path / "state.pkl"
    renamed.write_bytes(path.read_bytes())
    assert torch.equal(zoo.read_checkpoint(renamed)["w"], torch.arange(3.0))


@pytest.mark.parametrize("legacy", [False, True])
def test_read_torch_file_with_object_is_refused(tmp_path, legacy):
    path = tmp_path / "object.pth"
    torch.save({"w": torch.ones(1), "ratio": Fraction(1, 3)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(zoo.UnsafeCheckpointError) as err:
        zoo.read_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "fractions.Fraction" in message
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)


def test_read_truncated_files(tmp_path):
    zipped = tmp_path / "full.pth"
    torch.save({"w": torch.zeros(1000)}, zipped)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(zipped.read_bytes()[:len(zipped.read_bytes()) // 2])
    pickled = pickle.dumps(d2_state(), protocol=4)
    cut_pkl = tmp_path / "cut.pkl"
    cut_pkl.write_bytes(pickled[:len(pickled) // 2])
    html = tmp_path / "error.pkl"
    html.write_bytes(b"<html>403 Forbidden</html>")
    for path in (cut, cut_pkl, html):
        with pytest.raises(ValueError, match="truncated") as err:
            zoo.read_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert not isinstance(err.value, zoo.UnsafeCheckpointError)
    with pytest.raises(FileNotFoundError, match="nothing.pkl"):
        zoo.read_checkpoint(tmp_path / "nothing.pkl")


# ----------------------------------------------------------------------- listings

def test_describe_zoo_and_markdown(hub):
    rows = zoo.describe_zoo()
    assert [r["name"] for r in rows] == list(zoo.ZOO)
    assert all(r["cached"] is False for r in rows)
    hub.mkdir(parents=True)
    (hub / "model_final_f96b26.pkl").write_bytes(b"")
    rows = {r["name"]: r for r in zoo.describe_zoo()}
    r101 = rows["detectron2/mask_rcnn_R_101_FPN_400ep_LSJ"]
    assert r101["cached"] is True and r101["path"] == str(hub / "model_final_f96b26.pkl")
    assert (r101["box_ap"], r101["mask_ap"]) == (48.9, 43.7)
    assert r101["preset"] == "configs/zoo/detectron2/mask_rcnn_R_101_FPN_400ep_LSJ.ini"

    table = zoo.zoo_markdown_table().splitlines()
    assert table[0].startswith("| name | preset | box AP | mask AP | source | URL |")
    assert len(table) == 2 + len(zoo.ZOO)
    assert any("detectron2/mask_rcnn_R_101_FPN_400ep_LSJ" in line and "48.9" in line
               and "43.7" in line and zoo.ZOO[r101["name"]].url in line for line in table)


def test_readme_shows_the_zoo_table():
    """The README's table is the zoo's own rendering (rows, URLs and AP in step)."""
    readme = (zoo.PACKAGE_ROOT / "README.md").read_text()
    assert "\n".join(zoo.zoo_markdown_table().splitlines()[2:]) in readme
