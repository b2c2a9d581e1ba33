"""`maskrcnn doctor`: every section is printed, the kernel libraries are reported as the
loader sees them, and the exit status is non-zero exactly when a visible device has no
kernel (GPUs faked by patching the function that lists them). No network."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import doctor
from engine.cli import main
from libs import _loader
from libs.fatbin import FatbinError, fatbin_archs

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ["versions", "kernels", "GPUs", "CPU features", "threads", "extras", "zoo",
            "status:"]
CPU_LIB = _loader.BUILD_DIR / "libmrcnn_cpu.so"
FAKE_H100 = {"device": "cuda:0", "name": "Fake H100", "capability": [9, 0]}


@pytest.fixture
def fresh_loader():
    """The loader forgets what it opened before and after the test (tests move its
    build folder)."""
    _loader.reset_for_tests()
    yield
    _loader.reset_for_tests()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty torch hub cache: the zoo section must not depend on this machine's."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def run_doctor(capsys, *args) -> tuple[int, str]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out


def fake_cuda(monkeypatch, archs: dict, gpus=(FAKE_H100,)) -> None:
    """GPUs `gpus` visible and a loaded CUDA library holding `archs`."""
    real = doctor.kernel_library

    def kernel_library(device_type, open_it):
        if device_type == "cpu":
            return real(device_type, open_it)
        return {"path": "/fake/libmrcnn_cuda.so", "present": True, "loaded": True, "abi": 6,
                "expected_abi": 6, "problem": None, "build_command": "b"}
    monkeypatch.setattr(doctor, "visible_gpus", lambda: [dict(g) for g in gpus])
    monkeypatch.setattr(doctor, "kernel_library", kernel_library)
    monkeypatch.setattr(doctor, "cuda_archs", lambda path: archs)


# ------------------------------------------------------------------------ the command

def test_the_command_prints_every_section(empty_cache):
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_HOME=str(empty_cache.parents[1]))
    res = subprocess.run([sys.executable, "-m", "engine.cli", "doctor"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = res.stdout.splitlines()
    for title in SECTIONS:
        assert any(line.startswith(title) for line in lines), (title, res.stdout)
    for key in ["maskrcnn", "python", "torch", "torchvision", "cpu", "cuda", "onnxruntime",
                "openvino", "tensorboard", "detectron2", "intra-op"]:
        assert key in res.stdout, key
    assert res.returncode == (1 if "status: PROBLEMS" in res.stdout else 0), res.stdout


def test_json_report_is_the_collected_dict(capsys, empty_cache):
    code, out = run_doctor(capsys, "--json")
    report = json.loads(out)
    assert set(report) >= {"versions", "kernels", "gpus", "cpu", "threads", "extras", "zoo",
                           "problems"}
    assert code == (1 if report["problems"] else 0)
    assert report["zoo"]["dir"] == str(empty_cache)
    assert not any(f["cached"] for f in report["zoo"]["files"])


# ------------------------------------------------------------------------ the CPU library

@pytest.mark.skipif(not CPU_LIB.exists(), reason="libs/build/libmrcnn_cpu.so not built")
def test_cpu_kernel_reported_native_when_built(capsys, fresh_loader, empty_cache):
    code, out = run_doctor(capsys)
    cpu = doctor.collect()["kernels"]["cpu"]
    assert cpu["loaded"] and cpu["abi"] == _loader.ABI_VERSION and cpu["problem"] is None
    assert f"native: {CPU_LIB} (ABI {_loader.ABI_VERSION})" in out
    assert "cpu: no kernel" not in out


def test_hidden_cpu_library_reports_the_fallback_and_why(capsys, fresh_loader, empty_cache,
                                                         tmp_path, monkeypatch):
    monkeypatch.setattr(_loader, "BUILD_DIR", tmp_path / "nothing")
    code, out = run_doctor(capsys)
    assert code != 0
    cpu_line = next(line for line in out.splitlines() if line.strip().startswith("cpu "))
    assert "not loaded" in cpu_line and "libmrcnn_cpu.so is not built" in cpu_line
    assert "pure-PyTorch fallback is in use" in cpu_line
    assert "cpu: no kernel" in out and "python libs/build_libs.py" in out


def test_forced_fallback_is_named(capsys, fresh_loader, empty_cache, monkeypatch):
    monkeypatch.setenv("MASKRCNN_FORCE_FALLBACK", "1")
    code, out = run_doctor(capsys)
    assert code != 0
    assert "cpu: no kernel (MASKRCNN_FORCE_FALLBACK=1)" in out
    assert "unset MASKRCNN_FORCE_FALLBACK" in out


# ------------------------------------------------------------------------ GPUs (faked)

def test_gpu_without_a_kernel_exits_non_zero_naming_device_and_arch(capsys, empty_cache,
                                                                   monkeypatch):
    fake_cuda(monkeypatch, {"sass": [75], "ptx": []})
    code, out = run_doctor(capsys)
    assert code != 0
    problem = next(line for line in out.splitlines() if line.startswith("  - cuda:0"))
    assert "Fake H100" in problem and "no kernel for sm_90" in problem
    assert "SASS sm_75; PTX none" in problem
    assert "cuda:0" in out and "NO KERNEL" in out


@pytest.mark.parametrize("archs, kernel", [
    ({"sass": [75, 90], "ptx": []}, "SASS sm_90"),
    ({"sass": [75], "ptx": [75]}, "PTX compute_75 (JIT on first use)"),
])
def test_gpu_with_a_kernel_exits_zero(capsys, empty_cache, monkeypatch, archs, kernel):
    if not CPU_LIB.exists():
        pytest.skip("libs/build/libmrcnn_cpu.so not built (the CPU would fail the check)")
    fake_cuda(monkeypatch, archs)
    code, out = run_doctor(capsys)
    assert code == 0, out
    assert f"cuda:0  Fake H100, compute capability 9.0 (sm_90): {kernel}" in out


def test_gpu_without_the_cuda_library_is_on_the_fallback(capsys, fresh_loader, empty_cache,
                                                         tmp_path, monkeypatch):
    monkeypatch.setattr(_loader, "BUILD_DIR", tmp_path / "empty")
    monkeypatch.setattr(doctor, "visible_gpus", lambda: [dict(FAKE_H100)])
    code, out = run_doctor(capsys)
    assert code != 0
    assert "cuda:0 (Fake H100, sm_90): no kernel (" in out
    assert "libmrcnn_cuda.so is not built" in out and "build_libs.py auto" in out


@pytest.mark.parametrize("capability, archs, expected", [
    ([9, 0], {"sass": [90], "ptx": []}, "SASS sm_90"),
    ([8, 6], {"sass": [80], "ptx": []}, "SASS sm_80"),          # same major: compatible
    ([8, 9], {"sass": [80, 86], "ptx": []}, "SASS sm_86"),      # the newest that runs
    ([9, 0], {"sass": [80, 86], "ptx": [86]}, "PTX compute_86 (JIT on first use)"),
    ([9, 0], {"sass": [80, 86], "ptx": []}, None),               # older major, no PTX
    ([7, 0], {"sass": [75], "ptx": [75]}, None),                 # older than everything
    ([12, 0], {"sass": [90, 100], "ptx": [100]}, "PTX compute_100 (JIT on first use)"),
])
def test_match_arch(capability, archs, expected):
    assert doctor.match_arch(capability, archs) == expected


# ------------------------------------------------------------------------ zoo cache

def _cache_file(cache: Path, name: str, content: bytes) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / name
    path.write_bytes(content)
    return path


def test_zoo_cached_files_and_their_verification(capsys, empty_cache):
    from convert.zoo import ZOO
    d2 = ZOO["detectron2/mask_rcnn_R_50_FPN_3x"]
    tv = ZOO["torchvision/maskrcnn_resnet50_fpn"]
    d2_path = _cache_file(empty_cache, d2.filename, b"weights")
    d2_path.with_name(d2_path.name + ".sha256").write_text(
        f"{hashlib.sha256(b'weights').hexdigest()}  {d2_path.name}\n")
    _cache_file(empty_cache, tv.filename, b"not the published file")
    unrecorded = ZOO["detectron2/mask_rcnn_R_101_FPN_3x"]
    _cache_file(empty_cache, unrecorded.filename, b"x")
    files = {f["name"]: f for f in doctor.zoo(verify=True)["files"]}
    assert files[d2.name]["verified"] is True
    assert files[tv.name]["verified"] is False and "MISMATCH" in files[tv.name]["how"]
    assert files[unrecorded.name]["verified"] is False
    assert not files["detectron2/mask_rcnn_X_101_32x8d_FPN_3x"]["cached"]
    _, out = run_doctor(capsys)             # without --verify-zoo: nothing re-hashed
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert rows[d2.name].endswith(f"verified: sha256 in {d2_path.name}.sha256")
    assert rows[tv.name].endswith("cached: sha256 prefix in its name, checked on every load")
    assert "cached, NOT verified: no .sha256 record yet" in rows[unrecorded.name]


# ------------------------------------------------------------------------ fatbin reading

def test_fatbin_archs_rejects_files_without_device_code(tmp_path):
    text = tmp_path / "not_elf.so"
    text.write_bytes(b"hello")
    with pytest.raises(FatbinError, match="not a 64-bit"):
        fatbin_archs(text)
    if CPU_LIB.exists():
        with pytest.raises(FatbinError, match="no .nv_fatbin section"):
            fatbin_archs(CPU_LIB)


NVCC = shutil.which("nvcc")


def _nvcc(*args: str) -> None:
    res = subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed: no CUDA library to read")
def test_fatbin_archs_of_a_library_nvcc_built(tmp_path):
    """The oracle is the -gencode lists given to nvcc: two translation units built for
    different architectures (two fat binary containers, both must be read), linked with
    the static CUDA runtime as libs/build_libs.py links libmrcnn_cuda.so."""
    gencodes = {"a": ["arch=compute_75,code=sm_75"],
                "b": ["arch=compute_86,code=sm_86", "arch=compute_90,code=[sm_90,compute_90]"]}
    objects = []
    for name, codes in gencodes.items():
        src = tmp_path / f"{name}.cu"
        src.write_text(f'extern "C" __global__ void {name}(float* x) '
                       '{ x[threadIdx.x] *= 2.f; }\n')
        objects.append(str(tmp_path / f"{name}.o"))
        _nvcc("-c", "-Xcompiler", "-fPIC", *[f"-gencode={c}" for c in codes], str(src),
              "-o", objects[-1])
    lib = tmp_path / "libk.so"
    _nvcc("-shared", "-cudart=static", *objects, "-o", str(lib))
    assert fatbin_archs(lib) == {"sass": [75, 86, 90], "ptx": [90]}
    assert doctor.cuda_archs(str(lib)) == {"sass": [75, 86, 90], "ptx": [90]}


@pytest.fixture(scope="module")
def real_cuda_build(tmp_path_factory):
    """libmrcnn_cuda.so built by libs/build_libs.py for sm_80 (SASS sm_80 + PTX 80), next
    to a copy of the CPU library; no GPU is needed to build or dlopen it."""
    if NVCC is None or not CPU_LIB.exists():
        pytest.skip("needs nvcc and libs/build/libmrcnn_cpu.so")
    from libs.build_libs import build_cuda
    out = tmp_path_factory.mktemp("cuda_build")
    build_cuda(["sm_80"], str(out), NVCC)
    shutil.copy(CPU_LIB, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("capability, kernel", [
    ([7, 5], None), ([8, 6], "SASS sm_80"), ([9, 0], "PTX compute_80 (JIT on first use)")])
def test_real_cuda_library_against_faked_gpus(real_cuda_build, fresh_loader, empty_cache,
                                              monkeypatch, capsys, capability, kernel):
    monkeypatch.setattr(_loader, "BUILD_DIR", real_cuda_build)
    monkeypatch.setattr(doctor, "visible_gpus", lambda: [dict(FAKE_H100, capability=capability)])
    code, out = run_doctor(capsys)
    words = " ".join(out.split())     # the column widths do not matter here
    assert f"cuda native: {real_cuda_build / 'libmrcnn_cuda.so'} (ABI" in words
    assert "cuda archs SASS sm_80; PTX compute_80" in words
    if kernel is None:
        assert code == 1 and "cuda:0 (Fake H100, sm_75): no kernel for sm_75 in" in out
    else:
        assert code == 0 and out.splitlines()[-1].startswith("status: ok")
        assert f"(sm_{capability[0]}{capability[1]}): {kernel}" in out
