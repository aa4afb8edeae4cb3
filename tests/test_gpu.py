"""Checks only a CUDA device can make (``gpu`` marker; skipped without one): the compiled
kernels on the project's real shapes, CUDA-graph capture (no host sync), bitwise determinism
and batch invariance on the device, tensors of more than 2^31 elements (64-bit offsets), and
the backward kernels (real shapes against the reference's autograd, forward and backward in
one captured graph)."""

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


# ----------------------------------------------------------------------------------------
# the backward (docs/algorithm.md, "The gradient"; docs/design.md, "The backward")
# ----------------------------------------------------------------------------------------

BWD_SHAPES = [((2, 320, 64, 64), 1), ((1, 4096, 3072), -1)]  # SD1.5's first map; tokens


def _assert_grad_close(got, expected, dtype, what):
    """``got`` (``dtype``) against the float64 ``expected``: within the dtype's tolerance
    relative to each element, plus the absolute tolerance scaled by the gradient's RMS (the
    gradients are sums of terms of that size: the unmerge's channel sums cancel)."""
    from utils import TOLERANCES

    assert got.dtype == dtype and got.shape == expected.shape, what
    a = got.detach().double()
    e = expected.detach().to(dtype).double()  # rounded once to the dtype, as ours is
    tol = TOLERANCES[dtype]
    scale = max(1.0, float(e.pow(2).mean().sqrt()))
    err = (a - e).abs()
    bad = ~(err <= 2 * tol["rtol"] * e.abs() + 2 * tol["atol"] * scale) | ~torch.isfinite(a)
    n_bad = int(bad.sum())
    assert n_bad == 0, (f"{what}: {n_bad} of {bad.numel()} elements off (max abs error "
                        f"{float(err.max()):.3g}, RMS of the gradient {scale:.3g})")


@pytest.mark.parametrize("shape_cd", BWD_SHAPES, ids=["sd15-2x320x64x64", "tokens-1x4096x3072"])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_backward_real_shapes_match_reference(shape_cd, n, dtype, unmerge, monkeypatch):
    """The Triton backward kernels on real shapes equal autograd through the float64
    reference with the call's own decisions (``reference.fuse_with_decisions``), weights
    included; the kernels (not the torch formula) computed them."""
    import maxfusion_kernels.ops.autograd as AG
    from maxfusion_kernels import reference

    calls = []
    real = AG.triton_backward

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(AG, "triton_backward", spy)
    shape, cd = shape_cd
    weights = (1.0, 0.7, 1.3)[:n]
    feats = [f.requires_grad_() for f in
             make_features(shape, n, dtype=dtype, device="cuda", channel_dim=cd, seed=n)]
    res, info = mk.max_fuse(feats, unmerge=unmerge, weights=weights, channel_dim=cd,
                            return_info=True)
    outs = list(res) if unmerge else [res]
    g = torch.Generator(device="cuda").manual_seed(11)
    gouts = [torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in outs]
    ours = torch.autograd.grad(outs, feats, gouts)
    assert len(calls) == 1, "the backward did not run the Triton kernels"

    ref_in = [f.detach().double().requires_grad_() for f in feats]
    ref = reference.fuse_with_decisions(ref_in, info.winner, info.members, unmerge=unmerge,
                                        weights=weights, channel_dim=cd)
    ref_outs = list(ref) if unmerge else [ref]
    expected = torch.autograd.grad(ref_outs, ref_in, [t.double() for t in gouts])
    for i, (a, e) in enumerate(zip(ours, expected)):
        _assert_grad_close(a, e, dtype, f"grad of input {i}")
    # and the same again: the backward is deterministic (no atomics)
    res2 = mk.max_fuse(feats, unmerge=unmerge, weights=weights, channel_dim=cd)
    again = torch.autograd.grad(list(res2) if unmerge else [res2], feats, gouts)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))


@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_cuda_graph_capture_of_forward_and_backward(unmerge):
    """Forward and backward captured into one CUDA graph (after warm-up calls on a side
    stream, as torch's whole-network capture does): a replay on new inputs and new output
    gradients gives the eager call's gradients bitwise, also after more new shapes than the
    table cache holds have gone through the backward (the captured tables are kept)."""
    shape = (2, 320, 64, 64)
    static = [f.requires_grad_() for f in
              make_features(shape, 2, dtype=torch.float16, device="cuda", seed=0)]
    n_out = 2 if unmerge else 1
    gouts = [torch.randn(shape, device="cuda").half() for _ in range(n_out)]

    def step():
        res = mk.max_fuse(static, unmerge=unmerge)
        return torch.autograd.grad(list(res) if unmerge else [res], static, gouts)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles, uploads the tables
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for k in range(300):  # more new backward tables than the cache holds
        xs = [torch.randn(1, 8, 2 + k, device="cuda", requires_grad=True) for _ in range(2)]
        res = mk.max_fuse(xs, unmerge=unmerge)
        (res[0] if unmerge else res).sum().backward()
    fresh = make_features(shape, 2, dtype=torch.float16, device="cuda", seed=1)
    with torch.no_grad():
        for s, f in zip(static, fresh):
            s.copy_(f)
        for gout in gouts:
            gout.copy_(torch.randn_like(gout))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    assert all(torch.equal(a, b) for a, b in zip(captured, expected))
    assert not all(torch.equal(a, torch.zeros_like(a)) for a in expected)
