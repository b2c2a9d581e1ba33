"""The kernel fixtures (device, kernel_backend) are defined once, in tests/libs/conftest.py."""
from tests.libs.conftest import device, kernel_backend, one_thread, require_native  # noqa: F401
