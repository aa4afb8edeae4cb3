"""Shared test helpers: one tolerance table, and comparison with the float64 reference that
excludes only the sites within a stated margin of a tie."""

from __future__ import annotations

import torch

from maxfusion_kernels import reference

# Per input dtype: the kernels compute in float32 and round the output once to the input
# dtype, so the tolerance is about one unit of rounding of that dtype (plus float32 sums).
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=1.5e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=8e-3),
}

# A decision is a near-tie, and its site excluded from comparison, when the correlation of an
# input with the winner is within CORR_MARGIN of the threshold, or when the runner-up's
# normalised saliency is within SALIENCY_MARGIN (relative) of the winner's.
CORR_MARGIN = 1e-4
SALIENCY_MARGIN = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 mask: torch.Tensor | None = None, what: str = "output") -> None:
    """Compare ``actual`` with a float64 ``expected`` with the tolerance of ``dtype``.

    ``mask`` (broadcastable to the tensors) selects the elements compared. On failure, the
    message lists how many elements differ and the first few positions. The comparison is of
    absolute differences, never a signed max.
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    tol = TOLERANCES[dtype]
    bad = ~((a - e).abs() <= tol["atol"] + tol["rtol"] * e.abs())
    bad |= ~torch.isfinite(a)
    if mask is not None:
        bad &= mask.to("cpu").expand_as(bad)
    n_bad = int(bad.sum())
    if n_bad:
        where = bad.nonzero()[:5].tolist()
        pairs = [(tuple(p), float(a[tuple(p)]), float(e[tuple(p)])) for p in where]
        raise AssertionError(
            f"{what}: {n_bad} of {bad.numel()} elements differ beyond {tol} "
            f"(index, got, expected): {pairs}"
        )


def tie_sites(features, info_ref, *, threshold: float = 0.7, **options) -> torch.Tensor:
    """``[B, *sites]`` bool: sites whose decision is within the margins of a tie."""
    stats = reference.site_statistics(features, threshold=threshold, **options)
    a, corr = stats.saliency, stats.corr
    w = info_ref.winner
    n = a.shape[0]
    a_w = torch.gather(a, 0, w[None])[0]
    others = torch.where(torch.arange(n).view(n, *[1] * w.dim()) == w, -torch.inf, a)
    runner_up = others.max(dim=0).values
    near_saliency = (a_w - runner_up) <= SALIENCY_MARGIN * a_w.abs() + 1e-12
    corr_w = torch.gather(corr, 1, w.expand(n, *w.shape)[:, None])[:, 0]  # [N, B, *sites]
    not_w = torch.arange(n).view(n, *[1] * w.dim()) != w
    # an input removed at a site (weight or mask 0) never joins a group there
    near_corr = ((corr_w - threshold).abs() < CORR_MARGIN) & not_w & stats.present
    return near_saliency | near_corr.any(dim=0)


def check_fusion(features, *, backend: str, max_excluded: float = 0.05, **options) -> int:
    """Run ``max_fuse`` and compare result and decisions with the float64 reference.

    Returns the number of near-tie sites excluded; asserts it is at most ``max_excluded`` of
    all sites, so a test cannot pass by excluding everything.
    """
    import maxfusion_kernels as mk

    result, info = mk.max_fuse(features, return_info=True, backend=backend, **options)
    return compare_with_reference(features, result, info, max_excluded=max_excluded, **options)


def compare_with_reference(features, result, info, *, max_excluded: float = 0.05,
                           **options) -> int:
    """Compare one fusion's ``result`` and ``info`` with the float64 reference (see
    ``check_fusion``); returns the number of near-tie sites excluded."""
    threshold = options.get("threshold", 0.7)
    unmerge = options.get("unmerge", False)
    channel_dim = options.get("channel_dim", 1) % features[0].dim()
    ref, info_ref = reference.max_fuse(features, return_info=True, **options)
    opts = {k: v for k, v in options.items() if k not in ("threshold",)}
    ties = tie_sites(features, info_ref, threshold=threshold, **opts).cpu()
    keep = ~ties
    n_excluded = int(ties.sum())
    assert n_excluded <= max_excluded * ties.numel(), (
        f"{n_excluded} of {ties.numel()} sites are near-ties: the test input is degenerate"
    )
    assert info.winner.shape == info_ref.winner.shape and info.winner.dtype == torch.int64
    assert info.members.shape == info_ref.members.shape and info.members.dtype == torch.bool
    w_got, w_ref = info.winner.cpu(), info_ref.winner.cpu()
    assert torch.equal(w_got[keep], w_ref[keep]), (
        f"winner differs at {int((w_got != w_ref)[keep].sum())} non-tie sites"
    )
    m_got, m_ref = info.members.cpu(), info_ref.members.cpu()
    assert torch.equal(m_got[:, keep], m_ref[:, keep]), "group membership differs at non-tie sites"
    site_mask = keep.unsqueeze(channel_dim)
    dtype = features[0].dtype
    outs = result if unmerge else [result]
    refs = ref if unmerge else [ref]
    assert len(outs) == len(refs)
    for k, (o, r) in enumerate(zip(outs, refs)):
        assert o.dtype == dtype and o.shape == features[0].shape and o.device == features[0].device
        assert_close(o, r, dtype, mask=site_mask, what=f"output {k}")
    return n_excluded


def make_features(shape, n: int, *, dtype=torch.float32, channel_dim: int = 1, seed: int = 0,
                  device="cpu") -> list[torch.Tensor]:
    """N inputs that agree at about half of the sites (a shared vector, scaled) and disagree
    elsewhere (independent vectors with per-site scales, so different inputs win at different
    sites): both the average and the winner branch occur."""
    g = torch.Generator().manual_seed(seed)
    cd = channel_dim % len(shape)
    site_shape = [1 if d == cd else s for d, s in enumerate(shape)]
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    agree = torch.rand(site_shape, generator=g, dtype=torch.float64) < 0.5
    feats = []
    for k in range(n):
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        scale = 0.2 + 2.0 * torch.rand(site_shape, generator=g, dtype=torch.float64)
        f = torch.where(agree, base * (1.0 + 0.3 * k) + 0.05 * noise, noise * scale)
        feats.append(f.to(dtype).to(device))
    return feats


MASK_KINDS = ("soft", "hard", "mixed")


def make_masks(shape, n: int, *, kind: str = "soft", channel_dim: int = 1, seed: int = 0,
               batch_one: bool = False, device="cpu", keep_one: bool = True
               ) -> list[torch.Tensor]:
    """N float32 masks ``[B or 1, *sites]`` for features of ``shape``.

    ``kind``: ``"soft"`` uniform in (0, 1]; ``"hard"`` 0 or 1 (about 40 % zeros); ``"mixed"``
    soft with about 30 % exact zeros. ``keep_one``: at a site where every mask would be 0, one
    input (chosen at random) gets 1, so no site is removed for every input (sites removed for
    all inputs are exact ties, decided by convention; tests/test_masks.py checks them).
    """
    g = torch.Generator().manual_seed(seed)
    cd = channel_dim % len(shape)
    sites = [s for d, s in enumerate(shape) if d not in (0, cd)]
    m_shape = (1 if batch_one else shape[0], *sites)
    soft = 1.0 - torch.rand((n, *m_shape), generator=g)  # (0, 1]
    if kind == "soft":
        m = soft
    elif kind == "hard":
        m = (torch.rand((n, *m_shape), generator=g) >= 0.4).float()
    elif kind == "mixed":
        m = torch.where(torch.rand((n, *m_shape), generator=g) < 0.3, 0.0, soft)
    else:
        raise ValueError(kind)
    if keep_one:
        dead = (m == 0).all(dim=0)
        pick = torch.randint(0, n, m_shape, generator=g)
        for i in range(n):
            m[i] = torch.where(dead & (pick == i), 1.0, m[i])
    return [mi.to(device) for mi in m]
