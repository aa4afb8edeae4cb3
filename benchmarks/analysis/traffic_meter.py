"""Traffic meter: the bytes Triton kernels load and store, counted in the Triton interpreter.

One file (over 400 lines) because the interpreter patch that records every load and store and
the byte accounting it feeds must agree on every access.

Usage as a library (the kernels must run in the interpreter: ``TRITON_INTERPRET=1`` set before
they are defined, CPU tensors)::

    from traffic_meter import TrafficMeter

    with TrafficMeter() as meter:
        out = max_fuse(feats, backend="triton")
    report = meter.report(inputs=feats, outputs=[out])
    report.call["ratios"]["unique"]        # unique bytes / minimum, for the whole call
    report.launches[0]["programs"]         # programs of the first launch
    report.programs(0)                     # per-program dicts of the first launch

Usage as a script (runs the cases of ``benchmarks/shapes.json``; see ``main``)::

    python benchmarks/analysis/traffic_meter.py [--quick] [--label L] [--note TEXT] [--out PREFIX]

How it counts. For the duration of the ``with`` block the meter wraps, in
``triton.runtime.interpreter``, ``GridExecutor.__call__`` (one record per kernel launch: the
jit function's name and its grid) and, on the interpreter's one ``InterpreterBuilder``, the
masked load and store (every plain, masked, descriptor and atomic load or store goes through
them), ``create_atomic_rmw`` and ``create_atomic_cas`` (an atomic counts as a load and a store
of its lanes) and ``set_grid_dim``. On exit everything is restored exactly. In the interpreter a
pointer is the host address of the CPU tensor, so each access is an interval
``[address, address + element size)``; the meter keeps, per launch and per program (grid
index), the addresses of the unmasked lanes. It depends on no kernel name, argument or launch
count: whatever the kernels of a call are, they are counted.

What it reports, per launch and for the whole call (all launches inside the ``with``):

- ``loaded`` / ``stored``: bytes of unmasked lanes (lanes x element size), what the program
  asks for; a lane read twice counts twice;
- ``unique_loaded`` / ``unique_stored``: bytes of the union of the lanes' intervals (each
  address once per direction; ``unique`` is their sum: a scratch byte written by one launch
  and read by the next moves twice on a GPU, so it counts twice);
- ``sector_*``: the unique 32-byte sectors touched, times 32: what a GPU moves at least when
  every sector is fetched from DRAM once (a strided read of half the elements costs the whole
  sector);
- the same split by class, post hoc: ``report(inputs=..., outputs=...)`` names the tensors of
  the call; an address inside the span of the k-th input (from its lowest to its highest
  element) is ``input k``, likewise for outputs, any other address is ``scratch`` (statistics,
  tables: freed after the call, so known only by not being a named tensor). Spans are claimed
  in the order inputs then outputs, the first claim wins where two overlap. A sector that holds
  bytes of two classes counts in both classes, once in the total;
- per program: the input bytes read (lanes and unique), max and mean over the launch's programs
  (the mean over every program of the grid, including those that touched nothing);
- the minimum: every input read once and every output written once, i.e. the named tensors'
  bytes (N inputs; 1 output merged, N unmerged, and any info tensors passed as outputs);
  ``ratios`` divide by it. Per-launch ratios divide by the call's minimum too.
- for the call, ``unique_launch_sum`` / ``sector_launch_sum``: the launches' unique (sector)
  bytes added up, i.e. an address counted once per launch that touches it rather than once
  per call: the traffic when nothing stays in the cache from one launch to the next.

Work done by PyTorch outside Triton kernels (e.g. a copy of a badly strided input) is not seen.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np

SECTOR = 32
GROUPS = ("inputs", "outputs", "scratch")
_BUILDER_HOOKS = ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                  "create_atomic_cas", "set_grid_dim")
_EMPTY = np.zeros(0, np.int64)


def _interpreter():
    from triton.runtime import interpreter

    return interpreter


# ----------------------------------------------------------------------------------------
# rows: one per distinct (address, element size), with a lane count
# ----------------------------------------------------------------------------------------


def _rows(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Merge ``(starts, sizes, counts)`` parts into rows sorted by start, one per distinct
    ``(start, size)``, counts summed; plus each row's share of the union of the intervals
    (``contrib``: its bytes not covered by an interval of lower start)."""
    parts = [p for p in parts if p[0].size]
    if not parts:
        return _EMPTY, _EMPTY, _EMPTY, _EMPTY
    s = np.concatenate([p[0] for p in parts])
    z = np.concatenate([p[1] for p in parts])
    c = np.concatenate([p[2] for p in parts])
    if len(parts) > 1 or not (np.all(s[1:] > s[:-1]) if s.size > 1 else True):
        order = np.lexsort((z, s)) if z.min() != z.max() else np.argsort(s, kind="stable")
        s, z, c = s[order], z[order], c[order]
        new = np.empty(s.size, bool)
        new[0] = True
        new[1:] = (s[1:] != s[:-1]) | (z[1:] != z[:-1])
        if not new.all():
            first = np.flatnonzero(new)
            s, z, c = s[first], z[first], np.add.reduceat(c, first)
    e = s + z
    before = np.empty_like(e)
    before[0] = s[0]
    np.maximum.accumulate(e[:-1], out=before[1:])
    contrib = np.clip(e - np.maximum(s, before), 0, None)
    return s, z, c, contrib


