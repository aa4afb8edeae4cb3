"""``python -m maxfusion_kernels``: fuse two synthetic feature maps and show what won where.

Two "control models" see a 16 x 32 map with 64 channels. Model 0 is expressive (high channel
variance) in the left half, model 1 in the right half; in the top rows the two agree (their
vectors are correlated), so MaxFusion averages them there. The map printed shows, per site,
``=`` where the inputs were averaged and the winner's index elsewhere.
"""

from __future__ import annotations

import argparse

import torch

from . import choose_backend, max_fuse


def synthetic_pair(height: int = 16, width: int = 32, channels: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, channels, height, width, generator=g)
    left = torch.zeros(1, 1, height, width)
    left[..., : width // 2] = 1.0
    strong0 = 0.2 + 1.8 * left  # model 0 is expressive on the left
    strong1 = 0.2 + 1.8 * (1 - left)  # model 1 on the right
    f0 = torch.randn(1, channels, height, width, generator=g) * strong0
    f1 = torch.randn(1, channels, height, width, generator=g) * strong1
    agree = torch.zeros(1, 1, height, width, dtype=torch.bool)
    agree[:, :, : height // 4] = True  # the top rows: both models see the same structure
    f0 = torch.where(agree, shared * strong0, f0)
    f1 = torch.where(agree, shared * strong1 + 0.05 * f1, f1)
    return f0, f1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxfusion_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--preset", default="paper", choices=["paper", "reference"])
    args = parser.parse_args(argv)

    f0, f1 = (f.to(args.device) for f in synthetic_pair())
    fused, info = max_fuse([f0, f1], threshold=args.threshold, preset=args.preset,
                           return_info=True)
    backend = choose_backend(f0.device)
    winner = info.winner[0].cpu()
    averaged = info.members[:, 0].all(dim=0).cpu()
    print(f"maxfusion: fused 2 feature maps {tuple(f0.shape)} on {args.device} "
          f"(backend: {backend}, preset: {args.preset}, threshold: {args.threshold})")
    print("site map ('=' averaged, else the winning model):")
    for r in range(winner.shape[0]):
        print("  " + "".join("=" if averaged[r, c] else str(int(winner[r, c]))
                             for c in range(winner.shape[1])))
    w = winner.shape[1]
    for name, cols in (("left half", slice(0, w // 2)), ("right half", slice(w // 2, w))):
        sel = ~averaged[:, cols]
        won0 = int((winner[:, cols][sel] == 0).sum())
        total = int(sel.sum())
        print(f"{name}: model 0 won {won0}/{total} non-averaged sites, model 1 won "
              f"{total - won0}/{total}")
    print(f"averaged sites: {int(averaged.sum())}/{averaged.numel()}; "
          f"output {tuple(fused.shape)} {fused.dtype}, finite: {bool(torch.isfinite(fused).all())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
