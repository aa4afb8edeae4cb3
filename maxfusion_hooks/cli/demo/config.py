"""The demo's options and result (``DemoConfig``, ``DemoResult``), their constants, and every
check of the options that needs no model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..._fusion import Record

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


