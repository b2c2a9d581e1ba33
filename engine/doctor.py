"""`maskrcnn doctor`: what this installation has, on one screen (or as JSON for a bug report).

    report = collect()             # a plain, JSON-serialisable dict
    print(format_report(report))
    exit_code(report)              # 1 when a visible device has no kernel, else 0

Sections: versions; the kernel libraries (path, ABI, loaded or why not); each visible GPU
against the architectures in the CUDA library (SASS, PTX-JIT or none); the CPU features
the kernels dispatch on; thread counts; optional extras; the zoo cache. Nothing here
downloads, builds or runs a model: it only asks the loader, the files and the packages.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

# Optional packages a feature needs: distribution names (the first one installed counts).
EXTRAS = {"onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
          "openvino": ("openvino",), "av": ("av",), "tensorboard": ("tensorboard",),
          "detectron2": ("detectron2",)}
# The environment variables that set thread counts, shown when set.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- versions

def _dist_version(*names: str) -> Optional[str]:
    """The installed version of the first distribution found (metadata only: importing
    torchvision or detectron2 just to read a version costs seconds)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _command_output(cmd: list[str]) -> Optional[str]:
    """stdout of a quick tool (nvidia-smi), None when absent or failing."""
    if not shutil.which(cmd[0]):
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def versions() -> dict:
    import torch
    import maskrcnn
    from libs.build_libs import find_nvcc, nvcc_version
    nvcc = find_nvcc()
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"])
    return {"maskrcnn": maskrcnn.__version__,
            "maskrcnn_path": str(Path(maskrcnn.__file__).resolve().parent),
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "torch": torch.__version__, "torchvision": _dist_version("torchvision"),
            "torch_cuda": torch.version.cuda,
            "nvcc": f"{nvcc_version(nvcc)} ({nvcc})" if nvcc else None,
            "driver": driver.splitlines()[0] if driver else None}


# --------------------------------------------------------------------------- devices

def visible_gpus() -> list[dict]:
    """[{"device": "cuda:0", "name": ..., "capability": [9, 0]}] of the GPUs torch sees."""
    import torch
    if not torch.cuda.is_available():
        return []
    return [{"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
             "capability": list(torch.cuda.get_device_capability(i))}
            for i in range(torch.cuda.device_count())]


def kernel_library(device_type: str, open_it: bool) -> dict:
    """The loader's status of one library after trying to open it (when `open_it`)."""
    from libs import _loader
    if open_it:
        # The report states the reason itself; the loader's one-time warning would repeat it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _loader.get_lib(device_type)
    status = _loader.library_status(device_type)
    if not open_it and status["problem"] is None and not status["loaded"]:
        # The loader opens the CUDA library only for CUDA tensors (it needs no GPU to
        # exist, but nothing would use it).
        status["problem"] = "no CUDA device visible"
    return status


def cuda_archs(path: str) -> dict:
    """{"sass": [...], "ptx": [...]} in the CUDA library, or {"error": why}."""
    from libs.fatbin import FatbinError, fatbin_archs
    try:
        return fatbin_archs(path)
    except (OSError, FatbinError) as err:
        return {"error": f"cannot read its architectures: {err}"}


