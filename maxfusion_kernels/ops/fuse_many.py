"""``max_fuse_many``: many MaxFusion groups (e.g. the 13 residuals of one ControlNet step) in
three kernel launches, whatever the number of groups.

Top to bottom: the registered op ``torch.ops.maxfusion.max_fuse_many`` and the public function.
The kernels and the launcher are ``max_fuse``'s (``kernels.py``, ``launch.py``): one 1-D grid
per pass covers every (group, sample, chunk, block of sites), each program finds its group in a
small table of per-group sizes and strides, and the inputs of all groups are passed as one
tuple of pointers (read in place, no stack).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..distributed import group_from_name, resolve_group, totals_reducer
from ..options import check_features, resolve_options
from ..torch_backend import fuse_torch_groups
from .fuse import (
    _check_masks,
    call_signature,
    choose_backend,
    eager_call,
    eager_mode,
    info_views,
    interpreter_enabled,
    needs_grad,
    op_masks,
    options_from_flags,
    weights_key,
)
from .launch import cached_call, fuse_cached, fuse_groups

# ----------------------------------------------------------------------------------------
# 1. registered op
# ----------------------------------------------------------------------------------------


def _split(items, n_inputs):
    return [list(items[k:k + n_inputs]) for k in range(0, len(items), n_inputs)]


def fuse_all(groups, opt, return_info, masks, use_triton, key=None, group=None):
    """``(outputs per group, winners, members)`` of every group by the chosen backend; the
    info flat, groups one after the other (``key``: the call's signature, to cache its plan;
    ``group``: the resolved process group of sharded sites, or None: one all-reduce of the
    normalisers of all groups)."""
    reduce = totals_reducer(group, groups, opt, use_triton) if group is not None else None
    if use_triton:
        return fuse_groups(groups, opt, return_info, masks, key=key, reduce_totals=reduce)
    opts = [replace(opt, channel_dim=opt.channel_dim % grp[0].dim()) for grp in groups]
    fused = fuse_torch_groups(groups, opts, return_info, masks, reduce)
    outs = [res for res, _, _ in fused]
    if not return_info:
        return outs, None, None
    return (outs, torch.cat([w.reshape(-1) for _, w, _ in fused]),
            torch.cat([m.reshape(-1) for _, _, m in fused]))


def _op_masks(masks, n_groups, n):
    if len(masks) == 0 or all(m is None for m in masks):
        return None
    per_group = _split(list(masks), n)
    return [None if all(m is None for m in grp) else grp for grp in per_group][:n_groups]


def _flat_results(outs, winners, members, like):
    flat = [o for out in outs for o in out]
    if winners is None or members is None:
        winners = like.new_empty((0,), dtype=torch.int64)
        members = like.new_empty((0,), dtype=torch.bool)
    return flat, winners, members


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
    masks: list[torch.Tensor | None],
    process_group: str,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``torch.ops.maxfusion.max_fuse_many``: ``features`` holds the groups one after the
    other, ``n_inputs`` tensors each (``masks``: empty, or one entry per feature). Returns the
    flat list of outputs (1 or N per group), and the winners and members of all groups in two
    flat tensors (groups one after the other: ``B * S`` winners and ``N * B * S`` members
    each; empty unless ``return_info``). ``process_group``: a group name, as for
    ``max_fuse`` (one all-reduce for all groups). An opaque op, like ``max_fuse``."""
    groups = _split(features, n_inputs)
    opt = options_from_flags(threshold, unmerge, pearson, use_variance, batch_normalizer,
                             weights, channel_dim)
    res = fuse_all(groups, opt, return_info, _op_masks(masks, len(groups), n_inputs),
                   use_triton, group=group_from_name(process_group))
    return _flat_results(*res, features[0])


@_max_fuse_many_op.register_fake
def _(features, n_inputs, threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
      channel_dim, return_info, use_triton, masks, process_group):
    groups = _split(features, n_inputs)
    opt = options_from_flags(threshold, unmerge, pearson, use_variance, batch_normalizer,
                             weights, channel_dim)
    return _flat_results(*fuse_groups(groups, opt, return_info, launch=False), features[0])


