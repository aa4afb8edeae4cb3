"""Draws docs/images/mask-normaliser.png: how a regional mask changes the normaliser.

Two synthetic inputs on a 32 x 32 map (C = 16 channels), fused with the float64 reference
(``preset="paper"``: std statistic, per-sample normaliser). Top row without masks, bottom row
with a mask that confines input 1 to a disc (soft edge): the statistic t_i (std over the
channels) or the masks, the normalised saliency a_i = t_i / T_i, and the winner map. Run from
the repository root:

    python docs/images/make_mask_figure.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from maxfusion_kernels import reference

SIZE, C, PANEL, PAD = 32, 16, 128, 10
COLOURS = [(230, 159, 0), (86, 180, 233)]  # the demo's: input 0 orange, input 1 blue


def inputs() -> list[torch.Tensor]:
    """Two dense inputs over the whole map, input 1 half as strong as input 0 (std about 1
    and 0.5 at every site): their normalised saliencies are about equal everywhere."""
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(1, C, SIZE, SIZE, generator=g, dtype=torch.float64)
    f1 = torch.randn(1, C, SIZE, SIZE, generator=g, dtype=torch.float64) * 0.5
    return [f0, f1]


def masks() -> list[torch.Tensor | None]:
    """No mask for input 0; input 1 confined to a disc of radius 7 with a soft edge (2 px)."""
    y, x = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    r = ((x - 20.5) ** 2 + (y - 13.5) ** 2).double().sqrt()
    return [None, (0.5 + (7 - r) / 2).clamp(0, 1)]


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _grey(t: torch.Tensor, top: float) -> Image.Image:
    v = (255 * (t / top).clamp(0, 1)).round().to(torch.uint8).numpy()
    return Image.fromarray(v, "L").convert("RGB").resize((PANEL, PANEL), Image.Resampling.NEAREST)


def _winner(w: torch.Tensor, present: torch.Tensor) -> Image.Image:
    rgb = torch.tensor(COLOURS, dtype=torch.float64)[w]  # [H, W, 3]
    rgb = torch.where(present.any(0)[..., None], rgb, torch.full_like(rgb, 255.0))
    img = Image.fromarray(rgb.round().to(torch.uint8).numpy(), "RGB")
    return img.resize((PANEL, PANEL), Image.Resampling.NEAREST)


def main(out: Path) -> None:
    feats = inputs()
    rows = []
    for title, ms in (("without masks", None), ("with masks", masks())):
        stats = reference.site_statistics(feats, masks=ms)
        _, info = reference.max_fuse(feats, masks=ms, return_info=True)
        t = stats.std[:, 0]  # [2, H, W]
        total = t.sum(dim=(1, 2))  # T_i
        a = stats.saliency[:, 0].clamp(min=0)
        rows.append((title, ms, t, total, a, info.winner[0], stats.present[:, 0]))

    font, small, big = _font(13), _font(11), _font(15)
    label_h, title_h = 34, 26
    cols = 5
    width = PAD + cols * (PANEL + PAD)
    height = PAD + len(rows) * (title_h + label_h + PANEL + PAD) + 30
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    t_top = max(float(r[2].max()) for r in rows)
    y = PAD
    for title, ms, t, total, a, winner, present in rows:
        draw.text((PAD, y + 4), title, fill="black", font=big)
        y += title_h
        panels = []
        if ms is None:
            panels += [(f"t_{i} = std, input {i}", "std over the channels", _grey(t[i], t_top))
                       for i in range(2)]
        else:
            panels += [(f"mask m_{i}", "none: 1 everywhere" if ms[i] is None else
                        "1 white, 0 black", _grey(torch.ones(SIZE, SIZE) if ms[i] is None
                                                  else ms[i], 1.0)) for i in range(2)]
        a_top = float(a.max())  # one grey scale per row
        panels += [(f"a_{i} = t_{i} / T_{i}", f"T_{i} = {float(total[i]):.0f}",
                    _grey(a[i], a_top)) for i in range(2)]
        won = [float((winner[present.any(0)] == i).double().mean()) for i in range(2)]
        panels.append(("winner", f"0: {100 * won[0]:.0f}%  1: {100 * won[1]:.0f}%",
                       _winner(winner, present)))
        for k, (text, sub, img) in enumerate(panels):
            x = PAD + k * (PANEL + PAD)
            draw.text((x, y), text, fill="black", font=font)
            draw.text((x, y + 17), sub, fill=(70, 70, 70), font=small)
            fig.paste(img, (x, y + label_h))
            draw.rectangle([x - 1, y + label_h - 1, x + PANEL, y + label_h + PANEL],
                           outline=(150, 150, 150))
        y += label_h + PANEL + PAD
    draw.text((PAD, y), "Inputs 0 (orange) and 1 (blue) cover the whole map, 1 at half the "
              "strength: a_0 ~ a_1 everywhere, the winner is a coin flip.", fill=(60, 60, 60),
              font=small)
    draw.text((PAD, y + 14), "With input 1 masked to the disc, T_1 sums over the disc only: "
              "there a_1 >> a_0 and input 1 wins it all; outside it is removed.",
              fill=(60, 60, 60), font=small)
    fig.save(out, format="PNG", optimize=True)


if __name__ == "__main__":
    main(Path(__file__).resolve().parent / "mask-normaliser.png")
