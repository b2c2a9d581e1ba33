#!/usr/bin/env python3
"""Build the native kernels: libs/build/libmrcnn_cpu.so (g++) and libmrcnn_cuda.so (nvcc).

    python libs/build_libs.py [ARCH ...] [--out DIR] [--cpu-only] [--force] [--verbose]

ARCH is sm_XX (e.g. sm_80), ``auto`` (the visible GPU's architecture), ``all`` (every
architecture the installed nvcc supports) or ``wheel`` (every architecture from sm_75 up
that nvcc supports, when nvcc exists: what a wheel ships; no GPU needed). With no ARCH the
CUDA library is built for the visible GPU when nvcc exists and a GPU is visible, and
skipped otherwise. SASS is built for each architecture, plus PTX of the newest.

A library is rebuilt only when its sources, headers, compiler (path and version) or flags
changed: a hash of them is kept in <out>/<lib>.stamp. Outputs are written atomically
(temporary file, then os.replace). Importable as ``libs.build_libs`` (see main(argv)).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
DEFAULT_OUT = os.path.join(HERE, "build")

CPU_LIB = "libmrcnn_cpu.so"
CUDA_LIB = "libmrcnn_cuda.so"
CPU_SOURCES = ["common.cpp", "cpu_scratch.cpp", "roi_align_cpu.cpp", "roi_align_cpu_blocked.cpp",
               "roi_align_cpu_unblocked.cpp", "nms_cpu.cpp", "winograd_cpu.cpp",
               "grouped_conv_cpu.cpp"]
CUDA_SOURCES = ["common.cpp", "roi_align_cuda.cu", "nms_cuda.cu"]

# Bump to force a rebuild when this script's logic changes in a way flags do not show.
BUILD_SCRIPT_VERSION = "1"

CPU_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-fopenmp", "-ffp-contract=off",
             "-shared"]
# --fmad=false: the GPU then rounds exactly like the CPU library (no FMA contraction).
CUDA_FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-cudart=static", "-shared",
              "-Xcompiler", "-fPIC",
              "-Xcompiler", "-ffp-contract=off"]

# The oldest architecture a wheel ships (Turing): what current CUDA toolkits still build.
WHEEL_MIN_ARCH = 75

# Architectures that exist (for telling "dropped" from "not an architecture").
KNOWN_ARCHS = {20, 21, 30, 32, 35, 37, 50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 88,
               89, 90, 100, 101, 103, 110, 120, 121}
# First CUDA release that can build an architecture (for "too new" messages).
FIRST_CUDA = {80: "11.0", 86: "11.1", 87: "11.4", 89: "11.8", 90: "11.8", 100: "12.8",
              101: "12.8", 120: "12.8", 103: "12.9", 121: "12.9", 110: "13.0", 88: "13.0"}


class BuildError(Exception):
    """A build problem with a message meant for the user."""


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- toolchain

def find_nvcc(env=None) -> str | None:
    """nvcc from CUDA_HOME/bin, then PATH (None when absent)."""
    env = os.environ if env is None else env
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        cand = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("nvcc", path=env.get("PATH", os.defpath))


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def nvcc_version(nvcc: str) -> str:
    """'13.0' from `nvcc --version` ('unknown' when it cannot be parsed)."""
    try:
        out = _run([nvcc, "--version"]).stdout
    except OSError:
        return "unknown"
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else "unknown"


def _arch_num(arch: str) -> int:
    return int(re.match(r"(?:sm|compute)_(\d+)", arch).group(1))


def supported_archs(nvcc: str) -> list[str]:
    """The sm_XX targets this nvcc can build, sorted (asks nvcc --list-gpu-code, falling
    back to --list-gpu-arch)."""
    found: set[str] = set()
    for flag, prefix in (("--list-gpu-code", "sm_"), ("--list-gpu-arch", "compute_")):
        try:
            res = _run([nvcc, flag])
        except OSError:
            continue
        if res.returncode != 0:
            continue
        for tok in res.stdout.split():
            m = re.fullmatch(prefix + r"(\d+)", tok.strip())
            if m:
                found.add(f"sm_{m.group(1)}")
        if found:
            break
    return sorted(found, key=_arch_num)


def parse_arch(token: str) -> str:
    """'sm_80', '80', '8.0', 'compute_80' -> 'sm_80'. Raises BuildError otherwise."""
    t = token.strip().lower()
    m = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3})", t)
    if m:
        return f"sm_{m.group(1)}"
    m = re.fullmatch(r"(\d{1,2})\.(\d)", t)
    if m:
        return f"sm_{m.group(1)}{m.group(2)}"
    raise BuildError(f"invalid architecture {token!r}: expected sm_XX (e.g. sm_80), "
                     f"'auto' or 'all'")


def unsupported_message(arch: str, nvcc: str, version: str, supported: list[str]) -> str:
    """Why `arch` cannot be built with this nvcc, and what to do instead."""
    num = _arch_num(arch)
    major = version.split(".")[0] if version != "unknown" else "?"
    head = f"{arch} is not supported by nvcc {version} ({nvcc}): "
    sup = ", ".join(supported) if supported else "(none reported)"
    if num not in KNOWN_ARCHS:
        return (head + f"{arch} is not a CUDA GPU architecture. This nvcc supports: {sup}.")
    if supported and num < _arch_num(supported[0]):
        older = f"CUDA {int(major) - 1} or older" if major.isdigit() else "an older CUDA"
        return (head + f"CUDA {major} dropped it (CUDA {major} builds {supported[0]} and "
                f"newer). This nvcc supports: {sup}. Use {older} to target {arch}.")
    need = FIRST_CUDA.get(num)
    newer = f"CUDA {need} or newer" if need else "a newer CUDA toolkit"
    return (head + f"this nvcc does not know {arch}. This nvcc supports: {sup}. "
            f"Use {newer} to target {arch}.")


def visible_gpu_archs(env=None) -> list[str]:
    """sm_XX of the visible GPUs via nvidia-smi (empty when none or no nvidia-smi)."""
    env = os.environ if env is None else env
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if not smi:
        return []
    try:
        res = _run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if res.returncode != 0:
        return []
    archs = []
    for line in res.stdout.splitlines():
        m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if m:
            a = f"sm_{m.group(1)}{m.group(2)}"
            if a not in archs:
                archs.append(a)
    return archs


def cxx_compiler(env=None) -> str:
    env = os.environ if env is None else env
    cxx = env.get("CXX") or "g++"
    path = shutil.which(cxx, path=env.get("PATH", os.defpath)) if not os.path.isabs(cxx) else cxx
    if not path:
        raise BuildError(f"C++ compiler {cxx!r} not found (set CXX or install g++)")
    return path


def compiler_id(path: str) -> str:
    try:
        out = _run([path, "--version"]).stdout
    except OSError as e:
        raise BuildError(f"cannot run {path}: {e}")
    return path + "\n" + out.strip()


# --------------------------------------------------------------------------- building

def _headers() -> list[str]:
    return sorted(f for f in os.listdir(CSRC) if f.endswith((".h", ".cuh")))


def _version_script(out_dir: str) -> str:
    path = os.path.join(out_dir, "exports.map")
    text = "{\n  global: mrc_*;\n  local: *;\n};\n"
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return path


def stamp_hash(sources: list[str], compiler: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(BUILD_SCRIPT_VERSION.encode())
    for name in list(sources) + _headers():
        h.update(name.encode() + b"\0")
        with open(os.path.join(CSRC, name), "rb") as f:
            h.update(f.read())
    h.update(compiler_id(compiler).encode())
    h.update("\0".join(flags).encode())
    return h.hexdigest()


def _up_to_date(lib_path: str, stamp_path: str, digest: str) -> bool:
    if not (os.path.exists(lib_path) and os.path.exists(stamp_path)):
        return False
    with open(stamp_path) as f:
        return f.read().strip() == digest


def _jobs() -> int:
    """Parallel compiler jobs: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # pragma: no cover (not Linux)
        return max(1, os.cpu_count() or 1)


