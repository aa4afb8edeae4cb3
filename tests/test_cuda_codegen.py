"""The kernels, as the package's launchers launch them, compile for NVIDIA GPUs (sm_80, sm_86,
sm_89, sm_90) without register spills and with vectorised input loads. No GPU is needed.

``benchmarks/analysis/codegen_report.py --cases ci`` runs in a subprocess without
``TRITON_INTERPRET`` (the interpreter runs kernels as Python and accepts code the compiler
rejects): every case of its reduced list (``Case.ci``) calls the public ``max_fuse`` /
``max_fuse_many`` on CPU tensors under a fake Triton CUDA driver
(``benchmarks/analysis/offline_cuda.py``), so the launcher's tiles and grids, Triton's binder
(16-byte alignment, divisibility by 16, ``== 1``) and its compiler work exactly as for a GPU
launch, and each launch is recorded instead of run; ``ptxas -v`` and the PTX give registers, spills
and the width of every global load. The kernels are not named here: whatever the launchers launch
is checked.
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
BENCH = ROOT / "benchmarks" / "analysis"  # the GPU-free analysis tools
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


@pytest.mark.parametrize("case, arch", GRID, ids=IDS)
def test_pointer_offsets_are_64_bit(report, case, arch):
    """Every pointer offset of every launched kernel is int64 or a compile-time constant
    (read from the TTIR), so tensors of 2^31 elements and more are addressed correctly."""
    narrow = [f"launch {r['launch']} {r['kernel']}: {line}"
              for r in _rows(report, case, arch) for line in r["narrow_offsets"]]
    assert not narrow, "; ".join(narrow[:5])


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


V16 = [g for g in GRID if g[0].vector16]


@pytest.mark.parametrize("case, arch", V16, ids=[i for g, i in zip(GRID, IDS) if g in V16])
def test_backward_feature_accesses_are_16_byte_vectors(report, case, arch):
    """Aligned 16-bit inputs whose sites (NCHW) or channels (tokens) are contiguous: every
    global load and store of the feature dtype by the backward's launches (the call's last two,
    after the forward's three: inputs, output gradients, input gradients) is a 16-byte vector.
    The generic (strided) layout has no unit-stride axis and misaligned tensors no 16-byte
    boundaries: neither can be vectorised, and neither is listed here."""
    assert case.api.endswith("_backward"), case
    rows = _rows(report, case, arch)
    assert len(rows) == 5, f"expected the forward's 3 launches and the backward's 2: {rows}"
    backward = rows[3:]
    assert all(r["ld_input"] for r in backward), "a backward launch reads no feature"
    assert backward[1]["st_input"], "no input-gradient store"
    narrow = [f"launch {r['launch']} {r['kernel']}: loads {_widths(r['ld_input'])}, "
              f"stores {_widths(r['st_input'])}"
              for r in backward
              if (set(map(int, r["ld_input"])) | set(map(int, r["st_input"]))) - {16}]
    assert not narrow, ("feature accesses other than 16-byte vectors (bytes x instructions): "
                        + "; ".join(narrow))


def _widths(hist: dict) -> str:
    return " ".join(f"{b}Bx{n}" for b, n in hist.items()) or "-"


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
# the 64-bit offset check finds the 32-bit offsets of this kernel (offs * stride is i32)
assert oc.narrow_offsets(first.compiled.asm["ttir"]), "narrow_offsets missed an i32 offset"
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


DIRECT = r'''
import sys
sys.path.insert(0, sys.argv[1])
import torch
import offline_cuda as oc
from offline_cuda import TensorArg
import maxfusion_kernels as mk
from maxfusion_kernels.ops import launch

shapes = [(2, 320, 16, 16), (2, 640, 8, 8), (1, 1280, 4, 4)]
groups = [[torch.randn(s, dtype=torch.float16) for _ in range(2)] for s in shapes]
mask = torch.rand(2, 1, 16, 16)
checked = 0
with oc.offline_cuda(90) as rec:
    launch.DIRECT_DEVICE_TYPES.add("cpu")
    for kw in ({}, {"unmerge": True, "return_info": True, "weights": [1.0, 0.5]},
               {"masks": [[mask, None], None, None], "preset": "reference"}):
        rec.clear()
        mk.max_fuse_many(groups, backend="triton", **kw)  # first call: Triton's binder
        bound = list(rec.launches)
        rec.clear()
        mk.max_fuse_many(groups, backend="triton", **kw)  # second: Triton's, checked
        checked_launches = list(rec.launches)
        assert all(isinstance(a, TensorArg) for l in checked_launches
                   for n, a in l.args.items() if n in ("part1", "tickets"))
        rec.clear()
        mk.max_fuse_many(groups, backend="triton", **kw)  # a later call: direct launches
        direct = list(rec.launches)
        assert len(bound) == len(direct) == 3, (len(bound), len(direct))
        base_a = min(bound[0].args[n].data_ptr for n in ("part1", "tickets"))
        base_b = min(direct[0].args[n] for n in ("part1", "tickets"))
        assert all(isinstance(direct[0].args[n], int) for n in ("part1", "tickets")), \
            "the second call did not take the direct path"
        for a, b in zip(bound, direct):
            assert (a.kernel, a.grid, a.variant) == (b.kernel, b.grid, b.variant)
            assert a.args.keys() == b.args.keys()
            for name, va_all in a.args.items():
                vb_all = b.args[name]
                pairs = (list(zip(va_all, vb_all)) if isinstance(va_all, tuple)
                         else [(va_all, vb_all)])
                assert not isinstance(va_all, tuple) or len(va_all) == len(vb_all), name
                for va, vb in pairs:
                    same = name in ("xs", "meta") or (name == "ms" and "masks" in kw)
                    if isinstance(va, TensorArg) and isinstance(vb, int):
                        # a workspace part: the same byte of the workspace, 16-byte aligned
                        assert vb - base_b == va.data_ptr - base_a, name
                        assert vb % 16 == 0, name
                    elif same and isinstance(va, TensorArg):
                        assert va.data_ptr == vb.data_ptr, name  # the very same tensor
                    elif isinstance(va, TensorArg):  # fresh outputs and info
                        assert (va.dtype, va.shape, va.stride) == (vb.dtype, vb.shape, vb.stride)
                    else:
                        assert va == vb, (name, va, vb)  # scalars and constexprs
                checked += 1
states = {k.direct_state for cp in launch._CALLS.values() for ks in cp.kernels.values()
          for k in ks if k.direct_state != "unchecked"}
assert states == {"trusted"}, states
print("ok", checked)
'''


def test_direct_launches_pass_what_tritons_binder_passes(tmp_path):
    """After the first two calls of a plan (the second checks that Triton passes the launcher
    what the direct path would) the launcher skips Triton's binder on CUDA and calls the
    compiled kernel's launcher itself. Under the fake driver (with CPU tensors admitted to that
    path) the launches of a later call must be those of the first: same kernels, grids and
    compiled variants, every argument in the same place with the same value (the same input
    tensors, scalars and constexprs; the same offsets into the workspace, 16-byte aligned)."""
    script = tmp_path / "direct.py"
    script.write_text(DIRECT)
    res = subprocess.run([sys.executable, str(script), str(BENCH)], capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.strip().startswith("ok") and int(res.stdout.split()[-1]) > 50


FALLBACK = r'''
import sys
import threading
sys.path.insert(0, sys.argv[1])
import torch
import offline_cuda as oc
from triton.compiler.compiler import CompiledKernel
from triton.runtime.jit import JITFunction
import maxfusion_kernels as mk
from maxfusion_kernels.ops import launch

mode = sys.argv[2]
inside = threading.local()
orig_run, orig_prop = JITFunction.run, CompiledKernel.run
EXTRA = "an argument this Triton adds"

def run(self, *args, **kwargs):  # Triton's own launch, marked
    inside.on = True
    try:
        return orig_run(self, *args, **kwargs)
    finally:
        inside.on = False

def launcher(ck):  # what JITFunction.run calls: in this "Triton" it takes one more argument
    real = orig_prop.fget(ck)
    if not getattr(inside, "on", False):
        return real
    if mode == "extra":
        return lambda *a: real(*a[:9], EXTRA, *a[9:])
    if mode == "reordered":  # the kernel's arguments in another order
        return lambda *a: real(*a[:9], *reversed(a[9:]))
    raise SystemExit(mode)

JITFunction.run = run
CompiledKernel.run = property(launcher)
groups = [[torch.randn(s, dtype=torch.float16) for _ in range(2)]
          for s in [(2, 320, 16, 16), (2, 640, 8, 8)]]
with oc.offline_cuda(90) as rec:
    launch.DIRECT_DEVICE_TYPES.add("cpu")
    calls = 5
    for _ in range(calls):
        mk.max_fuse_many(groups, backend="triton", unmerge=True)
    plans = list(launch._CALLS.values())
    states = {k.direct_state for cp in plans for ks in cp.kernels.values() for k in ks
              if k.direct_state != "unchecked"}
    assert len(rec.launches) == 3 * calls, len(rec.launches)
    for l in rec.launches:
        names = list(l.args)
        values = list(l.args.values())
        if mode == "extra":  # every launch got Triton's arguments: the extra one first
            assert values[0] == EXTRA, (l.kernel, names[0], values[0])
        else:  # Triton's order: the last slot holds the first parameter (tensors, not a block)
            assert isinstance(values[-1], (tuple, oc.TensorArg)), (l.kernel, names[-1],
                                                                   values[-1])
    assert states and all(s.startswith("off: ") for s in states), states
    print("ok", sorted(states))
'''


@pytest.mark.parametrize("mode", ["extra", "reordered"])
def test_direct_path_falls_back_where_triton_launches_differently(tmp_path, mode):
    """A Triton whose ``JITFunction.run`` passes the compiled kernel's launcher something the
    direct path would not (one more argument; the kernel's arguments in another order, as a
    binder that binds differently would): the check at the second call sees it, the direct
    path is never used, and every launch of five calls gets exactly what Triton passed."""
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK)
    res = subprocess.run([sys.executable, str(script), str(BENCH), mode], capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.startswith("ok"), res.stdout
    assert "launcher argument" in res.stdout or "launcher arguments" in res.stdout


GRIDS = r'''
import sys
sys.path.insert(0, sys.argv[1])
import torch
import offline_cuda as oc
import maxfusion_kernels as mk

big_batch = [torch.empty(70000, 64, dtype=torch.float16) for _ in range(2)]  # [B, C]
tokens = [torch.empty(3, 5000, 48, dtype=torch.float16) for _ in range(2)]
with oc.offline_cuda(90) as rec:
    mk.max_fuse(big_batch, backend="triton", return_info=True)
    mk.max_fuse_many([big_batch, tokens], channel_dim=-1, backend="triton", unmerge=True)
grids = [l.grid for l in rec.launches]
assert len(grids) == 6, grids
for x, y, z in grids:
    assert (y, z) == (1, 1) and 1 <= x <= 2**31 - 1, (x, y, z)
assert max(x for x, _, _ in grids) >= 70000
print("ok", grids)
'''


def test_grids_stay_within_cuda_limits(tmp_path):
    """Every launch's grid is 1-D (grid dimensions y and z are capped at 65,535 by CUDA), also
    for a batch of 70,000 ``[B, C]`` rows, recorded under the fake driver."""
    script = tmp_path / "grids.py"
    script.write_text(GRIDS)
    res = subprocess.run([sys.executable, str(script), str(BENCH)], capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.startswith("ok")