def _program_rows(chunks: dict[int, list[np.ndarray]]):
    """Rows of one program's accesses in one direction (``{element size: [addresses]}``)."""
    parts = []
    for size, arrays in chunks.items():
        a = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        u, c = np.unique(a, return_counts=True)
        parts.append((u, np.full(u.size, size, np.int64), c.astype(np.int64)))
    return _rows(parts)


def _sector_counts(s: np.ndarray, z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per label in ``range(k)``: the number of distinct 32-byte sectors touched by rows
    (sorted by start) of that label; entry ``k``: over all rows."""
    out = np.zeros(k + 1, np.int64)
    n = s.size
    if n == 0:
        return out
    first = s // SECTOR
    last = (s + z - 1) // SECTOR
    if np.array_equal(first, last):  # every access within one sector (aligned elements)
        change = np.empty(n, bool)
        change[0] = True
        np.not_equal(first[1:], first[:-1], out=change[1:])
        lab_change = np.empty(n, bool)
        lab_change[0] = True
        np.not_equal(labels[1:], labels[:-1], out=lab_change[1:])
        out[k] = np.count_nonzero(change)
        out[:k] = np.bincount(labels[change | lab_change], minlength=k)
        runs = np.bincount(labels[lab_change], minlength=k)
        scattered = np.flatnonzero(runs > 1)  # labels in several runs: count exactly
    else:
        out[k] = np.unique(np.concatenate([first, last])).size
        scattered = np.flatnonzero(np.bincount(labels, minlength=k))
    for lab in scattered:
        sel = labels == lab
        out[lab] = np.unique(np.concatenate([first[sel], last[sel]])).size
    return out


# ----------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------


class _Launch:
    """One kernel launch being recorded, then its compacted rows."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.grid = (1, 1, 1)
        self.seconds = 0.0
        self._acc: dict[tuple, tuple[dict, dict]] = {}  # grid index -> (loads, stores)
        # after finish(): per program (linear id, load rows, store rows), launch-level rows
        self.programs: list[tuple[int, tuple, tuple]] = []
        self.load_rows = self.store_rows = (_EMPTY,) * 4

    def add(self, idx, direction: int, addrs: np.ndarray, size: int) -> None:
        acc = self._acc.get(idx)
        if acc is None:
            acc = self._acc[idx] = ({}, {})
        acc[direction].setdefault(size, []).append(addrs)

    @property
    def n_programs(self) -> int:
        return int(self.grid[0] * self.grid[1] * self.grid[2])

    def finish(self) -> None:
        _, ny, nz = self.grid
        for idx, (loads, stores) in self._acc.items():
            x, y, z = (int(v) for v in idx)
            self.programs.append(((x * ny + y) * nz + z, _program_rows(loads),
                                  _program_rows(stores)))
        self._acc = {}
        self.programs.sort(key=lambda p: p[0])
        self.load_rows = _rows([p[1][:3] for p in self.programs])
        self.store_rows = _rows([p[2][:3] for p in self.programs])


class TrafficMeter:
    """Context manager that records every interpreted Triton launch inside it (see the module
    docstring); ``report(inputs=..., outputs=...)`` then classifies and sums the bytes."""

    def __init__(self) -> None:
        self.launches: list[_Launch] = []
        self._current: _Launch | None = None
        self._saved: list | None = None

    # -- patching ---------------------------------------------------------------------
    def __enter__(self) -> TrafficMeter:
        if self._saved is not None:
            raise RuntimeError("TrafficMeter is not reentrant")
        interp = _interpreter()
        builder = interp.interpreter_builder
        executor = interp.GridExecutor
        saved = [(executor, "__call__", executor.__dict__["__call__"], True)]
        for name in _BUILDER_HOOKS:
            saved.append((builder, name, builder.__dict__.get(name), name in builder.__dict__))
        self._saved = saved
        meter = self
        run_launch = executor.__call__

        def __call__(executor_self, *args, **kwargs):
            launch = _Launch(getattr(executor_self.fn, "__name__", "?"))
            outer, meter._current = meter._current, launch
            t0 = time.perf_counter()
            try:
                return run_launch(executor_self, *args, **kwargs)
            finally:
                launch.seconds = time.perf_counter() - t0
                meter._current = outer
                launch.finish()
                meter.launches.append(launch)

        load, store = builder.create_masked_load, builder.create_masked_store
        rmw, cas, set_dim = (builder.create_atomic_rmw, builder.create_atomic_cas,
                             builder.set_grid_dim)

        # only the leading arguments are read; the rest go through as given, since they
        # differ between Triton versions (3.6: other, cache_modifier, eviction_policy,
        # is_volatile; 3.9: other, cache_policy, is_volatile), positional or by keyword
        def create_masked_load(ptrs, mask, *args, **kwargs):
            meter._record(builder, ptrs, mask, (0,))
            return load(ptrs, mask, *args, **kwargs)

        def create_masked_store(ptrs, value, mask, *args, **kwargs):
            meter._record(builder, ptrs, mask, (1,))
            return store(ptrs, value, mask, *args, **kwargs)

        def create_atomic_rmw(rmw_op, ptr, val, mask, sem, scope):
            meter._record(builder, ptr, mask, (0, 1))
            return rmw(rmw_op, ptr, val, mask, sem, scope)

        def create_atomic_cas(ptr, cmp, val, sem, scope):
            meter._record(builder, ptr, None, (0, 1))
            return cas(ptr, cmp, val, sem, scope)

        def set_grid_dim(nx, ny, nz):
            if meter._current is not None:
                meter._current.grid = (int(nx), int(ny), int(nz))
            return set_dim(nx, ny, nz)

        executor.__call__ = __call__
        for name, fn in (("create_masked_load", create_masked_load),
                         ("create_masked_store", create_masked_store),
                         ("create_atomic_rmw", create_atomic_rmw),
                         ("create_atomic_cas", create_atomic_cas),
                         ("set_grid_dim", set_grid_dim)):
            setattr(builder, name, fn)
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, value, present in reversed(self._saved or []):
            if present:
                setattr(obj, name, value)
            elif name in obj.__dict__:
                delattr(obj, name)
        self._saved = None
        self._current = None

    def _record(self, builder, ptrs, mask, directions) -> None:
        launch = self._current
        if launch is None:
            return
        p = np.asarray(ptrs.data)
        if mask is None:
            addrs = p.reshape(-1)
        else:
            m = np.asarray(mask.data)
            if m.shape != p.shape:
                m = np.broadcast_to(m, p.shape)
            addrs = p[m]
        if addrs.size == 0:
            return
        addrs = addrs.astype(np.int64, copy=False)
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        idx = builder.grid_idx
        for d in directions:
            launch.add(idx, d, addrs, size)

    # -- analysis ---------------------------------------------------------------------
    def report(self, inputs: Iterable = (), outputs: Iterable = ()) -> TrafficReport:
        """Classify the recorded addresses by the named tensors and sum the bytes."""
        return TrafficReport(self.launches, list(inputs), list(outputs))


class _Classes:
    """Disjoint address intervals of the named tensors, first claim wins."""

    def __init__(self, inputs: Sequence, outputs: Sequence):
        self.names = ["scratch"]
        self.group = [2]  # index into GROUPS, per label
        self.nbytes = [0]
        pieces: list[tuple[int, int, int]] = []  # (start, end, label)
        for group, tensors, stem in ((0, inputs, "input"), (1, outputs, "output")):
            for k, t in enumerate(tensors):
                label = len(self.names)
                self.names.append(f"{stem} {k}")
                self.group.append(group)
                self.nbytes.append(int(t.numel()) * t.element_size())
                if t.numel() == 0:
                    continue
                lo = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0)
                hi = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
                todo = [(t.data_ptr() + lo * t.element_size(),
                         t.data_ptr() + (hi + 1) * t.element_size())]
                for a0, a1, _ in pieces:  # subtract what earlier tensors claimed
                    todo = [piece for b0, b1 in todo
                            for piece in ((b0, min(b1, a0)), (max(b0, a1), b1))
                            if piece[0] < piece[1]]
                pieces.extend((b0, b1, label) for b0, b1 in todo)
        pieces.sort()
        self.starts = np.array([p[0] for p in pieces], np.int64)
        self.ends = np.array([p[1] for p in pieces], np.int64)
        self.labels = np.array([p[2] for p in pieces], np.int64)
        self.group = np.array(self.group, np.int64)
        self.k = len(self.names)

    def classify(self, s: np.ndarray) -> np.ndarray:
        if self.starts.size == 0 or s.size == 0:
            return np.zeros(s.size, np.int64)
        idx = np.searchsorted(self.starts, s, side="right") - 1
        safe = np.clip(idx, 0, None)
        inside = (idx >= 0) & (s < self.ends[safe])
        return np.where(inside, self.labels[safe], 0)


