"""Importing the packages is cheap and side-effect free.

Runs in a fresh interpreter: in this process other tests may already have imported things.
"""

from __future__ import annotations

import json
import subprocess
import sys

import maxfusion_kernels

_PROBE = """
import json, sys
import torch
import maxfusion_kernels, maxfusion_hooks
op = getattr(torch.ops.maxfusion, "max_fuse", None)
print(json.dumps({
    "cuda_initialized": torch.cuda.is_initialized(),
    "diffusers": sorted(m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")),
    "has_op": op is not None,
    "unresolved": [n for n in maxfusion_kernels.__all__ if not hasattr(maxfusion_kernels, n)],
    "hooks_unresolved": [n for n in maxfusion_hooks.__all__ if not hasattr(maxfusion_hooks, n)],
}))
"""


def _probe() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_has_no_side_effects():
    res = _probe()
    # importing must not create a CUDA context (it would pin memory on the default GPU and
    # break fork-based workers)
    assert res["cuda_initialized"] is False
    # diffusers is an optional dependency: neither package may import it at import time
    assert res["diffusers"] == []
    # importing registers the custom op
    assert res["has_op"] is True
    assert res["unresolved"] == [] and res["hooks_unresolved"] == []


def test_all_names_resolve():
    assert maxfusion_kernels.__all__, "maxfusion_kernels.__all__ is empty"
    for name in maxfusion_kernels.__all__:
        assert getattr(maxfusion_kernels, name) is not None, name
    assert callable(maxfusion_kernels.max_fuse)
