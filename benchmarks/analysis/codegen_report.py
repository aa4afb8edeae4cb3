"""What the kernels compile to on NVIDIA GPUs, without a GPU: registers, spills, shared memory,
occupancy and global load/store widths of every kernel the package's launchers launch.

One file (over 400 lines) because it is one command-line report: the cases, their analysis per
architecture and the Markdown it writes.

Usage::

    python benchmarks/analysis/codegen_report.py [--cases all|ci|NAME,...]
        [--archs 80,86,89,90,100,120]
                                        [--jobs 2] [--out STEM] [--note TEXT] [--quiet]

Each case of :data:`CASES` (the one list to edit when the kernels change) calls the public
``max_fuse`` or ``max_fuse_many`` with CPU tensors under ``offline_cuda(arch)``
(``offline_cuda.py``): the real launcher picks tiles and grids, Triton's real binder specialises
the arguments (16-byte alignment, divisibility by 16, ``== 1``), the real compiler builds the
PTX and cubin, and each launch is recorded instead of run. For every launch and arch it reports
``ptxas -v`` (registers, spill bytes, stack, shared memory), resident CTAs per SM and the
resource that limits them, and the width of every ``ld.global`` / ``st.global`` of the PTX,
split into accesses of the input dtype (the feature tensors: nothing else has it, except for
float32 inputs, whose statistics are float32 too) and the others. Kernel names are not known
here: whatever is launched is reported.

Writes ``STEM.md`` and ``STEM.json`` (default ``benchmarks/results/codegen-triton<version>``)
and prints the Markdown. Needs no GPU; must run without ``TRITON_INTERPRET`` in the
environment (``main`` removes it from the environment before anything is imported). One
worker process per arch (``--jobs``); a cold Triton cache costs about a second of compilation
per kernel and arch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/analysis
BENCH = HERE.parent  # benchmarks: the shape table, results/
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(HERE))

SD15 = "sd15_controlnet_512"
SDXL = "sdxl_controlnet_1024"


# ---------------------------------------------------------------------------------------------
# The cases: the one place to edit
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call of a public function.

    ``layout``: ``contiguous``; ``channels_last`` (NCHW shape, NHWC memory); ``strided`` (a view
    ``x[..., ::2]`` of a tensor twice as wide: two site runs); ``misaligned`` (every input starts
    one element past a 16-byte boundary). ``shape``: one tensor's shape (``max_fuse``) or a case
    of ``shapes.json`` (``max_fuse_many``: one group per shape). ``ci``: in the reduced list the
    test suite runs (``tests/test_cuda_codegen.py``); ``vector_loads``: aligned float16 inputs
    whose loads the test requires to be vectorised (8 bytes or more per instruction);
    ``vector16`` (``_backward`` cases): aligned 16-bit inputs with a unit-stride sites or
    channels axis, for which the test requires every load and store of the input dtype by the
    backward's launches (inputs, output gradients, input gradients) to be a 16-byte vector.
    """

    name: str
    api: str  # "max_fuse" or "max_fuse_many" (with "_backward": then the backward)
    n: int
    dtype: str
    shape: tuple[int, ...] | str
    layout: str = "contiguous"
    kwargs: dict = field(default_factory=dict)
    ci: bool = False
    vector_loads: bool = False
    vector16: bool = False
    note: str = ""


NCHW = (2, 320, 64, 64)  # SD1.5's first residual at 512 px, B = 2 (classifier-free guidance)
TOKENS = (1, 4096, 3072)  # Flux's tokens at 1024 px

