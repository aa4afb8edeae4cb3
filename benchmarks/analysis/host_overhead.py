"""Host time of one eager ``max_fuse`` / ``max_fuse_many`` call, with the GPU launch stubbed out.

Usage::

    python benchmarks/analysis/host_overhead.py [--calls 400] [--warmup 30] [--arch 90]
        [--json PATH|-]
                                       [--profile]

Each scenario calls the public function on CPU tensors under ``offline_cuda(arch, keep=False)``
(``offline_cuda.py``): the package's launcher, the registered op and Triton's ``JITFunction.run``
(argument binding, specialisation, kernel-cache lookup) run as they would for CUDA tensors, and
the launch itself is a counted no-op. The compilation happens in the warm-up calls and is never
timed. Times are ``time.perf_counter`` around each call; the figure is the median over
``--calls`` calls (p90 beside it).

Breakdown per scenario, measured in separate passes so that each instrument does not weigh on
the total:

- ``launches``: kernel launches per call;
- ``run/launch``: time inside ``JITFunction.run`` per launch (binder + cache lookup + the
  stubbed launch), the median over the launches of ``--calls`` calls, measured by wrapping
  ``JITFunction.run``;
- ``rest``: total minus ``launches x run/launch``: Python argument checking, option
  resolution, output and buffer allocation, layout analysis, the ``torch.ops`` dispatch;
- ``direct``: the same launches (same arguments, captured from one call) issued directly with
  ``kernel[grid](...)``: what the kernels alone cost the host;
- ``--profile``: the functions with the most own time over 50 profiled calls (cProfile; the
  profiler inflates every figure, compare them with each other only).

What the stub leaves out: the driver's own launch (``cuLaunchKernel`` and Triton's C argument
packing, a few microseconds per launch on a GPU machine). What CPU tensors add: with CPU tensors
``max_fuse``'s registered op forwards to a second opaque op (the CPU form of the kernels), one
more ``torch.ops`` dispatch than a CUDA call makes; and CPU allocations of the outputs cost
what the CPU allocator costs, not what the CUDA caching allocator does.

Targets (the issue that asked for this benchmark): at most 100 µs per ``max_fuse`` call and
150 µs per ``max_fuse_many`` SD1.5 step, on this CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/analysis
sys.path.insert(0, str(HERE.parent))  # the shape table
sys.path.insert(0, str(HERE))

TARGET_US = {"max_fuse": 100.0, "max_fuse_many": 150.0}


@dataclass(frozen=True)
class Scenario:
    name: str
    api: str  # "max_fuse" or "max_fuse_many"
    shapes: tuple[tuple[int, ...], ...] | str  # one shape, or a case of shapes.json
    n: int = 2
    dtype: str = "float16"
    kwargs: tuple = ()


SCENARIOS = [
    Scenario("max_fuse [2,320,64,64] N=2 fp16 merge", "max_fuse", ((2, 320, 64, 64),)),
    Scenario("max_fuse [2,320,64,64] N=2 fp16 unmerge", "max_fuse", ((2, 320, 64, 64),),
             kwargs=(("unmerge", True),)),
    Scenario("max_fuse tokens [1,4096,3072] N=2 fp16", "max_fuse", ((1, 4096, 3072),),
             kwargs=(("channel_dim", -1),)),
    Scenario("max_fuse_many SD1.5 step (13 residuals) N=2 fp16", "max_fuse_many",
             "sd15_controlnet_512"),
]


def _inputs(sc: Scenario):
    import torch

    if isinstance(sc.shapes, str):
        from shapes import load_shapes

        shapes = [tuple(s) for s in load_shapes()["cases"][sc.shapes]["shapes"]]
    else:
        shapes = list(sc.shapes)
    dt = getattr(torch, sc.dtype)
    return [[torch.empty(s, dtype=dt) for _ in range(sc.n)] for s in shapes]


def _call(sc: Scenario, groups):
    import maxfusion_kernels as mk

    kw = dict(sc.kwargs)
    if sc.api == "max_fuse":
        feats = groups[0]
        return lambda: mk.max_fuse(feats, backend="triton", **kw)
    return lambda: mk.max_fuse_many(groups, backend="triton", **kw)


def _times(fn, calls: int) -> list[float]:
    gc.collect()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class _RunMeter:
    """Wraps ``JITFunction.run``: time inside it, number of launches, and (once) the launches
    themselves for the direct replay."""

    def __init__(self):
        from triton.runtime.jit import JITFunction

        self.cls = JITFunction
        self.orig = JITFunction.run
        self.durations: list[float] = []
        self.capture: list | None = None

    def __enter__(self):
        orig, meter = self.orig, self

        def run(fn, *args, grid, warmup, **kwargs):
            if meter.capture is not None:
                meter.capture.append((fn, args, dict(kwargs), grid))
            t0 = time.perf_counter()
            try:
                return orig(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                meter.durations.append(time.perf_counter() - t0)

        self.cls.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.orig


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def measure(sc: Scenario, arch: int, calls: int, warmup: int, profile: bool) -> dict:
    import offline_cuda as oc

    from maxfusion_kernels.ops import launch

    groups = _inputs(sc)
    call = _call(sc, groups)
    with oc.offline_cuda(arch, keep=False) as rec:
        # the package's eager path as on CUDA: after the first call of a plan the launcher
        # calls the compiled kernels directly (launch.DIRECT_DEVICE_TYPES)
        launch.DIRECT_DEVICE_TYPES.add("cpu")
        try:
            for _ in range(warmup):  # compiles, fills every cache
                call()
            rec.clear()
            total = _times(call, calls)
            launches_per_call = rec.count / calls
        finally:
            launch.DIRECT_DEVICE_TYPES.discard("cpu")

        # the same calls with every launch through Triton's JITFunction.run (binder, cache)
        for _ in range(warmup):
            call()
        binder_total = _times(call, calls)
        with _RunMeter() as meter:
            _times(call, calls)
        # the median launch: a call preempted by another process moves it no more than it
        # moves the median call
        run_per_launch = statistics.median(meter.durations)

        with _RunMeter() as cap:  # the launches of one call, to issue them directly
            cap.capture = []
            call()
        launches = cap.capture

        def direct():
            for fn, args, kwargs, grid in launches:
                fn[grid](*args, **kwargs)

        for _ in range(warmup):
            direct()
        direct_t = _times(direct, calls)

        top = []
        if profile:
            launch.DIRECT_DEVICE_TYPES.add("cpu")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                call()
            prof.disable()
            launch.DIRECT_DEVICE_TYPES.discard("cpu")
            stats = pstats.Stats(prof)
            rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
            for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
                top.append({"function": f"{Path(file).name}:{line}({func})",
                            "calls_per_call": ncalls / 50, "own_us": tottime / 50 * 1e6,
                            "cum_us": cumtime / 50 * 1e6})
    med = statistics.median(total)
    binder_med = statistics.median(binder_total)
    run_us = run_per_launch * 1e6
    target = TARGET_US[sc.api]
    return {
        "scenario": sc.name, "api": sc.api, "calls": calls,
        "total_us_median": med * 1e6, "total_us_p90": _percentile(total, 0.9) * 1e6,
        "launches_per_call": launches_per_call,
        "binder_total_us_median": binder_med * 1e6,
        "run_us_per_launch": run_us,
        "run_us_per_call": run_us * launches_per_call,
        "rest_us_per_call": binder_med * 1e6 - run_us * launches_per_call,
        "direct_us_median": statistics.median(direct_t) * 1e6,
        "target_us": target, "pass": med * 1e6 <= target,
        "kernels": sorted({fn.__name__ for fn, *_ in launches}),
        "profile": top,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _table(res: dict) -> str:
    head = (f"{'scenario':52s} {'launch':>6s} {'total us':>9s} {'p90':>7s} {'binder':>7s} "
            f"{'run/l':>6s} {'rest':>7s} {'direct':>7s} {'target':>7s}  result")
    lines = [head, "-" * len(head)]
    for r in res["results"]:
        lines.append(
            f"{r['scenario']:52s} {r['launches_per_call']:6.1f} {r['total_us_median']:9.1f} "
            f"{r['total_us_p90']:7.1f} {r['binder_total_us_median']:7.1f} "
            f"{r['run_us_per_launch']:6.1f} {r['rest_us_per_call']:7.1f} "
            f"{r['direct_us_median']:7.1f} {r['target_us']:7.0f}  "
            f"{'PASS' if r['pass'] else 'MISS'}")
    lines += [
        "",
        "total: median host time of one eager call as on CUDA (after a plan's first call the "
        "launcher calls the compiled kernels directly); binder: the same call with every launch "
        "through Triton's JITFunction.run; run/l: time inside JITFunction.run per launch "
        "(binder, cache lookup, stubbed launch); rest: binder - launches x run/l (checks, "
        "allocation, layout); direct: the captured launches alone, through kernel[grid].",
    ]
    for r in res["results"]:
        if r["profile"]:
            lines += ["", f"cProfile, {r['scenario']} (us per call, inflated by the profiler):"]
            for p in r["profile"]:
                lines.append(f"  {p['own_us']:8.1f} own {p['cum_us']:8.1f} cum "
                             f"{p['calls_per_call']:5.1f}x  {p['function']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compiled JITFunctions
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", default=None, help="write the results as JSON to PATH ('-': stdout)")
    ap.add_argument("--profile", action="store_true", help="add a cProfile breakdown")
    args = ap.parse_args(argv)

    import torch
    import triton

    load_before = os.getloadavg()
    results = [measure(sc, args.arch, args.calls, args.warmup, args.profile) for sc in SCENARIOS]
    res = {
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "arch": args.arch, "results": results,
    }
    if args.json == "-":
        print(json.dumps(res, indent=1))
    else:
        print(f"CPU: {res['cpu']} ({res['cores']} cores); load average "
              f"{' '.join(f'{x:.2f}' for x in load_before)} before, "
              f"{' '.join(f'{x:.2f}' for x in res['loadavg_after'])} after; torch "
              f"{res['torch']}, triton {res['triton']}; launches stubbed (offline_cuda, "
              f"sm_{args.arch}); {args.calls} calls per figure")
        print(_table(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
