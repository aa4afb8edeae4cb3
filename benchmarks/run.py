"""Time MaxFusion against its baselines on every case of the shape table; write JSON records.

One file (over 400 lines) because it is one command-line run: options, the timing loop over the
shape table, the tables and the records (the timing itself is ``harness.py``).

Usage::

    python benchmarks/run.py [--device cuda|cpu] [--quick] [--cases A,B] [--n-inputs 2,3,4]
                             [--dtypes float16,bfloat16,float32] [--no-compile] [--cuda-graphs]
                             [--no-flush] [--no-backward] [--reps R] [--warmup W]
                             [--max-elements E] [--out PATH]
    python benchmarks/run.py --from-json benchmarks/results/<device>.json [--markdown]

For each case of ``benchmarks/shapes.json``, each N and dtype: every distinct shape of the case
is timed with every method of ``harness.py`` (``reference``, ``compiled_reference``,
``max_fuse``, ``sum``, ``copy``); for a case of several residuals (``sd15_controlnet_512``,
``sdxl_controlnet_1024``, ``sd15_t2i_adapter_512``) the whole step is also timed as one region:
the per-residual methods in a loop over the residuals, ``max_fuse_many`` as one call, ``copy``
as one copy of the step's bytes. A shape shared by two cases (the T2I-Adapter's maps are
SD1.5's) is timed once and its records name the case it was measured in.

The backward (``--no-backward`` skips it): for the first shape of each case, merge and unmerge,
``max_fuse`` forward+backward (``torch.autograd.grad`` into inputs requiring grad) and its
backward alone (one saved graph, ``retain_graph``), the same two for autograd through the eager
reference (``maxfusion_kernels.reference``), ``max_fuse``'s forward alone, and a copy of the
backward's minimum bytes (``harness.backward_bytes``: the N inputs and the output gradients read
once, the N input gradients written once); one table per N and dtype, records of scope
``backward``. ``--quick``: SD1.5's first residual and SD3's tokens at the first N only.

Output: a table per case on stdout, the pass/miss line of each H100 target for a CUDA run, and
a JSON list of records (one per case, scope, shape, N, dtype and method) in ``--out``, by
default ``benchmarks/results/<device-name-slug>.json`` (committed data), and for ``--quick``
``<temp dir>/maxfusion-bench-<device-name-slug>-quick.json`` (never in the checkout). Timing
method, byte counting and memory measurement: ``harness.py`` and docs/performance.md.
``--from-json`` prints the tables and target lines of a saved run again (``--markdown``:
tables as Markdown).

``--quick``: on CPU, shapes shrunk to at most 2**18 elements per input (``harness.shrink``),
N in {2, 3}, float32, at least 3 calls and 0.05 s of calls per method, and ``torch.compile`` of
the reference for two shapes only (SD1.5's first residual and SD3's tokens, at the first N and
dtype); on CUDA, full sizes, N=2, float16, 30 repetitions, the same two compiles. On 2 idle CPU
cores it takes about 10 s plus the two compilations (about 15 s with a cold Inductor cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script: the shape table and harness sit beside this
    sys.path.insert(0, str(HERE))
import harness as H  # noqa: E402
from shapes import load_shapes, make_features  # noqa: E402

import maxfusion_kernels  # noqa: E402

QUICK_COMPILE = {("sd15_controlnet_512", 0), ("sd3_tokens_1024", 0)}  # (case, shape index)
QUICK_CPU_MAX_ELEMENTS = 2**18
BACKWARD_QUICK = ("sd15_controlnet_512", "sd3_tokens_1024")  # --quick: their first shapes
STEP_CASE = "sd15_controlnet_512"  # the target's whole step: 13 residuals, N=2, fp16, B=2
TARGET_MIN_INPUT_BYTES = 8e6  # "inputs of 8 MB or more" (one input, decimal MB)


# ----------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------


def _safe(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return None, msg


def _time_methods(fns: dict, timer: H.Timer) -> dict:
    """``{method: {ms, cuda_graph, peak_extra_bytes} or {error}}`` for ``{method: (fn,
    capturable)}``."""
    res = {}
    for method, (fn, capturable) in fns.items():
        timed, err = _safe(lambda fn=fn, c=capturable: timer.time(fn, c))
        if err:
            print(f"  {method}: FAILED ({err})")
            res[method] = {"error": err}
            continue
        peak, _ = _safe(lambda fn=fn: timer.peak_extra_bytes(fn))
        res[method] = {"ms": timed.ms, "ms_min": timed.ms_min, "cuda_graph": timed.cuda_graph,
                       "peak_extra_bytes": peak}
    return res


def _compile_first_call(feats, cd, device) -> tuple[float | None, str | None]:
    """Compile the reference for this shape (its first call); seconds or an error."""
    def first():
        fn = H.compiled_reference()
        t0 = time.perf_counter()
        fn(feats, cd)
        H.sync(device)
        return time.perf_counter() - t0
    secs, err = _safe(first)
    if err:
        print(f"  compiled_reference: compile FAILED ({err})")
    return secs, err


def measure_tensor(shape, cd, n, dtype, device, timer, do_compile, seed) -> dict:
    """All per-residual methods on one shape."""
    feats = make_features(shape, n, dtype, device, cd, seed)
    backend = H.backend_for(device)
    nbytes = H.fusion_bytes([shape], n, dtype)
    src, dst = H.copy_buffers(nbytes["bytes"], dtype, device)
    fns = {
        # copies its weights host-to-device on every call: never CUDA-graph captured
        "reference": (lambda: H.reference_fuse(feats, cd), False),
        "max_fuse": (lambda: H.max_fuse(feats, cd, backend), True),
        "sum": (lambda: H.diffusers_sum(feats), True),
        "copy": (lambda: dst.copy_(src), True),
    }
    compile_s = compile_err = None
    if do_compile:
        compile_s, compile_err = _compile_first_call(feats, cd, device)
        if compile_err is None:
            comp = H.compiled_reference()
            fns = {"reference": fns["reference"],
                   "compiled_reference": (lambda: comp(feats, cd), True),
                   **{k: v for k, v in fns.items() if k != "reference"}}
    res = _time_methods(fns, timer)
    if compile_err is not None:
        res["compiled_reference"] = {"error": compile_err}
    elif do_compile and "ms" in res.get("compiled_reference", {}):
        res["compiled_reference"]["compile_s"] = compile_s
    if "ms" in res["copy"]:
        res["copy"]["bytes"] = 2 * src.numel() * src.element_size()
    info, _ = _safe(lambda: maxfusion_kernels.max_fuse(
        feats, preset=H.PRESET, channel_dim=cd, backend=backend, return_info=True)[1])
    if info is not None and "ms" in res["max_fuse"]:
        res["max_fuse"]["averaged_site_fraction"] = (
            (info.members.sum(dim=0) > 1).float().mean().item())
    return res


def measure_step(shapes, cd, n, dtype, device, timer, compiled_ok) -> dict:
    """The whole step as one timed region per method."""
    groups = [make_features(s, n, dtype, device, cd, seed=i) for i, s in enumerate(shapes)]
    backend = H.backend_for(device)
    nbytes = H.fusion_bytes(shapes, n, dtype)
    src, dst = H.copy_buffers(nbytes["bytes"], dtype, device)

    def loop(fn):
        return lambda: [fn(g) for g in groups]

    fns = {"reference": (loop(lambda g: H.reference_fuse(g, cd)), False)}
    if compiled_ok:
        comp = H.compiled_reference()
        fns["compiled_reference"] = (loop(lambda g: comp(g, cd)), True)
    fns["max_fuse"] = (loop(lambda g: H.max_fuse(g, cd, backend)), True)
    fns["max_fuse_many"] = (lambda: H.max_fuse_many(groups, cd, backend), True)
    fns["sum"] = (loop(H.diffusers_sum), True)
    fns["copy"] = (lambda: dst.copy_(src), True)
    res = _time_methods(fns, timer)
    if "ms" in res["copy"]:
        res["copy"]["bytes"] = 2 * src.numel() * src.element_size()
    return res


def _grad_call(fwd, feats, unmerge):
    """``(forward+backward call, backward-only call)`` of ``fwd`` on leaf copies of ``feats``
    that require grad: the first runs the forward and ``torch.autograd.grad`` of its outputs
    into the inputs; the second reruns only the backward of one saved graph
    (``retain_graph``)."""
    leaves = [f.detach().clone().requires_grad_() for f in feats]
    first = fwd(leaves)
    outs = list(first) if unmerge else [first]
    gouts = [torch.randn_like(o) for o in outs]  # output gradients, in each output's dtype

    def fwd_bwd():
        res = fwd(leaves)
        return torch.autograd.grad(list(res) if unmerge else [res], leaves, gouts)

    def bwd():
        return torch.autograd.grad(outs, leaves, gouts, retain_graph=True)

    return fwd_bwd, bwd


BACKWARD_METHODS = ("reference_fwd_bwd", "reference_bwd", "max_fuse_fwd", "max_fuse_fwd_bwd",
                    "max_fuse_bwd", "copy")


def measure_backward(shape, cd, n, dtype, device, timer, unmerge, seed) -> dict:
    """The gradient on one shape: forward+backward and the backward alone of ``max_fuse`` and
    of the eager reference (autograd through ``maxfusion_kernels.reference``), and
    ``max_fuse``'s forward alone (no input requires grad). GB/s count each method's minimum
    bytes (``harness.backward_bytes``); the copy moves the backward's minimum."""
    feats = make_features(shape, n, dtype, device, cd, seed)
    backend = H.backend_for(device)
    nbytes = H.backward_bytes([shape], n, dtype, unmerge)
    src, dst = H.copy_buffers(nbytes["backward"], dtype, device)
    ref_fb, ref_b = _grad_call(lambda fs: H.reference_fuse(fs, cd, unmerge), feats, unmerge)
    mf_fb, mf_b = _grad_call(lambda fs: H.max_fuse(fs, cd, backend, unmerge), feats, unmerge)
    fns = {
        "reference_fwd_bwd": (ref_fb, False),  # the eager reference is never captured
        "reference_bwd": (ref_b, False),
        "max_fuse_fwd": (lambda: H.max_fuse(feats, cd, backend, unmerge), True),
        "max_fuse_fwd_bwd": (mf_fb, True),
        "max_fuse_bwd": (mf_b, True),
        "copy": (lambda: dst.copy_(src), True),
    }
    res = _time_methods(fns, timer)
    minimum = {"reference_fwd_bwd": "forward_backward", "max_fuse_fwd_bwd": "forward_backward",
               "reference_bwd": "backward", "max_fuse_bwd": "backward",
               "max_fuse_fwd": "forward", "copy": "backward"}
    ok = {m: r for m, r in res.items() if "ms" in r}
    copy_gbps = (2 * src.numel() * src.element_size() / (ok["copy"]["ms"] * 1e6)
                 if "copy" in ok else None)
    for m, r in ok.items():
        r["min_bytes"] = nbytes[minimum[m]]
        r["gbps"] = r["min_bytes"] / (r["ms"] * 1e6)
        r["copy_gbps"] = copy_gbps
        r["pct_copy"] = 100 * r["gbps"] / copy_gbps if copy_gbps else None
    if "copy" in ok:
        ok["copy"]["bytes"] = 2 * src.numel() * src.element_size()
    for ours, base in (("max_fuse_fwd_bwd", "reference_fwd_bwd"),
                       ("max_fuse_bwd", "reference_bwd")):
        if ours in ok and base in ok:
            ok[ours]["x_vs_reference"] = ok[base]["ms"] / ok[ours]["ms"]
    if "max_fuse_fwd" in ok and "max_fuse_fwd_bwd" in ok:
        ok["max_fuse_fwd_bwd"]["x_of_forward"] = (ok["max_fuse_fwd_bwd"]["ms"]
                                                  / ok["max_fuse_fwd"]["ms"])
    return res


