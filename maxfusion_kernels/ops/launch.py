"""The launcher shared by ``max_fuse`` and ``max_fuse_many``: G groups of N tensors in three
kernel launches (``kernels.py``), whatever G is.

It reads every tensor in place (``layout.py``), plans the work split (``plan.py``), allocates
the outputs and ONE scratch workspace, uploads the per-group table once per list of shapes
(cached; kept alive for as long as a CUDA graph may replay it), and launches the passes on the
inputs' device and its current stream. Eager calls on CUDA skip Triton's argument binding after
the first call of a shape list: the compiled kernels are called directly with the arguments
Triton would pass (see :func:`_launch`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..layout import SiteLayout, site_layout
from ..options import MAX_INPUTS, FuseOptions
from . import plan as P

try:
    import triton

    from . import kernels as K

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


# ----------------------------------------------------------------------------------------
# groups: inputs read in place, outputs laid out like them
# ----------------------------------------------------------------------------------------


def _as_kernel_inputs(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs sharing input 0's strides (read in place); any other one is copied to match."""
    f0 = feats[0]
    if all(f.stride() == f0.stride() for f in feats[1:]):
        return feats
    like = torch.empty_like(f0)  # keeps input 0's strides when it is dense, else contiguous
    if like.stride() != f0.stride():
        return [f.contiguous() for f in feats]
    return [f if f.stride() == like.stride() else torch.empty_like(f0).copy_(f) for f in feats]


def prepare_group(feats: list[torch.Tensor], n_out: int, channel_dim: int):
    """``(inputs, outputs, layout)`` of one group: the inputs with input 0's strides, ``n_out``
    outputs laid out like them, and their ``[B, C, sites]`` view. Site dims too scattered for
    two strided runs are read through a contiguous copy."""
    feats = _as_kernel_inputs(feats)
    outs = [torch.empty_like(feats[0]) for _ in range(n_out)]
    lay = site_layout(feats[0], outs[0], channel_dim)
    if lay is None:
        feats = [f.contiguous() for f in feats]
        outs = [torch.empty_like(feats[0]) for _ in range(n_out)]
        lay = site_layout(feats[0], outs[0], channel_dim)
        assert lay is not None
    return feats, outs, lay


def layout_kind(lay: SiteLayout) -> int:
    """The kernels' addressing of one group (``plan.GENERIC``, ``SITES_CONTIG`` or
    ``CHANNELS_CONTIG``)."""
    if lay.two_runs:
        return P.GENERIC
    if lay.in_strides[1] == 1 and lay.out_strides[1] == 1:
        return P.CHANNELS_CONTIG
    if lay.in_strides[2] == 1 and lay.out_strides[2] == 1:
        return P.SITES_CONTIG
    return P.GENERIC


def is_aligned(kind: int, lay: SiteLayout, tensors: Sequence[torch.Tensor],
               elem_bytes: int) -> bool:
    """Whether 16-byte vector loads and stores are valid for this group: every tensor starts
    on 16 bytes, and every stride but the unit one, and the extent of the contiguous axis, are
    multiples of 16 bytes."""
    vec = 16 // elem_bytes
    if kind == P.GENERIC or any(t.data_ptr() % 16 for t in tensors):
        return False
    strides = (lay.in_strides, lay.out_strides)
    if kind == P.SITES_CONTIG:
        return lay.sites % vec == 0 and all(st[0] % vec == 0 and st[1] % vec == 0
                                            for st in strides)
    return lay.channels % vec == 0 and all(st[0] % vec == 0 and st[2] % vec == 0
                                           for st in strides)


def mask_rows(mask: torch.Tensor, batch: int, sites: int) -> tuple[torch.Tensor, int]:
    """A checked mask (``[Bm, *sites]``, Bm = 1 or B) as float32 ``[Bm, S]`` rows the kernels
    read, and its batch stride (0 when one mask serves the whole batch)."""
    rows = mask.reshape(mask.shape[0], sites).to(torch.float32).contiguous()
    return rows, (0 if rows.shape[0] == 1 and batch > 1 else sites)


