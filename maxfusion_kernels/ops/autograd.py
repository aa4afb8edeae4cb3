"""The gradient of ``torch.ops.maxfusion.max_fuse`` and ``max_fuse_many``.

One formula for every backend (docs/algorithm.md, "The gradient"): the decisions (removed
inputs, winner, group) are held fixed, so merge is a weighted mean of the members and
unmerge's non-member streams ``(s_i / s_w) f_w`` are differentiated through ``f_w`` (directly
and through ``s_w``) and through ``s_i``. ``setup_context`` saves the inputs (by reference),
the masks and the per-site decisions the forward returned; the backward here is vectorised
torch (it runs on any device, traces under ``torch.compile`` and fake tensors) and is used
after the torch path and after the Triton kernels alike.
"""

from __future__ import annotations

import torch

from ..options import FuseOptions
from . import fuse_many as _fuse_many  # noqa: F401  (defines maxfusion::max_fuse_many)
from .backward import triton_backward
from .fuse import options_from_flags

# ----------------------------------------------------------------------------------------
# the formula, one group
# ----------------------------------------------------------------------------------------


def group_backward(feats: list[torch.Tensor], grads: list[torch.Tensor | None],
                   winner: torch.Tensor, members: torch.Tensor, opt: FuseOptions,
                   masks: list[torch.Tensor | None] | None, want_masks: list[bool]):
    """``(feature grads, mask grads)`` of one group with its decisions fixed.

    ``feats``: the N inputs; ``grads``: the gradients of its outputs (1 for merge, N for
    unmerge; None for an unused output); ``winner`` ``B * S`` and ``members`` ``N * B * S``,
    flat as the op returns them; ``masks``: None or N entries (None or ``[Bm, *sites]``);
    ``want_masks``: per input, whether its mask needs a gradient. Mask grads are None where
    not wanted.
    """
    n = len(feats)
    f0 = feats[0]
    cd = opt.channel_dim % f0.dim()
    acc = torch.float64 if f0.dtype == torch.float64 else torch.float32
    b, c = f0.shape[0], f0.shape[cd]
    mask_grads: list[torch.Tensor | None] = [None] * n
    if f0.numel() == 0 or all(g is None for g in grads):
        fg = [torch.zeros_like(f) for f in feats]
        if masks is not None:
            mask_grads = [torch.zeros_like(m) if (m is not None and want) else None
                          for m, want in zip(masks, want_masks)]
        return fg, mask_grads

    # Everything is computed in the features' own layout (no channels-last copies): a per-site
    # quantity has the features' shape with one channel, and sums over the channels keep it.
    site = list(f0.shape)
    site[cd] = 1

    def per_site(t: torch.Tensor, lead: int) -> torch.Tensor:  # flat (lead, sites) values
        return t.reshape([lead] + site[1:])

    def csum(t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim=cd, keepdim=True)

    weights = opt.weights if opt.weights is not None else (1.0,) * n
    # per input: k_i = alpha_i * m_i (a Python number without a mask, else [1 or B, site]),
    # present_i (k_i != 0), the fused input as the forward saw it (removed values zeroed, inf
    # and NaN included), its centred values and standard deviation over the channels
    k, present, xs, cen, std = [], [], [], [], []
    poison = None  # [B, site]: a NaN output, constant there
    for i, f in enumerate(feats):
        w = float(weights[i])
        m = masks[i] if masks is not None else None
        xf = f.to(acc)
        if m is None:
            ki, pi = w, w != 0
            xi = xf * w if w not in (0.0, 1.0) else (xf if w else torch.zeros_like(xf))
        else:
            ki = per_site(m.to(acc), m.shape[0]) * w
            pi = ki != 0
            xi = torch.where(pi, xf * ki, 0.0)
        ci = xi - xi.mean(dim=cd, keepdim=True)
        vi = csum(ci * ci) / (c - 1)
        bad = ~torch.isfinite(vi) if pi is not False else None
        if bad is not None:
            bad = bad & pi if isinstance(pi, torch.Tensor) else bad
            poison = bad if poison is None else poison | bad
        k.append(ki)
        present.append(pi)
        if opt.unmerge:  # merge needs the statistics only for the non-finite sites
            xs.append(xi)
            cen.append(ci)
            std.append(vi.sqrt())
    if poison is None:
        poison = torch.zeros(site, dtype=torch.bool, device=f0.device)

    mem = members.reshape(n, -1)
    memb = [per_site(mem[i], b) for i in range(n)]  # [B, site] bool each
    memf = [mb.to(acc) for mb in memb]
    inv_count = 1.0 / sum(memf).clamp_min(1)  # [B, site]
    if opt.unmerge:
        gs = [None if g is None else g.to(acc) for g in grads]
        g_out = sum(mf * g for mf, g in zip(memf, gs) if g is not None)  # members' streams
        if not isinstance(g_out, torch.Tensor):
            g_out = torch.zeros(f0.shape, dtype=acc, device=f0.device)
    else:
        g_out = grads[0].to(acc)
    dx = [mf * inv_count * g_out for mf in memf]  # merge: the weighted mean of the members

    if opt.unmerge:
        wsite = per_site(winner, b)
        is_w = [wsite == i for i in range(n)]
        x_w, c_w, s_w = xs[0], cen[0], std[0]
        for i in range(1, n):
            x_w = torch.where(is_w[i], xs[i], x_w)
            c_w = torch.where(is_w[i], cen[i], c_w)
            s_w = torch.where(is_w[i], std[i], s_w)
        pos = s_w > 0
        s_w1 = torch.where(pos, s_w, 1.0)
        direct = None  # sum over present non-members of r_i gamma_i (their streams r_i x_w)
        through_sw = torch.zeros_like(s_w)
        for i in range(n):
            if gs[i] is None:
                continue
            outside = (present[i] & ~memb[i]).to(acc)
            r = torch.where(pos, std[i] / s_w1, 1.0)
            d = csum(gs[i] * x_w)  # <gamma_i, x_w>
            rw = outside * r
            direct = rw * gs[i] if direct is None else direct + rw * gs[i]
            through_sw = through_sw + rw * d
            has_s = std[i] > 0
            std1 = torch.where(has_s, std[i], 1.0)
            through_si = torch.where(has_s & pos, outside * d / ((c - 1) * std1 * s_w1), 0.0)
            dx[i] = dx[i] + through_si * cen[i]
        if direct is not None:
            through_sw = torch.where(pos, through_sw / ((c - 1) * s_w1 * s_w1), 0.0)
            to_winner = direct - through_sw * c_w
            for i in range(n):
                dx[i] = dx[i] + torch.where(is_w[i], to_winner, 0.0)

    fg = []
    for i, f in enumerate(feats):
        keep = ~poison & present[i] if present[i] is not True else ~poison
        if present[i] is False:
            dx[i] = torch.zeros_like(dx[i])
        else:
            dx[i] = torch.where(keep, dx[i], 0.0)
        gi = dx[i] * k[i] if not (isinstance(k[i], float) and k[i] == 1.0) else dx[i]
        fg.append(gi.to(f.dtype))
        m = masks[i] if masks is not None else None
        if m is None or not want_masks[i]:
            continue
        # 0 where removed (the raw input may be inf there)
        gm = torch.where(keep, float(weights[i]) * csum(f.to(acc) * dx[i]), 0.0)  # [B, site]
        if m.shape[0] != b:
            gm = gm.sum(dim=0, keepdim=True)
        mask_grads[i] = gm.reshape(m.shape).to(m.dtype)
    return fg, mask_grads


