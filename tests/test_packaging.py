"""Installing the package: the shipped defaults, presets and demo recipe are found from any
directory, a config.ini of another tool in the working directory changes nothing, and a
wheel built with `pip wheel` works in a fresh environment (kernels included)."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
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


def _copy_sources(dst: Path) -> Path:
    """The checkout as a clean clone has it, plus the kernels this checkout already built
    (build_libs.py reuses a library whose stamp matches the sources, compiler and flags:
    the test builds the wheel the same way, without compiling again what is up to date)."""
    shutil.copytree(REPO, dst, ignore=_NOT_SOURCES)
    for built in (REPO / "build" / "kernels", REPO / "libs" / "build"):
        if built.is_dir():
            shutil.copytree(built, dst / built.relative_to(REPO), dirs_exist_ok=True)
    return dst


COMPILERS = ("cc", "gcc", "g++", "c++", "clang", "clang++", "nvcc", "x86_64-linux-gnu-gcc",
             "x86_64-linux-gnu-g++", "cpp")


def _without_compilers(env: dict, tmp: Path) -> dict:
    """env with CC/CXX/CUDA_HOME unset and a PATH on which no compiler is found: each PATH
    folder holding one is replaced by a folder of links to its other programs."""
    env = {k: v for k, v in env.items() if k not in ("CC", "CXX", "CUDA_HOME", "CUDA_PATH")}
    folders = []
    for i, folder in enumerate(p for p in env.get("PATH", os.defpath).split(os.pathsep) if p):
        folder = Path(folder)
        if not any((folder / c).exists() for c in COMPILERS):
            folders.append(str(folder))
            continue
        shadow = tmp / f"path{i}"
        shadow.mkdir()
        for prog in folder.iterdir():
            if prog.name not in COMPILERS and not prog.name.startswith(("gcc-", "g++-", "clang-")):
                (shadow / prog.name).symlink_to(prog)
        folders.append(str(shadow))
    env["PATH"] = os.pathsep.join(folders)
    for c in COMPILERS:
        assert shutil.which(c, path=env["PATH"]) is None, c
    return env


def _needed(lib: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True)
    return [line.split("[")[1].rstrip("]") for line in out.stdout.splitlines()
            if "(NEEDED)" in line]


def _cuobjdump() -> str:
    """cuobjdump from the PATH or from the nvidia-cuda-cuobjdump wheel (make test installs
    it; the CUDA toolkit here has nvcc but not cuobjdump)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for exe in Path(site).glob("nvidia/*/bin/cuobjdump"):
            return str(exe)
    pytest.fail("cuobjdump not found: pip install nvidia-cuda-cuobjdump (make test does)")


def _cuobjdump_archs(lib: Path) -> tuple[set, set]:
    """({sm_XX with SASS}, {compute_XX with PTX}) as cuobjdump lists them."""
    exe = _cuobjdump()
    elf = subprocess.run([exe, "--list-elf", lib], capture_output=True, text=True, check=True)
    ptx = subprocess.run([exe, "--list-ptx", lib], capture_output=True, text=True, check=True)
    sass = {m for m in re.findall(r"\.(sm_\d+)\.cubin", elf.stdout)}
    return sass, {m for m in re.findall(r"\.(sm_\d+)\.ptx", ptx.stdout)}