# ----------------------------------------------------------------------------------------
# the per-group table: uploaded once per list of shapes
# ----------------------------------------------------------------------------------------


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _upload(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(device table, host source)``. On CUDA the host source is pinned and the copy is
    asynchronous: no host sync, so it is captured as a copy node inside a CUDA graph capture
    (the pinned source must then outlive the graph: the cache keeps it with the table)."""
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device), host
    host = host.pin_memory()
    table = torch.empty(host.shape, dtype=torch.int64, device=device)
    table.copy_(host, non_blocking=True)
    return table, host


class _TableCache:
    """Device copies of per-group tables, by content (a pipeline's residual shapes repeat every
    step, so a table is uploaded once). A table used while a CUDA graph is being captured is
    never evicted, since the graph replays its address; the others are evicted least recently
    used first, beyond ``limit``."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self.entries: OrderedDict = OrderedDict()  # key -> (device table, host source)
        self.captured: set = set()

    def get(self, rows: list[list[int]], device: torch.device) -> torch.Tensor:
        key = (str(device), tuple(map(tuple, rows)))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _upload(rows, device)
        else:
            self.entries.move_to_end(key)
        if _capturing(device):
            self.captured.add(key)
        for old in list(self.entries):
            if len(self.entries) <= self.limit:
                break
            if old not in self.captured:
                del self.entries[old]
        return entry[0]


TABLES = _TableCache()


# ----------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------

# (device, kernel name, constexprs, pointer alignments) -> the compiled kernel, for direct
# calls that skip Triton's argument binding (CUDA only; the interpreter always binds)
_COMPILED: dict = {}


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the inputs' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return nullcontext()


def _pointer_alignment(args: dict) -> tuple:
    bits = []
    for v in args.values():
        if isinstance(v, torch.Tensor):
            bits.append(v.data_ptr() % 16 == 0)
        elif isinstance(v, tuple):
            bits.extend(t.data_ptr() % 16 == 0 for t in v)
    return tuple(bits)


def _launch(kernel, grid: int, args: dict, consts: dict, device: torch.device,
            num_warps: int = P.NUM_WARPS) -> None:
    """``kernel[(grid,)](**args, **consts)``. On CUDA, outside tracing and profiler hooks, the
    first call compiles and binds through Triton; later calls with the same constexprs and
    pointer alignments (everything Triton specialises these kernels on: they take no integer
    arguments) call the compiled kernel's launcher directly, with the arguments in the
    kernel's parameter order, as ``JITFunction.run`` does (Triton 3.2 to 3.9)."""
    if device.type != "cuda":
        kernel[(grid,)](**args, **consts, num_warps=num_warps)
        return
    knobs = triton.knobs.runtime
    key = (device.index, kernel.fn.__name__, num_warps, tuple(consts.items()),
           _pointer_alignment(args))
    compiled = _COMPILED.get(key)
    if compiled is None or knobs.launch_enter_hook is not None:
        compiled = kernel[(grid,)](**args, **consts, num_warps=num_warps)
        _COMPILED[key] = compiled
        return
    values = {**args, **consts}
    stream = torch.cuda.current_stream(device).cuda_stream
    compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None,
                 knobs.launch_enter_hook, knobs.launch_exit_hook,
                 *[values[name] for name in kernel.arg_names])


@dataclass
class Prepared:
    """One call's groups, read in place: ``(inputs, outputs, layout)`` per group, and where
    each group's sites start in the flat info buffers."""

    groups: list
    site_offsets: list[int]
    total_sites: int


def prepare(groups: list[list[torch.Tensor]], n_out: int, channel_dim: int) -> Prepared:
    prepared, offsets, total = [], [], 0
    for grp in groups:
        feats, outs, lay = prepare_group(list(grp), n_out, channel_dim % grp[0].dim())
        prepared.append((feats, outs, lay))
        offsets.append(total)
        total += lay.batch * lay.sites
    return Prepared(prepared, offsets, total)


def plan_for(prep: Prepared, n: int, elem_bytes: int, batch_normalizer: bool,
             mask_strides: list[tuple[int, ...]] | None = None):
    """``(plan, layout kind, aligned, active group indices)`` of a prepared call."""
    active = [k for k, (_, _, lay) in enumerate(prep.groups) if lay.batch * lay.sites > 0]
    kinds = {layout_kind(prep.groups[k][2]) for k in active}
    kind = kinds.pop() if len(kinds) == 1 else P.GENERIC
    channels_fast = all(prep.groups[k][2].in_strides[1] == 1 for k in active)
    aligned = bool(active) and all(
        is_aligned(kind, prep.groups[k][2], [*prep.groups[k][0], *prep.groups[k][1]], elem_bytes)
        for k in active)
    shapes = []
    for k in active:
        lay = prep.groups[k][2]
        shapes.append(P.GroupShape(
            batch=lay.batch, channels=lay.channels, sites=lay.sites, inner=lay.inner,
            in_strides=lay.in_strides, out_strides=lay.out_strides,
            site_off=prep.site_offsets[k],
            mask_strides=mask_strides[k] if mask_strides is not None else ()))
    plan = P.plan_launch(shapes, n, elem_bytes, channels_fast, batch_normalizer)
    return plan, kind, aligned, active


