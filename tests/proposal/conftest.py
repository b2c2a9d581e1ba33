import pytest
import torchvision

import libs


@pytest.fixture(autouse=True)
def _nms_available(monkeypatch):
    # Until libs exports batched_nms, run the RPN on torchvision's (the behaviour libs
    # promises to match); once libs has it, the tests exercise libs' own.
    if not hasattr(libs, "batched_nms"):
        monkeypatch.setattr(libs, "batched_nms", torchvision.ops.batched_nms, raising=False)
