"""Triton's interpreter where it cannot run the kernels (``maxfusion_kernels/ops/interpret.py``):
Triton 3.6's interpreter with NumPy >= 2.4 fails every launch (a loop bound loaded from memory
is converted with ``int()`` of a one-element array; triton-lang/triton#9171). The backend
choice then raises a clear error; the probe that finds out agrees with the kernels."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, make_features

import maxfusion_kernels as mk
from maxfusion_kernels.ops import interpret
from maxfusion_kernels.ops.launch import fuse_groups
from maxfusion_kernels.options import resolve_options

REASON = "Triton 3.6.0's interpreter cannot run the kernels with NumPy 2.4.6: (a test)"


def test_a_broken_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(interpret, "interpreter_problem", lambda: REASON)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    for backend in ("auto", "triton"):
        with pytest.raises(RuntimeError, match="cannot run the kernels with NumPy"):
            mk.choose_backend(cpu, backend)
    feats = make_features((1, 4, 3, 3), 2)
    with pytest.raises(RuntimeError, match="cannot run the kernels with NumPy"):
        mk.max_fuse(feats)
    with pytest.raises(RuntimeError, match="cannot run the kernels with NumPy"):
        mk.max_fuse_many([feats])
    # the torch path and CUDA tensors (compiled kernels, no interpreter) are not affected
    assert mk.choose_backend(cpu, "torch") == "torch"
    assert mk.max_fuse(feats, backend="torch").shape == feats[0].shape
    assert mk.choose_backend(torch.device("cuda"), "auto") == "triton"


def test_info_says_why_cpu_tensors_have_no_backend(monkeypatch):
    from maxfusion_hooks.cli.commands import backend_report

    monkeypatch.setattr(interpret, "interpreter_problem", lambda: REASON)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = backend_report()
    assert rows[0] == ("cpu", None, f"no backend: {REASON}")
    assert [r[0] for r in rows] == ["cpu", "cuda"]


def test_without_the_interpreter_there_is_no_probe(monkeypatch):
    def probe():
        raise AssertionError("the probe ran")

    monkeypatch.setattr(interpret, "interpreter_problem", probe)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert mk.choose_backend(torch.device("cpu"), "auto") == "torch"


def test_the_probe_agrees_with_the_kernels():
    """In this environment: where the probe finds no problem the kernels run in the
    interpreter and match the torch path; where it finds one, the kernels fail as it says.
    Where kernels are compiled, not interpreted (a GPU machine), there is nothing to probe."""
    problem = interpret.interpreter_problem()
    if not interpret._interpreting():
        assert problem is None
        return
    feats = make_features((2, 8, 5, 5), 2, seed=1)
    opt = resolve_options(feats)
    if problem is None:
        outs, _, _ = fuse_groups([feats], opt, False)
        expected = mk.max_fuse(feats, backend="torch")
        assert_close(outs[0][0], expected.double(), torch.float32)
    else:
        import triton

        assert f"Triton {triton.__version__}'s interpreter" in problem
        assert "0-dimensional" in problem
        with pytest.raises(Exception, match="0-dimensional"):
            fuse_groups([feats], opt, False)
