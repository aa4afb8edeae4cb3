"""Options of a MaxFusion call: presets, validation and the resolved option record.

Every public entry point (the kernels, the torch path and the float64 reference) resolves its
keyword arguments through :func:`resolve_options` and checks its inputs with
:func:`check_features` (and regional masks with :func:`check_masks`), so that bad input gets the
same clear exception whichever backend runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

MAX_INPUTS = 8
"""The largest number of inputs one fusion accepts (the kernels unroll over at most 8)."""

CORRELATIONS = ("cosine", "pearson")
SALIENCIES = ("std", "variance")
NORMALIZERS = ("sample", "batch")
BACKENDS = ("auto", "triton", "torch")

PRESETS: dict[str, tuple[str, str, str]] = {
    # the formulas as printed in the paper
    "paper": ("cosine", "std", "sample"),
    # the authors' released code
    "reference": ("pearson", "variance", "batch"),
}

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class FuseOptions:
    """Resolved options of one fusion (see docs/spec.md)."""

    threshold: float
    unmerge: bool
    correlation: str
    saliency: str
    normalize: str
    weights: tuple[float, ...] | None
    channel_dim: int  # normalised to a non-negative dim

    @property
    def pearson(self) -> bool:
        return self.correlation == "pearson"

    @property
    def use_variance(self) -> bool:
        return self.saliency == "variance"

    @property
    def batch_normalizer(self) -> bool:
        return self.normalize == "batch"


def _choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_features(features: object, *, what: str = "features") -> list[torch.Tensor]:
    """Check a sequence of N feature tensors; return it as a list.

    Raises ``TypeError`` / ``ValueError`` naming the problem: fewer than 2 or more than
    ``MAX_INPUTS`` inputs, non-tensors, differing shapes, dtypes or devices, unsupported dtypes.
    """
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
        raise TypeError(
            f"{what} must be a list or tuple of tensors (one per control model), "
            f"got {type(features).__name__}"
        )
    feats = list(features)
    if len(feats) < 2:
        raise ValueError(f"{what} needs at least 2 tensors to fuse, got {len(feats)}")
    if len(feats) > MAX_INPUTS:
        raise ValueError(f"{what} has {len(feats)} tensors; at most {MAX_INPUTS} are supported")
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(f).__name__}")
    f0 = feats[0]
    for i, f in enumerate(feats[1:], start=1):
        if f.shape != f0.shape:
            raise ValueError(
                f"{what} must all have the same shape: {what}[0] is {tuple(f0.shape)}, "
                f"{what}[{i}] is {tuple(f.shape)}"
            )
        if f.dtype != f0.dtype:
            raise ValueError(
                f"{what} must all have the same dtype: {what}[0] is {f0.dtype}, "
                f"{what}[{i}] is {f.dtype}"
            )
        if f.device != f0.device:
            raise ValueError(
                f"{what} must all be on the same device: {what}[0] is on {f0.device}, "
                f"{what}[{i}] is on {f.device}"
            )
    if f0.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} must have a floating dtype among {[str(d) for d in SUPPORTED_DTYPES]}, "
            f"got {f0.dtype}"
        )
    if f0.dim() < 2:
        raise ValueError(
            f"{what} must have a batch and a channel dimension (at least 2 dims), "
            f"got shape {tuple(f0.shape)}"
        )
    return feats


def resolve_options(
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
) -> FuseOptions:
    """Validate the options against already checked ``features``; apply the preset."""
    preset = _choice("preset", preset, tuple(PRESETS))
    p_corr, p_sal, p_norm = PRESETS[preset]
    corr = _choice("correlation", p_corr if correlation is None else correlation, CORRELATIONS)
    sal = _choice("saliency", p_sal if saliency is None else saliency, SALIENCIES)
    norm = _choice("normalize", p_norm if normalize is None else normalize, NORMALIZERS)

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float in [-1, 1], got {type(threshold).__name__}")
    threshold = float(threshold)
    if not math.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a finite float in [-1, 1], got {threshold}")
    if not isinstance(unmerge, bool):
        raise TypeError(f"unmerge must be a bool, got {type(unmerge).__name__}")

    ndim = features[0].dim()
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    if not -ndim <= channel_dim < ndim:
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for tensors with {ndim} dims"
        )
    cd = channel_dim % ndim
    if cd == 0:
        raise ValueError("channel_dim must not be 0: dimension 0 is the batch")
    n_channels = features[0].shape[cd]
    if n_channels < 2:
        raise ValueError(
            f"the channel dimension (dim {cd}) has size {n_channels}; at least 2 channels are "
            "needed for an unbiased variance"
        )

    w: tuple[float, ...] | None = None
    if weights is not None:
        if isinstance(weights, torch.Tensor):
            if weights.dim() != 1:
                raise ValueError(f"weights must be 1-D, got shape {tuple(weights.shape)}")
            weights = weights.tolist()  # a host sync: pass Python floats to avoid it
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a sequence of floats, got {type(weights).__name__}")
        if len(weights) != len(features):
            raise ValueError(
                f"weights has {len(weights)} entries but there are {len(features)} features"
            )
        vals = []
        for i, v in enumerate(weights):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"weights[{i}] must be a float, got {type(v).__name__}")
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"weights[{i}] must be finite and >= 0, got {v}")
            vals.append(v)
        w = tuple(vals)

    return FuseOptions(
        threshold=threshold,
        unmerge=unmerge,
        correlation=corr,
        saliency=sal,
        normalize=norm,
        weights=w,
        channel_dim=cd,
    )


# mask tensors whose values were checked, -> the tensor's version counter at that check: a
# mask is checked (one device-to-host sync) once per version, not at every call. Keyed by
# identity (a tensor's ``==`` is elementwise, so ``weakref.WeakKeyDictionary`` cannot hold it).
_CHECKED_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _skip_value_check(mask: torch.Tensor) -> bool:
    """No value check where it would break the caller: while a CUDA graph is captured (a sync
    is illegal there), while ``torch.compile`` traces (the values are not known), and for
    tensors without data (``meta``)."""
    if mask.device.type == "meta" or torch.compiler.is_compiling():
        return True
    return mask.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_mask_values(mask: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless every value of ``mask`` is in [0, 1] (NaN is not).

    One device-to-host sync, made once per version of ``mask`` (an in-place change bumps
    the version and the mask is checked again). Inference tensors have no version counter:
    they are checked at every call.
    """
    if _skip_value_check(mask):
        return
    version = None if mask.is_inference() else mask._version
    if version is not None and _CHECKED_MASKS.get(mask) == version:
        return
    if not bool(((mask >= 0) & (mask <= 1)).all()):  # NaN fails both comparisons
        nan = int(torch.isnan(mask).sum())
        finite = mask[~torch.isnan(mask)]
        span = (f"min {float(finite.min()):g}, max {float(finite.max()):g}"
                if finite.numel() else "no number")
        raise ValueError(
            f"{name} must have values in [0, 1] (0 removes the input at a site, 1 keeps it "
            f"whole); it has {span}" + (f" and {nan} NaN" if nan else "")
        )
    if version is not None:
        _CHECKED_MASKS[mask] = version


