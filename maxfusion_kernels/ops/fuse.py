"""``max_fuse``: MaxFusion of N feature maps in two fused Triton passes.

Top to bottom: the Triton kernels, the launcher, the registered op ``torch.ops.maxfusion.max_fuse``
and the public function. The semantics are those of SPEC.md (executable form:
:mod:`maxfusion_kernels.reference`); the passes and the bytes they move are in docs/design.md.

Pass 1 (``_stats_kernel``), one program per (block of sites, sample): reads every input once,
accumulating over the channels, per site and input, the shifted sum and sum of squares (for the
variance) and the Gram matrix of the N vectors (for the correlations). It writes the per-site
saliency statistic ``t_i``, a 32-bit mask of the pairs correlated above the threshold, and one
partial sum of ``t_i`` per block. Where every pair of (non-removed) inputs is correlated, the
group is every input whoever wins, so the output is written there and then (a second look at
the same tile, served from L1/L2).

Pass 2 (``_finish_kernel``): sums the partials into the normalisers ``T_i`` (fixed order, so
deterministic and identical in every program), picks the winner and the group per site, writes
the optional info, and writes the output at the sites pass 1 left open, reading only the group's
inputs there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layout import site_layout
from ..options import BACKENDS as _BACKENDS
from ..options import MAX_INPUTS, FuseInfo, FuseOptions, check_features, resolve_options
from ..torch_backend import fuse_torch
from ._fusion_math import HAS_TRITON, next_pow2, pass_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._fusion_math import (
        EARLY_MARK,
        block_partial,
        decide,
        normaliser,
        pick,
        poisoned,
        site_offsets,
        site_stats,
        unmerge_factor,
        write_sites,
    )

    # ------------------------------------------------------------------------------------
    # 1. kernels
    # ------------------------------------------------------------------------------------

    @triton.jit
    def _stats_kernel(
        x0, x1, x2, x3, x4, x5, x6, x7,
        o0, o1, o2, o3, o4, o5, o6, o7,
        t_ptr, mask_ptr, part_ptr,
        w0, w1, w2, w3, w4, w5, w6, w7,
        threshold, C, S, inner, n_blocks,
        stride_xb, stride_xc, stride_xs0, stride_xs1,
        stride_ob, stride_oc, stride_os0, stride_os1,
        N: tl.constexpr, NP: tl.constexpr,
        PEARSON: tl.constexpr, USE_VARIANCE: tl.constexpr, UNMERGE: tl.constexpr,
        TWO_RUNS: tl.constexpr, F64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        i = tl.arange(0, NP)
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < S
        i_ok = i < N
        w = pick(i, w0, w1, w2, w3, w4, w5, w6, w7, N).to(tl.float32)
        present = i_ok & (w != 0.0)
        x_base = pick(i, x0, x1, x2, x3, x4, x5, x6, x7, N) + pid_b * stride_xb
        x_site = site_offsets(s, inner, stride_xs0, stride_xs1, TWO_RUNS)

        t, bits = site_stats(x_base, stride_xc, x_site, s_ok, i_ok, w, present, C, threshold,
                             N, NP, PEARSON, USE_VARIANCE, BLOCK_C, BLOCK_S)

        m2 = i_ok[:, None] & s_ok[None, :]
        row = (pid_b * N + i.to(tl.int64)) * S
        tl.store(t_ptr + row[:, None] + s[None, :], t, mask=m2)
        tl.store(mask_ptr + pid_b * S + s, bits, mask=s_ok)
        part = block_partial(t, m2)
        tl.store(part_ptr + (pid_b * N + i) * n_blocks + pid_s, part, mask=i_ok)

        early = (bits & EARLY_MARK) != 0
        if tl.max(early.to(tl.int32), axis=0) > 0:
            # the group is every present input: write the output now, from the tile just read
            o_base = pick(i, o0, o1, o2, o3, o4, o5, o6, o7, N) + pid_b * stride_ob
            o_site = site_offsets(s, inner, stride_os0, stride_os1, TWO_RUNS)
            member = present[:, None] & early[None, :]
            zero = tl.zeros((NP, BLOCK_S), tl.float32)
            win = tl.zeros((BLOCK_S,), tl.int32)
            poison = poisoned(t, present)
            write_sites(x_base, stride_xc, x_site, o_base, o0 + pid_b * stride_ob, stride_oc,
                        o_site, early, member, zero, win, poison, w, i_ok, C, UNMERGE, F64, NP,
                        BLOCK_C)

    @triton.jit
    def _finish_kernel(
        x0, x1, x2, x3, x4, x5, x6, x7,
        o0, o1, o2, o3, o4, o5, o6, o7,
        t_ptr, mask_ptr, part_ptr, winner_ptr, members_ptr,
        w0, w1, w2, w3, w4, w5, w6, w7,
        C, S, inner, n_blocks, B,
        stride_xb, stride_xc, stride_xs0, stride_xs1,
        stride_ob, stride_oc, stride_os0, stride_os1,
        N: tl.constexpr, NP: tl.constexpr,
        USE_VARIANCE: tl.constexpr, UNMERGE: tl.constexpr, BATCH_NORMALIZER: tl.constexpr,
        TWO_RUNS: tl.constexpr, INFO: tl.constexpr, F64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        i = tl.arange(0, NP)
        i_ok = i < N
        w = pick(i, w0, w1, w2, w3, w4, w5, w6, w7, N).to(tl.float32)
        present = i_ok & (w != 0.0)
        if BATCH_NORMALIZER:
            total = normaliser(part_ptr, 0, B, n_blocks, i_ok, N, NP, BLOCK_P)
        else:
            total = normaliser(part_ptr, pid_b, pid_b + 1, n_blocks, i_ok, N, NP, BLOCK_P)

        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < S
        m2 = i_ok[:, None] & s_ok[None, :]
        row = (pid_b * N + i.to(tl.int64)) * S
        t = tl.load(t_ptr + row[:, None] + s[None, :], mask=m2, other=0.0)
        bits = tl.load(mask_ptr + pid_b * S + s, mask=s_ok, other=0)
        win, member = decide(t, total, bits, present, i_ok, N, NP)

        if INFO:
            tl.store(winner_ptr + pid_b * S + s, win.to(tl.int64), mask=s_ok)
            m_ptr = members_ptr + (i.to(tl.int64)[:, None] * (B * S) + pid_b * S + s[None, :])
            tl.store(m_ptr, member.to(tl.int8), mask=m2)

        todo = s_ok & ((bits & EARLY_MARK) == 0)  # sites pass 1 did not write
        if tl.max(todo.to(tl.int32), axis=0) > 0:
            x_base = pick(i, x0, x1, x2, x3, x4, x5, x6, x7, N) + pid_b * stride_xb
            x_site = site_offsets(s, inner, stride_xs0, stride_xs1, TWO_RUNS)
            o_base = pick(i, o0, o1, o2, o3, o4, o5, o6, o7, N) + pid_b * stride_ob
            o_site = site_offsets(s, inner, stride_os0, stride_os1, TWO_RUNS)
            factor = unmerge_factor(t, win, present, USE_VARIANCE, NP)
            poison = poisoned(t, present)
            write_sites(x_base, stride_xc, x_site, o_base, o0 + pid_b * stride_ob, stride_oc,
                        o_site, todo, member, factor, win, poison, w, i_ok, C, UNMERGE, F64, NP,
                        BLOCK_C)


# ----------------------------------------------------------------------------------------
# 2. launcher
# ----------------------------------------------------------------------------------------


def _as_kernel_inputs(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs sharing input 0's strides (read in place); any other one is copied to match."""
    f0 = feats[0]
    same = all(f.stride() == f0.stride() for f in feats[1:])
    if same:
        return feats
    like = torch.empty_like(f0)  # keeps input 0's strides when it is dense, else contiguous
    if like.stride() != f0.stride():
        return [f.contiguous() for f in feats]
    return [f if f.stride() == like.stride() else torch.empty_like(f0).copy_(f) for f in feats]


