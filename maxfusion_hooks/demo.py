"""``maxfusion demo``: run MaxFusion on 2+ ControlNets and show which condition won where.

Offline (the default, nothing is downloaded): a small Stable Diffusion 1.5-style ControlNet
pipeline built from config with random weights (:mod:`maxfusion_hooks.offline_models`), two
ControlNets whose conditioning embeddings are driven by the condition, and two synthetic
conditions that conflict by halves: a depth map (a ramp and a sphere) in the left half and an
edge drawing (a house, a sun) in the right half, each black in the other half.

With real models (``base`` = an SD 1.x/2.x or SDXL pipeline, ``controlnets`` and one condition
image per ControlNet) the same run and figure are made with them.

With ``masks=True`` (``maxfusion demo --masks``) the conditions overlap everywhere (offline:
the depth map and the edge drawing both cover the whole image) and regional masks restrict
each to a region (two conditions: an ellipse with a soft edge and its complement; more: vertical
strips). The pipeline runs twice, without and with the masks, and the figure shows both
runs' winner maps: with the masks each condition wins its own region.

The run records the winner map of every fusion (``maxfusion_hooks.apply(..., record=True)``)
and writes one PNG figure (Pillow only): the conditions, the generated image, and per fusion
point the winner map as a colour overlay, one colour per condition. Diffusers is imported
inside the functions that need it.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import apply
from ._fusion import Record

__all__ = [
    "COLOURS",
    "OFFLINE_NOTE",
    "DemoConfig",
    "DemoError",
    "DemoResult",
    "check_options",
    "compose_figure",
    "format_table",
    "half_fractions",
    "header",
    "is_final_merge",
    "region_masks",
    "region_share",
    "run_demo",
    "synthetic_conditions",
    "winner_density",
]

OFFLINE_NOTE = (
    "offline models: a small SD 1.5-style pipeline (UNet, VAE, CLIP text encoder, in-memory "
    "tokenizer) and 2 ControlNets built from config with random weights; the ControlNets' "
    "conditioning embeddings have He-normal weights (gain 3) and zero biases and their zero "
    "convolutions random non-zero weights, so their features follow their conditions. The "
    "generated image is therefore noise-like; the winner maps are the point."
)

# Okabe-Ito colours (distinguishable with colour-blindness), one per condition (up to 8)
COLOURS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (213, 94, 0), (204, 121, 167),
           (240, 228, 66), (0, 114, 178), (150, 150, 150)]

OFFLINE_SIZE, OFFLINE_STEPS, OFFLINE_MAX_SIZE = 128, 10, 256
REAL_STEPS = 30
_FINAL = re.compile(r"(down|feature|block|single)\.\d+|mid")  # final merges' record names
_LEVELS = ("residual", "block")


class DemoError(ValueError):
    """A bad argument or input of the demo (a missing file, a model that is not a ControlNet,
    ...): the CLI prints its message and exits with code 2."""


@dataclass
class DemoConfig:
    """The demo's options (the CLI's arguments). ``None`` sizes / steps pick the defaults:
    128 px and 10 steps offline, the base model's own size and 30 steps with real models."""

    out: str | os.PathLike = "maxfusion-demo.png"
    size: int | None = None
    steps: int | None = None
    seed: int = 0
    level: str = "block"
    threshold: float = 0.7
    preset: str = "paper"
    backend: str = "auto"
    device: str | None = None
    base: str | None = None
    controlnets: Sequence[str] = ()
    images: Sequence[str] = ()
    prompt: str | None = None
    progress: bool = True
    masks: bool = False

    @property
    def offline(self) -> bool:
        return self.base is None


