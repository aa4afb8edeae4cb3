"""The demo's figure: conditions, generated image and one winner-map overlay per fusion point
(Pillow only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .config import COLOURS, OFFLINE_NOTE, DemoResult
from .tables import is_final_merge, winner_density


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
