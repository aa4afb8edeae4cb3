"""The launcher shared by ``max_fuse`` and ``max_fuse_many``: G groups of N tensors in three
kernel launches (``kernels.py``), whatever G is.

One file (over 400 lines) because the planned path and the cached fast path build the same
launch arguments and must stay identical side by side.

It reads every tensor in place (``layout.py``), plans the work split (``plan.py``), allocates
the outputs and ONE scratch workspace, uploads the per-group table once per list of shapes
(cached; kept alive for as long as a CUDA graph may replay it), and launches the passes on the
inputs' device and its current stream. Eager calls on CUDA skip Triton's argument binding from
the third call of a shape list on: the compiled kernels are called directly with the arguments
Triton passes, once the second call has shown that this Triton passes exactly those (see
:class:`_Kernel`; where it does not, every launch stays on Triton's own path).
"""

from __future__ import annotations

import math
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


def vector_width(elem_bytes: int) -> int:
    """Elements per 16-byte vector (the kernels' ``VEC``)."""
    return 16 // elem_bytes


def is_aligned(kind: int, lay: SiteLayout, tensors: Sequence[torch.Tensor],
               elem_bytes: int) -> bool:
    """Whether 16-byte vector loads and stores are valid for this group: every tensor starts
    on 16 bytes, and every stride but the unit one, and the extent of the contiguous axis, are
    multiples of 16 bytes."""
    vec = vector_width(elem_bytes)
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

    @staticmethod
    def key(rows: list[list[int]], device: torch.device):
        return (str(device), tuple(map(tuple, rows)))

    def get(self, rows: list[list[int]], device: torch.device) -> torch.Tensor:
        key = self.key(rows, device)
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

    def keep(self, rows_key, table: torch.Tensor) -> None:
        """A cached call is being captured with ``table``: never evict it from now on."""
        if rows_key not in self.entries:
            self.entries[rows_key] = (table, None)
        self.captured.add(rows_key)


TABLES = _TableCache()


# ----------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------

# Device types whose launches may skip Triton's argument binding after the first call of a
# plan (see :meth:`_Kernel.launch`); benchmarks/analysis/host_overhead.py adds "cpu" under its fake
# driver.
DIRECT_DEVICE_TYPES = {"cuda"}


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the inputs' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return nullcontext()


class _Kernel:
    """One launch of a plan: the kernel, its grid, warps and constexprs, and (on a device in
    ``DIRECT_DEVICE_TYPES``, once Triton's own launch has been seen to pass exactly what the
    direct path would) the compiled kernel and the order of its parameters, so later launches
    skip Triton's binder.

    The direct path calls the compiled kernel's launcher as ``JITFunction.run`` does in
    Triton 3.2 to 3.9. Other Triton versions may call it differently, so it is trusted only
    after a check: the first launch compiles through Triton; the second goes through Triton
    again with the launcher intercepted, and the arguments Triton passed are compared, one by
    one, with those the direct path would pass for the same call. Only if every one is the
    same object (or an equal value) do later launches go direct; otherwise, or where the
    compiled kernel's launcher cannot be intercepted, every launch of this kernel stays on
    Triton's own path (``direct_state`` says which)."""

    def __init__(self, kernel, grid: int, consts: dict, num_warps: int):
        self.kernel = kernel
        self.grid = grid
        self.consts = consts
        self.num_warps = num_warps
        self.compiled = None  # set once the direct path is trusted
        self.pending = None  # compiled by the first launch, not yet checked
        self.names = list(kernel.arg_names) if hasattr(kernel, "arg_names") else None
        self.direct_state = "unchecked"  # "trusted", or "off: <why>"

    def _direct_args(self, ck, args: dict, device: torch.device) -> tuple:
        """The positional arguments the direct path gives the compiled kernel's launcher."""
        knobs = triton.knobs.runtime
        values = {**args, **self.consts}
        bound = [values[name] for name in self.names]
        stream = triton.runtime.driver.active.get_current_stream(device.index or 0)
        grid = (self.grid,)
        return (self.grid, 1, 1, stream, ck.function, ck.packed_metadata,
                ck.launch_metadata(grid, stream, *bound), knobs.launch_enter_hook,
                knobs.launch_exit_hook, *bound)

    def launch(self, args: dict, device: torch.device, direct: bool) -> None:
        """``kernel[(grid,)](**args, **consts)``. ``direct``: every pointer argument is
        16-byte aligned, as at the first launch; the kernels take no integer arguments, so
        nothing else Triton specialises on can change, and (once trusted, see the class) the
        compiled kernel's launcher is called directly with the arguments in parameter order,
        launch metadata and hooks."""
        if self.compiled is not None and direct:
            ck = self.compiled
            ck.run(*self._direct_args(ck, args, device))
            return
        if self.pending is not None and direct:
            self._checked_launch(args, device)
            return
        compiled = self.kernel[(self.grid,)](**args, **self.consts, num_warps=self.num_warps)
        if (direct and device.type in DIRECT_DEVICE_TYPES and self.names is not None
                and self.direct_state == "unchecked"):
            self.pending = compiled

    def _checked_launch(self, args: dict, device: torch.device) -> None:
        """Launch through Triton with the launcher intercepted; trust the direct path only if
        Triton passed exactly what it would pass."""
        ck, self.pending = self.pending, None
        seen: list = []
        restore = _intercept_launcher(ck, seen)
        try:
            compiled = self.kernel[(self.grid,)](**args, **self.consts,
                                                 num_warps=self.num_warps)
        finally:
            if restore is not None:
                restore()
        if restore is None:
            self.direct_state = "off: the compiled kernel's launcher cannot be intercepted"
            return
        why = None
        if compiled is not ck:
            why = "Triton launched another compiled kernel than the first call's"
        elif len(seen) != 1:
            why = f"Triton called the launcher {len(seen)} times for one launch"
        else:
            try:
                mine = self._direct_args(ck, args, device)
            except Exception as exc:  # noqa: BLE001 - any missing attribute: stay on Triton's
                why = f"{type(exc).__name__}: {exc}"
            else:
                why = _argument_mismatch(seen[0], mine)
        if why is None:
            self.compiled = ck
            self.direct_state = "trusted"
        else:
            self.direct_state = f"off: {why}"