def prepare_group(feats: list[torch.Tensor], n_out: int, channel_dim: int):
    """``(inputs, outputs, layout)`` of one group for the kernels: the inputs with input 0's
    strides, ``n_out`` outputs laid out like them, and their ``[B, C, sites]`` view. Site dims
    too scattered for two strided runs are read through a contiguous copy."""
    feats = _as_kernel_inputs(feats)
    outs = [torch.empty_like(feats[0]) for _ in range(n_out)]
    lay = site_layout(feats[0], outs[0], channel_dim)
    if lay is None:
        feats = [f.contiguous() for f in feats]
        outs = [torch.empty_like(feats[0]) for _ in range(n_out)]
        lay = site_layout(feats[0], outs[0], channel_dim)
        assert lay is not None
    return feats, outs, lay


def _fuse_triton(
    feats: list[torch.Tensor], opt: FuseOptions, return_info: bool, launch: bool = True
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Allocate the results and launch the two passes (``launch=False``: allocate only, for
    the fake implementation of the interpreted op)."""
    n = len(feats)
    feats, outs, lay = prepare_group(feats, n if opt.unmerge else 1, opt.channel_dim)
    f0 = feats[0]
    n_out = len(outs)
    moved = f0.movedim(opt.channel_dim, 1).shape
    b, s_count = lay.batch, lay.sites
    info_winner = f0.new_empty((b, s_count), dtype=torch.int64) if return_info else None
    info_members = (f0.new_empty((n, b, s_count), dtype=torch.bool) if return_info else None)
    if b * s_count == 0 or not launch:  # nothing to fuse: empty outputs, nothing launched
        return outs, _info_view(info_winner, moved), _info_view(info_members, moved, n)

    n_pad = next_pow2(n)
    (bc1, bs1), (bc2, bs2) = pass_tiles(n_pad, lay.channels, s_count, lay.in_strides[1] == 1)
    n_blocks = triton.cdiv(s_count, bs1)
    dev = f0.device
    t_buf = torch.empty((b, n, s_count), dtype=torch.float32, device=dev)
    mask_buf = torch.empty((b, s_count), dtype=torch.int32, device=dev)
    part_buf = torch.empty((b, n, n_blocks), dtype=torch.float32, device=dev)

    xs = [feats[i] if i < n else feats[0] for i in range(MAX_INPUTS)]
    os_ = [outs[i] if i < n_out else outs[0] for i in range(MAX_INPUTS)]
    weights = list(opt.weights) if opt.weights is not None else [1.0] * n
    ws = [weights[i] if i < n else 1.0 for i in range(MAX_INPUTS)]
    common = dict(N=n, NP=n_pad, UNMERGE=opt.unmerge, TWO_RUNS=lay.two_runs,
                  F64=f0.dtype == torch.float64, num_warps=4)

    wrap = torch.library.wrap_triton
    wrap(_stats_kernel)[(n_blocks, b)](
        *xs, *os_, t_buf, mask_buf, part_buf, *ws,
        opt.threshold, lay.channels, s_count, lay.inner, n_blocks,
        *lay.in_strides, *lay.out_strides,
        PEARSON=opt.pearson, USE_VARIANCE=opt.use_variance,
        BLOCK_C=bc1, BLOCK_S=bs1, **common,
    )
    wrap(_finish_kernel)[(triton.cdiv(s_count, bs2), b)](
        *xs, *os_, t_buf, mask_buf, part_buf,
        info_winner if return_info else t_buf, info_members if return_info else t_buf,
        *ws, lay.channels, s_count, lay.inner, n_blocks, b,
        *lay.in_strides, *lay.out_strides,
        USE_VARIANCE=opt.use_variance, BATCH_NORMALIZER=opt.batch_normalizer,
        INFO=return_info, BLOCK_C=bc2, BLOCK_S=bs2,
        BLOCK_P=min(next_pow2(n_blocks), 256), **common,
    )
    return outs, _info_view(info_winner, moved), _info_view(info_members, moved, n)


def _info_view(t: torch.Tensor | None, moved_shape, n: int | None = None):
    if t is None:
        return None
    sites = tuple(moved_shape[2:])
    return t.view(moved_shape[0], *sites) if n is None else t.view(n, moved_shape[0], *sites)


# ----------------------------------------------------------------------------------------
# 3. registered op
# ----------------------------------------------------------------------------------------


def _resolve_op_args(threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
                     channel_dim) -> FuseOptions:
    return FuseOptions(
        threshold=threshold,
        unmerge=unmerge,
        correlation="pearson" if pearson else "cosine",
        saliency="variance" if use_variance else "std",
        normalize="batch" if batch_normalizer else "sample",
        weights=None if all(w == 1.0 for w in weights) else tuple(weights),
        channel_dim=channel_dim,
    )


def _op_results(features, outs, winner, members):
    if winner is None or members is None:  # the schema returns tensors: empty ones
        winner = features[0].new_empty((0,), dtype=torch.int64)
        members = features[0].new_empty((0,), dtype=torch.bool)
    return outs, winner, members


@torch.library.triton_op("maxfusion::max_fuse", mutates_args=())
def _max_fuse_op(
    features: list[torch.Tensor],
    threshold: float,
    unmerge: bool,
    pearson: bool,
    use_variance: bool,
    batch_normalizer: bool,
    weights: list[float],
    channel_dim: int,
    return_info: bool,
    use_triton: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``torch.ops.maxfusion.max_fuse``: the fusion with every option spelled out.

    Returns ``(outputs, winner, members)``; ``winner`` and ``members`` are empty tensors unless
    ``return_info``. ``use_triton`` picks the Triton kernels over the vectorised torch path,
    which is also what ``torch.compile`` traces on CPU. On CUDA the kernels are visible to
    Inductor (``wrap_triton``); on CPU (``TRITON_INTERPRET=1``) they run inside the opaque
    ``maxfusion::max_fuse_interpreted``, since the interpreter cannot run on traced tensors.
    """
    if use_triton and features[0].device.type == "cpu":
        return torch.ops.maxfusion.max_fuse_interpreted(
            features, threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
            channel_dim, return_info,
        )
    opt = _resolve_op_args(threshold, unmerge, pearson, use_variance, batch_normalizer,
                           weights, channel_dim)
    impl = _fuse_triton if use_triton else fuse_torch
    return _op_results(features, *impl(list(features), opt, return_info))


@torch.library.custom_op("maxfusion::max_fuse_interpreted", mutates_args=())
def _max_fuse_interpreted(
    features: list[torch.Tensor],
    threshold: float,
    unmerge: bool,
    pearson: bool,
    use_variance: bool,
    batch_normalizer: bool,
    weights: list[float],
    channel_dim: int,
    return_info: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The Triton kernels run by the Triton interpreter on CPU tensors (an opaque op)."""
    opt = _resolve_op_args(threshold, unmerge, pearson, use_variance, batch_normalizer,
                           weights, channel_dim)
    return _op_results(features, *_fuse_triton(list(features), opt, return_info))


@_max_fuse_interpreted.register_fake
def _(features, threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
      channel_dim, return_info):
    opt = _resolve_op_args(threshold, unmerge, pearson, use_variance, batch_normalizer,
                           weights, channel_dim)
    return _op_results(features, *_fuse_triton(list(features), opt, return_info, launch=False))


# ----------------------------------------------------------------------------------------
# 4. public function
# ----------------------------------------------------------------------------------------


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set, so Triton kernels run on CPU tensors."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend ``max_fuse`` uses for tensors on ``device``: ``"triton"`` or ``"torch"``.

    ``"auto"``: CUDA tensors use the Triton kernels; CPU tensors use them when
    ``TRITON_INTERPRET=1`` is set (outside ``torch.compile``), else the torch path.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {list(_BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_gpu = device.type == "cuda"
    interp = device.type == "cpu" and interpreter_enabled()
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not (on_gpu or interp):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                f"the features are on {device}"
            )
        return "triton"
    if HAS_TRITON and (on_gpu or (interp and not torch.compiler.is_compiling())):
        return "triton"
    return "torch"


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
    return_info: bool = False,
    backend: str = "auto",
):
    """Fuse N feature tensors of one shape with MaxFusion (SPEC.md).

    Args:
        features: N tensors (2 <= N <= 8) of identical shape, dtype (float16, bfloat16, float32
            or float64) and device. Dim 0 is the batch, ``channel_dim`` the channels (C >= 2),
            every other dim indexes sites: ``[B, C, H, W]``, ``[B, C, T, H, W]``, ``[B, L, C]``
            with ``channel_dim=-1``, any strides (channels-last and strided views are read in
            place).
        threshold: inputs whose correlation with the winner is ``> threshold`` are averaged
            with it; a float in [-1, 1].
        unmerge: return one tensor per input (the paper's inter-model unmerging) instead of one
            merged tensor.
        preset: ``"paper"`` (cosine, std, sample) or ``"reference"`` (pearson, variance, batch:
            the authors' released code); ``correlation``, ``saliency``, ``normalize`` override
            its parts.
        weights: N floats >= 0 applied to the inputs first (a diffusers conditioning scale);
            a weight of 0 removes the input (never the winner nor a group member; its unmerge
            stream is zero).
        return_info: also return a :class:`FuseInfo` with the winner ``[B, *sites]`` (int64)
            and the group ``[N, B, *sites]`` (bool).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`choose_backend`).

    Returns:
        The fused tensor (merge) or a list of N tensors (unmerge), with the shape and dtype of
        the inputs; with ``return_info``, ``(result, info)``. Statistics are float32 (float64
        for float64 inputs with the torch path). Inference only: no gradient is defined.

    Raises:
        TypeError, ValueError: naming the argument and the problem (see docs/api.md).
    """
    feats = check_features(features)
    opt = resolve_options(
        feats, threshold=threshold, unmerge=unmerge, preset=preset, correlation=correlation,
        saliency=saliency, normalize=normalize, weights=weights, channel_dim=channel_dim,
    )
    use_triton = choose_backend(feats[0].device, backend) == "triton"
    n = len(feats)
    outs, winner, members = torch.ops.maxfusion.max_fuse(
        feats, opt.threshold, opt.unmerge, opt.pearson, opt.use_variance,
        opt.batch_normalizer, list(opt.weights) if opt.weights is not None else [1.0] * n,
        opt.channel_dim, return_info, use_triton,
    )
    result = list(outs) if opt.unmerge else outs[0]
    if return_info:
        return result, FuseInfo(winner=winner, members=members)
    return result
