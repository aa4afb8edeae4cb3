"""Compile and "launch" the package's Triton kernels for NVIDIA GPUs on a machine without one.

One file (over 400 lines) because the fake driver and the readers of what it compiled (ptxas
usage, occupancy, load widths) share the architecture table and are used together.

``offline_cuda(arch)`` activates a fake Triton CUDA driver (``triton.runtime.driver.set_active``).
While it is active an ordinary launch ``kernel[grid](*tensors, ...)`` goes through Triton's own
``JITFunction.run``: the real binder specialises the arguments exactly as on a GPU (pointers on
``data_ptr() % 16 == 0``, integers on divisibility by 16 and on ``== 1``), the real compiler
builds PTX and cubin for ``GPUTarget("cuda", arch, 32)`` (no GPU is needed for that), and the
"launch" records what would have run instead of running it::

    with offline_cuda(arch=90) as rec:
        maxfusion_kernels.max_fuse([a, b], backend="triton")   # a, b: CPU tensors
    for launch in rec.launches:
        print(launch.kernel, launch.grid, launch.num_warps, launch.shared)
        usage = ptxas_usage(launch.compiled)                    # registers, spills, ...

Nothing here names a kernel of the package: whatever the launchers launch is recorded.

**Why it works on CPU tensors.** The kernels never read the tensors here; Triton only takes
``data_ptr()`` (for the alignment specialisation), dtypes and the scalar arguments. So CPU
tensors from ``torch.empty`` stand in for CUDA tensors of the same shape and strides: both
allocators return addresses aligned far beyond 16 bytes (the CPU one to 64, the CUDA caching
allocator to 512), so a tensor and its views get the same specialisation as on a GPU.

**How the package's launchers are reached with CPU tensors (the one trick).** The public
functions send CPU tensors to the Triton kernels only when ``TRITON_INTERPRET=1`` is set
(``choose_backend``), but with ``TRITON_INTERPRET=1`` set when a kernel is *defined*,
``@triton.jit`` makes an interpreter function instead of a compilable ``JITFunction``. While
``offline_cuda`` is active, Triton's own knob ``triton.knobs.runtime.interpret`` is pinned to
``False`` (a knob set in Python overrides the environment) and then ``TRITON_INTERPRET=1`` is
put into ``os.environ``. The package's ``choose_backend`` reads the environment and accepts CPU
tensors; ``@triton.jit`` reads the knob, so every kernel, even one defined lazily during the
call, is a real ``JITFunction``. Both are restored on exit. Kernels defined *before* the
context must also have been defined without the interpreter: run this in a process (or a
subprocess) where ``TRITON_INTERPRET`` is unset at import time (``require_compiled_kernels``
checks it).

**Caches.** A ``JITFunction`` keeps its binder, target and compiled kernels per device index;
``offline_cuda`` gives every ``JITFunction`` fresh caches on entry and puts the old ones back on
exit, so two contexts with different archs never share a compiled kernel. Triton's on-disk
cache (``~/.triton/cache``) still makes a recompilation cheap.

Analysis helpers (no GPU needed): :func:`ptxas_usage` (registers, spills, shared and local
memory from ``ptxas -v``, run with the ptxas and the flags Triton itself used for that arch),
:func:`occupancy` (resident CTAs per SM and the limiting resource, from documented per-arch
constants) and :func:`global_access_widths` (the width of every ``ld.global``/``st.global``
in the PTX).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver as _triton_driver

# ---------------------------------------------------------------------------------------------
# Per-arch constants
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one compute capability, for the occupancy calculation.

    Sources (every number is a property of the compute capability, not of a part):

    - ``cuda_occupancy.h`` of CUDA 13.0 (NVIDIA's occupancy calculator, shipped with the
      toolkit in ``include/``): registers allocated per warp in units of 256
      (``cudaOccRegAllocationGranularity``), in 4 sub-partitions of the SM
      (``cudaOccSubPartitionsPerMultiprocessor``); shared memory allocated in 128-byte units
      (``cudaOccSMemAllocationGranularity``), plus the driver's reserve per CTA from compute
      capability 8.0 on; the resident CTA limits (``cudaOccMaxBlocksPerMultiprocessor``: 8.0:
      32, 8.6: 16, 8.9: 24, 9.0: 32, 10.x: 32, 11.0: 24, 12.x: 24); the model itself
      (``cudaOccMaxBlocksPerSMRegsLimit``, ``...WarpsLimit``, ``...SmemLimit``).
    - CCCL's ``libcudacxx/include/cuda/__device/arch_traits.h`` (NVIDIA, 2025): threads per SM
      (2048 on 8.0, 9.0, 10.x, 11.0; 1536 on 8.6, 8.9, 12.0), shared memory per SM (164 KiB on
      8.0; 100 KiB on 8.6, 8.9, 12.0; 228 KiB on 9.0, 10.x, 11.0), 1 KiB reserved per CTA,
      64 Ki 32-bit registers per SM and per CTA, 255 registers per thread. Where the two
      disagree (CCCL: 32 resident CTAs on 11.0 and 12.0), ``cuda_occupancy.h`` is followed:
      it is what the CUDA runtime's occupancy API computes with.
    - 12.1 (GB10) is not in CCCL's table; it is taken to be 12.0 (``cuda_occupancy.h`` treats
      every 12.x alike).
    """

    arch: int
    max_warps_per_sm: int
    max_ctas_per_sm: int
    smem_per_sm: int  # bytes, the largest carveout
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers, per warp
    max_regs_per_thread: int = 255
    sub_partitions: int = 4
    smem_alloc_unit: int = 128
    smem_reserved_per_cta: int = 1024
    max_threads_per_cta: int = 1024

    @property
    def smem_per_cta_max(self) -> int:
        """Shared memory one CTA may opt in to (the SM's less the driver's reserve)."""
        return self.smem_per_sm - self.smem_reserved_per_cta