CASES: list[Case] = [
    Case("nchw-n2-f16", "max_fuse", 2, "float16", NCHW, ci=True, vector_loads=True,
         note="the common case: two ControlNets, SD1.5 residual, paper preset"),
    Case("nchw-n2-f16-unmerge", "max_fuse", 2, "float16", NCHW, kwargs={"unmerge": True},
         ci=True, vector_loads=True, note="block-level fusion"),
    Case("nchw-n2-bf16", "max_fuse", 2, "bfloat16", NCHW),
    Case("nchw-n2-f32", "max_fuse", 2, "float32", NCHW, ci=True),
    Case("nchw-n2-f64", "max_fuse", 2, "float64", NCHW, note="float64 statistics path"),
    Case("nchw-n2-f16-reference", "max_fuse", 2, "float16", NCHW,
         kwargs={"preset": "reference"}, note="pearson, variance, batch normaliser"),
    Case("nchw-n2-f16-batchnorm", "max_fuse", 2, "float16", NCHW, kwargs={"normalize": "batch"},
         note="paper preset with the batch normaliser"),
    Case("nchw-n2-f16-info", "max_fuse", 2, "float16", NCHW, kwargs={"return_info": True},
         note="winner and members written too"),
    Case("nchw-n3-f16-unmerge", "max_fuse", 3, "float16", NCHW, kwargs={"unmerge": True}),
    Case("nchw-n4-bf16-reference", "max_fuse", 4, "bfloat16", NCHW,
         kwargs={"preset": "reference"}, ci=True),
    Case("nchw-n8-f16", "max_fuse", 8, "float16", NCHW, ci=True, note="the largest N"),
    Case("nchw-n8-f32-unmerge", "max_fuse", 8, "float32", NCHW, kwargs={"unmerge": True}),
    Case("tokens-n2-f16", "max_fuse", 2, "float16", TOKENS, kwargs={"channel_dim": -1},
         ci=True, vector_loads=True, note="DiT tokens [B, L, C], channels contiguous"),
    Case("tokens-n3-bf16-unmerge", "max_fuse", 3, "bfloat16", TOKENS,
         kwargs={"channel_dim": -1, "unmerge": True}),
    Case("tokens-n5-f16-unmerge-reference", "max_fuse", 5, "float16", TOKENS,
         kwargs={"channel_dim": -1, "unmerge": True, "preset": "reference"}, ci=True,
         note="N not a power of two and the heaviest per-site options (found spilling)"),
    Case("channels-last-n2-f16", "max_fuse", 2, "float16", NCHW, layout="channels_last",
         note="NCHW shape in NHWC memory: channels contiguous"),
    Case("strided-n2-f16", "max_fuse", 2, "float16", NCHW, layout="strided",
         note="x[..., ::2]: two site runs"),
    Case("misaligned-n2-f16", "max_fuse", 2, "float16", NCHW, layout="misaligned",
         note="inputs 2 bytes past a 16-byte boundary: no alignment specialisation"),
    Case("sd15-step-n2-f16", "max_fuse_many", 2, "float16", SD15, ci=True, vector_loads=True,
         note="one SD1.5 step: 13 residuals"),
    Case("sd15-step-n3-bf16-unmerge", "max_fuse_many", 3, "bfloat16", SD15,
         kwargs={"unmerge": True, "preset": "reference"}),
    Case("nchw-n2-f16-backward", "max_fuse_backward", 2, "float16", NCHW, ci=True,
         vector16=True, note="forward and backward kernels (merge)"),
    Case("nchw-n3-f16-unmerge-backward", "max_fuse_backward", 3, "float16", NCHW,
         kwargs={"unmerge": True}, ci=True, vector16=True,
         note="forward and backward kernels (unmerge)"),
    Case("tokens-n2-f16-backward", "max_fuse_backward", 2, "float16", TOKENS,
         kwargs={"channel_dim": -1}, ci=True, vector16=True,
         note="backward, channels contiguous (merge)"),
    Case("tokens-n2-bf16-unmerge-backward", "max_fuse_backward", 2, "bfloat16", TOKENS,
         kwargs={"unmerge": True, "channel_dim": -1}, ci=True, vector16=True,
         note="backward, channels contiguous (unmerge)"),
    Case("channels-last-n2-bf16-unmerge-backward", "max_fuse_backward", 2, "bfloat16", NCHW,
         layout="channels_last", kwargs={"unmerge": True}, vector16=True,
         note="backward, NCHW shape in NHWC memory"),
    Case("misaligned-n2-f16-unmerge-backward", "max_fuse_backward", 2, "float16", NCHW,
         layout="misaligned", kwargs={"unmerge": True},
         note="backward without the alignment specialisation (scalar loads)"),
    Case("sd15-step-n2-f16-unmerge-backward", "max_fuse_many_backward", 2, "float16", SD15,
         kwargs={"unmerge": True}, vector16=True),
    Case("sdxl-step-n2-f16", "max_fuse_many", 2, "float16", SDXL, note="one SDXL step: 10"),
]

POINTEE = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}
ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def select_cases(spec: str) -> list[Case]:
    if spec == "all":
        return list(CASES)
    if spec == "ci":
        return [c for c in CASES if c.ci]
    names = spec.split(",")
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in names]


