"""Results must not depend on the order in which a launch's programs run, nor on what
``torch.empty`` buffers hold before the kernels write them.

The Triton interpreter runs a launch's programs one after the other in grid order; a GPU runs
them in any order and concurrently, and ``torch.empty`` returns whatever was in memory. Every
kernel variant reachable through the public API (``max_fuse`` and ``max_fuse_many`` with the
Triton backend: merge and unmerge, with and without info, N = 2, 3 and 5, both presets and the
batch normaliser, weights with a 0, four layouts, three dtypes) is run in grid order, then with
the grid walked in reverse and in two shuffled orders, each time with every ``torch.empty``
buffer pre-filled with NaN/inf/garbage (``program_order.py``), and must give bitwise the same
outputs and info. The test knows nothing of the kernels' names, arguments or launch count; it
only checks that every launch has more than one program (else the order cannot matter).

Negative controls prove the tools bite: an order-dependent kernel gives another result under
``walk_grid("reverse")``, and a kernel reading an unwritten ``torch.empty`` buffer sees NaN under
``garbage_buffers``.
"""

from __future__ import annotations

import os

import pytest
import torch
from program_order import garbage_buffers, walk_grid
from utils import make_features

import maxfusion_kernels as mk

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="walks the grid of the Triton interpreter (TRITON_INTERPRET=1)",
)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    import triton
    import triton.language as tl

    @triton.jit
    def _ticket_kernel(counter_ptr, out_ptr):
        """Each program takes the next ticket and writes it at its own linear index."""
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        ticket = tl.atomic_add(counter_ptr, 1)
        tl.store(out_ptr + pid, ticket)

    @triton.jit
    def _chain_kernel(x_ptr, out_ptr):
        """Order-dependent on purpose: program i reads what program i - 1 wrote."""
        i = tl.program_id(0)
        prev = tl.load(out_ptr + i - 1, mask=i > 0, other=0.0)
        tl.store(out_ptr + i, prev + tl.load(x_ptr + i))

    @triton.jit
    def _copy_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


ORDERS = [("reverse", 1), (("shuffle", 7), 2), (("shuffle", 8), 3)]  # (walk, garbage seed)


# ----------------------------------------------------------------------------------------
# the kernel variants
# ----------------------------------------------------------------------------------------

# Shapes: 256 sites per sample (2 to 8 blocks of sites per sample, B = 2), few channels so
# the interpreter is quick; every launch has several programs (checked).
def _layout(name: str, n: int, dtype, seed: int):
    if name == "nchw":  # sites contiguous
        return make_features([2, 4, 16, 16], n, dtype=dtype, seed=seed), 1
    if name == "tokens":  # [B, L, C], channels contiguous
        return make_features([2, 256, 8], n, dtype=dtype, channel_dim=-1, seed=seed), -1
    if name == "strided":  # a view needing two site runs (outer stride 32, inner stride 2)
        base = make_features([2, 4, 16, 32], n, dtype=dtype, seed=seed)
        return [f[..., ::2] for f in base], 1
    if name == "channels_last":  # NHWC memory: channels contiguous, channel_dim 1
        base = make_features([2, 8, 16, 16], n, dtype=dtype, seed=seed)
        return [f.contiguous(memory_format=torch.channels_last) for f in base], 1
    raise ValueError(name)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FUSE_CASES = []
for _lay, _dt in (("nchw", F32), ("tokens", F16), ("strided", F32), ("channels_last", F16)):
    for _n in (2, 3):
        for _unmerge in (False, True):
            FUSE_CASES.append(dict(layout=_lay, n=_n, dtype=_dt, unmerge=_unmerge, info=True))
for _n in (2, 3):  # info off: the kernels' other branch
    for _unmerge in (False, True):
        FUSE_CASES.append(dict(layout="nchw", n=_n, dtype=F32, unmerge=_unmerge, info=False))
FUSE_CASES += [
    dict(layout="nchw", n=2, dtype=F32, unmerge=False, info=True, preset="reference"),
    dict(layout="tokens", n=3, dtype=F16, unmerge=True, info=True, preset="reference"),
    dict(layout="nchw", n=3, dtype=F32, unmerge=False, info=True, normalize="batch"),
    dict(layout="nchw", n=3, dtype=F32, unmerge=False, info=True, weights=(1.0, 0.0, 0.5)),
    dict(layout="nchw", n=3, dtype=F32, unmerge=True, info=True, weights=(1.0, 0.0, 0.5)),
    dict(layout="nchw", n=5, dtype=F32, unmerge=False, info=True),
    dict(layout="nchw", n=2, dtype=BF16, unmerge=True, info=True),
]


