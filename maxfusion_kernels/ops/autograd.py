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
    moved = f0.movedim(cd, -1).shape  # [B, *sites, C]
    b, c = moved[0], moved[-1]
    s = f0.numel() // max(b * c, 1) if b * c else 0
    mask_grads: list[torch.Tensor | None] = [None] * n
    if f0.numel() == 0 or all(g is None for g in grads):
        fg = [torch.zeros_like(f) for f in feats]
        if masks is not None:
            mask_grads = [torch.zeros_like(m) if (m is not None and want) else None
                          for m, want in zip(masks, want_masks)]
        return fg, mask_grads

    def flat(t: torch.Tensor) -> torch.Tensor:  # [B, S, C] in the accumulation dtype
        return t.movedim(cd, -1).reshape(b, s, c).to(acc)

    x = torch.stack([flat(f) for f in feats])  # [N, B, S, C] the raw inputs
    weights = opt.weights if opt.weights is not None else (1.0,) * n
    scale = []  # per input: alpha_i * m_i, [1 or B, S] (or a Python number)
    for i in range(n):
        m = masks[i] if masks is not None else None
        if m is None:
            scale.append(torch.full((1, 1), float(weights[i]), dtype=acc, device=f0.device))
        else:
            mi = m.reshape(m.shape[0], s).to(acc)
            scale.append(mi * weights[i])
    k = torch.stack([sc.expand(b, s) for sc in scale])  # [N, B, S]
    present = k != 0
    # the fused inputs as the forward saw them: removed inputs zeroed, inf and NaN included
    xs = torch.where(present[..., None], x * k[..., None], 0.0)
    cen = xs - xs.mean(dim=-1, keepdim=True)
    var = (cen * cen).sum(dim=-1) / (c - 1)  # [N, B, S]
    std = var.sqrt()
    poison = (present & ~torch.isfinite(var)).any(dim=0)  # [B, S]: a NaN output, constant

    mem = members.reshape(n, b, s)
    memf = mem.to(acc)
    count = memf.sum(dim=0).clamp_min(1)  # [B, S]
    if opt.unmerge:
        zeros = None
        gs = []
        for g in grads:
            if g is None:
                zeros = torch.zeros((b, s, c), dtype=acc, device=f0.device) if zeros is None else zeros
                gs.append(zeros)
            else:
                gs.append(flat(g))
        gstack = torch.stack(gs)  # [N, B, S, C]
        g_out = (memf[..., None] * gstack).sum(dim=0)  # the members' streams are all `out`
    else:
        g_out = flat(grads[0])
    dx = memf[..., None] * (g_out / count[..., None])[None]  # [N, B, S, C]

    if opt.unmerge:
        w = winner.reshape(b, s)
        idx = torch.arange(n, device=f0.device)[:, None, None]
        is_w = (idx == w).to(acc)  # [N, B, S]
        x_w = (is_w[..., None] * xs).sum(dim=0)  # [B, S, C]
        c_w = (is_w[..., None] * cen).sum(dim=0)
        s_w = (is_w * std).sum(dim=0)  # [B, S]
        pos = s_w > 0
        s_w1 = torch.where(pos, s_w, 1.0)
        r = torch.where(pos, std / s_w1, 1.0)  # [N, B, S], the unmerge factors
        outside = (present & ~mem).to(acc)  # present non-members: streams r_i x_w
        d = (gstack * x_w[None]).sum(dim=-1)  # [N, B, S] <gamma_i, x_w>
        rw = outside * r
        direct = (rw[..., None] * gstack).sum(dim=0)  # [B, S, C]
        through_sw = torch.where(pos, (rw * d).sum(dim=0) / ((c - 1) * s_w1 * s_w1), 0.0)
        dx = dx + is_w[..., None] * (direct - through_sw[..., None] * c_w)[None]
        has_s = std > 0
        std1 = torch.where(has_s, std, 1.0)
        through_si = torch.where(has_s & pos[None], outside * d / ((c - 1) * std1 * s_w1[None]),
                                 0.0)
        dx = dx + through_si[..., None] * cen
    keep = (present & ~poison[None])[..., None]  # [N, B, S, 1]
    dx = torch.where(keep, dx, 0.0)

    fg = []
    for i, f in enumerate(feats):
        gi = (k[i][..., None] * dx[i]).reshape(moved).movedim(-1, cd).to(f.dtype)
        fg.append(gi)
    if masks is not None:
        for i, m in enumerate(masks):
            if m is None or not want_masks[i]:
                continue
            gm = torch.where(keep[i, ..., 0], float(weights[i]) * (x[i] * dx[i]).sum(dim=-1),
                             0.0)  # [B, S]; 0 where removed (x may be inf there)
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
