"""Sharded sites: MaxFusion when the sites of every sample are split across the ranks of a
``torch.distributed`` process group (docs/spec.md, "Sharded sites").

A diffusion transformer run with context (sequence) parallelism holds a contiguous share of
the tokens of every sample on each rank, with the whole batch and all channels. Everything
MaxFusion computes at a site is local; only the normalisers ``T_i`` are sums over all sites of
a sample. So each rank computes its local totals, and ONE all-reduce (SUM) of the totals of
every group of a call runs between the kernels' second and third passes, on the current
stream, with no host synchronisation (capturable in a CUDA graph with NCCL).

This module resolves and checks the group (:func:`resolve_group`), checks once per call shape
that the ranks agree on what they fuse (:func:`check_same_call`), and builds the reduction the
launchers call (:func:`totals_reducer`).

The totals a reduction sees: one flat tensor, for every group of the call in order, ``rows x
N`` numbers, row-major (``rows`` = B for the sample normaliser, 1 for the batch one); zeros for
a group of which this rank holds no site. Both backends use this layout, so ranks running
different backends (float32 statistics) agree.
"""

from __future__ import annotations

import struct
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .options import FuseOptions

# The fields of the descriptor the ranks compare (:func:`call_descriptor`), for messages.
_FIELDS = (
    "the number of inputs N",
    "the number of groups",
    "normalize",
    "saliency",
    "correlation",
    "unmerge",
    "threshold",
    "the bytes per normaliser (the statistics' dtype: float32, or float64 on the torch path)",
    "the number of normaliser values",
    "the batch size of each group",
    "the channel count of each group",
)

_CHECKED_LIMIT = 4096
# process group -> descriptors of calls the ranks were found to agree on (least recently used
# evicted). A correct program makes the same calls on every rank, so every rank holds the same
# entries and skips the check at the same calls.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_device_mesh(obj) -> bool:
    return type(obj).__name__ == "DeviceMesh" and hasattr(obj, "get_group")


def resolve_group(process_group, *, what: str = "process_group"):
    """The process group to sum the normalisers over, or ``None`` when there is nothing to
    sum (``None`` given, or a group of one rank).

    ``process_group``: ``None``, a ``torch.distributed.ProcessGroup`` (e.g.
    ``dist.group.WORLD``, ``dist.new_group(...)``) or a 1-D ``DeviceMesh`` (its group).

    Raises ``TypeError`` for anything else, ``RuntimeError`` when torch.distributed is not
    available or not initialised, ``ValueError`` for a mesh of more than one dim or a group of
    which this rank is not a member.
    """
    if process_group is None:
        return None
    if not dist.is_available():
        raise RuntimeError(f"{what} was given but this torch build has no torch.distributed")
    pg = process_group
    if _is_device_mesh(pg):
        if pg.ndim != 1:
            raise ValueError(
                f"{what} is a DeviceMesh with {pg.ndim} dims: pass the group of the dim the "
                "sites are split over (mesh.get_group(dim)) or a flattened mesh")
        pg = pg.get_group()
    if pg is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"this rank is not a member of {what} (new_group returned "
                         "GroupMember.NON_GROUP_MEMBER): fuse without it on this rank")
    if not isinstance(pg, dist.ProcessGroup):
        raise TypeError(f"{what} must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} was given but torch.distributed is not initialised (or was destroyed): "
            "call torch.distributed.init_process_group(...) on every rank first")
    if dist.distributed_c10d._rank_not_in_group(pg):
        raise ValueError(f"this rank is not a member of {what}")
    return pg if pg.size() > 1 else None


def group_from_name(name: str):
    """The group a registered op got by name (``""``: none)."""
    if not name:
        return None
    return dist.distributed_c10d._resolve_process_group(name)


def _seq_hash(values: Sequence[int]) -> int:
    """A hash of a sequence of ints in [0, 2**61 - 1), the same in every process (what the
    ranks compare must not depend on anything but the values)."""
    h = len(values)
    for v in values:
        h = (h * 1000003 + int(v) + 1) % 2305843009213693951
    return h


def totals_bytes(use_triton: bool, dtype: torch.dtype) -> int:
    """Bytes per normaliser value: float32, except float64 inputs on the torch path."""
    return 8 if (not use_triton and dtype == torch.float64) else 4