def match_arch(capability: list[int], archs: dict) -> Optional[str]:
    """How a GPU of compute capability (major, minor) runs the library's kernels: machine
    code built for its own arch, or for an older minor of the same major (binary
    compatible), else the newest PTX not newer than it (JIT-compiled by the driver);
    None when neither exists."""
    major, minor = capability
    sm = 10 * major + minor
    sass = [a for a in archs.get("sass", []) if a // 10 == major and a <= sm]
    if sass:
        return f"SASS sm_{max(sass)}"
    ptx = [a for a in archs.get("ptx", []) if a <= sm]
    if ptx:
        return f"PTX compute_{max(ptx)} (JIT on first use)"
    return None


def gpu_rows(gpus: list[dict], cuda: dict) -> list[dict]:
    """Each GPU with the kernel it gets ("kernel": None when it has none)."""
    rows = []
    for gpu in gpus:
        kernel = None
        if cuda["loaded"] and "error" not in cuda.get("archs", {}):
            kernel = match_arch(gpu["capability"], cuda["archs"])
        elif cuda["loaded"]:
            kernel = "unknown (architectures not readable)"
        rows.append(dict(gpu, sm=_sm(gpu["capability"]), kernel=kernel))
    return rows


def _sm(capability: list[int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


# --------------------------------------------------------------------------- CPU, threads

def _cpu_flags() -> Optional[set]:
    """The x86 feature flags of /proc/cpuinfo (None where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_features(cpu_loaded: bool) -> dict:
    """The vector copies our CPU kernels pick at run time (libs/csrc: AVX2 for RoIAlign and
    the Winograd transforms, AVX2 + FMA for the grouped 3x3 conv, by
    __builtin_cpu_supports on x86), and torch's own CPU capability."""
    import torch
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    flags = _cpu_flags() if x86 else None
    avx2 = None if flags is None else "avx2" in flags
    fma = None if flags is None else "fma" in flags
    return {"x86": x86, "avx2": avx2, "fma": fma, "kernels_loaded": cpu_loaded,
            "roi_align_winograd": "AVX2" if avx2 else "scalar",
            "grouped_conv": "AVX2+FMA" if avx2 and fma else "scalar",
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def threads() -> dict:
    import torch
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
            "cpu_count": os.cpu_count(), "affinity": affinity}


def extras() -> dict:
    return {name: _dist_version(*dists) for name, dists in EXTRAS.items()}


# --------------------------------------------------------------------------- zoo cache

def _zoo_file(entry, path: Path, verify: bool) -> dict:
    """How a cached zoo file is known to be the published one (tools/download.py):
    torchvision names carry a sha256 prefix, checked on every load; detectron2 files get
    a `<file>.sha256` record once their content passed the check. `verified` is None when
    only a re-hash (--verify-zoo) would tell."""
    from tools.download import sha256_file
    sidecar = path.with_name(path.name + ".sha256")
    if entry.sha256:
        want, how = entry.sha256, "sha256 prefix in its name, checked on every load"
    elif sidecar.is_file():
        want, how = (sidecar.read_text().split() or [""])[0], f"sha256 in {sidecar.name}"
    else:
        return {"verified": False, "how": "no .sha256 record yet (checked on first load)"}
    if not verify:
        return {"verified": None if entry.sha256 else True, "how": how}
    ok = bool(want) and sha256_file(path).startswith(want)
    return {"verified": ok, "how": how + ("; re-hashed: matches" if ok else
                                          "; re-hashed: MISMATCH (delete it to re-download)")}


def zoo(verify: bool = False) -> dict:
    from convert.zoo import ZOO, cache_dir, cached_file
    files = []
    for entry in ZOO.values():
        path = cached_file(entry)
        row = {"name": entry.name, "file": path.name, "cached": path.is_file()}
        if row["cached"]:
            row.update(_zoo_file(entry, path, verify))
        files.append(row)
    return {"dir": str(cache_dir()), "exists": cache_dir().is_dir(), "files": files}


# --------------------------------------------------------------------------- report

def _fallback_problem(what: str, lib: dict) -> str:
    remedy = ("unset MASKRCNN_FORCE_FALLBACK" if lib.get("forced_fallback") else
              f"build it with `{lib['build_command']}`")
    return f"{what}: no kernel ({lib['problem']}): the pure-PyTorch fallback is in use; {remedy}"


def problems(report: dict) -> list[str]:
    """One line per visible device without a kernel (the exit status counts these)."""
    cpu, cuda = report["kernels"]["cpu"], report["kernels"]["cuda"]
    out = [] if cpu["loaded"] else [_fallback_problem("cpu", cpu)]
    for gpu in report["gpus"]:
        what = f"{gpu['device']} ({gpu['name']}, {gpu['sm']})"
        if not cuda["loaded"]:
            out.append(_fallback_problem(what, cuda))
        elif gpu["kernel"] is None:
            out.append(f"{what}: no kernel for {gpu['sm']} in {cuda['path']} "
                       f"({_arch_list(cuda['archs'])}); rebuild with "
                       f"`python libs/build_libs.py {gpu['sm']}` (or `auto`)")
    return out


def collect(verify_zoo: bool = False) -> dict:
    """Everything `maskrcnn doctor` shows, as a plain dict (the --json output)."""
    gpus = visible_gpus()
    kernels = {"cpu": kernel_library("cpu", True), "cuda": kernel_library("cuda", bool(gpus))}
    if kernels["cuda"]["present"]:
        kernels["cuda"]["archs"] = cuda_archs(kernels["cuda"]["path"])
    report = {"versions": versions(), "kernels": kernels,
              "gpus": gpu_rows(gpus, kernels["cuda"]),
              "cpu": cpu_features(kernels["cpu"]["loaded"]), "threads": threads(),
              "extras": extras(), "zoo": zoo(verify_zoo)}
    report["problems"] = problems(report)
    return report


def exit_code(report: dict) -> int:
    return 1 if report["problems"] else 0


# --------------------------------------------------------------------------- rendering

def _arch_list(archs: dict) -> str:
    if "error" in archs:
        return archs["error"]
    sass = ", ".join(f"sm_{a}" for a in archs["sass"]) or "none"
    ptx = ", ".join(f"compute_{a}" for a in archs["ptx"]) or "none"
    return f"SASS {sass}; PTX {ptx}"


def _library_line(lib: dict, fallback: bool) -> str:
    """`fallback`: a device would run this library's ops in pure PyTorch."""
    if lib["loaded"]:
        return f"native: {lib['path']} (ABI {lib['abi']})"
    state = "present" if lib["present"] else "not built"
    if lib["present"] and lib["abi"] is not None:
        state += f", ABI {lib['abi']} (this package expects {lib['expected_abi']})"
    line = f"not loaded ({lib['problem']}); file {lib['path']}: {state}"
    return line + ("; the pure-PyTorch fallback is in use" if fallback else "")


def _version_rows(v: dict) -> list[tuple[str, str]]:
    cuda = f"CUDA {v['torch_cuda']}" if v["torch_cuda"] else "CPU-only build"
    return [("maskrcnn", f"{v['maskrcnn']} ({v['maskrcnn_path']})"),
            ("python", f"{v['python']} ({v['platform']})"),
            ("torch", f"{v['torch']} ({cuda})"),
            ("torchvision", v["torchvision"] or "not installed"),
            ("nvcc", v["nvcc"] or "not found"),
            ("NVIDIA driver", v["driver"] or "none (nvidia-smi not found or failed)")]


def _kernel_rows(report: dict) -> list[tuple[str, str]]:
    cpu, cuda = report["kernels"]["cpu"], report["kernels"]["cuda"]
    rows = [("cpu", _library_line(cpu, True)),
            ("cuda", _library_line(cuda, bool(report["gpus"])))]
    if "archs" in cuda:
        rows.append(("cuda archs", _arch_list(cuda["archs"])))
    return rows


def _gpu_rows(report: dict) -> list[tuple[str, str]]:
    if not report["gpus"]:
        return [("(none)", "no CUDA device visible to torch")]
    return [(g["device"], f"{g['name']}, compute capability "
             f"{g['capability'][0]}.{g['capability'][1]} ({g['sm']}): "
             + (g["kernel"] or "NO KERNEL")) for g in report["gpus"]]


def _cpu_rows(c: dict) -> list[tuple[str, str]]:
    if not c["x86"]:
        used = "portable copies (no x86 dispatch on this machine)"
    elif c["avx2"] is None:
        used = "unknown (no /proc/cpuinfo)"
    else:
        used = (f"AVX2 {'yes' if c['avx2'] else 'no'}, FMA {'yes' if c['fma'] else 'no'}: "
                f"RoIAlign / Winograd {c['roi_align_winograd']}, grouped conv3x3 "
                f"{c['grouped_conv']}")
    if not c["kernels_loaded"]:
        used += " (unused: the CPU library is not loaded)"
    return [("our kernels", used), ("torch", c["torch_capability"])]


def _thread_rows(t: dict) -> list[tuple[str, str]]:
    env = ", ".join(f"{k}={v}" for k, v in t["env"].items()) or "none set"
    return [("torch", f"intra-op {t['torch_intra_op']} (our CPU kernels use this many), "
                      f"inter-op {t['torch_inter_op']}"),
            ("environment", env),
            ("CPUs", f"{t['cpu_count']} (this process may use {t['affinity']})")]


def _zoo_rows(z: dict) -> list[tuple[str, str]]:
    rows = [("cache", z["dir"] + ("" if z["exists"] else " (does not exist yet)"))]
    for f in z["files"]:
        state = "not cached"
        if f["cached"]:
            word = {True: "verified", False: "cached, NOT verified", None: "cached"}
            state = f"{word[f['verified']]}: {f['how']}"
        rows.append((f["name"], state))
    return rows


def format_report(report: dict) -> str:
    """The report as aligned text, one section per heading, problems last."""
    extras_rows = [(k, v or "not installed") for k, v in report["extras"].items()]
    sections = [("versions", _version_rows(report["versions"])),
                ("kernels", _kernel_rows(report)), ("GPUs", _gpu_rows(report)),
                ("CPU features", _cpu_rows(report["cpu"])),
                ("threads", _thread_rows(report["threads"])), ("extras", extras_rows),
                ("zoo", _zoo_rows(report["zoo"]))]
    lines = []
    for title, rows in sections:
        width = max(len(k) for k, _ in rows)
        lines.append(title)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append("status: " + ("ok: every visible device has a native kernel"
                               if not report["problems"] else "PROBLEMS"))
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)


def main(json_output: bool = False, verify_zoo: bool = False) -> int:
    """Print the report (text or JSON); returns the exit status."""
    import json
    report = collect(verify_zoo)
    print(json.dumps(report, indent=2) if json_output else format_report(report))
    sys.stdout.flush()
    return exit_code(report)
