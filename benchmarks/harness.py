"""The benchmark harness shared by ``run.py`` and ``test_bench_max_fuse.py``.

The methods timed (each takes the N input tensors of one fusion, or the G groups of a step):

- ``reference``: the authors' algorithm in eager PyTorch, imported from the package's
  executable specification: ``reference.max_fuse(feats, preset="reference", dtype=float32)``
  (float32 is the compute dtype of fp16/bf16/fp32 inputs; its result is float32);
- ``compiled_reference``: ``torch.compile`` of that same call, mode
  ``"max-autotune-no-cudagraphs"``, ``dynamic=False`` (one specialised graph per shape);
- ``max_fuse``: ``maxfusion_kernels.max_fuse(feats, preset="reference")`` (the same function
  as the reference; the Triton kernels on CUDA, ``backend="torch"`` on CPU);
- ``max_fuse_many``: ``maxfusion_kernels.max_fuse_many(groups, preset="reference")``, every
  residual of a step in one call (3 launches with the Triton backend);
- ``sum``: ``f_1 + f_2 + ...``, what diffusers' ``MultiControlNetModel`` does today;
- ``copy``: ``dst.copy_(src)`` on the same device with ``src`` holding half the minimum bytes
  of the fusion, so that the copy (read ``src``, write ``dst``) moves the same bytes: the
  bandwidth limit.

Bytes: a merge must read its N inputs once and write one output of the input dtype, so every
method's effective GB/s is ``(N + 1) * X / time`` (``X`` the bytes of one input, 1 GB = 1e9 B),
whatever it really moves (the reference also writes a float32 result and full-size
temporaries).

Bytes of the backward rows (``backward_bytes``): the N inputs and the output gradients (1 for
a merge, N for an unmerge) read once, the N input gradients written once; a forward plus its
backward adds the forward's minimum.

Timing on CUDA: ``warmup`` calls, then ``reps`` calls, each between two CUDA events, and the
median (as ``triton.testing.do_bench``). Before each call (outside the events) a 256 MiB buffer
is zeroed so the inputs are read from DRAM, not from L2 (``flush_l2``; an H100 has 50 MB of
L2); nothing waits in between, so the host runs ahead by about the flush's duration and only
host work longer than that shows in an eager time. With ``cuda_graphs`` the call is captured
once into a CUDA graph and the replay is timed (GPU time without host launch overhead); the
eager reference cannot be captured (it copies its weights host-to-device, with a sync, on every
call) and is always timed eagerly; every record says whether its time is a graph replay.
Timing on CPU: ``time.perf_counter`` around each call, median of at least ``reps`` calls and
at least ``min_seconds`` of calls (short calls are repeated, up to 2000 times), so that one call
preempted by another process cannot move the median.

Peak extra memory on CUDA: ``torch.cuda.max_memory_allocated`` over one eager call, after
``reset_peak_memory_stats``, minus ``memory_allocated`` before it: the method's temporaries and
its outputs (the copy writes into a preallocated buffer, so its figure is 0). On CPU there is
no allocator statistic to read; the figure is ``None``.
"""

from __future__ import annotations

import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import maxfusion_kernels
from maxfusion_kernels import reference

COMPILE_MODE = "max-autotune-no-cudagraphs"
FLUSH_BYTES = 256 * 2**20  # several times an H100's 50 MB of L2
PRESET = "reference"  # the authors' choices, so that every method computes the same function
CPU_MAX_REPS = 2000  # CPU: at most this many timed calls
METHODS = ("reference", "compiled_reference", "max_fuse", "max_fuse_many", "sum", "copy")


# ----------------------------------------------------------------------------------------
# the methods
# ----------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in for inputs of ``dtype`` (float32 up to float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_fuse(feats: list[torch.Tensor], channel_dim: int, unmerge: bool = False):
    """(a) the authors' algorithm in eager PyTorch, from the package's reference code (plain
    torch: autograd runs through it, the baseline of the backward rows)."""
    return reference.max_fuse(feats, preset=PRESET, channel_dim=channel_dim, unmerge=unmerge,
                              dtype=compute_dtype(feats[0].dtype))