def _check_wheel_libraries(wheel: Path, tmp: Path) -> dict:
    """The kernels in the wheel: neither needs libtorch or libc10; with nvcc here, the CUDA
    library has SASS for every architecture from sm_75 up that nvcc builds, and PTX of the
    newest (as cuobjdump lists them). Returns the cuobjdump listing."""
    from libs import build_libs
    unpacked = tmp / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    libs = {p.name: p for p in (unpacked / "libs" / "build").glob("*.so")}
    nvcc = build_libs.find_nvcc()
    assert set(libs) == ({"libmrcnn_cpu.so", "libmrcnn_cuda.so"} if nvcc
                         else {"libmrcnn_cpu.so"}), sorted(libs)
    for lib in libs.values():
        needed = _needed(lib)
        assert needed and not [n for n in needed if re.match(r"lib(torch|c10)", n)], needed
    if not nvcc:
        return {}
    sass, ptx = _cuobjdump_archs(libs["libmrcnn_cuda.so"])
    supported = build_libs.supported_archs(nvcc)
    expected = {a for a in supported if int(a[3:]) >= 75}
    assert {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"} <= expected, supported
    assert sass == expected, (sorted(sass), sorted(expected))
    assert ptx == {max(expected, key=lambda a: int(a[3:]))}, ptx
    return {"sass": sass, "ptx": ptx}


@pytest.mark.slow
def test_wheel_installs_and_runs_without_a_compiler(tmp_path):
    """make wheel's build (libs/build_wheel.py) gives a manylinux wheel with every kernel;
    installed in a fresh venv with every compiler hidden, it runs from another directory
    with the native kernels."""
    if shutil.which("auditwheel") is None and not Path(sys.executable).with_name(
            "auditwheel").exists():
        pytest.fail("auditwheel not installed: make test installs it (make wheel needs it)")
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV", "MASKRCNN_CUDA_ARCHS",
                        "MASKRCNN_FORCE_FALLBACK")}
    env.update(MASKRCNN_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="2")
    src = _copy_sources(tmp_path / "src")
    built = _run([sys.executable, src / "libs" / "build_wheel.py", "--out", tmp_path / "dist"],
                 cwd=tmp_path, env=env, timeout=1200)
    wheel = Path(built.stdout.strip().splitlines()[-1])
    assert wheel.parent == tmp_path / "dist" and wheel.is_file(), built.stdout
    # auditwheel's own verdict on the tag it gave (kept in wheel.txt for the docs)
    tag = re.search(r"-py3-none-(manylinux_\d+_\d+_x86_64)\.whl$", wheel.name)
    assert tag, wheel.name
    show = (tmp_path / "dist" / "wheel.txt").read_text()
    assert f'consistent with the following platform tag: "{tag.group(1)}"' in show, show
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {"configs/__init__.py", "configs/config.ini", "configs/demo.ini",
               "configs/zoo/torchvision/maskrcnn_resnet50_fpn.ini",
               "configs/zoo/detectron2/mask_rcnn_R_50_FPN_3x.ini",
               "libs/csrc/mrcnn_kernels.h", "libs/build/libmrcnn_cpu.so", "maskrcnn.py",
               "builder.py", "generalized_rcnn.py", "layers/conv.py", "convert/torchvision.py"}
    assert shipped <= names, sorted(shipped - names)
    assert all(f"configs/{p.relative_to(REPO / 'configs')}" in names
               for p in REPO.glob("configs/zoo/*/*.ini"))
    wheel_meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
    assert "Root-Is-Purelib: false" in zipfile.ZipFile(wheel).read(wheel_meta).decode()
    cuda = _check_wheel_libraries(wheel, tmp_path)
    t_wheel = time.perf_counter() - t0

    bare = _without_compilers(env, tmp_path)
    venv = tmp_path / "venv"
    python = _fresh_venv(venv, bare)
    _pip_install(python, [wheel], cwd=tmp_path, env=bare)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "config.ini").write_text(HOSTILE)
    info = _check_installed(python, venv.resolve(), work, bare, kernels=True)

    maskrcnn_cmd = venv / "bin" / "maskrcnn"
    version = _run([maskrcnn_cmd, "--version"], cwd=work, env=bare).stdout.strip()
    assert version == f"maskrcnn {info['version']}" and info["version"] == __version__
    doctor = json.loads(_run([maskrcnn_cmd, "doctor", "--json"], cwd=work, env=bare).stdout)
    cpu = doctor["kernels"]["cpu"]
    assert cpu["loaded"] and cpu["problem"] is None, cpu
    assert Path(cpu["path"]).resolve().is_relative_to(venv.resolve()), cpu["path"]
    assert doctor["cpu"]["kernels_loaded"]
    if cuda:   # our fatbin reader agrees with cuobjdump on the installed library
        archs = doctor["kernels"]["cuda"]["archs"]
        assert {f"sm_{a}" for a in archs["sass"]} == cuda["sass"], archs
        assert {f"sm_{a}" for a in archs["ptx"]} == cuda["ptx"], archs

    _tiny_checkpoint(work / "tiny.pth")
    _image(work / "img.png")
    predict = [maskrcnn_cmd, "predict", "--weights", "tiny.pth", "img.png", "--out", "preds",
               "--no-progress", "--device", "cpu"]
    # the loader's fallback warning becomes an error: predict runs on the native kernels
    native_only = dict(bare, PYTHONWARNINGS="error:maskrcnn:RuntimeWarning")
    _run(predict, cwd=work, env=native_only)
    assert (work / "preds" / "img.png").is_file()
    assert isinstance(json.loads((work / "preds" / "results.json").read_text()), list)
    # ... and that check bites: without the installed library the same command fails
    installed = Path(cpu["path"])
    installed.rename(installed.with_suffix(".moved"))
    missing = subprocess.run([str(c) for c in predict], cwd=work, capture_output=True,
                             text=True, env=native_only)
    assert missing.returncode != 0 and "pure-PyTorch fallback" in missing.stderr, missing.stderr
    print(f"\n{wheel.name}: build {t_wheel:.1f} s, install + checks "
          f"{time.perf_counter() - t0 - t_wheel:.1f} s")


@pytest.mark.slow
def test_sdist_builds_from_source_and_editable_install(tmp_path):
    """The sdist holds sources only (no compiled kernels) and `pip install` of it compiles
    the CPU kernels; `pip install -e` of a checkout uses its libs/build."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV", "MASKRCNN_FORCE_FALLBACK")}
    env.update(MASKRCNN_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="2",
               MASKRCNN_CUDA_ARCHS="none")     # the CUDA build is the wheel test's
    src = _copy_sources(tmp_path / "src")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", tmp_path / "sdist",
          src], cwd=tmp_path, env=env)
    (sdist,) = (tmp_path / "sdist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = [m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name]
    assert "libs/csrc/mrcnn_kernels.h" in members and "libs/build_libs.py" in members
    assert not [m for m in members if m.endswith(".so")], members

    work = tmp_path / "elsewhere"
    work.mkdir()
    venv = tmp_path / "venv"
    python = _fresh_venv(venv, env)
    _pip_install(python, [sdist], cwd=tmp_path, env=env)
    _check_installed(python, venv.resolve(), work, env, kernels=True)

    venv_e = tmp_path / "venv_e"
    python_e = _fresh_venv(venv_e, env)
    _pip_install(python_e, ["-e", src], cwd=tmp_path, env=env)
    _check_installed(python_e, src.resolve(), work, env, kernels=True)
