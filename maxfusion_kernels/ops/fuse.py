"""``max_fuse``: MaxFusion of N feature maps (one group) in three Triton passes.

Top to bottom: the backend choice, the registered op ``torch.ops.maxfusion.max_fuse`` and the
public function. The kernels and their launcher are shared with ``max_fuse_many``
(``kernels.py``, ``launch.py``; the work split in ``plan.py``). The semantics are those of
docs/spec.md (executable form: :mod:`maxfusion_kernels.reference`); the passes and the bytes they
move are in docs/design.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..distributed import group_from_name, resolve_group, totals_reducer
from ..options import BACKENDS as _BACKENDS
from ..options import FuseInfo, FuseOptions, check_features, check_masks, resolve_options
from ..torch_backend import fuse_torch
from .launch import HAS_TRITON, cached_call, fuse_cached, fuse_groups

# ----------------------------------------------------------------------------------------
# 1. backend choice
# ----------------------------------------------------------------------------------------


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set, so Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend ``max_fuse`` uses for tensors on ``device``: ``"triton"`` or ``"torch"``.

    ``"auto"``: CUDA tensors use the Triton kernels; CPU tensors use them when
    ``TRITON_INTERPRET=1`` is set (outside ``torch.compile``), else the torch path. Where the
    Triton kernels would run in Triton's interpreter and it cannot run them (Triton 3.6 with
    NumPy >= 2.4, ``ops/interpret.py``), a RuntimeError says so and how to get out of it.
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
        if interp:
            _check_interpreter()
        return "triton"
    if HAS_TRITON and (on_gpu or (interp and not torch.compiler.is_compiling())):
        if interp:
            _check_interpreter()
        return "triton"
    return "torch"


def _check_interpreter() -> None:
    """Raise a clear error where Triton's interpreter cannot run the kernels here (Triton 3.6
    with NumPy >= 2.4: ``ops/interpret.py``), instead of a TypeError from the first launch.
    Not while ``torch.compile`` traces or a dispatch mode (fake tensors) is active: the probe
    runs a kernel on real tensors, so the first eager call checks."""
    if not eager_mode():
        return
    from .interpret import interpreter_problem

    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(problem)


def eager_call(tensors: Sequence[torch.Tensor]) -> bool:
    """True when a call can run its implementation directly, without dispatching the
    registered op: not traced by ``torch.compile``, no dispatch mode (fake or functional
    tensors, ``opcheck``) active, plain tensors. The op costs tens of microseconds of host time
    per call in eager mode; it is what ``torch.compile`` records."""
    return eager_mode() and all(type(t) is torch.Tensor for t in tensors)


def options_from_flags(threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
                       channel_dim) -> FuseOptions:
    """The op schema's flat flags as resolved options."""
    return FuseOptions(
        threshold=threshold,
        unmerge=unmerge,
        correlation="pearson" if pearson else "cosine",
        saliency="variance" if use_variance else "std",
        normalize="batch" if batch_normalizer else "sample",
        weights=None if all(w == 1.0 for w in weights) else tuple(weights),
        channel_dim=channel_dim,
    )


_UNCACHEABLE = object()


def weights_key(weights):
    """``weights`` as part of a call signature (a tuple of Python numbers), or a marker that
    the call is not to be cached (a tensor, numpy values: validated the slow way)."""
    if weights is None:
        return None
    if type(weights) in (list, tuple) and all(type(w) in (int, float) for w in weights):
        return tuple(weights)
    return _UNCACHEABLE


def call_signature(groups, masks, options: tuple) -> tuple | None:
    """A hashable signature of an eager call: the options, and every tensor's (and mask's)
    shape, strides, dtype and device. Everything the validation, the backend choice and the
    plan of a call depend on is in it (mask values apart, which are checked per version), so a
    call whose signature was seen before skips both. None for anything unusual (then the call
    takes the ordinary path)."""
    if _UNCACHEABLE in options:
        return None
    sig: list = [options]
    for grp in groups:
        if type(grp) not in (list, tuple):
            return None
        sig.append(len(grp))
        for t in grp:
            if type(t) is not torch.Tensor:
                return None
            sig.append((t.shape, t.stride(), t.dtype, t.device))
    if masks is not None:
        if type(masks) not in (list, tuple):
            return None
        for ms in masks:
            if ms is None:
                sig.append(None)
                continue
            if type(ms) not in (list, tuple):
                return None
            for m in ms:
                if m is None:
                    sig.append(None)
                elif type(m) is not torch.Tensor:
                    return None
                else:
                    sig.append((m.shape, m.stride(), m.dtype, m.device))
    return tuple(sig)