def _check(res: subprocess.CompletedProcess, cmd: list[str], lib_name: str,
           verbose: bool) -> None:
    if res.returncode != 0:
        raise BuildError(f"compiling {lib_name} failed (exit {res.returncode}):\n"
                         f"{' '.join(cmd)}\n{res.stdout}")
    if verbose and res.stdout.strip():
        log(res.stdout.rstrip())


def _compile_objects(compiler: str, flags: list[str], sources: list[str], tmp_dir: str,
                     lib_name: str, verbose: bool) -> list[str]:
    """Compiles each source to an object file in tmp_dir, one compiler per core (the
    libraries are a handful of independent translation units)."""
    from concurrent.futures import ThreadPoolExecutor
    cmds = [[compiler] + flags + ["-c", os.path.join(CSRC, src), "-o",
                                  os.path.join(tmp_dir, f"{i}_{os.path.splitext(src)[0]}.o")]
            for i, src in enumerate(sources)]
    if verbose:
        for cmd in cmds:
            log("  " + " ".join(cmd))
    with ThreadPoolExecutor(min(_jobs(), len(cmds))) as pool:
        results = list(pool.map(lambda c: _run(c, cwd=CSRC), cmds))
    for res, cmd in zip(results, cmds):
        _check(res, cmd, lib_name, verbose)
    return [cmd[-1] for cmd in cmds]


