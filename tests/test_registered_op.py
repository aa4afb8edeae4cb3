"""The registered op: torch.library.opcheck, torch.compile(fullgraph=True) on CPU (and on CUDA
where there is one), and the backend choice."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, make_features

import maxfusion_kernels as mk


def _op_args(feats, *, unmerge=False, pearson=False, info=True, use_triton=True):
    n = len(feats)
    # the last argument: the process group's name, "" for none (tests/test_distributed.py)
    return (feats, 0.7, unmerge, pearson, pearson, pearson, [1.0] * n, 1, info, use_triton, [],
            "")


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_opcheck(use_triton, unmerge, device):
    feats = make_features((2, 6, 4, 5), 3, seed=0, device=device)
    torch.library.opcheck(
        torch.ops.maxfusion.max_fuse.default,
        _op_args(feats, unmerge=unmerge, pearson=unmerge, use_triton=use_triton),
    )


def _fused(feats):
    out, info = mk.max_fuse(feats, unmerge=False, return_info=True)
    return out * 2.0, info.winner, info.members


@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_compile_fullgraph(unmerge, device):
    """No graph break: the op is one node; on CPU its torch implementation is traced inside."""
    torch._dynamo.reset()

    def f(a, b, c):
        res = mk.max_fuse([a, b, c], unmerge=unmerge, preset="reference")
        return [r + 1.0 for r in res] if unmerge else res + 1.0

    feats = make_features((2, 8, 6, 6), 3, seed=1, device=device)
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(*feats)
    want = f(*feats)
    for g, w in zip(got if unmerge else [got], want if unmerge else [want]):
        assert_close(g, w.double(), torch.float32)
    # a second shape goes through the same compiled function (recompiles, no break)
    feats2 = make_features((1, 8, 3, 5), 3, seed=2, device=device)
    got2 = compiled(*feats2)
    want2 = f(*feats2)
    for g, w in zip(got2 if unmerge else [got2], want2 if unmerge else [want2]):
        assert_close(g, w.double(), torch.float32)


def test_compile_fullgraph_with_info(device):
    torch._dynamo.reset()
    feats = make_features((2, 8, 5, 5), 2, seed=3, device=device)
    compiled = torch.compile(_fused, fullgraph=True)
    out, winner, members = compiled(feats)
    out_e, winner_e, members_e = _fused(feats)
    assert_close(out, out_e.double(), torch.float32)
    assert torch.equal(winner, winner_e) and torch.equal(members, members_e)


def test_choose_backend():
    cpu = torch.device("cpu")
    assert mk.choose_backend(cpu, "torch") == "torch"
    # conftest runs the CPU suite with TRITON_INTERPRET=1
    assert mk.choose_backend(cpu, "auto") == "triton"
    assert mk.choose_backend(torch.device("cuda"), "auto") == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.choose_backend(cpu, "cuda")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    feats = make_features((1, 4, 3, 3), 2)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mk.max_fuse(feats, backend="triton")
    assert mk.choose_backend(torch.device("cpu"), "auto") == "torch"
    out = mk.max_fuse(feats)  # auto falls back to the torch path
    assert out.shape == feats[0].shape