# ----------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------


def _save(ctx, features, masks, winner, members, opt, use_triton, process_group, extra=()):
    ctx.opt = opt
    ctx.use_triton = use_triton
    ctx.process_group = process_group
    ctx.extra = extra
    ctx.n_feats = len(features)
    ctx.mask_slots = [m is not None for m in masks]
    ctx.want_masks = [m is not None and m.requires_grad for m in masks]
    ctx.save_for_backward(*features, *[m for m in masks if m is not None], winner, members)


def _restore(ctx):
    saved = ctx.saved_tensors
    feats = list(saved[:ctx.n_feats])
    rest = list(saved[ctx.n_feats:-2])
    masks = [rest.pop(0) if slot else None for slot in ctx.mask_slots]
    return feats, masks, saved[-2], saved[-1]


def _flags(opt: FuseOptions, n: int):
    return (opt.threshold, opt.unmerge, opt.pearson, opt.use_variance, opt.batch_normalizer,
            list(opt.weights) if opt.weights is not None else [1.0] * n)


def _setup_one(ctx, inputs, output):
    (features, threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
     channel_dim, _return_info, use_triton, masks, process_group) = inputs
    opt = options_from_flags(threshold, unmerge, pearson, use_variance, batch_normalizer,
                             weights, channel_dim)
    _, winner, members = output
    _save(ctx, features, masks, winner, members, opt, use_triton, process_group)


def _decisions_one(ctx, feats, masks, winner, members):
    """The saved decisions, or (an op called with ``return_info=False`` directly) the
    decisions recomputed by the forward op."""
    n_sites = feats[0].numel() // feats[0].shape[ctx.opt.channel_dim % feats[0].dim()] \
        if feats[0].numel() else 0
    if winner.numel() == n_sites:
        return winner, members
    opt = ctx.opt
    with torch.no_grad():
        _, winner, members = torch.ops.maxfusion.max_fuse(
            feats, *_flags(opt, len(feats)), opt.channel_dim, True, ctx.use_triton,
            masks if any(ctx.mask_slots) else [], ctx.process_group)
    return winner, members


