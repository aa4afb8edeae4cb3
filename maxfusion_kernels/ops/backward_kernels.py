"""The two Triton kernels of the backward of a MaxFusion call (docs/algorithm.md, "The
gradient"; docs/design.md, "The backward"), for G groups of N tensors at once.

They reuse the forward's work split (``plan.py``: the per-group table, its 1-D grid of
(group, sample, channel chunk, site block) programs) and tile helpers (``kernels.py``), with
a plan made for twice the element size, so that a program's tiles of the inputs *and* of the
output gradients together stay within ``MAX_PROGRAM_INPUT_BYTES``, and the forward's
``ALIGNED`` variant (``tl.multiple_of`` hints on pointers, strides and sizes: 16-byte vector
loads and stores where the launcher found every tensor aligned).

- ``bwd_stats_kernel``: per site and chunk of channels, the chunk's mean and centred sum of
  squares of every (weighted, masked) input and, for unmerge, ``sum_c gamma_i x_w`` (the
  output gradient of stream i against the winner's vector). Merge reads only the inputs.
- ``bwd_write_kernel``: merges the chunks of its sites in chunk order (Chan's update), forms
  the per-site coefficients and writes its tile of the N input gradients. Merge reads only the
  output gradient here (the inputs are not needed), unmerge the inputs and the N output
  gradients again.

The per-site sums span every chunk of a site, so one pass cannot form them when the channels
are split over several programs; hence two passes, as the forward's passes 1 and 3. Every
offset is int64; no atomics; every sum has a fixed order (bitwise reproducible, independent
of the order the programs run in).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import (
    C_B,
    C_IN,
    C_OUT,
    C_P1_OFF,
    C_SITE_OFF,
    _channel_offsets,
    _is_finite,
    _load_tile,
    _one,
    _read_rows,
    _rows,
    _site_offsets,
    _strides,
    _tile_extent,
    _tile_rows,
)


@triton.jit
def _ws_base(part, row, b, nch, ch, S, STATW: tl.constexpr, BW: tl.constexpr):
    """The chunk statistics of (sample b, chunk ch) of a group: ``BW`` rows of S floats. The
    forward's offset (``STATW`` floats per site and chunk) rescaled to ``BW``."""
    return part + (tl.load(row + C_P1_OFF) // STATW) * BW + (b * nch + ch) * BW * S


@triton.jit
def bwd_stats_kernel(
    xs, gs, ms, meta, winner_ptr, part,
    w0, w1, w2, w3, w4, w5, w6, w7,
    G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
    STATW: tl.constexpr, BW: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
    VEC: tl.constexpr, HAS_MASKS: tl.constexpr, UNMERGE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Chunk statistics of one ``[N, CH, BLOCK_S]`` tile: rows ``0..N-1`` the means, ``N..2N-1``
    the centred sums of squares (shifted by the chunk's first channel, as the forward's pass
    1), and with ``UNMERGE`` rows ``2N..3N-1`` the sums of ``gamma_i * x_w``."""
    pid = tl.program_id(0).to(tl.int64)
    g, row, b, ch, sb, C, S, CH, nch, inner = _tile_extent(meta, pid, G, GP, K, LAYOUT, ALIGNED, VEC)
    stride_b, stride_c, stride_s0, stride_s1 = _strides(row, C_IN, LAYOUT, ALIGNED, VEC)
    ostride_b, ostride_c, ostride_s0, ostride_s1 = _strides(row, C_OUT, LAYOUT, ALIGNED, VEC)

    i, i_ok, w, s, s_ok, scale = _tile_rows(row, ms, g, b, sb, S, w0, w1, w2, w3, w4, w5, w6,
                                            w7, N, NP, G, HAS_MASKS, BLOCK_S)
    i64 = i.to(tl.int64)
    present = i_ok[:, None] & (scale != 0.0) & s_ok[None, :]
    need = _read_rows(present, s_ok, LAYOUT)  # what is loaded (present sites are used)
    x_base = _rows(xs, g, i, N, G, ALIGNED) + b * stride_b
    x_site = _site_offsets(s, inner, stride_s0, stride_s1, LAYOUT)
    c_lo = ch * CH
    c_hi = tl.minimum(c_lo + CH, C)
    cc = tl.arange(0, BLOCK_C)
    site_off = tl.load(row + C_SITE_OFF)
    if UNMERGE:
        win = tl.load(winner_ptr + site_off + b * S + s, mask=s_ok, other=0)
        is_win = i64[:, None] == win[None, :]
        g_base = _rows(gs, g, i, N, G, ALIGNED) + b * ostride_b
        g_site = _site_offsets(s, inner, ostride_s0, ostride_s1, LAYOUT)
        g_rows = i_ok[:, None] & s_ok[None, :]

    acc_a = tl.zeros((NP, BLOCK_C, BLOCK_S), tl.float32)
    acc_q = tl.zeros((NP, BLOCK_C, BLOCK_S), tl.float32)
    acc_d = tl.zeros((NP, BLOCK_C, BLOCK_S), tl.float32)
    first = _load_tile(x_base, x_site, stride_c, c_lo + cc, c_hi, need, LAYOUT)
    k = tl.sum(tl.where((cc == 0)[None, :, None], first.to(tl.float32), 0.0), axis=1)
    k = tl.where(scale != 0.0, k * scale, 0.0)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        chn = c0 + cc
        m3 = present[:, None, :] & (chn < c_hi)[None, :, None]
        x = _load_tile(x_base, x_site, stride_c, chn, c_hi, need, LAYOUT).to(tl.float32)
        x = tl.where(scale[:, None, :] != 0.0, x * scale[:, None, :], 0.0)
        d = tl.where(m3, x - k[:, None, :], 0.0)
        acc_a += d
        acc_q += d * d
        if UNMERGE:
            x_w = tl.sum(tl.where(is_win[:, None, :], x, 0.0), axis=0)  # [BC, BS]
            gam = _load_tile(g_base, g_site, ostride_c, chn, c_hi, g_rows, LAYOUT)
            acc_d += gam.to(tl.float32) * x_w[None, :, :]

    n_c = (c_hi - c_lo).to(tl.float32)
    a = tl.sum(acc_a, axis=1)
    mean = k + a / n_c
    m2 = tl.sum(acc_q, axis=1) - a * a / n_c
    base = _ws_base(part, row, b, nch, ch, S, STATW, BW)
    st = i_ok[:, None] & s_ok[None, :]
    tl.store(base + i64[:, None] * S + s[None, :], mean, mask=st)
    tl.store(base + (N + i64)[:, None] * S + s[None, :], m2, mask=st)
    if UNMERGE:
        tl.store(base + (2 * N + i64)[:, None] * S + s[None, :], tl.sum(acc_d, axis=1),
                 mask=st)


@triton.jit
def bwd_write_kernel(
    xs, gs, ds, ms, meta, winner_ptr, members_ptr, part,
    w0, w1, w2, w3, w4, w5, w6, w7,
    G: tl.constexpr, GP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr,
    STATW: tl.constexpr, BW: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
    VEC: tl.constexpr, HAS_MASKS: tl.constexpr, UNMERGE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """The input gradients of one tile (``ds``: N per group, laid out as the output
    gradients ``gs``): merge ``[j in G] w_j m_j gamma / |G|``; unmerge adds the winner's
    terms (direct and through ``s_w``) and each non-member's term through its own std. 0 at
    removed inputs and at non-finite sites."""
    pid = tl.program_id(0).to(tl.int64)
    g, row, b, ch, sb, C, S, CH, nch, inner = _tile_extent(meta, pid, G, GP, K, LAYOUT, ALIGNED, VEC)
    B = tl.load(row + C_B)
    stride_b, stride_c, stride_s0, stride_s1 = _strides(row, C_IN, LAYOUT, ALIGNED, VEC)
    ostride_b, ostride_c, ostride_s0, ostride_s1 = _strides(row, C_OUT, LAYOUT, ALIGNED, VEC)

    i, i_ok, w, s, s_ok, scale = _tile_rows(row, ms, g, b, sb, S, w0, w1, w2, w3, w4, w5, w6,
                                            w7, N, NP, G, HAS_MASKS, BLOCK_S)
    i64 = i.to(tl.int64)
    st = i_ok[:, None] & s_ok[None, :]
    present = st & (scale != 0.0)
    site_off = tl.load(row + C_SITE_OFF)
    mem = tl.load(members_ptr + N * site_off + i64[:, None] * (B * S) + b * S + s[None, :],
                  mask=st, other=0) != 0
    count = tl.maximum(tl.sum(mem.to(tl.float32), axis=0), 1.0)

    # every chunk of these sites, merged in chunk order
    base = _ws_base(part, row, b, nch, 0, S, STATW, BW)
    mean = tl.load(base + i64[:, None] * S + s[None, :], mask=st, other=0.0)
    m2 = tl.load(base + (N + i64)[:, None] * S + s[None, :], mask=st, other=0.0)
    if UNMERGE:
        dsum = tl.load(base + (2 * N + i64)[:, None] * S + s[None, :], mask=st, other=0.0)
    n_a = tl.minimum(CH, C).to(tl.float32)
    for kk in range(1, nch):
        base_k = base + kk * BW * S
        mean_b = tl.load(base_k + i64[:, None] * S + s[None, :], mask=st, other=0.0)
        m2_b = tl.load(base_k + (N + i64)[:, None] * S + s[None, :], mask=st, other=0.0)
        n_b = tl.minimum(CH, C - kk * CH).to(tl.float32)
        n_ab = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + m2_b + delta * delta * (n_a * n_b / n_ab)
        n_a = n_ab
        if UNMERGE:
            dsum += tl.load(base_k + (2 * N + i64)[:, None] * S + s[None, :], mask=st,
                            other=0.0)
    c1 = C.to(tl.float32) - 1.0
    var = tl.maximum(m2, 0.0, propagate_nan=tl.PropagateNan.ALL) / c1
    poison = tl.max((present & ~_is_finite(var)).to(tl.int32), axis=0) > 0
    keep = present & ~poison[None, :]

    if UNMERGE:
        std = tl.sqrt(var)
        win = tl.load(winner_ptr + site_off + b * S + s, mask=s_ok, other=0)
        is_win = i64[:, None] == win[None, :]
        s_w = tl.sum(tl.where(is_win, std, 0.0), axis=0)
        mu_w = tl.sum(tl.where(is_win, mean, 0.0), axis=0)
        pos = s_w > 0.0
        s_w1 = tl.where(pos, s_w, 1.0)
        r = tl.where(pos[None, :], std / s_w1[None, :], 1.0)
        outside = present & ~mem
        rw = tl.where(outside, r, 0.0)
        coef_w = tl.where(pos, tl.sum(rw * dsum, axis=0) / (c1 * s_w1 * s_w1), 0.0)
        has_s = std > 0.0
        std1 = tl.where(has_s, std, 1.0)
        coef = tl.where(outside & has_s & pos[None, :], dsum / (c1 * std1 * s_w1[None, :]), 0.0)
        need = _read_rows(present, s_ok, LAYOUT)  # what is loaded (present sites are used)
        x_base = _rows(xs, g, i, N, G, ALIGNED) + b * stride_b
        x_site = _site_offsets(s, inner, stride_s0, stride_s1, LAYOUT)
        g_base = _rows(gs, g, i, N, G, ALIGNED) + b * ostride_b
    else:
        g_one = _one(gs, g, 1, G, ALIGNED) + b * ostride_b
    o_site = _site_offsets(s, inner, ostride_s0, ostride_s1, LAYOUT)
    d_base = _rows(ds, g, i, N, G, ALIGNED) + b * ostride_b
    c_lo = ch * CH
    c_hi = tl.minimum(c_lo + CH, C)
    cc = tl.arange(0, BLOCK_C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        chn = c0 + cc
        c_ok = chn < c_hi
        o_off = _channel_offsets(chn, ostride_c, LAYOUT)[:, None] + o_site[None, :]
        if UNMERGE:
            gam = _load_tile(g_base, o_site, ostride_c, chn, c_hi, st, LAYOUT).to(tl.float32)
            g_out = tl.sum(tl.where(mem[:, None, :], gam, 0.0), axis=0)  # [BC, BS]
            direct = tl.sum(rw[:, None, :] * gam, axis=0)
            x = _load_tile(x_base, x_site, stride_c, chn, c_hi, need, LAYOUT).to(tl.float32)
            x = tl.where(scale[:, None, :] != 0.0, x * scale[:, None, :], 0.0)
            x_w = tl.sum(tl.where(is_win[:, None, :], x, 0.0), axis=0)
            dx = tl.where(mem[:, None, :], (g_out / count[None, :])[None, :, :], 0.0)
            dx += tl.where(is_win[:, None, :],
                           (direct - coef_w[None, :] * (x_w - mu_w[None, :]))[None, :, :], 0.0)
            dx += coef[:, None, :] * (x - mean[:, None, :])
        else:
            gam = tl.load(g_one + o_off, mask=c_ok[:, None] & s_ok[None, :], other=0.0)
            dx = tl.where(mem[:, None, :], (gam.to(tl.float32) / count[None, :])[None, :, :],
                          0.0)
        df = tl.where(keep[:, None, :], scale[:, None, :] * dx, 0.0)
        tl.store(d_base[:, None, None] + o_off[None, :, :], df.to(ds[0].dtype.element_ty),
                 mask=st[:, None, :] & c_ok[None, :, None])
