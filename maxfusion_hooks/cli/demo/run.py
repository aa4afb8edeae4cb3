"""Running the demo: build or load the pipeline, run it with MaxFusion applied and recording on
(twice with ``--masks``: with and without them), gather the numbers, write the figure."""

from __future__ import annotations

import time

import torch

from ... import apply
from ..._fusion import Record
from .conditions import region_masks
from .config import (
    OFFLINE_STEPS,
    REAL_STEPS,
    DemoConfig,
    DemoError,
    DemoResult,
    _first_line,
    check_options,
)
from .figure import compose_figure
from .models import _load_offline, _load_real
from .tables import _own_half, _shares, region_share


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Build (or load) the pipeline, run it with block- or residual-level MaxFusion and
    recording on, write the figure; returns everything (see :class:`DemoResult`).

    Raises:
        DemoError: a bad option or input (nothing has run yet).
    """
    out, device = check_options(cfg)
    from maxfusion_kernels import choose_backend

    try:
        backend = choose_backend(device, cfg.backend)
    except (ValueError, RuntimeError) as exc:
        raise DemoError(f"--backend {cfg.backend}: {_first_line(exc)}") from None

    t0 = time.perf_counter()
    if cfg.offline:
        pipe, names, conds, size = _load_offline(cfg, device)
        steps = cfg.steps or OFFLINE_STEPS
        prompt = cfg.prompt if cfg.prompt is not None else "a house by a lake, a sunny day"
    else:
        pipe, names, conds, size = _load_real(cfg, device)
        steps = cfg.steps or REAL_STEPS
        prompt = cfg.prompt if cfg.prompt is not None else "a photo, high quality"
    pipe.set_progress_bar_config(disable=not cfg.progress, desc="denoising", leave=True)
    masks = region_masks(size, size, len(names)) if cfg.masks else None
    t1 = time.perf_counter()
    baseline = None
    if masks is not None:  # the same run without the masks, for comparison
        _, baseline = _fused_run(pipe, cfg, prompt, conds, steps, size, None)
    image, records = _fused_run(pipe, cfg, prompt, conds, steps, size, masks)
    t2 = time.perf_counter()

    points = list(dict.fromkeys(r.point for r in records))
    by_point = {p: [r for r in records if r.point == p] for p in points}
    shares = {p: _shares(by_point[p], len(names)) for p in points}
    own = None
    if cfg.offline and masks is None:
        own = {p: _own_half(by_point[p]) for p in points}
    result = DemoResult(
        config=cfg, names=names, conditions=conds, image=image, records=records, points=points,
        shares=shares, own_half=own, figure=out.resolve(), prompt=prompt, backend=backend,
        size=size, steps=steps, device=str(device), seconds_build=t1 - t0, seconds_run=t2 - t1,
    )
    if masks is not None:
        base_by_point = {p: [r for r in baseline if r.point == p] for p in points}
        result.masks = masks
        result.own_region = {p: region_share(by_point[p], masks) for p in points}
        result.baseline_records = baseline
        result.baseline_shares = {p: _shares(base_by_point[p], len(names)) for p in points}
        result.baseline_own_region = {p: region_share(base_by_point[p], masks) for p in points}
    compose_figure(result).save(out, format="PNG", optimize=True)
    return result


def _fused_run(pipe, cfg: DemoConfig, prompt: str, conds, steps: int, size: int, masks):
    """One pipeline run with MaxFusion applied (and removed after): the image and the records
    (winners on the CPU)."""
    try:
        handle = apply(pipe, level=cfg.level, record=True, threshold=cfg.threshold,
                       preset=cfg.preset, backend=cfg.backend, masks=masks)
    except (ValueError, TypeError) as exc:
        hint = " (try --level residual)" if cfg.level == "block" else ""
        raise DemoError(f"cannot fuse these ControlNets: {_first_line(exc)}{hint}") from None
    try:
        with torch.inference_mode():
            image = pipe(prompt, image=conds, num_inference_steps=steps, height=size,
                         width=size, generator=torch.Generator().manual_seed(cfg.seed)
                         ).images[0]
    finally:
        handle.remove()
    return image, [Record(r.step, r.point, r.winner.cpu()) for r in handle.records]