def add_ratios(res: dict, min_bytes: int) -> None:
    """GB/s of every method, the copy's GB/s, and the ratios between methods, in place."""
    ok = {m: r for m, r in res.items() if "ms" in r}
    copy = ok.get("copy")
    copy_gbps = copy["bytes"] / (copy["ms"] * 1e6) if copy else None
    for r in ok.values():
        r["gbps"] = min_bytes / (r["ms"] * 1e6)
        r["copy_gbps"] = copy_gbps
        r["pct_copy"] = 100 * r["gbps"] / copy_gbps if copy_gbps else None
        for base in ("reference", "compiled_reference", "sum"):
            r[f"x_vs_{base}"] = ok[base]["ms"] / r["ms"] if base in ok else None


# ----------------------------------------------------------------------------------------
# printing
# ----------------------------------------------------------------------------------------


def _ms(r: dict | None) -> str:
    if r is None:
        return "-"
    if "ms" not in r:
        return "FAIL"
    v = r["ms"]
    return f"{v:.1f}" if v >= 100 else f"{v:.3f}" if v >= 1 else f"{v:.4f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _mib(r: dict | None) -> str:
    if r is None or r.get("peak_extra_bytes") is None:
        return "-"
    return f"{r['peak_extra_bytes'] / 2**20:.1f}"