_COMPILED: dict[str, Callable] = {}


def compiled_reference() -> Callable:
    """(b) ``torch.compile`` of :func:`reference_fuse`. One wrapper; ``dynamic=False`` makes
    Dynamo specialise (and Inductor autotune) a graph per shape, dtype and N; the recompile
    limit is raised so that every shape of a run keeps its graph (a step calls 13 of them)."""
    if "fn" not in _COMPILED:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 4096))
        for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 65536))
        _COMPILED["fn"] = torch.compile(reference_fuse, mode=COMPILE_MODE, dynamic=False)
    return _COMPILED["fn"]


def compile_in_process() -> None:
    """For CPU benchmarks: Inductor compiles in this process, with no pool of compile workers
    (their start-up, each importing torch, would run beside the timed calls after a compile)."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1


def backend_for(device: torch.device) -> str:
    """``max_fuse``'s backend: the Triton kernels on CUDA; on CPU the torch path (the Triton
    interpreter's speed means nothing)."""
    return "auto" if device.type == "cuda" else "torch"


def max_fuse(feats: list[torch.Tensor], channel_dim: int, backend: str, unmerge: bool = False):
    """(c) the package's fused op on one residual."""
    return maxfusion_kernels.max_fuse(feats, preset=PRESET, channel_dim=channel_dim,
                                      backend=backend, unmerge=unmerge)


def max_fuse_many(groups: list[list[torch.Tensor]], channel_dim: int,
                  backend: str) -> list[torch.Tensor]:
    """(c) the package's fused op on every residual of a step in one call."""
    return maxfusion_kernels.max_fuse_many(groups, preset=PRESET, channel_dim=channel_dim,
                                           backend=backend)


def diffusers_sum(feats: list[torch.Tensor]) -> torch.Tensor:
    """(d) ``MultiControlNetModel``: ``samples_prev + samples_curr``, model after model."""
    out = feats[0] + feats[1]
    for f in feats[2:]:
        out = out + f
    return out


