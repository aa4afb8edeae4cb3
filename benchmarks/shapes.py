"""The shape table (``shapes.json`` beside this file) and synthetic inputs for it.

Shared by the tests and the benchmarks, so both exercise the same shapes. Imports only torch,
json and pathlib.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES_JSON = Path(__file__).resolve().parent / "shapes.json"

# Squared weight of the shared component in an input (~ the cosine correlation of two inputs):
# above the default threshold 0.7 where inputs agree, below it where they do not.
AGREE_SHARE = 0.9
DISAGREE_SHARE = 0.3


def load_shapes() -> dict:
    """The table as a dict: ``n_inputs``, ``dtypes`` (names of torch dtypes) and ``cases``,
    ``{name: {"shapes": [[...], ...], "channel_dim": int, "note": str}}``."""
    with open(SHAPES_JSON, encoding="utf-8") as fh:
        return json.load(fh)


def make_features(
    shape,
    n: int,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    channel_dim: int = 1,
    seed: int = 0,
) -> list[torch.Tensor]:
    """``n`` random contiguous tensors of ``shape`` that partly agree, so that a fusion takes
    both the average and the winner branches.

    Input ``k`` at site ``p`` is ``scale_k(p) * (a(p) * base(p) + b(p) * noise_k(p))`` with
    ``a^2 + b^2 = 1``, so two inputs have a correlation close to ``a(p)^2`` over the channels:

    - first half of the sites of every sample (in flat site order: the top half of a map, the
      first half of the tokens): ``a^2 = 0.9``, every input correlated above 0.7 (averaged);
    - second half: ``a^2 = 0.3``, uncorrelated (the winner is kept). For ``n > 2``, inputs 0 and
      1 share a second base there with ``a^2 = 0.9``, so groups of two out of ``n`` occur too.

    ``scale_k(p) = exp(0.5 * z)``, one standard normal ``z`` per input, sample and site, makes
    the winner vary from site to site. Values are drawn in float32 from a generator on
    ``device`` seeded with ``seed`` (reproducible per device), then cast to ``dtype``.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    cd = channel_dim % len(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*size):
        return torch.randn(size, generator=gen, device=device, dtype=torch.float32)

    site_view = [1 if d in (0, cd) else s for d, s in enumerate(shape)]  # sites, in order
    n_sites = 1
    for s in site_view:
        n_sites *= s
    agree = (torch.arange(n_sites, device=device) < n_sites // 2).view(site_view)
    scale_view = [shape[0], *site_view[1:]]

    base = randn(*shape)
    base2 = randn(*shape) if n > 2 else None
    feats = []
    for k in range(n):
        paired = base2 is not None and k < 2
        share = torch.where(agree, AGREE_SHARE, AGREE_SHARE if paired else DISAGREE_SHARE)
        shared = torch.where(agree, base, base2) if paired else base
        x = share.sqrt() * shared + (1.0 - share).sqrt() * randn(*shape)
        x = x * torch.exp(0.5 * randn(*scale_view))
        feats.append(x.to(dtype))
    return feats
