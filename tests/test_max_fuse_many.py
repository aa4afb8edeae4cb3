"""max_fuse_many: many groups (shapes differ between groups) in three launches; each group's
result is that of the float64 reference for the group alone."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, compare_with_reference, make_features

import maxfusion_kernels as mk
from maxfusion_kernels.ops import kernels

BACKENDS = ["triton", "torch"]

# an SD1.5 ControlNet step shrunk for the interpreter: channels / 40, maps / 8 (13 residuals)
SD15_SMALL = [(2, 8, 8, 8)] * 3 + [(2, 8, 4, 4)] + [(2, 16, 4, 4)] * 2 + [(2, 16, 2, 2)] + \
    [(2, 32, 2, 2)] * 2 + [(2, 32, 1, 1)] * 4


def _groups(shapes, n, dtype=torch.float32, device="cpu"):
    return [make_features(s, n, dtype=dtype, seed=k, device=device) for k, s in enumerate(shapes)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("preset", ["paper", "reference"])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_groups_match_reference(backend, n, preset, unmerge, dtype, device):
    # groups of different channel counts, site counts and batch sizes in one call
    shapes = [(2, 6, 5, 7), (1, 12, 3, 3), (3, 4, 9), (2, 8, 2, 2, 3)]
    groups = _groups(shapes, n, dtype, device)
    results, infos = mk.max_fuse_many(groups, preset=preset, unmerge=unmerge,
                                      return_info=True, backend=backend)
    assert len(results) == len(infos) == len(groups)
    for grp, res, info in zip(groups, results, infos):
        compare_with_reference(grp, res, info, preset=preset, unmerge=unmerge)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_and_strided_groups(backend, device):
    # channels-last tokens and a strided view (two site runs) next to a contiguous map
    base = make_features((2, 6, 8, 10), 2, seed=3, device=device)
    strided = [f[:, :, :, ::2] for f in base]
    tokens = [f.flatten(2).transpose(1, 2).contiguous() for f in base]
    contiguous = make_features((2, 6, 4, 4), 2, seed=4, device=device)
    res = mk.max_fuse_many([strided, contiguous], backend=backend)
    for grp, r in zip([strided, contiguous], res):
        assert_close(r, mk.max_fuse(grp, backend="torch").double(), torch.float32)
    (tok,) = mk.max_fuse_many([tokens], channel_dim=-1, backend=backend)
    assert_close(tok, mk.max_fuse(tokens, channel_dim=-1, backend="torch").double(),
                 torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_sd15_step_equals_one_call_per_residual(backend, unmerge, device):
    groups = _groups(SD15_SMALL, 2, device=device)
    many = mk.max_fuse_many(groups, unmerge=unmerge, weights=[1.0, 0.7], backend=backend)
    for grp, got in zip(groups, many):
        one = mk.max_fuse(grp, unmerge=unmerge, weights=[1.0, 0.7], backend=backend)
        for a, b in zip(got if unmerge else [got], one if unmerge else [one]):
            # bitwise: a group's tiles do not depend on the other groups of the call
            assert torch.equal(a, b)


class _CountingKernel:
    """Stands in for a Triton kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("n_groups", [1, 13])
def test_three_launches_whatever_the_number_of_groups(n_groups, monkeypatch, device):
    counters = {}
    for name in ("stats_kernel", "combine_kernel", "write_kernel"):
        counters[name] = _CountingKernel(getattr(kernels, name))
        monkeypatch.setattr(kernels, name, counters[name])
    groups = _groups(SD15_SMALL[:n_groups], 2, device=device)
    mk.max_fuse_many(groups, backend="triton")
    assert [c.launches for c in counters.values()] == [1, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend, device):
    assert mk.max_fuse_many([], backend=backend) == []
    # a group with no sites next to a real one: only the real one is launched
    groups = [[torch.randn(0, 4, 3, device=device)] * 2, make_features((2, 4, 3), 2, device=device)]
    res, infos = mk.max_fuse_many(groups, return_info=True, backend=backend)
    assert res[0].shape == (0, 4, 3) and infos[0].winner.shape == (0, 3)
    assert_close(res[1], mk.max_fuse(groups[1], backend="torch").double(), torch.float32)


def test_bad_groups():
    a = make_features((2, 4, 3), 2)
    with pytest.raises(ValueError, match=r"groups\[1\] has 3 tensors"):
        mk.max_fuse_many([a, make_features((2, 4, 3), 3)])
    with pytest.raises(ValueError, match=r"groups\[1\] is torch.float16"):
        mk.max_fuse_many([a, [f.half() for f in a]])
    with pytest.raises(ValueError, match=r"groups\[0\] must all have the same shape"):
        mk.max_fuse_many([[a[0], a[1][:, :2]]])
    with pytest.raises(TypeError, match="groups must be a list"):
        mk.max_fuse_many(torch.randn(2, 2, 4, 3))


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
def test_opcheck(use_triton, device):
    groups = _groups([(2, 6, 4, 5), (1, 4, 3, 3)], 2, device=device)
    flat = [f for g in groups for f in g]
    torch.library.opcheck(
        torch.ops.maxfusion.max_fuse_many.default,
        (flat, 2, 0.7, False, True, True, True, [1.0, 1.0], 1, True, use_triton, [], ""),
    )


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    groups = _groups(SD15_SMALL[:4], 2, device=device)

    def step(groups):
        return [r * 0.5 for r in mk.max_fuse_many(groups)]

    got = torch.compile(step, fullgraph=True)(groups)
    want = step(groups)
    for g, w in zip(got, want):
        assert_close(g, w.double(), torch.float32)