ARCHS: dict[int, ArchLimits] = {
    80: ArchLimits(80, max_warps_per_sm=64, max_ctas_per_sm=32, smem_per_sm=164 * 1024),  # A100
    86: ArchLimits(86, max_warps_per_sm=48, max_ctas_per_sm=16, smem_per_sm=100 * 1024),  # A10
    89: ArchLimits(89, max_warps_per_sm=48, max_ctas_per_sm=24, smem_per_sm=100 * 1024),  # L4, L40S
    90: ArchLimits(90, max_warps_per_sm=64, max_ctas_per_sm=32, smem_per_sm=228 * 1024),  # H100
    100: ArchLimits(100, max_warps_per_sm=64, max_ctas_per_sm=32, smem_per_sm=228 * 1024),  # B200
    103: ArchLimits(103, max_warps_per_sm=64, max_ctas_per_sm=32, smem_per_sm=228 * 1024),  # B300
    110: ArchLimits(110, max_warps_per_sm=64, max_ctas_per_sm=24, smem_per_sm=228 * 1024),
    120: ArchLimits(120, max_warps_per_sm=48, max_ctas_per_sm=24, smem_per_sm=100 * 1024),  # 5090
    121: ArchLimits(121, max_warps_per_sm=48, max_ctas_per_sm=24, smem_per_sm=100 * 1024),  # GB10
}
# What the bundled ptxas of Triton 3.9 accepts: sm_101 was renamed sm_110 in CUDA 13.
DEFAULT_ARCHS = (80, 86, 89, 90, 100, 120)


# ---------------------------------------------------------------------------------------------
# What a launch records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as the kernel saw it (the tensor itself is not kept alive)."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    data_ptr: int
    device: str

    @property
    def aligned16(self) -> bool:
        return self.data_ptr % 16 == 0


def _describe(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_describe(v) for v in value)
    if hasattr(value, "data_ptr") and hasattr(value, "dtype") and hasattr(value, "stride"):
        return TensorArg(str(value.dtype).replace("torch.", ""), tuple(value.shape),
                         tuple(value.stride()), int(value.data_ptr()), str(value.device))
    return value


