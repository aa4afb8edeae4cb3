"""The launcher's host side (``maxfusion_kernels/ops/launch.py``), on CPU: the launches happen
on the inputs' device (a device guard around them), the per-group table cache keeps every table
a CUDA graph capture used, and the layout and alignment decisions."""

from __future__ import annotations

import contextlib

import pytest
import torch
from utils import make_features

import maxfusion_kernels as mk
from maxfusion_kernels.ops import launch
from maxfusion_kernels.ops import plan as P


def test_launches_run_under_the_inputs_device_guard(monkeypatch, device):
    events = []

    @contextlib.contextmanager
    def guard(dev):
        events.append(("enter", dev))
        yield
        events.append(("exit", dev))

    real_launch = launch._Kernel.launch

    def recording_launch(self, args, dev, direct):
        events.append(("launch", self.kernel))
        real_launch(self, args, dev, direct)

    monkeypatch.setattr(launch, "_device_guard", guard)
    monkeypatch.setattr(launch._Kernel, "launch", recording_launch)
    feats = make_features((2, 8, 5, 5), 2, device=device)
    mk.max_fuse(feats, backend="triton")
    assert [e[0] for e in events] == ["enter", "launch", "launch", "launch", "exit"]
    assert events[0][1] == feats[0].device


def test_device_guard_is_a_cuda_device_context_for_cuda_tensors():
    # what the guard is on a GPU (the device context is created, not entered: no CUDA here)
    assert isinstance(launch._device_guard(torch.device("cuda", 1)), torch.cuda.device)
    assert isinstance(launch._device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_table_cache_keeps_captured_tables(monkeypatch):
    cache = launch._TableCache(limit=3)
    capturing = {"now": True}
    monkeypatch.setattr(launch, "_capturing", lambda dev: capturing["now"])
    cpu = torch.device("cpu")
    captured = [cache.get([[k, 1, 2]], cpu) for k in range(2)]  # used inside a capture
    capturing["now"] = False
    for k in range(2, 12):
        cache.get([[k, 1, 2]], cpu)
    keys = [key[1][0][0] for key in cache.entries]
    assert keys[:2] == [0, 1], "tables used in a capture are never evicted"
    assert len(cache.entries) == 3
    assert keys[-1] == 11
    # the same content gives the very same tensor (no new upload)
    assert cache.get([[0, 1, 2]], cpu) is captured[0]
    assert torch.equal(captured[1], torch.tensor([[1, 1, 2]]))


def test_backward_tables_used_in_a_capture_are_kept(monkeypatch):
    """The backward kernels' table (``ops/backward.py``, the forward's plan at twice the
    element size: another table) goes through the same cache: a backward run while a CUDA
    graph is captured marks its table captured, and later backwards of other shapes, more than
    the cache holds, never evict it (the graph replays its address)."""
    from maxfusion_kernels.ops import backward as B

    cache = launch._TableCache(limit=2)
    monkeypatch.setattr(B, "TABLES", cache)
    capturing = {"now": False}
    monkeypatch.setattr(launch, "_capturing", lambda dev: capturing["now"])

    def fwd_bwd(shape, seed):
        feats = [f.requires_grad_() for f in make_features(shape, 2, seed=seed)]
        out = mk.max_fuse(feats, backend="triton", unmerge=True)
        capturing["now"] = seed == 0  # only the first backward is "inside a capture"
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
        capturing["now"] = False
        assert all(f.grad is not None and bool(f.grad.isfinite().all()) for f in feats)

    fwd_bwd((1, 4, 3, 3), seed=0)
    assert len(cache.captured) == 1, "the backward's table was not fetched through the cache"
    (key,) = cache.captured
    table = cache.entries[key][0]
    for k in range(1, 6):
        fwd_bwd((1, 4, 3, 3 + k), seed=k)
    assert list(cache.entries)[0] == key and cache.entries[key][0] is table
    assert len(cache.entries) == 2 and len(cache.captured) == 1


@pytest.mark.parametrize(
    "make, kind, channels_fast",
    [
        (lambda: torch.empty(2, 8, 4, 6), P.SITES_CONTIG, False),  # NCHW
        (lambda: torch.empty(2, 10, 8), P.CHANNELS_CONTIG, True),  # tokens, channel_dim=-1
        (lambda: torch.empty(2, 8, 4, 6).contiguous(memory_format=torch.channels_last),
         P.CHANNELS_CONTIG, True),
        (lambda: torch.empty(2, 8, 4, 12)[..., ::2], P.GENERIC, False),  # two site runs
        (lambda: torch.empty(2, 16, 1)[:, ::2], P.GENERIC, False),  # one site, channel stride 2
    ],
)
def test_layout_kinds(make, kind, channels_fast):
    x = make()
    cd = 2 if x.dim() == 3 and kind == P.CHANNELS_CONTIG else 1
    prep = launch.prepare([[x, x]], 1, cd)  # the same view twice: read in place
    lay = prep.groups[0][2]
    assert launch.layout_kind(lay) == kind
    assert (lay.in_strides[1] == 1) == channels_fast


def test_alignment_rules():
    x = torch.empty(2, 8, 4, 4, dtype=torch.float16)  # 16 sites: multiples of 8 halves
    lay = launch.prepare([[x, x]], 1, 1).groups[0][2]
    assert launch.is_aligned(P.SITES_CONTIG, lay, [x], 2)
    odd = torch.empty(2, 8, 3, 5, dtype=torch.float16)  # 15 sites: a row is not 16-byte long
    lay_odd = launch.prepare([[odd, odd]], 1, 1).groups[0][2]
    assert not launch.is_aligned(P.SITES_CONTIG, lay_odd, [odd], 2)
    shifted = torch.empty(2 * 8 * 16 + 1, dtype=torch.float16)[1:].view(2, 8, 4, 4)
    assert not launch.is_aligned(P.SITES_CONTIG, lay, [shifted], 2)  # starts 2 bytes in
    assert not launch.is_aligned(P.GENERIC, lay, [x], 2)


def _shifted(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (same shape and strides) starting 2 bytes past a 16-byte boundary."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    return out.copy_(t)


@pytest.mark.parametrize("where", ["none", "input", "grad", "odd"])
def test_backward_takes_the_forwards_aligned_variant(monkeypatch, where):
    """The backward kernels get the forward's choice of variant (``launch.is_aligned``, with
    the output gradients' pointers checked too): ``ALIGNED`` with 16-byte vectors (VEC = 8
    halves) for aligned fp16 maps; the plain variant where an input or an output gradient
    starts 2 bytes past a 16-byte boundary or a row of sites is not a multiple of 16 bytes.
    Both variants give the same gradients."""
    from maxfusion_kernels.ops import backward as B
    from maxfusion_kernels.ops import backward_kernels as BK
    from maxfusion_kernels.options import resolve_options

    seen = []

    class Spy:
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append((kw["ALIGNED"], kw["VEC"]))
                return self.real[grid](*args, **kw)
            return run

    monkeypatch.setattr(BK, "bwd_stats_kernel", Spy(BK.bwd_stats_kernel))
    monkeypatch.setattr(BK, "bwd_write_kernel", Spy(BK.bwd_write_kernel))
    shape = (2, 8, 3, 5) if where == "odd" else (2, 8, 4, 4)
    g = torch.Generator().manual_seed(0)
    feats = [(torch.randn(shape, generator=g) * (1 + i)).half() for i in range(2)]
    grads = [torch.randn(shape, generator=g).half() for _ in range(2)]
    _, info = mk.max_fuse(feats, unmerge=True, return_info=True, backend="triton")
    w, m = info.winner.reshape(-1), info.members.reshape(-1)
    opt = resolve_options(feats, unmerge=True)
    plain = B.triton_backward([feats], [grads], w, m, opt)[0]
    if where == "input":
        feats = [_shifted(f) for f in feats]
    elif where == "grad":
        grads = [grads[0], _shifted(grads[1])]
    seen.clear()
    got = B.triton_backward([feats], [grads], w, m, opt)[0]
    assert seen == [(where == "none", 8)] * 2
    for a, b in zip(got, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first", ["misaligned", "aligned"])
def test_each_call_checks_its_own_pointers(monkeypatch, first):
    """The variant follows each call's pointers, not the first call's: a call whose plan was
    cached by a call on inputs 2 bytes past a 16-byte boundary still gets the ALIGNED kernels
    (16-byte vectors) when its own inputs are aligned, and the other way round; both give the
    same result. (The plan used to fix the variant from the first call's pointers, so an
    aligned call after a misaligned one of the same signature ran one-element loads.)"""
    from collections import OrderedDict

    seen = []
    real = launch._Kernel.launch

    def spy(self, args, device, direct):
        if "ALIGNED" in self.consts:
            seen.append(self.consts["ALIGNED"])
        return real(self, args, device, direct)

    monkeypatch.setattr(launch._Kernel, "launch", spy)
    monkeypatch.setattr(launch, "_CALLS", OrderedDict())  # this test's own plans
    g = torch.Generator().manual_seed(3)
    aligned = [(torch.randn((1, 8, 4, 6), generator=g) * (1 + i)).half() for i in range(2)]
    shifted = [_shifted(f) for f in aligned]
    order = [shifted, aligned] if first == "misaligned" else [aligned, shifted]
    outs = []
    for feats in order * 2:  # the second round runs on the cached plan
        seen.clear()
        outs.append(mk.max_fuse(feats, backend="triton"))
        assert seen == [feats is aligned] * 2  # pass 1 and pass 3
    assert all(torch.equal(o, outs[0]) for o in outs)
