"""Sharded sites (docs/spec.md, "Sharded sites"): ``max_fuse`` / ``max_fuse_many`` with a
``process_group`` whose ranks each hold a contiguous share of the sites.

One file (over 400 lines) because every test runs its ranks through the same worker helpers at
the top, which spawned processes import by module.

Every test spawns 2 or 4 CPU processes joined by gloo on loopback (``dist_harness.run_ranks``:
a free port on 127.0.0.1, a hard timeout that kills stragglers). Each rank builds the same
full inputs from a seed, fuses the whole of them alone (the unsharded result) and then its
own share with the group, and compares: its result must be its slice of the unsharded one.
Decisions are compared away from near-ties (``utils.tie_sites``: within 1e-4 of the
threshold or of the runner-up's saliency), the outputs to float32 rounding. The Triton
kernels run in the interpreter (``TRITON_INTERPRET=1`` comes from conftest).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from dist_harness import WorkerError, run_ranks

import maxfusion_kernels as mk

TIMEOUT = 50  # seconds per spawned run, a hard limit (the runs take 5-20 s)


# --------------------------------------------------------------------------------------------
# helpers run inside the workers
# --------------------------------------------------------------------------------------------


def _option_grid(channel_dim: int):
    """The options every sharded comparison runs with: both backends, merge and unmerge, both
    normalisers."""
    for backend in ("torch", "triton"):
        for unmerge in (False, True):
            for normalize in ("sample", "batch"):
                yield dict(unmerge=unmerge, normalize=normalize, backend=backend,
                           channel_dim=channel_dim)


def _features(shape, n, cd, seed):
    """``utils.make_features`` with input 0 made 3x stronger on the first half of the split
    dim, so that each shard's own normaliser differs from the global one (fusing a shard
    alone then changes decisions: the tests would see a missing all-reduce)."""
    from utils import make_features

    feats = make_features(shape, n, channel_dim=cd, seed=seed)
    split = 1 if cd != 1 else 2
    idx = [slice(None)] * len(shape)
    idx[split] = slice(0, shape[split] // 2)
    feats[0][tuple(idx)] *= 3.0
    return feats


def _cut(t, dim, splits, rank):
    start = sum(splits[:rank])
    return t.narrow(dim, start, splits[rank]).contiguous()


def _site_mask(feats, cd, **options):
    """``[B, *sites]`` True where the float64 reference's decision is not a near-tie."""
    from utils import tie_sites

    from maxfusion_kernels import reference

    opts = {k: v for k, v in options.items() if k not in ("backend",)}
    _, info_ref = reference.max_fuse(feats, channel_dim=cd, return_info=True, **opts)
    thr = opts.pop("threshold", 0.7)
    return ~tie_sites(feats, info_ref, threshold=thr, channel_dim=cd, **opts)


def _site_dim(dim, cd, ndim):
    """The split dim of the features as a dim of ``[B, *sites]`` (winners, masks)."""
    return dim if dim < cd % ndim else dim - 1


def _compare(local, full_res, local_info, full_info, keep, dim, splits, rank, cd, unmerge,
             what):
    """The rank's result against its slice of the unsharded one (away from near-ties)."""
    from utils import assert_close

    sdim = _site_dim(dim, cd, keep.dim() + 1)
    keep_l = _cut(keep, sdim, splits, rank)
    w_full = _cut(full_info.winner, sdim, splits, rank)
    assert torch.equal(local_info.winner[keep_l], w_full[keep_l]), f"{what}: winners differ"
    m_full = _cut(full_info.members, sdim + 1, splits, rank)
    assert torch.equal(local_info.members[:, keep_l], m_full[:, keep_l]), f"{what}: members"
    outs = local if unmerge else [local]
    fulls = full_res if unmerge else [full_res]
    for k, (o, f) in enumerate(zip(outs, fulls)):
        ref = _cut(f, dim, splits, rank).double()
        assert bool(torch.isfinite(o).all()), f"{what}: non-finite output"
        assert_close(o, ref, torch.float32, mask=keep_l.unsqueeze(cd % o.dim()),
                     what=f"{what} output {k}")
    return int((~keep_l).sum())


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------

# (shape, channel_dim, split dim, shares of the split dim per world size)
CASES = [
    # DiT tokens [B, L, C], split along the tokens; uneven shares, one empty at 4 ranks
    ((2, 24, 16), -1, 1, {2: [10, 14], 4: [7, 0, 9, 8]}),
    # NCHW maps split by rows (a contiguous share of the sites), 3 inputs
    ((2, 8, 6, 5), 1, 2, {2: [4, 2], 4: [2, 1, 0, 3]}),
]