# ---------------------------------------------------------------------------------------------
# Inputs and calls
# ---------------------------------------------------------------------------------------------


def _tensor(shape, dtype, layout):
    import torch

    dt = getattr(torch, dtype)
    shape = tuple(shape)
    if layout == "contiguous":
        return torch.empty(shape, dtype=dt)
    if layout == "channels_last":
        return torch.empty(shape, dtype=dt).contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.empty((*shape[:-1], 2 * shape[-1]), dtype=dt)[..., ::2]
    if layout == "misaligned":
        numel = 1
        for s in shape:
            numel *= s
        return torch.empty(numel + 1, dtype=dt)[1:].view(shape)
    raise ValueError(f"unknown layout {layout!r}")


def case_shapes(case: Case) -> list[tuple[int, ...]]:
    if isinstance(case.shape, str):
        from shapes import load_shapes

        return [tuple(s) for s in load_shapes()["cases"][case.shape]["shapes"]]
    return [tuple(case.shape)]


def run_case(case: Case):
    """Call the public function of ``case`` once, with fresh CPU tensors."""
    import maxfusion_kernels as mk

    groups = [[_tensor(s, case.dtype, case.layout) for _ in range(case.n)]
              for s in case_shapes(case)]
    if case.api.endswith("_backward"):  # the forward, then the backward kernels
        import torch

        groups = [[t.requires_grad_() for t in g] for g in groups]
        if case.api == "max_fuse_backward":
            res = mk.max_fuse(groups[0], backend="triton", **case.kwargs)
        else:
            res = mk.max_fuse_many(groups, backend="triton", **case.kwargs)
        flat = [t for r in (res if isinstance(res, list) else [res])
                for t in (r if isinstance(r, list) else [r])]
        torch.autograd.backward(flat, [torch.ones_like(t) for t in flat])
        return res
    if case.api == "max_fuse":
        return mk.max_fuse(groups[0], backend="triton", **case.kwargs)
    if case.api == "max_fuse_many":
        return mk.max_fuse_many(groups, backend="triton", **case.kwargs)
    raise ValueError(f"unknown api {case.api!r}")


# ---------------------------------------------------------------------------------------------
# One arch (a worker process)
# ---------------------------------------------------------------------------------------------


def _leaves(signature: dict, prefix: str = ""):
    for name, ty in signature.items():
        yield from _leaf(f"{prefix}{name}", ty)


def _leaf(name, ty):
    if isinstance(ty, tuple):
        for k, t in enumerate(ty):
            yield from _leaf(f"{name}[{k}]", t)
    else:
        yield name, ty


def _spec_summary(launch) -> dict:
    ptrs = [n for n, t in _leaves(launch.signature) if isinstance(t, str) and t.startswith("*")]
    ints = [n for n, t in _leaves(launch.signature) if t in ("i32", "i64", "u32", "u64")]
    spec = launch.specialization
    return {
        "pointers": len(ptrs),
        "pointers_16": sum(spec.get(n) == "16" for n in ptrs),
        "unaligned_pointers": [n for n in ptrs if spec.get(n) != "16"],
        "ints": len(ints) + sum(v == "==1" for v in spec.values()),
        "ints_16": sum(spec.get(n) == "16" for n in ints),
        "ints_eq1": sorted(n for n, v in spec.items() if v == "==1"),
    }


def _widths(accesses, op, pred) -> dict[int, int]:
    c = Counter(a.bytes for a in accesses if a.op == op and pred(a))
    return {int(k): int(v) for k, v in sorted(c.items(), reverse=True)}


def analyse_arch(arch: int, case_names: list[str]) -> dict:
    """Run ``case_names`` under ``offline_cuda(arch)``; one row per launch."""
    import offline_cuda as oc

    oc.require_compiled_kernels()
    by_name = {c.name: c for c in CASES}
    rows, errors = [], []
    with oc.offline_cuda(arch) as rec:
        for name in case_names:
            case = by_name[name]
            rec.clear()
            try:
                run_case(case)
                if not rec.launches:
                    raise RuntimeError("nothing was launched")
                for idx, launch in enumerate(rec.launches):
                    rows.append(_row(oc, case, arch, idx, launch))
            except Exception as exc:  # a compile error is a result, reported per case
                errors.append({"case": name, "arch": arch,
                               "error": f"{type(exc).__name__}: {exc}"[:4000]})
    return {"arch": arch, "ptxas": oc.ptxas_version(arch), "ptxas_path": oc.ptxas_path(arch),
            "rows": rows, "errors": errors}