def _case_id(c: dict) -> str:
    parts = [c["layout"], f"n{c['n']}", str(c["dtype"]).replace("torch.", ""),
             "unmerge" if c["unmerge"] else "merge", "info" if c["info"] else "noinfo"]
    parts += [f"{k}={c[k]}" for k in ("preset", "normalize", "weights") if k in c]
    return "-".join(parts)


def _flat(result, info, unmerge: bool) -> list[torch.Tensor]:
    outs = list(result) if unmerge else [result]
    if info is not None:
        outs += [info.winner, info.members]
    return outs


def _fuse_runner(c: dict):
    feats, cd = _layout(c["layout"], c["n"], c["dtype"], seed=3)
    kw = {k: c[k] for k in ("preset", "normalize", "weights") if k in c}

    def run():
        res = mk.max_fuse(feats, unmerge=c["unmerge"], return_info=c["info"], channel_dim=cd,
                          backend="triton", **kw)
        result, info = res if c["info"] else (res, None)
        return _flat(result, info, c["unmerge"])

    return run


# max_fuse_many: groups of different shapes (and layouts) in one call
def _many_groups(kind: str, n: int, dtype):
    if kind == "maps":
        shapes = ([2, 4, 16, 16], [2, 8, 8, 8], [1, 16, 4, 8])
        return [make_features(s, n, dtype=dtype, seed=k) for k, s in enumerate(shapes)], 1
    if kind == "tokens":
        shapes = ([2, 128, 8], [2, 64, 16])
        return [make_features(s, n, dtype=dtype, channel_dim=-1, seed=k)
                for k, s in enumerate(shapes)], -1
    if kind == "mixed":  # a contiguous, a strided and a channels-last group
        a = make_features([2, 4, 16, 16], n, dtype=dtype, seed=0)
        b = [f[..., ::2] for f in make_features([2, 4, 8, 16], n, dtype=dtype, seed=1)]
        c = [f.contiguous(memory_format=torch.channels_last)
             for f in make_features([2, 8, 8, 8], n, dtype=dtype, seed=2)]
        return [a, b, c], 1
    raise ValueError(kind)


MANY_CASES = [
    dict(groups="maps", n=2, dtype=F32, unmerge=False, info=True),
    dict(groups="maps", n=3, dtype=F16, unmerge=True, info=True),
    dict(groups="maps", n=2, dtype=F32, unmerge=True, info=False),
    dict(groups="maps", n=3, dtype=F32, unmerge=False, info=True, preset="reference"),
    dict(groups="maps", n=3, dtype=F32, unmerge=True, info=True, weights=(0.5, 0.0, 1.0)),
    dict(groups="tokens", n=2, dtype=F16, unmerge=True, info=True),
    dict(groups="mixed", n=2, dtype=F32, unmerge=False, info=True, normalize="batch"),
]


def _many_id(c: dict) -> str:
    return _case_id(dict(c, layout=c["groups"]))


def _many_runner(c: dict):
    groups, cd = _many_groups(c["groups"], c["n"], c["dtype"])
    kw = {k: c[k] for k in ("preset", "normalize", "weights") if k in c}

    def run():
        res = mk.max_fuse_many(groups, unmerge=c["unmerge"], return_info=c["info"],
                               channel_dim=cd, backend="triton", **kw)
        results, infos = res if c["info"] else (res, [None] * len(groups))
        return [t for r, i in zip(results, infos) for t in _flat(r, i, c["unmerge"])]

    return run


def _check_order_independent(run) -> None:
    with garbage_buffers(seed=0) as filled, walk_grid("forward") as launches:
        ref = run()
    assert filled, "garbage_buffers saw no torch.empty: the test would prove nothing"
    assert launches, "no interpreted launch"
    for la in launches:  # one program per launch would make the order irrelevant
        grid = la["grid"]
        assert grid[0] * grid[1] * grid[2] > 1, f"a launch with grid {grid}"
    for t in ref:
        if t.is_floating_point():
            assert torch.isfinite(t).all(), "non-finite output from finite inputs"
    for order, seed in ORDERS:
        with garbage_buffers(seed=seed), walk_grid(order) as walked:
            got = run()
        assert [la["grid"] for la in walked] == [la["grid"] for la in launches]
        assert len(got) == len(ref)
        for k, (a, b) in enumerate(zip(got, ref)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), f"result {k} differs with the grid walked {order}"