def check_masks(masks: object, features: Sequence[torch.Tensor], channel_dim: int, *,
                what: str = "masks") -> list[torch.Tensor | None]:
    """Check regional masks against checked ``features``; return one entry per input.

    ``masks``: a sequence of N entries, each ``None`` (1 everywhere) or a floating tensor on
    the features' device that broadcasts to ``[B, *sites]``: either with the features' number
    of dims and size 1 at ``channel_dim`` (``[1, 1, H, W]``, ``[B, 1, H, W]`` for NCHW maps,
    ``[B, L, 1]`` for tokens), or with fewer dims, aligned from the right against
    ``[B, *sites]`` (``[B, H, W]``, ``[H, W]``, ``[B, L]``). ``channel_dim`` is the features'
    channel dim, already resolved (non-negative).

    Returns each mask as a view ``[Bm, *sites]`` (``Bm`` = 1 or B; size-1 site dims expanded
    with stride 0, nothing copied), in its own floating dtype, or ``None``.

    Raises ``TypeError`` (not a sequence, an entry that is not a tensor, an integer, bool or
    complex dtype) or ``ValueError`` (a wrong number of entries, another device, a shape that
    does not broadcast, a value outside [0, 1] or NaN), naming ``{what}[i]``. The values are
    checked with one device-to-host sync per mask, once per version of the tensor; not while
    a CUDA graph is captured nor while ``torch.compile`` traces.
    """
    n = len(features)
    if isinstance(masks, (torch.Tensor, str, bytes)) or not isinstance(masks, Sequence):
        raise TypeError(
            f"{what} must be a list or tuple with one entry (a tensor or None) per input, "
            f"got {type(masks).__name__}"
        )
    if len(masks) != n:
        raise ValueError(f"{what} has {len(masks)} entries but there are {n} features "
                         "(one mask or None per input)")
    f0 = features[0]
    site_dims = [d for d in range(1, f0.dim()) if d != channel_dim]
    target = (f0.shape[0], *(f0.shape[d] for d in site_dims))  # [B, *sites]
    out: list[torch.Tensor | None] = []
    for i, m in enumerate(masks):
        name = f"{what}[{i}]"
        if m is None:
            out.append(None)
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(m).__name__}")
        if not m.is_floating_point():
            hint = (" (convert a bool or integer mask with .float(), a uint8 image with "
                    "/ 255)" if not m.is_complex() else "")
            raise TypeError(f"{name} must have a floating dtype with values in [0, 1], got "
                            f"{m.dtype}{hint}")
        if m.device != f0.device:
            raise ValueError(f"{name} is on {m.device} but the features are on {f0.device}")
        out.append(_broadcast_mask(m, name, f0, channel_dim, target))
        _check_mask_values(m, name)
    return out


def _broadcast_mask(m: torch.Tensor, name: str, f0: torch.Tensor, channel_dim: int,
                    target: tuple[int, ...]) -> torch.Tensor:
    """``m`` as a ``[Bm, *sites]`` view (see :func:`check_masks`)."""
    shape_msg = (f"{name} has shape {tuple(m.shape)}, which does not broadcast to [B, *sites] "
                 f"= {list(target)} of features of shape {tuple(f0.shape)} (channels at dim "
                 f"{channel_dim})")
    v = m
    if m.dim() == f0.dim():
        if m.shape[channel_dim] != 1:
            raise ValueError(f"{shape_msg}: a mask with the features' {f0.dim()} dims needs "
                             f"size 1 at the channel dim {channel_dim}")
        v = m.squeeze(channel_dim)
    elif m.dim() > len(target):
        raise ValueError(f"{shape_msg}: it has more dims than the features' sites")
    v = v[(None,) * (len(target) - v.dim())]  # align from the right
    for size, want in zip(v.shape, target):
        if size not in (1, want):
            raise ValueError(shape_msg)
    return v.expand(v.shape[0], *target[1:])


@dataclass
class FuseInfo:
    """What a fusion decided, per site (``return_info=True``).

    ``winner``: int64 tensor ``[B, *sites]``, the index of the winning input at each site.
    ``members``: bool tensor ``[N, B, *sites]``, the group ``G`` of docs/spec.md (inputs averaged
    into the merged output; includes the winner, except at a site where every input is
    removed by a weight or mask of 0: no member there).
    """

    winner: torch.Tensor
    members: torch.Tensor
