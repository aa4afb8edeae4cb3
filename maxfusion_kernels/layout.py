"""How N feature tensors are addressed by the kernels, without transposing copies.

A tensor of shape ``[B, ..., C, ...]`` (channel dim anywhere but 0) is seen as ``[B, C, sites]``:
the site dims (all but the batch and the channel dim) are collapsed where their strides allow,
in the input and the output at once. The kernels address at most two site runs (``outer`` x
``inner``), which covers contiguous and channels-last maps, tokens, video and most strided
views; anything else is first copied to a contiguous tensor (documented in docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SiteLayout:
    """``[B, C, S]`` view of same-shape tensors; strides in elements."""

    batch: int
    channels: int
    sites: int  # S = outer * inner
    inner: int  # size of the inner site run (1 when there is a single run)
    two_runs: bool
    in_strides: tuple[int, int, int, int]  # batch, channel, outer site, inner site
    out_strides: tuple[int, int, int, int]


def _runs(shape, strides_list, site_dims):
    """Collapse the site dims into runs ``(size, [stride per tensor])``, outermost first."""
    runs: list[tuple[int, list[int]]] = []
    for d in site_dims:
        size = shape[d]
        if size == 1:
            continue
        strides = [st[d] for st in strides_list]
        if runs:
            psize, pstrides = runs[-1]
            if all(ps == s * size for ps, s in zip(pstrides, strides)):
                runs[-1] = (psize * size, strides)
                continue
        runs.append((size, strides))
    return runs


def site_layout(x: torch.Tensor, out: torch.Tensor, channel_dim: int) -> SiteLayout | None:
    """The kernels' view of input ``x`` and output ``out`` (same shape), or ``None`` when the
    site dims of either cannot be expressed as at most two strided runs."""
    shape = x.shape
    site_dims = [d for d in range(1, x.dim()) if d != channel_dim]
    runs = _runs(shape, [x.stride(), out.stride()], site_dims)
    if len(runs) > 2:
        return None
    sites = 1
    for size, _ in runs:
        sites *= size
    if len(runs) == 0:
        outer, inner = (0, 0), (0, 0)
        inner_size = 1
    elif len(runs) == 1:
        outer, inner = tuple(runs[0][1]), (0, 0)
        inner_size = 1
    else:
        outer, inner = tuple(runs[0][1]), tuple(runs[1][1])
        inner_size = runs[1][0]
    return SiteLayout(
        batch=shape[0],
        channels=shape[channel_dim],
        sites=sites,
        inner=inner_size,
        two_runs=len(runs) == 2,
        in_strides=(x.stride(0), x.stride(channel_dim), outer[0], inner[0]),
        out_strides=(out.stride(0), out.stride(channel_dim), outer[1], inner[1]),
    )