def _path_name(arg_names: list[str], path: tuple[int, ...]) -> str:
    name = arg_names[path[0]]
    return name + "".join(f"[{k}]" for k in path[1:])


@dataclass
class Launch:
    """One recorded launch: what the GPU would have been asked to run."""

    kernel: str  # the kernel's function name
    grid: tuple[int, int, int]
    device: int  # the current device (driver's view) at launch time
    stream: int
    args: dict[str, Any]  # every bound argument by name (tensors as TensorArg, constexprs too)
    signature: dict[str, Any]  # Triton type per argument ("*fp16", "i32", "constexpr", ...)
    constexprs: dict[str, Any]  # declared constexprs and arguments specialised to constants
    specialization: dict[str, str]  # "16" (divisible by 16 / 16-byte aligned) or "==1";
    # arguments with neither are absent
    compiled: Any  # triton.compiler.CompiledKernel (asm["ptx"], asm["cubin"], metadata)

    @property
    def arch(self) -> int:
        return int(self.compiled.metadata.target.arch)

    @property
    def num_warps(self) -> int:
        return int(self.compiled.metadata.num_warps)

    @property
    def shared(self) -> int:
        """Dynamic shared memory Triton asks for at launch (``metadata.shared``), bytes."""
        return int(self.compiled.metadata.shared)

    @property
    def ptx(self) -> str:
        return self.compiled.asm["ptx"]

    @property
    def variant(self) -> str:
        """Identifies the compiled binary (same for every launch of the same variant)."""
        return self.compiled.hash


@dataclass
class Recorder:
    """What ``offline_cuda`` yields. ``launches``: one :class:`Launch` per launch (with
    ``keep=False`` only ``count`` goes up: a launch then costs one Python call, for timing the
    host side)."""

    arch: int
    keep: bool = True
    launches: list[Launch] = field(default_factory=list)
    count: int = 0

    def clear(self) -> None:
        self.launches.clear()
        self.count = 0

    def variants(self) -> list[Launch]:
        """The first launch of every distinct compiled kernel, in launch order."""
        seen, out = set(), []
        for launch in self.launches:
            if launch.variant not in seen:
                seen.add(launch.variant)
                out.append(launch)
        return out


def _launch_record(compiled, grid, device, stream, bound_values) -> Launch:
    src = compiled.src
    names = list(src.fn.arg_names)
    args = {n: _describe(v) for n, v in zip(names, bound_values)}
    signature = {k: v for k, v in src.signature.items()}
    constexprs = {_path_name(names, path): value for path, value in src.constants.items()}
    spec: dict[str, str] = {}
    for path, attrs in src.attrs.items():
        for key, val in attrs:
            if key == "tt.divisibility":
                spec[_path_name(names, path)] = str(val)
    params = src.fn.params
    for path, value in src.constants.items():
        # an argument the binder turned into a constant (an int equal to 1, None), not one
        # declared tl.constexpr
        if not (len(path) == 1 and params[path[0]].is_constexpr):
            spec[_path_name(names, path)] = f"=={value}"
    return Launch(kernel=compiled.name, grid=tuple(grid), device=device, stream=stream,
                  args=args, signature=signature, constexprs=constexprs, specialization=spec,
                  compiled=compiled)


# ---------------------------------------------------------------------------------------------
# The fake driver
# ---------------------------------------------------------------------------------------------


class _FakeModule:
    """What ``load_binary`` returns instead of a CUmodule."""

    def __init__(self, name: str):
        self.name = name


class _FakeUtils:
    """The parts of ``CudaUtils`` the runtime touches, with no CUDA behind them."""

    def __init__(self, limits: ArchLimits):
        self.limits = limits

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, max threads per block); ptxas_usage() gives the
        # real register and spill counts, nothing at launch time needs them
        return _FakeModule(name), 0, 0, 0, self.limits.max_threads_per_cta

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        lim = self.limits
        # Triton reads max_shared_mem (the opt-in limit per CTA) before "loading" a kernel;
        # the rest describes no real part (an H100's 132 SMs) and nothing here reads it
        return {"max_shared_mem": lim.smem_per_cta_max, "max_num_regs": lim.regs_per_sm,
                "multiprocessor_count": 132, "warpSize": 32, "sm_clock_rate": 0,
                "mem_clock_rate": 0, "mem_bus_width": 0}

    def set_printf_fifo_size(self, size):
        pass


