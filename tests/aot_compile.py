"""Compile the Triton kernels for a Hopper GPU (sm_90) without a GPU, as a subprocess.

Run by ``tests/test_cuda_codegen.py`` with ``TRITON_INTERPRET`` unset: the interpreter executes
Python, so it accepts code the real compiler would reject; this compiles each kernel variant to
PTX and cubin through Triton's own frontend and backend, which need no device. Prints one line
per variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from maxfusion_kernels.ops import fuse, fuse_many  # noqa: E402
from maxfusion_kernels.ops._fusion_math import next_pow2, pass_tiles  # noqa: E402

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for p in kernel.params:
        name = p.name
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0] in "xo" and name[1:].isdigit():
            sig[name] = _PTR[dtype]
        elif name in ("xs", "os"):  # max_fuse_many: one tuple of pointers for all groups
            per_group = constexprs["N"] if name == "xs" else constexprs["N_OUT"]
            sig[name] = (_PTR[dtype],) * (constexprs["G"] * per_group)
        elif name == "meta":
            sig[name] = "*i64"
        elif name in ("t_ptr", "part_ptr"):
            sig[name] = "*fp32"
        elif name == "mask_ptr":
            sig[name] = "*i32"
        elif name == "winner_ptr":
            sig[name] = "*i64"
        elif name == "members_ptr":
            sig[name] = "*i1"
        elif (name[0] == "w" and name[1:].isdigit()) or name == "threshold":
            sig[name] = "fp32"
        elif name.startswith("stride_"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_usage(ptx: str) -> tuple[str, str]:
    """Registers and spill bytes per thread, from Triton's bundled ``ptxas -v``."""
    import pathlib
    import re
    import subprocess
    import tempfile

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # the PTX version Triton emits may be newer than the plain ptxas it bundles knows
    ptxas = next((p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), None)
    if ptxas is None:
        return "?", "?"
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o",
                              str(pathlib.Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (regs.group(1) if regs else "?"), (spill.group(1) if spill else "?")


def variants():
    # (N, dtype, pearson/variance, unmerge, two site runs, channel-contiguous tiles)
    yield from [
        (2, "float16", False, False, False, False),
        (2, "bfloat16", True, True, False, True),
        (2, "float32", True, False, True, False),
        (3, "float16", False, True, False, False),
        (4, "bfloat16", True, False, False, True),
        (5, "float16", False, True, True, False),
        (8, "float16", True, True, False, True),
        (8, "float32", False, False, False, False),
        (2, "float64", True, True, False, False),
    ]


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    n_ok = 0
    for n, dtype, stat_flags, unmerge, two_runs, chan_contig in variants():
        n_pad = next_pow2(n)
        (bc1, bs1), (bc2, bs2) = pass_tiles(n_pad, 1280, 4096, chan_contig)
        common = dict(N=n, NP=n_pad, UNMERGE=unmerge, TWO_RUNS=two_runs, F64=dtype == "float64")
        jobs = [
            (fuse._stats_kernel, dict(common, PEARSON=stat_flags, USE_VARIANCE=stat_flags,
                                      BLOCK_C=bc1, BLOCK_S=bs1)),
            (fuse._finish_kernel, dict(common, USE_VARIANCE=stat_flags,
                                       BATCH_NORMALIZER=stat_flags, INFO=True,
                                       BLOCK_C=bc2, BLOCK_S=bs2, BLOCK_P=64)),
        ]
        for kernel, consts in jobs:
            src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, consts),
                            constexprs=consts)
            compiled = triton.compile(src, target=target)
            ptx = compiled.asm["ptx"]
            assert ".target sm_90" in ptx, "PTX not built for sm_90"
            regs, spills = _ptxas_usage(ptx)
            print(f"ok {kernel.__name__} N={n} {dtype} flags={stat_flags} unmerge={unmerge} "
                  f"two_runs={two_runs} chan_contig={chan_contig} tiles={consts['BLOCK_C']}x"
                  f"{consts['BLOCK_S']} regs={regs} spills={spills}")
            n_ok += 1
    for g, n, dtype, unmerge in [(13, 2, "float16", False), (10, 3, "bfloat16", True)]:
        n_pad = next_pow2(n)
        (bc1, bs1), (bc2, bs2) = pass_tiles(n_pad, 320, 4096, False)
        common = dict(G=g, GP=next_pow2(g), N=n, NP=n_pad, N_OUT=n if unmerge else 1,
                      K=fuse_many._COLS, UNMERGE=unmerge, TWO_RUNS=False, F64=False)
        jobs = [
            (fuse_many._stats_many_kernel, dict(common, PEARSON=unmerge, USE_VARIANCE=unmerge,
                                                BLOCK_C=bc1, BLOCK_S=bs1)),
            (fuse_many._finish_many_kernel, dict(common, USE_VARIANCE=unmerge,
                                                 BATCH_NORMALIZER=unmerge, INFO=True,
                                                 BLOCK_C=bc2, BLOCK_S=bs2, BLOCK_P=64)),
        ]
        for kernel, consts in jobs:
            src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, consts),
                            constexprs=consts)
            compiled = triton.compile(src, target=target)
            regs, spills = _ptxas_usage(compiled.asm["ptx"])
            print(f"ok {kernel.__name__} G={g} N={n} {dtype} unmerge={unmerge} "
                  f"regs={regs} spills={spills}")
            n_ok += 1
    print(f"compiled {n_ok} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
