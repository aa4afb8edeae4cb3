"""How one MaxFusion call is split over GPU programs: tiles, grids, the per-group table and the
scratch workspace. Pure host arithmetic (no torch, no triton), shared by the launcher
(``launch.py``), the tests and the performance model in ``benchmarks/``.

A call fuses G groups (``max_fuse``: G = 1) of N tensors, each seen as ``[B, C, S]`` (batch,
channels, sites; ``layout.py``). Three kernels run one after the other (``kernels.py``):

- pass 1, one program per (group, sample, channel chunk, site block): reads its
  ``[N, CH, BLOCK_S]`` tile of the inputs (at most ``MAX_PROGRAM_INPUT_BYTES``) and writes, per
  site, the chunk's statistics (N means and the N (N + 1) / 2 centred co-moments);
- pass 2, one program per (group, sample, block of ``BLOCK_S2`` sites): merges the chunks of
  each site (Chan's parallel update, in chunk order), writes the saliency ``t_i`` and the mask
  of correlated pairs, and a partial sum of ``t_i``; the last program of a sample (an integer
  ticket) sums the partials, in block order, into the normaliser ``T_i``;
- pass 3, the same programs as pass 1 (walked in reverse order): picks the winner and the
  group per site and writes its tile of the outputs, reading only what the group needs.

Every tile size here depends on N, the element size and the layout only, never on B or on the
other groups of the call, so a group's result is bitwise the same alone or in any batch or call.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PROGRAM_INPUT_BYTES = 32 * 1024
"""No program of pass 1 or pass 3 reads more input than this."""

# Layouts (the kernels' LAYOUT constexpr): how the site offset of flat site index s is formed.
GENERIC = 0  # two strided site runs: (s // inner) * stride0 + (s % inner) * stride1
SITES_CONTIG = 1  # one run of unit stride (contiguous NCHW maps, video): s
CHANNELS_CONTIG = 2  # one run, channels of unit stride (tokens, channels-last maps): s * stride0
LAYOUT_NAMES = {GENERIC: "generic", SITES_CONTIG: "sites-contiguous",
                CHANNELS_CONTIG: "channels-contiguous"}

ROW_BYTES_SITES = 64  # bytes of a tile row along contiguous sites: two 32-byte sectors
ROW_BYTES_CHANNELS = 256  # bytes of a tile row along contiguous channels
GRAM_BUDGET = 4096  # NP * NP * BLOCK_C * BLOCK_S: pass 1's fp32 co-moment accumulators
COMBINE_BUDGET = 1024  # NP * NP * BLOCK_S2: pass 2's co-moment tile
MAX_BLOCK_P = 256  # partials summed per step by the last program of pass 2
NUM_WARPS = 4


def stats_warps(layout: int) -> int:
    """Warps of pass 1: 8 for the generic layout, whose scalar loads each need an address
    register (4 warps would spill on sm_120), else ``NUM_WARPS``. A function of the layout
    alone, like the tiles, so results never depend on where a tensor starts in memory."""
    return 8 if layout == GENERIC else NUM_WARPS


def write_warps(n: int) -> int:
    """Warps of pass 3: 8 from N = 3 up (4 spilled 4 bytes on sm_80 to sm_89 with 13 groups
    and unmerge), else ``NUM_WARPS``. A function of N alone, so a group's result is the same
    in any call."""
    return 8 if next_pow2(n) >= 4 else NUM_WARPS

# The per-group table (int64, one row of TABLE_COLS per group), read by the kernels by column.
COL_START13 = 0  # first program of the group in passes 1 and 3
COL_START2 = 1  # first program of the group in pass 2
COL_B = 2
COL_C = 3
COL_S = 4
COL_INNER = 5  # size of the inner site run (GENERIC layout)
COL_NSB = 6  # site blocks per sample (pass 1 and 3)
COL_NCH = 7  # channel chunks
COL_CH = 8  # channels per chunk (the last chunk may be shorter)
COL_NBLK2 = 9  # site blocks per sample in pass 2
COL_IN_STRIDES = 10  # 4 columns: batch, channel, outer site, inner site (elements)
COL_OUT_STRIDES = 14  # 4 columns
COL_SITE_OFF = 18  # offset of the group's B * S sites in the flat per-site buffers
COL_P1_OFF = 19  # offset of its chunk statistics (floats)
COL_P2_OFF = 20  # offset of its pass-2 partials (floats)
COL_ROW_OFF = 21  # first row of its normalisers / tickets (B rows, or 1 for the batch one)
COL_MASK_STRIDES = 22  # 8 columns: per input, the batch stride of its mask (-1: no mask)
TABLE_COLS = 30

WORKSPACE_ALIGN = 256


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def stat_width(n: int) -> int:
    """Floats per site and chunk that pass 1 writes: N means, N (N + 1) / 2 co-moments."""
    return n + n * (n + 1) // 2


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one launch (constexprs of the kernels)."""

    block_c: int  # channels per register tile (passes 1 and 3)
    block_s: int  # sites per program (passes 1 and 3)
    block_s2: int  # sites per program of pass 2
    channels_fast: bool  # the tile's contiguous axis is the channels