class _FakeLauncher:
    """Stands in for ``CudaLauncher``: records the launch instead of calling ``cuLaunchKernel``."""

    def __init__(self, fake_driver: FakeCudaDriver, src, metadata):
        self.driver = fake_driver
        self.src = src
        self.metadata = metadata
        self.compiled = None

    def _find_compiled(self):
        # the CompiledKernel that created this launcher holds the very same metadata object
        for caches in self.src.fn.device_caches.values():
            for kernel in caches[0].values():
                if getattr(kernel, "metadata", None) is self.metadata:
                    return kernel
        raise RuntimeError(f"no compiled kernel found for {self.src.name}")

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata,
                 launch_metadata, enter_hook, exit_hook, *args):
        if self.compiled is None:
            self.compiled = self._find_compiled()
            self.driver._loaded.append(self.compiled)
        if enter_hook is not None:
            enter_hook(launch_metadata)
        rec = self.driver.recorder
        if rec is not None:
            rec.count += 1
            if rec.keep:
                rec.launches.append(_launch_record(self.compiled, (grid_x, grid_y, grid_z),
                                                   self.driver.current_device, stream, args))
        if exit_hook is not None:
            exit_hook(launch_metadata)


class FakeCudaDriver(DriverBase):
    """A Triton driver for ``GPUTarget("cuda", arch, 32)`` that compiles but never launches."""

    def __init__(self, arch: int, recorder: Recorder | None = None):
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch}")
        self.arch = arch
        self.limits = ARCHS[arch]
        self.recorder = recorder
        self.current_device = 0
        self.utils = _FakeUtils(self.limits)
        self._loaded: list[Any] = []
        self.launcher_cls = functools.partial(_FakeLauncher, self)

    @classmethod
    def is_active(cls):
        return False  # never picked by Triton on its own

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)

    def get_current_device(self):
        return self.current_device

    def set_current_device(self, device):
        self.current_device = int(device)

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        raise RuntimeError("offline_cuda: nothing runs, so nothing can be timed on the device")

    def get_device_interface(self):
        raise RuntimeError("offline_cuda: there is no device interface")


# ---------------------------------------------------------------------------------------------
# Activation
# ---------------------------------------------------------------------------------------------


def _jit_functions() -> list[Any]:
    from triton.runtime import jit

    registry = getattr(jit, "_triton_jit_function_registry", None)
    if registry is not None:
        return list(registry.values())
    import gc  # older Triton: no registry

    return [o for o in gc.get_objects() if isinstance(o, jit.JITFunction)]


def require_compiled_kernels() -> None:
    """Raise unless ``@triton.jit`` makes compilable kernels in this process."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set: kernels defined now are interpreted, not "
                           "compiled; run offline_cuda in a process without it")


@contextlib.contextmanager
def _torch_cuda_device_on(fake: FakeCudaDriver):
    """Make ``torch.cuda.set_device``, ``torch.cuda.current_device`` and the
    ``torch.cuda.device(i)`` context manager act on the fake driver's current device."""
    import torch

    cuda = torch.cuda
    names = ("set_device", "current_device", "_exchange_device", "_maybe_exchange_device")
    saved = {n: getattr(cuda, n) for n in names}

    def exchange(device: int) -> int:
        if device < 0:
            return -1
        prev, fake.current_device = fake.current_device, int(device)
        return prev

    def set_device(device) -> None:
        idx = device if isinstance(device, int) else torch.device(device).index
        if idx is not None and idx >= 0:
            fake.current_device = int(idx)

    cuda.set_device = set_device
    cuda.current_device = lambda: fake.current_device
    cuda._exchange_device = exchange
    cuda._maybe_exchange_device = exchange
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(cuda, n, f)


