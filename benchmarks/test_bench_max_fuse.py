"""pytest-benchmark view of the benchmarks: ``pytest benchmarks/ --benchmark-only``.

Not part of the test suite (``testpaths = ["tests"]``): run it by naming ``benchmarks/``. The
methods are those of ``harness.py``. On CUDA: the real shapes of ``shapes.json``, float16, the
Triton kernels; ``torch.cuda.synchronize()`` ends every timed call, so pytest-benchmark's host
clock times the device work. Without CUDA: the shapes shrunk to at most 2**16 elements per
input (``harness.shrink``), float32, the torch path of ``max_fuse`` (the Triton interpreter's
speed means nothing), ``torch.compile`` for two cases only (its compile time dominates), and
at most 0.25 s of rounds per benchmark.

Each benchmark records in ``extra_info`` the minimum bytes of the fusion and the effective
GB/s at the median. No speed target is asserted here (targets are for ``run.py`` on a GPU).
"""

from __future__ import annotations

import harness as H
import pytest
import torch
from shapes import load_shapes, make_features

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.float16 if HAS_CUDA else torch.float32
MAX_ELEMENTS = 0 if HAS_CUDA else 2**16
N = 2
TABLE = load_shapes()["cases"]
if not HAS_CUDA:
    H.compile_in_process()
STEP_CASES = [name for name, case in TABLE.items() if len(case["shapes"]) > 1]
CPU_COMPILED_CASES = ("sd15_controlnet_512", "sd3_tokens_1024")
# torch.compile's own use of torch.jit warns on every compile; not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]
if not HAS_CUDA:  # CPU smoke sizes: a quarter second per benchmark is plenty
    pytestmark.append(pytest.mark.benchmark(max_time=0.25, min_rounds=3))


def _shapes(case: str) -> list[tuple[int, ...]]:
    c = TABLE[case]
    return H.shrink(c["shapes"], c["channel_dim"], MAX_ELEMENTS)


def _largest(case: str) -> tuple[int, ...]:
    return max(_shapes(case), key=H.numel)


def _run(benchmark, fn, min_bytes: int):
    def call():
        out = fn()
        H.sync(DEVICE)
        return out

    result = benchmark(call)
    benchmark.extra_info["bytes"] = min_bytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["gbps_at_median"] = min_bytes / (stats.stats.median * 1e9)
    return result


def _tensor_params():
    params = []
    for case in TABLE:
        for method in ("reference", "compiled_reference", "max_fuse", "sum", "copy"):
            marks = ()
            if method == "compiled_reference" and not HAS_CUDA and case not in CPU_COMPILED_CASES:
                marks = pytest.mark.skip(reason="CPU: torch.compile timed for two cases only")
            params.append(pytest.param(case, method, id=f"{case}-{method}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "method"), _tensor_params())
def test_one_residual(benchmark, case, method):
    """The largest residual of ``case``, one method."""
    shape = _largest(case)
    cd = TABLE[case]["channel_dim"]
    feats = make_features(shape, N, DTYPE, DEVICE, cd)
    backend = H.backend_for(DEVICE)
    min_bytes = H.fusion_bytes([shape], N, DTYPE)["bytes"]
    benchmark.group = f"{case} {'x'.join(map(str, shape))} N={N} {str(DTYPE)[6:]}"
    if method == "copy":
        src, dst = H.copy_buffers(min_bytes, DTYPE, DEVICE)
        fns = {"copy": lambda: dst.copy_(src)}
    else:
        fns = {
            "reference": lambda: H.reference_fuse(feats, cd),
            "max_fuse": lambda: H.max_fuse(feats, cd, backend),
            "sum": lambda: H.diffusers_sum(feats),
        }
        if method == "compiled_reference":
            comp = H.compiled_reference()
            fns[method] = lambda: comp(feats, cd)
    out = _run(benchmark, fns[method], min_bytes)
    assert out.shape == (src.shape if method == "copy" else feats[0].shape)


@pytest.mark.parametrize("method", ["max_fuse_many", "max_fuse", "sum"])
@pytest.mark.parametrize("case", STEP_CASES)
def test_whole_step(benchmark, case, method):
    """Every residual of one step of ``case``: one ``max_fuse_many`` call, or a loop."""
    shapes = _shapes(case)
    cd = TABLE[case]["channel_dim"]
    groups = [make_features(s, N, DTYPE, DEVICE, cd, seed=i) for i, s in enumerate(shapes)]
    backend = H.backend_for(DEVICE)
    benchmark.group = f"{case} step ({len(shapes)} residuals) N={N} {str(DTYPE)[6:]}"
    fns = {
        "max_fuse_many": lambda: H.max_fuse_many(groups, cd, backend),
        "max_fuse": lambda: [H.max_fuse(g, cd, backend) for g in groups],
        "sum": lambda: [H.diffusers_sum(g) for g in groups],
    }
    outs = _run(benchmark, fns[method], H.fusion_bytes(shapes, N, DTYPE)["bytes"])
    assert [o.shape for o in outs] == [g[0].shape for g in groups]
