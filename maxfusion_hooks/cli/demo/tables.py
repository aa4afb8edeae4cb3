"""The numbers of a demo run (the share of sites each condition won per fusion point, own half,
own region) and the table and header the command prints."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..._fusion import Record
from .config import DemoResult

_FINAL = re.compile(r"(down|feature|block|single)\.\d+|mid")  # final merges' record names


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