def _row(oc, case: Case, arch: int, idx: int, launch) -> dict:
    usage = oc.ptxas_usage(launch.compiled)
    occ = oc.occupancy(arch, usage.registers, launch.num_warps, usage.shared)
    acc = oc.global_accesses(launch.ptx, launch.compiled.asm.get("ttgir"))
    inp = POINTEE[case.dtype]
    meta = launch.compiled.metadata
    return {
        "case": case.name, "arch": arch, "launch": idx, "kernel": launch.kernel,
        "variant": launch.variant[:16], "grid": list(launch.grid), "device": launch.device,
        "num_warps": launch.num_warps, "num_stages": int(meta.num_stages),
        "constexprs": {k: v for k, v in launch.constexprs.items()
                       if isinstance(v, (int, float, bool, str)) or v is None},
        "specialization": _spec_summary(launch),
        "registers": usage.registers, "spill_stores": usage.spill_stores,
        "spill_loads": usage.spill_loads, "stack_frame": usage.stack_frame,
        "static_shared": usage.static_shared, "dynamic_shared": usage.dynamic_shared,
        "ctas_per_sm": occ.ctas_per_sm, "limiter": occ.limiter,
        "warps_per_sm": occ.warps_per_sm, "occupancy": round(occ.occupancy, 4),
        "input_pointee": inp, "input_elem_bytes": ELEM_BYTES[case.dtype],
        "ld_input": _widths(acc, "ld", lambda a: a.pointee == inp),
        "st_input": _widths(acc, "st", lambda a: a.pointee == inp),
        "ld_other": _widths(acc, "ld", lambda a: a.pointee != inp),
        "st_other": _widths(acc, "st", lambda a: a.pointee != inp),
        "unmatched_accesses": sum(a.pointee is None for a in acc),
        "narrow_offsets": oc.narrow_offsets(launch.compiled.asm["ttir"]),
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _w(hist: dict) -> str:
    """``16Bx4 2Bx8``: bytes per instruction x instructions (static count in the PTX)."""
    return " ".join(f"{b}Bx{n}" for b, n in sorted(((int(k), v) for k, v in hist.items()),
                                                    reverse=True)) or "-"


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _tiles(cx: dict) -> str:
    return " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in cx.items()
                    if k.startswith("BLOCK"))


def _flags(cx: dict, spec: dict) -> str:
    skip = set(spec["ints_eq1"])
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cx.items()
                    if not k.startswith("BLOCK") and k not in skip)


def _spec_text(spec: dict) -> str:
    text = (f"ptr/16: {spec['pointers_16']}/{spec['pointers']}, "
            f"int/16: {spec['ints_16']}/{spec['ints']}")
    if spec["ints_eq1"]:
        text += f", ==1: {len(spec['ints_eq1'])}"
    return text


