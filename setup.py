"""mask-rcnn-pytorch: the build steps (the metadata is in pyproject.toml).

A wheel and an editable install both build the kernels with libs/build_libs.py. The
kernels are plain shared libraries loaded with cffi, so they never link against libtorch,
and one wheel serves every torch version.
- A wheel (`make wheel`, `pip wheel .`, `pip install .`): the CPU library always, and the
  CUDA library whenever nvcc exists (no GPU needed): SASS for every architecture from
  sm_75 up that nvcc supports, plus PTX of the newest. They are built in build/kernels/
  and copied into the wheel's libs/build/. MASKRCNN_CUDA_ARCHS (e.g. "sm_80 sm_90",
  "auto") narrows the CUDA build; "none" leaves it out.
- `pip install -e .` (make libs): libs/build/, CUDA only for the visible GPU.

What ships, besides the modules and packages:
- libs/build/*.so (the kernels, when their build succeeded) and libs/csrc/* (the loader
  parses the header at import); a failed build leaves the pure-PyTorch fallback.
- the config files as package data of the `configs` package, found with
  importlib.resources: configs/demo.ini, configs/zoo/*/*.ini and config.ini, which stays
  at the repository root and is copied into the wheel's configs/ by build_py (an
  editable install reads it from the root: see configs/__init__.py).
A wheel holding a .so is tagged py3-none-<platform>: any Python 3 (cffi's ABI mode, no
CPython extension) on this platform only; without one it stays py3-none-any.
"""
import glob
import importlib.util
import os
import subprocess
import sys

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

try:
    from setuptools.command.bdist_wheel import bdist_wheel   # setuptools >= 70.1
except ImportError:   # pragma: no cover (older setuptools: the wheel package's)
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["backbones", "proposal", "pooling", "heads", "layers", "convert", "tools", "libs",
            "configs", "deploy",
            "engine"]
KERNELS = "build/*.so"   # libs/build/, relative to the libs package
WHEEL_KERNELS = os.path.join(HERE, "build", "kernels")   # a wheel's, kept apart from libs/build


def _build_kernels(args=()):
    # A failed kernel build must not block the install: the ops fall back to
    # pure PyTorch and say which command builds the library.
    script = os.path.join(HERE, "libs", "build_libs.py")
    if not os.path.exists(script) or os.environ.get("MASKRCNN_SKIP_KERNEL_BUILD"):
        return
    result = subprocess.run([sys.executable, script, *args], cwd=HERE)
    if result.returncode != 0:
        print("warning: kernel build failed; run `python libs/build_libs.py` to see why",
              file=sys.stderr)


def _wheel_kernel_args():
    archs = os.environ.get("MASKRCNN_CUDA_ARCHS", "wheel").split()
    if archs == ["none"] or (archs == ["wheel"] and not _find_nvcc()):
        # build/kernels/ may hold a CUDA library of an earlier build: not this wheel's
        for stale in glob.glob(os.path.join(WHEEL_KERNELS, "libmrcnn_cuda.so*")):
            os.remove(stale)
    return ["--out", WHEEL_KERNELS, *(["--cpu-only"] if archs == ["none"] else archs)]


def _find_nvcc():
    spec = importlib.util.spec_from_file_location(
        "_build_libs", os.path.join(HERE, "libs", "build_libs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_nvcc()


class BuildPyWithKernels(build_py):
    def run(self):
        editable = getattr(self, "editable_mode", False)
        if not editable:
            _build_kernels(_wheel_kernel_args())
        super().run()
        if not editable:
            for src, dst in self._copied():
                self.mkpath(os.path.dirname(dst))
                self.copy_file(src, dst)

    def _copied(self):
        """(source, build_lib destination) of what build_py adds to the packages: config.ini
        and the wheel's kernels (not libs/build/: that is the editable install's)."""
        pairs = [(os.path.join(HERE, "config.ini"),
                  os.path.join(self.build_lib, "configs", "config.ini"))]
        for lib in sorted(glob.glob(os.path.join(WHEEL_KERNELS, "*.so"))):
            pairs.append((lib, os.path.join(self.build_lib, "libs", "build",
                                            os.path.basename(lib))))
        return pairs

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs += [dst for _, dst in self._copied()]
        return outputs


class DevelopWithKernels(develop):
    def run(self):
        _build_kernels()
        super().run()


class KernelDistribution(Distribution):
    """Counts as having extension modules once the build has produced the kernels: the
    wheel then installs into platlib and is not tagged pure."""
    bundles_kernels = False

    def has_ext_modules(self):
        return self.bundles_kernels or super().has_ext_modules()


class BdistWheelPlatform(bdist_wheel):
    """A platform tag when the wheel carries the compiled kernels."""

    def run(self):
        if not self.skip_build:
            self.run_command("build")          # builds the kernels; runs once
        build_lib = self.get_finalized_command("build_py").build_lib
        self.distribution.bundles_kernels = bool(
            glob.glob(os.path.join(build_lib, "libs", KERNELS)))
        self.root_is_pure = not self.distribution.has_ext_modules()
        super().run()

    def get_tag(self):
        impl, abi, plat = super().get_tag()
        if not self.root_is_pure:
            impl, abi = "py3", "none"          # plain C ABI via cffi: no CPython ABI
        return impl, abi, plat


setup(
    py_modules=["maskrcnn", "builder", "generalized_rcnn"],
    packages=find_packages(include=[q for p in PACKAGES for q in (p, p + ".*")]),
    package_data={"libs": ["csrc/*"], "configs": ["*.ini", "zoo/*/*.ini"]},
    include_package_data=False,
    distclass=KernelDistribution,
    cmdclass={"build_py": BuildPyWithKernels, "develop": DevelopWithKernels,
              "bdist_wheel": BdistWheelPlatform},
)
