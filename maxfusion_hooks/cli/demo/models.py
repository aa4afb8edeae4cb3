"""Building the demo's pipeline: the offline models (:mod:`.offline_models`, random weights, the
default) or real ones loaded from disk or a hub (``--base`` / ``--controlnet`` / ``--image``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .conditions import synthetic_conditions
from .config import OFFLINE_SIZE, DemoConfig, DemoError, _first_line


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


