"""Installing the package: the shipped defaults, presets and demo recipe are found from any
directory, a config.ini of another tool in the working directory changes nothing, and a
wheel built with `pip wheel` works in a fresh environment (kernels included)."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import torch

import configs
from configs import resolve_config
from maskrcnn import (DEFAULT_CONFIG, MaskRCNN, __version__, apply_overrides,
                      build_model, load_config)
from engine.checkpoint import plain
from engine.cli import DEMO_CONFIG, main

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
SMALL = dict(backbone="resnet18")   # cheap to build; the config logic is the same
HOSTILE = "[database]\nhost = localhost\nport = 5432\n"       # another tool's config.ini
FOREIGN = "[model]\nnum_classes = 7\n[backbone]\nbackbone = resnet34\n"   # valid, not ours


# ------------------------------------------------------------------------ fast checks

def test_defaults_are_the_packages_own():
    assert DEFAULT_CONFIG == configs.shipped("config.ini") and DEFAULT_CONFIG.is_file()
    assert DEMO_CONFIG == configs.shipped("demo.ini") and DEMO_CONFIG.is_file()
    assert configs.shipped("zoo/torchvision/maskrcnn_resnet50_fpn.ini").is_file()
    with pytest.raises(FileNotFoundError, match="not shipped"):
        configs.shipped("nope.ini")


@pytest.mark.parametrize("text", [HOSTILE, FOREIGN], ids=["other-tool", "valid-foreign"])
def test_config_ini_in_working_directory_changes_nothing(tmp_path, monkeypatch, text):
    clean = tmp_path / "clean"
    clean.mkdir()
    monkeypatch.chdir(clean)
    expected = MaskRCNN(**SMALL).cfg           # built where no config.ini lies
    (tmp_path / "config.ini").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert load_config() == load_config(DEFAULT_CONFIG)
    model = MaskRCNN(**SMALL)
    assert model.num_classes == 80
    for section in ("model", "backbone", "transform", "rpn", "roi_heads"):
        assert model.cfg[section] == expected[section], section


def test_user_config_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a relative path naming a shipped file falls back to the package's copy ...
    demo = resolve_config("configs/demo.ini")
    assert demo == load_config(DEMO_CONFIG) and demo.backbone.backbone == "resnet18"
    preset = resolve_config("configs/zoo/detectron2/mask_rcnn_R_50_FPN_3x.ini")
    assert preset.backbone.backbone == "resnet50" and preset.model.num_classes == 80
    assert resolve_config("config.ini") == load_config(DEFAULT_CONFIG)
    assert resolve_config(None) == load_config(DEFAULT_CONFIG)
    # ... while a file that exists in the working directory is the user's and wins
    (tmp_path / "config.ini").write_text(FOREIGN)
    assert resolve_config("config.ini").model.num_classes == 7
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.ini").write_text(FOREIGN)
    assert resolve_config("configs/demo.ini").backbone.backbone == "resnet34"
    (tmp_path / "mine.ini").write_text(HOSTILE)
    with pytest.raises(ValueError, match=r"unknown section \[database\]"):
        resolve_config("mine.ini")
    with pytest.raises(FileNotFoundError, match="missing.ini"):
        resolve_config("missing.ini")


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"maskrcnn {__version__}"
    assert __version__ and __version__[0].isdigit()


# ------------------------------------------------------------- wheel in a fresh venv

# Ignored by git (.gitignore): a copy without them is what a clean clone builds from.
_NOT_SOURCES = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build",
                                      "dist", "outputs", ".pytest_cache", "*.so", ".whl",
                                      ".gl", "*.pyc")
TINY = dict(num_classes=3, backbone="resnet18", norm="gn", fpn_channels=32,
            representation_size=64, mask_layers=(32,), mask_dim_reduced=32, min_size=64,
            max_size=64, anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=50, box_detections_per_img=20)

CHECK_INSTALLED = r"""
import json, sys
from pathlib import Path
import configs, libs, maskrcnn, engine.cli
from libs._loader import BUILD_DIR, get_lib
from maskrcnn import MaskRCNN
here = {m.__name__: m.__file__ for m in (configs, libs, maskrcnn, engine.cli)}
here["kernels"] = str(BUILD_DIR)
default = MaskRCNN(backbone="resnet18")
small = MaskRCNN(num_classes=3, backbone="resnet18")
preset = MaskRCNN(config="configs/zoo/torchvision/maskrcnn_resnet50_fpn.ini")
print(json.dumps(dict(
    files=here, default_config=str(maskrcnn.DEFAULT_CONFIG),
    demo_config=str(engine.cli.DEMO_CONFIG), demo_exists=engine.cli.DEMO_CONFIG.is_file(),
    cpu_lib=get_lib("cpu") is not None, backend=libs.backend_info()["cpu"],
    default_classes=default.num_classes, small_classes=small.num_classes,
    preset=[preset.num_classes, preset.cfg.backbone.backbone], version=maskrcnn.__version__)))
