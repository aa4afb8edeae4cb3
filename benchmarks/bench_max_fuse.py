"""Time MaxFusion on the 13 residuals of an SD1.5 ControlNet (one denoising step).

Usage::

    python benchmarks/bench_max_fuse.py [--quick] [--device cuda|cpu] [--out PATH]

For every shape of the case ``sd15_controlnet_512`` of ``benchmarks/shapes.json`` (B=2, N=2
inputs from ``shapes.make_features``: half the sites agree, half do not), four methods:

- ``reference``: ``reference.max_fuse(feats, preset="reference", dtype=torch.float32)``, the
  authors' algorithm in eager PyTorch, imported from the tests' reference code;
- ``max_fuse``: ``maxfusion_kernels.max_fuse(feats)``, default options (``backend="auto"``, the
  Triton kernels, on CUDA; ``backend="torch"`` on CPU);
- ``sum``: ``f_1 + f_2 + ...``, what diffusers' ``MultiControlNetModel`` does instead;
- ``copy``: ``dst.copy_(src)`` on the same device, the bandwidth yardstick. ``src`` holds
  ``ceil((N + 1) / 2)`` x the elements of one input, so that the copy, which reads ``src`` and
  writes ``dst``, moves the same minimum bytes as a fusion.

Bytes: a fusion must at least read its N inputs once and write one output, so every method's
``gbps`` is ``(N + 1) * input_bytes / time``; ``copy_gbps`` is the copy's own bytes over its
time, and ``max_fuse`` GB/s as a % of ``copy_gbps`` is the fraction of the achievable bandwidth.

Timing: on CUDA, a warm-up, then one pair of CUDA events around each of many calls and the
median; before each call a 256 MiB buffer is zeroed so the inputs come from DRAM, not L2 (pass
``--no-flush`` to keep caches warm). ``peak_extra_bytes`` is ``torch.cuda.max_memory_allocated``
over one call, reset before it, minus what was allocated before it: the method's temporaries
plus its output (the copy writes into a preallocated buffer). On CPU: ``time.perf_counter``,
median of a few calls; no memory figure.

The whole step is the sum over the 13 shapes. ``--quick`` uses fewer repetitions and times each
distinct shape once (6 of the 13), counting it as often as it occurs in the step.

Output: a table on stdout and a JSON list of records (``device, case, index, count, shape,
n_inputs, dtype, method, backend, ms, bytes, gbps, copy_gbps, peak_extra_bytes, ...``) in
``--out``, by default ``benchmarks/results/<device-name-slug>.json``. The step is recorded with
``case = "sd15_controlnet_512:step"`` and ``shape = null``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import maxfusion_kernels
from maxfusion_kernels import reference

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script: the shape table sits beside this file
    sys.path.insert(0, str(HERE))
from shapes import load_shapes, make_features  # noqa: E402

CASE = "sd15_controlnet_512"
METHODS = ("reference", "max_fuse", "sum", "copy")
FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor()}".strip()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def diffusers_sum(feats: list[torch.Tensor]) -> torch.Tensor:
    """``MultiControlNetModel``: ``samples_prev + samples_curr``, model after model."""
    out = feats[0] + feats[1]
    for f in feats[2:]:
        out = out + f
    return out


def time_cuda(fn, reps: int, warmup: int, flush: torch.Tensor | None) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def time_cpu(fn, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, by ``time.perf_counter``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Bytes ``fn()`` allocates at its peak over what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def bench_shape(shape, n, dtype, device, channel_dim, seed, args, flush):
    """``{method: (ms, bytes, peak_extra_bytes)}`` and the share of averaged sites."""
    feats = make_features(shape, n, dtype, device, channel_dim, seed)
    backend = "auto" if device.type == "cuda" else "torch"
    numel = feats[0].numel()
    min_bytes = (n + 1) * numel * feats[0].element_size()
    src = torch.randn(-(-(n + 1) * numel // 2), device=device).to(dtype)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()

    fns = {
        "reference": lambda: reference.max_fuse(
            feats, preset="reference", channel_dim=channel_dim, dtype=torch.float32
        ),
        "max_fuse": lambda: maxfusion_kernels.max_fuse(
            feats, channel_dim=channel_dim, backend=backend
        ),
        "sum": lambda: diffusers_sum(feats),
        "copy": lambda: dst.copy_(src),
    }
    res = {}
    for method in METHODS:
        fn = fns[method]
        if device.type == "cuda":
            ms = time_cuda(fn, args.reps, args.warmup, flush)
        else:
            ms = time_cpu(fn, args.reps, args.warmup)
        nbytes = copy_bytes if method == "copy" else min_bytes
        res[method] = (ms, nbytes, peak_extra_bytes(fn, device))
    _, info = maxfusion_kernels.max_fuse(
        feats, channel_dim=channel_dim, backend=backend, return_info=True
    )
    averaged = (info.members.sum(dim=0) > 1).float().mean().item()
    return res, averaged


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e6)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions; each distinct shape timed once")
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default benchmarks/results/<device-name-slug>.json)")
    ap.add_argument("--n-inputs", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 on CPU")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-flush", action="store_true", help="CUDA: keep L2 warm between calls")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    on_gpu = device.type == "cuda"
    dtype_name = args.dtype or ("float16" if on_gpu else "float32")
    dtype = getattr(torch, dtype_name)
    n = args.n_inputs
    if args.reps is None:
        args.reps = (30 if args.quick else 200) if on_gpu else (3 if args.quick else 5)
    if args.warmup is None:
        args.warmup = (3 if args.quick else 10) if on_gpu else 1
    flush = None
    if on_gpu and not args.no_flush:
        flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)

    case = load_shapes()["cases"][CASE]
    shapes = [tuple(s) for s in case["shapes"]]
    channel_dim = case["channel_dim"]
    if args.quick:  # each distinct shape once, counted as often as it occurs
        plan = [(shapes.index(s), s, shapes.count(s)) for s in dict.fromkeys(shapes)]
    else:
        plan = [(i, s, 1) for i, s in enumerate(shapes)]

    dev_name = device_name(device)
    backend = maxfusion_kernels.choose_backend(device, "auto" if on_gpu else "torch")
    common = dict(device=dev_name, n_inputs=n, dtype=dtype_name, torch=torch.__version__,
                  quick=args.quick, reps=args.reps, flush_l2=flush is not None)
    print(f"# {CASE}: {len(shapes)} residuals, N={n}, {dtype_name}, device {dev_name!r}, "
          f"max_fuse backend {backend}, torch {torch.__version__}, reps {args.reps}"
          + (", L2 flushed" if flush is not None else ""))
    hdr = (f"{'shape':>18} {'x':>2} {'ref ms':>9} {'mf ms':>8} {'sum ms':>8} {'copy ms':>8} "
           f"{'ref/mf':>7} {'sum/mf':>7} {'mf GB/s':>8} {'cp GB/s':>8} {'%copy':>6} "
           f"{'avg%':>5} {'ref MiB':>8} {'mf MiB':>7}")
    print(hdr)
    print("-" * len(hdr))

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.1f}"

    def row(label, count, res, averaged):
        ms = {m: res[m][0] for m in METHODS}
        mf_gbps = gbps(res["max_fuse"][1], ms["max_fuse"])
        cp_gbps = gbps(res["copy"][1], ms["copy"])
        avg = "" if averaged is None else f"{100 * averaged:.0f}"
        print(f"{label:>18} {count:>2} {ms['reference']:9.3f} {ms['max_fuse']:8.3f} "
              f"{ms['sum']:8.3f} {ms['copy']:8.3f} {ms['reference'] / ms['max_fuse']:7.2f} "
              f"{ms['sum'] / ms['max_fuse']:7.2f} {mf_gbps:8.1f} {cp_gbps:8.1f} "
              f"{100 * mf_gbps / cp_gbps:6.1f} {avg:>5} {mib(res['reference'][2]):>8} "
              f"{mib(res['max_fuse'][2]):>7}")

    records = []
    step = {m: [0.0, 0, None] for m in METHODS}  # ms, bytes, max peak
    for index, shape, count in plan:
        res, averaged = bench_shape(shape, n, dtype, device, channel_dim, index, args, flush)
        row("x".join(map(str, shape)), count, res, averaged)
        copy_gbps = gbps(res["copy"][1], res["copy"][0])
        for method in METHODS:
            ms, nbytes, peak = res[method]
            rec = dict(common, case=CASE, index=index, count=count, shape=list(shape),
                       method=method, backend=backend if method == "max_fuse" else None,
                       ms=ms, bytes=nbytes, gbps=gbps(nbytes, ms), copy_gbps=copy_gbps,
                       peak_extra_bytes=peak)
            if method == "max_fuse":
                rec["averaged_site_fraction"] = averaged
            records.append(rec)
            acc = step[method]
            acc[0] += count * ms
            acc[1] += count * nbytes
            if peak is not None:
                acc[2] = peak if acc[2] is None else max(acc[2], peak)

    print("-" * len(hdr))
    step_res = {m: tuple(step[m]) for m in METHODS}
    row(f"step ({len(shapes)})", sum(c for _, _, c in plan), step_res, None)
    step_copy_gbps = gbps(step["copy"][1], step["copy"][0])
    for method in METHODS:
        ms, nbytes, peak = step[method]
        records.append(dict(common, case=f"{CASE}:step", index=None, count=len(shapes),
                            shape=None, method=method,
                            backend=backend if method == "max_fuse" else None,
                            ms=ms, bytes=nbytes, gbps=gbps(nbytes, ms),
                            copy_gbps=step_copy_gbps, peak_extra_bytes=peak))
    print("ref/mf, sum/mf: time ratios (> 1: max_fuse faster); %copy: max_fuse GB/s as % of the "
          "copy's; avg%: sites averaged (group > 1); MiB: peak extra memory")

    out = args.out or HERE / "results" / f"{slug(dev_name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} records to {out}")
    return records


if __name__ == "__main__":
    main()