@pytest.mark.parametrize("case", FUSE_CASES, ids=_case_id)
def test_max_fuse_program_order(case):
    _check_order_independent(_fuse_runner(case))


@pytest.mark.parametrize("case", MANY_CASES, ids=_many_id)
def test_max_fuse_many_program_order(case):
    _check_order_independent(_many_runner(case))


# ----------------------------------------------------------------------------------------
# negative controls: the tools change what they claim to change, and restore everything
# ----------------------------------------------------------------------------------------


def _ticket_order(order, grid=(3, 4)) -> torch.Tensor:
    counter = torch.zeros(1, dtype=torch.int32)
    out = torch.full((grid[0] * grid[1],), -1, dtype=torch.int32)
    with walk_grid(order) as launches:
        _ticket_kernel[grid](counter, out)
    assert [la["grid"] for la in launches] == [(grid[0], grid[1], 1)]
    return out


def test_walk_grid_runs_each_program_once_in_the_given_order():
    n = 12
    assert torch.equal(_ticket_order("forward"), torch.arange(n, dtype=torch.int32))
    # out[pid] = the rank at which program pid ran: reversed, then permutations
    assert torch.equal(_ticket_order("reverse"), torch.arange(n - 1, -1, -1, dtype=torch.int32))
    a, b = _ticket_order(("shuffle", 7)), _ticket_order(("shuffle", 8))
    for perm in (a, b):
        assert torch.equal(perm.sort().values, torch.arange(n, dtype=torch.int32))
        assert not torch.equal(perm, torch.arange(n, dtype=torch.int32))
    assert not torch.equal(a, b)
    assert torch.equal(_ticket_order(("shuffle", 7)), a)  # seeded: reproducible


def test_walk_grid_catches_an_order_dependent_kernel():
    x = torch.arange(1, 9, dtype=torch.float32)
    results = {}
    for order in ("forward", "reverse", ("shuffle", 7)):
        out = torch.zeros(8)
        with walk_grid(order):
            _chain_kernel[(8,)](x, out)
        results[str(order)] = out
    assert torch.equal(results["forward"], torch.cumsum(x, 0))
    assert not torch.equal(results["reverse"], results["forward"])
    assert not torch.equal(results[str(("shuffle", 7))], results["forward"])


def test_garbage_buffers_catch_a_read_of_unwritten_memory():
    like = torch.zeros(4, 16)
    with garbage_buffers(seed=0) as filled:
        bufs = [torch.empty(64), torch.empty_like(like), like.new_empty((64,)),
                torch.empty_strided((8, 8), (1, 8))]
        ints = torch.empty(256, dtype=torch.int32)
        flags = torch.empty(256, dtype=torch.bool)
    assert len(filled) == 6
    for buf in bufs:
        src = buf.reshape(-1) if buf.is_contiguous() else buf.contiguous().reshape(-1)
        out = torch.zeros(64)
        _copy_kernel[(2,)](src, out, 64, BLOCK=32)
        assert torch.isnan(out).any(), "a read of an unwritten buffer went unnoticed"
    assert (ints != 0).any() and flags.any() and not flags.all()


def test_tools_restore_everything():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    before_builder = dict(vars(builder))
    before_torch = (torch.empty, torch.empty_like, torch.empty_strided,
                    torch.Tensor.__dict__.get("new_empty"))
    with garbage_buffers(seed=1), walk_grid("reverse"), walk_grid(("shuffle", 3)):
        assert torch.empty is not before_torch[0]
    assert vars(builder).keys() == before_builder.keys()
    for key, value in before_builder.items():
        assert vars(builder)[key] is value or key in ("grid_idx", "grid_dim")
    after_torch = (torch.empty, torch.empty_like, torch.empty_strided,
                   torch.Tensor.__dict__.get("new_empty"))
    assert all(a is b for a, b in zip(after_torch, before_torch))
    # and a plain launch runs in grid order again
    counter = torch.zeros(1, dtype=torch.int32)
    out = torch.full((12,), -1, dtype=torch.int32)
    _ticket_kernel[(3, 4)](counter, out)
    assert torch.equal(out, torch.arange(12, dtype=torch.int32))