def _cells(label: str, count: int, res: dict, ours: str) -> list[str]:
    o = res.get(ours, {})
    g = res.get
    return [label, str(count), _ms(g("reference")), _ms(g("compiled_reference")),
            _ms(g("max_fuse")), _ms(g("max_fuse_many")), _ms(g("sum")), _ms(g("copy")),
            f"{o.get('gbps') or 0:.1f}", f"{o.get('copy_gbps') or 0:.1f}",
            f"{o.get('pct_copy') or 0:.1f}", _x(o.get("x_vs_reference")),
            _x(o.get("x_vs_compiled_reference")), _x(o.get("x_vs_sum")),
            _mib(g("reference")), _mib(g("compiled_reference")), _mib(o)]


COLUMNS = ["shape", "x", "ref ms", "cmp ms", "mf ms", "many ms", "sum ms", "copy ms", "mf GB/s",
           "cp GB/s", "%copy", "ref/mf", "cmp/mf", "sum/mf", "ref MiB", "cmp MiB", "mf MiB"]
WIDTHS = [20, 2, 8, 8, 8, 8, 8, 8, 8, 8, 6, 7, 7, 7, 8, 8, 7]
HEADER = " ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, WIDTHS))


def print_header(title: str, markdown: bool = False) -> None:
    if markdown:
        print(f"\n**{title}**\n")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
    else:
        print(f"\n## {title}")
        print(HEADER)
        print("-" * len(HEADER))


