"""The fusions the hook layer makes: one step's residuals (merge) and one fusion point (unmerge).

Everything that calls the kernels for the hooks is in this file: :func:`fuse_residual_groups`
fuses one step's residuals in one :func:`maxfusion_kernels.max_fuse_many` call (three kernel
launches on a GPU, whatever the number of residuals).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from maxfusion_kernels import max_fuse, max_fuse_many
from maxfusion_kernels.distributed import resolve_group
from maxfusion_kernels.options import BACKENDS, check_features, resolve_options

GLOBAL_POOL_MODES = ("mean", "fuse")

# max_fuse options a user may set through apply(); the others are the hook layer's business
USER_OPTIONS = ("threshold", "preset", "correlation", "saliency", "normalize", "backend",
                "channel_dim")
_MANAGED = {
    "unmerge": "block level unmerges inside the models and merges their outputs by itself",
    "weights": "the conditioning scales of the pipeline are the weights",
    "return_info": "use record=True to keep the winner maps",
}


class Record(NamedTuple):
    """One fusion kept by a handle made with ``record=True``.

    ``step``: index of the call to the patched combiner (or to ``handle.run``) since ``apply``,
    from 0; the ControlNet pipelines call their combiner once per denoising step.
    ``point``: the fusion's name (see docs/integration.md, "Recording").
    ``winner``: ``[B, *sites]`` int64, a clone: per site, the index of the winning control
    model in the combiner's (or the list's) own numbering, so nets skipped at that step (scale
    0) never appear and indices do not shift when they are skipped.
    """

    step: int
    point: str
    winner: torch.Tensor


@dataclass(frozen=True)
class FusionSettings:
    """The options of every fusion one handle makes.

    ``process_group``: sharded sites (``max_fuse``'s ``process_group``): the features every
    fusion sees on this rank are this rank's contiguous share of the sites, and the
    normalisers are summed over the group's ranks; ``None``: the sites are all here."""

    options: tuple[tuple[str, object], ...] = ()  # threshold, preset, ... as passed to max_fuse
    channel_dim: int = 1
    global_pool: str = "mean"
    process_group: Any = None

    @property
    def kwargs(self) -> dict:
        kw = dict(self.options)
        if self.process_group is not None:
            kw["process_group"] = self.process_group
        return kw

    def one_site_mean(self, t: torch.Tensor) -> bool:
        """Whether a one-site residual is averaged instead of fused (``global_pool="mean"``).
        Never with sharded sites: a rank's share may have one site where another has more,
        and every rank must take part in the same fusions."""
        return (self.global_pool == "mean" and self.process_group is None
                and _one_site(t, self.channel_dim))


def make_settings(max_fuse_options: dict, *, channel_dim: int | None, global_pool: str,
                  fixed_channel_dim: int | None = None, process_group: Any = None
                  ) -> FusionSettings:
    """Validate ``apply``'s max_fuse options (before any forward runs) into settings.

    ``fixed_channel_dim``: the channel dim a model family fixes (NCHW maps: 1, DiT tokens: -1);
    a different ``channel_dim`` from the user is an error. ``process_group``: checked and
    resolved as ``max_fuse`` does (a group of one rank is ``None``).
    """
    for key in max_fuse_options:
        if key in _MANAGED:
            raise TypeError(f"apply() does not take {key!r}: {_MANAGED[key]}")
        if key not in USER_OPTIONS:
            raise TypeError(
                f"apply() got an unexpected keyword argument {key!r}; max_fuse options it "
                f"accepts: {list(USER_OPTIONS)}"
            )
    if global_pool not in GLOBAL_POOL_MODES:
        raise ValueError(f"global_pool must be one of {list(GLOBAL_POOL_MODES)}, "
                         f"got {global_pool!r}")
    opts = dict(max_fuse_options)
    opts.pop("channel_dim", None)
    backend = opts.get("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if fixed_channel_dim is not None:
        if channel_dim is not None and channel_dim != fixed_channel_dim:
            raise ValueError(
                f"channel_dim={channel_dim} does not fit this model family, whose features "
                f"have their channels at dim {fixed_channel_dim}; leave channel_dim out"
            )
        channel_dim = fixed_channel_dim
    channel_dim = 1 if channel_dim is None else channel_dim
    # the same validation as the kernels, on a dummy pair: errors before any forward runs
    dummy = [torch.zeros(1, 2, 1), torch.zeros(1, 2, 1)]
    resolve_options(dummy, **{k: v for k, v in opts.items() if k != "backend"})
    return FusionSettings(options=tuple(sorted(opts.items())), channel_dim=channel_dim,
                          global_pool=global_pool, process_group=resolve_group(process_group))


@dataclass
class Recorder:
    """Collects :class:`Record` s when enabled."""

    enabled: bool = False
    records: list[Record] = field(default_factory=list)
    step: int = 0

    def add(self, point: str, winner: torch.Tensor, nets: Sequence[int]) -> None:
        ids = torch.as_tensor(list(nets), dtype=torch.int64, device=winner.device)
        self.records.append(Record(self.step, point, ids[winner]))  # indexing copies


def _one_site(t: torch.Tensor, channel_dim: int) -> bool:
    """True when every sample has a single site (``[B, C, 1, 1]``, ``[B, C]``, ``[B, 1, C]``)."""
    if t.dim() < 2 or t.shape[0] == 0:
        return False
    c = t.shape[channel_dim]
    return c > 0 and t.numel() == t.shape[0] * c


def _weighted_mean(feats: Sequence[torch.Tensor], weights: Sequence[float] | None,
                   masks: Sequence[torch.Tensor | None] | None = None):
    """Mean of the weighted inputs whose weight is not 0, computed in float32 (or wider).

    ``masks``: per input ``None`` or a ``[Bm]`` per-sample weight (a mask resized to the one
    site of the sample): a per-sample factor, and an input of mask 0 does not count in that
    sample's mean."""
    n = len(feats)
    if masks is not None and any(m is not None for m in masks):
        return _masked_mean(feats, weights, masks)
    w = list(weights) if weights is not None else [1.0] * n
    present = [(f, wi) for f, wi in zip(feats, w) if wi != 0]
    if not present:
        return torch.zeros_like(feats[0])
    acc_dtype = torch.promote_types(feats[0].dtype, torch.float32)
    acc = None
    for f, wi in present:
        x = f.to(acc_dtype) if wi == 1 else f.to(acc_dtype) * wi
        acc = x if acc is None else acc + x
    return (acc / len(present)).to(feats[0].dtype)


def _masked_mean(feats, weights, masks):
    n = len(feats)
    f0 = feats[0]
    acc_dtype = torch.promote_types(f0.dtype, torch.float32)
    w = list(weights) if weights is not None else [1.0] * n
    shape = (-1,) + (1,) * (f0.dim() - 1)  # per sample
    acc = torch.zeros(f0.shape, dtype=acc_dtype, device=f0.device)
    count = torch.zeros((f0.shape[0],) + (1,) * (f0.dim() - 1), dtype=acc_dtype,
                        device=f0.device)
    for f, wi, m in zip(feats, w, masks):
        if wi == 0:
            continue
        mi = (torch.ones(1, dtype=acc_dtype, device=f0.device) if m is None
              else m.to(acc_dtype)).reshape(shape) * wi
        acc += torch.where(mi == 0, 0.0, f.to(acc_dtype) * mi)
        count += (mi != 0).to(acc_dtype)
    return (acc / count.clamp_min(1)).to(f0.dtype)

def unmerge(feats: Sequence[torch.Tensor], *, settings: FusionSettings, name: str,
            nets: Sequence[int], recorder: Recorder | None = None,
            masks: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """MaxFusion unmerge at one fusion point: one fused stream per model.

    ``masks``: ``None`` or one ``max_fuse`` mask (or ``None``) per model."""
    feats = check_features(list(feats), what=f"features at fusion point {name!r}")
    if settings.one_site_mean(feats[0]):
        m = _weighted_mean(feats, None, masks)
        if masks is None or all(mi is None for mi in masks):
            return [m.clone() for _ in feats]
        # a model removed by its mask in a sample gets zeros there, as max_fuse's unmerge
        shape = (-1,) + (1,) * (m.dim() - 1)
        return [m.clone() if mi is None else torch.where(mi.reshape(shape) == 0, 0.0, m)
                for mi in masks]
    record = recorder is not None and recorder.enabled
    res = max_fuse(feats, unmerge=True, channel_dim=settings.channel_dim, return_info=record,
                   masks=masks, **settings.kwargs)
    if record:
        res, info = res
        recorder.add(name, info.winner, nets)
    return res


def fuse_residual_groups(
    groups: Sequence[Sequence[torch.Tensor | None]],
    *,
    settings: FusionSettings,
    names: Sequence[str] | None = None,
    nets: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    recorder: Recorder | None = None,
    masks: Sequence[Sequence[torch.Tensor | None] | None] | None = None,
) -> list[torch.Tensor | None]:
    """Merge one step's residuals, residual index by residual index (one place for all).

    Args:
        groups: one group per residual index; a group holds that residual of each of the N
            nets taking part (same shape). A group of ``None`` s (e.g. Flux's absent single-block
            samples) gives ``None``.
        names: a name per group (for records), default ``"residual.<k>"``.
        nets: the N nets' indices in their combiner (for records), default ``0..N-1``.
        weights: N floats >= 0 multiplied into the inputs first (``max_fuse``'s ``weights``);
            ``None`` when the nets applied their conditioning scales themselves.
        recorder: collects the winner maps when enabled.
        masks: regional masks at the residuals' grids: ``None``, or one entry per group,
            ``None`` or N masks as ``max_fuse`` takes them (``[Bm, *sites]``, values in
            [0, 1]). A handle made with ``apply(..., masks=...)`` resizes its image-space
            masks to every residual and passes them here.

    Returns:
        One merged tensor per group. With N = 1 the single net's residual (times its weight).
        A residual with one site per sample (``[B, C, 1, 1]``, global-pool ControlNets) is the
        mean of the weighted inputs when ``settings.global_pool == "mean"`` (and no
        ``settings.process_group``: with one, every group is fused, in one call whose
        normalisers are summed over the group's ranks).
    """
    if not groups:
        return []
    if masks is not None and len(masks) != len(groups):
        raise ValueError(f"masks has {len(masks)} entries for {len(groups)} residuals")
    group_masks = list(masks) if masks is not None else [None] * len(groups)
    n = len(groups[0])
    names = list(names) if names is not None else [f"residual.{k}" for k in range(len(groups))]
    nets = list(nets) if nets is not None else list(range(n))
    out: list[torch.Tensor | None] = []
    batched: list[tuple[int, str, list[torch.Tensor], Any]] = []  # slot, name, group, masks
    for name, group, gm in zip(names, groups, group_masks):
        if len(group) != n:
            raise ValueError(f"residual {name!r}: {len(group)} tensors, expected {n}")
        missing = [t is None for t in group]
        if all(missing):
            out.append(None)
            continue
        if any(missing):
            raise ValueError(f"residual {name!r}: some nets returned None and others a tensor")
        if n == 1 and (gm is None or gm[0] is None):
            w = None if weights is None else weights[0]
            out.append(group[0] if w is None or w == 1 else group[0] * w)
            continue
        if n == 1:  # one net with a mask: its residual weighted per site
            out.append(_single_masked(group[0], None if weights is None else weights[0],
                                      gm[0], settings.channel_dim))
            continue
        feats = check_features(list(group), what=f"residual {name!r}")
        if settings.one_site_mean(feats[0]):
            out.append(_weighted_mean(feats, weights, gm))
            continue
        batched.append((len(out), name, feats, gm))
        out.append(None)
    if batched:
        record = recorder is not None and recorder.enabled
        any_mask = any(gm is not None for *_, gm in batched)
        res = max_fuse_many([feats for _, _, feats, _ in batched], unmerge=False, weights=weights,
                            channel_dim=settings.channel_dim, return_info=record,
                            masks=[gm for *_, gm in batched] if any_mask else None,
                            **settings.kwargs)
        results, infos = res if record else (res, [None] * len(batched))
        for (slot, name, _, _), fused, info in zip(batched, results, infos):
            out[slot] = fused
            if record:
                recorder.add(name, info.winner, nets)
    return out


def _single_masked(t: torch.Tensor, weight: float | None, mask: torch.Tensor,
                   channel_dim: int) -> torch.Tensor:
    """One net's residual times its weight and its ``[Bm, *sites]`` mask (0 where the mask
    is 0, even for inf or NaN): what the fusion of that net alone gives."""
    m = mask.unsqueeze(channel_dim % t.dim()).to(torch.promote_types(t.dtype, torch.float32))
    x = t.to(m.dtype) * (1.0 if weight is None else weight) * m
    return torch.where(m == 0, 0.0, x).to(t.dtype)