"""


def _run(cmd, cwd, env, timeout=300):
    run = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, f"{cmd} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    return run


def _fresh_venv(path: Path, env) -> Path:
    """A venv without pip that sees this environment's packages (torch, ...) after its own:
    a .pth line appends our site-packages (its .pth files, e.g. the editable install of
    this checkout, are not run)."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent, env=env)
    python = path / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=path.parent, env=env).stdout.strip()
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"],
                           str(Path(torch.__file__).parents[1])])
    Path(site, "_reuse_outer_env.pth").write_text("".join(f"{p}\n" for p in outer))
    return python


def _pip_install(python: Path, args, cwd, env):
    return _run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                 "--no-deps", "--no-index", "--no-build-isolation", *args], cwd=cwd, env=env)


def _tiny_checkpoint(path: Path) -> None:
    """What engine/train.py saves, minus the optimizer: enough for `maskrcnn predict`."""
    torch.manual_seed(0)
    cfg = apply_overrides(load_config(DEFAULT_CONFIG), TINY)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "config": plain(cfg), "iteration": 0,
                "cat_ids": [1, 2, 3], "class_names": ["a", "b", "c"]}, path)


def _image(path: Path) -> None:
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(64, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


def _check_installed(python: Path, prefix: Path, work: Path, env, kernels: bool) -> dict:
    out = _run([python, "-c", CHECK_INSTALLED], cwd=work, env=env).stdout
    info = json.loads(out.strip().splitlines()[-1])
    for name, file in info["files"].items():
        assert Path(file).resolve().is_relative_to(prefix), (name, file, prefix)
    for key in ("default_config", "demo_config"):
        assert Path(info[key]).resolve().is_relative_to(prefix), (key, info[key])
    assert info["demo_exists"]
    assert info["default_classes"] == 80 and info["small_classes"] == 3
    assert info["preset"] == [90, "resnet50"]
    if kernels:
        assert info["cpu_lib"] and info["backend"].startswith("native"), info["backend"]
    return info


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_directory(tmp_path):
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env.update(MASKRCNN_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="2")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCES)

    # pip wheel: the build compiles the CPU kernels into the wheel
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
          "--no-build-isolation", "-w", tmp_path / "dist", src], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {"configs/__init__.py", "configs/config.ini", "configs/demo.ini",
               "configs/zoo/torchvision/maskrcnn_resnet50_fpn.ini",
               "configs/zoo/detectron2/mask_rcnn_R_50_FPN_3x.ini",
               "libs/csrc/mrcnn_kernels.h", "libs/build/libmrcnn_cpu.so", "maskrcnn.py",
               "builder.py", "generalized_rcnn.py", "layers/conv.py", "convert/torchvision.py"}
    assert shipped <= names, sorted(shipped - names)
    assert {n for n in REPO.glob("configs/zoo/*/*.ini")} and all(
        f"configs/{p.relative_to(REPO / 'configs')}" in names
        for p in REPO.glob("configs/zoo/*/*.ini"))
    assert not wheel.name.endswith("-none-any.whl"), wheel.name   # it holds a .so
    wheel_meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
    assert "Root-Is-Purelib: false" in zipfile.ZipFile(wheel).read(wheel_meta).decode()
    t_wheel = time.perf_counter() - t0

    venv = tmp_path / "venv"
    python = _fresh_venv(venv, env)
    _pip_install(python, [wheel], cwd=tmp_path, env=env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "config.ini").write_text(HOSTILE)
    info = _check_installed(python, venv.resolve(), work, env, kernels=True)

    maskrcnn_cmd = venv / "bin" / "maskrcnn"
    version = _run([maskrcnn_cmd, "--version"], cwd=work, env=env).stdout.strip()
    assert version == f"maskrcnn {info['version']}" and info["version"] == __version__

    _tiny_checkpoint(work / "tiny.pth")
    _image(work / "img.png")
    _run([maskrcnn_cmd, "predict", "--weights", "tiny.pth", "img.png", "--out", "preds",
          "--no-progress", "--device", "cpu"], cwd=work, env=env)
    assert (work / "preds" / "img.png").is_file()
    assert isinstance(json.loads((work / "preds" / "results.json").read_text()), list)
    t_wheel_venv = time.perf_counter() - t0 - t_wheel

    # pip install -e: the same from the source tree (the kernels are already built there)
    venv_e = tmp_path / "venv_e"
    python_e = _fresh_venv(venv_e, env)
    _pip_install(python_e, ["-e", src], cwd=tmp_path, env=env)
    _check_installed(python_e, src.resolve(), work, env, kernels=True)
    t_editable = time.perf_counter() - t0 - t_wheel - t_wheel_venv
    print(f"\nwheel {wheel.name}: build {t_wheel:.1f} s, install + checks "
          f"{t_wheel_venv:.1f} s, editable {t_editable:.1f} s")
