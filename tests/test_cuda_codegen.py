"""The kernels, as the package's launchers launch them, compile for NVIDIA GPUs (sm_80, sm_86,
sm_89, sm_90) without register spills and with vectorised input loads. No GPU is needed.

``benchmarks/codegen_report.py --cases ci`` runs in a subprocess without ``TRITON_INTERPRET``
(the interpreter runs kernels as Python and accepts code the compiler rejects): every case of
its reduced list (``Case.ci``) calls the public ``max_fuse`` / ``max_fuse_many`` on CPU tensors
under a fake Triton CUDA driver (``benchmarks/offline_cuda.py``), so the launcher's tiles and
grids, Triton's binder (16-byte alignment, divisibility by 16, ``== 1``) and its compiler work
exactly as for a GPU launch, and each launch is recorded instead of run; ``ptxas -v`` and the
PTX give registers, spills and the width of every global load. The kernels are not named here:
whatever the launchers launch is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import codegen_report  # noqa: E402  (the case list only: no kernel is imported here)

ARCHS = (80, 86, 89, 90)  # A100, A10/RTX 30, L4/L40S/RTX 40, H100/H200
CI_CASES = [c for c in codegen_report.CASES if c.ci]
GRID = [(c, a) for c in CI_CASES for a in ARCHS]
IDS = [f"{c.name}-sm{a}" for c, a in GRID]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    stem = tmp_path_factory.mktemp("codegen") / "codegen"
    cmd = [sys.executable, str(BENCH / "codegen_report.py"), "--cases", "ci",
           "--archs", ",".join(map(str, ARCHS)), "--out", str(stem), "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    path = Path(f"{stem}.json")
    assert path.exists(), f"{' '.join(cmd)} wrote no report:\n{res.stderr[-4000:]}"
    return json.loads(path.read_text(encoding="utf-8"))


def _rows(report, case, arch) -> list[dict]:
    return [r for r in report["rows"] if r["case"] == case.name and r["arch"] == arch]


@pytest.mark.parametrize("case, arch", GRID, ids=IDS)
def test_every_variant_compiles(report, case, arch):
    errors = [e["error"] for e in report["errors"] if e["case"] == case.name and e["arch"] == arch]
    assert not errors, errors[0]
    rows = _rows(report, case, arch)
    assert rows, "nothing was launched"
    for r in rows:
        assert r["registers"] > 0 and r["num_warps"] > 0 and min(r["grid"]) >= 1, r


@pytest.mark.parametrize("case, arch", [g for g in GRID if g[0].dtype != "float64"],
                         ids=[i for g, i in zip(GRID, IDS) if g[0].dtype != "float64"])
def test_no_register_spills(report, case, arch):
    spilled = [f"launch {r['launch']} {r['kernel']}: {r['registers']} registers, "
               f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
               for r in _rows(report, case, arch) if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "; ".join(spilled)


VEC = [g for g in GRID if g[0].vector_loads]


@pytest.mark.parametrize("case, arch", VEC, ids=[i for g, i in zip(GRID, IDS) if g in VEC])
def test_input_loads_are_vectorised(report, case, arch):
    """Aligned fp16 inputs whose sites (NCHW) or channels (tokens) are contiguous: every global
    load of an input moves at least 8 bytes per instruction (4 halves; 16 is the ideal)."""
    rows = _rows(report, case, arch)
    readers = [r for r in rows if r["ld_input"]]
    assert readers, "no launch reads the inputs (no load through an input-dtype pointer)"
    narrow = [f"launch {r['launch']} {r['kernel']}: "
              + " ".join(f"{b}Bx{n}" for b, n in r["ld_input"].items())
              for r in readers if min(int(b) for b in r["ld_input"]) < 8]
    assert not narrow, "input loads narrower than 8 bytes (bytes x instructions): " + "; ".join(
        narrow)


SMOKE = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import torch, triton, triton.language as tl
import offline_cuda as oc

@triton.jit
def copy_kernel(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs * stride, mask=offs < n), mask=offs < n)

x = torch.empty(1000, dtype=torch.float16)
y = torch.empty_like(x)
with oc.offline_cuda(86) as rec:
    triton.runtime.driver.active.set_current_device(3)
    copy_kernel[(8,)](x, y, 1000, 1, BLOCK=128)
    copy_kernel[(2, 3)](x[1:], y, 999, 16, BLOCK=64)
    import maxfusion_kernels as mk
    a = torch.empty(2, 8, 4, 4)
    out = mk.max_fuse([a, torch.empty_like(a)], backend="triton")
    assert out.shape == a.shape
first, second, *package = rec.launches
assert (first.kernel, first.grid, first.device, first.arch) == ("copy_kernel", (8, 1, 1), 3, 86)
assert first.specialization == {"x_ptr": "16", "y_ptr": "16", "stride": "==1"}, first.specialization
assert first.constexprs == {"stride": 1, "BLOCK": 128}, first.constexprs
assert first.args["n"] == 1000 and first.args["x_ptr"].shape == (1000,)
assert ".target sm_86" in first.ptx and first.compiled.asm["cubin"][:4] == b"\x7fELF"
assert second.grid == (2, 3, 1) and second.specialization == {"y_ptr": "16", "stride": "16"}
assert not second.args["x_ptr"].aligned16
assert package and all(l.device == 3 and l.arch == 86 for l in package)
assert all(l.grid[0] * l.grid[1] * l.grid[2] >= 1 for l in package)
assert "TRITON_INTERPRET" not in os.environ and not triton.knobs.runtime.interpret
# torch.cuda's device calls can drive the fake device (for a device guard's test)
with oc.offline_cuda(80, torch_cuda_device=True) as rec:
    with torch.cuda.device(2):
        copy_kernel[(1,)](x, y, 1000, 1, BLOCK=128)
    copy_kernel[(1,)](x, y, 1000, 1, BLOCK=128)
assert [l.device for l in rec.launches] == [2, 0]
print("ok", len(package))
'''


def test_fake_driver_records_device_grid_and_specialisation(tmp_path):
    """The fake driver records the launch device (a device guard's test reads it), the grid,
    Triton's specialisation of the arguments, and a real sm_86 binary; it routes the package's
    public function to the compiled kernels and restores the environment afterwards."""
    script = tmp_path / "smoke.py"
    script.write_text(SMOKE, encoding="utf-8")
    res = subprocess.run([sys.executable, str(script), str(BENCH)], capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr[-4000:]