def _intercept_launcher(ck, seen: list):
    """Make ``ck``'s launcher record its positional arguments in ``seen`` (and still launch);
    return the function that undoes it, or None where the launcher is not where Triton 3.2 to
    3.9 keep it (``CompiledKernel.run``, a property over ``_run``, or a plain attribute)."""
    prop = isinstance(getattr(type(ck), "run", None), property)
    slot = "_run" if prop and "_run" in vars(ck) else "run" if "run" in vars(ck) else None
    if slot is None:
        return None
    if slot == "_run" and vars(ck)["_run"] is None:
        ck.run  # noqa: B018 - the property creates the launcher
    real = vars(ck)[slot]
    if real is None or not callable(real):
        return None

    def recording(*a, **kw):
        seen.append((a, kw))
        return real(*a, **kw)

    setattr(ck, slot, recording)

    def restore():
        setattr(ck, slot, real)

    return restore


def _argument_mismatch(seen, mine: tuple) -> str | None:
    """Why the launcher arguments Triton passed (``(args, kwargs)``) differ from ``mine``, or
    None where every one is the same object or an equal value (the launch metadata, rebuilt per
    call, only of the same type)."""
    theirs, kwargs = seen
    if kwargs:
        return f"Triton passed keyword arguments {sorted(kwargs)} to the launcher"
    if len(theirs) != len(mine):
        return f"Triton passed {len(theirs)} launcher arguments, the direct path {len(mine)}"
    for i, (a, b) in enumerate(zip(theirs, mine)):
        if i == 6 and type(a) is type(b):  # launch metadata: fresh per call, None without hook
            continue
        if _same(a, b):
            continue
        return f"launcher argument {i} differs ({type(a).__name__} vs {type(b).__name__})"
    return None


def _same(a, b) -> bool:
    """The same object, tuples of the same objects, or equal plain values of one type."""
    if a is b:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - not comparable: not the same
        return False


@dataclass
class CallPlan:
    """Everything about a call that depends only on its shapes, strides, dtype, device and
    options; the public functions cache it per call signature, so an eager call after the
    first one only allocates and launches."""

    n: int
    n_out: int
    opt: FuseOptions
    return_info: bool
    plan: P.LaunchPlan
    kind: int
    static_aligned: bool  # shapes and strides allow 16-byte vectors (pointers: per call)
    active: list[int]
    total_sites: int
    has_masks: bool
    table: torch.Tensor
    table_key: tuple
    ws_parts: dict
    kernels: dict  # aligned (bool) -> [stats, combine, write] _Kernel
    cacheable: bool  # inputs are read in place (no copy to a common layout)