def copy_buffers(min_bytes: int, dtype: torch.dtype, device: torch.device):
    """(e) ``(src, dst)`` whose copy moves at least ``min_bytes`` (half read, half written)."""
    elem = torch.empty((), dtype=dtype).element_size()
    numel = -(-min_bytes // (2 * elem))
    src = torch.randn(numel, device=device).to(dtype)
    return src, torch.empty_like(src)


# ----------------------------------------------------------------------------------------
# bytes, shapes, devices
# ----------------------------------------------------------------------------------------


def numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def fusion_bytes(shapes: Sequence[Sequence[int]], n: int, dtype: torch.dtype) -> dict:
    """Bytes of one input (summed over ``shapes``) and the minimum any merge moves."""
    elem = torch.empty((), dtype=dtype).element_size()
    x = sum(numel(s) for s in shapes) * elem
    return {"input_bytes": x, "out_bytes": x, "bytes": (n + 1) * x}


def backward_bytes(shapes: Sequence[Sequence[int]], n: int, dtype: torch.dtype,
                   unmerge: bool) -> dict:
    """The minimum bytes of one backward: the N inputs and the output gradients (1 for a merge,
    N for an unmerge) read once, the N input gradients written once, in the input dtype; and
    of a forward plus its backward (the forward's minimum added)."""
    x = fusion_bytes(shapes, n, dtype)["input_bytes"]
    bwd = (n + (n if unmerge else 1) + n) * x
    fwd = (n + (n if unmerge else 1)) * x
    return {"input_bytes": x, "backward": bwd, "forward": fwd, "forward_backward": fwd + bwd}


def stats_allowance(shapes: Sequence[Sequence[int]], channel_dim: int, n: int,
                    dtype: torch.dtype) -> int:
    """The extra memory a fusion may use (the memory target): its outputs plus its scratch
    workspace (``maxfusion_kernels/ops/plan.py``: per site and channel chunk N means and
    N (N + 1) / 2 co-moments, per site N saliencies and a pair mask, small per-block and
    per-sample parts; docs/design.md states the bound), plus 512 B of allocator rounding for
    each of its buffers (the workspace and the outputs)."""
    from maxfusion_kernels.ops.plan import contiguous_plan

    elem = torch.empty((), dtype=dtype).element_size()
    outputs = sum(numel(s) for s in shapes) * elem
    plan = contiguous_plan([tuple(int(v) for v in s) for s in shapes], channel_dim, n, elem)
    return outputs + plan.workspace_bytes + 512 * (1 + len(shapes))


def shrink(shapes: Sequence[Sequence[int]], channel_dim: int, max_elements: int | None):
    """CPU-sized stand-ins for ``shapes``: every site dim (not the batch, not the channels) is
    halved (rounding down, at least 1) the same number of times ``k`` for every shape of the
    case, the smallest ``k`` that brings the largest shape to ``max_elements`` or fewer. The
    batch and channel counts, and the relative sizes inside a step, are kept."""
    shapes = [tuple(int(v) for v in s) for s in shapes]
    if not max_elements:
        return shapes

    def halve(s, k):
        cd = channel_dim % len(s)
        return tuple(v if d in (0, cd) else max(1, v >> k) for d, v in enumerate(s))

    k = 0
    while max(numel(halve(s, k)) for s in shapes) > max_elements and k < 32:
        k += 1
    return [halve(s, k) for s in shapes]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo and the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    ms: float  # median
    ms_min: float
    cuda_graph: bool


@dataclass
class Timer:
    """How calls are timed on ``device`` (see the module docstring)."""

    device: torch.device
    reps: int
    warmup: int
    flush_l2: bool = True  # CUDA only
    cuda_graphs: bool = False  # CUDA only
    min_seconds: float = 0.1  # CPU only: time each method for at least this long

    def __post_init__(self):
        self._flush = None
        if self.device.type == "cuda" and self.flush_l2:
            self._flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=self.device)

    @property
    def l2_state(self) -> str | None:
        if self.device.type != "cuda":
            return None
        return "flushed" if self._flush is not None else "warm"

    def time(self, fn: Callable[[], object], capturable: bool = True) -> Timing:
        """Median and minimum milliseconds of ``fn()``, and whether a CUDA graph replay was
        timed."""
        if self.device.type != "cuda":
            return Timing(*self._time_cpu(fn), cuda_graph=False)
        graph = keep = None
        if self.cuda_graphs and capturable:
            graph, keep = self._capture(fn)
        median, low = self._time_cuda(graph.replay if graph is not None else fn)
        del keep
        return Timing(median, low, cuda_graph=graph is not None)

    def _time_cpu(self, fn) -> tuple[float, float]:
        """At least ``reps`` calls and at least ``min_seconds`` of them (at most
        ``CPU_MAX_REPS``): a short call is repeated until a preempted call (another process
        holding one of the cores) cannot move the median."""
        for _ in range(self.warmup):
            fn()
        times = []
        t_end = time.perf_counter() + self.min_seconds
        while len(times) < self.reps or (time.perf_counter() < t_end
                                          and len(times) < CPU_MAX_REPS):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times)

    def _capture(self, fn):
        """``(graph, outputs)`` of ``fn()`` captured into a CUDA graph (the outputs live in the
        graph's pool), or ``(None, None)`` with a warning where capture fails."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(max(self.warmup, 2)):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = fn()
        except Exception as exc:  # noqa: BLE001 - any capture failure: time it eagerly
            torch.cuda.synchronize(self.device)
            print(f"  (CUDA graph capture failed, timed eagerly: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:120]})")
            return None, None
        return graph, out

    def _time_cuda(self, call) -> tuple[float, float]:
        for _ in range(self.warmup):
            call()
        torch.cuda.synchronize(self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            if self._flush is not None:
                self._flush.zero_()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(self.device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return statistics.median(times), min(times)

    def peak_extra_bytes(self, fn: Callable[[], object]) -> int | None:
        """Bytes ``fn()`` allocates at its peak over what was allocated before (CUDA only)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del out
        return int(peak)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
