"""The steps of the first GPU session (``benchmarks/gpu_session.sh`` runs them, each in its own
process under its own ``timeout``), the packing of their results, and the compile census.

One file (over 400 lines) because the steps, their packing and the compile census share one list of
calls and one result format, read by one driver.

Usage (the driver script calls these; docs/performance.md, "The GPU session")::

    python benchmarks/gpu_session.py step NAME --work DIR     # one step: DIR/NAME.json
    python benchmarks/gpu_session.py pack --work DIR --out OUT  # summary.json, summary.md,
                                                                # logs.tar.gz into OUT
    python benchmarks/gpu_session.py sanitize-target           # what compute-sanitizer runs
    python benchmarks/gpu_session.py census [--arch 90]        # kernel variants the session
                                                                # compiles, and their compile
                                                                # time (fake driver, no GPU)

Steps, in the session's order: ``env``, (``wheels``: the driver itself), ``tests``,
``sanitizer`` (the driver runs ``compute-sanitizer`` around ``sanitize-target``), ``speed``,
``pipeline``, ``backward``, ``speed_n3``. ``GPU_SESSION_DRY=1`` (the driver's ``--dry-run``)
runs every step on CPU with tiny sizes and the Triton interpreter, to prove the steps run to
the end. ``GPU_SESSION_FAIL=NAME`` makes step NAME raise (``NAME:hang``: sleep until its
timeout kills it): the test of the driver's failure survival.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

DRY = os.environ.get("GPU_SESSION_DRY", "0") not in ("", "0")
STEPS = ("env", "wheels", "tests", "sanitizer", "speed", "pipeline", "backward", "speed_n3")

# the speed step's cases: (label, case of shapes.json, shape index or None for the whole step)
SPEED_CASES = (
    ("sd15_step", "sd15_controlnet_512", None),
    ("sd15_320x64x64", "sd15_controlnet_512", 0),
    ("sd15_1280x8x8", "sd15_controlnet_512", 9),
    ("flux_tokens", "flux_tokens_1024", 0),
    ("sdxl_step", "sdxl_controlnet_1024", None),
)
# torch.compile(reference), default mode, only for these (each distinct shape is one
# compilation of several seconds: the steps' 13 and 10 residuals would cost a minute)
COMPILED_CASES = ("sd15_320x64x64", "sd15_1280x8x8", "flux_tokens")
DRY_MAX_ELEMENTS = 256
DRY_SPEED_CASES = ("sd15_step", "flux_tokens")  # a step (max_fuse_many) and one max_fuse


def _fail_injection(name: str) -> None:
    want = os.environ.get("GPU_SESSION_FAIL", "")
    for item in filter(None, want.split(",")):
        step, _, how = item.partition(":")
        if step == name:
            if how == "hang":
                print(f"GPU_SESSION_FAIL: step {name} hangs", flush=True)
                time.sleep(10**6)
            raise RuntimeError(f"GPU_SESSION_FAIL: step {name} fails on purpose")


def _run(cmd: list[str], timeout: float, env=None) -> dict:
    """Run a command; its rc and output (also printed, for the step's log)."""
    print(f"$ {' '.join(cmd)}", flush=True)
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        print(f"  {cmd[0]}: not found", flush=True)
        return {"cmd": cmd, "rc": None, "error": "not found"}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        print(out, flush=True)
        return {"cmd": cmd, "rc": None, "error": f"timed out after {timeout} s", "out": out[-4000:]}
    out = res.stdout + res.stderr
    print(out, flush=True)
    return {"cmd": cmd, "rc": res.returncode, "out": out[-4000:]}


def _device():
    import torch

    return torch.device("cpu" if DRY or not torch.cuda.is_available() else "cuda")


# ----------------------------------------------------------------------------------------
# env
# ----------------------------------------------------------------------------------------


def step_env(work: Path) -> dict:
    import torch

    res: dict = {"python": sys.version.split()[0], "platform": platform.platform(),
                 "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available(), "dry_run": DRY,
                 "cpu_count": os.cpu_count()}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError as exc:
        res["triton"] = f"missing: {exc}"
    from importlib import metadata

    pkgs = {}
    for name in ("diffusers", "transformers", "greenlet", "importlib_metadata", "numpy",
                 "pytest", "hypothesis", "huggingface_hub", "safetensors", "accelerate"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    res["packages"] = pkgs
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        res["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                      "sms": p.multi_processor_count, "memory_bytes": p.total_memory,
                      "l2_bytes": getattr(p, "L2_cache_size", None)}
    q = ("name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
         "temperature.gpu,power.draw,power.limit,persistence_mode,compute_mode")
    res["nvidia_smi"] = _run(["nvidia-smi"], 20)
    res["nvidia_smi_query"] = _run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], 20)
    res["nvidia_smi_clocks"] = _run(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE"], 20)
    res["compute_sanitizer"] = _run(["compute-sanitizer", "--version"], 20)
    res["nvcc"] = _run(["nvcc", "--version"], 20)
    res["uname"] = _run(["uname", "-a"], 5)
    for key in ("nvidia_smi", "nvidia_smi_clocks"):  # long: the log keeps them whole
        if "out" in res[key]:
            res[key]["out"] = res[key]["out"][-1500:]
    return res


# ----------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------


def _junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {"error": "no junit xml"}
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures, slowest = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        slowest.append((float(case.get("time", 0)), name))
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        if kind is None:
            counts["passed"] += 1
        else:
            counts[{"failure": "failed"}.get(kind, kind)] += 1
            if kind in ("failure", "error"):
                el = case.find(kind)
                msg = (el.get("message") or "").splitlines()[:3]
                failures.append({"test": name, "kind": kind, "message": " | ".join(msg)[:400]})
    slowest.sort(reverse=True)
    return {**counts, "failures": failures,
            "slowest": [{"test": n, "s": round(t, 2)} for t, n in slowest[:10]]}


def _count_log(text: str) -> dict:
    """Pass/fail counts from pytest's ``-v`` lines (when it was stopped before its XML)."""
    import re

    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures = []
    for m in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.M):
        kind = m.group(2).lower()
        counts[kind] += 1
        if kind in ("failed", "error"):
            failures.append({"test": m.group(1), "kind": kind, "message": "(see tests.log)"})
    return {**counts, "failures": failures}


