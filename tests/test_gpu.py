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


def test_max_fuse_many_three_kernels_and_graph_capture():
    shapes = TABLE["sd15_controlnet_512"]["shapes"]
    groups = [make_features(s, 2, dtype=torch.float16, device="cuda", seed=k)
              for k, s in enumerate(shapes)]
    expected = mk.max_fuse_many(groups)  # warm-up: compiles, uploads the group table
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        mk.max_fuse_many(groups)
        torch.cuda.synchronize()
    names = ("stats_kernel", "combine_kernel", "write_kernel")
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and any(k in e.name for k in names)]
    assert sorted(kernels) == sorted(names), kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mk.max_fuse_many(groups)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, expected))


def test_first_call_inside_a_capture():
    """A shape list never seen before, first met inside a CUDA graph capture: the group table
    is uploaded without a host sync (pinned memory, captured copy) and kept alive."""
    shapes = [(2, 320, 24, 40), (2, 640, 12, 20), (2, 1280, 6, 10)]  # not used elsewhere
    groups = [make_features(s, 2, dtype=torch.float16, device="cuda", seed=k)
              for k, s in enumerate(shapes)]
    mk.max_fuse_many([[g[0][:1], g[1][:1]] for g in groups])  # compile the kernels only
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mk.max_fuse_many(groups)
    for k in range(300):  # more new shape lists than the table cache holds
        mk.max_fuse_many([[torch.randn(1, 8, 2 + k, device="cuda")] * 2])
    graph.replay()
    torch.cuda.synchronize()
    expected = mk.max_fuse_many(groups)
    assert all(torch.equal(a, b) for a, b in zip(captured, expected))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_second_device():
    """Launched on the inputs' device whatever device is current (the launcher's guard)."""
    feats = make_features((2, 320, 32, 32), 2, dtype=torch.float16, device="cuda:1", seed=3)
    with torch.cuda.device(1):
        want = mk.max_fuse(feats, unmerge=True)
    with torch.cuda.device(0):
        got = mk.max_fuse(feats, unmerge=True)
        check_fusion(feats, backend="triton", max_excluded=0.01)
    assert all(g.device == feats[0].device and torch.equal(g, w) for g, w in zip(got, want))


def test_mask_values_are_not_checked_during_graph_capture():
    """The mask value check needs a host sync: it is skipped while a CUDA graph is captured
    (check the masks once before capturing)."""
    from maxfusion_kernels.options import check_masks

    feats = make_features((2, 8, 4, 4), 2, device="cuda")
    mask = torch.full((2, 4, 4), 0.5, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        checked = check_masks([mask, None], feats, 1)
    assert checked[0].shape == (2, 4, 4) and checked[1] is None