def _build_if_stale(out_dir: str, lib_name: str, compiler: str, hashed_flags: list[str],
                    link_flags: list[str], sources: list[str], force: bool,
                    verbose: bool, per_source: bool = False) -> tuple[str, Optional[float]]:
    """Compiles `sources` into <out_dir>/<lib_name> unless its stamp says the sources,
    compiler and flags are unchanged; with `per_source`, each source in parallel first,
    then one link. The library and its stamp are replaced atomically. Returns (path,
    seconds spent, None when up to date)."""
    lib = os.path.join(out_dir, lib_name)
    stamp = lib + ".stamp"
    digest = stamp_hash(sources, compiler, hashed_flags)
    if not force and _up_to_date(lib, stamp, digest):
        return lib, None
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="." + lib_name + ".", dir=out_dir) as tmp_dir:
        inputs = (_compile_objects(compiler, hashed_flags, sources, tmp_dir, lib_name, verbose)
                  if per_source else [os.path.join(CSRC, s) for s in sources])
        tmp = os.path.join(tmp_dir, lib_name)
        cmd = [compiler] + hashed_flags + link_flags + inputs + ["-o", tmp]
        if verbose:
            log("  " + " ".join(cmd))
        _check(_run(cmd, cwd=CSRC), cmd, lib_name, verbose)
        os.chmod(tmp, 0o755)
        os.replace(tmp, lib)
    tmp_stamp = stamp + ".tmp"
    with open(tmp_stamp, "w") as f:
        f.write(digest + "\n")
    os.replace(tmp_stamp, stamp)
    return lib, time.time() - t0


def build_cpu(out_dir: str, force: bool = False, verbose: bool = False, env=None) -> str:
    """Builds <out_dir>/libmrcnn_cpu.so; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    cxx = cxx_compiler(env)
    link = [f"-Wl,--version-script={_version_script(out_dir)}"]
    lib, seconds = _build_if_stale(out_dir, CPU_LIB, cxx, CPU_FLAGS, link, CPU_SOURCES, force,
                                   verbose, per_source=True)
    log(f"{lib}: up to date" if seconds is None else
        f"built {lib} (CPU, {os.path.basename(cxx)}, {seconds:.1f} s)")
    return lib


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX for the newest (forward compatibility)."""
    archs = sorted(set(archs), key=_arch_num)
    flags = []
    for a in archs[:-1]:
        n = _arch_num(a)
        flags += ["-gencode", f"arch=compute_{n},code=sm_{n}"]
    n = _arch_num(archs[-1])
    flags += ["-gencode", f"arch=compute_{n},code=[sm_{n},compute_{n}]"]
    return flags


