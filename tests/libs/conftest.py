"""Fixtures for the kernel tests (tests/libs and tests/pooling): which backend (native
library or pure-PyTorch fallback) and which device.

A missing native CPU library is a failure, not a skip (``make test`` builds it first; run
``python libs/build_libs.py``). CUDA parameters exist only when a GPU is visible; there a
missing CUDA library fails too when nvcc is installed (``make libs`` builds it) and skips
only when nothing here could have built it.
"""
import shutil

import pytest
import torch

from libs import _loader, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def require_native(device_type: str) -> None:
    """Fails (CPU, or CUDA with nvcc present) or skips (CUDA without nvcc) when the
    compiled library of ``device_type`` is not built."""
    path = _loader.BUILD_DIR / _loader._FILES[device_type]
    if path.exists():
        return
    why = f"{path} is not built (run `{_loader._BUILD_CMD[device_type]}`)"
    if device_type == "cuda" and shutil.which("nvcc") is None:
        pytest.skip(why + "; nvcc is not installed")
    pytest.fail(why)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["native", "fallback"])
def kernel_backend(request, monkeypatch, device):
    """Selects the implementation for the test's device: "native" or "fallback"."""
    if request.param == "native":
        monkeypatch.delenv("MASKRCNN_FORCE_FALLBACK", raising=False)
        require_native(device.type)
    else:
        monkeypatch.setenv("MASKRCNN_FORCE_FALLBACK", "1")
    return request.param


@pytest.fixture
def one_thread():
    """torch (and so our kernels) on one thread: gradcheck makes thousands of tiny calls,
    and on a busy machine waking a thread pool for each costs more than the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def roi_align_path():
    """libs.ops.force_roi_align_path for the test (native CPU library required), back to
    the automatic choice with the AVX2 copies on afterwards, whatever the test did."""
    require_native("cpu")
    yield ops.force_roi_align_path
    ops.force_roi_align_path(None)