@dataclass
class DemoResult:
    """What :func:`run_demo` made. ``records``: every fusion's winner map (see
    :class:`maxfusion_hooks.Record`); ``points``: the fusion points in the order they ran;
    ``shares[point][i]``: the share of sites (all steps and batch entries) condition ``i`` won;
    ``own_half[point]`` (offline, without masks): the share of sites won by the condition that
    owns their half of the image. With ``config.masks``: ``masks`` (one ``[H, W]`` tensor per
    condition), ``own_region[point]`` (the share of sites won by the condition whose mask is
    largest there) and the run without masks: ``baseline_records``, ``baseline_shares``,
    ``baseline_own_region``."""

    config: DemoConfig
    names: list[str]
    conditions: list  # PIL images
    image: object  # PIL image
    records: list[Record]
    points: list[str]
    shares: dict[str, list[float]]
    own_half: dict[str, float] | None
    figure: Path
    prompt: str
    backend: str
    size: int
    steps: int
    device: str
    seconds_build: float
    seconds_run: float
    notes: list[str] = field(default_factory=list)
    masks: list[torch.Tensor] | None = None
    own_region: dict[str, float] | None = None
    baseline_records: list[Record] | None = None
    baseline_shares: dict[str, list[float]] | None = None
    baseline_own_region: dict[str, float] | None = None


# --------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------


def synthetic_conditions(size: int, overlap: bool = False) -> list[tuple[str, object]]:
    """Two RGB condition images of ``size`` x ``size`` px that conflict by halves.

    ``depth``: in the left half, a depth map (near is bright): a floor ramp and a sphere; never
    black there. ``edges``: in the right half, white lines on black: a house with a door and a
    window, a sun with rays, the ground line. Each is black in the other half.
    ``overlap=True``: both cover the whole image (the ramp everywhere, the ground line across),
    for the masked demo.
    """
    from PIL import Image, ImageDraw

    s = size
    y, x = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    depth = 0.25 + 0.55 * y  # the floor comes nearer towards the bottom
    cx, cy, r = 0.24, 0.52, 0.16
    d2 = ((x - cx) ** 2 + (y - cy) ** 2) / r**2
    sphere = (0.75 + 0.25 * (1 - d2).clamp(min=0).sqrt()) * (d2 < 1)
    depth = torch.maximum(depth, sphere)
    if not overlap:
        depth = torch.where(x < 0.5, depth, torch.zeros(()))
    depth_img = Image.fromarray((depth * 255).round().to(torch.uint8).numpy(), "L").convert("RGB")

    edges = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(edges)
    w = max(1, round(s / 96))

    def px(u: float, v: float) -> tuple[int, int]:
        return round(u * (s - 1)), round(v * (s - 1))

    d.line([px(0.0 if overlap else 0.5, 0.82), px(1.0, 0.82)], fill="white", width=w)  # ground
    d.rectangle([px(0.58, 0.52), px(0.86, 0.82)], outline="white", width=w)  # house
    d.line([px(0.55, 0.54), px(0.72, 0.36), px(0.89, 0.54)], fill="white", width=w)  # roof
    d.rectangle([px(0.63, 0.66), px(0.70, 0.82)], outline="white", width=w)  # door
    d.rectangle([px(0.75, 0.59), px(0.82, 0.67)], outline="white", width=w)  # window
    d.line([px(0.785, 0.59), px(0.785, 0.67)], fill="white", width=w)
    sx, sy, sr = 0.70, 0.16, 0.07
    d.ellipse([px(sx - sr, sy - sr), px(sx + sr, sy + sr)], outline="white", width=w)  # sun
    for k in range(8):
        a = k * math.pi / 4
        d.line([px(sx + 1.5 * sr * math.cos(a), sy + 1.5 * sr * math.sin(a)),
                px(sx + 2.2 * sr * math.cos(a), sy + 2.2 * sr * math.sin(a))],
               fill="white", width=w)
    d.line([px(0.90, 0.30), px(0.98, 0.26)], fill="white", width=w)  # a bird
    d.line([px(0.98, 0.26), px(0.99, 0.31)], fill="white", width=w)
    if overlap:  # a tree on the left, over the sphere of the depth map
        d.line([px(0.18, 0.82), px(0.18, 0.55)], fill="white", width=w)
        d.ellipse([px(0.08, 0.30), px(0.28, 0.58)], outline="white", width=w)
    else:
        d.rectangle([0, 0, s // 2 - 1, s - 1], fill="black")  # only the right half
    return [("depth", depth_img), ("edges", edges)]


def region_masks(height: int, width: int, n: int) -> list[torch.Tensor]:
    """The masked demo's regions: ``n`` float masks ``[height, width]`` in [0, 1] that sum to
    1 at every pixel. Two: the last condition inside an ellipse (centre (0.68, 0.52), radii
    0.28 x 0.40 of the image, around the offline edge drawing's house and sun) with a soft edge
    of about 4 % of the image, the first outside it. More: vertical strips with soft borders.
    """
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width),
                          indexing="ij")
    if n == 2:
        r = (((x - 0.68) / 0.28) ** 2 + ((y - 0.52) / 0.40) ** 2).sqrt()
        inside = (0.5 + (1 - r) / 0.08).clamp(0, 1)
        return [1 - inside, inside]
    edges = [(k / n) for k in range(1, n)]
    ramps = [(0.5 + (x - e) / 0.04).clamp(0, 1) for e in edges]  # 1 right of border k
    masks = [1 - ramps[0]]
    masks += [ramps[k - 1] - ramps[k] for k in range(1, n - 1)]
    masks.append(ramps[-1])
    return [m.clamp(0, 1) for m in masks]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def _import_diffusers():
    """Import diffusers with transformers' import-time notices (e.g. "torchvision not
    installed, falling back to ...") silenced; returns the module."""
    try:
        import transformers
    except ImportError as exc:
        raise DemoError("maxfusion demo needs diffusers and transformers: "
                        "pip install 'maxfusion[diffusers]'") from exc
    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        import diffusers
        from diffusers import (  # noqa: F401  (loads the pipeline modules now, quietly)
            ControlNetModel,
            StableDiffusionControlNetPipeline,
            StableDiffusionXLControlNetPipeline,
        )
    except ImportError as exc:
        raise DemoError("maxfusion demo needs diffusers: pip install 'maxfusion[diffusers]'"
                        ) from exc
    finally:
        transformers.logging.set_verbosity(prev)
    return diffusers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DemoError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)"
                        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {name}: torch sees no CUDA device here")
    if dev.type not in ("cpu", "cuda"):
        raise DemoError(f"--device {name}: the demo runs on cpu or cuda")
    return dev