@contextlib.contextmanager
def offline_cuda(arch: int = 90, *, route_cpu_tensors: bool = True, keep: bool = True,
                 torch_cuda_device: bool = False):
    """Activate the fake CUDA driver for ``arch`` (a key of :data:`ARCHS`) and yield a
    :class:`Recorder` whose ``launches`` fill up as kernels are launched.

    ``route_cpu_tensors``: let the package's public functions send CPU tensors to the Triton
    kernels (see the module docstring); the kernels stay compiled ``JITFunction``s.
    ``keep=False``: count the launches only (see :class:`Recorder`).

    The device a launch records is the fake driver's current device, the one Triton asks the
    driver for at launch (0 at first): ``triton.runtime.driver.active.set_current_device(i)``
    changes it; with ``torch_cuda_device=True``, so do ``torch.cuda.set_device(i)`` and
    ``with torch.cuda.device(i):`` (which a CPU-only torch would refuse), so a device guard
    written with them can be tested here.
    """
    from triton.runtime.jit import JITFunction

    rec = Recorder(arch, keep=keep)
    fake = FakeCudaDriver(arch, rec)
    saved_caches = {}
    for fn in _jit_functions():
        if isinstance(fn, JITFunction):
            saved_caches[fn] = fn.__dict__.get("device_caches")
            fn.device_caches = type(fn.device_caches)(fn.create_binder)
    had_interpret_knob = "interpret" in knobs.runtime.__dict__
    old_knob = knobs.runtime.__dict__.get("interpret")
    old_env = os.environ.get("TRITON_INTERPRET")
    _triton_driver.set_active(fake)
    try:
        if route_cpu_tensors:
            knobs.runtime.interpret = False  # wins over the environment for @triton.jit
            os.environ["TRITON_INTERPRET"] = "1"  # read by the package's choose_backend
        with _torch_cuda_device_on(fake) if torch_cuda_device else contextlib.nullcontext():
            yield rec
    finally:
        if route_cpu_tensors:
            if old_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old_env
            if had_interpret_knob:
                knobs.runtime.__dict__["interpret"] = old_knob
            else:
                knobs.runtime.__dict__.pop("interpret", None)
        # the compiled kernels hold a fake module: drop it so that their finaliser does not
        # ask the real driver to unload it
        for compiled in fake._loaded:
            compiled.module = None
        for fn, caches in saved_caches.items():
            fn.device_caches = caches
        for fn in _jit_functions():  # kernels first defined inside the context
            if isinstance(fn, JITFunction) and fn not in saved_caches:
                fn.device_caches = type(fn.device_caches)(fn.create_binder)
        _reset_driver()


def _reset_driver() -> None:
    # reset_active() would build the default driver, which raises on a machine without CUDA;
    # clearing the override lets Triton build it lazily when (if) it is needed
    _triton_driver._active = None