def print_row(label: str, count: int, res: dict, ours: str, markdown: bool = False) -> None:
    cells = _cells(label, count, res, ours)
    if markdown:
        print("| " + " | ".join(cells) + " |")
    else:
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS)))


def _title(case: str, n_shapes: int, n: int, dtype: str) -> str:
    return f"{case}: {n_shapes} residual(s), N={n}, {dtype}"


def print_from_records(records: list[dict], markdown: bool) -> None:
    """The tables of a saved run, in the order they were measured."""
    groups: dict = {}
    backward: dict = {}
    for r in records:
        if r["scope"] == "backward":
            row = (tuple(r["shape"]), r["unmerge"])
            backward.setdefault((r["n_inputs"], r["dtype"]), {}).setdefault(
                row, {})[r["method"]] = r
            continue
        key = (r["n_inputs"], r["dtype"], r["case"])
        row = ("step", None) if r["scope"] == "step" else ("tensor", tuple(r["shape"]))
        groups.setdefault(key, {}).setdefault(row, {})[r["method"]] = r
    for (n, dtype, case), rows in groups.items():
        tensor_rows = [(k, v) for k, v in rows.items() if k[0] == "tensor"]
        if ("step", None) in rows:
            n_shapes = next(iter(rows[("step", None)].values()))["count"]
        else:
            n_shapes = sum(next(iter(v.values()))["count"] for _, v in tensor_rows)
        print_header(_title(case, n_shapes, n, dtype), markdown)
        for (_, shape), res in tensor_rows:
            count = next(iter(res.values()))["count"]
            print_row("x".join(map(str, shape)), count, res, "max_fuse", markdown)
        if ("step", None) in rows:
            res = rows[("step", None)]
            if not markdown:
                print("-" * len(HEADER))
            print_row(f"step ({n_shapes})", n_shapes, res, "max_fuse_many", markdown)
    for (n, dtype), rows in backward.items():
        print_backward_header(_backward_title(n, dtype), markdown)
        for (shape, unmerge), res in rows.items():
            print_backward_row("x".join(map(str, shape)), unmerge, res, markdown)


LEGEND = ("ms: median time per call (step rows: the whole step; max_fuse and the baselines in a "
          "loop over the residuals, max_fuse_many in one call, copy in one copy); GB/s: minimum "
          "bytes (N inputs read + 1 output written, input dtype) / time; %copy: mf GB/s as % of "
          "the copy's; ref/mf, cmp/mf, sum/mf: time ratios (> 1: max_fuse faster); mf = "
          "max_fuse, or max_fuse_many on step rows; MiB: peak extra memory (CUDA only).")


BWD_COLUMNS = ["shape", "mode", "ref f+b", "ref b", "mf fwd", "mf f+b", "mf b", "copy ms",
               "b GB/s", "f+b GB/s", "cp GB/s", "%copy", "ref/mf f+b", "ref/mf b", "f+b/fwd"]
BWD_WIDTHS = [20, 7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 6, 10, 8, 7]
BWD_HEADER = " ".join(f"{c:>{w}}" for c, w in zip(BWD_COLUMNS, BWD_WIDTHS))


def print_backward_header(title: str, markdown: bool = False) -> None:
    if markdown:
        print(f"\n**{title}**\n")
        print("| " + " | ".join(BWD_COLUMNS) + " |")
        print("|" + "---|" * len(BWD_COLUMNS))
    else:
        print(f"\n## {title}")
        print(BWD_HEADER)
        print("-" * len(BWD_HEADER))