def needs_grad(groups, masks) -> bool:
    """Whether a call is differentiated: grad mode is on and a feature (or a mask) requires
    grad. Only then does the call go through the registered op with the decisions as extra
    outputs (saved for the backward); otherwise it runs as if there were no autograd."""
    if not torch.is_grad_enabled():
        return False
    for grp in groups:
        if isinstance(grp, (list, tuple)):
            for t in grp:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    return True
    if masks is not None and isinstance(masks, (list, tuple)):
        stack = list(masks)
        while stack:
            m = stack.pop()
            if isinstance(m, (list, tuple)):
                stack.extend(m)
            elif isinstance(m, torch.Tensor) and m.requires_grad:
                return True
    return False


def eager_mode() -> bool:
    """Not traced by ``torch.compile``, no dispatch mode (fake or functional tensors,
    ``opcheck``) active."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def fuse_one(feats: list[torch.Tensor], opt: FuseOptions, return_info: bool,
             masks: list[torch.Tensor | None] | None, use_triton: bool, key=None, group=None):
    """``(outputs, winner [B*S], members [N*B*S])`` of one group by the chosen backend
    (``key``: the call's signature, to cache its plan; ``group``: the resolved process group
    whose ranks hold the other shares of the sites, or None)."""
    reduce = totals_reducer(group, [feats], opt, use_triton) if group is not None else None
    if use_triton:
        outs, winner, members = fuse_groups([feats], opt, return_info,
                                            None if masks is None else [masks], key=key,
                                            reduce_totals=reduce)
        return outs[0], winner, members
    outs, winner, members = fuse_torch(feats, opt, return_info, masks=masks,
                                       reduce_totals=reduce)
    if return_info:
        winner, members = winner.reshape(-1), members.reshape(-1)
    return outs, winner, members


# ----------------------------------------------------------------------------------------
# 2. registered op
# ----------------------------------------------------------------------------------------


def _op_masks(masks: list[torch.Tensor | None]) -> list[torch.Tensor | None] | None:
    return None if len(masks) == 0 or all(m is None for m in masks) else list(masks)


def _empty_info(like: torch.Tensor):
    return like.new_empty((0,), dtype=torch.int64), like.new_empty((0,), dtype=torch.bool)


@torch.library.custom_op("maxfusion::max_fuse", mutates_args=())
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
    masks: list[torch.Tensor | None],
    process_group: str,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``torch.ops.maxfusion.max_fuse``: the fusion with every option spelled out.

    Returns ``(outputs, winner, members)``, the info flat (``B * S`` winners, ``N * B * S``
    members) and empty unless ``return_info``. ``masks``: empty, or N entries (None or a
    checked ``[Bm, *sites]`` mask). ``use_triton`` picks the Triton kernels (CUDA, or CPU with
    ``TRITON_INTERPRET=1``) over the vectorised torch path. ``process_group``: the
    ``group_name`` of the process group whose ranks hold the other shares of the sites
    (``""``: none); its all-reduce of the normalisers runs inside the op. An opaque op:
    ``torch.compile`` records it as one node (``fullgraph=True`` works, also with a process
    group: no graph break) and runs it as in eager mode.
    """
    opt = options_from_flags(threshold, unmerge, pearson, use_variance, batch_normalizer,
                             weights, channel_dim)
    outs, winner, members = fuse_one(list(features), opt, return_info, _op_masks(masks),
                                     use_triton, group=group_from_name(process_group))
    if not return_info:
        winner, members = _empty_info(features[0])
    return outs, winner, members


@_max_fuse_op.register_fake
def _(features, threshold, unmerge, pearson, use_variance, batch_normalizer, weights,
      channel_dim, return_info, use_triton, masks, process_group):
    opt = options_from_flags(threshold, unmerge, pearson, use_variance, batch_normalizer,
                             weights, channel_dim)
    outs, winner, members = fuse_groups([list(features)], opt, return_info, launch=False)
    if not return_info:
        winner, members = _empty_info(features[0])
    return outs[0], winner, members


# ----------------------------------------------------------------------------------------
# 3. public function
# ----------------------------------------------------------------------------------------


