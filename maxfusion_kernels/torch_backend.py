"""The vectorised PyTorch path: MaxFusion on any device without Triton.

This is the CPU implementation of the registered op (so ``torch.compile`` works without a GPU)
and the ``backend="torch"`` choice of :func:`maxfusion_kernels.max_fuse`. Statistics are
computed in float32 (float64 for float64 inputs). It has no data-dependent control flow, so it
traces into a single graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .options import FuseOptions


@dataclass
class GroupStats:
    """What the torch path knows about one group before its normaliser is complete."""

    x: torch.Tensor  # [N, B, S, C] weighted (and masked) inputs, accumulation dtype
    present: torch.Tensor  # [N, 1, 1] or [N, B, S] bool: the input is not removed there
    t: torch.Tensor  # [N, B, S] saliency statistic
    std: torch.Tensor  # [N, B, S]
    corr: torch.Tensor  # [N, N, B, S]
    total: torch.Tensor  # [N, B, 1] (or [N, 1, 1], batch normaliser): local sums of t
    like: torch.Tensor  # input 0, for the outputs' shape, layout and dtype


def group_stats(feats: list[torch.Tensor], opt: FuseOptions,
                masks: list[torch.Tensor | None] | None = None) -> GroupStats | None:
    """Everything but the decisions, for checked ``feats`` (None when there are no sites).

    No tensor is built from host data here (weights are applied as Python scalars), so the
    path needs no host-to-device copy and can be captured in a CUDA graph.
    """
    n = len(feats)
    f0 = feats[0]
    cd = opt.channel_dim
    acc = torch.float64 if f0.dtype == torch.float64 else torch.float32
    moved_shape = f0.movedim(cd, 1).shape  # [B, C, *sites]
    b, c = moved_shape[0], moved_shape[1]
    n_sites = 1
    for size in moved_shape[2:]:
        n_sites *= size
    if b * n_sites == 0:
        return None
    # [N, B, S, C] in the accumulation dtype, the weights applied first: channels last, so
    # the channel reductions and the Gram matrix are contiguous batched products
    x = torch.stack([f.movedim(cd, -1).reshape(b, n_sites, c).to(acc) for f in feats])
    present = torch.ones((n, 1, 1), dtype=torch.bool, device=f0.device)
    if opt.weights is not None:
        for i, w in enumerate(opt.weights):
            if w == 0:  # a weight of 0 zeroes its input, inf and NaN included
                x[i].zero_()
                present[i] = False
            elif w != 1:
                x[i].mul_(w)
    if masks is not None and any(m is not None for m in masks):
        # per-site weights, in place on the stack (a fresh tensor): [Bm, S, 1] each, so no
        # full-size copy of a mask; a mask of 0 zeroes its input there, inf and NaN included
        site_present = []
        for i, m in enumerate(masks):
            if m is None:
                site_present.append(torch.ones((b, n_sites), dtype=torch.bool,
                                               device=f0.device))
                continue
            mi = m.reshape(m.shape[0], n_sites, 1).to(acc)
            x[i].mul_(mi).masked_fill_(mi == 0, 0.0)
            site_present.append((mi[..., 0] != 0).expand(b, n_sites))
        present = present & torch.stack(site_present)  # [N, B, S]

    centred = x - x.mean(dim=3, keepdim=True)
    var = (centred * centred).sum(dim=3) / (c - 1)  # [N, B, S] (faster than var_mean here)
    std = var.sqrt()
    y = centred if opt.pearson else x
    # [N, N, B, S], pair by pair: elementwise products reduce far faster on a CPU than a
    # batched matmul of B * S tiny [N, C] matrices
    pairs = {(i, j): (y[i] * y[j]).sum(dim=-1) for i in range(n) for j in range(i, n)}
    gram = torch.stack([torch.stack([pairs[min(i, j), max(i, j)] for j in range(n)])
                        for i in range(n)])
    norm = torch.diagonal(gram, dim1=0, dim2=1).movedim(-1, 0).clamp_min(0).sqrt()
    denom = norm[:, None] * norm[None, :]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    corr = torch.where(denom > 0, gram / safe, torch.zeros_like(gram))

    t = var if opt.use_variance else std
    # [N, B, 1]; a non-finite site stays confined to its own output
    total = torch.where(torch.isfinite(t), t, 0.0).sum(dim=2, keepdim=True)
    if opt.batch_normalizer:
        total = total.sum(dim=1, keepdim=True)
    return GroupStats(x=x, present=present, t=t, std=std, corr=corr, total=total, like=f0)


def group_finish(st: GroupStats, total: torch.Tensor, opt: FuseOptions, return_info: bool):
    """Decisions and outputs of one group from its statistics and its (complete) ``total``."""
    x, present, t, std = st.x, st.present, st.t, st.std
    n, b = x.shape[0], x.shape[1]
    f0, cd = st.like, opt.channel_dim
    acc = x.dtype
    finite = torch.isfinite(t)
    a = torch.where(total > 0, t / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    a = torch.where(present, a, -1.0)
    a = torch.where(present & ~finite, -1.5, a)
    winner = torch.argmax(a, dim=0)  # [B, S], first index among equal maxima

    idx = torch.arange(n, device=f0.device)[:, None, None]
    is_winner = idx == winner
    corr_w = torch.gather(st.corr, 1, winner.expand(n, b, -1)[:, None])[:, 0]  # [N, B, S]
    # a removed input is never a member: where every input is removed the group is empty
    members = (is_winner | (corr_w > opt.threshold)) & present

    m = members.to(acc)
    out = (m[..., None] * x).sum(dim=0) / m.sum(dim=0).clamp_min(1)[..., None]
    poison = (present & ~finite).any(dim=0)[..., None]  # [B, S, 1]
    out = torch.where(poison, torch.nan, out)
    if opt.unmerge:
        wf = is_winner.to(acc)
        x_w = (wf[..., None] * x).sum(dim=0)
        s_w = (wf * std).sum(dim=0)
        factor = torch.where(s_w > 0, std / torch.where(s_w > 0, s_w, torch.ones_like(s_w)), 1.0)
        factor = torch.where(present, factor, 0.0)
        g = torch.where(members[..., None], out, factor[..., None] * x_w)
        g = torch.where(poison, torch.nan, g)
        results = [_restore(gi, f0, cd) for gi in g]
    else:
        results = [_restore(out, f0, cd)]
    if not return_info:
        return results, None, None
    site_shape = f0.movedim(cd, 1).shape[2:]
    return results, winner.reshape(b, *site_shape), members.reshape(n, b, *site_shape)


def _empty_result(feats, opt, return_info):
    f0 = feats[0]
    n = len(feats)
    moved = f0.movedim(opt.channel_dim, 1).shape
    outs = [torch.empty_like(f0) for _ in range(n if opt.unmerge else 1)]
    if not return_info:
        return outs, None, None
    return (outs, f0.new_empty((moved[0], *moved[2:]), dtype=torch.int64),
            f0.new_empty((n, moved[0], *moved[2:]), dtype=torch.bool))


def fuse_torch_groups(groups: list[list[torch.Tensor]], opts: list[FuseOptions],
                      return_info: bool, masks=None,
                      reduce_totals: Callable[[torch.Tensor], None] | None = None):
    """Fuse every group. ``reduce_totals`` (sharded sites: a sum over the ranks of a process
    group) is applied once, in place, to the local normalisers of all groups in one flat
    tensor laid out as the Triton path's (per group ``rows x N``, rows = B or 1 for the batch
    normaliser; zeros for a group without sites here; ``maxfusion_kernels.distributed``)."""
    stats = [group_stats(grp, o, masks[k] if masks is not None else None)
             for k, (grp, o) in enumerate(zip(groups, opts))]
    totals = [None if st is None else st.total for st in stats]
    if reduce_totals is not None:
        totals = _reduced(groups, opts, stats, reduce_totals)
    results = []
    for grp, o, st, total in zip(groups, opts, stats, totals):
        results.append(_empty_result(grp, o, return_info) if st is None
                       else group_finish(st, total, o, return_info))
    return results


def _reduced(groups, opts, stats, reduce_totals):
    """Every group's ``[N, rows, 1]`` totals after ``reduce_totals`` of their flat
    ``rows x N`` concatenation (None for groups without sites)."""
    n = len(groups[0])
    f0 = groups[0][0]
    acc = torch.float64 if f0.dtype == torch.float64 else torch.float32
    parts = []
    for grp, o, st in zip(groups, opts, stats):
        if st is not None:
            parts.append(st.total.reshape(n, -1).t().reshape(-1))
        else:  # no site on this rank: zeros, so the ranks' collectives match
            rows = 1 if o.batch_normalizer else grp[0].shape[0]
            parts.append(torch.zeros(rows * n, dtype=acc, device=f0.device))
    flat = torch.cat(parts)
    if flat.numel():
        reduce_totals(flat)
    out, off = [], 0
    for st, part in zip(stats, parts):
        count = part.numel()
        if st is not None:
            rows = count // n
            out.append(flat[off:off + count].view(rows, n).t().reshape(st.total.shape))
        else:
            out.append(None)
        off += count
    return out


def fuse_torch(
    feats: list[torch.Tensor], opt: FuseOptions, return_info: bool,
    masks: list[torch.Tensor | None] | None = None,
    reduce_totals: Callable[[torch.Tensor], None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Fuse checked ``feats`` with resolved ``opt``.

    ``masks``: None, or N entries from :func:`maxfusion_kernels.options.check_masks` (each
    ``None`` or a ``[Bm, *sites]`` view with values in [0, 1]): per-site weights applied
    after ``opt.weights``, ``(f * alpha) * m``; a 0 removes the input at that site. A mask of
    ones multiplies by exactly 1, so it gives bitwise the result of no mask.

    Returns ``(outputs, winner, members)``: one output (merge) or N (unmerge), each shaped and
    laid out like ``feats[0]`` in its dtype; ``winner`` ``[B, *sites]`` int64 and ``members``
    ``[N, B, *sites]`` bool when ``return_info`` (else ``None``). ``reduce_totals``: as for
    :func:`fuse_torch_groups` (sharded sites).
    """
    return fuse_torch_groups([feats], [opt], return_info,
                             None if masks is None else [masks], reduce_totals)[0]


def _restore(y: torch.Tensor, like: torch.Tensor, cd: int) -> torch.Tensor:
    """``[B, S, C]`` back to the shape, layout and dtype of ``like``."""
    out = torch.empty_like(like)
    out.copy_(y.reshape(like.movedim(cd, -1).shape).movedim(-1, cd))
    return out