def _check_config(cfg: DemoConfig) -> None:
    """Raise :class:`DemoError` for bad options and argument combinations."""
    if cfg.level not in _LEVELS:
        raise DemoError(f"--level must be one of {list(_LEVELS)}, got {cfg.level!r}")
    if not (isinstance(cfg.threshold, (int, float)) and -1 <= cfg.threshold <= 1):
        raise DemoError(f"--threshold must be a number in [-1, 1], got {cfg.threshold!r}")
    if cfg.steps is not None and cfg.steps < 1:
        raise DemoError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.size is not None and (cfg.size < 32 or cfg.size % 8):
        raise DemoError(f"--size must be a multiple of 8 and >= 32, got {cfg.size}")
    cns, imgs = list(cfg.controlnets), list(cfg.images)
    if cfg.base is None:
        if cfg.size is not None and cfg.size > OFFLINE_MAX_SIZE:
            raise DemoError(f"--size {cfg.size}: the offline models run at most "
                            f"{OFFLINE_MAX_SIZE} px (their attention grows with the square "
                            "of the pixel count)")
        if cns or imgs:
            raise DemoError("--controlnet and --image need --base (an SD pipeline to run them "
                            "with); without them the demo runs its offline models")
        return
    if len(cns) != len(imgs):
        raise DemoError(f"give one --image per --controlnet: got {len(cns)} --controlnet and "
                        f"{len(imgs)} --image")
    if not 2 <= len(cns) <= 8:
        raise DemoError(f"MaxFusion fuses 2 to 8 ControlNets, got {len(cns)} --controlnet")
    for path in imgs:
        if not Path(path).expanduser().is_file():
            raise DemoError(f"--image {path}: no such file")


