"""``max_fuse_many``: many MaxFusion groups (e.g. the 13 residuals of one ControlNet step) in
two kernel launches, whatever the number of groups.

Top to bottom: the two grouped Triton kernels, the launcher, the registered op
``torch.ops.maxfusion.max_fuse_many`` and the public function. The per-tile math is the same
as ``max_fuse``'s (``_fusion_math.py``); only the work split differs: one 1-D grid covers every
(group, sample, block of sites), and each program finds its group in a small table of per-group
sizes and strides. The inputs of all groups are passed as one tuple of pointers (read in place,
no stack, no pointer table on the device).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..options import FuseInfo, FuseOptions, check_features, resolve_options
from ..torch_backend import fuse_torch
from ._fusion_math import HAS_TRITON, next_pow2, pass_tiles
from .fuse import choose_backend, prepare_group

# The per-group table (int64, one row per group), by column: 0 first pass-1 program,
# 1 first pass-2 program, 2 batch B, 3 channels C, 4 sites S, 5 inner site run, 6 pass-1
# blocks per sample, 7 pass-2 blocks per sample, 8-11 input strides (batch, channel, outer,
# inner site), 12-15 output strides, 16 offset of the group's sites in the flat per-site
# buffers, 17 offset of its block partials. The kernels read it by these column numbers.
_NBLK1 = 6
_COLS = 18

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._fusion_math import (
        EARLY_MARK,
        block_partial,
        decide,
        normaliser,
        pick,
        poisoned,
        site_offsets,
        site_stats,
        unmerge_factor,
        write_sites,
    )

    # ------------------------------------------------------------------------------------
    # 1. kernels
    # ------------------------------------------------------------------------------------

    @triton.jit
    def _find_group(meta, pid, COL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                    K: tl.constexpr):
        """The group whose program range (start in column ``COL``) holds program ``pid``."""
        gg = tl.arange(0, GP)
        starts = tl.load(meta + gg * K + COL, mask=gg < G, other=pid + 1)
        return tl.sum((starts <= pid).to(tl.int32), axis=0) - 1

    @triton.jit
    def _group_rows(ptrs, g, i, N: tl.constexpr, G: tl.constexpr, NP: tl.constexpr):
        """``[NP]`` pointers of group ``g``'s N tensors, from the flat tuple ``ptrs``."""
        base = tl.where(i == 0, ptrs[0], ptrs[0])
        for k in tl.static_range(G):
            for j in tl.static_range(N):
                base = tl.where((g == k) & (i == j), ptrs[k * N + j], base)
        return base

    @triton.jit
    def _group_one(ptrs, g, STRIDE: tl.constexpr, G: tl.constexpr):
        """Group ``g``'s first pointer in a flat tuple with ``STRIDE`` entries per group."""
        p = ptrs[0]
        for k in tl.static_range(1, G):
            p = tl.where(g == k, ptrs[k * STRIDE], p)
        return p

    @triton.jit
    def _stats_many_kernel(
        xs, os, t_ptr, mask_ptr, part_ptr, meta,
        w0, w1, w2, w3, w4, w5, w6, w7, threshold,
        G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
        N_OUT: tl.constexpr, K: tl.constexpr,
        PEARSON: tl.constexpr, USE_VARIANCE: tl.constexpr, UNMERGE: tl.constexpr,
        TWO_RUNS: tl.constexpr, F64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        g = _find_group(meta, pid, 0, G, GP, K)
        row = meta + g * K
        C = tl.load(row + 3)
        S = tl.load(row + 4)
        inner = tl.load(row + 5)
        n_blocks = tl.load(row + 6)
        local = pid - tl.load(row + 0)
        pid_b = local // n_blocks
        pid_s = local % n_blocks
        site_off = tl.load(row + 16)

        i = tl.arange(0, NP)
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < S
        i_ok = i < N
        w = pick(i, w0, w1, w2, w3, w4, w5, w6, w7, N).to(tl.float32)
        present = i_ok & (w != 0.0)
        x_base = _group_rows(xs, g, i, N, G, NP) + pid_b * tl.load(row + 8)
        stride_xc = tl.load(row + 9)
        x_site = site_offsets(s, inner, tl.load(row + 10), tl.load(row + 11), TWO_RUNS)

        t, bits = site_stats(x_base, stride_xc, x_site, s_ok, i_ok, w, present, C, threshold,
                             N, NP, PEARSON, USE_VARIANCE, BLOCK_C, BLOCK_S)

        m2 = i_ok[:, None] & s_ok[None, :]
        t_base = t_ptr + N * site_off + (pid_b * N + i.to(tl.int64)) * S
        tl.store(t_base[:, None] + s[None, :], t, mask=m2)
        tl.store(mask_ptr + site_off + pid_b * S + s, bits, mask=s_ok)
        part = block_partial(t, m2)
        part_base = part_ptr + tl.load(row + 17)
        tl.store(part_base + (pid_b * N + i) * n_blocks + pid_s, part, mask=i_ok)

        early = (bits & EARLY_MARK) != 0
        if tl.max(early.to(tl.int32), axis=0) > 0:
            stride_ob = tl.load(row + 12)
            o_site = site_offsets(s, inner, tl.load(row + 14), tl.load(row + 15), TWO_RUNS)
            o_base = _group_rows(os, g, i, N_OUT, G, NP) + pid_b * stride_ob
            o_one = _group_one(os, g, N_OUT, G) + pid_b * stride_ob
            member = present[:, None] & early[None, :]
            zero = tl.zeros((NP, BLOCK_S), tl.float32)
            win = tl.zeros((BLOCK_S,), tl.int32)
            poison = poisoned(t, present)
            write_sites(x_base, stride_xc, x_site, o_base, o_one, tl.load(row + 13), o_site,
                        early, member, zero, win, poison, w, i_ok, C, UNMERGE, F64, NP,
                        BLOCK_C)

    @triton.jit
    def _finish_many_kernel(
        xs, os, t_ptr, mask_ptr, part_ptr, winner_ptr, members_ptr, meta,
        w0, w1, w2, w3, w4, w5, w6, w7,
        G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
        N_OUT: tl.constexpr, K: tl.constexpr,
        USE_VARIANCE: tl.constexpr, UNMERGE: tl.constexpr, BATCH_NORMALIZER: tl.constexpr,
        TWO_RUNS: tl.constexpr, INFO: tl.constexpr, F64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        g = _find_group(meta, pid, 1, G, GP, K)
        row = meta + g * K
        B = tl.load(row + 2)
        C = tl.load(row + 3)
        S = tl.load(row + 4)
        inner = tl.load(row + 5)
        n_part = tl.load(row + 6)
        n_blocks = tl.load(row + 7)
        local = pid - tl.load(row + 1)
        pid_b = local // n_blocks
        pid_s = local % n_blocks
        site_off = tl.load(row + 16)

        i = tl.arange(0, NP)
        i_ok = i < N
        w = pick(i, w0, w1, w2, w3, w4, w5, w6, w7, N).to(tl.float32)
        present = i_ok & (w != 0.0)
        part_base = part_ptr + tl.load(row + 17)
        if BATCH_NORMALIZER:
            total = normaliser(part_base, 0, B, n_part, i_ok, N, NP, BLOCK_P)
        else:
            total = normaliser(part_base, pid_b, pid_b + 1, n_part, i_ok, N, NP, BLOCK_P)

        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < S
        m2 = i_ok[:, None] & s_ok[None, :]
        t_base = t_ptr + N * site_off + (pid_b * N + i.to(tl.int64)) * S
        t = tl.load(t_base[:, None] + s[None, :], mask=m2, other=0.0)
        bits = tl.load(mask_ptr + site_off + pid_b * S + s, mask=s_ok, other=0)
        win, member = decide(t, total, bits, present, i_ok, N, NP)

        if INFO:
            tl.store(winner_ptr + site_off + pid_b * S + s, win.to(tl.int64), mask=s_ok)
            m_ptr = (members_ptr + N * site_off
                     + (i.to(tl.int64)[:, None] * (B * S) + pid_b * S + s[None, :]))
            tl.store(m_ptr, member.to(tl.int8), mask=m2)

        todo = s_ok & ((bits & EARLY_MARK) == 0)
        if tl.max(todo.to(tl.int32), axis=0) > 0:
            x_base = _group_rows(xs, g, i, N, G, NP) + pid_b * tl.load(row + 8)
            x_site = site_offsets(s, inner, tl.load(row + 10), tl.load(row + 11), TWO_RUNS)
            stride_ob = tl.load(row + 12)
            o_site = site_offsets(s, inner, tl.load(row + 14), tl.load(row + 15), TWO_RUNS)
            o_base = _group_rows(os, g, i, N_OUT, G, NP) + pid_b * stride_ob
            o_one = _group_one(os, g, N_OUT, G) + pid_b * stride_ob
            factor = unmerge_factor(t, win, present, USE_VARIANCE, NP)
            poison = poisoned(t, present)
            write_sites(x_base, tl.load(row + 9), x_site, o_base, o_one, tl.load(row + 13),
                        o_site, todo, member, factor, win, poison, w, i_ok, C, UNMERGE, F64, NP,
                        BLOCK_C)


# ----------------------------------------------------------------------------------------
# 2. launcher
# ----------------------------------------------------------------------------------------

_META_CACHE: OrderedDict = OrderedDict()
_META_CACHE_SIZE = 64


def _group_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """The per-group table on ``device``, cached by content: a step's residual shapes repeat
    every call, so after the first call no host-to-device copy is made (CUDA-graph safe)."""
    key = (str(device), tuple(tuple(r) for r in rows))
    table = _META_CACHE.get(key)
    if table is None:
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _META_CACHE[key] = table
        if len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    else:
        _META_CACHE.move_to_end(key)
    return table


def _fuse_many_triton(groups: list[list[torch.Tensor]], opts: list[FuseOptions],
                      return_info: bool, launch: bool = True):
    """Allocate every group's results and fuse all groups in two launches."""
    n = len(groups[0])
    opt = opts[0]
    n_out = n if opt.unmerge else 1
    outs, active = [], []
    total_sites = 0  # the groups' sites one after the other in the flat per-site buffers
    for grp, o in zip(groups, opts):
        feats, out, lay = prepare_group(grp, n_out, o.channel_dim)
        outs.append(out)
        if lay.batch * lay.sites > 0:
            active.append((feats, out, lay, total_sites))
        total_sites += lay.batch * lay.sites

    f0 = groups[0][0]
    dev = f0.device
    winner_all = (f0.new_empty((total_sites,), dtype=torch.int64) if return_info else None)
    members_all = (f0.new_empty((n * total_sites,), dtype=torch.bool) if return_info else None)

    if not active or not launch:
        return outs, winner_all, members_all

    n_pad = next_pow2(n)
    # one tile shape for the launch: from the group with the most elements
    big = max(active, key=lambda a: a[2].batch * a[2].channels * a[2].sites)[2]
    (bc1, bs1), (bc2, bs2) = pass_tiles(n_pad, big.channels, big.sites, big.in_strides[1] == 1)
    rows, xs, os_ = [], [], []
    start1 = start2 = part_off = 0
    for feats, out, lay, site_off in active:
        nblk1 = triton.cdiv(lay.sites, bs1)
        nblk2 = triton.cdiv(lay.sites, bs2)
        rows.append([start1, start2, lay.batch, lay.channels, lay.sites, lay.inner, nblk1, nblk2,
                     *lay.in_strides, *lay.out_strides, site_off, part_off])
        start1 += lay.batch * nblk1
        start2 += lay.batch * nblk2
        part_off += lay.batch * n * nblk1
        xs.extend(feats)
        os_.extend(out)
    table = _group_table(rows, dev)
    t_buf = torch.empty((n * total_sites,), dtype=torch.float32, device=dev)
    mask_buf = torch.empty((total_sites,), dtype=torch.int32, device=dev)
    part_buf = torch.empty((part_off,), dtype=torch.float32, device=dev)
    weights = list(opt.weights) if opt.weights is not None else [1.0] * n
    ws = [weights[i] if i < n else 1.0 for i in range(8)]
    g = len(active)
    common = dict(G=g, GP=next_pow2(g), N=n, NP=n_pad, N_OUT=n_out, K=_COLS,
                  UNMERGE=opt.unmerge, TWO_RUNS=any(a[2].two_runs for a in active),
                  F64=f0.dtype == torch.float64, num_warps=4)
    _stats_many_kernel[(start1,)](
        tuple(xs), tuple(os_), t_buf, mask_buf, part_buf, table, *ws, opt.threshold,
        PEARSON=opt.pearson, USE_VARIANCE=opt.use_variance, BLOCK_C=bc1, BLOCK_S=bs1,
        **common,
    )
    max_blocks = max(r[_NBLK1] for r in rows)
    _finish_many_kernel[(start2,)](
        tuple(xs), tuple(os_), t_buf, mask_buf, part_buf,
        winner_all if return_info else t_buf, members_all if return_info else t_buf, table,
        *ws, USE_VARIANCE=opt.use_variance, BATCH_NORMALIZER=opt.batch_normalizer,
        INFO=return_info, BLOCK_C=bc2, BLOCK_S=bs2, BLOCK_P=min(next_pow2(max_blocks), 256),
        **common,
    )
    return outs, winner_all, members_all


def _fuse_many_torch(groups, opts, return_info):
    outs, winners, members = [], [], []
    for grp, o in zip(groups, opts):
        res, w, m = fuse_torch(grp, o, return_info)
        outs.append(res)
        if return_info:
            winners.append(w.reshape(-1))
            members.append(m.reshape(-1))
    if not return_info:
        return outs, None, None
    return outs, torch.cat(winners), torch.cat(members)


# ----------------------------------------------------------------------------------------
# 3. registered op
# ----------------------------------------------------------------------------------------


def _split(features, n_inputs):
    return [list(features[k:k + n_inputs]) for k in range(0, len(features), n_inputs)]


def _options(groups, threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
             channel_dim):
    w = None if all(v == 1.0 for v in weights) else tuple(weights)
    return [
        FuseOptions(threshold=threshold, unmerge=unmerge,
                    correlation="pearson" if pearson else "cosine",
                    saliency="variance" if use_variance else "std",
                    normalize="batch" if batch_normalizer else "sample",
                    weights=w, channel_dim=channel_dim % grp[0].dim())
        for grp in groups
    ]


def _flatten_results(outs, winner_all, members_all, like):
    flat = [o for out in outs for o in out]
    if winner_all is None or members_all is None:
        winner_all = like.new_empty((0,), dtype=torch.int64)
        members_all = like.new_empty((0,), dtype=torch.bool)
    return flat, winner_all, members_all


def _info_views(groups, channel_dim, winner_all, members_all):
    """Per group ``FuseInfo`` views of the op's flat info buffers: the groups one after the
    other, winners ``[B, S]`` and members ``[N, B, S]`` each."""
    infos = []
    off = 0
    for grp in groups:
        f0 = grp[0]
        moved = f0.movedim(channel_dim % f0.dim(), 1).shape
        b, n = moved[0], len(grp)
        count = b
        for size in moved[2:]:
            count *= size
        winner = winner_all[off:off + count].view(b, *moved[2:])
        members = members_all[n * off:n * (off + count)].view(n, b, *moved[2:])
        infos.append(FuseInfo(winner=winner, members=members))
        off += count
    return infos


@torch.library.custom_op("maxfusion::max_fuse_many", mutates_args=())
def _max_fuse_many_op(
    features: list[torch.Tensor],
    n_inputs: int,
    threshold: float,
    unmerge: bool,
    pearson: bool,
    use_variance: bool,
    batch_normalizer: bool,
    weights: list[float],
    channel_dim: int,
    return_info: bool,
    use_triton: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``torch.ops.maxfusion.max_fuse_many``: ``features`` holds the groups one after the
    other, ``n_inputs`` tensors each. Returns the flat list of outputs (1 or N per group), and
    the winners and members of all groups in two flat tensors (groups one after the other:
    ``B * S`` winners and ``N * B * S`` members each; empty unless ``return_info``)."""
    groups = _split(features, n_inputs)
    opts = _options(groups, threshold, unmerge, pearson, use_variance, batch_normalizer,
                    weights, channel_dim)
    impl = _fuse_many_triton if use_triton else _fuse_many_torch
    return _flatten_results(*impl(groups, opts, return_info), features[0])


@_max_fuse_many_op.register_fake
def _(features, n_inputs, threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
      channel_dim, return_info, use_triton):
    groups = _split(features, n_inputs)
    opts = _options(groups, threshold, unmerge, pearson, use_variance, batch_normalizer,
                    weights, channel_dim)
    return _flatten_results(*_fuse_many_triton(groups, opts, return_info, launch=False),
                            features[0])


# ----------------------------------------------------------------------------------------
# 4. public function
# ----------------------------------------------------------------------------------------


def max_fuse_many(
    groups: Sequence[Sequence[torch.Tensor]],
    *,
    threshold: float = 0.7,
    unmerge: bool = False,
    preset: str = "paper",
    correlation: str | None = None,
    saliency: str | None = None,
    normalize: str | None = None,
    weights: Sequence[float] | None = None,
    channel_dim: int = 1,
    return_info: bool = False,
    backend: str = "auto",
):
    """Fuse many groups of N feature tensors (e.g. one denoising step's residuals) at once.

    Args:
        groups: G groups, each a sequence of N tensors as for
            :func:`maxfusion_kernels.max_fuse` (same shape within a group; shapes, channel
            counts and batch sizes may differ between groups). Every group has the same N,
            dtype and device. ``channel_dim`` applies to every group.
        threshold, unmerge, preset, correlation, saliency, normalize, weights, backend: as for
            ``max_fuse``, applied to every group (``weights``: one per input, e.g. the
            conditioning scales of the N control models).
        return_info: also return a list of :class:`FuseInfo`, one per group.

    Returns:
        A list with one result per group (a tensor, or a list of N with ``unmerge``), and with
        ``return_info`` ``(results, infos)``. Each group has its own normaliser, so the result
        of a group equals ``max_fuse`` of that group alone.

    With the Triton backend all groups are fused in two kernel launches whatever G is.
    """
    if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of groups of tensors, got {type(groups).__name__}")
    if len(groups) == 0:
        return ([], []) if return_info else []
    checked = [check_features(grp, what=f"groups[{k}]") for k, grp in enumerate(groups)]
    n = len(checked[0])
    f0 = checked[0][0]
    for k, grp in enumerate(checked[1:], start=1):
        if len(grp) != n:
            raise ValueError(f"groups[{k}] has {len(grp)} tensors but groups[0] has {n}: "
                             "every group must fuse the same N inputs")
        if grp[0].dtype != f0.dtype:
            raise ValueError(f"groups[{k}] is {grp[0].dtype} but groups[0] is {f0.dtype}")
        if grp[0].device != f0.device:
            raise ValueError(f"groups[{k}] is on {grp[0].device} but groups[0] is on {f0.device}")
    opts = [resolve_options(grp, threshold=threshold, unmerge=unmerge, preset=preset,
                            correlation=correlation, saliency=saliency, normalize=normalize,
                            weights=weights, channel_dim=channel_dim) for grp in checked]
    opt = opts[0]
    use_triton = choose_backend(f0.device, backend) == "triton"
    flat = [f for grp in checked for f in grp]
    outs, winners, members = torch.ops.maxfusion.max_fuse_many(
        flat, n, opt.threshold, opt.unmerge, opt.pearson, opt.use_variance,
        opt.batch_normalizer, list(opt.weights) if opt.weights is not None else [1.0] * n,
        channel_dim, return_info, use_triton,
    )
    n_out = n if opt.unmerge else 1
    results = []
    for k in range(len(checked)):
        chunk = list(outs[k * n_out:(k + 1) * n_out])
        results.append(chunk if opt.unmerge else chunk[0])
    if return_info:
        return results, _info_views(checked, channel_dim, winners, members)
    return results
