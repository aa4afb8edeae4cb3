"""The kernels compile for a Hopper GPU (sm_90) through Triton's real compiler.

The interpreter runs kernels as Python and accepts code the compiler rejects; this runs
``tests/aot_compile.py`` in a subprocess without ``TRITON_INTERPRET``, which builds PTX and
cubin for sm_90 for a set of variants (N from 2 to 8, every dtype, both statistics, merge and
unmerge, one or two site runs, both tile orientations). No GPU is needed.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def test_kernels_compile_for_sm90():
    script = pathlib.Path(__file__).with_name("aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=900)
    print(res.stdout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ok ")]
    assert len(lines) >= 22 and "compiled" in res.stdout