def _direction(rows, cls: _Classes) -> dict:
    """Sums of one direction's rows: per label and per group, lanes, unique and sectors."""
    s, z, c, contrib = rows
    lab = cls.classify(s)
    k = cls.k
    lanes = np.bincount(lab, weights=c * z, minlength=k).astype(np.int64)
    uniq = np.bincount(lab, weights=contrib, minlength=k).astype(np.int64)
    sect = _sector_counts(s, z, lab, k) * SECTOR
    gsect = _sector_counts(s, z, cls.group[lab], len(GROUPS)) * SECTOR
    return dict(lanes=lanes, unique=uniq, sectors=sect[:k], sector_total=int(sect[k]),
                group_sectors=gsect[:len(GROUPS)])


def _by_group(values: np.ndarray, cls: _Classes) -> np.ndarray:
    return np.bincount(cls.group, weights=values, minlength=len(GROUPS)).astype(np.int64)


def _scope(ld: dict, st: dict, cls: _Classes, minimum: int) -> dict:
    """The JSON-ready summary of one scope (a launch or the call)."""
    out = {
        "loaded": int(ld["lanes"].sum()), "stored": int(st["lanes"].sum()),
        "unique_loaded": int(ld["unique"].sum()), "unique_stored": int(st["unique"].sum()),
        "sector_loaded": ld["sector_total"], "sector_stored": st["sector_total"],
    }
    out["unique"] = out["unique_loaded"] + out["unique_stored"]
    out["sector"] = out["sector_loaded"] + out["sector_stored"]
    groups = {}
    gl = (_by_group(ld["lanes"], cls), _by_group(st["lanes"], cls),
          _by_group(ld["unique"], cls), _by_group(st["unique"], cls))
    for g, name in enumerate(GROUPS):
        groups[name] = {
            "loaded": int(gl[0][g]), "stored": int(gl[1][g]),
            "unique_loaded": int(gl[2][g]), "unique_stored": int(gl[3][g]),
            "sector_loaded": int(ld["group_sectors"][g]),
            "sector_stored": int(st["group_sectors"][g]),
        }
    out["classes"] = groups
    out["tensors"] = {
        cls.names[j]: {"bytes": cls.nbytes[j],
                       "loaded": int(ld["lanes"][j]), "stored": int(st["lanes"][j]),
                       "unique_loaded": int(ld["unique"][j]),
                       "unique_stored": int(st["unique"][j]),
                       "sector_loaded": int(ld["sectors"][j]),
                       "sector_stored": int(st["sectors"][j])}
        for j in range(cls.k)
    }
    out["minimum"] = minimum
    m = max(minimum, 1)
    out["ratios"] = {
        "unique": out["unique"] / m, "sector": out["sector"] / m,
        "loaded": out["loaded"] / m, "stored": out["stored"] / m,
        "lanes": (out["loaded"] + out["stored"]) / m,
    }
    return out