def _mask_entries(masks, sizes: list[tuple[int, int]], n: int):
    """Every group's masks as the kernels read them: ``(rows, strides)``, rows the float32
    ``[Bm, S]`` tensor (or None) per group and input in order, strides per group the masks'
    batch strides (-1: no mask). ``sizes``: per group ``(B, S)``."""
    rows_all, strides_all = [], []
    for k, (batch, sites) in enumerate(sizes):
        strides = []
        for i in range(n):
            m = masks[k][i] if masks is not None and masks[k] is not None else None
            if m is None:
                strides.append(-1)
                rows_all.append(None)
            else:
                rows, stride = mask_rows(m, batch, sites)
                strides.append(stride)
                rows_all.append(rows)
        strides_all.append(tuple(strides))
    return rows_all, strides_all


def build_call(groups, opt: FuseOptions, return_info: bool, masks=None):
    """``(CallPlan, prepared groups, mask rows)`` of a call (the slow path)."""
    n = len(groups[0])
    n_out = n if opt.unmerge else 1
    prep = prepare(groups, n_out, opt.channel_dim)
    cacheable = all(f is g for (feats, _, _), grp in zip(prep.groups, groups)
                    for f, g in zip(feats, grp))
    has_masks = masks is not None and any(
        m is not None and any(x is not None for x in m) for m in masks)
    sizes = [(lay.batch, lay.sites) for _, _, lay in prep.groups]
    mask_rows_, mask_strides = _mask_entries(masks, sizes, n) if has_masks else (None, None)
    f0 = groups[0][0]
    elem = f0.element_size()
    plan, kind, static_aligned, active = plan_for(prep, n, elem, opt.batch_normalizer,
                                                  mask_strides)
    rows = plan.table()
    table = TABLES.get(rows, f0.device) if active else None
    g = len(active)
    common = dict(G=g, GP=P.next_pow2(g), N=n, NP=plan.n_pad, K=P.TABLE_COLS,
                  BATCH_NORMALIZER=opt.batch_normalizer)
    tiles = plan.tiles
    vec = vector_width(elem)
    kernels = {}
    for aligned in ((False, True) if static_aligned else (False,)):
        kernels[aligned] = [
            _Kernel(K.stats_kernel, plan.programs13,
                    dict(common, STATW=plan.statw, LAYOUT=kind, ALIGNED=aligned, VEC=vec,
                         HAS_MASKS=has_masks, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s),
                    P.stats_warps(kind)),
            _Kernel(K.combine_kernel, plan.programs2,
                    dict(common, STATW=plan.statw, PEARSON=opt.pearson,
                         USE_VARIANCE=opt.use_variance, BLOCK_S2=tiles.block_s2,
                         BLOCK_P=plan.block_p), P.NUM_WARPS),
            _Kernel(K.write_kernel, plan.programs13,
                    dict(common, N_OUT=n_out, LAYOUT=kind, ALIGNED=aligned, VEC=vec,
                         HAS_MASKS=has_masks, USE_VARIANCE=opt.use_variance,
                         UNMERGE=opt.unmerge, INFO=return_info,
                         F64=f0.dtype == torch.float64, BLOCK_C=tiles.block_c,
                         BLOCK_S=tiles.block_s), P.write_warps(n)),
        ]
    layout = plan.workspace_layout()
    cp = CallPlan(n=n, n_out=n_out, opt=opt, return_info=return_info, plan=plan, kind=kind,
                  static_aligned=static_aligned, active=active, total_sites=prep.total_sites,
                  has_masks=has_masks, table=table, table_key=TABLES.key(rows, f0.device),
                  ws_parts=layout, kernels=kernels,
                  cacheable=cacheable)
    return cp, prep, mask_rows_


