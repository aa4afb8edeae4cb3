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


@pytest.fixture(autouse=True, scope="session")
def _interpreter_probed():
    """The interpreter's probe (``maxfusion_kernels/ops/interpret.py``) runs one tiny kernel
    once per process, at the first Triton call on CPU tensors. Run it here, before any test, so
    that it is never the first launch inside a test that records every launch it sees
    (tests/test_program_order.py: it failed on the probe's one-program grid when run alone)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        try:
            from maxfusion_kernels.ops.interpret import interpreter_problem
        except ImportError:  # no triton: nothing is interpreted
            return
        interpreter_problem()
