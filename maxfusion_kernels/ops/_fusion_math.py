"""The per-tile math shared by the MaxFusion kernels (``fuse.py``: one group of N tensors;
``fuse_many.py``: many groups in one launch), and the tile-size helper.

Each ``@triton.jit`` helper works on one block of ``BLOCK_S`` sites of one sample, with the N
inputs as rows of an ``[NP, ...]`` tile (``NP`` = N rounded up to a power of two; rows >= N are
masked). The kernels only decide which tensors and which sites a program owns.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

GRAM_BUDGET = 4096  # NP*NP*BLOCK_C*BLOCK_S: fp32 Gram products live per program and chunk
TILE_BUDGET = 2048  # NP*BLOCK_C*BLOCK_S for the passes without a Gram matrix


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def pick_tiles(n_pad: int, channels: int, sites: int, channel_contiguous: bool,
               budget: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)`` for ``n_pad`` (power of two) inputs.

    The contiguous axis gets the long side of the tile (coalesced loads); the other side fills
    the register budget. Both are powers of two, no larger than the extent they cover.
    """
    long_side = 128 if n_pad <= 2 else 64 if n_pad <= 4 else 32
    if channel_contiguous:
        bc = min(next_pow2(channels), long_side)
        bs = max(1, min(next_pow2(sites), budget // (n_pad * bc)))
    else:
        bs = min(next_pow2(sites), long_side)
        bc = max(1, min(next_pow2(channels), budget // (n_pad * bs)))
    return bc, bs


def pass_tiles(n_pad: int, channels: int, sites: int, channel_contiguous: bool):
    """Tiles of pass 1 (with the Gram matrix) and pass 2: ``((bc1, bs1), (bc2, bs2))``."""
    return (pick_tiles(n_pad, channels, sites, channel_contiguous, GRAM_BUDGET // n_pad),
            pick_tiles(n_pad, channels, sites, channel_contiguous, TILE_BUDGET))


if HAS_TRITON:
    EARLY_MARK = tl.constexpr(1 << 30)  # pair-mask bit: site already written by pass 1

    @triton.jit
    def pick(i, v0, v1, v2, v3, v4, v5, v6, v7, N: tl.constexpr):
        """Per element of index tensor ``i``: ``v_i`` (pointer or scalar); ``v0`` beyond N."""
        r = tl.where(i == 0, v0, v0)
        if N > 1:
            r = tl.where(i == 1, v1, r)
        if N > 2:
            r = tl.where(i == 2, v2, r)
        if N > 3:
            r = tl.where(i == 3, v3, r)
        if N > 4:
            r = tl.where(i == 4, v4, r)
        if N > 5:
            r = tl.where(i == 5, v5, r)
        if N > 6:
            r = tl.where(i == 6, v6, r)
        if N > 7:
            r = tl.where(i == 7, v7, r)
        return r

    @triton.jit
    def site_offsets(s, inner, stride_outer, stride_inner, TWO_RUNS: tl.constexpr):
        """Element offsets (int64) of flat site indices ``s``."""
        s = s.to(tl.int64)
        if TWO_RUNS:
            return (s // inner) * stride_outer + (s % inner) * stride_inner
        else:
            return s * stride_outer

    @triton.jit
    def is_finite(x):
        """Not NaN and not infinite (``inf - inf`` and ``nan - nan`` are NaN)."""
        return (x - x) == 0.0

    @triton.jit
    def poisoned(t, present):
        """``[BLOCK_S]``: sites where a present input's statistic is not finite (a NaN or an
        infinity in its vector, or a float32 overflow): their outputs are NaN."""
        return tl.max((present[:, None] & ~is_finite(t)).to(tl.int32), axis=0) > 0

    @triton.jit
    def block_partial(t, m2):
        """Per row, the block's sum of ``t`` over the finite sites (a non-finite site stays
        confined to its own output and does not touch the normaliser)."""
        return tl.sum(tl.where(m2 & is_finite(t), t, 0.0), axis=1)

    @triton.jit
    def pair_bit(lo, hi, N: tl.constexpr):
        """Bit index of the pair ``lo < hi`` in the packed upper triangle (< 28 for N <= 8)."""
        return lo * N - (lo * (lo + 1)) // 2 + (hi - lo - 1)

    @triton.jit
    def site_stats(x_base, stride_xc, x_site, s_ok, i_ok, w, present, C, threshold,
                   N: tl.constexpr, NP: tl.constexpr, PEARSON: tl.constexpr,
                   USE_VARIANCE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """One read of the tile's N vectors: ``(t, bits)``.

        ``t`` ``[NP, BLOCK_S]``: the saliency statistic (std or variance over the channels).
        ``bits`` ``[BLOCK_S]`` int32: bit ``pair_bit(i, j)`` set for present pairs correlated
        above ``threshold``, and ``EARLY_MARK`` where every present pair is.
        """
        cc = tl.arange(0, BLOCK_C)
        # shift by each vector's first channel: the sums below stay well conditioned
        m2 = i_ok[:, None] & s_ok[None, :]
        k = tl.load(x_base[:, None] + x_site[None, :], mask=m2, other=0.0).to(tl.float32)
        k = k * w[:, None]
        acc_a = tl.zeros((NP, BLOCK_S), tl.float32)  # sum of shifted values
        acc_q = tl.zeros((NP, BLOCK_S), tl.float32)  # sum of squared shifted values
        gram = tl.zeros((NP, NP, BLOCK_S), tl.float32)  # shifted (pearson) or raw (cosine)
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + cc
            m3 = i_ok[:, None, None] & (ch < C)[None, :, None] & s_ok[None, None, :]
            ptr = (x_base[:, None, None] + ch.to(tl.int64)[None, :, None] * stride_xc
                   + x_site[None, None, :])
            x = tl.load(ptr, mask=m3, other=0.0).to(tl.float32) * w[:, None, None]
            xs = tl.where(m3, x - k[:, None, :], 0.0)
            acc_a += tl.sum(xs, axis=1)
            acc_q += tl.sum(xs * xs, axis=1)
            y = xs if PEARSON else x
            gram += tl.sum(y[:, None, :, :] * y[None, :, :, :], axis=2)

        # clamp rounding below 0, but keep a NaN (a non-finite input): it poisons the site
        var = tl.maximum(acc_q - acc_a * acc_a / C, 0.0, propagate_nan=tl.PropagateNan.ALL)
        var = var / (C - 1)
        t = var if USE_VARIANCE else tl.sqrt(var)
        i = tl.arange(0, NP)
        ii = i[:, None, None]
        jj = i[None, :, None]
        if PEARSON:
            gram = gram - acc_a[:, None, :] * acc_a[None, :, :] / C
        sq = tl.maximum(tl.sum(tl.where(ii == jj, gram, 0.0), axis=1), 0.0)  # [NP, BS]
        nrm = tl.sqrt(sq)
        denom = nrm[:, None, :] * nrm[None, :, :]
        corr = tl.where(denom > 0.0, gram / tl.where(denom > 0.0, denom, 1.0), 0.0)

        pair = (ii < jj) & present[:, None, None] & present[None, :, None]
        hit = pair & (corr > threshold)
        bit = pair_bit(ii, jj, N)
        bits = tl.sum(tl.sum(tl.where(hit, (bit * 0 + 1) << bit, 0), axis=1), axis=0)
        # every present pair correlated: the group is all present inputs, whoever wins
        early = (tl.min(tl.min(tl.where(pair & ~hit, 0, 1), axis=1), axis=0) == 1) & s_ok
        bits = bits | tl.where(early, EARLY_MARK, 0)
        return t, bits

    @triton.jit
    def normaliser(part_ptr, b_lo, b_hi, n_blocks, i_ok, N: tl.constexpr, NP: tl.constexpr,
                   BLOCK_P: tl.constexpr):
        """``T_i`` ``[NP]``: the block partials of samples ``b_lo .. b_hi - 1`` summed in a
        fixed order, so every program computes bitwise the same value (no atomics)."""
        i = tl.arange(0, NP)
        pp = tl.arange(0, BLOCK_P)
        acc = tl.zeros((NP, BLOCK_P), tl.float32)
        for bb in range(b_lo, b_hi):
            for p0 in range(0, n_blocks, BLOCK_P):
                p = p0 + pp
                ptr = part_ptr + (bb * N + i[:, None]) * n_blocks + p[None, :]
                acc += tl.load(ptr, mask=i_ok[:, None] & (p < n_blocks)[None, :], other=0.0)
        return tl.sum(acc, axis=1)

    @triton.jit
    def decide(t, total, bits, present, i_ok, N: tl.constexpr, NP: tl.constexpr):
        """Winner ``[BLOCK_S]`` (first maximum of ``t / total``) and group ``[NP, BLOCK_S]``."""
        i = tl.arange(0, NP)
        a = tl.where(total[:, None] > 0.0, t / tl.where(total > 0.0, total, 1.0)[:, None], 0.0)
        a = tl.where(present[:, None], a, -1.0)  # a removed input loses to any present one
        a = tl.where(present[:, None] & ~is_finite(t), -1.5, a)  # so does a non-finite one
        a = tl.where(i_ok[:, None], a, -2.0)
        best = tl.max(a, axis=0)
        win = tl.min(tl.where(a == best[None, :], i[:, None], NP), axis=0)
        lo = tl.minimum(i[:, None], win[None, :])
        hi = tl.maximum(i[:, None], win[None, :])
        is_win = i[:, None] == win[None, :]
        correlated = ((bits[None, :] >> tl.maximum(pair_bit(lo, hi, N), 0)) & 1) == 1
        # pairs with a removed input carry no bit
        member = is_win | (~is_win & correlated & i_ok[:, None])
        return win, member

    @triton.jit
    def write_sites(x_base, stride_xc, x_site, o_base, o_one, stride_oc, o_site, sel, member,
                    factor, win, poison, w, i_ok, C, UNMERGE: tl.constexpr, F64: tl.constexpr,
                    NP: tl.constexpr, BLOCK_C: tl.constexpr):
        """Write the outputs of the sites ``sel`` ``[BLOCK_S]``: the mean of the ``member``
        rows (merge, to ``o_one``), or per row the mean for members and ``factor`` times the
        winner's vector for the others (unmerge, to ``o_base``); NaN at ``poison`` sites.
        Only members are read."""
        i = tl.arange(0, NP)
        cc = tl.arange(0, BLOCK_C)
        count = tl.sum(member.to(tl.float32), axis=0)
        count = tl.maximum(count, 1.0)
        is_win = i[:, None] == win[None, :]
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + cc
            c_ok = (ch < C)[:, None] & sel[None, :]
            m3 = member[:, None, :] & c_ok[None, :, :]
            ptr = (x_base[:, None, None] + ch.to(tl.int64)[None, :, None] * stride_xc
                   + x_site[None, None, :])
            if F64:
                x = tl.load(ptr, mask=m3, other=0.0).to(tl.float64) * w.to(tl.float64)[:, None, None]
            else:
                x = tl.load(ptr, mask=m3, other=0.0).to(tl.float32) * w[:, None, None]
            out = tl.sum(x, axis=0) / count[None, :]
            out = tl.where(poison[None, :], float("nan"), out)
            o_off = ch.to(tl.int64)[:, None] * stride_oc + o_site[None, :]
            if UNMERGE:
                x_w = tl.sum(tl.where(is_win[:, None, :], x, 0.0), axis=0)
                g = tl.where(member[:, None, :], out[None, :, :],
                             factor[:, None, :] * x_w[None, :, :])
                g = tl.where(poison[None, None, :], float("nan"), g)
                tl.store(o_base[:, None, None] + o_off[None, :, :],
                         g.to(o_one.dtype.element_ty),
                         mask=i_ok[:, None, None] & c_ok[None, :, :])
            else:
                tl.store(o_one + o_off, out.to(o_one.dtype.element_ty), mask=c_ok)

    @triton.jit
    def unmerge_factor(t, win, present, USE_VARIANCE: tl.constexpr, NP: tl.constexpr):
        """``s_i / s_w`` per row and site (1 where ``s_w = 0``; 0 for a removed input)."""
        i = tl.arange(0, NP)
        sd = tl.sqrt(t) if USE_VARIANCE else t
        sd_w = tl.sum(tl.where(i[:, None] == win[None, :], sd, 0.0), axis=0)
        factor = tl.where(sd_w[None, :] > 0.0, sd / tl.where(sd_w > 0.0, sd_w, 1.0)[None, :], 1.0)
        return tl.where(present[:, None], factor, 0.0)
