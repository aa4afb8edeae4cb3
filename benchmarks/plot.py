"""Plot effective GB/s against input size per method from a ``run.py`` results JSON.

Usage::

    python benchmarks/plot.py benchmarks/results/<device>.json [--out PLOT.png]

One panel per (N, dtype) of the run; x: the bytes of one input, y: effective GB/s (minimum
bytes / time, as in ``harness.py``), both log scale; one series per method, the copy being the
bandwidth limit. Per-residual records only (a step's records are sums over shapes of different
sizes); a shape timed once for two cases is plotted once. Needs matplotlib
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STYLE = {  # method: (label, marker, colour)
    "reference": ("(a) eager reference", "o", "tab:red"),
    "compiled_reference": ("(b) torch.compile(reference)", "s", "tab:orange"),
    "max_fuse": ("(c) max_fuse", "D", "tab:blue"),
    "sum": ("(d) sum (diffusers)", "^", "tab:green"),
    "copy": ("(e) copy (bandwidth limit)", "v", "tab:gray"),
}


def load_points(records: list[dict]) -> dict:
    """``{(n, dtype): {method: sorted [(input_bytes, gbps)]}}`` from per-residual records."""
    seen = set()
    panels: dict = {}
    for r in records:
        if r.get("scope") != "tensor" or r.get("gbps") is None or r["method"] not in STYLE:
            continue
        key = (tuple(r["shape"]), r["channel_dim"], r["n_inputs"], r["dtype"], r["method"])
        if key in seen:
            continue
        seen.add(key)
        panel = panels.setdefault((r["n_inputs"], r["dtype"]), {})
        panel.setdefault(r["method"], []).append((r["input_bytes"], r["gbps"]))
    for panel in panels.values():
        for pts in panel.values():
            pts.sort()
    return panels


def _number(value, _pos=None) -> str:
    return f"{value:g}"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("results", type=Path, help="a JSON file written by benchmarks/run.py")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default: beside the JSON)")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        sys.exit("plot.py needs matplotlib, which is not installed: "
                 "pip install -e '.[bench]'  (or: pip install matplotlib)")

    records = json.loads(args.results.read_text(encoding="utf-8"))
    panels = load_points(records)
    if not panels:
        sys.exit(f"plot.py: no per-residual timings in {args.results}")
    ns = sorted({n for n, _ in panels})
    dtypes = sorted({d for _, d in panels}, key=["float16", "bfloat16", "float32"].index)
    width = max(5.2 * len(dtypes), 10.0)  # room for the title and a one-row legend
    fig, axes = plt.subplots(len(ns), len(dtypes), figsize=(width, 3.8 * len(ns)),
                             squeeze=False, sharex=True)
    for i, n in enumerate(ns):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            for method, pts in panels.get((n, dt), {}).items():
                label, marker, colour = STYLE[method]
                ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker=marker,
                        color=colour, label=label, linewidth=1, markersize=4)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(_number))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(_number))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"N={n}, {dt}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(ns) - 1:
                ax.set_xlabel("bytes of one input (MB)")
            if j == 0:
                ax.set_ylabel("effective GB/s")
    seen = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    order = [STYLE[m][0] for m in STYLE if STYLE[m][0] in seen]
    handles, labels = [seen[lab] for lab in order], order
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    r0 = records[0]
    timing = (f"CUDA events, L2 {r0.get('l2')}, "
              f"{'CUDA graphs' if r0.get('cuda_graphs_requested') else 'no CUDA graphs'}"
              if r0.get("device_type") == "cuda" else "perf_counter, torch path of max_fuse")
    fig.suptitle(f"{r0['device']}: MaxFusion merge, effective GB/s (minimum bytes / median time)"
                 f"\n{timing}; torch {r0.get('torch')}"
                 + ("; quick mode (shrunk shapes)" if r0.get("quick") else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.1 / len(ns), 1, 1 - 0.14 / len(ns)))
    out = args.out or args.results.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