def step_tests(work: Path) -> dict:
    """tests/test_gpu.py with ``-x`` off; stopped 10 s before the step's own limit
    (``GPU_SESSION_LIMIT``) so that what ran is still counted."""
    xml = work / "test_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_gpu.py"), "-v", "-rfEs",
           "-p", "no:cacheprovider", f"--junitxml={xml}", "--durations=15"]
    extra = os.environ.get("GPU_SESSION_TEST_ARGS")
    if extra:
        cmd += extra.split()
    limit = float(os.environ.get("GPU_SESSION_LIMIT", "0") or 0)
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:  # output goes straight to the step's log
        rc = subprocess.run(cmd, cwd=ROOT, timeout=limit - 10 if limit > 20 else None).returncode
    except subprocess.TimeoutExpired:
        rc = "stopped"
        print(f"\npytest stopped after {limit - 10:.0f} s", flush=True)
    res = {"pytest_rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    if xml.exists():
        return {**res, **_junit(xml)}
    log = work / "tests.log"
    return {**res, "from_log": True, **_count_log(log.read_text(errors="replace")
                                                  if log.exists() else "")}


# ----------------------------------------------------------------------------------------
# sanitizer
# ----------------------------------------------------------------------------------------


def sanitize_target() -> None:
    """Small ``max_fuse`` (merge, unmerge, masks) and ``max_fuse_many`` calls, each compared
    with the reference; what ``compute-sanitizer`` watches."""
    import torch
    from shapes import make_features

    import maxfusion_kernels as mk
    from maxfusion_kernels import reference

    dev = _device()
    shape = (2, 16, 4, 4) if DRY else (2, 320, 16, 16)
    feats = make_features(shape, 2, torch.float16 if dev.type == "cuda" else torch.float32,
                          dev, seed=0)
    masks = [torch.rand(2, *shape[2:], device=dev), None]
    calls = {
        "merge": lambda: mk.max_fuse(feats, backend="triton"),
        "unmerge": lambda: mk.max_fuse(feats, backend="triton", unmerge=True, return_info=True),
        "masks": lambda: mk.max_fuse(feats, backend="triton", masks=masks),
    }
    for name, fn in calls.items():
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"sanitize-target: max_fuse {name} ran", flush=True)
    ref = reference.max_fuse(feats, dtype=torch.float32).to(feats[0].dtype)
    out = mk.max_fuse(feats, backend="triton")
    print(f"sanitize-target: merge vs reference max |diff| "
          f"{(out.float() - ref.float()).abs().max().item():.3g}", flush=True)
    small = [(2, 8, 4, 4), (2, 16, 2, 2), (1, 32, 4, 4)] if DRY else \
        [(2, 320, 16, 16), (2, 640, 8, 8), (2, 1280, 4, 4)]
    groups = [make_features(s, 2, feats[0].dtype, dev, seed=k) for k, s in enumerate(small)]
    mk.max_fuse_many(groups, backend="triton")
    mk.max_fuse_many(groups, backend="triton", unmerge=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("sanitize-target: max_fuse_many merge and unmerge ran", flush=True)
    print("sanitize-target: done", flush=True)


def parse_sanitizer(text: str) -> dict:
    """The summary line compute-sanitizer prints, and whether it refused the device."""
    import re

    res: dict = {}
    m = re.search(r"(ERROR|RACECHECK|SYNCCHECK) SUMMARY: (\d+) (error|hazard)", text)
    if m:
        res["summary"] = m.group(0)
        res["count"] = int(m.group(2))
    for needle in ("Device not supported", "not supported", "Unable to", "error 999"):
        if needle in text:
            res["refused"] = needle
            break
    res["target_done"] = "sanitize-target: done" in text
    return res


def step_sanitizer(work: Path) -> dict:
    """Summarise the three sanitizer logs the driver wrote (``sanitizer_<tool>.log``)."""
    res = {}
    for tool in ("memcheck", "racecheck", "synccheck"):
        log = work / f"sanitizer_{tool}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        res[tool] = parse_sanitizer(text) if text else {"error": "no log (not run)"}
    return res


# ----------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------


def _profile_passes(fn, device, calls: int = 10) -> dict:
    """Per-kernel device time (us per call) of the three passes, from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {"note": "no CUDA: nothing to profile"}
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    res = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None)
        if total is None:
            total = getattr(evt, "cuda_time_total", 0)
        if total and any(k in evt.key for k in ("stats_kernel", "combine_kernel",
                                                 "write_kernel")):
            res[evt.key] = {"us_per_call": total / calls, "count": evt.count / calls}
    return res


def _speed(ns: tuple[int, ...], work: Path, label: str) -> dict:
    import harness as H
    import torch
    from shapes import load_shapes, make_features

    dev = _device()
    cuda = dev.type == "cuda"
    table = load_shapes()["cases"]
    backend = "triton" if DRY else H.backend_for(dev)
    H.COMPILE_MODE = "default"  # not max-autotune: its autotuning is too slow for the lease
    do_compile = cuda and os.environ.get("GPU_SESSION_NO_COMPILE", "0") in ("", "0")
    reps, warmup = (1, 0) if DRY else (50, 5)
    eager = H.Timer(dev, reps, warmup, flush_l2=True, min_seconds=0.0)
    graphs = H.Timer(dev, reps, warmup, flush_l2=True, cuda_graphs=True, min_seconds=0.0)
    dtype = torch.float16 if cuda else torch.float32
    rows = []
    for n in ns:
        for name, case, index in SPEED_CASES:
            if DRY and name not in (DRY_SPEED_CASES if n == 2 else DRY_SPEED_CASES[1:]):
                continue
            t0 = time.perf_counter()
            cd = table[case]["channel_dim"]
            shapes = [tuple(s) for s in table[case]["shapes"]]
            if index is not None:
                shapes = [shapes[index]]
            if DRY:
                shapes = H.shrink(shapes, cd, DRY_MAX_ELEMENTS)
            groups = [make_features(s, n, dtype, dev, cd, seed=k) for k, s in enumerate(shapes)]
            nbytes = H.fusion_bytes(shapes, n, dtype)
            src, dst = H.copy_buffers(nbytes["bytes"], dtype, dev)

            def loop(fn, groups=groups):
                return lambda: [fn(g) for g in groups]

            if index is None:
                ours = lambda groups=groups, cd=cd: H.max_fuse_many(groups, cd, backend)  # noqa: E731
            else:
                ours = lambda g=groups[0], cd=cd: H.max_fuse(g, cd, backend)  # noqa: E731
            fns = {
                "maxfusion": (ours, True),
                "sum": (loop(H.diffusers_sum), True),
                "reference": (loop(lambda g, cd=cd: H.reference_fuse(g, cd)), False),
                "copy": (lambda src=src, dst=dst: dst.copy_(src), True),
            }
            res: dict = {}
            compile_s = None
            if do_compile and name in COMPILED_CASES:
                try:
                    comp = H.compiled_reference()
                    c0 = time.perf_counter()
                    comp(groups[0], cd)
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - c0
                    fns["compiled_reference"] = (loop(lambda g, cd=cd, comp=comp: comp(g, cd)),
                                                 True)
                except Exception as exc:  # noqa: BLE001 - report, time the rest
                    res["compiled_reference"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            for method, (fn, capturable) in fns.items():
                try:
                    t = eager.time(fn, capturable=False)
                    res[method] = {"ms": t.ms, "ms_min": t.ms_min}
                    if cuda and capturable:
                        g = graphs.time(fn, capturable=True)
                        res[method].update(graph_ms=g.ms, graph_ms_min=g.ms_min,
                                           graph=g.cuda_graph)
                except Exception as exc:  # noqa: BLE001 - report, time the rest
                    res[method] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            if compile_s is not None and "compiled_reference" in res:
                res["compiled_reference"]["compile_s"] = compile_s
            copy_bytes = 2 * src.numel() * src.element_size()
            for r in res.values():
                if "ms" in r:
                    r["gbps"] = nbytes["bytes"] / (r["ms"] * 1e6)
            mf = res.get("maxfusion", {})
            ratios = {}
            for base in ("sum", "reference", "compiled_reference", "copy"):
                b = res.get(base, {})
                if "ms" in mf and "ms" in b:
                    ratios[f"{base}/maxfusion eager"] = b["ms"] / mf["ms"]
                if "graph_ms" in mf and "graph_ms" in b:
                    ratios[f"{base}/maxfusion graph"] = b["graph_ms"] / mf["graph_ms"]
                elif "graph_ms" in mf and "ms" in b and base in ("reference",
                                                                 "compiled_reference"):
                    ratios[f"{base}/maxfusion graph"] = b["ms"] / mf["graph_ms"]
            if "ms" in res.get("copy", {}):
                ratios["copy GB/s"] = copy_bytes / (res["copy"]["ms"] * 1e6)
            prof = {}
            if cuda and n == ns[0] and name in ("sd15_step", "sd15_320x64x64"):
                try:
                    prof = _profile_passes(ours, dev)
                except Exception as exc:  # noqa: BLE001
                    prof = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            row = {"case": name, "table_case": case, "n": n, "dtype": str(dtype),
                   "shapes": [list(s) for s in shapes], "bytes": nbytes["bytes"],
                   "methods": res, "ratios": ratios, "profile": prof,
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("case", "n", "ratios", "seconds")}),
                  flush=True)
            del groups, src, dst
    return {"device": H.device_name(dev), "backend": backend, "reps": reps, "warmup": warmup,
            "l2": eager.l2_state, "compile_mode": H.COMPILE_MODE, "rows": rows}


def step_speed(work: Path) -> dict:
    return _speed((2,), work, "speed")


def step_speed_n3(work: Path) -> dict:
    return _speed((3,), work, "speed_n3")


# ----------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------


def step_pipeline(work: Path) -> dict:
    out = work / "pipeline.json"
    cmd = [sys.executable, str(HERE / "pipeline_step.py"), "--out", str(out)]
    cmd += (["--device", "cpu", "--tiny", "--reps", "1", "--warmup", "0"] if DRY else
            ["--device", "cuda", "--reps", "10", "--warmup", "3"])
    print(f"$ {' '.join(cmd)}", flush=True)
    env = dict(os.environ)
    if DRY:  # CPU tensors then take the torch path, not the (slow) Triton interpreter
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    records = json.loads(out.read_text()) if out.exists() else None
    return {"rc": proc.returncode, "records": records}


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------


def step_backward(work: Path) -> dict:
    """The gradient of ``max_fuse`` on the Triton path (issue 16), merge and unmerge: equal to
    autograd through the float64 reference given the call's own decisions
    (``reference.fuse_with_decisions``; near-tie sites cannot differ), computed by the Triton
    backward kernels (a spy on ``ops.autograd.triton_backward``), and its time against the
    reference's autograd and the forward alone, with GB/s on the minimum bytes
    (``harness.backward_bytes``: inputs and output gradients read once, input gradients
    written once)."""
    import harness as H
    import torch
    from shapes import make_features

    import maxfusion_kernels as mk
    import maxfusion_kernels.ops.autograd as AG
    from maxfusion_kernels import reference

    dev = _device()
    cuda = dev.type == "cuda"
    shape = (2, 16, 4, 4) if DRY else (2, 320, 64, 64)
    dtype = torch.float16 if cuda else torch.float32
    n = 2
    res: dict = {"shape": list(shape), "dtype": str(dtype), "n": n}
    calls = []
    real = AG.triton_backward

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    AG.triton_backward = spy
    reps, warmup = (2, 0) if DRY else (30, 3)
    timer = H.Timer(dev, reps, warmup, flush_l2=True, min_seconds=0.0)
    try:
        for mode in ("merge", "unmerge"):
            res[mode] = _backward_mode(mode == "unmerge", shape, dtype, n, dev, timer, calls,
                                       mk, reference, make_features, H, torch)
    finally:
        AG.triton_backward = real
    bad = [m for m in ("merge", "unmerge") if res[m].get("status")]
    if bad:
        res["status"] = f"{bad[0]}: {res[bad[0]]['status']}"
    res["pass"] = all(res[m].get("pass") for m in ("merge", "unmerge"))
    print(json.dumps(res), flush=True)
    return res


def _backward_mode(unmerge, shape, dtype, n, dev, timer, calls, mk, reference, make_features,
                   H, torch) -> dict:
    """One mode of :func:`step_backward`."""
    feats = [f.requires_grad_() for f in make_features(shape, n, dtype, dev, seed=5)]
    out, info = mk.max_fuse(feats, backend="triton", unmerge=unmerge, return_info=True)
    outs = list(out) if unmerge else [out]
    r: dict = {"grad_fn": repr(outs[0].grad_fn)}
    if outs[0].grad_fn is None:
        r["status"] = "no grad_fn: max_fuse on the Triton path is not differentiable here"
        return r
    gen = torch.Generator(device=dev).manual_seed(7)
    gouts = [torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)
             for _ in outs]
    before = len(calls)
    got = torch.autograd.grad(outs, feats, gouts, retain_graph=True)
    r["triton_backward_kernels"] = len(calls) > before
    f64 = [f.detach().double().requires_grad_() for f in feats]
    ref = reference.fuse_with_decisions(f64, info.winner, info.members, unmerge=unmerge)
    want = torch.autograd.grad(list(ref) if unmerge else [ref], f64,
                               [g.double() for g in gouts])
    r["rel_error"] = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    r["max_abs_error"] = [(g.double() - w).abs().max().item() for g, w in zip(got, want)]
    r["finite"] = all(bool(torch.isfinite(g).all()) for g in got)
    _, info_ref = reference.max_fuse([f.detach().double() for f in feats], unmerge=unmerge,
                                     return_info=True)
    r["winner_agreement_with_float64_decisions"] = (
        (info.winner == info_ref.winner).float().mean().item())
    r["pass"] = r["finite"] and r["triton_backward_kernels"] and max(r["rel_error"]) < 2e-2

    ref32 = [f.detach().float().requires_grad_() for f in feats]
    ref_out = reference.max_fuse(ref32, unmerge=unmerge, dtype=torch.float32)
    ref_outs = list(ref_out) if unmerge else [ref_out]
    g32 = [g.float() for g in gouts]

    def ours_fb():
        o = mk.max_fuse(feats, backend="triton", unmerge=unmerge)
        return torch.autograd.grad(list(o) if unmerge else [o], feats, gouts)

    def ours_b():  # the backward alone, of the graph kept above
        return torch.autograd.grad(outs, feats, gouts, retain_graph=True)

    def ref_fb():
        o = reference.max_fuse(ref32, unmerge=unmerge, dtype=torch.float32)
        return torch.autograd.grad(list(o) if unmerge else [o], ref32, g32)

    def ref_b():
        return torch.autograd.grad(ref_outs, ref32, g32, retain_graph=True)

    def ours_f():
        with torch.no_grad():
            return mk.max_fuse(feats, backend="triton", unmerge=unmerge)

    nbytes = H.backward_bytes([shape], n, dtype, unmerge)
    r["min_bytes"] = nbytes
    for name, fn, kind in (("forward_backward", ours_fb, "forward_backward"),
                           ("backward", ours_b, "backward"),
                           ("reference_forward_backward", ref_fb, None),
                           ("reference_backward", ref_b, None),
                           ("forward_only", ours_f, "forward")):
        try:
            t = timer.time(fn, capturable=False)
            r[f"{name}_ms"] = t.ms
            if kind is not None:
                r[f"{name}_gbps"] = nbytes[kind] / (t.ms * 1e6)
        except Exception as exc:  # noqa: BLE001
            r[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return r


# ----------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------


def _steps_table(work: Path) -> list[dict]:
    path = work / "steps.tsv"
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 4:
            rows.append({"step": parts[0], "rc": parts[1], "seconds": parts[2],
                         "timeout": parts[3]})
    return rows


def _status(row: dict) -> str:
    rc = row["rc"]
    if rc == "skipped":
        return "SKIPPED (time budget)"
    if rc == "0":
        return "ok"
    if rc in ("124", "137"):
        return f"TIMED OUT after {row['timeout']} s"
    return f"FAILED (rc {rc})"


def _md_summary(summary: dict) -> str:
    lines = [f"# GPU session summary ({'dry run' if summary['dry_run'] else 'device run'})", ""]
    env = summary["results"].get("env") or {}
    gpu = env.get("gpu") or {}
    lines.append(f"device: {gpu.get('name', 'no GPU')}, torch {env.get('torch')}, triton "
                 f"{env.get('triton')}, python {env.get('python')}, diffusers "
                 f"{(env.get('packages') or {}).get('diffusers')}")
    lines += ["", "| step | status | seconds | timeout |", "|---|---|---|---|"]
    for row in summary["steps"]:
        lines.append(f"| {row['step']} | {_status(row)} | {row['seconds']} | {row['timeout']} |")
    pc = summary["results"].get("precompile")
    if pc:
        lines += ["", f"precompile: {pc['variants_compiled_summed']} variants over "
                      f"{pc['processes']} processes in {pc['seconds_slowest']} s (slowest), "
                      f"{len(pc['errors'])} errors"]
    t = summary["results"].get("tests")
    if t and "passed" in t:
        lines += ["", f"tests/test_gpu.py: {t['passed']} passed, {t['failed']} failed, "
                      f"{t['error']} errors, {t['skipped']} skipped"]
        for f in t["failures"][:15]:
            lines.append(f"- {f['kind']}: {f['test']}: {f['message'][:200]}")
    s = summary["results"].get("sanitizer")
    if s:
        lines.append("")
        for tool, r in s.items():
            if not isinstance(r, dict):
                continue
            lines.append(f"compute-sanitizer {tool}: "
                         + ", ".join(f"{k}={v}" for k, v in r.items()))
    for key in ("speed", "speed_n3"):
        sp = summary["results"].get(key)
        if sp and sp.get("rows"):
            lines += ["", f"{key} ({sp.get('device')}, L2 {sp.get('l2')}):", "",
                      "| case | N | mf eager ms | mf graph ms | sum/mf (eager, graph) | "
                      "ref/mf | compiled/mf | copy/mf (graph) | copy GB/s |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in sp["rows"]:
                m, x = r["methods"].get("maxfusion", {}), r["ratios"]

                def f(v, fmt="{:.3f}"):
                    return "-" if v is None else fmt.format(v)
                lines.append(
                    f"| {r['case']} | {r['n']} | {f(m.get('ms'), '{:.4f}')} | "
                    f"{f(m.get('graph_ms'), '{:.4f}')} | "
                    f"{f(x.get('sum/maxfusion eager'), '{:.2f}')}, "
                    f"{f(x.get('sum/maxfusion graph'), '{:.2f}')} | "
                    f"{f(x.get('reference/maxfusion eager'), '{:.1f}')} | "
                    f"{f(x.get('compiled_reference/maxfusion eager'), '{:.2f}')} | "
                    f"{f(x.get('copy/maxfusion graph'), '{:.2f}')} | "
                    f"{f(x.get('copy GB/s'), '{:.0f}')} |")
    p = summary["results"].get("pipeline")
    if p and p.get("records"):
        lines += ["", "SD1.5 step, 2 ControlNets:"]
        for r in p["records"]:
            lines.append(f"- {r['method']}: {r['ms']:.3f} ms ({100 * r['overhead_vs_sum']:+.1f} "
                         f"% vs sum)")
    b = summary["results"].get("backward")
    if b:
        lines += ["", "backward: " + (b.get("status") or json.dumps(
            {k: ({kk: vv for kk, vv in v.items() if kk != "grad_fn"} if isinstance(v, dict)
                 else v) for k, v in b.items() if k != "grad_fn"}))]
    return "\n".join(lines) + "\n"


def pack(work: Path, out: Path) -> dict:
    """summary.json and summary.md from the steps so far, and every log in logs.tar.gz: three
    files in ``out`` whatever ran (the device tool returns at most 8)."""
    results = {}
    for name in STEPS:
        path = work / f"{name}.json"
        if path.exists():
            try:
                results[name] = json.loads(path.read_text())
            except ValueError as exc:
                results[name] = {"error": f"unreadable result: {exc}"}
    shards = sorted(work.glob("precompile_*.json"))
    if shards:
        parts = [json.loads(p.read_text()) for p in shards]
        results["precompile"] = {
            "processes": len(parts), "triton": parts[0].get("triton"),
            "variants_compiled_summed": sum(p["distinct_variants"] for p in parts),
            "seconds_slowest": max(p["seconds_total"] for p in parts),
            "calls": sum(v["calls"] for p in parts for v in p["per_step"].values()),
            "errors": [e for p in parts for v in p["per_step"].values() for e in v["errors"]]}
    summary = {"dry_run": DRY, "steps": _steps_table(work), "results": results,
               "packed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(out / "summary.json")
    try:
        text = _md_summary(summary)
    except Exception as exc:  # noqa: BLE001 - the JSON and the logs still come back
        text = f"# GPU session summary\n\n(summary.md failed: {type(exc).__name__}: {exc}; " \
               f"read summary.json)\n"
    (out / "summary.md").write_text(text)
    tmp = out / "logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.is_file():
                tar.add(path, arcname=f"gpu-session/{path.name}")
    tmp.replace(out / "logs.tar.gz")
    return summary


# ----------------------------------------------------------------------------------------
# census: kernel variants and their compile time (no GPU)
# ----------------------------------------------------------------------------------------


def session_calls() -> list[tuple[str, str, dict]]:
    """The ``max_fuse`` / ``max_fuse_many`` calls of a device run, by step: ``(step, label,
    call)``, call = {api, shapes, n, dtype, channel_dim, kwargs}. Mirrors tests/test_gpu.py
    (its parametrisation and calls) and the steps above; the hooks' calls of the pipeline step
    are approximated by one residual-level step (13 groups) and the block level's per-block
    unmerge of each distinct SD1.5 shape."""
    from shapes import load_shapes

    table = load_shapes()["cases"]
    calls = []

    def add(step, label, api, shapes, n, dtype, cd=1, **kw):
        calls.append((step, label, dict(api=api, shapes=[tuple(s) for s in shapes], n=n,
                                        dtype=dtype, channel_dim=cd, kwargs=kw)))

    for name, case in table.items():
        for shape in dict.fromkeys(map(tuple, case["shapes"])):
            for n in (2, 3):
                for dtype in ("float16", "bfloat16"):
                    for preset in ("paper", "reference"):
                        for unmerge in (False, True):
                            add("tests", f"real_shapes {name} {shape}", "max_fuse", [shape], n,
                                dtype, case["channel_dim"], preset=preset, unmerge=unmerge,
                                return_info=True)
    add("tests", "graph_capture", "max_fuse", [(2, 320, 64, 64)], 2, "float16")
    add("tests", "determinism", "max_fuse", [(4, 640, 32, 32)], 3, "bfloat16", unmerge=True)
    add("tests", "determinism", "max_fuse", [(4, 640, 32, 32)], 3, "bfloat16")
    add("tests", "determinism", "max_fuse", [(1, 640, 32, 32)], 3, "bfloat16")
    big = (1, 2**29 + 8, 4)
    add("tests", "2^31", "max_fuse", [big], 2, "float16", -1)
    add("tests", "2^31", "max_fuse", [big], 2, "float16", -1, unmerge=True)
    for case in ("sd15_controlnet_512", "sdxl_controlnet_1024", "sd15_t2i_adapter_512"):
        for unmerge in (False, True):
            add("tests", f"many {case}", "max_fuse_many", table[case]["shapes"], 2, "float16",
                unmerge=unmerge, return_info=True)
    add("tests", "many three kernels", "max_fuse_many", table["sd15_controlnet_512"]["shapes"],
        2, "float16")
    first = [(2, 320, 24, 40), (2, 640, 12, 20), (2, 1280, 6, 10)]
    add("tests", "first call in capture", "max_fuse_many", [(1,) + s[1:] for s in first], 2,
        "float16")
    add("tests", "first call in capture", "max_fuse_many", first, 2, "float16")
    for k in range(300):
        add("tests", "table cache", "max_fuse_many", [(1, 8, 2 + k)], 2, "float32")
    for shape in [(2, 320, 16, 16)]:
        add("sanitizer", "merge", "max_fuse", [shape], 2, "float16")
        add("sanitizer", "unmerge", "max_fuse", [shape], 2, "float16", unmerge=True,
            return_info=True)
        add("sanitizer", "masks", "max_fuse", [shape], 2, "float16", masks=True)
    small = [(2, 320, 16, 16), (2, 640, 8, 8), (2, 1280, 4, 4)]
    add("sanitizer", "many", "max_fuse_many", small, 2, "float16")
    add("sanitizer", "many", "max_fuse_many", small, 2, "float16", unmerge=True)
    for n in (2, 3):
        step = "speed" if n == 2 else "speed_n3"
        for name, case, index in SPEED_CASES:
            shapes = table[case]["shapes"] if index is None else [table[case]["shapes"][index]]
            add(step, name, "max_fuse_many" if index is None else "max_fuse", shapes, n,
                "float16", table[case]["channel_dim"], preset="reference")
    sd15 = table["sd15_controlnet_512"]["shapes"]
    add("pipeline", "residual level", "max_fuse_many", sd15, 2, "float16")
    for shape in dict.fromkeys(map(tuple, sd15)):
        add("pipeline", "block level (approx.)", "max_fuse", [shape], 2, "float16",
            unmerge=True)
    add("backward", "forward", "max_fuse", [(2, 320, 64, 64)], 2, "float16")
    add("backward", "forward info", "max_fuse", [(2, 320, 64, 64)], 2, "float16",
        return_info=True)
    return calls


def _variant_family(call: dict) -> str:
    """What decides a call's kernel variants, but for the shapes (which only pick the tiles):
    calls of one family go to one shard, so that the shards rarely compile the same variant."""
    return json.dumps([call["api"], call["n"], call["dtype"], call["channel_dim"],
                       len(call["shapes"]), sorted(call["kwargs"].items())], default=str)


def shard_calls(calls: list, index: int, count: int) -> list:
    """Shard ``index`` of ``count`` of ``calls``: whole families (:func:`_variant_family`),
    dealt out heaviest first to the lightest shard so far. A family's weight is its number of
    distinct shape lists, capped at 16 (past a few, new shapes rarely make new tiles: the 300
    small shapes of tests/test_gpu.py's table-cache test compile a handful of variants)."""
    families: dict = {}
    for item in calls:
        families.setdefault(_variant_family(item[2]), []).append(item)
    weight = {k: min(16, len({json.dumps(c["shapes"]) for _, _, c in v}))
              for k, v in families.items()}
    load = [0] * count
    mine = set()
    for key in sorted(families, key=lambda k: (-weight[k], k)):
        j = min(range(count), key=lambda i: (load[i], i))
        load[j] += weight[key]
        if j == index:
            mine.add(key)
    return [item for item in calls if _variant_family(item[2]) in mine]


def census(arch: int, out: Path | None, steps: set[str] | None,
           shard: tuple[int, int] = (0, 1)) -> dict:
    """Call every entry of :func:`session_calls` under the fake CUDA driver (real Triton
    compilation for ``sm_<arch>``, nothing runs) on CPU tensors of the real shapes (never
    written, so never resident); per step the distinct compiled variants and the wall time of
    the calls (compilation is nearly all of it). ``shard=(i, k)``: the i-th of k shards of
    the calls (:func:`shard_calls`): k processes side by side fill Triton's on-disk cache
    about k times faster (the session's ``precompile`` step; the later steps then load the
    kernels from that cache)."""
    sys.path.insert(0, str(HERE / "analysis"))
    import offline_cuda as oc
    import torch

    import maxfusion_kernels as mk

    oc.require_compiled_kernels()
    per_step: dict = {}
    seen: set = set()
    t_all = time.perf_counter()
    calls = [c for c in session_calls() if not steps or c[0] in steps]
    with oc.offline_cuda(arch) as rec:
        for step, label, c in shard_calls(calls, *shard):
            dtype = getattr(torch, c["dtype"])
            groups = [[torch.empty(s, dtype=dtype) for _ in range(c["n"])] for s in c["shapes"]]
            kw = dict(c["kwargs"])
            if kw.pop("masks", False):
                s = c["shapes"][0]
                kw["masks"] = [torch.rand(s[0], *s[2:]), None]
            before = len(rec.launches)
            t0 = time.perf_counter()
            try:
                if c["api"] == "max_fuse":
                    mk.max_fuse(groups[0], backend="triton", channel_dim=c["channel_dim"], **kw)
                else:
                    mk.max_fuse_many(groups, backend="triton", channel_dim=c["channel_dim"],
                                     **kw)
                err = None
            except Exception as exc:  # noqa: BLE001 - counted, reported
                err = f"{type(exc).__name__}: {exc}"[:200]
            dt = time.perf_counter() - t0
            new = [launch for launch in rec.launches[before:] if launch.variant not in seen]
            for launch in new:
                seen.add(launch.variant)
            st = per_step.setdefault(step, {"calls": 0, "new_variants": 0, "seconds": 0.0,
                                            "errors": []})
            st["calls"] += 1
            st["new_variants"] += len(new)
            st["seconds"] += dt
            if err:
                st["errors"].append(f"{label}: {err}")
            del groups
            rec.launches.clear()  # keep memory flat; variants are tracked in `seen`
    import triton

    res = {"arch": arch, "shard": list(shard), "triton": triton.__version__,
           "torch": torch.__version__,
           "python": sys.version.split()[0], "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "distinct_variants": len(seen),
           "seconds_total": round(time.perf_counter() - t_all, 1),
           "per_step": {k: {**v, "seconds": round(v["seconds"], 1)} for k, v in per_step.items()}}
    print(json.dumps(res, indent=1))
    if out:
        out.write_text(json.dumps(res, indent=1) + "\n")
    return res


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("name", choices=[n for n in STEPS if n != "wheels"])
    s.add_argument("--work", type=Path, required=True)
    p = sub.add_parser("pack")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--print", action="store_true", help="print summary.md")
    sub.add_parser("sanitize-target")
    c = sub.add_parser("census")
    c.add_argument("--arch", type=int, default=90)
    c.add_argument("--steps", default=None, help="comma-separated steps (default: all)")
    c.add_argument("--out", type=Path, default=None)
    c.add_argument("--shard", default="0/1", help="I/K: every K-th call from the I-th")
    args = ap.parse_args(argv)
    if args.cmd == "sanitize-target":
        _fail_injection("sanitize-target")
        sanitize_target()
        return 0
    if args.cmd == "census":
        i, k = (int(v) for v in args.shard.split("/"))
        census(args.arch, args.out, set(args.steps.split(",")) if args.steps else None, (i, k))
        return 0
    if args.cmd == "pack":
        summary = pack(args.work, args.out)
        if args.print:
            print(_md_summary(summary))
        return 0
    _fail_injection(args.name)
    t0 = time.perf_counter()
    try:
        result = globals()[f"step_{args.name}"](args.work)
        rc = 0
    except Exception as exc:  # noqa: BLE001 - the step's record says why; the driver goes on
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        rc = 1
    result["step_seconds"] = round(time.perf_counter() - t0, 2)
    (args.work / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