def check_options(cfg: DemoConfig) -> tuple[Path, torch.device]:
    """Every check of ``cfg`` that needs no model (options, argument combinations, condition
    files, the output path, the device); raises :class:`DemoError`. Returns the output path
    and the device. :func:`run_demo` calls it first."""
    _check_config(cfg)
    return _check_out(cfg), _resolve_device(cfg.device)


def _check_out(cfg: DemoConfig) -> Path:
    out = Path(cfg.out).expanduser()
    if not out.resolve().parent.is_dir():
        raise DemoError(f"--out {cfg.out}: the folder {out.resolve().parent} does not exist")
    if out.suffix.lower() != ".png":
        raise DemoError(f"--out {cfg.out}: the figure is a PNG; give a path ending in .png")
    return out


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or (
        name.count("/") != 1)


def _load_config(cls, name: str, what: str, kind: str) -> dict:
    path = os.path.expanduser(name)
    if _looks_local(name) and not os.path.exists(path):
        raise DemoError(f"{what} {name}: no such file or folder")
    try:
        return dict(cls.load_config(path))
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's input
        raise DemoError(f"{what} {name}: not a diffusers {kind} that can be read here "
                        f"({_first_line(exc)})") from None


def _load_real(cfg: DemoConfig, device: torch.device):
    diffusers = _import_diffusers()
    from PIL import Image

    images = []
    for path in cfg.images:  # first: a bad image should not wait for the models to load
        try:
            with Image.open(Path(path).expanduser()) as img:
                images.append(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001
            raise DemoError(f"--image {path}: not an image ({_first_line(exc)})") from None

    base_cfg = _load_config(diffusers.DiffusionPipeline, cfg.base, "--base", "pipeline")
    cls_name = str(base_cfg.get("_class_name", ""))
    if not cls_name.startswith("StableDiffusion") or any(
            k in cls_name for k in ("3", "Upscale", "Depth2Img", "Adapter", "Instruct")):
        raise DemoError(f"--base {cfg.base}: a {cls_name or 'pipeline of unknown class'}; the "
                        "demo runs Stable Diffusion 1.x/2.x and SDXL base pipelines")
    sdxl = "XL" in cls_name
    pipe_cls = (diffusers.StableDiffusionXLControlNetPipeline if sdxl
                else diffusers.StableDiffusionControlNetPipeline)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dtype_kw = {_dtype_keyword(diffusers): dtype}

    net_cfgs = []
    for name in cfg.controlnets:  # every config before any weights
        net_cfg = _load_config(diffusers.ControlNetModel, name, "--controlnet", "model")
        kind = net_cfg.get("_class_name")
        if kind != "ControlNetModel":
            raise DemoError(f"--controlnet {name}: not a ControlNet (its config names "
                            f"{kind or 'no class'}; the demo needs ControlNetModel)")
        net_cfgs.append(net_cfg)
    nets = []
    for name in cfg.controlnets:
        try:
            nets.append(diffusers.ControlNetModel.from_pretrained(
                os.path.expanduser(name), **dtype_kw))
        except Exception as exc:  # noqa: BLE001
            raise DemoError(f"--controlnet {name}: cannot load it ({_first_line(exc)})"
                            ) from None
    extra = {} if sdxl else dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = pipe_cls.from_pretrained(os.path.expanduser(cfg.base), controlnet=nets,
                                        **dtype_kw, **extra)
    except Exception as exc:  # noqa: BLE001
        raise DemoError(f"--base {cfg.base}: cannot load it ({_first_line(exc)})") from None
    want = pipe.unet.config.cross_attention_dim
    for name, net_cfg in zip(cfg.controlnets, net_cfgs):
        if net_cfg.get("cross_attention_dim") != want:
            raise DemoError(
                f"--controlnet {name}: made for a base with cross-attention dim "
                f"{net_cfg.get('cross_attention_dim')}, but --base {cfg.base} has {want} "
                "(an SD 1.5 ControlNet with an SDXL base, or the reverse?)")
    pipe.to(device)
    default = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    size = cfg.size or default
    conds = [_square(img, size) for img in images]
    names = [_short_name(n) for n in cfg.controlnets]
    return pipe, names, conds, size


def _dtype_keyword(diffusers) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` in recent diffusers (which deprecates
    ``torch_dtype``), ``torch_dtype`` before."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _short_name(name: str) -> str:
    return Path(name.rstrip("/\\")).name or name


def _square(img, size: int):
    """Centre crop to a square, then resize to ``size`` x ``size``."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.resize((size, size), Image.Resampling.LANCZOS, box=box)


def _load_offline(cfg: DemoConfig, device: torch.device):
    _import_diffusers()
    from .offline_models import sd_controlnet_pipeline

    size = cfg.size or OFFLINE_SIZE
    pipe = sd_controlnet_pipeline(2, seed=cfg.seed)
    pipe.to(device)
    named = synthetic_conditions(size, overlap=cfg.masks)
    return pipe, [n for n, _ in named], [img for _, img in named], size


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


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


def winner_density(records: Sequence[Record], n: int) -> torch.Tensor:
    """``[n, H, W]``: per site, the share of (step, batch entry) pairs won by each net."""
    acc = None
    count = 0
    for r in records:
        w = r.winner.reshape(-1, *r.winner.shape[-2:])
        onehot = torch.stack([(w == i).float().sum(0) for i in range(n)])
        acc = onehot if acc is None else acc + onehot
        count += w.shape[0]
    return acc / max(count, 1)


def _shares(records: Sequence[Record], n: int) -> list[float]:
    total = sum(r.winner.numel() for r in records)
    return [sum(int((r.winner == i).sum()) for r in records) / max(total, 1) for i in range(n)]


def half_fractions(record: Record) -> tuple[float, float]:
    """Offline conditions: the share of left-half sites won by net 0 and of right-half sites
    won by net 1 (all batch entries)."""
    w = record.winner
    half = w.shape[-1] // 2
    return (float((w[..., :half] == 0).float().mean()),
            float((w[..., half:] == 1).float().mean()))


def _own_half(records: Sequence[Record]) -> float:
    fr = [f for r in records for f in half_fractions(r)]
    return sum(fr) / len(fr)


def region_share(records: Sequence[Record], masks: Sequence[torch.Tensor]) -> float:
    """The share of sites (all records, batch entries) won by the condition whose mask, resized
    to the record's grid with an area average, is the largest there (its region)."""
    import torch.nn.functional as F

    won = total = 0
    for r in records:
        grid = tuple(r.winner.shape[-2:])
        resized = torch.stack([F.adaptive_avg_pool2d(m[None, None].float(), grid)[0, 0]
                               for m in masks])
        region = resized.argmax(dim=0)  # [h, w], the first index on a tie
        won += int((r.winner == region).sum())
        total += r.winner.numel()
    return won / max(total, 1)


def is_final_merge(point: str) -> bool:
    """Whether a record is of a final merge of the residuals rather than a fusion inside the
    ControlNets (block level)."""
    return _FINAL.fullmatch(point) is not None


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def header(res: DemoResult) -> str:
    """The run's settings in one line (the first line the CLI prints after the run)."""
    cfg = res.config
    what = "offline models" if cfg.offline else f"base: {cfg.base}"
    return (f"MaxFusion demo ({what}): {len(res.names)} ControlNets "
            f"({', '.join(res.names)}), {cfg.level} level, threshold {cfg.threshold}, "
            f"preset {cfg.preset}, {res.steps} steps, {res.size} x {res.size} px, "
            f"seed {cfg.seed}, device {res.device}, max_fuse backend {res.backend}"
            + (", regional masks (run with and without them)" if cfg.masks else ""))


def format_table(res: DemoResult) -> str:
    """The share of sites each condition won per fusion point, as printed by the CLI."""
    names = res.names
    width = max(12, *(len(p) for p in res.points)) if res.points else 12
    cols = [max(7, len(n) + 1) for n in names]
    head = f"{'fusion point':<{width}}  {'fusion':<7}" + "".join(
        f"{n:>{c}}" for n, c in zip(names, cols))
    if res.own_half is not None:
        head += f"{'own half':>10}"
    if res.own_region is not None:
        head += f"{'own region':>12}{'no masks':>10}"
    lines = [head, "-" * len(head)]
    for p in res.points:
        kind = "merge" if (res.config.level == "residual" or is_final_merge(p)) else "unmerge"
        row = f"{p:<{width}}  {kind:<7}" + "".join(
            f"{100 * s:>{c - 1}.1f}%" for s, c in zip(res.shares[p], cols))
        if res.own_half is not None:
            row += f"{100 * res.own_half[p]:>9.1f}%"
        if res.own_region is not None and res.baseline_own_region is not None:
            row += (f"{100 * res.own_region[p]:>11.1f}%"
                    f"{100 * res.baseline_own_region[p]:>9.1f}%")
        lines.append(row)
    return "\n".join(lines)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _fit(img, panel: int):
    from PIL import Image

    method = Image.Resampling.NEAREST if img.width <= panel else Image.Resampling.LANCZOS
    return img.convert("RGB").resize((panel, panel), method)


def _overlay(density: torch.Tensor, backdrop: torch.Tensor, panel: int):
    """Winner colours (share-weighted mix per site) over a dimmed grey backdrop."""
    from PIL import Image

    n, h, w = density.shape
    colours = torch.tensor(COLOURS[:n], dtype=torch.float32)  # [n, 3]
    rgb = torch.einsum("nhw,nc->hwc", density, colours)
    img = Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy(), "RGB")
    img = img.resize((panel, panel), Image.Resampling.NEAREST)
    back = backdrop.unsqueeze(-1).expand(panel, panel, 3)
    out = 0.62 * torch.as_tensor(_np(img)).float() + 0.38 * back
    return Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).numpy(), "RGB")


def _np(img):
    import numpy as np

    return np.array(img)  # a writable copy (torch.as_tensor warns on read-only arrays)


def compose_figure(res: DemoResult, panel: int = 176):
    """One image: a title, the conditions (and the masks' regions) and the generated image,
    then one winner map per fusion point (fusions inside the ControlNets, then the final
    merges; with masks, for the run with them and the run without), and a caption."""
    from PIL import Image, ImageDraw

    n = len(res.names)
    masked = res.masks is not None
    inside = [p for p in res.points if res.config.level == "block" and not is_final_merge(p)]
    merges = [p for p in res.points if p not in inside]
    top = n + (2 if masked else 1)  # the conditions, the regions, the generated image
    cols = max(top, min(6, max(len(inside), len(merges), 1)))
    pad, title_h, label_h, section_h = 12, 30, 38, 24
    font, small, big = _font(13), _font(11), _font(16)

    cond_lum = [torch.as_tensor(_np(_fit(c, panel).convert("L"))).float() for c in res.conditions]
    backdrop = 40 + 0.45 * torch.stack(cond_lum).amax(0)  # the conditions, dim grey

    def rows(k: int) -> int:
        return math.ceil(k / cols) if k else 0

    runs = [("", res.records, res.shares)]
    if masked:
        runs = [("with the masks: ", res.records, res.shares),
                ("without masks (the same conditions): ", res.baseline_records,
                 res.baseline_shares)]
    sections = []
    for prefix, recs, shares in runs:
        sections += [(f"{prefix}fusion inside the ControlNets (unmerge), {len(inside)} points",
                      inside, recs, shares),
                     (f"{prefix}final merge of the residuals, {len(merges)} points", merges,
                      recs, shares)]
    sections = [sec for sec in sections if sec[1]]
    caption = _caption(res)
    cap_lines = _wrap(caption, small, cols * (panel + pad) - pad)
    height = (pad + title_h + label_h + panel + pad
              + sum(section_h + rows(len(sec[1])) * (label_h + panel + pad) for sec in sections)
              + len(cap_lines) * 15 + pad)
    width = pad + cols * (panel + pad)
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    cfg = res.config
    title = (f"MaxFusion{' with regional masks' if masked else ''}: {cfg.level} level, "
             f"{res.steps} steps, threshold {cfg.threshold}, "
             f"{'offline random-weight models' if cfg.offline else cfg.base}")
    draw.text((pad, pad), title, fill="black", font=big)
    y = pad + title_h

    def label(x: int, y: int, text: str, sub: str | None = None, colour=None) -> None:
        if colour is not None:
            draw.rectangle([x, y + 3, x + 11, y + 14], fill=colour)
            x += 16
        draw.text((x, y + 1), text, fill="black", font=font)
        if sub:
            draw.text((x, y + 18), sub, fill=(70, 70, 70), font=small)

    for i, (name, cond) in enumerate(zip(res.names, res.conditions)):
        x = pad + i * (panel + pad)
        label(x, y, f"condition {i}: {name}", "its colour in the maps", COLOURS[i])
        fig.paste(_fit(cond, panel), (x, y + label_h))
    x = pad + n * (panel + pad)
    if masked:
        label(x, y, "regions (masks)", "each in its condition's colour")
        fig.paste(_regions(res.masks, panel), (x, y + label_h))
        x += panel + pad
    label(x, y, "generated image", "random weights: noise-like" if cfg.offline else _prompt_of(res))
    fig.paste(_fit(res.image, panel), (x, y + label_h))
    y += label_h + panel + pad

    for title_text, pts, run_records, run_shares in sections:
        draw.text((pad, y + 4), title_text, fill="black", font=font)
        y += section_h
        for k, p in enumerate(pts):
            r, c = divmod(k, cols)
            x, yy = pad + c * (panel + pad), y + r * (label_h + panel + pad)
            recs = [rec for rec in run_records if rec.point == p]
            dens = winner_density(recs, n)
            h, w = dens.shape[-2:]
            sub = "  ".join(f"{nm} {100 * s:.0f}%" for nm, s in zip(res.names, run_shares[p]))
            label(x, yy, f"{p}  ({h}x{w})", sub)
            fig.paste(_overlay(dens, backdrop, panel), (x, yy + label_h))
        y += rows(len(pts)) * (label_h + panel + pad)
    for line in cap_lines:
        draw.text((pad, y), line, fill=(60, 60, 60), font=small)
        y += 15
    return fig


def _regions(masks: Sequence[torch.Tensor], panel: int):
    """The masks as one image: per pixel the mix of the conditions' colours they weigh."""
    from PIL import Image

    colours = torch.tensor(COLOURS[:len(masks)], dtype=torch.float32)
    rgb = torch.einsum("nhw,nc->hwc", torch.stack([m.float() for m in masks]), colours)
    img = Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy(), "RGB")
    return img.resize((panel, panel), Image.Resampling.BILINEAR)


def _prompt_of(res: DemoResult) -> str:
    p = res.prompt
    return (p[:28] + "...") if len(p) > 31 else p


def _caption(res: DemoResult) -> str:
    text = ("Each map: per site, the colour of the condition whose ControlNet won it (mixed "
            f"where the winner changed), over all {res.steps} steps and both halves of the "
            "classifier-free-guidance batch, drawn over the conditions in grey. ")
    if res.masks is not None:
        text += ("The conditions cover the whole image; the masks (an area average of them at "
                 "each map's grid) restrict each to its region: a mask of 0 removes the "
                 "condition's ControlNet there, a soft edge weighs its features. ")
    if res.config.offline:
        text += OFFLINE_NOTE
    return text


def _wrap(text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and font.getlength(trial) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + ([cur] if cur else [])
