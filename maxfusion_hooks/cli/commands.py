"""The ``maxfusion`` command (also ``python -m maxfusion_hooks``): its parser and its commands.

* ``maxfusion demo``: run MaxFusion on two ControlNets (offline models by default, or yours with
  ``--base``, ``--controlnet``, ``--image``) and write a figure of which condition won where.
* ``maxfusion info``: versions, devices, and the backend ``max_fuse`` uses here and why.
* ``maxfusion bench``: the benchmark table (``benchmarks/run.py`` of a source checkout).

Bad arguments give one line on stderr and exit code 2. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

PROG = "maxfusion"
BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import (
        OFFLINE_NOTE,
        DemoConfig,
        DemoError,
        check_options,
        format_table,
        header,
        run_demo,
    )

    cfg = DemoConfig(
        out=args.out, size=args.size, steps=args.steps, seed=args.seed, level=args.level,
        threshold=args.threshold, preset=args.preset, backend=args.backend, device=args.device,
        base=args.base, controlnets=args.controlnet, images=args.image, prompt=args.prompt,
        progress=not args.no_progress, masks=args.masks,
    )
    if args.out is None:
        cfg.out = "maxfusion-demo-masks.png" if args.masks else "maxfusion-demo.png"
    try:
        check_options(cfg)
        what = "building the offline models" if cfg.offline else f"loading {cfg.base}"
        print(f"{PROG} demo: {what} ...", flush=True)
        res = run_demo(cfg)
    except DemoError as exc:
        return _fail("demo", str(exc))
    print(textwrap.fill(header(res), width=100, subsequent_indent="  "))
    if cfg.offline:
        print(textwrap.fill(OFFLINE_NOTE, width=100))
    print()
    batch = res.records[0].winner.shape[0] if res.records else 0
    print(textwrap.fill(
        f"share of sites won by each condition, per fusion point (all {res.steps} steps, "
        f"{batch} batch entries" + (" = both halves of classifier-free guidance" if batch == 2
                                    else "") + "):", width=100))
    print(format_table(res))
    if res.own_half is not None:
        print("own half: share of the sites won by the condition drawn in their half of the "
              "image (depth: left, edges: right)")
    if res.own_region is not None:
        print(textwrap.fill(
            "own region: share of the sites won by the condition whose mask is largest there "
            "(" + ", ".join(f"{n}: {w}" for n, w in zip(res.names, _region_words(len(res.names))))
            + "); no masks: the same share in the run without masks", width=100))
    print()
    print(f"built in {res.seconds_build:.1f} s, denoised in {res.seconds_run:.1f} s")
    print(f"figure written to {res.figure}")
    return 0


def _region_words(n: int) -> list[str]:
    if n == 2:
        return ["outside the ellipse", "inside the ellipse"]
    return [f"strip {k + 1} of {n} from the left" for k in range(n)]


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="show which condition wins where (offline by default)",
        description="Run MaxFusion on two ControlNets with recording on and write one PNG "
                    "figure: the conditions, the generated image and, per fusion point, the "
                    "winner map (one colour per condition); print the share of sites each "
                    "condition won. Without --base it runs offline: small SD 1.5-style models "
                    "built from config with random weights (condition-driven ControlNet "
                    "embeddings) and two synthetic conditions that conflict by halves.",
    )
    p.add_argument("--out", default=None, metavar="PATH",
                   help="the PNG figure to write (default: maxfusion-demo.png, with --masks "
                        "maxfusion-demo-masks.png)")
    p.add_argument("--size", type=int, default=None,
                   help="image size in px, a multiple of 8 (default: 128 offline, at most "
                        "256 there; the base model's own size with --base)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: 10 offline, 30 with --base)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial noise (and offline, of the models' random weights)")
    p.add_argument("--level", default="block", choices=["block", "residual"],
                   help="fuse inside the ControlNets in lockstep (block, default) or only "
                        "their residuals (residual)")
    p.add_argument("--threshold", type=float, default=0.7,
                   help="correlation above which features are averaged (default: %(default)s)")
    p.add_argument("--preset", default="paper", choices=["paper", "reference"],
                   help="MaxFusion's formulas: as printed in the paper (default) or as in the "
                        "authors' code")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="max_fuse backend (default: auto, see 'maxfusion info')")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="your Stable Diffusion 1.x/2.x or SDXL pipeline (local folder or hub "
                        "id); needs --controlnet and --image")
    p.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                   help="a ControlNet (local folder or hub id); repeat for each (2 to 8)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="the condition image of each --controlnet, in the same order")
    p.add_argument("--prompt", default=None, help="the text prompt")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on the denoising loop")
    p.add_argument("--masks", action="store_true",
                   help="regional masks: conditions that overlap everywhere (offline: both over "
                        "the whole image), each restricted by a mask to its region (2: an "
                        "ellipse and its complement; more: vertical strips); runs with and "
                        "without the masks and shows both")
    p.set_defaults(func=_cmd_demo)


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def backend_report() -> list[tuple[str, str | None, str]]:
    """``(tensors, backend, why)`` for CPU tensors and for CUDA tensors, as ``max_fuse``
    decides here (``maxfusion_kernels.choose_backend`` with ``backend="auto"``); ``backend``
    is ``None`` for CUDA tensors where there is no CUDA device, and for CPU tensors where
    Triton's interpreter is asked for but cannot run the kernels (``why`` says why)."""
    import torch

    from maxfusion_kernels import choose_backend
    from maxfusion_kernels.ops.launch import HAS_TRITON

    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    rows = []
    try:
        cpu = choose_backend(torch.device("cpu"))
    except RuntimeError as exc:  # Triton's interpreter is asked for but cannot run the kernels
        cpu, why = None, f"no backend: {exc}"
    else:
        if cpu == "triton":
            why = ("TRITON_INTERPRET=1 is set: the Triton kernels run in Triton's interpreter on "
                   "CPU tensors (exact but slow; for tests)")
        elif interp and not HAS_TRITON:
            why = ("TRITON_INTERPRET=1 is set but triton is not installed: the vectorised "
                   "torch path")
        else:
            why = ("the vectorised PyTorch path: the Triton kernels need a CUDA device; "
                   "TRITON_INTERPRET=1 would run them in Triton's interpreter")
    rows.append(("cpu", cpu, why))
    if torch.cuda.is_available():
        if HAS_TRITON:
            rows.append(("cuda", choose_backend(torch.device("cuda")),
                         "the fused Triton kernels, compiled for the GPU"))
        else:
            rows.append(("cuda", "torch", "triton is not installed: the vectorised torch path"))
    else:
        rows.append(("cuda", None, "no CUDA device here (on one: triton, the fused Triton "
                                   "kernels)"))
    return rows


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import maxfusion_kernels

    print(f"maxfusion {maxfusion_kernels.__version__} "
          f"({Path(maxfusion_kernels.__file__).resolve().parent.parent})")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    for dist in ("triton", "diffusers", "transformers", "greenlet", "Pillow"):
        print(f"{dist.lower()} {_version(dist)}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '') or '(unset)'}")
    print("devices:")
    print(f"  cpu: {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}: {prop.name}, sm_{prop.major}{prop.minor}, "
                  f"{prop.total_memory / 2**30:.0f} GiB")
    else:
        print("  cuda: not available")
    print("max_fuse backend (backend='auto'):")
    for tensors, backend, why in backend_report():
        print(f"  {tensors} tensors: " + (f"{backend} ({why})" if backend else why))
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and the backend max_fuse uses here",
                       description="Print the versions of torch, triton and diffusers, the "
                                   "devices, and which backend max_fuse uses for CPU and CUDA "
                                   "tensors here, and why.")
    p.set_defaults(func=_cmd_info)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    script = Path(args.script) if args.script else BENCH_SCRIPT
    if not script.is_file():
        return _fail("bench", f"{script} not found: the benchmarks live in the source "
                              "repository (benchmarks/run.py), which a wheel install does not "
                              "include; clone it and 'pip install -e .' there")
    cmd = [sys.executable, str(script)]
    if args.quick:
        cmd.append("--quick")
    if args.device:
        cmd += ["--device", args.device]
    if args.out:
        cmd += ["--out", args.out]
    cmd += list(args.extra)
    print(f"{PROG} bench: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, check=False).returncode


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="the benchmark table (benchmarks/run.py of a source checkout)",
        description="Run benchmarks/run.py of the source tree: MaxFusion against its baselines "
                    "on every case of benchmarks/shapes.json. Arguments after -- go to run.py "
                    "unchanged (e.g. -- --cases sd15_controlnet_512).",
    )
    p.add_argument("--quick", action="store_true", help="the reduced set (about a minute on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=None, metavar="PATH", help="the JSON records to write")
    p.add_argument("--script", default=None, help=argparse.SUPPRESS)  # tests: another run.py
    p.add_argument("extra", nargs="*", help="more arguments for run.py (after --)")
    p.set_defaults(func=_cmd_bench)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="MaxFusion: training-free fusion of several "
                     "ControlNets / T2I-Adapters. Also runs as 'python -m maxfusion_hooks'. "
                     "Docs: docs/cli.md.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,info,bench}", required=True)
    _add_demo(sub)
    _add_info(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``maxfusion`` command; returns the exit code (0 ok, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2), already printed
        return exc.code if isinstance(exc.code, int) else 0
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
