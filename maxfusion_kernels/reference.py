"""The executable specification: every formula of docs/spec.md in plain PyTorch.

Short and readable on purpose; it is what the tests and benchmarks compare against. It computes
in ``dtype`` (float64 by default) and returns tensors of that dtype. It is not fast and stacks
the inputs into one temporary; use :func:`maxfusion_kernels.max_fuse` for real work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .options import FuseInfo, check_features, check_masks, resolve_options


def max_fuse(
    features: Sequence[torch.Tensor],
    *,
    threshold: float = 0.7,
    unmerge: bool = False,
    preset: str = "paper",
    correlation: str | None = None,
    saliency: str | None = None,
    normalize: str | None = None,
    weights: Sequence[float] | None = None,
    channel_dim: int = 1,
    masks: Sequence[torch.Tensor | None] | None = None,
    return_info: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """MaxFusion of N same-shape feature tensors, written straight from docs/spec.md.

    Same arguments and results as :func:`maxfusion_kernels.max_fuse`, except that everything is
    computed in ``dtype`` and the results have that dtype.
    """
    feats = check_features(features)
    opt = resolve_options(
        feats, threshold=threshold, unmerge=unmerge, preset=preset, correlation=correlation,
        saliency=saliency, normalize=normalize, weights=weights, channel_dim=channel_dim,
    )
    ms = None if masks is None else check_masks(masks, feats, opt.channel_dim)
    x, removed, stats = _prepare(feats, opt, dtype, ms)
    n = len(feats)
    std, corr, a = stats.std, stats.corr, stats.saliency
    # the first (smallest) index among the maxima; 0 where every input is removed
    winner = a.argmax(dim=0)

    idx = torch.arange(n, device=x.device).view(n, *[1] * winner.dim())
    is_winner = idx == winner
    corr_to_winner = torch.gather(corr, 1, winner.expand(n, *winner.shape)[:, None])[:, 0]
    # a removed input is never a member: where every input is removed the group is empty
    members = (is_winner | (corr_to_winner > opt.threshold)) & ~removed

    m = members.to(dtype)[..., None]
    out = (m * x).sum(dim=0) / m.sum(dim=0).clamp(min=1)  # 0 where the group is empty
    # a site where a present input's statistic is not finite gives NaN there, and only there
    poison = (~torch.isfinite(stats.var) & ~removed).any(dim=0)[..., None]
    out = torch.where(poison, torch.nan, out)

    if opt.unmerge:
        x_w = (is_winner.to(dtype)[..., None] * x).sum(dim=0)
        s_w = (is_winner.to(dtype) * std).sum(dim=0)
        factor = torch.where(s_w > 0, std / torch.where(s_w > 0, s_w, 1), 1.0)
        factor = torch.where(removed, 0.0, factor)  # a removed stream gets zeros
        g = torch.where(members[..., None], out, factor[..., None] * x_w)
        g = torch.where(poison, torch.nan, g)
        result = [gi.movedim(-1, opt.channel_dim) for gi in g]
    else:
        result = out.movedim(-1, opt.channel_dim)
    if return_info:
        return result, FuseInfo(winner=winner, members=members)
    return result


@dataclass
class SiteStatistics:
    """Per-site statistics of docs/spec.md, sites indexed ``[B, *sites]`` (channels reduced)."""

    var: torch.Tensor  # [N, B, *sites] unbiased variance over the channels
    std: torch.Tensor  # [N, B, *sites]
    corr: torch.Tensor  # [N, N, B, *sites] correlation of every pair (0 for a zero denominator)
    saliency: torch.Tensor  # [N, B, *sites] a_i = t_i / T_i; -1 for a removed input
    present: torch.Tensor  # [N, B, *sites] bool: not removed by a weight or a mask of 0


def site_statistics(features: Sequence[torch.Tensor], *, dtype=torch.float64, masks=None,
                    **options):
    """The per-site statistics :func:`max_fuse` decides from (same options), for tests that
    need to know how close a decision was to a tie."""
    feats = check_features(features)
    options.pop("unmerge", None)
    options.pop("return_info", None)
    opt = resolve_options(feats, **options)
    ms = None if masks is None else check_masks(masks, feats, opt.channel_dim)
    return _prepare(feats, opt, dtype, ms)[2]


def _prepare(feats, opt, dtype, masks=None):
    """Weighted (and masked) inputs ``[N, B, *sites, C]``, the removed sites ``[N, B,
    *sites]`` and the site statistics. ``masks``: checked ``[Bm, *sites]`` views or None."""
    n = len(feats)
    # channels last, so every statistic is a reduction over dim -1
    x = torch.stack([f.to(dtype).movedim(opt.channel_dim, -1) for f in feats])
    w = torch.tensor(opt.weights if opt.weights is not None else [1.0] * n, dtype=dtype)
    w = w.to(x.device).view(n, *[1] * (x.dim() - 2))
    # per input and site, the weight times the mask: f_i(p) <- alpha_i * m_i(p) * f_i(p)
    ones = torch.ones((1,) * (x.dim() - 2), dtype=dtype, device=x.device)
    m = torch.stack([ones.expand(x.shape[1:-1]) if mi is None
                     else mi.to(dtype).expand(x.shape[1:-1])
                     for mi in (masks if masks is not None else [None] * n)])
    removed = (w == 0) | (m == 0)  # [N, B, *sites]: input i is removed at these sites
    # applied before anything else; a removed input is zeroed, even where it is inf or NaN
    x = torch.where(removed[..., None], 0, x * w[..., None] * m[..., None])

    var = x.var(dim=-1, unbiased=True)  # [N, B, *sites]
    std = var.sqrt()

    y = x - x.mean(dim=-1, keepdim=True) if opt.pearson else x
    norm = y.norm(dim=-1)
    dot = torch.einsum("i...c,j...c->ij...", y, y)
    denom = norm[:, None] * norm[None, :]
    corr = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1), 0)

    t = var if opt.use_variance else std
    finite = torch.isfinite(t)
    t_sum = torch.where(finite, t, 0)  # a non-finite site does not touch the normaliser
    site_dims = tuple(range(2, t.dim()))
    # per sample: [N, B, 1, ..] (with no site dim, a sample's total is its one site)
    total = t_sum.sum(dim=site_dims, keepdim=True) if site_dims else t_sum
    if opt.batch_normalizer:
        total = total.sum(dim=1, keepdim=True)  # over the whole batch
    a = torch.where(total > 0, t / torch.where(total > 0, total, 1), 0)
    a = torch.where(removed, -1.0, a)  # a removed input never wins over a present one
    a = torch.where(~removed & ~finite, -1.5, a)  # nor does a non-finite one
    return x, removed, SiteStatistics(var=var, std=std, corr=corr, saliency=a,
                                      present=~removed)


def fuse_with_decisions(
    features: Sequence[torch.Tensor],
    winner: torch.Tensor,
    members: torch.Tensor,
    *,
    unmerge: bool = False,
    weights: Sequence[float] | None = None,
    channel_dim: int = 1,
    masks: Sequence[torch.Tensor | None] | None = None,
    dtype: torch.dtype = torch.float64,
):
    """The fused outputs of docs/spec.md with the decisions given, not taken: ``winner``
    ``[B, *sites]`` and ``members`` ``[N, B, *sites]`` (e.g. a ``FuseInfo`` of a call on the
    same features). Plain differentiable torch in ``dtype``: autograd through it is the
    gradient of docs/algorithm.md ("The gradient"), decisions fixed, which the registered
    backward of :func:`maxfusion_kernels.max_fuse` must equal. A zero std passes no gradient
    (its derivative is taken as 0, not the NaN of ``sqrt`` at 0); a site whose present input
    is not finite is a constant NaN."""
    feats = check_features(features)
    opt = resolve_options(feats, weights=weights, channel_dim=channel_dim)
    ms = None if masks is None else check_masks(masks, feats, opt.channel_dim)
    x, removed, _ = _prepare(feats, opt, dtype, ms)
    n = len(feats)
    c = x.shape[-1]
    cen = x - x.mean(dim=-1, keepdim=True)
    var = (cen * cen).sum(dim=-1) / (c - 1)
    has_s = var > 0
    std = torch.where(has_s, torch.where(has_s, var, 1).sqrt(), 0)  # no NaN gradient at 0
    members = members.to(x.device)
    winner = winner.to(x.device)
    m = members.to(dtype)[..., None]
    out = (m * x).sum(dim=0) / m.sum(dim=0).clamp(min=1)
    poison = (~torch.isfinite(var.detach()) & ~removed).any(dim=0)[..., None]
    out = torch.where(poison, torch.nan, out)
    if not unmerge:
        return out.movedim(-1, opt.channel_dim)
    idx = torch.arange(n, device=x.device).view(n, *[1] * winner.dim())
    is_w = (idx == winner).to(dtype)
    x_w = (is_w[..., None] * x).sum(dim=0)
    s_w = (is_w * std).sum(dim=0)
    factor = torch.where(s_w > 0, std / torch.where(s_w > 0, s_w, 1), 1.0)
    factor = torch.where(removed, 0.0, factor)
    g = torch.where(members[..., None], out, factor[..., None] * x_w)
    g = torch.where(poison, torch.nan, g)
    return [gi.movedim(-1, opt.channel_dim) for gi in g]