def run_call(cp: CallPlan, inputs: list[list[torch.Tensor]], outs: list[list[torch.Tensor]],
             mask_rows_: list | None, reduce_totals=None):
    """Allocate the info and the workspace and launch the three passes of a planned call on
    ``inputs`` (read in place) into ``outs``. Returns ``(winners, members)`` or Nones."""
    f0 = inputs[0][0]
    dev = f0.device
    n = cp.n
    winners = members = None
    if cp.return_info:
        winners = torch.empty((cp.total_sites,), dtype=torch.int64, device=dev)
        members = torch.empty((n * cp.total_sites,), dtype=torch.bool, device=dev)
    if not cp.active:
        if reduce_totals is not None:
            _reduce_totals(cp, inputs, None, reduce_totals)
        return winners, members
    xs = tuple(f for k in cp.active for f in inputs[k])
    os_ = tuple(o for k in cp.active for o in outs[k])
    io = xs + os_
    aligned = cp.static_aligned and all(t.data_ptr() % 16 == 0 for t in io)
    ws = torch.empty(cp.plan.workspace_bytes, dtype=torch.uint8, device=dev)
    direct = aligned and dev.type in DIRECT_DEVICE_TYPES
    stats_k, combine_k, write_k = cp.kernels[aligned]
    if _capturing(dev):  # a graph replays the table's address: keep it for good
        TABLES.keep(cp.table_key, cp.table)
    if direct and all(k.compiled is not None for k in (stats_k, combine_k, write_k)):
        base = ws.data_ptr()  # later launches of a plan: raw addresses, no views
        parts = {name: base + off for name, (off, _) in cp.ws_parts.items()}
    else:
        parts = {}
        for name, (off, count) in cp.ws_parts.items():
            if name != "end":
                dtype = torch.int32 if name in ("bits", "tickets") else torch.float32
                parts[name] = ws[off:off + 4 * count].view(dtype)
    if cp.has_masks:
        ms = tuple(m if m is not None else parts["total"]
                   for k in cp.active for m in mask_rows_[k * n:(k + 1) * n])
    else:
        ms = (parts["total"],)
    weights = cp.opt.weights if cp.opt.weights is not None else (1.0,) * n
    w_args = {f"w{i}": (weights[i] if i < n else 1.0) for i in range(MAX_INPUTS)}
    table = cp.table
    with _device_guard(dev):
        stats_k.launch(dict(xs=xs, ms=ms, meta=table, part1=parts["part1"],
                            tickets=parts["tickets"], **w_args), dev, direct)
        combine_k.launch(dict(meta=table, part1=parts["part1"], t_ptr=parts["t"],
                              bits_ptr=parts["bits"], part2=parts["part2"],
                              totals=parts["total"], tickets=parts["tickets"],
                              threshold=cp.opt.threshold), dev, direct)
        if reduce_totals is not None:  # sharded sites: the totals of every rank, summed
            _reduce_totals(cp, inputs, ws, reduce_totals)
        write_k.launch(dict(xs=xs, os=os_, ms=ms, meta=table, t_ptr=parts["t"],
                            bits_ptr=parts["bits"], totals=parts["total"],
                            winner_ptr=winners if cp.return_info else parts["t"],
                            members_ptr=members if cp.return_info else parts["t"], **w_args),
                       dev, direct)
    return winners, members


def _reduce_totals(cp: CallPlan, inputs: list[list[torch.Tensor]], ws: torch.Tensor | None,
                   reduce_totals) -> None:
    """Apply ``reduce_totals`` in place to the normalisers of every group of the call: a flat
    float32 tensor, per group ``rows x N`` (rows = B, or 1 for the batch normaliser), groups in
    order (``maxfusion_kernels.distributed``). When every group has sites on this rank that is
    the workspace's totals themselves; otherwise the groups without sites take part with zeros
    (their shards are empty here, not on the other ranks) through a small padded copy."""
    n = cp.n
    off = cp.ws_parts["total"][0]
    local = None if ws is None else ws[off:off + 4 * cp.plan.n_total].view(torch.float32)
    if local is not None and len(cp.active) == len(inputs):
        if local.numel():
            reduce_totals(local)
        return
    rows = [1 if cp.opt.batch_normalizer else grp[0].shape[0] for grp in inputs]
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + r)
    if starts[-1] == 0:
        return
    full = torch.zeros(n * starts[-1], dtype=torch.float32, device=inputs[0][0].device)
    spans = [(n * starts[k], n * cp.plan.groups[j].row_off, n * cp.plan.groups[j].rows)
             for j, k in enumerate(cp.active)]
    for dst, src, count in spans:
        full[dst:dst + count].copy_(local[src:src + count])
    reduce_totals(full)
    for dst, src, count in spans:
        local[src:src + count].copy_(full[dst:dst + count])


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
             mask_strides: list[tuple[int, ...]] | None = None, tile_bytes: int | None = None):
    """``(plan, layout kind, statically aligned, active group indices)`` of a prepared call
    (statically aligned: shapes and strides allow 16-byte vectors of ``elem_bytes`` elements;
    pointers are not checked here: they change from call to call under the same plan, so each
    call checks its own). ``tile_bytes``: the bytes per element the tiles are planned for
    (default ``elem_bytes``; the backward reads two tensors per element)."""
    active = [k for k, (_, _, lay) in enumerate(prep.groups) if lay.batch * lay.sites > 0]
    kinds = {layout_kind(prep.groups[k][2]) for k in active}
    kind = kinds.pop() if len(kinds) == 1 else P.GENERIC
    channels_fast = all(prep.groups[k][2].in_strides[1] == 1 for k in active)
    aligned = bool(active) and all(
        is_aligned(kind, prep.groups[k][2], (), elem_bytes) for k in active)
    shapes = []
    for k in active:
        lay = prep.groups[k][2]
        shapes.append(P.GroupShape(
            batch=lay.batch, channels=lay.channels, sites=lay.sites, inner=lay.inner,
            in_strides=lay.in_strides, out_strides=lay.out_strides,
            site_off=prep.site_offsets[k],
            mask_strides=mask_strides[k] if mask_strides is not None else ()))
    plan = P.plan_launch(shapes, n, tile_bytes or elem_bytes, channels_fast, batch_normalizer)
    return plan, kind, aligned, active


