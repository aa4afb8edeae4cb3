"""Tools that make the Triton interpreter behave less kindly than it does by default, so that
tests can catch kernels that only work by luck of the interpreter.

- :func:`walk_grid` runs the programs of every interpreted launch inside it in another order
  (reversed, or a seeded shuffle). The interpreter walks a launch's grid in order, x outermost,
  one program after the other; a GPU runs programs in any order and at once. A kernel whose
  result depends on the order (a program reading what another program of the same launch
  writes) gives another result here.
- :func:`garbage_buffers` pre-fills every tensor made by ``torch.empty``, ``torch.empty_like``,
  ``torch.empty_strided`` and ``Tensor.new_empty`` inside it with garbage: NaN, infinities and
  huge values for floating dtypes, random bits for integers, random values for bool. A kernel
  that reads an element nobody wrote, or relies on memory being zero, gives NaN or garbage.

Both patch only for the duration of the ``with`` block and restore every attribute exactly.
They know nothing of the MaxFusion kernels (names, arguments or launch count), only of the
interpreter's ``InterpreterBuilder.set_grid_dim`` / ``set_grid_idx``, which the interpreter's
launch loop calls once per launch and once per program.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

_MISSING = object()


def _grid_order(total: int, order, rng: np.random.Generator | None) -> np.ndarray:
    if order == "forward":
        return np.arange(total)
    if order == "reverse":
        return np.arange(total)[::-1].copy()
    return rng.permutation(total)


def _parse(order):
    if order in ("forward", "reverse"):
        return order, None
    if isinstance(order, tuple) and len(order) == 2 and order[0] == "shuffle":
        return "shuffle", np.random.default_rng(order[1])
    raise ValueError(f"order must be 'forward', 'reverse' or ('shuffle', seed), got {order!r}")


@contextmanager
def walk_grid(order):
    """Run every interpreted launch inside the block with its programs in ``order``:
    ``"reverse"``, ``("shuffle", seed)`` (a fresh permutation per launch, from one generator
    seeded with ``seed``) or ``"forward"`` (the interpreter's own order; for counting).

    Each program still runs exactly once: the launch loop's k-th program is given the grid
    index ``perm[k]`` of a bijection of the grid. Yields a list that receives, per launch, the
    grid ``(nx, ny, nz)`` and the linear order in which its programs ran.
    """
    from triton.runtime import interpreter

    mode, rng = _parse(order)
    builder = interpreter.interpreter_builder
    saved = {name: builder.__dict__.get(name, _MISSING)
             for name in ("set_grid_dim", "set_grid_idx")}
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    launches: list[dict] = []
    state = {}

    def set_grid_dim(nx, ny, nz):
        dims = (int(nx), int(ny), int(nz))
        perm = _grid_order(dims[0] * dims[1] * dims[2], mode, rng)
        state.update(dims=dims, perm=perm)
        launches.append({"grid": dims, "order": perm})
        return set_dim(nx, ny, nz)

    def set_grid_idx(x, y, z):
        _, ny, nz = state["dims"]
        k = int(state["perm"][(int(x) * ny + int(y)) * nz + int(z)])
        return set_idx(k // (ny * nz), (k // nz) % ny, k % nz)

    builder.set_grid_dim = set_grid_dim
    builder.set_grid_idx = set_grid_idx
    try:
        yield launches
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                builder.__dict__.pop(name, None)
            else:
                setattr(builder, name, value)


def _fill_garbage(t: torch.Tensor, gen: torch.Generator) -> None:
    if t.numel() == 0 or t.is_meta or t.device.type not in ("cpu", "cuda"):
        return
    if isinstance(t, torch._subclasses.FakeTensor):
        return
    shape, dev = t.shape, t.device
    if t.dtype.is_floating_point:
        fi = torch.finfo(t.dtype)
        table = torch.tensor([float("nan"), float("nan"), float("nan"), float("inf"),
                              float("-inf"), fi.max, -fi.max, fi.tiny], dtype=t.dtype)
        pick = torch.randint(0, table.numel(), tuple(shape), generator=gen)
        vals = table[pick]
    elif t.dtype == torch.bool:
        vals = torch.randint(0, 2, tuple(shape), generator=gen).bool()
    elif t.dtype.is_complex:
        vals = torch.full(tuple(shape), complex(float("nan"), float("nan")), dtype=t.dtype)
    else:
        ii = torch.iinfo(t.dtype)
        lo, hi = max(ii.min, -(2**62)), min(ii.max, 2**62)
        vals = torch.randint(lo, hi, tuple(shape), generator=gen, dtype=torch.int64)
        vals = vals.to(t.dtype)
    try:
        with torch.no_grad():
            t.copy_(vals.to(dev))
    except RuntimeError:  # e.g. overlapping strides: leave it as it is
        pass


@contextmanager
def garbage_buffers(seed: int = 0):
    """Pre-fill every tensor made by ``torch.empty``, ``torch.empty_like``,
    ``torch.empty_strided`` and ``Tensor.new_empty`` inside the block with garbage drawn from a
    generator seeded with ``seed`` (floats: mostly NaN, some +-inf, +-max and tiny; integers:
    random values over most of the range; bool: random). Yields a list of the filled tensors'
    shapes (to check the patch was reached)."""
    gen = torch.Generator().manual_seed(seed)
    filled: list[tuple] = []
    busy = [False]

    def wrap(make):
        def made(*args, **kwargs):
            t = make(*args, **kwargs)
            if not busy[0] and isinstance(t, torch.Tensor):
                busy[0] = True
                try:
                    _fill_garbage(t, gen)
                    filled.append(tuple(t.shape))
                finally:
                    busy[0] = False
            return t

        made.__wrapped__ = make
        return made

    targets = [(torch, "empty"), (torch, "empty_like"), (torch, "empty_strided"),
               (torch.Tensor, "new_empty")]
    saved = [(obj, name, obj.__dict__.get(name, _MISSING)) for obj, name in targets]
    for obj, name in targets:
        setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield filled
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
