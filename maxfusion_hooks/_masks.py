"""Regional masks of the hook layer: image-space masks, one per control model, resized to the
grid of every fusion.

A user gives one mask per control model (or ``None``) at the image's resolution: a PIL image,
a numpy array or a tensor, ``[H, W]`` or ``[B, H, W]``, values in [0, 1]. Every fusion (a
residual merge, a block-level fusion point) has features on its own grid: a UNet map
``[B', C, h, w]``, DiT tokens ``[B', L, C]`` on an ``h x w`` token grid. :class:`RegionMasks`
resizes each mask to that grid with an area average (``adaptive_avg_pool2d``: a soft edge stays
soft, a cell half covered gets 0.5), tiles it to the features' batch (``B'`` is a multiple of
the mask's ``B``: the two halves of classifier-free guidance get the same mask), and hands
``max_fuse_many`` / ``max_fuse`` the ``[Bm, *sites]`` masks they take. The resized masks are
cached per grid, batch, device and dtype, so a denoising loop resizes once per grid, not at
every step, and the kernels check each cached mask's values once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

_CACHE_SIZE = 256  # resized masks kept per handle (a step of an SD pipeline uses about 20)


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "mode") and hasattr(
        obj, "size")


def _pil_array(img, name: str):
    import numpy as np

    mode = img.mode
    if mode == "1":
        return np.array(img, dtype=bool)
    if mode == "F":
        return np.array(img, dtype=np.float32)
    if mode.startswith("I;16"):
        return np.array(img).astype(np.float32) / 65535.0
    if mode in ("I", "I;32"):
        raise TypeError(f"{name}: a PIL image of mode {mode} (32-bit integers); give a mode L "
                        "(8-bit), 1 (binary) or F (floats in [0, 1]) image")
    return np.array(img.convert("L"))  # uint8 luminance (RGB, RGBA, P, LA, ...)


def image_mask(obj: Any, name: str) -> torch.Tensor:
    """One user mask as a float32 tensor ``[Bm, H, W]`` with values in [0, 1].

    Accepts a PIL image (mode ``1``: 0 / 1; ``L`` and every 8-bit mode, converted to ``L``:
    / 255; ``I;16``: / 65535; ``F``: floats), a numpy array or a tensor (bool: 0 / 1; uint8:
    / 255; floating: as is), shaped ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``. Raises
    ``TypeError`` / ``ValueError`` naming ``name``.
    """
    import numpy as np

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
    elif isinstance(obj, np.ndarray):
        if obj.dtype == object or obj.dtype.kind not in "biuf":
            raise TypeError(f"{name}: a numpy array of dtype {obj.dtype}; give floats in "
                            "[0, 1], uint8 or bool")
        t = torch.from_numpy(np.ascontiguousarray(obj))
    elif _is_pil(obj):
        t = torch.from_numpy(np.ascontiguousarray(_pil_array(obj, name)))
    else:
        raise TypeError(f"{name} must be a PIL image, a numpy array or a tensor ([H, W] or "
                        f"[B, H, W]) or None, got {type(obj).__name__}")
    if t.dtype == torch.bool:
        t = t.float()
    elif t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.is_floating_point():
        t = t.float()
    else:
        raise TypeError(f"{name} has dtype {t.dtype}; give floats in [0, 1], uint8 (0..255) "
                        "or bool")
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        shape = tuple(getattr(obj, "shape", t.shape))
        raise ValueError(f"{name} has shape {shape}; an image-space mask is [H, W], "
                         "[B, H, W] or [B, 1, H, W]")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not bool(((t >= 0) & (t <= 1)).all()):
        bad = t[~((t >= 0) & (t <= 1))]
        raise ValueError(f"{name} must have values in [0, 1] (0 removes the model there, 1 keeps "
                         f"it whole); it has {bad.numel()} outside, e.g. {float(bad[0]):g}")
    with torch.inference_mode(False):  # a normal tensor, whatever mode the caller is in
        return t.clone()


def image_masks(masks: Any, n: int | None, what: str = "masks") -> list[torch.Tensor | None]:
    """``apply``'s ``masks``: a sequence of one entry per control model, each ``None`` or an
    image-space mask (see :func:`image_mask`); ``n``: the number of models, when known."""
    if isinstance(masks, (str, bytes, torch.Tensor)) or not isinstance(masks, Sequence):
        raise TypeError(f"{what} must be a list with one mask (or None) per control model, got "
                        f"{type(masks).__name__}")
    if n is not None and len(masks) != n:
        raise ValueError(f"{what} has {len(masks)} entries for {n} control models (one mask or "
                         "None per model)")
    return [None if m is None else image_mask(m, f"{what}[{i}]") for i, m in enumerate(masks)]


def token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` with ``h * w = n_tokens`` whose aspect ratio is closest to
    ``height / width`` (for token features whose grid is not otherwise known)."""
    target = math.log(height / width)
    best = None
    for h in range(1, n_tokens + 1):
        if n_tokens % h:
            continue
        w = n_tokens // h
        score = abs(math.log(h / w) - target)
        if best is None or score < best[0] - 1e-12:
            best = (score, (h, w))
    assert best is not None
    return best[1]