# call signature -> CallPlan (the public functions' fast path), least recently used evicted
_CALLS: OrderedDict = OrderedDict()
_CALLS_LIMIT = 256


def cached_call(key) -> CallPlan | None:
    cp = _CALLS.get(key)
    if cp is not None:
        _CALLS.move_to_end(key)
    return cp


def fuse_groups(groups: list[list[torch.Tensor]], opt: FuseOptions, return_info: bool,
                masks: list[list[torch.Tensor | None] | None] | None = None, *,
                launch: bool = True, key=None, reduce_totals=None):
    """Fuse every group (each N same-shape tensors; shapes may differ between groups) with the
    options ``opt`` (its ``channel_dim`` applies to every group).

    ``masks``: per group None or N entries, each None or a checked mask ``[Bm, *sites]``.
    Returns ``(outputs per group, winners, members)``: the info of all groups in two flat
    buffers, groups one after the other (``B * S`` winners, ``N * B * S`` members each), or
    ``None`` without ``return_info``. ``launch=False`` allocates only (the op's fake).
    ``key``: the call's signature, under which the plan is cached for later calls.
    ``reduce_totals``: applied in place to the normalisers between passes 2 and 3 (sharding).
    """
    if not launch:
        n = len(groups[0])
        prep = prepare(groups, n if opt.unmerge else 1, opt.channel_dim)
        f0 = groups[0][0]
        winners = members = None
        if return_info:
            winners = f0.new_empty((prep.total_sites,), dtype=torch.int64)
            members = f0.new_empty((n * prep.total_sites,), dtype=torch.bool)
        return [o for _, o, _ in prep.groups], winners, members
    cp, prep, rows = build_call(groups, opt, return_info, masks)
    if key is not None and cp.cacheable:
        _CALLS[key] = cp
        while len(_CALLS) > _CALLS_LIMIT:
            _CALLS.popitem(last=False)
    outs = [o for _, o, _ in prep.groups]
    winners, members = run_call(cp, [f for f, _, _ in prep.groups], outs, rows, reduce_totals)
    return outs, winners, members


def fuse_cached(cp: CallPlan, groups: list[list[torch.Tensor]], masks=None, reduce_totals=None):
    """A call whose plan is cached: the inputs are read in place; outputs are allocated like
    input 0 of each group."""
    outs = [[torch.empty_like(grp[0]) for _ in range(cp.n_out)] for grp in groups]
    rows = None
    if cp.has_masks:
        sizes = []
        for g in groups:
            cd = cp.opt.channel_dim % g[0].dim()  # raw (maybe negative) for max_fuse_many
            sizes.append((g[0].shape[0],
                          math.prod(v for d, v in enumerate(g[0].shape) if d not in (0, cd))))
        rows = _mask_entries(masks, sizes, cp.n)[0]
    winners, members = run_call(cp, groups, outs, rows, reduce_totals)
    return outs, winners, members