def pick_tiles(n: int, elem_bytes: int, channels_fast: bool) -> Tiles:
    """Register tiles for N inputs of ``elem_bytes`` bytes: the contiguous axis gets whole
    rows (128 bytes of sites, or 256 bytes of channels), the other axis what is left of pass
    1's co-moment budget (``NP * NP * BLOCK_C * BLOCK_S <= GRAM_BUDGET``)."""
    n_pad = next_pow2(n)
    per_plane = max(1, GRAM_BUDGET // (n_pad * n_pad))
    if channels_fast:
        block_c = min(ROW_BYTES_CHANNELS // elem_bytes, per_plane)
        block_s = max(1, per_plane // block_c)
    else:
        block_s = min(ROW_BYTES_SITES // elem_bytes, per_plane)
        block_c = max(1, per_plane // block_s)
    return Tiles(block_c=block_c, block_s=block_s,
                 block_s2=max(1, COMBINE_BUDGET // (n_pad * n_pad)), channels_fast=channels_fast)


def channel_chunks(n: int, channels: int, elem_bytes: int, tiles: Tiles) -> tuple[int, int]:
    """``(number of chunks, channels per chunk)``: the fewest chunks that keep a program's input
    tile ``N * CH * BLOCK_S * e`` within ``MAX_PROGRAM_INPUT_BYTES``, balanced, CH a multiple of
    ``BLOCK_C``."""
    bc = tiles.block_c
    ch_max = MAX_PROGRAM_INPUT_BYTES // (n * tiles.block_s * elem_bytes) // bc * bc
    ch_max = max(ch_max, bc)
    nch = cdiv(channels, ch_max)
    ch = cdiv(cdiv(channels, nch), bc) * bc
    return cdiv(channels, ch), ch


@dataclass(frozen=True)
class GroupShape:
    """One group as the kernels see it (``layout.SiteLayout`` plus its offset of sites)."""

    batch: int
    channels: int
    sites: int
    inner: int
    in_strides: tuple[int, int, int, int]
    out_strides: tuple[int, int, int, int]
    site_off: int  # the group's first site in the call's flat info buffers
    mask_strides: tuple[int, ...] = ()  # per input: batch stride of its mask, -1 without


@dataclass(frozen=True)
class GroupPlan:
    shape: GroupShape
    nsb: int  # site blocks per sample (passes 1 and 3)
    nch: int  # channel chunks
    ch: int  # channels per chunk
    nblk2: int  # pass-2 site blocks per sample
    start13: int
    start2: int
    p1_off: int
    p2_off: int
    row_off: int
    rows: int  # normaliser rows: B, or 1 for the batch normaliser

    @property
    def programs13(self) -> int:
        return self.shape.batch * self.nch * self.nsb

    @property
    def programs2(self) -> int:
        return self.shape.batch * self.nblk2

    def table_row(self) -> list[int]:
        s = self.shape
        mask = list(s.mask_strides) + [-1] * (8 - len(s.mask_strides))
        return [self.start13, self.start2, s.batch, s.channels, s.sites, s.inner, self.nsb,
                self.nch, self.ch, self.nblk2, *s.in_strides, *s.out_strides, s.site_off,
                self.p1_off, self.p2_off, self.row_off, *mask]


@dataclass(frozen=True)
class LaunchPlan:
    n: int
    elem_bytes: int
    tiles: Tiles
    groups: tuple[GroupPlan, ...]
    batch_normalizer: bool
    programs13: int  # grid of passes 1 and 3
    programs2: int  # grid of pass 2
    block_p: int
    # scratch workspace: element counts and byte offsets of its parts
    n_part1: int  # fp32 chunk statistics
    n_t: int  # fp32 saliency, N per site
    n_bits: int  # int32 pair masks, one per site
    n_part2: int  # fp32 pass-2 partials
    n_total: int  # fp32 normalisers, N per row
    n_tickets: int  # int32 tickets, one per row

    @property
    def n_pad(self) -> int:
        return next_pow2(self.n)

    @property
    def statw(self) -> int:
        return stat_width(self.n)

    def workspace_layout(self) -> dict[str, tuple[int, int]]:
        """``name -> (byte offset, element count)`` of each part of the one scratch buffer."""
        parts = [("part1", self.n_part1), ("t", self.n_t), ("bits", self.n_bits),
                 ("part2", self.n_part2), ("total", self.n_total), ("tickets", self.n_tickets)]
        out, off = {}, 0
        for name, count in parts:
            out[name] = (off, count)
            off += cdiv(max(count, 1) * 4, WORKSPACE_ALIGN) * WORKSPACE_ALIGN
        out["end"] = (off, 0)
        return out

    @property
    def workspace_bytes(self) -> int:
        return self.workspace_layout()["end"][0]

    def table(self) -> list[list[int]]:
        return [g.table_row() for g in self.groups]

    def program_input_bytes(self, g: GroupPlan) -> int:
        """Input bytes of the group's largest pass-1 (or pass-3) program."""
        s = g.shape
        return (self.n * min(g.ch, s.channels) * min(self.tiles.block_s, s.sites)
                * self.elem_bytes)


def plan_launch(shapes: list[GroupShape], n: int, elem_bytes: int, channels_fast: bool,
                batch_normalizer: bool) -> LaunchPlan:
    """The work split of one call over the (non-empty) groups ``shapes``."""
    tiles = pick_tiles(n, elem_bytes, channels_fast)
    statw = stat_width(n)
    groups = []
    start13 = start2 = p1 = p2 = rows_total = 0
    n_sites = 0
    max_parts = 1
    for s in shapes:
        nsb = cdiv(s.sites, tiles.block_s)
        nch, ch = channel_chunks(n, s.channels, elem_bytes, tiles)
        nblk2 = cdiv(s.sites, tiles.block_s2)
        rows = 1 if batch_normalizer else s.batch
        gp = GroupPlan(shape=s, nsb=nsb, nch=nch, ch=ch, nblk2=nblk2, start13=start13,
                       start2=start2, p1_off=p1, p2_off=p2, row_off=rows_total, rows=rows)
        groups.append(gp)
        start13 += gp.programs13
        start2 += gp.programs2
        p1 += s.batch * nch * statw * s.sites
        p2 += s.batch * n * nblk2
        rows_total += rows
        n_sites = max(n_sites, s.site_off + s.batch * s.sites)
        max_parts = max(max_parts, nblk2 * (s.batch if batch_normalizer else 1))
    return LaunchPlan(
        n=n, elem_bytes=elem_bytes, tiles=tiles, groups=tuple(groups),
        batch_normalizer=batch_normalizer, programs13=start13, programs2=start2,
        block_p=min(next_pow2(max_parts), MAX_BLOCK_P),
        n_part1=p1, n_t=n * n_sites, n_bits=n_sites, n_part2=p2, n_total=n * rows_total,
        n_tickets=rows_total,
    )


def contiguous_plan(shapes: list[tuple[int, ...]], channel_dim: int, n: int, elem_bytes: int,
                    batch_normalizer: bool = False) -> LaunchPlan:
    """The plan of one call on contiguous tensors of these shapes (one group each), as the
    launcher would make it: for tests, benchmarks and the performance model (host only)."""
    groups, site_off = [], 0
    channels_fast = True
    for shape in shapes:
        cd = channel_dim % len(shape)
        b, c = shape[0], shape[cd]
        sites = 1
        for d, size in enumerate(shape):
            if d not in (0, cd):
                sites *= size
        if cd == len(shape) - 1 or sites == 1:  # channels contiguous: tokens, [B, C]
            strides = (c * sites, 1, c, 0)
        else:  # sites contiguous after the channel dim: NCHW maps, video
            strides = (c * sites, sites, 1, 0)
            channels_fast = False
        groups.append(GroupShape(batch=b, channels=c, sites=sites, inner=1, in_strides=strides,
                                 out_strides=strides, site_off=site_off))
        site_off += b * sites
    return plan_launch(groups, n, elem_bytes, channels_fast, batch_normalizer)