def print_backward_row(label: str, unmerge: bool, res: dict, markdown: bool = False) -> None:
    g = res.get
    fb, b = g("max_fuse_fwd_bwd") or {}, g("max_fuse_bwd") or {}
    cells = [label, "unmerge" if unmerge else "merge", _ms(g("reference_fwd_bwd")),
             _ms(g("reference_bwd")), _ms(g("max_fuse_fwd")), _ms(g("max_fuse_fwd_bwd")),
             _ms(g("max_fuse_bwd")), _ms(g("copy")), f"{b.get('gbps') or 0:.1f}",
             f"{fb.get('gbps') or 0:.1f}", f"{b.get('copy_gbps') or 0:.1f}",
             f"{b.get('pct_copy') or 0:.1f}", _x(fb.get("x_vs_reference")),
             _x(b.get("x_vs_reference")), _x(fb.get("x_of_forward"))]
    if markdown:
        print("| " + " | ".join(cells) + " |")
    else:
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, BWD_WIDTHS)))


def _backward_title(n: int, dtype: str) -> str:
    return f"backward: N={n}, {dtype}, inputs requiring grad"


BWD_LEGEND = ("backward rows: ref = autograd through the eager reference "
              "(maxfusion_kernels.reference), mf = max_fuse; f+b: forward then "
              "torch.autograd.grad into the inputs; b: the backward alone (one saved graph, "
              "retain_graph); fwd: max_fuse's forward with no input requiring grad; b GB/s: "
              "minimum backward bytes (N inputs + the output gradients read, N input gradients "
              "written) / mf b time; f+b GB/s: the forward's minimum added, / mf f+b time; "
              "%copy: b GB/s as % of a copy of the backward's bytes; ref/mf: time ratios "
              "(> 1: max_fuse faster); f+b/fwd: mf f+b time / mf fwd time.")


# ----------------------------------------------------------------------------------------
# targets (H100)
# ----------------------------------------------------------------------------------------


def _where(r: dict) -> str:
    shape = "x".join(map(str, r["shape"])) if r.get("shape") else f"step of {r['count']}"
    return f"{r['case']} {shape} N={r['n_inputs']} {r['dtype']}"


def _worst(recs, key, goal, higher_is_better=True):
    vals = [r for r in recs if r.get(key) is not None]
    if not vals:
        return None
    worst = min(vals, key=lambda r: r[key]) if higher_is_better else max(vals,
                                                                         key=lambda r: r[key])
    passed = sum((r[key] >= goal) if higher_is_better else (r[key] <= goal) for r in vals)
    return worst, passed, len(vals)


