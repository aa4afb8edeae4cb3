"""A performance MODEL of the MaxFusion kernels on GPUs we do not have: predictions, not
measurements.

Usage::

    python benchmarks/analysis/perf_model.py [--out benchmarks/results/perf-model]

Inputs, all produced without a GPU and committed under ``benchmarks/results/``:

- the bytes each launch moves, per class (inputs, outputs, scratch), at 32-byte-sector
  granularity, and its largest program's input bytes: the traffic meter
  (``traffic_meter.py``, the kernels run in Triton's interpreter): ``traffic-three-pass.json``
  (the kernels now) and ``traffic-before-redesign.json`` (the 2-pass kernels of bb689ee);
- the grid: the work split of ``maxfusion_kernels/ops/plan.py`` for the real shapes (the meter
  measured some shapes with fewer sites; their bytes are scaled by their ratios to the minimum,
  which do not depend on the number of sites) and, for the old kernels, their grid formula;
- registers, warps and so resident programs per SM: ``codegen_report.py``'s output
  (``codegen-triton3.9.json``, ``codegen-before-redesign-triton3.9.json``; sm_90 for the H100,
  sm_89 for the RTX 4090).

The model, per launch (every constant is an assumption, listed in ``GPUS``):

- resident programs ``R`` per SM (occupancy), concurrent programs ``min(P, SMs x R)``;
- bytes in flight per program: one loop iteration's loads (twice that where the kernel issues
  the next iteration's loads before using the current ones, as the three passes do now);
- achievable DRAM bandwidth ``min(efficiency x peak, concurrent x in flight / latency)``
  (Little's law);
- DRAM bytes: first touches (inputs read by the first pass, outputs and scratch written once)
  plus the re-reads that miss L2. Pass 3 re-reads the inputs pass 1 read, walking the programs
  in reverse: the k-th byte re-read was last touched about ``(2 + w) k`` bytes of traffic earlier
  (w: pass 3's writes per byte read), so it hits while that is below the effective L2. The old
  pass 2 re-read in pass 1's order: every re-read is one whole pass behind, so all hit or none;
- time = launch gap + max(DRAM bytes / bandwidth + L2-served bytes / L2 bandwidth, waves x one
  program's latency-bound time (round trips of its in-flight bytes)), and a compute floor.

It ignores: DRAM page and channel effects, L2 partitioning beyond the effective-size factor,
tail effects inside a wave, instruction issue limits other than the compute floor, and the
host (see host_overhead.py). When a GPU is lent, ``benchmarks/run.py --device cuda`` measures
the same cases: put those figures beside these.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/analysis
BENCH = HERE.parent  # benchmarks: the shape table, results/
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(HERE))

from maxfusion_kernels.ops import plan as P  # noqa: E402


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int  # codegen rows of this arch give registers and resident programs
    sms: int
    dram_bw: float  # bytes/s, peak
    l2_bytes: float
    # assumptions (not measured here):
    efficiency: float = 0.9  # share of peak DRAM bandwidth a streaming kernel reaches
    latency_s: float = 700e-9  # DRAM load latency under load
    l2_bw: float = 5.5e12  # bytes/s served by L2
    l2_effective: float = 0.75  # share of L2 that holds reusable data
    launch_s: float = 2.5e-6  # gap per dependent kernel launch on the GPU (eager stream)
    lane_ops: float = 0.0  # fp32 lane operations per second (SMs x 128 x clock)


GPUS = [
    GPU("H100 SXM (sm_90)", 90, 132, 3.35e12, 50e6, latency_s=700e-9, l2_bw=5.5e12,
        lane_ops=132 * 128 * 1.98e9),
    GPU("RTX 4090 (sm_89)", 89, 128, 1.008e12, 72e6, latency_s=600e-9, l2_bw=5.0e12,
        lane_ops=128 * 128 * 2.52e9),
]

# fp32 lane operations per input element each kernel spends (counted from the kernel code:
# convert, scale, select, shift, accumulate, and NP Gram products in pass 1)
OPS_PER_ELEMENT = {"stats": lambda np_: 6 + np_, "write": lambda np_: 6 + np_, "combine": 0,
                   "_stats": lambda np_: 6 + np_, "_finish": lambda np_: 6 + np_}


def _role(kernel: str) -> str:
    for key in ("combine", "write", "_finish", "_stats", "stats"):
        if key in kernel:
            return key
    return kernel


@dataclass
class Launch:
    kernel: str
    programs: int
    program_bytes: float  # largest program's bytes (its inputs read)
    inflight: float  # bytes in flight per program
    ctas_per_sm: int
    registers: int
    dram_bytes: float
    l2_bytes: float
    elements: float  # input elements processed (compute floor)
    n_pad: int


def predict(launch: Launch, gpu: GPU) -> dict:
    slots = gpu.sms * max(1, launch.ctas_per_sm)
    conc = min(launch.programs, slots)
    bw_latency = conc * launch.inflight / gpu.latency_s
    bw = min(gpu.efficiency * gpu.dram_bw, bw_latency)
    t_mem = launch.dram_bytes / bw + launch.l2_bytes / gpu.l2_bw
    waves = math.ceil(launch.programs / slots)
    trips = max(1.0, launch.program_bytes / max(launch.inflight, 1.0))
    t_prog = trips * gpu.latency_s
    ops = OPS_PER_ELEMENT.get(_role(launch.kernel), 0)
    ops = ops(launch.n_pad) if callable(ops) else ops
    t_compute = launch.elements * ops / gpu.lane_ops if gpu.lane_ops else 0.0
    t = gpu.launch_s + max(t_mem, waves * t_prog, t_compute)
    return {"kernel": launch.kernel, "programs": launch.programs,
            "resident_per_sm": launch.ctas_per_sm, "registers": launch.registers,
            "waves": launch.programs / slots,
            "inflight_per_sm": min(launch.programs / gpu.sms, launch.ctas_per_sm)
            * launch.inflight,
            "bw_latency_bound": bw_latency, "dram_bytes": launch.dram_bytes,
            "l2_bytes": launch.l2_bytes, "t_mem_us": t_mem * 1e6,
            "t_program_us": waves * t_prog * 1e6, "t_compute_us": t_compute * 1e6,
            "time_us": t * 1e6}


# ----------------------------------------------------------------------------------------
# from the meter's records and the codegen rows to launches
# ----------------------------------------------------------------------------------------


def _numel(shape) -> int:
    out = 1
    for v in shape:
        out *= int(v)
    return out


def _table_shapes(rec: dict, cases: dict) -> list[tuple[int, ...]]:
    if rec["op"] == "max_fuse":
        return [tuple(s) for s in rec["table_shape"]]
    name = rec["case"].split(" ")[0]
    return [tuple(s) for s in cases[name]["shapes"]]


def _minimum(shapes, n, unmerge, elem) -> float:
    x = sum(_numel(s) for s in shapes) * elem
    return n * x + (n if unmerge else 1) * x


def _old_grid(shapes, cd, n, elem, which: str) -> tuple[int, int, int]:
    """(programs, BLOCK_C, BLOCK_S) of a pass of the 2-pass kernels (bb689ee's pass_tiles;
    ``max_fuse_many`` took one tile shape from its largest group)."""
    n_pad = P.next_pow2(n)
    long_side = 128 if n_pad <= 2 else 64 if n_pad <= 4 else 32
    budget = 4096 // n_pad if which == "stats" else 2048

    def tiles(c, s, chan):
        if chan:
            bc = min(P.next_pow2(c), long_side)
            return bc, max(1, min(P.next_pow2(s), budget // (n_pad * bc)))
        bs = min(P.next_pow2(s), long_side)
        return max(1, min(P.next_pow2(c), budget // (n_pad * bs))), bs

    dims = []
    for s in shapes:
        cdn = cd % len(s)
        dims.append((s[0], s[cdn], _numel(s) // (s[0] * s[cdn]), cdn == len(s) - 1))
    big = max(dims, key=lambda d: d[0] * d[1] * d[2])
    bc, bs = tiles(big[1], big[2], big[3])
    return sum(b * P.cdiv(sites, bs) for b, _, sites, _ in dims), bc, bs


def launches_for(rec: dict, codegen: dict, cases: dict, gpu: GPU, before: bool,
                 codegen_case: str) -> list[Launch]:
    shapes = _table_shapes(rec, cases)
    n, unmerge, cd = rec["n"], rec["unmerge"], rec["channel_dim"]
    elem = 2  # the meter's records are float16
    n_pad = P.next_pow2(n)
    minimum = _minimum(shapes, n, unmerge, elem)
    input_bytes = n * sum(_numel(s) for s in shapes) * elem
    rows = [r for r in codegen["rows"] if r["case"] == codegen_case and r["arch"] == gpu.arch]
    by_kernel = {r["kernel"]: r for r in rows}
    rec_launches = rec["report"]["launches"]
    if not before:
        plan = P.contiguous_plan(shapes, cd, n, elem)
    out = []
    first_read = 0.0  # bytes pass 1 touched (inputs and scratch)
    for k, lr in enumerate(rec_launches):
        role = _role(lr["kernel"])
        cls = lr["classes"]
        # every class's sector bytes, scaled from the measured shape to the real one
        scale = minimum / lr["minimum"]
        in_ld = cls["inputs"]["sector_loaded"] * scale
        out_st = cls["outputs"]["sector_stored"] * scale
        scr = (cls["scratch"]["sector_loaded"] + cls["scratch"]["sector_stored"]) * scale
        scr_st = cls["scratch"]["sector_stored"] * scale
        row = by_kernel.get(lr["kernel"])
        consts = row["constexprs"] if row else {}
        bc = int(consts.get("BLOCK_C", 1))
        bs = int(consts.get("BLOCK_S", consts.get("BLOCK_S2", 1)))
        if before:
            programs, bc, bs = _old_grid(shapes, cd, n, elem, "stats" if k == 0 else "finish")
            inflight = n * bc * bs * elem  # one tile per loop iteration, no prefetch
            prog_bytes = lr["per_program"]["max_input_loaded"]
        elif role == "combine":
            programs = plan.programs2
            chunk = P.stat_width(n) * plan.tiles.block_s2 * 4  # one chunk's statistics
            inflight = 2 * chunk  # the next chunk's loads are issued early
            prog_bytes = chunk * max(g.nch for g in plan.groups)
        else:
            programs = plan.programs13
            inflight = 2 * n * plan.tiles.block_c * plan.tiles.block_s * elem  # prefetched
            prog_bytes = max(plan.program_input_bytes(g) for g in plan.groups)
        if k == 0:  # first touch of the inputs; scratch written once
            dram, l2 = in_ld + out_st + scr_st, scr - scr_st
            first_read = in_ld + scr_st
        else:
            reread = in_ld
            if reread > 0:
                if before:  # re-read in pass 1's order: one whole pass 1 behind
                    hit = 1.0 if first_read + out_st < gpu.l2_effective * gpu.l2_bytes else 0.0
                else:  # walked in reverse: the k-th byte is (2 + w) k bytes behind
                    w = out_st / reread
                    hit = min(1.0, gpu.l2_effective * gpu.l2_bytes / ((2 + w) * reread))
            else:
                hit = 1.0
            dram = reread * (1 - hit) + out_st + scr_st
            l2 = reread * hit + (scr - scr_st)
        elements = input_bytes / elem if role not in ("combine",) else 0.0
        if row is None:
            ctas, regs = 8, 0
        else:
            ctas, regs = int(row["ctas_per_sm"]), int(row["registers"])
        out.append(Launch(kernel=lr["kernel"], programs=programs, program_bytes=prog_bytes,
                          inflight=inflight, ctas_per_sm=ctas, registers=regs,
                          dram_bytes=dram, l2_bytes=l2, elements=elements, n_pad=n_pad))
    return out


# The cases the model predicts: (name, meter op, meter table shape or case, N, unmerge,
# codegen case for the kernels now, codegen case for the kernels before)
CASES = [
    ("max_fuse 2x320x64x64 N=2 merge", "max_fuse", [2, 320, 64, 64], 2, False,
     "nchw-n2-f16", "nchw-n2-f16"),
    ("max_fuse 2x320x64x64 N=2 unmerge", "max_fuse", [2, 320, 64, 64], 2, True,
     "nchw-n2-f16-unmerge", "nchw-n2-f16-unmerge"),
    ("max_fuse 2x1280x8x8 N=2 merge", "max_fuse", [2, 1280, 8, 8], 2, False,
     "nchw-n2-f16", "nchw-n2-f16"),
    ("max_fuse 2x320x64x64 N=3 merge", "max_fuse", [2, 320, 64, 64], 3, False,
     "nchw-n3-f16-unmerge", "nchw-n3-f16-unmerge"),
    ("max_fuse Flux 1x4096x3072 N=2 merge", "max_fuse", [1, 4096, 3072], 2, False,
     "tokens-n2-f16", "tokens-n2-f16"),
    ("max_fuse SD3 2x4096x1536 N=2 merge", "max_fuse", [2, 4096, 1536], 2, False,
     "tokens-n2-f16", "tokens-n2-f16"),
    ("max_fuse_many SD1.5 step N=2 merge", "max_fuse_many", "sd15_controlnet_512 (whole step)",
     2, False, "sd15-step-n2-f16", "sd15-step-n2-f16"),
    ("max_fuse_many SDXL step N=2 merge", "max_fuse_many", "sdxl_controlnet_1024", 2, False,
     "sdxl-step-n2-f16", "sdxl-step-n2-f16"),
]


def _find(records, op, shape, n, unmerge):
    for r in records:
        if r["op"] != op or r["n"] != n or r["unmerge"] != unmerge or r["dtype"] != "float16":
            continue
        if op == "max_fuse" and [list(x) for x in r["table_shape"]] == [list(shape)]:
            return r
        if op == "max_fuse_many" and r["case"] == shape:
            return r
    return None


def model(results_dir: Path) -> dict:
    from shapes import load_shapes

    cases = load_shapes()["cases"]
    sources = {
        "now": ("traffic-three-pass.json", "codegen-triton3.9.json"),
        "before": ("traffic-before-redesign.json", "codegen-before-redesign-triton3.9.json"),
    }
    data = {k: (json.loads((results_dir / t).read_text())["records"],
                json.loads((results_dir / c).read_text())) for k, (t, c) in sources.items()}
    out = []
    for name, op, shape, n, unmerge, cg_now, cg_before in CASES:
        for version, (records, codegen) in data.items():
            rec = _find(records, op, shape, n, unmerge)
            if rec is None:
                continue
            for gpu in GPUS:
                launches = launches_for(rec, codegen, cases, gpu, version == "before",
                                        cg_before if version == "before" else cg_now)
                preds = [predict(la, gpu) for la in launches]
                minimum = _minimum(_table_shapes(rec, cases), n, unmerge, 2)
                total = sum(p["time_us"] for p in preds)
                out.append({"case": name, "version": version, "gpu": gpu.name,
                            "measured_shape": rec["shape"], "launches": preds,
                            "time_us": total, "min_bytes": minimum,
                            "dram_bytes": sum(p["dram_bytes"] for p in preds),
                            "copy_time_us": minimum / (gpu.efficiency * gpu.dram_bw) * 1e6})
    return {"gpus": [g.__dict__ for g in GPUS], "predictions": out}


def markdown(res: dict) -> str:
    lines = [
        "# Performance MODEL of the MaxFusion kernels (predictions, not measurements)",
        "",
        "Written by `python benchmarks/analysis/perf_model.py` from the traffic meter's bytes "
        "(`traffic-three-pass.json`, `traffic-before-redesign.json`), the work split "
        "(`maxfusion_kernels/ops/plan.py`) and the codegen report's registers and resident "
        "programs (sm_90, sm_89). No GPU was used. The model and every assumption: the "
        "module docstring of `benchmarks/analysis/perf_model.py`. float16 inputs.",
        "",
        "GPU assumptions: " + "; ".join(
            f"{g['name']}: {g['sms']} SMs, {g['dram_bw'] / 1e12:.2f} TB/s peak x "
            f"{g['efficiency']}, L2 {g['l2_bytes'] / 1e6:.0f} MB x {g['l2_effective']}, "
            f"latency {g['latency_s'] * 1e9:.0f} ns, L2 {g['l2_bw'] / 1e12:.1f} TB/s, "
            f"{g['launch_s'] * 1e6:.1f} us per launch" for g in res["gpus"]),
        "",
        "| case | kernels | GPU | per launch: programs, resident/SM, waves, KiB in flight/SM, "
        "predicted us | DRAM MB (min MB) | predicted us | copy of the minimum us | "
        "% of copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in res["predictions"]:
        per = "<br>".join(
            f"`{la['kernel']}` {la['programs']} prog, {la['resident_per_sm']}/SM, "
            f"{la['waves']:.2f} waves, {la['inflight_per_sm'] / 1024:.0f} KiB, "
            f"{la['time_us']:.1f} us" for la in p["launches"])
        lines.append(
            f"| {p['case']} | {p['version']} | {p['gpu']} | {per} | "
            f"{p['dram_bytes'] / 1e6:.1f} ({p['min_bytes'] / 1e6:.1f}) | {p['time_us']:.1f} | "
            f"{p['copy_time_us']:.1f} | {100 * p['copy_time_us'] / p['time_us']:.0f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(BENCH / "results"))
    ap.add_argument("--out", default=str(BENCH / "results" / "perf-model"))
    args = ap.parse_args(argv)
    res = model(Path(args.results))
    md = markdown(res)
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