class RegionMasks:
    """The image-space masks of one handle and their resized copies (see the module doc)."""

    def __init__(self, masks: list[torch.Tensor | None]):
        self.masks = masks
        self.resizes = 0  # how many masks were resized (not served from the cache)
        self._cache: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.masks)

    def for_features(self, feats: Sequence[torch.Tensor], channel_dim: int,
                     nets: Sequence[int], *, grid: tuple[int, int] | None = None,
                     hard: bool = False) -> list[torch.Tensor | None] | None:
        """The masks of the models ``nets`` for one fusion of ``feats`` (N same-shape tensors
        with their channels at ``channel_dim``), as ``max_fuse`` takes them: ``[Bm, *sites]``
        each, or ``None`` when no model taking part has a mask.

        The grid: the last two site dims of maps (leading site dims, e.g. video frames,
        broadcast); for tokens (one site dim), ``grid`` when it has as many cells as there
        are tokens, else the factorisation of the token count closest to the mask's aspect
        ratio; ``1 x 1`` for one site per sample. ``hard``: 1 wherever the resized mask is
        > 0 (block level's fusions inside the nets: a mask removes there, it does not weigh).
        """
        entries = [self.masks[j] for j in nets]
        if all(m is None for m in entries):
            return None
        f0 = feats[0]
        cd = channel_dim % f0.dim()
        sites = [s for d, s in enumerate(f0.shape) if d not in (0, cd)]
        batch = f0.shape[0]
        dtype = torch.float64 if f0.dtype == torch.float64 else torch.float32
        out = []
        for j, m in zip(nets, entries):
            if m is None:
                out.append(None)
                continue
            if len(sites) >= 2:
                hw = (sites[-2], sites[-1])
            elif len(sites) == 1:
                hw = grid if grid is not None and grid[0] * grid[1] == sites[0] else (
                    token_grid(sites[0], m.shape[-2], m.shape[-1]))
            else:
                hw = (1, 1)
            key = (j, hw, len(sites), batch, f0.device, dtype, hard)
            cached = self._cache.get(key)
            if cached is None:
                cached = self._resize(m, j, hw, len(sites), batch, f0.device, dtype, hard)
                self._cache[key] = cached
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            out.append(cached)
        return out

    def _resize(self, m: torch.Tensor, j: int, hw: tuple[int, int], n_site_dims: int,
                batch: int, device: torch.device, dtype: torch.dtype,
                hard: bool) -> torch.Tensor:
        self.resizes += 1
        bm = m.shape[0]
        if bm != 1 and batch % bm:
            raise ValueError(
                f"masks[{j}] holds {bm} masks but the features it applies to have a batch of "
                f"{batch}: give 1 mask, or one per image (the batch is tiled over the "
                "classifier-free-guidance halves and must be a multiple of it)"
            )
        # normal tensors whatever the caller's mode: they are cached across calls and the
        # kernels remember checked masks by their version counter
        with torch.inference_mode(False), torch.no_grad():
            r = F.adaptive_avg_pool2d(m.to(device=device, dtype=dtype)[:, None], hw)[:, 0]
            if hard:
                r = (r > 0).to(dtype)
            if bm not in (1, batch):
                r = r.repeat(batch // bm, 1, 1)  # [m_0 .. m_B-1, m_0 .. m_B-1, ...]
            if n_site_dims == 0:
                return r.reshape(r.shape[0]).contiguous()
            if n_site_dims == 1:
                return r.reshape(r.shape[0], hw[0] * hw[1]).contiguous()
            return r.reshape(r.shape[0], *([1] * (n_site_dims - 2)), *hw).contiguous()
