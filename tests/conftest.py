"""Settings for the whole suite."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_per_xdist_worker():
    """`make test` runs pytest -n 2 (pytest-xdist): two worker processes on the 2 cores.
    Each gets one torch thread, so that the two do not oversubscribe the cores (OpenMP
    threads spin while their partner is descheduled). A test that needs more threads sets
    them itself."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
