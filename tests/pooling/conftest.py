"""Fixtures for the kernel tests: which backend (native library or pure-PyTorch fallback)
and which device. Native tests skip when the library is not built, except under CI
(env var CI set), where the CPU library must exist (CI builds it first) and they fail."""
import os

import pytest
import torch

from libs import _loader

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def require_native(device_type: str) -> None:
    path = _loader.BUILD_DIR / _loader._FILES[device_type]
    if path.exists():
        return
    why = f"{path} is not built (run `{_loader._BUILD_CMD[device_type]}`)"
    if device_type == "cpu" and os.environ.get("CI"):
        pytest.fail(f"CI: {why}")
    pytest.skip(why)


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
