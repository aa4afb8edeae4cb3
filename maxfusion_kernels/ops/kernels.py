"""The three Triton kernels of a MaxFusion call, for G groups of N tensors at once.

One file (over 400 lines) because the three kernels share their ``@triton.jit`` per-tile helpers
and are checked against each other pass by pass.

Top to bottom: the per-tile helpers, pass 1 (``stats_kernel``), pass 2 (``combine_kernel``),
pass 3 (``write_kernel``). How the work is split is decided on the host (``plan.py``: tiles,
the 1-D grids and the per-group table read here by column); the passes and the bytes they move
are described in docs/design.md.

Conventions: a program's N inputs are the rows of an ``[NP, ...]`` tile (``NP`` = N rounded up
to a power of two; rows >= N are masked off). Every pointer offset is int64. No float atomics:
every sum has a fixed order set by the shape, so results are bitwise reproducible and do not
depend on the order in which the GPU runs the programs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import plan as P

C_START13 = tl.constexpr(P.COL_START13)
C_START2 = tl.constexpr(P.COL_START2)
C_B = tl.constexpr(P.COL_B)
C_C = tl.constexpr(P.COL_C)
C_S = tl.constexpr(P.COL_S)
C_INNER = tl.constexpr(P.COL_INNER)
C_NSB = tl.constexpr(P.COL_NSB)
C_NCH = tl.constexpr(P.COL_NCH)
C_CH = tl.constexpr(P.COL_CH)
C_NBLK2 = tl.constexpr(P.COL_NBLK2)
C_IN = tl.constexpr(P.COL_IN_STRIDES)
C_OUT = tl.constexpr(P.COL_OUT_STRIDES)
C_SITE_OFF = tl.constexpr(P.COL_SITE_OFF)
C_P1_OFF = tl.constexpr(P.COL_P1_OFF)
C_P2_OFF = tl.constexpr(P.COL_P2_OFF)
C_ROW_OFF = tl.constexpr(P.COL_ROW_OFF)
C_MASKS = tl.constexpr(P.COL_MASK_STRIDES)
L_SITES = tl.constexpr(P.SITES_CONTIG)
L_CHANNELS = tl.constexpr(P.CHANNELS_CONTIG)
L_GENERIC = tl.constexpr(P.GENERIC)


# ----------------------------------------------------------------------------------------
# per-tile helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _pick(i, v0, v1, v2, v3, v4, v5, v6, v7, N: tl.constexpr):
    """Per element of index tensor ``i``: the scalar ``v_i`` (``v0`` for rows >= N)."""
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
def _find_group(meta, pid, COL: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                K: tl.constexpr):
    """The group whose program range (first program in column ``COL``) holds ``pid``."""
    if G == 1:
        return pid * 0
    gg = tl.arange(0, GP).to(tl.int64)
    starts = tl.load(meta + gg * K + COL, mask=gg < G, other=pid + 1)
    return tl.sum((starts <= pid).to(tl.int64), axis=0) - 1


@triton.jit
def _rows(ptrs, g, i, N: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr):
    """``[NP]`` base pointers of group ``g``'s N tensors in the flat tuple ``ptrs`` (G * N
    entries); rows >= N get the group's first. ``ALIGNED``: every one is 16-byte aligned (the
    launcher checked), which lets the compiler vectorise the loads built on them."""
    base = tl.where(i == 0, ptrs[0], ptrs[0])
    for k in tl.static_range(G):
        for j in tl.static_range(N):
            if k * N + j > 0:
                base = tl.where((g == k) & (i == j), ptrs[k * N + j], base)
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    return base


@triton.jit
def _one(ptrs, g, STRIDE: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr):
    """Group ``g``'s first pointer in a flat tuple with ``STRIDE`` entries per group."""
    p = ptrs[0]
    for k in tl.static_range(1, G):
        p = tl.where(g == k, ptrs[k * STRIDE], p)
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _tile(meta, pid, G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr):
    """Pass 1 / pass 3 program ``pid``: ``(group, its table row, sample, chunk, site block)``;
    site blocks vary fastest, so neighbouring programs read neighbouring memory."""
    g = _find_group(meta, pid, C_START13, G, GP, K)
    row = meta + g * K
    local = pid - tl.load(row + C_START13)
    nsb = tl.load(row + C_NSB)
    nch = tl.load(row + C_NCH)
    sb = local % nsb
    rest = local // nsb
    return g, row, rest // nch, rest % nch, sb