def info_views(winner: torch.Tensor, members: torch.Tensor, like: torch.Tensor,
               channel_dim: int, n: int) -> FuseInfo:
    """``FuseInfo`` of one group from its flat info: winners ``[B, *sites]``, members
    ``[N, B, *sites]``."""
    moved = like.movedim(channel_dim, 1).shape
    return FuseInfo(winner=winner.view(moved[0], *moved[2:]),
                    members=members.view(n, moved[0], *moved[2:]))


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
    masks: Sequence[torch.Tensor | None] | None = None,
    channel_dim: int = 1,
    return_info: bool = False,
    backend: str = "auto",
    process_group=None,
):
    """Fuse N feature tensors of one shape with MaxFusion (docs/spec.md).

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
        masks: None, or N entries, each None or a floating tensor of values in [0, 1] that
            broadcasts to the sites, ``[B, *sites]`` (e.g. ``[H, W]``, ``[B, L]``), or to the
            features with size 1 at ``channel_dim`` (e.g. ``[1, 1, H, W]``, ``[B, L, 1]``):
            per-site weights, applied with ``weights``; a 0 removes the input at that site.
        return_info: also return a :class:`FuseInfo` with the winner ``[B, *sites]`` (int64)
            and the group ``[N, B, *sites]`` (bool).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`choose_backend`).
        process_group: sharded sites (docs/spec.md): a ``torch.distributed`` process group (or a
            1-D ``DeviceMesh``) whose ranks each hold a contiguous share of the sites of every
            sample, with the whole batch and all channels (e.g. the tokens of a DiT under
            context parallelism). The normalisers are summed over the ranks by one all-reduce
            of ``4 * N * B`` bytes (``4 * N`` for the batch normaliser) between the kernel
            passes, with no host sync; each rank gets its slice of the fusion of all the sites.
            Every rank must make the same call (same N, B, C, options; the number of sites
            may differ); this is checked with one small all-reduce and host sync the first
            time a call of this shape is made over the group. ``None``: the sites are all here.

    Returns:
        The fused tensor (merge) or a list of N tensors (unmerge), with the shape and dtype of
        the inputs; with ``return_info``, ``(result, info)``. Statistics are float32 (float64
        for float64 inputs with the torch path). Differentiable with the decisions held fixed
        (docs/algorithm.md, "The gradient").

    Raises:
        TypeError, ValueError: naming the argument and the problem (see docs/api.md).
    """
    key = None
    group = resolve_group(process_group) if process_group is not None else None
    grad = needs_grad([features], masks)
    if eager_mode() and not grad:  # a call whose signature was seen: no validation, no plan
        options = (threshold, unmerge, preset, correlation, saliency, normalize,
                   weights_key(weights), channel_dim, return_info, backend,
                   interpreter_enabled(), None if group is None else group.group_name)
        key = call_signature([features], None if masks is None else [masks], options)
        cp = cached_call(key) if key is not None else None
        if cp is not None:
            feats = list(features)
            cd = cp.opt.channel_dim
            ms = _check_masks(masks, feats, cd)
            reduce = None if group is None else totals_reducer(group, [feats], cp.opt, True)
            outs, winner, members = fuse_cached(cp, [feats], None if ms is None else [ms],
                                                reduce_totals=reduce)
            result = outs[0] if cp.opt.unmerge else outs[0][0]
            if return_info:
                return result, info_views(winner, members, feats[0], cd, cp.n)
            return result
    feats = check_features(features)
    opt = resolve_options(
        feats, threshold=threshold, unmerge=unmerge, preset=preset, correlation=correlation,
        saliency=saliency, normalize=normalize, weights=weights, channel_dim=channel_dim,
    )
    checked_masks = _check_masks(masks, feats, opt.channel_dim)
    use_triton = choose_backend(feats[0].device, backend) == "triton"
    n = len(feats)
    if eager_call(feats) and not grad:
        outs, winner, members = fuse_one(feats, opt, return_info, checked_masks, use_triton,
                                         key=key, group=group)
    else:  # traced, or differentiated: the registered op (and its registered backward),
        # which then also returns the decisions for the backward to save
        outs, winner, members = torch.ops.maxfusion.max_fuse(
            feats, opt.threshold, opt.unmerge, opt.pearson, opt.use_variance,
            opt.batch_normalizer, list(opt.weights) if opt.weights is not None else [1.0] * n,
            opt.channel_dim, return_info or grad, use_triton,
            op_masks(checked_masks, feats[0], opt.channel_dim, grad),
            "" if group is None else group.group_name,
        )
    result = list(outs) if opt.unmerge else outs[0]
    if return_info:
        return result, info_views(winner, members, feats[0], opt.channel_dim, n)
    return result


def op_masks(masks, like: torch.Tensor, channel_dim: int, grad) -> list:
    """The op's ``masks`` argument: empty, or one entry per input. When a mask requires grad
    the None entries are filled with a ones view ``[1, *sites]`` (stride 0: no copy; a mask
    of ones is bitwise no mask): autograd sees a list with a None in it as a constant, so
    only a list of tensors carries mask gradients. ``grad="fill"``: fill in any case."""
    if masks is None:
        return []
    masks = list(masks)
    if grad == "fill" or (grad and any(m is not None and m.requires_grad for m in masks)
                          and None in masks):
        sites = [s for d, s in enumerate(like.shape) if d not in (0, channel_dim % like.dim())]
        ones = like.new_ones((1,) * (1 + len(sites))).expand(1, *sites)
        masks = [ones if m is None else m for m in masks]
    return masks


def _check_masks(masks, feats, channel_dim, what="masks"):
    """Checked masks ``[Bm, *sites]`` (``options.check_masks``), or None when none is set."""
    if masks is None:
        return None
    checked = check_masks(masks, feats, channel_dim, what=what)
    return None if all(m is None for m in checked) else checked
