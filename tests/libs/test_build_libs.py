"""Tests for libs/build_libs.py: arch validation, the no-nvcc path, stamps, a real CUDA build."""
import ctypes
import importlib.util
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "libs", "build_libs.py")


def _load():
    spec = importlib.util.spec_from_file_location("mrcnn_build_libs_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bl = _load()
REAL_NVCC = bl.find_nvcc()

CUDA13_CODES = ["sm_75", "sm_80", "sm_86", "sm_87", "sm_88", "sm_89", "sm_90", "sm_100",
                "sm_110", "sm_103", "sm_120", "sm_121"]
CUDA124_CODES = ["sm_50", "sm_52", "sm_53", "sm_60", "sm_61", "sm_62", "sm_70", "sm_72",
                 "sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90"]


def fake_nvcc(tmp_path, release, codes, name="nvcc"):
    """A shell script that answers --version and --list-gpu-code like nvcc."""
    d = tmp_path / f"fake_cuda_{release.replace('.', '_')}" / "bin"
    d.mkdir(parents=True)
    p = d / name
    p.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --version) echo "Cuda compilation tools, release {release}, V{release}.1";;\n'
        f'  --list-gpu-code) printf "%s\\n" {" ".join(codes)};;\n'
        f'  --list-gpu-arch) printf "%s\\n" {" ".join(c.replace("sm_", "compute_") for c in codes)};;\n'
        '  *) echo "fake nvcc: cannot compile" >&2; exit 2;;\n'
        "esac\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return str(p)