# ---------------------------------------------------------------------------------------------
# ptxas -v
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PtxasUsage:
    arch: int
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int  # bytes per thread
    stack_frame: int  # bytes per thread (local memory, spills included)
    static_shared: int  # bytes per CTA, declared in the code
    dynamic_shared: int  # bytes per CTA, Triton's metadata.shared, given at launch
    cmem0: int  # kernel parameter bank, bytes
    ptxas: str  # the ptxas used
    log: str

    @property
    def shared(self) -> int:
        return self.static_shared + self.dynamic_shared

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (its bundled one unless overridden)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def ptxas_version(arch: int) -> str:
    out = subprocess.run([ptxas_path(arch), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def _gpu_name(arch: int) -> str:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return sm_arch_from_capability(arch)


def _int(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


def parse_ptxas_log(text: str) -> dict[str, int]:
    """Numbers of a ``ptxas -v`` log (one kernel)."""
    regs = re.search(r"Used (\d+) registers", text)
    if regs is None:
        raise ValueError(f"no register count in the ptxas log:\n{text}")
    return {
        "registers": int(regs.group(1)),
        "stack_frame": _int(r"(\d+) bytes stack frame", text),
        "spill_stores": _int(r"(\d+) bytes spill stores", text),
        "spill_loads": _int(r"(\d+) bytes spill loads", text),
        "static_shared": _int(r"(\d+) bytes smem", text),
        "cmem0": _int(r"(\d+) bytes cmem\[0\]", text),
    }


_USAGE_CACHE: dict[tuple[str, int], PtxasUsage] = {}


def ptxas_usage(compiled) -> PtxasUsage:
    """Resource usage of a compiled kernel from ``ptxas -v``, run on its PTX with the ptxas and
    the flags Triton used to build its cubin (so the counts are those of that cubin)."""
    arch = int(compiled.metadata.target.arch)
    key = (compiled.hash, arch)
    if key in _USAGE_CACHE:
        return _USAGE_CACHE[key]
    ptxas = ptxas_path(arch)
    fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(compiled.asm["ptx"])
        cmd = [ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={_gpu_name(arch)}", str(src), "-o", str(Path(tmp) / "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {' '.join(cmd)}\n{log}")
    nums = parse_ptxas_log(log)
    usage = PtxasUsage(arch=arch, dynamic_shared=int(compiled.metadata.shared), ptxas=ptxas,
                       log=log, **nums)
    _USAGE_CACHE[key] = usage
    return usage


# ---------------------------------------------------------------------------------------------
# Occupancy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Occupancy:
    arch: int
    ctas_per_sm: int  # resident programs (CTAs) per SM
    limiter: str  # "registers", "warps", "shared memory", "CTA slots" (ties: joined by "+")
    warps_per_sm: int
    occupancy: float  # resident warps / the SM's maximum
    by_limit: dict[str, int]  # CTAs per SM each resource alone would allow


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(arch: int, registers: int, num_warps: int, shared_bytes: int = 0) -> Occupancy:
    """Resident CTAs per SM of a kernel using ``registers`` per thread, ``num_warps`` warps per
    CTA and ``shared_bytes`` of shared memory per CTA (static + dynamic), on compute
    capability ``arch``, with the largest shared memory carveout (the driver's default).

    The model of NVIDIA's occupancy calculator (``cuda_occupancy.h``): registers are allocated
    per warp in units of 256, each of the SM's 4 sub-partitions holds a quarter of the register
    file; shared memory per CTA is its use plus the driver's 1 KiB reserve, rounded up to 128
    bytes; the resident warps and CTAs are capped per SM.
    """
    lim = ARCHS[arch]
    threads = num_warps * 32
    by: dict[str, int] = {}
    by["warps"] = lim.max_warps_per_sm // num_warps if threads <= lim.max_threads_per_cta else 0
    by["CTA slots"] = lim.max_ctas_per_sm
    regs_per_warp = _round_up(max(registers, 1) * 32, lim.reg_alloc_unit)
    regs_assumed = regs_per_warp * _round_up(num_warps, lim.sub_partitions)  # hardware check
    if registers > lim.max_regs_per_thread or regs_assumed > lim.regs_per_sm:
        by["registers"] = 0
    else:
        warps_per_partition = (lim.regs_per_sm // lim.sub_partitions) // regs_per_warp
        by["registers"] = warps_per_partition * lim.sub_partitions // num_warps
    smem = _round_up(shared_bytes + lim.smem_reserved_per_cta, lim.smem_alloc_unit)
    if shared_bytes > lim.smem_per_cta_max:
        by["shared memory"] = 0
    else:
        by["shared memory"] = lim.smem_per_sm // smem
    ctas = min(by.values())
    limiter = "+".join(k for k, v in by.items() if v == ctas)
    warps = ctas * num_warps
    return Occupancy(arch=arch, ctas_per_sm=ctas, limiter=limiter, warps_per_sm=warps,
                     occupancy=warps / lim.max_warps_per_sm, by_limit=by)


# ---------------------------------------------------------------------------------------------
# Global memory access widths
# ---------------------------------------------------------------------------------------------

_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global(?:\.[A-Za-z0-9_:]+)*"
                       r"\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(\d+)")
_TYPE_BITS = re.compile(r"^[bsuf](8|16|32|64|128)$")
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"', re.M)
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")


@dataclass(frozen=True)
class GlobalAccess:
    """One global memory instruction of the PTX (a static count, not an execution count)."""

    op: str  # "ld" or "st" ("ld" also for cp.async global -> shared copies)
    vector: int  # 1, 2, 4 or 8
    elem_bits: int
    line: int  # 1-based line in the PTX
    source: tuple[str, int, int] | None = None  # (file, line, column) of the Triton op
    pointee: str | None = None  # element type of the Triton pointer ("f16", "f32", "i32", ...)

    @property
    def bytes(self) -> int:
        return self.vector * self.elem_bits // 8


def _split_top(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside parentheses, brackets and strings."""
    parts, depth, quoted, start, i = [], 0, False, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch in "([":
            depth += 1
        elif not quoted and ch in ")]":
            depth -= 1
        elif not quoted and depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _resolve_loc(expr: str, defs: dict[str, str], depth: int = 0):
    """Innermost ``(file, line, column)`` of an MLIR location expression (the callee of a
    call site, the location under a name), or None."""
    expr = expr.strip()
    if depth > 64:
        return None
    if expr.startswith("#loc"):
        return _resolve_loc(defs[expr], defs, depth + 1) if expr in defs else None
    if expr.startswith("callsite(") and expr.endswith(")"):
        return _resolve_loc(_split_top(expr[9:-1], " at ")[0], defs, depth + 1)
    if expr.startswith("fused") and "[" in expr:
        inner = expr[expr.index("[") + 1:expr.rindex("]")]
        for part in _split_top(inner, ","):
            found = _resolve_loc(part, defs, depth + 1)
            if found is not None:
                return found
        return None
    m = re.match(r'"((?:[^"\\]|\\.)*)":(\d+):(\d+)', expr)
    if m:
        return m.group(1), int(m.group(2)), int(m.group(3))
    m = re.match(r'"(?:[^"\\]|\\.)*"\((.*)\)$', expr, re.S)
    if m:
        return _resolve_loc(m.group(1), defs, depth + 1)
    return None


_TT_MEM = re.compile(r"\b(tt\.load|tt\.store|ttg\.async_copy_global_to_local)\b(.*)$")
_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)


def memory_ops_by_source(ttgir: str) -> dict[tuple[str, int, int], set[str]]:
    """Pointer element types of the global loads and stores of a TTGIR module, by the source
    position of the op (``(file, line, column)``)."""
    defs = {m.group(1): m.group(2) for m in _LOC_DEF.finditer(ttgir)}
    out: dict[tuple[str, int, int], set[str]] = {}
    for text in ttgir.splitlines():
        m = _TT_MEM.search(text)
        if m is None or " loc(" not in text:
            continue
        body, loc = text.rsplit(" loc(", 1)
        ptr = re.search(r"!tt\.ptr<([A-Za-z0-9]+)>", body.rsplit(" : ", 1)[-1])
        src = _resolve_loc(loc.rstrip()[:-1], defs)
        if ptr is not None and src is not None:
            out.setdefault(src, set()).add(ptr.group(1))
    return out


def global_accesses(ptx: str, ttgir: str | None = None) -> list[GlobalAccess]:
    """Every ``ld.global`` / ``st.global`` (and ``cp.async`` from global) instruction of the PTX.

    With the kernel's TTGIR, each instruction also gets the element type of the Triton pointer
    it came from, matched through the source position (the PTX's ``.loc`` before it and the
    TTGIR op's location): e.g. the loads of the float16 inputs versus those of float32
    statistics, whatever the instruction's own type (Triton moves 8 halves as ``v4.b32``).
    """
    files = {int(num): path for num, path in _PTX_FILE.findall(ptx)}
    by_src = memory_ops_by_source(ttgir) if ttgir else {}
    by_line: dict[tuple[str, int], set[str]] = {}
    for (path, ln, _), types in by_src.items():
        by_line.setdefault((path, ln), set()).update(types)
    out, loc = [], None
    for lineno, text in enumerate(ptx.splitlines(), start=1):
        code = text.split("//", 1)[0]
        m_loc = _PTX_LOC.match(code)
        if m_loc:
            f, ln, col = (int(g) for g in m_loc.groups())
            loc = (files.get(f, str(f)), ln, col)
            continue
        found = []
        for m in _ACCESS.finditer(code):
            vec, bits = 1, 0
            for part in m.group(2).split(".")[1:]:
                if part in ("v2", "v4", "v8"):
                    vec = int(part[1:])
                elif _TYPE_BITS.match(part):
                    bits = int(_TYPE_BITS.match(part).group(1))
            if bits == 0:
                raise ValueError(f"PTX line {lineno}: no element type in {m.group(0)!r}")
            found.append((m.group(1), vec, bits))
        for m in _CP_ASYNC.finditer(code):
            size = int(m.group(1))
            found.append(("ld", max(1, size // 4), 32 if size >= 4 else size * 8))
        for op, vec, bits in found:
            types = None
            if loc is not None:
                # the exact position; else every op on that source line, if they agree
                types = by_src.get(loc) or by_line.get(loc[:2])
            pointee = next(iter(types)) if types and len(types) == 1 else None
            out.append(GlobalAccess(op, vec, bits, lineno, loc, pointee))
    return out


def global_access_widths(ptx: str, ttgir: str | None = None,
                         pointee: str | None = None) -> dict[str, Counter]:
    """Histogram of global access widths in bytes: ``{"ld": Counter, "st": Counter}``;
    ``pointee`` (with ``ttgir``): only the accesses through pointers to that element type."""
    hist = {"ld": Counter(), "st": Counter()}
    for acc in global_accesses(ptx, ttgir):
        if pointee is None or acc.pointee == pointee:
            hist[acc.op][acc.bytes] += 1
    return hist


def format_widths(counter: Counter) -> str:
    """``"16Bx4 2Bx8"``: access width in bytes x number of instructions, widest first."""
    return " ".join(f"{b}Bx{n}" for b, n in sorted(counter.items(), reverse=True)) or "-"


__all__ = [
    "ARCHS", "ArchLimits", "DEFAULT_ARCHS", "FakeCudaDriver", "GlobalAccess", "Launch", "Occupancy",
    "PtxasUsage", "Recorder", "TensorArg", "format_widths", "global_access_widths",
    "global_accesses", "occupancy", "offline_cuda", "parse_ptxas_log", "ptxas_path",
    "ptxas_usage", "ptxas_version", "require_compiled_kernels",
]



# ---------------------------------------------------------------------------------------------
# 64-bit pointer offsets (from the TTIR)
# ---------------------------------------------------------------------------------------------


def narrow_offsets(ttir: str) -> list[str]:
    """The ``tt.addptr`` operations of a kernel's TTIR whose offset is narrower than 64 bits
    and not a compile-time constant (a constant, or a splat or broadcast of one): offsets that
    could wrap past 2^31 elements. Returns their lines."""
    import re

    defs: dict[str, str] = {}
    for m in re.finditer(r"^\s*(%[\w.#-]+)(?::\d+)? = ([\w.]+)(.*)$", ttir, re.M):
        defs[m.group(1)] = m.group(2) + m.group(3)

    def constant(name: str, depth: int = 0) -> bool:
        d = defs.get(name, "")
        if d.startswith("arith.constant"):
            return True
        if depth < 8 and (d.startswith("tt.splat") or d.startswith("tt.broadcast")):
            src = re.match(r"[\w.]+\s+(%[\w.#-]+)", d)
            return bool(src) and constant(src.group(1), depth + 1)
        return False

    out = []
    for line in ttir.splitlines():
        m = re.search(r"tt\.addptr (%[\w.#-]+), (%[\w.#-]+) : ([^,]+), (.+?)(\s+loc\(|$)",
                      line)
        if m is None:
            continue
        offset_type = m.group(4)
        if "i64" in offset_type or constant(m.group(2)):
            continue
        out.append(line.strip())
    return out