def build_cuda(archs: list[str], out_dir: str, nvcc: str, force: bool = False,
               verbose: bool = False) -> str:
    """Builds <out_dir>/libmrcnn_cuda.so for `archs` (already validated); returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    # (--threads: nvcc compiles the architectures in parallel; the output is the same)
    link = [f"-Xlinker=--version-script={_version_script(out_dir)}", "--threads", str(_jobs())]
    lib, seconds = _build_if_stale(out_dir, CUDA_LIB, nvcc, CUDA_FLAGS + gencode_flags(archs),
                                   link, CUDA_SOURCES, force, verbose)
    log(f"{lib}: up to date ({', '.join(archs)})" if seconds is None else
        f"built {lib} (CUDA {nvcc_version(nvcc)}: {', '.join(archs)}; PTX for "
        f"{sorted(archs, key=_arch_num)[-1]}; {seconds:.1f} s)")
    return lib


NO_NVCC = "nvcc not found (set CUDA_HOME or add it to PATH); CUDA kernels not built"


def resolve_archs(requested: list[str], nvcc: str, env=None) -> list[str]:
    """Validates the requested ARCH tokens against nvcc; returns sm_XX list."""
    supported = supported_archs(nvcc)
    version = nvcc_version(nvcc)
    out: list[str] = []
    for tok in requested:
        t = tok.strip().lower()
        if t in ("all", "wheel"):
            if not supported:
                raise BuildError(f"could not get the supported architectures from {nvcc} "
                                 f"(--list-gpu-code)")
            floor = WHEEL_MIN_ARCH if t == "wheel" else 0
            cand = [a for a in supported if _arch_num(a) >= floor]
            if not cand:
                raise BuildError(f"{nvcc} builds no architecture from sm_{floor} up "
                                 f"(it supports {', '.join(supported)})")
        elif t == "auto":
            cand = visible_gpu_archs(env)
            if not cand:
                raise BuildError("'auto': no CUDA GPU visible (nvidia-smi missing or found "
                                 "none); name an architecture instead, e.g. sm_80")
        else:
            cand = [parse_arch(t)]
        for a in cand:
            if supported and a not in supported:
                raise BuildError(unsupported_message(a, nvcc, version, supported))
            if a not in out:
                out.append(a)
    return out


def main(argv: list[str] | None = None, env=None) -> int:
    p = argparse.ArgumentParser(prog="build_libs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("archs", nargs="*", metavar="ARCH", help="sm_XX, auto, all or wheel")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default libs/build)")
    p.add_argument("--cpu-only", action="store_true", help="build only libmrcnn_cpu.so")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = p.parse_args(argv)
    env = os.environ if env is None else env
    out_dir = os.path.abspath(args.out)
    try:
        if args.cpu_only and args.archs:
            raise BuildError("--cpu-only conflicts with architectures "
                             + " ".join(args.archs))
        nvcc = None if args.cpu_only else find_nvcc(env)
        # Validate the CUDA request before spending time on the CPU build.
        archs: list[str] = []
        if not args.cpu_only:
            if args.archs == ["wheel"] and not nvcc:
                pass     # a wheel without nvcc carries the CPU library only
            elif args.archs:
                if not nvcc:
                    raise BuildError("nvcc not found (set CUDA_HOME or add it to PATH): "
                                     f"cannot build CUDA kernels for {' '.join(args.archs)}")
                archs = resolve_archs(args.archs, nvcc, env)
            elif nvcc:
                gpus = visible_gpu_archs(env)
                if gpus:
                    archs = resolve_archs(gpus, nvcc, env)
        build_cpu(out_dir, args.force, args.verbose, env)
        if args.cpu_only:
            return 0
        if not nvcc:
            log(NO_NVCC)
            return 0
        if not archs:
            log(f"no CUDA GPU visible (nvidia-smi); CUDA kernels not built "
                f"(pass sm_XX or 'all' to build them with {nvcc})")
            return 0
        build_cuda(archs, out_dir, nvcc, args.force, args.verbose)
        return 0
    except BuildError as e:
        print(f"build_libs: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