def env_without_nvcc():
    """os.environ minus CUDA_HOME/CUDA_PATH, with PATH entries holding nvcc removed."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    parts = [p for p in env.get("PATH", "").split(os.pathsep)
             if p and not os.path.exists(os.path.join(p, "nvcc"))]
    env["PATH"] = os.pathsep.join(parts)
    assert bl.find_nvcc(env) is None
    return env


# ------------------------------------------------------------------ arch parsing / messages

def test_parse_arch():
    assert bl.parse_arch("sm_80") == "sm_80"
    assert bl.parse_arch("80") == "sm_80"
    assert bl.parse_arch("8.6") == "sm_86"
    assert bl.parse_arch("compute_120") == "sm_120"
    with pytest.raises(bl.BuildError):
        bl.parse_arch("ampere")


def test_gencode_sass_for_all_ptx_for_newest():
    flags = bl.gencode_flags(["sm_90", "sm_80"])
    assert flags == ["-gencode", "arch=compute_80,code=sm_80",
                     "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]


def test_supported_archs_from_fake_nvcc(tmp_path):
    nvcc = fake_nvcc(tmp_path, "13.0", CUDA13_CODES)
    assert bl.nvcc_version(nvcc) == "13.0"
    sup = bl.supported_archs(nvcc)
    assert sup[0] == "sm_75" and sup[-1] == "sm_121" and "sm_62" not in sup
    assert bl.resolve_archs(["all"], nvcc) == sup


def test_sm62_on_cuda13_fake_nvcc(tmp_path):
    nvcc = fake_nvcc(tmp_path, "13.0", CUDA13_CODES)
    with pytest.raises(bl.BuildError) as ei:
        bl.resolve_archs(["sm_62"], nvcc)
    msg = str(ei.value)
    assert msg.startswith(f"sm_62 is not supported by nvcc 13.0 ({nvcc})")
    assert "CUDA 13 dropped it (CUDA 13 builds sm_75 and newer)" in msg
    assert "This nvcc supports: sm_75, sm_80, sm_86" in msg
    assert "Use CUDA 12 or older to target sm_62." in msg


def test_messages_on_cuda12_fake_nvcc(tmp_path):
    nvcc = fake_nvcc(tmp_path, "12.4", CUDA124_CODES)
    assert bl.resolve_archs(["sm_62", "sm_90"], nvcc) == ["sm_62", "sm_90"]
    with pytest.raises(bl.BuildError, match=r"sm_120 .*Use CUDA 12\.8 or newer"):
        bl.resolve_archs(["sm_120"], nvcc)
    with pytest.raises(bl.BuildError, match=r"CUDA 12 dropped it .*Use CUDA 11 or older"):
        bl.resolve_archs(["sm_35"], nvcc)
    with pytest.raises(bl.BuildError, match="not a CUDA GPU architecture"):
        bl.resolve_archs(["sm_64"], nvcc)


def test_main_refuses_unsupported_arch_before_building(tmp_path, capsys):
    nvcc = fake_nvcc(tmp_path, "13.0", CUDA13_CODES)
    env = env_without_nvcc()
    env["CUDA_HOME"] = os.path.dirname(os.path.dirname(nvcc))
    out = tmp_path / "out"
    assert bl.main(["sm_62", "--out", str(out)], env=env) == 1
    err = capsys.readouterr().err
    assert "CUDA 13 dropped it" in err and "CUDA 12 or older" in err
    assert not (out / bl.CPU_LIB).exists()


def test_auto_without_gpu_is_an_error(tmp_path):
    nvcc = fake_nvcc(tmp_path, "13.0", CUDA13_CODES)
    env = env_without_nvcc()
    env["PATH"] = ""  # no nvidia-smi either
    with pytest.raises(bl.BuildError, match="no CUDA GPU visible"):
        bl.resolve_archs(["auto"], nvcc, env)


@pytest.mark.skipif(REAL_NVCC is None, reason="nvcc not installed")
def test_sm62_with_real_nvcc():
    sup = bl.supported_archs(REAL_NVCC)
    assert sup, "nvcc --list-gpu-code returned nothing"
    ver = bl.nvcc_version(REAL_NVCC)
    if "sm_62" in sup:
        pytest.skip(f"nvcc {ver} still supports sm_62")
    with pytest.raises(bl.BuildError) as ei:
        bl.resolve_archs(["sm_62"], REAL_NVCC)
    msg = str(ei.value)
    major = ver.split(".")[0]
    assert f"sm_62 is not supported by nvcc {ver} ({REAL_NVCC})" in msg
    assert f"CUDA {major} dropped it" in msg
    assert "This nvcc supports: " + ", ".join(sup) in msg
    assert f"Use CUDA {int(major) - 1} or older to target sm_62" in msg


# ------------------------------------------------------------------ builds

def test_no_nvcc_builds_cpu_only(tmp_path, capsys):
    env = env_without_nvcc()
    out = tmp_path / "build"
    assert bl.main(["--out", str(out)], env=env) == 0
    text = capsys.readouterr().out
    assert bl.NO_NVCC in text
    assert (out / bl.CPU_LIB).exists() and not (out / bl.CUDA_LIB).exists()
    lib = ctypes.CDLL(str(out / bl.CPU_LIB))
    assert lib.mrc_abi_version() >= 1
    # asking for a CUDA arch without nvcc is an error that says so
    assert bl.main(["sm_80", "--out", str(out)], env=env) == 1
    err = capsys.readouterr().err
    assert "nvcc not found" in err and "sm_80" in err


def test_stamp_up_to_date_and_rebuilds(tmp_path, capsys, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(bl.CSRC, csrc)
    monkeypatch.setattr(bl, "CSRC", str(csrc))
    # two of the sources: the stamp logic is the same, each build takes a third of the time
    monkeypatch.setattr(bl, "CPU_SOURCES", ["common.cpp", "nms_cpu.cpp"])
    out = str(tmp_path / "build")
    lib = os.path.join(out, bl.CPU_LIB)

    bl.build_cpu(out)
    assert "built" in capsys.readouterr().out
    m0 = os.stat(lib).st_mtime_ns

    bl.build_cpu(out)
    assert "up to date" in capsys.readouterr().out
    assert os.stat(lib).st_mtime_ns == m0

    # a changed flag rebuilds
    monkeypatch.setattr(bl, "CPU_FLAGS", bl.CPU_FLAGS + ["-DMRC_TEST_FLAG=1"])
    bl.build_cpu(out)
    assert "built" in capsys.readouterr().out
    bl.build_cpu(out)
    assert "up to date" in capsys.readouterr().out

    # a changed source rebuilds (content, not mtime, is what counts)
    src = csrc / "nms_cpu.cpp"
    src.write_text(src.read_text() + "\n// touched by test\n")
    bl.build_cpu(out)
    assert "built" in capsys.readouterr().out
    # no temporary files left behind
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_compile_error_is_reported(tmp_path, capsys, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(bl.CSRC, csrc)
    monkeypatch.setattr(bl, "CSRC", str(csrc))
    monkeypatch.setattr(bl, "CPU_SOURCES", ["common.cpp", "nms_cpu.cpp"])
    (csrc / "nms_cpu.cpp").write_text("this is not C++;\n")
    env = env_without_nvcc()
    assert bl.main(["--out", str(tmp_path / "b"), "--cpu-only"], env=env) == 1
    err = capsys.readouterr().err
    assert "compiling libmrcnn_cpu.so failed" in err and "nms_cpu.cpp" in err


@pytest.mark.skipif(REAL_NVCC is None, reason="nvcc not installed")
def test_cuda_library_builds_for_sm80(tmp_path):
    """Compiles the real CUDA library for one arch, so CI catches CUDA build breaks."""
    if "sm_80" not in bl.supported_archs(REAL_NVCC):
        pytest.skip("this nvcc cannot build sm_80")
    out = tmp_path / "build"
    res = subprocess.run([sys.executable, SCRIPT, "sm_80",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    so = out / bl.CUDA_LIB
    assert so.exists() and "built" in res.stdout
    # loads without a GPU (cudart is static) and the ABI is there
    lib = ctypes.CDLL(str(so))
    assert lib.mrc_cuda_abi_version() >= 1
    lib.mrc_cuda_last_error.restype = ctypes.c_char_p
    f = lib.mrc_roi_align_forward_cuda
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + \
        [ctypes.c_int64] * 7 + [ctypes.c_double, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                ctypes.c_void_p]
    assert f(9, None, None, None, 1, 1, 4, 4, 1, 2, 2, 1.0, 0, 0, 0, None) != 0
    assert b"dtype" in lib.mrc_cuda_last_error()
    # K = 0: nothing to do, no launch, success
    assert f(0, None, None, None, 1, 1, 4, 4, 0, 2, 2, 1.0, 0, 0, 0, None) == 0
    # second run: up to date
    res = subprocess.run([sys.executable, SCRIPT, "sm_80",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.count("up to date") == 2, res.stdout