def use_triton_backward(ctx, feats) -> bool:
    """The Triton backward kernels serve a call whose forward ran on them, for float16,
    bfloat16 and float32 inputs, with no mask requiring grad; the rest (float64, whose
    forward statistics are float32 on the kernels anyway; mask gradients; fake tensors while
    tracing) takes the vectorised torch formula."""
    f0 = feats[0]
    return (ctx.use_triton and f0.dtype != torch.float64 and not any(ctx.want_masks)
            and type(f0) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


def _backward_one(ctx, grad_outs, _grad_winner, _grad_members):
    feats, masks, winner, members = _restore(ctx)
    winner, members = _decisions_one(ctx, feats, masks, winner, members)
    if use_triton_backward(ctx, feats):
        fg = triton_backward([feats], [list(grad_outs)], winner, members, ctx.opt,
                             [masks] if any(ctx.mask_slots) else None)[0]
        return (fg, None, None, None, None, None, None, None, None, None,
                _mask_grads(ctx, [None] * len(ctx.mask_slots)), None)
    fg, mg = group_backward(feats, list(grad_outs), winner, members, ctx.opt,
                            masks if any(ctx.mask_slots) else None, ctx.want_masks)
    return (fg, None, None, None, None, None, None, None, None, None, _mask_grads(ctx, mg),
            None)


def _mask_grads(ctx, grads):
    """The gradient of the op's ``masks`` argument: a list (one entry per mask) when every
    entry is a tensor; a list with a None entry is not a list of tensors to autograd (no
    gradient flows through it: the public functions fill the None entries with ones when a
    mask requires grad), so its gradient is None."""
    if all(ctx.mask_slots):  # also the empty list
        return list(grads) if ctx.mask_slots else []
    return None


def _setup_many(ctx, inputs, output):
    (features, n_inputs, threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
     channel_dim, _return_info, use_triton, masks, process_group) = inputs
    opt = options_from_flags(threshold, unmerge, pearson, use_variance, batch_normalizer,
                             weights, channel_dim)
    _, winners, members = output
    _save(ctx, features, masks, winners, members, opt, use_triton, process_group,
          extra=(n_inputs,))


def _backward_many(ctx, grad_outs, _grad_winners, _grad_members):
    feats, masks, winners, members = _restore(ctx)
    (n,) = ctx.extra
    opt = ctx.opt
    counts = [f.numel() // f.shape[opt.channel_dim % f.dim()] if f.numel() else 0
              for f in feats[::n]]
    if winners.numel() != sum(counts):
        with torch.no_grad():
            _, winners, members = torch.ops.maxfusion.max_fuse_many(
                feats, n, *_flags(opt, n), opt.channel_dim, True, ctx.use_triton,
                masks if any(ctx.mask_slots) else [], ctx.process_group)
    n_out = n if opt.unmerge else 1
    grad_outs = list(grad_outs)
    if use_triton_backward(ctx, feats):
        groups = [feats[k * n:(k + 1) * n] for k in range(len(counts))]
        gmasks = None
        if any(ctx.mask_slots):
            gmasks = [masks[k * n:(k + 1) * n] for k in range(len(counts))]
        res = triton_backward(groups, [grad_outs[k * n_out:(k + 1) * n_out]
                                       for k in range(len(counts))],
                              winners, members, opt, gmasks)
        return ([g for grp in res for g in grp], None, None, None, None, None, None, None,
                None, None, None, _mask_grads(ctx, [None] * len(ctx.mask_slots)), None)
    fg_all: list = []
    mg_all: list = []
    off = 0
    for k, count in enumerate(counts):
        grp = feats[k * n:(k + 1) * n]
        gmasks = masks[k * n:(k + 1) * n] if any(ctx.mask_slots) else None
        if gmasks is not None and all(m is None for m in gmasks):
            gmasks = None
        want = ctx.want_masks[k * n:(k + 1) * n] if any(ctx.mask_slots) else [False] * n
        fg, mg = group_backward(grp, grad_outs[k * n_out:(k + 1) * n_out],
                                winners[off:off + count], members[n * off:n * (off + count)],
                                opt, gmasks, want)
        fg_all.extend(fg)
        mg_all.extend(mg)
        off += count
    return (fg_all, None, None, None, None, None, None, None, None, None, None,
            _mask_grads(ctx, mg_all), None)


torch.library.register_autograd("maxfusion::max_fuse", _backward_one, setup_context=_setup_one)
torch.library.register_autograd("maxfusion::max_fuse_many", _backward_many,
                                setup_context=_setup_many)