def summarise(data: dict) -> list[str]:
    rows, cases = data["rows"], {c["name"]: c for c in data["cases"]}
    lines = []
    n_variants = {a: len({r["variant"] for r in rows if r["arch"] == a}) for a in data["archs"]}
    lines.append(f"- {len(data['cases'])} cases, {len({(r['case'], r['launch']) for r in rows})}"
                 f" launches; distinct compiled kernels per arch: "
                 + ", ".join(f"sm_{a}: {n}" for a, n in n_variants.items()) + ".")
    if data["errors"]:
        lines.append(f"- **{len(data['errors'])} case(s) failed to compile**: "
                     + "; ".join(f"{e['case']} sm_{e['arch']}" for e in data["errors"]) + ".")
    else:
        lines.append("- Every case compiled for every arch.")
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    if spills:
        lines.append("- **Register spills**: " + "; ".join(
            f"{r['case']} #{r['launch']} `{r['kernel']}` sm_{r['arch']}: "
            f"{r['spill_stores']} B stores / {r['spill_loads']} B loads" for r in spills) + ".")
    else:
        lines.append("- No register spills.")
    readers = {(r["case"], r["launch"]) for r in rows if r["ld_input"]}
    scalar = {(r["case"], r["launch"]) for r in rows
              if any(int(b) == r["input_elem_bytes"] for b in r["ld_input"])}
    narrow = {(r["case"], r["launch"]) for r in rows if any(int(b) < 8 for b in r["ld_input"])}
    required = {k for k in narrow if cases[k[0]]["vector_loads"]}
    if scalar or narrow:
        lines.append(f"- **Input loads of one element per instruction** (not vectorised) in "
                     f"{len(scalar)} of the {len(readers)} launches that read the inputs, on at "
                     f"least one arch; loads narrower than 8 bytes in {len(narrow)} "
                     f"({len(required)} in cases where the test requires 8 bytes or more). "
                     "Widths per launch: the kernels table.")
    else:
        lines.append("- Every input load moves two elements or more, and 8 bytes or more.")
    for a in data["archs"]:
        ra = [r for r in rows if r["arch"] == a]
        if not ra:
            continue
        lim = Counter(r["limiter"] for r in ra)
        lines.append(f"- sm_{a}: {min(r['registers'] for r in ra)}-"
                     f"{max(r['registers'] for r in ra)} registers/thread, "
                     f"{min(r['ctas_per_sm'] for r in ra)}-{max(r['ctas_per_sm'] for r in ra)} "
                     f"resident CTAs/SM (limited by "
                     + ", ".join(f"{k}: {v}" for k, v in lim.most_common()) + ").")
    return lines