# ----------------------------------------------------------------------------------------
# 2. public function
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
    masks: Sequence[Sequence[torch.Tensor | None] | None] | None = None,
    channel_dim: int = 1,
    return_info: bool = False,
    backend: str = "auto",
    process_group=None,
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
        masks: None, or G entries, each None or N masks as for ``max_fuse`` (per group, since
            the groups' sites differ).
        return_info: also return a list of :class:`FuseInfo`, one per group.
        process_group: sharded sites, as for ``max_fuse``: every group's sites are split
            over the ranks; the normalisers of all groups are summed by ONE all-reduce per
            call (``4 * N * B`` bytes per group for the sample normaliser, ``4 * N`` for the
            batch one). A group may have no site on some rank (uneven shards).

    Returns:
        A list with one result per group (a tensor, or a list of N with ``unmerge``), and with
        ``return_info`` ``(results, infos)``. Each group has its own normaliser, and its result
        is bitwise that of ``max_fuse`` of the group alone.

    With the Triton backend all groups are fused in three kernel launches whatever G is.
    """
    key = None
    group = resolve_group(process_group) if process_group is not None else None
    grad = needs_grad(groups if isinstance(groups, (list, tuple)) else [], masks)
    if eager_mode() and not grad:  # a call whose signature was seen: no validation, no plan
        options = ("many", threshold, unmerge, preset, correlation, saliency, normalize,
                   weights_key(weights), channel_dim, return_info, backend,
                   interpreter_enabled(), None if group is None else group.group_name)
        key = call_signature(groups, masks, options)
        cp = cached_call(key) if key is not None and len(groups) else None
        if cp is not None:
            groups = [list(g) for g in groups]
            ms = None
            if masks is not None:
                ms = [None if m is None else _check_masks(m, g, channel_dim % g[0].dim(),
                                                          what=f"masks[{k}]")
                      for k, (m, g) in enumerate(zip(masks, groups))]
            reduce = None if group is None else totals_reducer(group, groups, cp.opt, True)
            outs, winners, members = fuse_cached(cp, groups, ms, reduce_totals=reduce)
            return _results(groups, outs, winners, members, cp.opt.unmerge, return_info,
                            channel_dim)
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
    opt = replace(opts[0], channel_dim=channel_dim)  # normalised per group where used
    checked_masks = _check_group_masks(masks, checked, opts)
    use_triton = choose_backend(f0.device, backend) == "triton"
    flat = [f for grp in checked for f in grp]
    if eager_call(flat) and not grad:
        outs, winners, members = fuse_all(checked, opt, return_info, checked_masks, use_triton,
                                          key=key, group=group)
        return _results(checked, outs, winners, members, opt.unmerge, return_info, channel_dim)
    else:
        flat_masks = ([] if checked_masks is None else
                      [m for grp in checked_masks for m in (grp if grp is not None else [None] * n)])
        if grad and flat_masks and any(m is not None and m.requires_grad for m in flat_masks):
            # a list with a None is a constant to autograd: fill with ones views
            flat_masks = [m for k, grp in enumerate(checked)
                          for m in op_masks(flat_masks[k * n:(k + 1) * n], grp[0],
                                            channel_dim, "fill")]
        outs, winners, members = torch.ops.maxfusion.max_fuse_many(
            flat, n, opt.threshold, opt.unmerge, opt.pearson, opt.use_variance,
            opt.batch_normalizer, list(opt.weights) if opt.weights is not None else [1.0] * n,
            channel_dim, return_info or grad, use_triton, flat_masks,
            "" if group is None else group.group_name,
        )
    if not return_info:
        winners = members = None
    n_out = n if opt.unmerge else 1
    per_group = [list(outs[k * n_out:(k + 1) * n_out]) for k in range(len(checked))]
    return _results(checked, per_group, winners, members, opt.unmerge, return_info, channel_dim)


def _results(groups, outs, winners, members, unmerge, return_info, channel_dim):
    """The public results: per group the output (or N), and with ``return_info`` the
    per-group ``FuseInfo`` views of the flat info buffers (groups one after the other)."""
    results = [list(o) if unmerge else o[0] for o in outs]
    if not return_info:
        return results
    n = len(groups[0])
    infos, off = [], 0
    for grp in groups:
        like = grp[0]
        cd = channel_dim % like.dim()
        count = like.numel() // like.shape[cd]
        infos.append(info_views(winners[off:off + count], members[n * off:n * (off + count)],
                                like, cd, n))
        off += count
    return results, infos


def _check_group_masks(masks, groups, opts):
    """``masks`` checked per group (messages name ``masks[k][i]``): one entry per group (None
    or N checked masks), or None when no mask is set at all."""
    if masks is None:
        return None
    if isinstance(masks, (torch.Tensor, str, bytes)) or not isinstance(masks, Sequence):
        raise TypeError("masks must be a list with one entry per group (None or a list of N "
                        f"masks), got {type(masks).__name__}")
    if len(masks) != len(groups):
        raise ValueError(f"masks has {len(masks)} entries but there are {len(groups)} groups "
                         "(one entry, None or N masks, per group)")
    checked = [None if ms is None else _check_masks(ms, grp, o.channel_dim, what=f"masks[{k}]")
               for k, (ms, grp, o) in enumerate(zip(masks, groups, opts))]
    return None if all(ms is None for ms in checked) else checked
