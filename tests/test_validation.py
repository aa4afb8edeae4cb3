"""Bad input gets a clear exception naming the argument and the problem, from every entry
point (the kernels' public function and the reference), before any kernel runs."""

from __future__ import annotations

import math

import pytest
import torch
from utils import make_features

import maxfusion_kernels as mk
from maxfusion_kernels import reference

ENTRY_POINTS = [
    pytest.param(lambda f, **kw: mk.max_fuse(f, backend="torch", **kw), id="torch"),
    pytest.param(lambda f, **kw: mk.max_fuse(f, backend="triton", **kw), id="triton"),
    pytest.param(reference.max_fuse, id="reference"),
]


def _pair(shape=(2, 4, 3, 3), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)]


BAD = [
    # (name, features builder, kwargs, exception, message fragment)
    ("one input", lambda: _pair()[:1], {}, ValueError, "at least 2"),
    ("nine inputs", lambda: _pair() * 5, {}, ValueError, "at most 8"),
    ("a tensor, not a list", lambda: torch.randn(2, 2, 4, 3), {}, TypeError, "list or tuple"),
    ("a non-tensor", lambda: [torch.randn(2, 4), "x"], {}, TypeError, r"features\[1\]"),
    ("shapes differ", lambda: [torch.randn(2, 4, 3), torch.randn(2, 4, 5)], {}, ValueError,
     "same shape"),
    ("dtypes differ", lambda: [torch.randn(2, 4, 3), torch.randn(2, 4, 3).half()], {},
     ValueError, "same dtype"),
    ("integer dtype", lambda: [torch.ones(2, 4, 3, dtype=torch.int32)] * 2, {}, TypeError,
     "floating dtype"),
    ("one channel", lambda: _pair((2, 1, 3, 3)), {}, ValueError, "at least 2 channels"),
    ("one dim", lambda: [torch.randn(4), torch.randn(4)], {}, ValueError, "batch and a channel"),
    ("channel_dim out of range", _pair, dict(channel_dim=4), ValueError, "out of range"),
    ("channel_dim is the batch", _pair, dict(channel_dim=0), ValueError, "batch"),
    ("channel_dim not an int", _pair, dict(channel_dim=1.0), TypeError, "channel_dim"),
    ("threshold above 1", _pair, dict(threshold=1.5), ValueError, "threshold"),
    ("threshold NaN", _pair, dict(threshold=math.nan), ValueError, "threshold"),
    ("threshold a string", _pair, dict(threshold="0.7"), TypeError, "threshold"),
    ("weights too short", _pair, dict(weights=[1.0]), ValueError, "weights has 1"),
    ("weight negative", _pair, dict(weights=[1.0, -0.5]), ValueError, r"weights\[1\]"),
    ("weight infinite", _pair, dict(weights=[math.inf, 1.0]), ValueError, r"weights\[0\]"),
    ("unknown preset", _pair, dict(preset="fast"), ValueError, "preset"),
    ("unknown correlation", _pair, dict(correlation="spearman"), ValueError, "correlation"),
    ("unknown saliency", _pair, dict(saliency="mean"), ValueError, "saliency"),
    ("unknown normalize", _pair, dict(normalize="global"), ValueError, "normalize"),
    ("unmerge not a bool", _pair, dict(unmerge=1), TypeError, "unmerge"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_named(entry, case):
    _, build, kwargs, exc, fragment = case
    with pytest.raises(exc, match=fragment):
        entry(build(), **kwargs)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        mk.max_fuse(_pair(), backend="cuda")


def test_devices_differ():
    meta = torch.empty(2, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        mk.max_fuse([torch.randn(2, 4, 3, 3), meta])


def test_weights_as_tensor_are_accepted():
    feats = _pair()
    a = mk.max_fuse(feats, weights=torch.tensor([1.0, 0.5]), backend="torch")
    b = mk.max_fuse(feats, weights=[1.0, 0.5], backend="torch")
    assert torch.equal(a, b)


def test_torch_path_builds_no_tensor_from_host_data(monkeypatch):
    """The torch path makes no host-to-device copy (it could not be captured in a CUDA graph
    on a GPU): no tensor is built from Python data during a call, weights included."""
    from maxfusion_kernels.options import resolve_options
    from maxfusion_kernels.torch_backend import fuse_torch

    feats = make_features((2, 6, 4, 4), 3, seed=3)
    opt = resolve_options(feats, weights=[1.0, 0.0, 0.5], preset="reference", unmerge=True)
    masks = [None, torch.full((1, 4, 4), 0.5), None]

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was built from host data")

    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", refuse)
    outs, winner, members = fuse_torch(feats, opt, True, masks=masks)
    assert len(outs) == 3 and winner.shape == (2, 4, 4)
    assert not members[1].any()  # weight 0: never a member