class TrafficReport:
    """The bytes of a metered call, classified by its named tensors.

    ``launches``: one dict per launch (``kernel``, ``grid``, ``programs``, ``seconds``, the
    byte counts of :func:`_scope`, and ``per_program`` input statistics); ``call``: the same
    for all launches together (``launches``: their count); ``minimum``: the named tensors'
    bytes; :meth:`programs`: per-program dicts of one launch.
    """

    def __init__(self, launches: list[_Launch], inputs: list, outputs: list):
        self._launches = launches
        self.classes = _Classes(inputs, outputs)
        self.minimum = int(sum(self.classes.nbytes))
        self.input_bytes = int(sum(t.numel() * t.element_size() for t in inputs))
        self.output_bytes = self.minimum - self.input_bytes
        self.launches = []
        for launch in launches:
            d = {"kernel": launch.kernel, "grid": list(launch.grid),
                 "programs": launch.n_programs, "seconds": launch.seconds}
            d.update(_scope(_direction(launch.load_rows, self.classes),
                            _direction(launch.store_rows, self.classes),
                            self.classes, self.minimum))
            d["per_program"] = self._per_program_summary(launch)
            self.launches.append(d)
        call_ld = _rows([la.load_rows[:3] for la in launches])
        call_st = _rows([la.store_rows[:3] for la in launches])
        self.call = {"launches": len(launches),
                     "programs": sum(la.n_programs for la in launches),
                     "seconds": sum(la.seconds for la in launches)}
        self.call.update(_scope(_direction(call_ld, self.classes),
                                _direction(call_st, self.classes), self.classes, self.minimum))
        m = max(self.minimum, 1)
        for key in ("unique", "sector"):  # each address once per launch: no reuse between them
            total = sum(la[key] for la in self.launches)
            self.call[key + "_launch_sum"] = total
            self.call["ratios"][key + "_launch_sum"] = total / m

    def _program_arrays(self, launch: _Launch) -> dict[str, np.ndarray]:
        """Per program of the grid (linear index ``(x * ny + y) * nz + z``) and group:
        ``loaded``, ``stored``, ``unique_loaded``, ``unique_stored``, arrays
        ``[programs, len(GROUPS)]``."""
        p_count = launch.n_programs
        g_n = len(GROUPS)
        out = {}
        for d, key in ((1, "loaded"), (2, "stored")):
            ids, s, z, c, contrib = [], [], [], [], []
            for pid, *dirs in launch.programs:
                rows = dirs[d - 1]
                ids.append(np.full(rows[0].size, pid, np.int64))
                s.append(rows[0])
                z.append(rows[1])
                c.append(rows[2])
                contrib.append(rows[3])
            if ids:
                ids, s, z, c, contrib = (np.concatenate(v) for v in (ids, s, z, c, contrib))
                g = self.classes.group[self.classes.classify(s)]
                key_pg = ids * g_n + g
                lanes = np.bincount(key_pg, weights=c * z, minlength=p_count * g_n)
                uniq = np.bincount(key_pg, weights=contrib, minlength=p_count * g_n)
            else:
                lanes = uniq = np.zeros(p_count * g_n)
            out[key] = lanes.astype(np.int64).reshape(p_count, g_n)
            out["unique_" + key] = uniq.astype(np.int64).reshape(p_count, g_n)
        return out

    def _per_program_summary(self, launch: _Launch) -> dict:
        arr = self._program_arrays(launch)
        lanes = arr["loaded"][:, 0]
        uniq = arr["unique_loaded"][:, 0]
        total = arr["loaded"].sum(axis=1) + arr["stored"].sum(axis=1)
        n = max(launch.n_programs, 1)
        return {
            "max_input_loaded": int(lanes.max(initial=0)),
            "max_input_unique": int(uniq.max(initial=0)),
            "mean_input_loaded": float(lanes.sum() / n),
            "mean_input_unique": float(uniq.sum() / n),
            "max_lanes": int(total.max(initial=0)),
        }

    def programs(self, launch: int) -> list[dict]:
        """One dict per program of launch ``launch`` (every grid index, in the interpreter's
        order: x outermost): ``grid``, ``loaded``, ``stored``, ``unique_loaded``,
        ``unique_stored`` and, per group ``g`` in ``GROUPS``, ``g_loaded``, ``g_stored``,
        ``g_unique_loaded``, ``g_unique_stored`` (bytes)."""
        la = self._launches[launch]
        arr = self._program_arrays(la)
        _, ny, nz = la.grid
        rows = []
        for pid in range(la.n_programs):
            d = {"grid": (pid // (ny * nz), (pid // nz) % ny, pid % nz)}
            for key, a in arr.items():
                d[key] = int(a[pid].sum())
                for g, name in enumerate(GROUPS):
                    d[f"{name}_{key}"] = int(a[pid, g])
            rows.append(d)
        return rows

    def to_json(self, launch_tensors: bool = True) -> dict:
        """A JSON-ready dict; ``launch_tensors=False`` leaves out the per-tensor split of
        each launch (kept for the call)."""
        launches = self.launches if launch_tensors else [
            {k: v for k, v in la.items() if k != "tensors"} for la in self.launches]
        return {"minimum": self.minimum, "input_bytes": self.input_bytes,
                "output_bytes": self.output_bytes, "call": self.call, "launches": launches}


# ----------------------------------------------------------------------------------------
# command line: the shape table through max_fuse and max_fuse_many
# ----------------------------------------------------------------------------------------

# One real SD1.5 shape per regime, measured un-scaled: a large map at the smallest channel
# count (the statistics' share of the bytes is largest at small C) and a small map at the
# largest channel count (few sites: the fewest programs per sample).
KEEP = ((2, 320, 64, 64), (2, 1280, 8, 8))
MAX_SITES = 256  # per sample, for max_fuse shapes not in KEEP
MAX_ELEMENTS = 2**18  # per sample and input (sites x C), for max_fuse shapes not in KEEP
MANY_MAX_SITES = 64  # per sample and group, for max_fuse_many steps
QUICK_KEEP = ((2, 1280, 8, 8),)
QUICK_MAX_SITES = 64
QUICK_MAX_ELEMENTS = 2**16
QUICK_MANY_MAX_SITES = 16
# ... and the project's target workload, one SD1.5 step (13 residuals) at N = 2, merged, run
# un-scaled through max_fuse_many as well (about 70 s; not with --quick)
FULL_STEP = ("sd15_controlnet_512", 2, False)
TARGET_UNIQUE = 1.10  # the whole call: unique bytes <= 1.10 x the minimum
DTYPE = "float16"


def scale_sites(shape, channel_dim: int, max_sites: int,
                max_elements: int | None = None) -> tuple[int, ...]:
    """``shape`` with its site dims (all but the batch and the channels) halved, largest
    first, until a sample has at most ``max_sites`` sites and (if given) at most
    ``max_elements`` elements (sites x C) per input; B and C are kept."""
    shape = [int(v) for v in shape]
    cd = channel_dim % len(shape)
    site_dims = [d for d in range(1, len(shape)) if d != cd]

    def sites():
        n = 1
        for d in site_dims:
            n *= shape[d]
        return n

    def too_big():
        return sites() > max_sites or (max_elements is not None
                                       and sites() * shape[cd] > max_elements)

    while site_dims and too_big():
        d = max(site_dims, key=lambda d: (shape[d], -d))
        if shape[d] == 1:
            break
        shape[d] = (shape[d] + 1) // 2
    return tuple(shape)


def _sites(shape, channel_dim: int) -> int:
    cd = channel_dim % len(shape)
    n = 1
    for d, v in enumerate(shape):
        if d not in (0, cd):
            n *= v
    return n


def plan_cases(table: dict, n_inputs: Sequence[int], quick: bool, max_sites: int,
               max_elements: int | None, many_max_sites: int,
               cases: Sequence[str] | None = None) -> list[dict]:
    """The runs: ``max_fuse`` once per distinct table shape (named by every case it appears
    in), ``max_fuse_many`` once per case of several shapes; each for every N, merge and
    unmerge."""
    keep = QUICK_KEEP if quick else KEEP
    distinct: dict[tuple, dict] = {}
    many = []
    for name, case in table["cases"].items():
        if cases and name not in cases:
            continue
        cd = case["channel_dim"]
        for shape in case["shapes"]:
            key = (tuple(shape), cd)
            entry = distinct.setdefault(key, {"cases": [], "channel_dim": cd,
                                              "table_shape": tuple(shape)})
            if name not in entry["cases"]:
                entry["cases"].append(name)
        if len(case["shapes"]) > 1:
            many.append((name, cd, [tuple(s) for s in case["shapes"]]))
    runs = []
    modes = [(n, unmerge) for n in n_inputs for unmerge in (False, True)]
    for entry in distinct.values():
        t, cd = entry["table_shape"], entry["channel_dim"]
        shape = t if t in keep else scale_sites(t, cd, max_sites, max_elements)
        for n, unmerge in modes:
            runs.append({"op": "max_fuse", "case": ", ".join(entry["cases"]),
                         "table_shape": [list(t)], "shape": [list(shape)],
                         "channel_dim": cd, "n": n, "unmerge": unmerge})
    for name, cd, shapes in many:
        timed = [scale_sites(s, cd, many_max_sites) for s in shapes]
        if not quick and name == FULL_STEP[0] and FULL_STEP[1] in n_inputs:
            runs.append({"op": "max_fuse_many", "case": name + " (whole step)",
                         "table_shape": [list(s) for s in shapes],
                         "shape": [list(s) for s in shapes],
                         "channel_dim": cd, "n": FULL_STEP[1], "unmerge": FULL_STEP[2]})
        for n, unmerge in modes:
            runs.append({"op": "max_fuse_many", "case": name,
                         "table_shape": [list(s) for s in shapes],
                         "shape": [list(s) for s in timed],
                         "channel_dim": cd, "n": n, "unmerge": unmerge})
    return runs


def measure(run: dict, dtype: str = DTYPE) -> dict:
    """Run one planned case under the meter; the run's dict plus ``seconds`` and ``report``."""
    import torch
    from shapes import make_features

    import maxfusion_kernels as mk

    cd, n, unmerge = run["channel_dim"], run["n"], run["unmerge"]
    groups = [make_features(s, n, dtype=getattr(torch, dtype), channel_dim=cd, seed=k)
              for k, s in enumerate(run["shape"])]
    t0 = time.perf_counter()
    with TrafficMeter() as meter:
        if run["op"] == "max_fuse":
            results = [mk.max_fuse(groups[0], unmerge=unmerge, channel_dim=cd,
                                   backend="triton")]
        else:
            results = mk.max_fuse_many(groups, unmerge=unmerge, channel_dim=cd,
                                       backend="triton")
    seconds = time.perf_counter() - t0
    outputs = [o for r in results for o in (r if unmerge else [r])]
    report = meter.report(inputs=[f for g in groups for f in g], outputs=outputs)
    return dict(run, dtype=dtype, seconds=seconds, report=report.to_json(launch_tensors=False))


def measure_backward(run: dict, dtype: str = DTYPE) -> dict:
    """The backward kernels of one planned case under the meter (the forward runs outside
    it, for the decisions). Named tensors: the inputs and the output gradients (inputs of the
    backward) and the input gradients (its outputs), so the minimum is the inputs and output
    gradients read once and the input gradients written once; the saved decisions (winners,
    members), the table and the chunk statistics are scratch."""
    import torch
    from shapes import make_features

    import maxfusion_kernels as mk
    from maxfusion_kernels.ops.backward import triton_backward
    from maxfusion_kernels.options import resolve_options

    cd, n, unmerge = run["channel_dim"], run["n"], run["unmerge"]
    groups = [make_features(s, n, dtype=getattr(torch, dtype), channel_dim=cd, seed=k)
              for k, s in enumerate(run["shape"])]
    _, infos = mk.max_fuse_many(groups, unmerge=unmerge, channel_dim=cd, backend="triton",
                                return_info=True)
    winners = torch.cat([i.winner.reshape(-1) for i in infos])
    members = torch.cat([i.members.reshape(-1) for i in infos])
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(g[0].shape, generator=gen).to(g[0].dtype)
              for _ in range(n if unmerge else 1)] for g in groups]
    opt = resolve_options(groups[0], unmerge=unmerge, channel_dim=cd)
    t0 = time.perf_counter()
    with TrafficMeter() as meter:
        result = triton_backward(groups, grads, winners, members, opt)
    seconds = time.perf_counter() - t0
    report = meter.report(inputs=[f for g in groups for f in g] + [t for g in grads for t in g],
                          outputs=[t for g in result for t in g])
    return dict(run, dtype=dtype, seconds=seconds, backward=True,
                report=report.to_json(launch_tensors=False))


