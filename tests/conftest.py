"""Test setup: without a GPU the Triton kernels run in the Triton interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined, so this happens
before the package is imported by the test modules. On a CUDA machine the kernels are compiled
and the ``gpu``-marked tests (SD-sized shapes) run too.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
