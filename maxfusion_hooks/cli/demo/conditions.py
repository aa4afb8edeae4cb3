"""The demo's synthetic conditions (two images that conflict by halves, or overlap for the masked
run) and its regional masks."""

from __future__ import annotations

import math

import torch


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


