"""Checks only a CUDA device can make (``gpu`` marker; skipped without one): the compiled
kernels on the project's real shapes, CUDA-graph capture (no host sync), bitwise determinism
and batch invariance on the device, and tensors of more than 2^31 elements (64-bit offsets)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from utils import check_fusion

import maxfusion_kernels as mk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import load_shapes, make_features  # noqa: E402

pytestmark = pytest.mark.gpu
TABLE = load_shapes()["cases"]
CASES = [(name, tuple(shape), case["channel_dim"])
         for name, case in TABLE.items() for shape in dict.fromkeys(map(tuple, case["shapes"]))]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_real_shapes_match_reference(case, n, dtype, preset):
    _, shape, cd = case
    feats = make_features(shape, n, dtype=dtype, device="cuda", channel_dim=cd, seed=n)
    excluded = check_fusion(feats, backend="triton", preset=preset, channel_dim=cd,
                            max_excluded=0.01)
    print(f"near-tie sites excluded: {excluded}")
    check_fusion(feats, backend="triton", preset=preset, channel_dim=cd, unmerge=True,
                 max_excluded=0.01)


def test_cuda_graph_capture_and_replay():
    shape = (2, 320, 64, 64)
    static = make_features(shape, 2, dtype=torch.float16, device="cuda", seed=0)
    mk.max_fuse(static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.max_fuse(static)
    fresh = make_features(shape, 2, dtype=torch.float16, device="cuda", seed=1)
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, mk.max_fuse(fresh))


def test_bitwise_determinism_and_batch_invariance():
    feats = make_features((4, 640, 32, 32), 3, dtype=torch.bfloat16, device="cuda", seed=2)
    first = mk.max_fuse(feats, unmerge=True)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, mk.max_fuse(feats, unmerge=True)))
    whole = mk.max_fuse(feats)
    alone = torch.cat([mk.max_fuse([f[b:b + 1] for f in feats]) for b in range(4)])
    assert torch.equal(whole, alone)


def test_more_than_2_31_elements():
    # 4 channels x 2^29 + 8 tokens: 2^31 + 32 elements per input, fp16 (4 GiB each)
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    shape = (1, 2**29 + 8, 4)
    f = torch.randn(shape, device="cuda", dtype=torch.float16)
    zero = torch.zeros_like(f)
    # a zero input never wins: the output is the other input exactly, also past 2^31
    out = mk.max_fuse([f, zero], channel_dim=-1)
    assert torch.equal(out, f)
    del out
    # fusing identical inputs is the identity, in every unmerge stream
    for g in mk.max_fuse([f, f], channel_dim=-1, unmerge=True):
        assert torch.equal(g, f)


@pytest.mark.parametrize("case", ["sd15_controlnet_512", "sdxl_controlnet_1024",
                                  "sd15_t2i_adapter_512"])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_max_fuse_many_real_step(case, unmerge):
    from utils import compare_with_reference

    shapes = TABLE[case]["shapes"]
    groups = [make_features(s, 2, dtype=torch.float16, device="cuda", seed=k)
              for k, s in enumerate(shapes)]
    results, infos = mk.max_fuse_many(groups, unmerge=unmerge, return_info=True)
    for grp, res, info in zip(groups, results, infos):
        compare_with_reference(grp, res, info, unmerge=unmerge, max_excluded=0.01)


def test_max_fuse_many_two_kernels_and_graph_capture():
    shapes = TABLE["sd15_controlnet_512"]["shapes"]
    groups = [make_features(s, 2, dtype=torch.float16, device="cuda", seed=k)
              for k, s in enumerate(shapes)]
    expected = mk.max_fuse_many(groups)  # warm-up: compiles, uploads the group table
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        mk.max_fuse_many(groups)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "many_kernel" in e.name]
    assert len(kernels) == 2, [e.name for e in kernels]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mk.max_fuse_many(groups)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, expected))
