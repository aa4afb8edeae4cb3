"""The launcher of the backward kernels (``backward_kernels.py``): G groups of N tensors in
two launches, with the forward's plan (``plan.py``) made for twice the element size (a
program reads tiles of the inputs and of the output gradients), its per-group table and its
layouts (inputs read in place; the input gradients laid out like the forward's outputs), and
the forward's choice of the ``ALIGNED`` variant (``launch.is_aligned``, for the output
gradients too)."""

from __future__ import annotations

import torch

from ..options import FuseOptions
from . import plan as P
from .launch import (
    TABLES,
    _device_guard,
    _mask_entries,
    is_aligned,
    plan_for,
    prepare,
    vector_width,
)


def triton_backward(groups: list[list[torch.Tensor]], grads: list[list[torch.Tensor | None]],
                    winners: torch.Tensor, members: torch.Tensor, opt: FuseOptions,
                    masks=None) -> list[list[torch.Tensor]]:
    """The input gradients of every group (N each, shaped like the features) from the output
    gradients ``grads`` (per group 1 or N, None for an unused output) and the decisions of
    the forward (flat, as the op returns them). ``masks``: per group None or N checked masks
    (constants here: their gradient is the torch path's)."""
    from . import backward_kernels as BK

    n = len(groups[0])
    prep = prepare(groups, n, opt.channel_dim)  # outputs: the N gradient buffers per group
    f0 = groups[0][0]
    dev = f0.device
    gs_all = []
    for (_, outs, _), gl in zip(prep.groups, grads):
        like = outs[0]
        gg = []
        for gi in gl:
            if gi is None:
                gi = torch.zeros_like(like)
            elif gi.stride() != like.stride() or gi.dtype != like.dtype:
                gi = torch.empty_like(like).copy_(gi)  # e.g. the expanded ones of a .sum()
            gg.append(gi)
        gs_all.append(gg)
    has_masks = masks is not None and any(
        m is not None and any(x is not None for x in m) for m in masks)
    sizes = [(lay.batch, lay.sites) for _, _, lay in prep.groups]
    mask_rows_, mask_strides = _mask_entries(masks, sizes, n) if has_masks else (None, None)
    elem = f0.element_size()
    plan, kind, aligned, active = plan_for(prep, n, elem, opt.batch_normalizer, mask_strides,
                                           tile_bytes=2 * elem)
    # 16-byte vectors: shapes and strides allow them; now the pointers of the inputs, the
    # output gradients and the input gradients (the outputs)
    aligned = aligned and all(
        is_aligned(kind, prep.groups[k][2], [*prep.groups[k][0], *prep.groups[k][1], *gs_all[k]],
                   elem) for k in active)
    results = [list(outs) for _, outs, _ in prep.groups]
    if not active:
        return results
    table = TABLES.get(plan.table(), dev)
    bw = 3 * n if opt.unmerge else 2 * n
    part = torch.empty((max(plan.n_part1 // plan.statw * bw, 1),), dtype=torch.float32,
                       device=dev)
    xs = tuple(f for k in active for f in prep.groups[k][0])
    gs = tuple(g for k in active for g in gs_all[k])
    ds = tuple(o for k in active for o in prep.groups[k][1])
    if has_masks:
        ms = tuple(m if m is not None else part
                   for k in active for m in mask_rows_[k * n:(k + 1) * n])
    else:
        ms = (part,)
    weights = opt.weights if opt.weights is not None else (1.0,) * n
    w_args = {f"w{i}": (weights[i] if i < n else 1.0) for i in range(8)}
    consts = dict(G=len(active), GP=P.next_pow2(len(active)), N=n, NP=plan.n_pad,
                  K=P.TABLE_COLS, STATW=plan.statw, BW=bw, LAYOUT=kind, ALIGNED=aligned,
                  VEC=vector_width(elem), HAS_MASKS=has_masks,
                  UNMERGE=opt.unmerge, BLOCK_C=plan.tiles.block_c,
                  BLOCK_S=plan.tiles.block_s)
    win = winners.contiguous()
    mem = members.contiguous().view(torch.uint8)
    grid = (plan.programs13,)
    with _device_guard(dev):
        BK.bwd_stats_kernel[grid](xs, gs, ms, table, win, part, **w_args, **consts,
                                  num_warps=P.NUM_WARPS)
        BK.bwd_write_kernel[grid](xs, gs, ds, ms, table, win, mem, part, **w_args, **consts,
                                  num_warps=P.NUM_WARPS)
    return results