def target_lines(records: list[dict]) -> list[str]:
    """One PASS/MISS line per H100 target of the project, from a run's records."""
    def ok(r):
        return r.get("ms") is not None

    # a shape timed once for two cases counts once
    per = [r for r in records if r["scope"] == "tensor" and ok(r) and r["measured_in"] == r["case"]]
    mf = [r for r in per if r["method"] == "max_fuse"]
    r0 = records[0] if records else {}
    lines = [f"targets (set for an H100) on {r0.get('device')!r}: "
             + ("CUDA events, L2 " + str(r0.get("l2")) + ", "
                + ("CUDA graph replays" if r0.get("cuda_graphs_requested") else "eager calls")
                if r0.get("device_type") == "cuda" else
                "a CPU run of the torch path; these lines mean nothing for the GPU targets")]

    def line(name, verdict):
        lines.append(f"TARGET {name}: {verdict}")

    big = [r for r in mf if r["input_bytes"] >= TARGET_MIN_INPUT_BYTES]
    w = _worst(big, "pct_copy", 85.0)
    line("max_fuse >= 85% of copy GB/s (inputs >= 8 MB)",
         "NOT MEASURED in this run" if w is None else
         f"{'PASS' if w[1] == w[2] else 'MISS'} ({w[1]}/{w[2]} shapes; worst "
         f"{w[0]['pct_copy']:.1f}% at {_where(w[0])})")
    for key, goal, name in (("x_vs_reference", 10.0, ">= 10x faster than eager reference (a)"),
                            ("x_vs_compiled_reference", 1.5,
                             ">= 1.5x faster than compiled reference (b)")):
        w = _worst(mf, key, goal)
        line(f"max_fuse {name}",
             "NOT MEASURED in this run" if w is None else
             f"{'PASS' if w[1] == w[2] else 'MISS'} ({w[1]}/{w[2]} shapes; worst "
             f"{w[0][key]:.2f}x at {_where(w[0])})")

    step = [r for r in records if r["scope"] == "step" and r["case"] == STEP_CASE
            and r["n_inputs"] == 2 and r["dtype"] == "float16" and ok(r)]
    many = next((r for r in step if r["method"] == "max_fuse_many"), None)
    sums = next((r for r in step if r["method"] == "sum"), None)
    if many is None or sums is None:
        line("SD1.5 step (13 residuals, N=2, fp16, B=2): max_fuse_many time <= sum's",
             "NOT MEASURED in this run")
    else:
        mode = ("CUDA graph replays: GPU time" if many["cuda_graph"] and sums["cuda_graph"]
                else "eager: includes host launch time; --cuda-graphs gives GPU time")
        line("SD1.5 step (13 residuals, N=2, fp16, B=2): max_fuse_many time <= sum's",
             f"{'PASS' if many['ms'] <= sums['ms'] else 'MISS'} ({many['ms']:.4f} ms vs "
             f"{sums['ms']:.4f} ms, {mode})")

    mem = [r for r in records if r["method"] in ("max_fuse", "max_fuse_many") and ok(r)
           and r.get("peak_extra_bytes") is not None and r["measured_in"] == r["case"]]
    for r in mem:
        r["_mem_ratio"] = r["peak_extra_bytes"] / r["mem_allowance_bytes"]
    w = _worst(mem, "_mem_ratio", 1.0, higher_is_better=False)
    line("extra memory <= outputs + per-site statistics",
         "NOT MEASURED in this run (CUDA only)" if w is None else
         f"{'PASS' if w[1] == w[2] else 'MISS'} ({w[1]}/{w[2]}; worst "
         f"{w[0]['peak_extra_bytes']} B vs allowance {w[0]['mem_allowance_bytes']} B at "
         f"{_where(w[0])} {w[0]['method']})")
    for r in mem:
        del r["_mem_ratio"]
    return lines


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def _csv(kind):
    def parse(text):
        return [kind(v) for v in text.split(",") if v]
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--device", choices=("cuda", "cpu"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the reduced set (see the docstring)")
    ap.add_argument("--cases", type=_csv(str), default=None,
                    help="comma-separated case names (default: every case of shapes.json)")
    ap.add_argument("--n-inputs", type=_csv(int), default=None, help="e.g. 2,3,4")
    ap.add_argument("--dtypes", type=_csv(str), default=None, help="e.g. float16,bfloat16")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (method b)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="CUDA: time CUDA-graph replays (GPU time, no launch overhead); "
                         "default: eager calls")
    ap.add_argument("--no-flush", action="store_true",
                    help="CUDA: keep L2 warm between calls (default: flush, inputs from DRAM)")
    ap.add_argument("--no-backward", action="store_true",
                    help="skip the backward rows (the first shape of each case, merge and "
                         "unmerge; --quick: SD1.5's first residual and SD3's tokens, first N "
                         "only)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--max-elements", type=int, default=None,
                    help="shrink shapes to at most this many elements per input (0: full "
                         "size; default: 2**18 for --quick on CPU, else full size)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch.set_num_threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default benchmarks/results/<device-name-slug>.json; "
                         "--quick: <temp dir>/maxfusion-bench-<device-name-slug>-quick.json)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="print the tables and target lines of a saved run (filtered by "
                         "--cases, --n-inputs, --dtypes) and exit")
    ap.add_argument("--markdown", action="store_true", help="with --from-json: Markdown tables")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.from_json is not None:
        records = json.loads(args.from_json.read_text(encoding="utf-8"))
        records = [r for r in records  # --cases, --n-inputs, --dtypes filter a saved run
                   if (not args.cases or r["case"] in args.cases)
                   and (not args.n_inputs or r["n_inputs"] in args.n_inputs)
                   and (not args.dtypes or r["dtype"] in args.dtypes)]
        print_from_records(records, args.markdown)
        print("\n" + LEGEND)
        if any(r["scope"] == "backward" for r in records):
            print(BWD_LEGEND)
        print()
        print("\n".join(target_lines(records)))
        return records

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if not on_gpu:
        H.compile_in_process()
    if on_gpu and not torch.cuda.is_available():
        sys.exit("run.py: --device cuda, but torch sees no CUDA device")
    table = load_shapes()
    cases = args.cases or list(table["cases"])
    unknown = [c for c in cases if c not in table["cases"]]
    if unknown:
        sys.exit(f"run.py: unknown case(s) {unknown}; known: {list(table['cases'])}")
    if args.quick:
        ns = args.n_inputs or ([2] if on_gpu else [2, 3])
        dtypes = args.dtypes or (["float16"] if on_gpu else ["float32"])
        reps = args.reps or (30 if on_gpu else 3)
        warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    else:
        ns = args.n_inputs or table["n_inputs"]
        dtypes = args.dtypes or table["dtypes"]
        reps = args.reps or (100 if on_gpu else 5)
        warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    bad = [d for d in dtypes if d not in ("float16", "bfloat16", "float32")]
    if bad or any(not 2 <= n <= maxfusion_kernels.MAX_INPUTS for n in ns):
        sys.exit(f"run.py: dtypes must be float16, bfloat16 or float32 (got {dtypes}) and N "
                 f"from 2 to {maxfusion_kernels.MAX_INPUTS} (got {ns})")
    max_elements = args.max_elements
    if max_elements is None:
        max_elements = QUICK_CPU_MAX_ELEMENTS if (args.quick and not on_gpu) else 0

    timer = H.Timer(device, reps, warmup, flush_l2=not args.no_flush,
                    cuda_graphs=args.cuda_graphs, min_seconds=0.05 if args.quick else 0.1)
    dev_name = H.device_name(device)
    backend = maxfusion_kernels.choose_backend(device, H.backend_for(device))
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    common = dict(
        device=dev_name, device_type=device.type, torch=torch.__version__,
        triton=triton_version, cuda=torch.version.cuda if on_gpu else None,
        quick=args.quick, reps=reps, warmup=warmup,
        cpu_min_seconds=None if on_gpu else timer.min_seconds,
        timer="cuda-events" if on_gpu else "perf_counter", l2=timer.l2_state,
        cuda_graphs_requested=args.cuda_graphs, compile_mode=H.COMPILE_MODE,
        preset=H.PRESET, cpu_threads=None if on_gpu else torch.get_num_threads(),
        loadavg_1min_at_start=load_start,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    print(f"# device {dev_name!r}, max_fuse backend {backend}, torch {torch.__version__}, "
          f"triton {triton_version}, reps {reps}, warmup {warmup}, "
          + (f"CUDA events, L2 {timer.l2_state}, "
             f"{'CUDA graph replays' if args.cuda_graphs else 'eager calls (no CUDA graphs)'}"
             if on_gpu else f"perf_counter, {torch.get_num_threads()} threads, "
             f"1-min load average {load_start}")
          + ("" if not max_elements else f", shapes shrunk to <= {max_elements} elements"))

    t_start = time.perf_counter()
    records: list[dict] = []
    first_combo = True
    for n in ns:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            if not args.no_compile:
                torch._dynamo.reset()  # keep Dynamo's cache to this (N, dtype): short guards
            cache: dict = {}  # (shape, channel_dim) -> (case measured in, results)
            for case_name in cases:
                case = table["cases"][case_name]
                cd = case["channel_dim"]
                full = [tuple(s) for s in case["shapes"]]
                timed = H.shrink(full, cd, max_elements)
                print_header(_title(case_name, len(full), n, dtype_name))
                compiled_all = not args.no_compile
                for index, shape in enumerate(timed):
                    if timed.index(shape) != index:
                        continue  # each distinct shape once, counted as often as it occurs
                    count = timed.count(shape)
                    do_compile = not args.no_compile and (
                        not args.quick or (first_combo and (case_name, index) in QUICK_COMPILE))
                    key = (shape, cd)
                    if key not in cache:
                        res = measure_tensor(shape, cd, n, dtype, device, timer, do_compile,
                                             seed=index)
                        add_ratios(res, H.fusion_bytes([shape], n, dtype)["bytes"])
                        cache[key] = (case_name, res)
                    measured_in, res = cache[key]
                    compiled_all &= "ms" in res.get("compiled_reference", {})
                    print_row("x".join(map(str, shape)), count, res, "max_fuse")
                    for method, r in res.items():
                        records.append(_record(common, case_name, "tensor", index, count,
                                               shape, full[index], cd, n, dtype, method, r,
                                               measured_in, timer))
                if len(full) > 1:
                    res = measure_step(timed, cd, n, dtype, device, timer, compiled_all)
                    add_ratios(res, H.fusion_bytes(timed, n, dtype)["bytes"])
                    print("-" * len(HEADER))
                    print_row(f"step ({len(full)})", len(full), res, "max_fuse_many")
                    for method, r in res.items():
                        records.append(_record(common, case_name, "step", None, len(full),
                                               None, None, cd, n, dtype, method, r, case_name,
                                               timer, step_shapes=timed))
            if not args.no_backward and (not args.quick or n == ns[0]):
                records += _backward_rows(args, table, cases, n, dtype, device, timer,
                                          max_elements, common)
            first_combo = False
    elapsed = time.perf_counter() - t_start
    print("\n" + LEGEND)
    if not args.no_backward:
        print(BWD_LEGEND)
    print(f"benchmarked in {elapsed:.1f} s")
    if on_gpu:
        print("\n".join(target_lines(records)))
    else:
        print("targets: not evaluated (they are for an H100; this is a CPU run of the torch "
              "path)")

    quick_out = Path(tempfile.gettempdir()) / f"maxfusion-bench-{H.slug(dev_name)}-quick.json"
    out = args.out or (quick_out if args.quick else HERE / "results" / f"{H.slug(dev_name)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in records:
        r["loadavg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        r["run_seconds"] = round(elapsed, 1)
    out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} records to {out}")
    return records


def _backward_rows(args, table, cases, n, dtype, device, timer, max_elements, common):
    """The backward table of one (N, dtype): its rows printed, its records returned."""
    dtype_name = str(dtype).removeprefix("torch.")
    chosen = [c for c in cases if not args.quick or c in BACKWARD_QUICK]
    if not chosen:
        return []
    print_backward_header(_backward_title(n, dtype_name))
    records, seen = [], set()
    for case_name in chosen:
        case = table["cases"][case_name]
        cd = case["channel_dim"]
        full = tuple(case["shapes"][0])
        shape = H.shrink([full], cd, max_elements)[0]
        if (shape, cd) in seen:
            continue  # the T2I-Adapter's first map is SD1.5's
        seen.add((shape, cd))
        for unmerge in (False, True):
            res = measure_backward(shape, cd, n, dtype, device, timer, unmerge, seed=0)
            print_backward_row("x".join(map(str, shape)), unmerge, res)
            nbytes = H.backward_bytes([shape], n, dtype, unmerge)
            for method, r in res.items():
                records.append(dict(
                    common, case=case_name, scope="backward", index=0, count=1,
                    shape=list(shape), table_shape=list(full), step_shapes=None,
                    channel_dim=cd, n_inputs=n, dtype=dtype_name, method=method,
                    measured_in=case_name, unmerge=unmerge,
                    backend=(H.backend_for(device) if method.startswith("max_fuse") else None),
                    input_bytes=nbytes["input_bytes"], bytes=r.get("min_bytes"),
                    backward_bytes=nbytes["backward"], ms=r.get("ms"), ms_min=r.get("ms_min"),
                    gbps=r.get("gbps"), copy_gbps=r.get("copy_gbps"),
                    pct_copy=r.get("pct_copy"), x_vs_reference=r.get("x_vs_reference"),
                    x_of_forward=r.get("x_of_forward"),
                    peak_extra_bytes=r.get("peak_extra_bytes"), cuda_graph=r.get("cuda_graph"),
                    **({"error": r["error"]} if "error" in r else {})))
    return records


def _record(common, case, scope, index, count, shape, table_shape, cd, n, dtype, method, r,
            measured_in, timer, step_shapes=None) -> dict:
    shapes = step_shapes if step_shapes is not None else [shape]
    nbytes = H.fusion_bytes(shapes, n, dtype)
    rec = dict(common, case=case, scope=scope, index=index, count=count,
               shape=list(shape) if shape is not None else None,
               table_shape=list(table_shape) if table_shape is not None else None,
               step_shapes=[list(s) for s in step_shapes] if step_shapes is not None else None,
               channel_dim=cd, n_inputs=n, dtype=str(dtype).removeprefix("torch."),
               method=method, measured_in=measured_in,
               backend=(H.backend_for(timer.device) if method.startswith("max_fuse") else None),
               input_bytes=nbytes["input_bytes"], bytes=nbytes["bytes"],
               ms=r.get("ms"), ms_min=r.get("ms_min"), gbps=r.get("gbps"),
               copy_gbps=r.get("copy_gbps"),
               pct_copy=r.get("pct_copy"), x_vs_reference=r.get("x_vs_reference"),
               x_vs_compiled_reference=r.get("x_vs_compiled_reference"),
               x_vs_sum=r.get("x_vs_sum"), peak_extra_bytes=r.get("peak_extra_bytes"),
               peak_method=("torch.cuda.max_memory_allocated delta"
                            if r.get("peak_extra_bytes") is not None else None),
               cuda_graph=r.get("cuda_graph"))
    if method == "copy" and "bytes" in r:
        rec["copy_bytes_moved"] = r["bytes"]
    if method.startswith("max_fuse"):
        rec["mem_allowance_bytes"] = H.stats_allowance(shapes, cd, n, dtype)
    for extra in ("compile_s", "averaged_site_fraction", "error"):
        if extra in r:
            rec[extra] = r[extra]
    return rec


if __name__ == "__main__":
    main()
