"""Test set-up: Triton kernels run on CPU tensors in Triton's interpreter (set before triton is
imported), so CI without a GPU tests them too."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import pydiff  # noqa: E402,F401


def pytest_report_header(config):
    return f"pydiff build: {pydiff.build_info()}; cpu backends: {pydiff.available_backends(torch.device('cpu'))}"


@pytest.fixture(autouse=True)
def _reset_backend():
    old = pydiff.get_backend()
    yield
    pydiff.set_backend(old)