def call_descriptor(groups: Sequence[Sequence[torch.Tensor]], opt: FuseOptions,
                    elem_bytes: int) -> tuple[int, ...]:
    """What every rank of a sharded call must agree on, as ints: N, the number of groups, the
    options that change the totals or the decisions, and per group B and C (never the sites,
    which differ between ranks)."""
    batches, channels = [], []
    for grp in groups:
        f0 = grp[0]
        batches.append(f0.shape[0])
        channels.append(f0.shape[opt.channel_dim % f0.dim()])
    n = len(groups[0])
    rows = len(groups) if opt.batch_normalizer else sum(batches)
    thr = struct.unpack("<q", struct.pack("<d", opt.threshold))[0]
    return (n, len(groups), int(opt.batch_normalizer), int(opt.use_variance), int(opt.pearson),
            int(opt.unmerge), thr, elem_bytes, n * rows, _seq_hash(batches),
            _seq_hash(channels))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_same_call(group, descriptor: tuple[int, ...], device: torch.device,
                    batches: Sequence[int] = (), channels: Sequence[int] = ()) -> None:
    """Raise ``ValueError`` on every rank when the ranks of ``group`` disagree on
    ``descriptor`` (:func:`call_descriptor`).

    One all-reduce (MAX) of the descriptor and its negation (2 x 11 int64 on ``device``) and
    one host sync, the first time this rank makes a call with this descriptor over this group;
    later calls with it cost a dictionary lookup. Skipped while a CUDA graph is captured (a
    sync is illegal there: make the call once before capturing).
    """
    seen = _CHECKED.get(group)
    if seen is None:
        seen = _CHECKED[group] = OrderedDict()
    if descriptor in seen:
        seen.move_to_end(descriptor)
        return
    if _capturing(device):
        return
    v = torch.tensor(descriptor, dtype=torch.int64)
    both = torch.cat([v, -v]).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    vals = both.tolist()
    k = len(descriptor)
    hi, lo = vals[:k], [-x for x in vals[k:]]
    bad = [i for i in range(k) if hi[i] != lo[i]]
    if bad:
        parts = [_describe(i, descriptor, lo, hi, batches, channels) for i in bad]
        raise ValueError(
            f"the ranks of process_group (size {group.size()}) disagree on "
            + "; ".join(parts)
            + ". A sharded fusion needs the same call on every rank (same N, options, and "
            "batch and channels per group), each rank holding its own share of the sites")
    seen[descriptor] = None
    while len(seen) > _CHECKED_LIMIT:
        seen.popitem(last=False)


_FLAGS = {2: ("sample", "batch"), 3: ("std", "variance"), 4: ("cosine", "pearson"),
          5: ("False", "True")}


def _describe(i: int, desc, lo, hi, batches, channels) -> str:
    if i in _FLAGS:
        return f"{_FIELDS[i]} (this rank: {_FLAGS[i][desc[i]]})"
    if i == 6:
        return f"{_FIELDS[i]} (this rank: {struct.unpack('<d', struct.pack('<q', desc[i]))[0]})"
    if i == 9:
        return f"{_FIELDS[i]} (this rank: {list(batches)})"
    if i == 10:
        return f"{_FIELDS[i]} (this rank: {list(channels)})"
    return f"{_FIELDS[i]} ({lo[i]} to {hi[i]} across the ranks; this rank: {desc[i]})"


def all_reduce_sum(group) -> Callable[[torch.Tensor], None]:
    """The reduction the launchers call on the flat normaliser totals: an in-place all-reduce
    (SUM) over ``group`` on the current stream, no host sync."""

    def reduce(totals: torch.Tensor) -> None:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)

    return reduce


def totals_reducer(group, groups: Sequence[Sequence[torch.Tensor]], opt: FuseOptions,
                   use_triton: bool) -> Callable[[torch.Tensor], None] | None:
    """The checked reduction of one sharded call (``None`` without a group)."""
    if group is None:
        return None
    f0 = groups[0][0]
    desc = call_descriptor(groups, opt, totals_bytes(use_triton, f0.dtype))
    if desc not in _CHECKED.get(group, ()):
        batches = [g[0].shape[0] for g in groups]
        channels = [g[0].shape[opt.channel_dim % g[0].dim()] for g in groups]
        check_same_call(group, desc, f0.device, batches, channels)
    else:
        _CHECKED[group].move_to_end(desc)
    return all_reduce_sum(group)


def collective_bytes(groups: Sequence[Sequence[torch.Tensor]], *, normalize: str = "sample",
                     elem_bytes: int = 4) -> int:
    """Bytes of the one all-reduce a sharded call adds: ``4 * N`` per normaliser row, i.e.
    ``4 * N * B`` per group for the sample normaliser, ``4 * N`` for the batch one."""
    n = len(groups[0])
    rows = len(groups) if normalize == "batch" else sum(g[0].shape[0] for g in groups)
    return elem_bytes * n * rows