def fuse_groups(groups: list[list[torch.Tensor]], opt: FuseOptions, return_info: bool,
                masks: list[list[torch.Tensor | None] | None] | None = None, *,
                launch: bool = True):
    """Fuse every group (each N same-shape tensors; shapes may differ between groups) with the
    options ``opt`` (its ``channel_dim`` applies to every group).

    ``masks``: per group None or N entries, each None or a checked mask ``[Bm, *sites]``.
    Returns ``(outputs per group, winners, members)``: the info of all groups in two flat
    buffers, groups one after the other (``B * S`` winners, ``N * B * S`` members each), or
    ``None`` without ``return_info``. ``launch=False`` allocates only (the op's fake).
    """
    n = len(groups[0])
    n_out = n if opt.unmerge else 1
    prep = prepare(groups, n_out, opt.channel_dim)
    outs = [o for _, o, _ in prep.groups]
    f0 = groups[0][0]
    dev = f0.device
    winners = f0.new_empty((prep.total_sites,), dtype=torch.int64) if return_info else None
    members = (f0.new_empty((n * prep.total_sites,), dtype=torch.bool) if return_info
               else None)
    if not launch or prep.total_sites == 0:
        return outs, winners, members

    has_masks = masks is not None and any(
        m is not None and any(x is not None for x in m) for m in masks)
    mask_ptrs, mask_strides = [], None
    if has_masks:
        mask_strides = []
        for k, (_, _, lay) in enumerate(prep.groups):
            strides = []
            for i in range(n):
                m = masks[k][i] if masks[k] is not None else None
                if m is None:
                    strides.append(-1)
                    mask_ptrs.append(None)
                else:
                    rows, stride = mask_rows(m, lay.batch, lay.sites)
                    strides.append(stride)
                    mask_ptrs.append(rows)
            mask_strides.append(tuple(strides))

    elem = f0.element_size()
    plan, kind, aligned, active = plan_for(prep, n, elem, opt.batch_normalizer, mask_strides)
    table = TABLES.get(plan.table(), dev)
    ws = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=dev)
    parts = {}
    for name, (off, count) in plan.workspace_layout().items():
        if name != "end":
            dtype = torch.int32 if name in ("bits", "tickets") else torch.float32
            parts[name] = ws[off:off + 4 * count].view(dtype)

    xs = tuple(f for k in active for f in prep.groups[k][0])
    os_ = tuple(o for k in active for o in prep.groups[k][1])
    if has_masks:
        ms = tuple(m if m is not None else parts["total"]
                   for k in active for m in mask_ptrs[k * n:(k + 1) * n])
    else:
        ms = (parts["total"],)
    weights = list(opt.weights) if opt.weights is not None else [1.0] * n
    ws_ = [weights[i] if i < n else 1.0 for i in range(MAX_INPUTS)]
    w_args = {f"w{i}": ws_[i] for i in range(MAX_INPUTS)}
    g = len(active)
    common = dict(G=g, GP=P.next_pow2(g), N=n, NP=plan.n_pad, K=P.TABLE_COLS,
                  BATCH_NORMALIZER=opt.batch_normalizer)
    tiles = plan.tiles
    vec = 16 // elem
    with _device_guard(dev):
        _launch(K.stats_kernel, plan.programs13,
                dict(xs=xs, ms=ms, meta=table, part1=parts["part1"], tickets=parts["tickets"],
                     **w_args),
                dict(common, STATW=plan.statw, LAYOUT=kind, ALIGNED=aligned, VEC=vec,
                     HAS_MASKS=has_masks, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s), dev,
                P.stats_warps(kind))
        _launch(K.combine_kernel, plan.programs2,
                dict(meta=table, part1=parts["part1"], t_ptr=parts["t"], bits_ptr=parts["bits"],
                     part2=parts["part2"], totals=parts["total"], tickets=parts["tickets"],
                     threshold=opt.threshold),
                dict(common, STATW=plan.statw, PEARSON=opt.pearson,
                     USE_VARIANCE=opt.use_variance, BLOCK_S2=tiles.block_s2,
                     BLOCK_P=plan.block_p), dev)
        _launch(K.write_kernel, plan.programs13,
                dict(xs=xs, os=os_, ms=ms, meta=table, t_ptr=parts["t"], bits_ptr=parts["bits"],
                     totals=parts["total"],
                     winner_ptr=winners if return_info else parts["t"],
                     members_ptr=members if return_info else parts["t"], **w_args),
                dict(common, N_OUT=n_out, LAYOUT=kind, ALIGNED=aligned, VEC=vec,
                     HAS_MASKS=has_masks, USE_VARIANCE=opt.use_variance, UNMERGE=opt.unmerge,
                     INFO=return_info, F64=f0.dtype == torch.float64, BLOCK_C=tiles.block_c,
                     BLOCK_S=tiles.block_s), dev)
    return outs, winners, members
