"""The vectorised PyTorch path: MaxFusion on any device without Triton.

This is the CPU implementation of the registered op (so ``torch.compile`` works without a GPU)
and the ``backend="torch"`` choice of :func:`maxfusion_kernels.max_fuse`. Statistics are
computed in float32 (float64 for float64 inputs). It has no data-dependent control flow, so it
traces into a single graph.
"""

from __future__ import annotations

import torch

from .options import FuseOptions


def fuse_torch(
    feats: list[torch.Tensor], opt: FuseOptions, return_info: bool,
    masks: list[torch.Tensor | None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Fuse checked ``feats`` with resolved ``opt``.

    ``masks``: None, or N entries from :func:`maxfusion_kernels.options.check_masks` (each
    ``None`` or a ``[Bm, *sites]`` view with values in [0, 1]): per-site weights applied
    after ``opt.weights``, ``(f * alpha) * m``; a 0 removes the input at that site. A mask of
    ones multiplies by exactly 1, so it gives bitwise the result of no mask.

    Returns ``(outputs, winner, members)``: one output (merge) or N (unmerge), each shaped and
    laid out like ``feats[0]`` in its dtype; ``winner`` ``[B, *sites]`` int64 and ``members``
    ``[N, B, *sites]`` bool when ``return_info`` (else ``None``).
    """
    n = len(feats)
    f0 = feats[0]
    cd = opt.channel_dim
    acc = torch.float64 if f0.dtype == torch.float64 else torch.float32
    moved_shape = f0.movedim(cd, 1).shape  # [B, C, *sites]
    b, c = moved_shape[0], moved_shape[1]
    site_shape = moved_shape[2:]
    weights = opt.weights if opt.weights is not None else (1.0,) * n
    present = torch.tensor([wi != 0 for wi in weights], device=f0.device)[:, None, None]

    n_sites = 1
    for size in site_shape:
        n_sites *= size
    if b * n_sites == 0:  # nothing to fuse
        outs = [torch.empty_like(f0) for _ in range(n if opt.unmerge else 1)]
        if not return_info:
            return outs, None, None
        return (outs, f0.new_empty((b, *site_shape), dtype=torch.int64),
                f0.new_empty((n, b, *site_shape), dtype=torch.bool))
    # [N, B, S, C] in the accumulation dtype, the weights applied first: channels last, so
    # the channel reductions and the Gram matrix are contiguous batched products
    x = torch.stack([f.movedim(cd, -1).reshape(b, n_sites, c).to(acc) for f in feats])
    if opt.weights is not None:  # a weight of 0 zeroes its input, inf and NaN included
        wt = torch.tensor(weights, dtype=acc, device=f0.device)[:, None, None, None]
        x = torch.where(wt == 0, 0, x * wt)
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

    # --- per-site statistics -------------------------------------------------------------
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

    # --- normalised saliency and the winner ----------------------------------------------
    t = var if opt.use_variance else std
    finite = torch.isfinite(t)
    # [N, B, 1]; a non-finite site stays confined to its own output
    total = torch.where(finite, t, 0.0).sum(dim=2, keepdim=True)
    if opt.batch_normalizer:
        total = total.sum(dim=1, keepdim=True)
    a = torch.where(total > 0, t / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    a = torch.where(present, a, -1.0)
    a = torch.where(present & ~finite, -1.5, a)
    winner = torch.argmax(a, dim=0)  # [B, S], first index among equal maxima

    idx = torch.arange(n, device=f0.device)[:, None, None]
    is_winner = idx == winner
    corr_w = torch.gather(corr, 1, winner.expand(n, b, -1)[:, None])[:, 0]  # [N, B, S]
    # a removed input is never a member: where every input is removed the group is empty
    members = (is_winner | (corr_w > opt.threshold)) & present

    # --- the fused output ------------------------------------------------------------------
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
    return (
        results,
        winner.reshape(b, *site_shape),
        members.reshape(n, b, *site_shape),
    )


def _restore(y: torch.Tensor, like: torch.Tensor, cd: int) -> torch.Tensor:
    """``[B, S, C]`` back to the shape, layout and dtype of ``like``."""
    out = torch.empty_like(like)
    out.copy_(y.reshape(like.movedim(cd, -1).shape).movedim(-1, cd))
    return out