@triton.jit
def _tile_extent(meta, pid, G: tl.constexpr, GP: tl.constexpr, K: tl.constexpr,
                 LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """``_tile``'s ``(group, row, sample, chunk, site block)`` and the group's sizes
    ``(C, S, CH, chunks, inner)`` from its table row (the prologue of passes 1 and 3 and of the
    backward's two kernels). With ``ALIGNED``, the extents of the contiguous axis are declared
    multiples of VEC, and only those (what ``launch.is_aligned`` and the plan guarantee): S with
    sites contiguous; C and CH (a multiple of BLOCK_C, itself one of VEC) with channels
    contiguous."""
    g, row, b, ch, sb = _tile(meta, pid, G, GP, K)
    C = tl.load(row + C_C)
    S = tl.load(row + C_S)
    CH = tl.load(row + C_CH)
    nch = tl.load(row + C_NCH)
    inner = tl.load(row + C_INNER)
    if ALIGNED:
        if LAYOUT == L_SITES:
            S = tl.multiple_of(S, VEC)
        else:
            CH = tl.multiple_of(CH, VEC)
            C = tl.multiple_of(C, VEC)
    return g, row, b, ch, sb, C, S, CH, nch, inner


@triton.jit
def _strides(row, COL: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
             VEC: tl.constexpr):
    """``(batch, channel, outer site, inner site)`` strides from the table; with ``ALIGNED``
    the ones that are not 1 are multiples of VEC elements (16 bytes)."""
    sb = tl.load(row + COL)
    sc = tl.load(row + COL + 1)
    s0 = tl.load(row + COL + 2)
    s1 = tl.load(row + COL + 3)
    if ALIGNED:
        sb = tl.multiple_of(sb, VEC)
        if LAYOUT == L_SITES:
            sc = tl.multiple_of(sc, VEC)
        else:
            s0 = tl.multiple_of(s0, VEC)
    return sb, sc, s0, s1


@triton.jit
def _site_offsets(s, inner, s0, s1, LAYOUT: tl.constexpr):
    """Element offsets (int64) of the flat site indices ``s`` (int64)."""
    if LAYOUT == L_SITES:
        return s
    elif LAYOUT == L_CHANNELS:
        return s * s0
    else:
        return (s // inner) * s0 + (s % inner) * s1


@triton.jit
def _channel_offsets(ch, sc, LAYOUT: tl.constexpr):
    if LAYOUT == L_CHANNELS:
        return ch
    else:
        return ch * sc


@triton.jit
def _scale(row, ms, g, b, s, s_ok, w, i, N: tl.constexpr, G: tl.constexpr,
           HAS_MASKS: tl.constexpr):
    """Per row and site, the factor the inputs are multiplied by first: ``w_i * m_i(s)``
    (``[NP, BLOCK_S]``; ``[NP, 1]``, the weights alone, without masks). A factor of 0 removes
    the input at that site."""
    if HAS_MASKS:
        i64 = i.to(tl.int64)
        mstride = tl.load(row + C_MASKS + i64, mask=i < N, other=-1)
        mbase = _rows(ms, g, i, N, G, False)
        ok = (mstride >= 0)[:, None] & s_ok[None, :]
        m = tl.load(mbase[:, None] + (b * mstride)[:, None] + s[None, :], mask=ok, other=1.0)
        return w[:, None] * m.to(tl.float32)
    else:
        return w[:, None]


@triton.jit
def _tile_rows(row, ms, g, b, sb, S, w0, w1, w2, w3, w4, w5, w6, w7, N: tl.constexpr,
               NP: tl.constexpr, G: tl.constexpr, HAS_MASKS: tl.constexpr,
               BLOCK_S: tl.constexpr):
    """A tile's rows and sites: ``(i, i < N, w_i, s, s < S, scale)`` (``_scale``), for the
    inputs ``i`` ``[NP]`` and the sites ``s`` ``[BLOCK_S]`` of site block ``sb``."""
    i = tl.arange(0, NP)
    i_ok = i < N
    w = _pick(i, w0, w1, w2, w3, w4, w5, w6, w7, N).to(tl.float32)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    scale = _scale(row, ms, g, b, s, s_ok, w, i, N, G, HAS_MASKS)
    return i, i_ok, w, s, s_ok, scale


@triton.jit
def _read_rows(use, s_ok, LAYOUT: tl.constexpr):
    """The ``[NP, BLOCK_S]`` load mask of a tile whose sites ``use`` needs: with sites
    contiguous, a row (input) wherever any of its sites needs it, so that the mask is constant
    along the sites and the loads stay 16-byte vectors (per 32-byte sector the saving is the
    same); otherwise per site."""
    if LAYOUT == L_SITES:
        return (tl.max(use.to(tl.int32), axis=1) > 0)[:, None] & s_ok[None, :]
    else:
        return use


@triton.jit
def _load_tile(x_base, x_site, stride_c, chn, c_hi, rows_sites, LAYOUT: tl.constexpr):
    """The ``[NP, BLOCK_C, BLOCK_S]`` tile of channels ``chn`` (0 past ``c_hi`` and where
    ``rows_sites`` ``[NP, BLOCK_S]`` is off), in the inputs' dtype."""
    ptr = (x_base[:, None, None] + _channel_offsets(chn, stride_c, LAYOUT)[None, :, None]
           + x_site[None, None, :])
    return tl.load(ptr, mask=rows_sites[:, None, :] & (chn < c_hi)[None, :, None], other=0.0)


@triton.jit
def _load_tile_flat(x_base, stride_c, c0, c_hi, site_flat, ok_flat, NP: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """``_load_tile`` of channels ``c0 ..`` for the variants whose loads are scalar (the generic
    layout; sites contiguous but not 16-byte aligned), addressed as one flat channel-major
    ``[NP, BLOCK_C * BLOCK_S]`` tile (``site_flat``, ``ok_flat``: per flat index ``c * BLOCK_S +
    s``, the site's offset and the rows that read it) and reshaped to ``[NP, BLOCK_C, BLOCK_S]``.
    A 3-D pointer tile of scalar loads has no contiguous axis, so the compiler's choice of which
    axis goes across the lanes is a tie that Triton versions break differently: 3.6 put the N
    rows and the channels across the lanes, each thread held 8 to 16 sites, each with a 64-bit
    address (255 registers in pass 3, spills on sm_100/120); flat, the lanes run along the
    tile's sites and channels whatever the version, and each thread keeps a few sites."""
    k = tl.arange(0, BLOCK_C * BLOCK_S)
    c = c0 + k // BLOCK_S
    ptr = x_base[:, None] + (c * stride_c + site_flat)[None, :]
    x = tl.load(ptr, mask=ok_flat & (c < c_hi)[None, :], other=0.0)
    return tl.reshape(x, (NP, BLOCK_C, BLOCK_S))


@triton.jit
def _is_finite(x):
    """Not NaN and not infinite (``inf - inf`` and ``nan - nan`` are NaN)."""
    return (x - x) == 0.0


@triton.jit
def _pair_bit(lo, hi, N: tl.constexpr):
    """Bit of the pair ``lo < hi`` in the packed upper triangle (< 28 for N <= 8)."""
    return lo * N - (lo * (lo + 1)) // 2 + (hi - lo - 1)


@triton.jit
def _stat_row(lo, hi, N: tl.constexpr):
    """Row of the co-moment ``(lo <= hi)`` among a site's chunk statistics (after the N
    means)."""
    return N + lo * N - (lo * (lo - 1)) // 2 + (hi - lo)


# ----------------------------------------------------------------------------------------
# pass 1: chunk statistics
# ----------------------------------------------------------------------------------------


@triton.jit
def stats_kernel(
    xs, ms, meta, part1, tickets,
    w0, w1, w2, w3, w4, w5, w6, w7,
    G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
    STATW: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    HAS_MASKS: tl.constexpr, BATCH_NORMALIZER: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One ``[N, CH, BLOCK_S]`` tile of the inputs (one chunk of channels of one block of
    sites of one sample): per site and input the chunk's mean, and per pair ``i <= j`` the
    centred co-moment ``sum_c (x_i - mean_i)(x_j - mean_j)``, of the weighted (and masked)
    inputs. Accumulated element-wise in float32 over the chunk, shifted by the chunk's first
    channel (a well-conditioned one-pass form), and reduced over the channels once at the end.
    """
    pid = tl.program_id(0).to(tl.int64)
    g, row, b, ch, sb, C, S, CH, nch, inner = _tile_extent(meta, pid, G, GP, K, LAYOUT, ALIGNED, VEC)
    stride_b, stride_c, stride_s0, stride_s1 = _strides(row, C_IN, LAYOUT, ALIGNED, VEC)

    # this sample's pass-2 ticket starts at zero (pass 2 runs after this launch)
    if (sb == 0) & (ch == 0):
        row_off = tl.load(row + C_ROW_OFF)
        if BATCH_NORMALIZER:
            if b == 0:
                tl.store(tickets + row_off, 0)
        else:
            tl.store(tickets + row_off + b, 0)

    i, i_ok, w, s, s_ok, scale = _tile_rows(row, ms, g, b, sb, S, w0, w1, w2, w3, w4, w5, w6,
                                            w7, N, NP, G, HAS_MASKS, BLOCK_S)
    on = i_ok & (w != 0.0)  # rows read at all (a weight of 0 removes the input everywhere)
    x_base = _rows(xs, g, i, N, G, ALIGNED) + b * stride_b
    x_site = _site_offsets(s, inner, stride_s0, stride_s1, LAYOUT)
    c_lo = ch * CH
    c_hi = tl.minimum(c_lo + CH, C)
    m2 = on[:, None] & s_ok[None, :]

    acc_a = tl.zeros((NP, BLOCK_C, BLOCK_S), tl.float32)
    acc_g = tl.zeros((NP, NP, BLOCK_C, BLOCK_S), tl.float32)
    cc = tl.arange(0, BLOCK_C)
    # software pipelining by hand: the next tile's loads are issued before this one is used
    FLAT: tl.constexpr = (LAYOUT == L_GENERIC) or ((LAYOUT == L_SITES) and (ALIGNED == 0))
    if FLAT:  # scalar loads: see _load_tile_flat
        s_flat = sb * BLOCK_S + tl.arange(0, BLOCK_C * BLOCK_S) % BLOCK_S
        site_flat = _site_offsets(s_flat, inner, stride_s0, stride_s1, LAYOUT)
        ok_flat = on[:, None] & (s_flat < S)[None, :]
        x_next = _load_tile_flat(x_base, stride_c, c_lo, c_hi, site_flat, ok_flat, NP, BLOCK_C,
                                 BLOCK_S)
    else:
        x_next = _load_tile(x_base, x_site, stride_c, c_lo + cc, c_hi, m2, LAYOUT)
    # the shift: each vector's value at the chunk's first channel, taken from the first tile
    # (a load of that one channel row would not be vectorised)
    k = tl.sum(tl.where((cc == 0)[None, :, None], x_next.to(tl.float32), 0.0), axis=1)
    k = tl.where(scale != 0.0, k * scale, 0.0)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        m3 = m2[:, None, :] & (c0 + cc < c_hi)[None, :, None]
        x = x_next.to(tl.float32)
        if FLAT:
            x_next = _load_tile_flat(x_base, stride_c, c0 + BLOCK_C, c_hi, site_flat, ok_flat, NP,
                                     BLOCK_C, BLOCK_S)
        else:
            x_next = _load_tile(x_base, x_site, stride_c, c0 + BLOCK_C + cc, c_hi, m2, LAYOUT)
        x = tl.where(scale[:, None, :] != 0.0, x * scale[:, None, :], 0.0)
        d = tl.where(m3, x - k[:, None, :], 0.0)
        acc_a += d
        acc_g += d[:, None, :, :] * d[None, :, :, :]

    n_c = (c_hi - c_lo).to(tl.float32)
    a = tl.sum(acc_a, axis=1)  # [NP, BS] sum of shifted values
    gm = tl.sum(acc_g, axis=2)  # [NP, NP, BS] shifted Gram matrix
    mean = k + a / n_c
    comoment = gm - a[:, None, :] * a[None, :, :] / n_c

    base = part1 + tl.load(row + C_P1_OFF) + (b * nch + ch) * STATW * S
    i64 = i.to(tl.int64)
    tl.store(base + i64[:, None] * S + s[None, :], mean, mask=i_ok[:, None] & s_ok[None, :])
    ii = i64[:, None, None]
    jj = i64[None, :, None]
    ptr = base + _stat_row(ii, jj, N) * S + s[None, None, :]
    tl.store(ptr, comoment, mask=(ii <= jj) & (jj < N) & s_ok[None, None, :])


# ----------------------------------------------------------------------------------------
# pass 2: per-site saliency and pair mask; the normalisers
# ----------------------------------------------------------------------------------------


@triton.jit
def combine_kernel(
    meta, part1, t_ptr, bits_ptr, part2, totals, tickets, threshold,
    G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
    STATW: tl.constexpr, PEARSON: tl.constexpr, USE_VARIANCE: tl.constexpr,
    BATCH_NORMALIZER: tl.constexpr, BLOCK_S2: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Merge the channel chunks of ``BLOCK_S2`` sites in chunk order (Chan et al.'s pairwise
    update of means and co-moments), then per site: the saliency ``t_i`` (std or variance),
    the correlations of every pair (cosine or Pearson) as a bit mask of the pairs above the
    threshold, and this block's sum of ``t_i``. The last program of a sample (or of the group,
    for the batch normaliser) to finish, found with an integer ticket, sums those partials in
    block order into ``T_i``: a single reduction, in a fixed order."""
    pid = tl.program_id(0).to(tl.int64)
    g = _find_group(meta, pid, C_START2, G, GP, K)
    row = meta + g * K
    nblk2 = tl.load(row + C_NBLK2)
    local = pid - tl.load(row + C_START2)
    blk = local % nblk2
    b = local // nblk2
    B = tl.load(row + C_B)
    C = tl.load(row + C_C)
    S = tl.load(row + C_S)
    CH = tl.load(row + C_CH)
    nch = tl.load(row + C_NCH)

    s = blk * BLOCK_S2 + tl.arange(0, BLOCK_S2)
    s_ok = s < S
    i = tl.arange(0, NP)
    i_ok = i < N
    i64 = i.to(tl.int64)
    ii = i64[:, None, None]
    jj = i64[None, :, None]
    srow = _stat_row(tl.minimum(ii, jj), tl.maximum(ii, jj), N)
    m2 = i_ok[:, None] & s_ok[None, :]
    m3 = (ii < N) & (jj < N) & s_ok[None, None, :]

    base = part1 + tl.load(row + C_P1_OFF) + b * nch * STATW * S
    mean = tl.load(base + i64[:, None] * S + s[None, :], mask=m2, other=0.0)
    comoment = tl.load(base + srow * S + s[None, None, :], mask=m3, other=0.0)
    n_a = tl.minimum(CH, C).to(tl.float32)
    # the next chunk's loads are issued before the current one is merged (by hand)
    more = (s * 0 + 1) < nch  # [BLOCK_S]: a chunk 1 exists
    next_mean = tl.load(base + STATW * S + i64[:, None] * S + s[None, :],
                        mask=m2 & more[None, :], other=0.0)
    next_com = tl.load(base + STATW * S + srow * S + s[None, None, :],
                       mask=m3 & more[None, None, :], other=0.0)
    for k in range(1, nch):
        mean_b = next_mean
        com_b = next_com
        base_k = base + (k + 1) * STATW * S
        more = (s * 0 + k + 1) < nch
        next_mean = tl.load(base_k + i64[:, None] * S + s[None, :], mask=m2 & more[None, :],
                            other=0.0)
        next_com = tl.load(base_k + srow * S + s[None, None, :], mask=m3 & more[None, None, :],
                           other=0.0)
        n_b = tl.minimum(CH, C - k * CH).to(tl.float32)
        n_ab = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n_ab)
        comoment = comoment + com_b + delta[:, None, :] * delta[None, :, :] * (n_a * n_b / n_ab)
        n_a = n_ab

    c_f = C.to(tl.float32)
    diag = ii == jj
    m2_ = tl.sum(tl.where(diag, comoment, 0.0), axis=1)  # [NP, BS]: sum_c (x - mean)^2
    # clamp rounding below 0, but keep a NaN (a non-finite input): it poisons the site
    var = tl.maximum(m2_, 0.0, propagate_nan=tl.PropagateNan.ALL) / (c_f - 1.0)
    t = var if USE_VARIANCE else tl.sqrt(var)
    if PEARSON:
        gram = comoment
    else:
        gram = comoment + c_f * mean[:, None, :] * mean[None, :, :]
    sq = tl.maximum(tl.sum(tl.where(diag, gram, 0.0), axis=1), 0.0)
    nrm = tl.sqrt(sq)
    denom = nrm[:, None, :] * nrm[None, :, :]
    corr = tl.where(denom > 0.0, gram / tl.where(denom > 0.0, denom, 1.0), 0.0)
    hit = (ii < jj) & m3 & (corr > threshold)
    bit = _pair_bit(ii, jj, N).to(tl.int32)
    bits = tl.sum(tl.sum(tl.where(hit, (bit * 0 + 1) << tl.maximum(bit, 0), 0), axis=1), axis=0)

    site_off = tl.load(row + C_SITE_OFF)
    tl.store(t_ptr + N * site_off + (b * N + i64)[:, None] * S + s[None, :], t, mask=m2)
    tl.store(bits_ptr + site_off + b * S + s, bits, mask=s_ok)

    # this block's share of the normaliser: non-finite sites stay confined to their output
    part = tl.sum(tl.where(m2 & _is_finite(t), t, 0.0), axis=1)  # [NP]
    if BATCH_NORMALIZER:
        r = b * 0
        n_parts = B * nblk2
        slot = b * nblk2 + blk
    else:
        r = b
        n_parts = nblk2
        slot = blk
    row_off = tl.load(row + C_ROW_OFF)
    part_base = part2 + tl.load(row + C_P2_OFF) + (r * N + i64) * n_parts
    tl.store(part_base + slot, part, mask=i_ok)
    # every thread's stores above are done before the ticket is drawn (release), and the
    # last program sees every other program's partials (acquire; loads bypass L1)
    tl.debug_barrier()
    ticket = tl.atomic_add(tickets + row_off + r, 1, sem="acq_rel", scope="gpu")
    if ticket == n_parts - 1:
        pp = tl.arange(0, BLOCK_P)
        acc = tl.zeros((NP, BLOCK_P), tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            p = p0 + pp
            ptr = part_base[:, None] + p[None, :]
            acc += tl.load(ptr, mask=i_ok[:, None] & (p < n_parts)[None, :], other=0.0,
                           cache_modifier=".cg")
        tl.store(totals + (row_off + r) * N + i64, tl.sum(acc, axis=1), mask=i_ok)


# ----------------------------------------------------------------------------------------
# pass 3: decisions and outputs
# ----------------------------------------------------------------------------------------


@triton.jit
def _decide(t, total, bits, present, i_ok, N: tl.constexpr, NP: tl.constexpr):
    """Winner ``[BLOCK_S]`` (first maximum of ``t / T``) and group ``[NP, BLOCK_S]`` (the
    winner and the present inputs correlated with it; none where every input is removed)."""
    i = tl.arange(0, NP)
    a = tl.where(total[:, None] > 0.0, t / tl.where(total > 0.0, total, 1.0)[:, None], 0.0)
    a = tl.where(present, a, -1.0)  # a removed input loses to any present one
    a = tl.where(present & ~_is_finite(t), -1.5, a)  # so does a non-finite one
    a = tl.where(i_ok[:, None], a, -2.0)
    best = tl.max(a, axis=0)
    win = tl.min(tl.where(a == best[None, :], i[:, None], NP), axis=0)
    lo = tl.minimum(i[:, None], win[None, :])
    hi = tl.maximum(i[:, None], win[None, :])
    is_win = i[:, None] == win[None, :]
    correlated = ((bits[None, :] >> tl.maximum(_pair_bit(lo, hi, N), 0)) & 1) == 1
    return win, present & (is_win | correlated)


@triton.jit
def write_kernel(
    xs, os, ms, meta, t_ptr, bits_ptr, totals, winner_ptr, members_ptr,
    w0, w1, w2, w3, w4, w5, w6, w7,
    G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
    N_OUT: tl.constexpr, K: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
    VEC: tl.constexpr, HAS_MASKS: tl.constexpr, USE_VARIANCE: tl.constexpr,
    UNMERGE: tl.constexpr, BATCH_NORMALIZER: tl.constexpr, INFO: tl.constexpr,
    F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Pass 1's tile again (programs walked in reverse, so the tiles pass 1 read last, most
    likely still in L2, come first): decide winner and group per site from ``t``, ``T`` and
    the pair mask, write the info (first chunk only), and write the outputs of the tile:
    merge, the group's mean; unmerge, per input the mean if it is in the group, else the
    winner's vector rescaled to its own std (0 for a removed input). With sites contiguous, a
    tile row (input) is read if any of its sites needs it (loads stay vectorised; per 32-byte
    sector the saving is the same); with channels contiguous, per site."""
    pid = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    g, row, b, ch, sb, C, S, CH, _, inner = _tile_extent(meta, pid, G, GP, K, LAYOUT, ALIGNED, VEC)
    stride_b, stride_c, stride_s0, stride_s1 = _strides(row, C_IN, LAYOUT, ALIGNED, VEC)
    ostride_b, ostride_c, ostride_s0, ostride_s1 = _strides(row, C_OUT, LAYOUT, ALIGNED, VEC)

    i, i_ok, w, s, s_ok, scale = _tile_rows(row, ms, g, b, sb, S, w0, w1, w2, w3, w4, w5, w6,
                                            w7, N, NP, G, HAS_MASKS, BLOCK_S)
    i64 = i.to(tl.int64)
    present = i_ok[:, None] & (scale != 0.0)

    row_off = tl.load(row + C_ROW_OFF)
    if BATCH_NORMALIZER:
        total = tl.load(totals + row_off * N + i64, mask=i_ok, other=0.0)
    else:
        total = tl.load(totals + (row_off + b) * N + i64, mask=i_ok, other=0.0)
    site_off = tl.load(row + C_SITE_OFF)
    m2 = i_ok[:, None] & s_ok[None, :]
    t = tl.load(t_ptr + N * site_off + (b * N + i64)[:, None] * S + s[None, :], mask=m2,
                other=0.0)
    bits = tl.load(bits_ptr + site_off + b * S + s, mask=s_ok, other=0)
    win, member = _decide(t, total, bits, present, i_ok, N, NP)
    member = member & s_ok[None, :]

    if INFO:
        if ch == 0:
            B = tl.load(row + C_B)
            tl.store(winner_ptr + site_off + b * S + s, win.to(tl.int64), mask=s_ok)
            m_ptr = members_ptr + N * site_off + (i64[:, None] * (B * S) + b * S + s[None, :])
            tl.store(m_ptr, member.to(tl.int8), mask=m2)

    # the unmerge factor s_i / s_w (1 where s_w = 0; 0 for a removed input), and poisoned
    # sites: a present input's statistic is not finite there, so its outputs are NaN
    sd = tl.sqrt(t) if USE_VARIANCE else t
    is_win = i[:, None] == win[None, :]
    sd_w = tl.sum(tl.where(is_win, sd, 0.0), axis=0)
    factor = tl.where(sd_w[None, :] > 0.0, sd / tl.where(sd_w > 0.0, sd_w, 1.0)[None, :], 1.0)
    factor = tl.where(present, factor, 0.0)
    poison = tl.max((present & ~_is_finite(t)).to(tl.int32), axis=0) > 0
    count = tl.maximum(tl.sum(member.to(tl.float32), axis=0), 1.0)
    # per site 1 / count, NaN where poisoned, so that the channel loop multiplies by one
    # per-site value (no division, no select by a second per-site mask: the loop keeps less
    # alive; under Triton 3.6 ptxas spilled loop-carried halves of the N = 2 merge on sm_80-89)
    if F64:
        inv_count = tl.where(poison, float("nan"), 1.0 / count.to(tl.float64))
    else:
        inv_count = tl.where(poison, float("nan"), 1.0 / count)

    need = _read_rows(member, s_ok, LAYOUT)
    x_base = _rows(xs, g, i, N, G, ALIGNED) + b * stride_b
    x_site = _site_offsets(s, inner, stride_s0, stride_s1, LAYOUT)
    o_site = _site_offsets(s, inner, ostride_s0, ostride_s1, LAYOUT)
    c_lo = ch * CH
    c_hi = tl.minimum(c_lo + CH, C)
    cc = tl.arange(0, BLOCK_C)
    FLAT: tl.constexpr = (LAYOUT == L_GENERIC) or ((LAYOUT == L_SITES) and (ALIGNED == 0))
    if FLAT:  # scalar loads: see _load_tile_flat
        s_flat = sb * BLOCK_S + tl.arange(0, BLOCK_C * BLOCK_S) % BLOCK_S
        site_flat = _site_offsets(s_flat, inner, stride_s0, stride_s1, LAYOUT)
        if LAYOUT == L_SITES:
            need_row = tl.max(member.to(tl.int32), axis=1) > 0  # as _read_rows
            ok_flat = need_row[:, None] & (s_flat < S)[None, :]
        else:
            ok_flat = tl.reshape(tl.broadcast_to(need[:, None, :], (NP, BLOCK_C, BLOCK_S)),
                                 (NP, BLOCK_C * BLOCK_S))
        x_next = _load_tile_flat(x_base, stride_c, c_lo, c_hi, site_flat, ok_flat, NP, BLOCK_C,
                                 BLOCK_S)
    else:
        x_next = _load_tile(x_base, x_site, stride_c, c_lo + cc, c_hi, need, LAYOUT)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        chn = c0 + cc
        c_ok = chn < c_hi
        x = x_next
        if FLAT:
            x_next = _load_tile_flat(x_base, stride_c, c0 + BLOCK_C, c_hi, site_flat, ok_flat, NP,
                                     BLOCK_C, BLOCK_S)
        else:
            x_next = _load_tile(x_base, x_site, stride_c, chn + BLOCK_C, c_hi, need, LAYOUT)
        if F64:
            x = tl.where(member[:, None, :], x.to(tl.float64) * scale.to(tl.float64)[:, None, :],
                         0.0)
        else:
            x = tl.where(member[:, None, :], x.to(tl.float32) * scale[:, None, :], 0.0)
        out = tl.sum(x, axis=0) * inv_count[None, :]
        o_off = _channel_offsets(chn, ostride_c, LAYOUT)[:, None] + o_site[None, :]
        oc_ok = c_ok[:, None] & s_ok[None, :]
        if UNMERGE:
            o_base = _rows(os, g, i, N_OUT, G, ALIGNED) + b * ostride_b
            x_w = tl.sum(tl.where(is_win[:, None, :], x, 0.0), axis=0)
            gv = tl.where(member[:, None, :], out[None, :, :], factor[:, None, :] * x_w[None, :, :])
            gv = tl.where(poison[None, None, :], float("nan"), gv)
            tl.store(o_base[:, None, None] + o_off[None, :, :], gv.to(os[0].dtype.element_ty),
                     mask=i_ok[:, None, None] & oc_ok[None, :, :])
        else:
            o_one = _one(os, g, N_OUT, G, ALIGNED) + b * ostride_b
            tl.store(o_one + o_off, out.to(os[0].dtype.element_ty), mask=oc_ok)