def _kernels_worker(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(t, *args, **kwargs):
        calls.append((t.dtype, t.numel()))
        return real_all_reduce(t, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # counts the collectives of this process only
    report = {"ties": 0, "local_alone_differs": 0}
    for ci, (shape, cd, dim, shares) in enumerate(CASES):
        splits = shares[world]
        n = 2 if ci == 0 else 3
        feats = _features(shape, n, cd, seed=10 + ci)
        local_feats = [_cut(f, dim, splits, rank) for f in feats]
        for opts in _option_grid(cd):
            backend, unmerge, normalize = opts["backend"], opts["unmerge"], opts["normalize"]
            what = f"case {ci} {backend} unmerge={unmerge} {normalize}"
            keep = _site_mask(feats, cd, normalize=normalize)
            full, full_info = mk.max_fuse(feats, return_info=True, **opts)
            calls.clear()
            local, info = mk.max_fuse(local_feats, return_info=True,
                                      process_group=group, **opts)
            assert len(calls) <= 2, f"{what}: {len(calls)} collectives"
            report["ties"] += _compare(local, full, info, full_info, keep, dim, splits,
                                       rank, cd, unmerge, what)
            # the same call again (the eager fast path on the Triton backend): one
            # collective, the consistency check is not repeated, same bits
            calls.clear()
            again, info2 = mk.max_fuse(local_feats, return_info=True,
                                       process_group=group, **opts)
            assert len(calls) == 1 and calls[0][0] == torch.float32, (what, calls)
            rows = 1 if normalize == "batch" else shape[0]
            assert calls[0][1] == n * rows, (what, calls)  # 4 * N * rows bytes
            for a, b in zip(again if unmerge else [again], local if unmerge else [local]):
                assert torch.equal(a, b), f"{what}: not deterministic"
            assert torch.equal(info2.winner, info.winner)
            # the premise: without the group, a shard's own normaliser changes
            # decisions (counted over all ranks by the test)
            alone, info_alone = mk.max_fuse(local_feats, return_info=True, **opts)
            w_full = _cut(full_info.winner, _site_dim(dim, cd, len(shape)), splits,
                          rank)
            report["local_alone_differs"] += int((info_alone.winner != w_full).sum())
    dist.all_reduce = real_all_reduce
    return report


def _many_worker(rank, world):
    """max_fuse_many: groups of different shapes, each split unevenly (some empty on a rank),
    one call, one collective for all groups; merge and unmerge, both normalisers, masks."""
    import torch.distributed as dist
    from utils import make_masks, tie_sites

    from maxfusion_kernels import reference

    group = dist.group.WORLD
    specs = [  # shape (tokens), shares per world size
        ((2, 12, 16), {2: [5, 7], 4: [3, 3, 3, 3]}),
        ((2, 9, 8), {2: [9, 0], 4: [0, 4, 0, 5]}),
        ((1, 20, 32), {2: [11, 9], 4: [6, 5, 4, 5]}),
    ]
    groups = [_features(shape, 2, -1, seed=30 + k) for k, (shape, _) in enumerate(specs)]
    local = [[_cut(f, 1, sh[world], rank) for f in g] for g, (_, sh) in zip(groups, specs)]
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(t, *args, **kwargs):
        calls.append(t.numel())
        return real_all_reduce(t, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    ties = 0
    for opts in _option_grid(-1):
        backend, unmerge, normalize = opts["backend"], opts["unmerge"], opts["normalize"]
        full, full_infos = mk.max_fuse_many(groups, return_info=True, **opts)
        calls.clear()
        res, infos = mk.max_fuse_many(local, return_info=True, process_group=group,
                                      **opts)
        rows = [1 if normalize == "batch" else s[0] for s, _ in specs]
        assert calls[-1] == 2 * sum(rows), calls  # one all-reduce: every group
        for k, (_, sh) in enumerate(specs):
            keep = _site_mask(groups[k], -1, normalize=normalize)
            ties += _compare(res[k], full[k], infos[k], full_infos[k], keep, 1,
                             sh[world], rank, -1, unmerge,
                             f"group {k} {backend} {unmerge} {normalize}")
    dist.all_reduce = real_all_reduce
    # regional masks are per site: each rank passes its share of them
    masks = [make_masks(g[0].shape, 2, kind="mixed", channel_dim=-1, seed=40 + k)
             for k, g in enumerate(groups)]
    local_masks = [[_cut(m, 1, sh[world], rank) for m in ms]
                   for ms, (_, sh) in zip(masks, specs)]
    for backend in ("torch", "triton"):
        full, full_infos = mk.max_fuse_many(groups, masks=masks, return_info=True,
                                            backend=backend, channel_dim=-1)
        res, infos = mk.max_fuse_many(local, masks=local_masks, return_info=True,
                                      backend=backend, channel_dim=-1, process_group=group)
        for k, (_, sh) in enumerate(specs):
            _, iref = reference.max_fuse(groups[k], masks=masks[k], channel_dim=-1,
                                         return_info=True)
            keep = ~tie_sites(groups[k], iref, masks=masks[k], channel_dim=-1)
            ties += _compare(res[k], full[k], infos[k], full_infos[k], keep, 1, sh[world], rank,
                             -1, False, f"masked group {k} {backend}")
    return {"ties": ties}


def _zeros_worker(rank, world):
    """A shard of zeros on one rank, an input that is zero everywhere, an empty shard: no NaN,
    and still the slices of the unsharded result."""
    import torch.distributed as dist

    group = dist.group.WORLD
    shape, splits = (2, 16, 8), ([8, 8] if world == 2 else [4, 4, 0, 8])
    feats = _features(shape, 3, -1, seed=50)
    feats[2].zero_()  # an input with nothing anywhere: T_2 = 0 on every rank
    start = sum(splits[:1])
    for f in feats:  # rank 1's whole shard is zeros in every input
        f[:, start:start + splits[1]] = 0.0
    local = [_cut(f, 1, splits, rank) for f in feats]
    for opts in _option_grid(-1):
        backend, unmerge, normalize = opts["backend"], opts["unmerge"], opts["normalize"]
        full, full_info = mk.max_fuse(feats, return_info=True, **opts)
        res, info = mk.max_fuse(local, return_info=True, process_group=group, **opts)
        for o in (res if unmerge else [res]):
            assert not bool(torch.isnan(o).any()), (backend, unmerge, normalize)
        keep = _site_mask(feats, -1, normalize=normalize)
        _compare(res, full, info, full_info, keep, 1, splits, rank, -1, unmerge,
                 f"zeros {backend} {unmerge} {normalize}")
    return {}


def _digest_worker(rank, world):
    """A digest of the rank's sharded results (both backends), for run-to-run determinism."""
    import torch.distributed as dist

    h = hashlib.sha256()
    groups = [_features((2, 20, 16), 3, -1, seed=60), _features((2, 8, 6, 4), 3, 1, seed=61)]
    tok = [_cut(f, 1, [9, 11], rank) for f in groups[0]]
    maps = [_cut(f, 2, [4, 2], rank) for f in groups[1]]
    for backend in ("torch", "triton"):
        for unmerge in (False, True):
            res = mk.max_fuse(tok, channel_dim=-1, unmerge=unmerge, backend=backend,
                              process_group=dist.group.WORLD)
            res2 = mk.max_fuse_many([maps, maps], unmerge=unmerge, backend=backend,
                                    process_group=dist.group.WORLD)
            for t in (res if unmerge else [res]) + [x for r in res2 for x in
                                                    (r if unmerge else [r])]:
                h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _errors_worker(rank, world):
    """Calls that differ between the ranks raise ValueError on every rank (no hang), and
    the group works normally afterwards."""
    import torch.distributed as dist

    group = dist.group.WORLD
    seen = {}

    def expect(what, fn, pattern):
        try:
            fn()
        except ValueError as e:
            assert pattern in str(e), (what, str(e))
            seen[what] = str(e)
            return
        raise AssertionError(f"{what}: no error on rank {rank}")

    b = 2 if rank == 0 else 1
    expect("batch", lambda: mk.max_fuse([torch.randn(b, 6, 8)] * 2, channel_dim=-1,
                                        process_group=group), "batch size")
    c = 8 if rank == 0 else 6
    expect("channels", lambda: mk.max_fuse_many([[torch.randn(2, 6, c)] * 2] * 2,
                                                channel_dim=-1, process_group=group),
           "channel count")
    n = 2 if rank == 0 else 3
    expect("inputs", lambda: mk.max_fuse([torch.randn(2, 6, 8)] * n, channel_dim=-1,
                                         process_group=group), "number of inputs N")
    norm = "sample" if rank == 0 else "batch"
    expect("normalize", lambda: mk.max_fuse([torch.randn(2, 6, 8)] * 2, channel_dim=-1,
                                            normalize=norm, backend="triton",
                                            process_group=group), "normalize")
    # sites may differ between ranks: not an error; the group still works after the errors
    sites = 5 if rank == 0 else 3
    out = mk.max_fuse([torch.randn(2, sites, 8), torch.randn(2, sites, 8)], channel_dim=-1,
                      process_group=group)
    assert out.shape == (2, sites, 8)
    # a DeviceMesh of one dim is accepted; a mesh of two dims is refused with a hint
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    mk.max_fuse([torch.randn(2, 4, 8)] * 2, channel_dim=-1, process_group=mesh)
    if world % 2 == 0:
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("a", "b"))
        try:
            mk.max_fuse([torch.randn(2, 4, 8)] * 2, channel_dim=-1, process_group=mesh2)
        except ValueError as e:
            assert "DeviceMesh with 2 dims" in str(e)
            seen["mesh"] = str(e)
    return seen


def _compile_worker(rank, world):
    """torch.compile(fullgraph=True) of a step that fuses with a process group: the all-reduce
    runs inside the opaque op (no graph break); torch.library.opcheck with a group name."""
    import torch.distributed as dist

    group = dist.group.WORLD
    torch._dynamo.reset()
    groups = [_features((2, 8, 16), 2, -1, seed=70 + k) for k in range(3)]
    local = [[_cut(f, 1, [3, 5] if world == 2 else [2, 2, 2, 2], rank) for f in g]
             for g in groups]

    def step(gs):
        res = mk.max_fuse_many(gs, channel_dim=-1, process_group=group)
        one = mk.max_fuse(gs[0], channel_dim=-1, unmerge=True, process_group=group)
        return [r * 2.0 for r in res] + [o + 1.0 for o in one]

    got = torch.compile(step, fullgraph=True)(local)
    want = step(local)
    from utils import assert_close

    for g, w in zip(got, want):
        assert_close(g, w.double(), torch.float32, what="compiled vs eager")
    flat = [f for g in local for f in g]
    torch.library.opcheck(
        torch.ops.maxfusion.max_fuse_many.default,
        (flat, 2, 0.7, False, False, False, False, [1.0, 1.0], 2, True, False, [],
         group.group_name))
    torch.library.opcheck(
        torch.ops.maxfusion.max_fuse.default,
        (local[0], 0.7, True, False, False, False, [1.0, 1.0], 2, True, True, [],
         group.group_name))
    return {}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_max_fuse_equals_slices(world):
    reports = run_ranks(_kernels_worker, world, timeout=TIMEOUT)
    # the inputs make shards matter: fusing each shard alone changes winners somewhere
    assert sum(r["local_alone_differs"] for r in reports) > 0
    assert sum(r["ties"] for r in reports) < 50


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_max_fuse_many_equals_slices(world):
    run_ranks(_many_worker, world, timeout=TIMEOUT)


def test_zero_shard_gives_no_nan():
    run_ranks(_zeros_worker, 4, timeout=TIMEOUT)


def test_deterministic_across_runs():
    first = run_ranks(_digest_worker, 2, timeout=TIMEOUT)
    second = run_ranks(_digest_worker, 2, timeout=TIMEOUT)
    assert first == second


@pytest.mark.parametrize("world", [2, 4])
def test_mismatched_calls_raise_on_every_rank(world):
    seen = run_ranks(_errors_worker, world, timeout=TIMEOUT)
    for s in seen:
        assert set(s) >= {"batch", "channels", "inputs", "normalize"}
    print(seen[0]["batch"])


def test_compile_and_opcheck_with_a_group():
    run_ranks(_compile_worker, 2, timeout=TIMEOUT)


def test_worker_errors_come_back_with_their_traceback():
    pattern = r"(?s)rank 1: Traceback.*_failing_worker.*ZeroDivisionError"
    with pytest.raises(WorkerError, match=pattern):
        run_ranks(_failing_worker, 2, timeout=TIMEOUT)


def _failing_worker(rank, world):
    if rank == 1:
        return 1 / 0
    return rank


# --------------------------------------------------------------------------------------------
# in this process: no process group
# --------------------------------------------------------------------------------------------


def test_process_group_needs_an_initialised_group(monkeypatch):
    import torch.distributed as dist

    feats = [torch.randn(2, 4, 8), torch.randn(2, 4, 8)]
    with pytest.raises(TypeError, match="ProcessGroup"):
        mk.max_fuse(feats, channel_dim=-1, process_group="0")
    with pytest.raises(TypeError, match="ProcessGroup"):
        mk.max_fuse_many([feats], channel_dim=-1, process_group=0)
    assert not dist.is_initialized()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        # a group of one rank sums nothing: no collective, bitwise the unsharded result
        for backend in ("torch", "triton"):
            a = mk.max_fuse(feats, channel_dim=-1, backend=backend, process_group=group)
            assert torch.equal(a, mk.max_fuse(feats, channel_dim=-1, backend=backend))
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="not initialised"):
        mk.max_fuse(feats, channel_dim=-1, process_group=group)
    with pytest.raises(RuntimeError, match="not initialised"):
        mk.max_fuse_many([feats], channel_dim=-1, process_group=group)


def test_collective_bytes():
    from maxfusion_kernels.distributed import collective_bytes

    # 4 bytes x N per normaliser row: B rows per group (sample), 1 (batch)
    groups = [[torch.zeros(2, 5, 8)] * 3, [torch.zeros(1, 7, 4)] * 3]
    assert collective_bytes(groups) == 4 * 3 * (2 + 1)
    assert collective_bytes(groups, normalize="batch") == 4 * 3 * 2
