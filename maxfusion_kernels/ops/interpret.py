"""Whether Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) can run the kernels here.

Every pass of the kernels loops over ``range(lo, hi, BLOCK)`` with bounds loaded from the
launch table. In Triton's interpreter a loaded scalar is a one-element NumPy array, and the
interpreter turns a tensor used as a Python index into an ``int`` itself. Triton 3.6's
interpreter does ``int(array)``, which NumPy 2.4 made a ``TypeError`` for arrays of one
dimension ("only 0-dimensional arrays can be converted to Python scalars"; Triton issue
triton-lang/triton#9171, fixed upstream by #9172, which squeezes the array first: Triton 3.9
has the fix). With Triton 3.6 and NumPy >= 2.4, every launch in the interpreter fails with that
message; with NumPy < 2.4, or a Triton with the fix, it works. Compiled kernels (a GPU) are not
affected: they never go through the interpreter.

:func:`interpreter_problem` finds out by running a four-line kernel that does exactly that (a
``range()`` bound loaded from memory) once per process, so that ``choose_backend`` can raise a
clear error instead of letting the first launch fail deep inside Triton. Imported only where
triton is installed and the interpreter is on (``fuse.choose_backend``).
"""

from __future__ import annotations

import functools
import os

import numpy
import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    """Whether ``@triton.jit`` now makes interpreter functions (Triton's ``interpret`` knob,
    which ``TRITON_INTERPRET`` sets and ``benchmarks/analysis/offline_cuda.py`` pins off)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_problem() -> str | None:
    """None where Triton's interpreter can run the kernels (or kernels are compiled, not
    interpreted); else why not, in one sentence with the versions and the way out. The probe
    runs once per process (its answer is kept)."""
    if not _interpreting():
        return None
    return _probe()


@functools.cache
def _probe() -> str | None:
    @triton.jit
    def range_bound_probe(n_ptr, out_ptr):
        n = tl.load(n_ptr)  # a scalar loaded from memory, as the kernels' chunk bounds are
        acc = 0
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr, acc)

    n = torch.tensor([3], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        range_bound_probe[(1,)](n, out)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the answer
        return (
            f"Triton {triton.__version__}'s interpreter cannot run the kernels with NumPy "
            f"{numpy.__version__}: a loop bound loaded from memory fails ({exc}); Triton 3.6's "
            f"interpreter converts it with int() of a 1-element array, an error since NumPy 2.4 "
            f"(triton-lang/triton#9171; Triton 3.9 has the fix). Install numpy<2.4 or a newer "
            f"Triton, or unset TRITON_INTERPRET (CPU tensors then use the torch path)"
        )
    if int(out[0]) != 3:
        return (f"Triton {triton.__version__}'s interpreter ran a loop with a bound loaded from "
                f"memory {int(out[0])} times instead of 3")
    return None
