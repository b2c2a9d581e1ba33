"""mask-rcnn-pytorch: a Mask R-CNN research library with its own CPU and CUDA kernels.

`pip install -e .` installs the packages and builds the kernels with libs/build_libs.py
(CPU always; CUDA too when nvcc and a GPU are found). The kernels are plain shared
libraries loaded with cffi, so they never link against libtorch.
"""
import os
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["backbones", "proposal", "pooling", "heads", "tools", "libs"]


def _build_kernels():
    # A failed kernel build must not block the install: the ops fall back to
    # pure PyTorch and say which command builds the library.
    script = os.path.join(HERE, "libs", "build_libs.py")
    if not os.path.exists(script) or os.environ.get("MASKRCNN_SKIP_KERNEL_BUILD"):
        return
    result = subprocess.run([sys.executable, script], cwd=HERE)
    if result.returncode != 0:
        print("warning: kernel build failed; run `python libs/build_libs.py` to see why",
              file=sys.stderr)


class BuildPyWithKernels(build_py):
    def run(self):
        _build_kernels()
        super().run()


class DevelopWithKernels(develop):
    def run(self):
        _build_kernels()
        super().run()


setup(
    name="mask-rcnn-pytorch",
    version="0.1.0",
    description="Mask R-CNN in PyTorch with its own RoIAlign/NMS kernels (CPU + CUDA, cffi)",
    python_requires=">=3.9",
    py_modules=["maskrcnn"],
    packages=find_packages(include=[p + "*" for p in PACKAGES]),
    package_data={"libs": ["csrc/*", "build/*"], "": ["*.ini"]},
    install_requires=["torch", "torchvision", "cffi", "numpy", "pillow", "easydict",
                      "pycocotools", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["maskrcnn = tools.cli:main"]},
    cmdclass={"build_py": BuildPyWithKernels, "develop": DevelopWithKernels},
)