def _fmt_shape(shapes: list, channel_dim: int) -> str:
    if len(shapes) == 1:
        return "×".join(str(v) for v in shapes[0])
    sites = sum(_sites(s, channel_dim) for s in shapes)
    return f"{len(shapes)} groups, {sites} sites/sample"


def _fmt_launches(report: dict) -> str:
    return "<br>".join(
        f"`{la['kernel']}` {la['programs']} × {la['per_program']['max_input_loaded'] / 1024:.1f}"
        f" ({la['ratios']['unique']:.3f} / {la['ratios']['sector']:.3f})"
        for la in report["launches"])


def markdown(records: list[dict], header: str) -> str:
    lines = [header, "",
             "| op | case | table shape | measured shape | N | mode | launch: programs × largest"
             " program's input KiB (unique/min / sector/min) | unique/min | sector/min |"
             " Σ launches sector/min | loaded/min | stored/min |"
             f" unique ≤ {TARGET_UNIQUE:.2f} | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rep = r["report"]
        call = rep["call"]["ratios"]
        scaled = r["shape"] != r["table_shape"]
        lines.append(
            f"| {r['op']} | {r['case']} | {_fmt_shape(r['table_shape'], r['channel_dim'])} | "
            f"{_fmt_shape(r['shape'], r['channel_dim']) if scaled else 'same'} | {r['n']} | "
            f"{'unmerge' if r['unmerge'] else 'merge'} | {_fmt_launches(rep)} | "
            f"{call['unique']:.4f} | {call['sector']:.4f} | {call['sector_launch_sum']:.4f} | "
            f"{call['loaded']:.3f} | "
            f"{call['stored']:.3f} | {'yes' if call['unique'] <= TARGET_UNIQUE else '**no**'} | "
            f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


HEADER = """# Memory traffic of the MaxFusion kernels (Triton interpreter): {label}

{note}Measured by `python benchmarks/analysis/traffic_meter.py {argv}` ({date}; torch {torch},
triton {triton}; kernels from `{kernels}`, checkout `{commit}`), {dtype}, inputs from
`benchmarks/shapes.py:make_features` (half of the sites agree, half disagree).

Bytes are counted per kernel launch from the interpreter's loads and stores (module docstring
of `benchmarks/analysis/traffic_meter.py`). **min** = the N inputs read once + the outputs written
once (1 output merged, N unmerged). **unique**: each address once per direction (loaded + stored);
**sector**: distinct 32-byte sectors x 32, per direction; **loaded/stored**: bytes of unmasked
lanes (re-reads count again). Call ratios count each address (sector) once per call, i.e. with
perfect reuse between launches; **Σ launches sector/min** counts it once per launch (no reuse
between launches: what DRAM moves when nothing stays in L2). Per launch: its program count ×
the input KiB read (lanes) by its largest program, and its unique and sector bytes / min.
Target: the whole call's unique bytes ≤ {target:.2f} × min.

Shapes larger than the interpreter can run in reasonable time are scaled down by halving their
site dims (largest first) to at most {max_sites} sites and {max_elements} elements (sites x C)
per sample and input (`max_fuse`), or {many_max_sites} sites per sample and group
(`max_fuse_many`), keeping B and C ("measured shape");
{keep} run un-scaled (one real SD1.5 shape per regime){full_step}. `s`: interpreter seconds of
the call.
"""


def _shown_args(argv: list[str]) -> str:
    """The command line for the header, without the ``--note`` text (shown above it)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            shown.append("--note ...")
            skip = True
        elif a.startswith("--note="):
            shown.append("--note=...")
        else:
            shown.append(a)
    return " ".join(shown)


def _git_commit(path) -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    import os
    import sys
    from datetime import datetime, timezone
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1]  # benchmarks: the shape table, results/
    root = bench.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="N = 2 and smaller shapes (under a minute on 2 cores)")
    parser.add_argument("--label", default=None, help="names the output files (default: the "
                        "checkout's short commit hash)")
    parser.add_argument("--note", default="", help="a sentence for the header of the .md file")
    parser.add_argument("--out", default=None, help="output prefix, .md and .json are added "
                        "(default: benchmarks/results/traffic-<label>)")
    parser.add_argument("--n-inputs", default=None,
                        help="comma-separated N (default 2,3; --quick: 2)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default all)")
    parser.add_argument("--max-sites", type=int, default=None)
    parser.add_argument("--max-elements", type=int, default=None)
    parser.add_argument("--many-max-sites", type=int, default=None)
    parser.add_argument("--backward", action="store_true",
                        help="meter the backward kernels instead of the forward (minimum: "
                        "inputs and output gradients read once, input gradients written once)")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "1") in ("", "0"):
        parser.error("the meter needs the Triton interpreter: unset TRITON_INTERPRET or set it "
                     "to 1")
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    for p in (str(bench), str(root)):  # the shape table, and the kernels of this checkout
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch
    import triton
    from shapes import load_shapes

    import maxfusion_kernels as mk

    commit = _git_commit(root)
    label = args.label or commit
    out = Path(args.out) if args.out else bench / "results" / f"traffic-{label}"
    max_sites = args.max_sites or (QUICK_MAX_SITES if args.quick else MAX_SITES)
    max_elements = args.max_elements or (QUICK_MAX_ELEMENTS if args.quick else MAX_ELEMENTS)
    many_max = args.many_max_sites or (QUICK_MANY_MAX_SITES if args.quick else MANY_MAX_SITES)
    n_inputs = args.n_inputs or ("2" if args.quick else "2,3")
    runs = plan_cases(load_shapes(), [int(v) for v in n_inputs.split(",")], args.quick,
                      max_sites, max_elements, many_max,
                      args.cases.split(",") if args.cases else None)

    records = []
    cache: dict = {}  # scaled shapes can coincide: measure each once
    t_all = time.perf_counter()
    for run in runs:
        key = (run["op"], json.dumps(run["shape"]), run["channel_dim"], run["n"], run["unmerge"])
        if key not in cache:
            cache[key] = measure_backward(run) if args.backward else measure(run)
        rec = dict(cache[key], case=run["case"], table_shape=run["table_shape"])
        records.append(rec)
        r = rec["report"]["call"]["ratios"]
        print(f"{rec['op']:14s} {_fmt_shape(rec['shape'], rec['channel_dim']):28s} "
              f"N={rec['n']} {'unmerge' if rec['unmerge'] else 'merge  '} "
              f"unique/min {r['unique']:.4f} sector/min {r['sector']:.4f} "
              f"({rec['seconds']:.1f} s)", flush=True)
    total = time.perf_counter() - t_all

    keep = QUICK_KEEP if args.quick else KEEP
    header = HEADER.format(
        label=label, note=(args.note.strip() + "\n\n") if args.note else "",
        argv=_shown_args(sys.argv[1:] if argv is None else list(argv)),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), torch=torch.__version__,
        triton=triton.__version__,
        kernels=str(Path(mk.__file__).resolve().parent.relative_to(root))
        if Path(mk.__file__).resolve().is_relative_to(root) else mk.__file__,
        commit=commit, dtype=DTYPE, target=TARGET_UNIQUE, max_sites=max_sites,
        max_elements=max_elements, many_max_sites=many_max,
        keep=", ".join("×".join(map(str, s)) for s in keep),
        full_step="" if args.quick else ", and so does one whole SD1.5 step through "
        "`max_fuse_many` (N = 2, merge)")
    header += f"\nWhole run: {total:.0f} s on {os.cpu_count()} CPU cores.\n"
    text = markdown(records, header)
    print()
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text, encoding="utf-8")
    payload = {"label": label, "commit": commit, "note": args.note, "dtype": DTYPE,
               "max_sites": max_sites, "max_elements": max_elements,
               "many_max_sites": many_max, "seconds": total,
               "target_unique": TARGET_UNIQUE, "records": records}
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