def render_markdown(data: dict) -> str:
    archs = data["archs"]
    rows = data["rows"]
    ref_arch = 90 if 90 in archs else archs[0]
    out = [f"# Codegen report: MaxFusion kernels, Triton {data['triton']}", ""]
    if data.get("note"):
        out += [data["note"], ""]
    out += [
        f"Generated {data['date']} by `{data['command']}` at commit `{data['commit']}`"
        f"{' (with uncommitted changes)' if data['dirty'] else ''}; torch {data['torch']}. "
        "No GPU: each case calls the public function on CPU tensors under a fake Triton "
        "CUDA driver (`benchmarks/analysis/offline_cuda.py`), so the package's launcher, "
        "Triton's binder "
        "(16-byte alignment, divisibility by 16, `== 1`) and compiler run as for a GPU launch; "
        "the launch is recorded instead of run.",
        "",
        "ptxas (Triton's own, with its flags): " + ", ".join(
            f"sm_{a}: {data['ptxas'][str(a)]}" for a in archs) + ". Occupancy: resident CTAs "
        "(programs) per SM from registers, warps, shared memory (+1 KiB reserved per CTA) and "
        "the CTA limit, largest shared-memory carveout (`offline_cuda.occupancy`; limits in "
        "`ARCHS`). Widths: bytes per `ld.global`/`st.global` instruction x number of such "
        "instructions in the PTX (static count), for the accesses to the input dtype (the "
        "feature tensors; float32 statistics count as input dtype for float32 inputs) and the "
        "others.",
        "",
        "## Summary",
        "",
        *summarise(data),
        "",
        "## Cases",
        "",
        "| case | call | N | dtype | shapes | layout | options | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in data["cases"]:
        shapes = c["shape"] if isinstance(c["shape"], str) else "x".join(map(str, c["shape"]))
        opts = ", ".join(f"{k}={v}" for k, v in c["kwargs"].items()) or "-"
        out.append(f"| {c['name']} | `{c['api']}` | {c['n']} | {c['dtype']} | {shapes} | "
                   f"{c['layout']} | {opts} | {c['note']} |")
    out += [
        "",
        f"## Kernels (sm_{ref_arch}; grid and widths are the same on every arch unless noted)",
        "",
        "| case | # | kernel | grid | warps | tiles | flags | specialisation | shared B "
        "| input ld | input st | other ld | other st |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["arch"] != ref_arch:
            continue
        same = [x for x in rows if x["case"] == r["case"] and x["launch"] == r["launch"]]
        differ = sorted({f"sm_{x['arch']}" for x in same
                         if (x["ld_input"], x["st_input"], x["ld_other"], x["st_other"])
                         != (r["ld_input"], r["st_input"], r["ld_other"], r["st_other"])})
        note = f" (differs on {', '.join(differ)})" if differ else ""
        grid = "x".join(map(str, r["grid"]))
        out.append(
            f"| {r['case']} | {r['launch']} | `{r['kernel']}` | {grid} | {r['num_warps']} | "
            f"{_tiles(r['constexprs'])} | {_flags(r['constexprs'], r['specialization'])} | "
            f"{_spec_text(r['specialization'])} | "
            f"{r['static_shared'] + r['dynamic_shared']} | {_w(r['ld_input'])}{note} | "
            f"{_w(r['st_input'])} | {_w(r['ld_other'])} | {_w(r['st_other'])} |")
    out += [
        "",
        "## Registers, spills and occupancy per arch",
        "",
        "Cell: registers per thread / spill bytes (stores+loads) per thread / resident CTAs "
        "per SM (limiter: r = registers, w = warps, s = shared memory, c = CTA slots).",
        "",
        "| case | # | kernel | " + " | ".join(f"sm_{a}" for a in archs) + " |",
        "|---|---|---|" + "---|" * len(archs),
    ]
    short = {"registers": "r", "warps": "w", "shared memory": "s", "CTA slots": "c"}
    keys = []
    for r in rows:
        k = (r["case"], r["launch"])
        if k not in keys:
            keys.append(k)
    for case, launch in keys:
        cells, kernel = [], ""
        for a in archs:
            r = next((x for x in rows if x["case"] == case and x["launch"] == launch
                      and x["arch"] == a), None)
            if r is None:
                cells.append("error")
                continue
            kernel = r["kernel"]
            lim = "+".join(short.get(p, p) for p in r["limiter"].split("+"))
            sp = r["spill_stores"] + r["spill_loads"]
            cells.append(f"{r['registers']} / {'**' + str(sp) + '**' if sp else 0} / "
                         f"{r['ctas_per_sm']} {lim}")
        out.append(f"| {case} | {launch} | `{kernel}` | " + " | ".join(cells) + " |")
    if data["errors"]:
        out += ["", "## Errors", ""]
        for e in data["errors"]:
            out.append(f"- {e['case']} sm_{e['arch']}: `{e['error'][:500]}`")
    return "\n".join(out) + "\n"


def _command(argv: list[str]) -> str:
    """The command line, with the text of ``--note`` left out."""
    out, skip = [], False
    for a in argv:
        if skip:
            out.append("TEXT")
            skip = False
        elif a == "--note":
            out.append(a)
            skip = True
        else:
            out.append("--note TEXT" if a.startswith("--note=") else a)
    return " ".join(["python benchmarks/analysis/codegen_report.py", *out])


def main(argv=None) -> int:
    # before triton and the kernels are imported (here and in the spawned workers, which
    # inherit this environment): @triton.jit must make compilable kernels
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from offline_cuda import ARCHS, DEFAULT_ARCHS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="all", help="all, ci, or comma-separated case names")
    ap.add_argument("--archs", default=",".join(map(str, DEFAULT_ARCHS)))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=None, help="output path without extension")
    ap.add_argument("--note", default="", help="a paragraph put at the top of the report")
    ap.add_argument("--quiet", action="store_true", help="do not print the report")
    args = ap.parse_args(argv)

    cases = select_cases(args.cases)
    archs = [int(a) for a in args.archs.split(",")]
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise SystemExit(f"unknown arch(es) {bad}; known: {sorted(ARCHS)}")
    names = [c.name for c in cases]
    t0 = time.perf_counter()
    if args.jobs > 1 and len(archs) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.jobs,
                                 mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(analyse_arch, archs, [names] * len(archs)))
    else:
        results = [analyse_arch(a, names) for a in archs]
    import torch

    data = {
        "triton": triton.__version__, "torch": torch.__version__,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": _command(argv if argv is not None else sys.argv[1:]),
        "note": args.note, "archs": archs,
        "ptxas": {str(r["arch"]): r["ptxas"] for r in results},
        "cases": [asdict(c) for c in cases],
        "rows": [row for r in results for row in r["rows"]],
        "errors": [e for r in results for e in r["errors"]],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    order = {n: i for i, n in enumerate(names)}
    data["rows"].sort(key=lambda r: (order[r["case"]], r["launch"], archs.index(r["arch"])))
    stem = Path(args.out) if args.out else BENCH / "results" / f"codegen-triton{triton.__version__}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = render_markdown(data)
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    Path(f"{stem}.md").write_text(md, encoding="utf-8")
    if not args.quiet:
        print(md)
    print(f"wrote {stem}.md and .json in {data['seconds']} s", file=sys.stderr)
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
