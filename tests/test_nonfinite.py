"""Non-finite inputs: a NaN or an infinity in an input's vector at a site makes that site's
output NaN and changes nothing anywhere else (it is left out of the normaliser); an input with
weight 0 is zeroed first, so its non-finite values do nothing at all."""

from __future__ import annotations

import math

import pytest
import torch
from utils import make_features

import maxfusion_kernels as mk
from maxfusion_kernels import reference

BACKENDS = ["triton", "torch"]

# Expected here: the Triton interpreter computes with numpy, which warns when it meets the NaNs
# and infinities these tests feed in (a compiled kernel does not warn).
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered in:RuntimeWarning:triton.runtime.interpreter")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_non_finite_site_is_confined(backend, bad, unmerge, preset, device):
    feats = make_features((2, 6, 5, 5), 3, seed=21, device=device)
    poisoned = [f.clone() for f in feats]
    poisoned[1][0, 3, 2, 4] = bad  # one channel of one site of input 1, sample 0
    zeroed = [f.clone() for f in feats]
    zeroed[1][0, :, 2, 4] = 0.0  # the same site as an all-zero vector: t = 0 there too
    got = mk.max_fuse(poisoned, unmerge=unmerge, preset=preset, backend=backend)
    clean = mk.max_fuse(zeroed, unmerge=unmerge, preset=preset, backend=backend)
    ref = reference.max_fuse(poisoned, unmerge=unmerge, preset=preset)
    site = torch.zeros(2, 1, 5, 5, dtype=torch.bool, device=device)
    site[0, 0, 2, 4] = True
    for g, c, r in zip(*((x if unmerge else [x]) for x in (got, clean, ref))):
        assert torch.isnan(g[0, :, 2, 4]).all(), "the poisoned site is NaN"
        assert torch.isnan(r[0, :, 2, 4]).all(), "the reference agrees"
        other = ~site.expand_as(g)
        assert torch.isfinite(g[other]).all(), "no other site is touched"
        # everywhere else, exactly what the inputs give with that site zeroed
        assert torch.equal(g[other], c[other])


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_input_with_non_finite_values_is_ignored(backend, device):
    feats = make_features((2, 6, 4, 4), 3, seed=22, device=device)
    broken = feats[2].clone()
    broken[:, :, :2] = math.nan
    broken[:, :, 2:] = math.inf
    got = mk.max_fuse([feats[0], feats[1], broken], weights=[1.0, 1.0, 0.0], backend=backend)
    want = mk.max_fuse(feats[:2], backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_fuse_many_confines_per_group(backend, device):
    a = make_features((2, 6, 4, 4), 2, seed=23, device=device)
    b = make_features((1, 8, 3, 3), 2, seed=24, device=device)
    a_bad = [a[0].clone(), a[1]]
    a_bad[0][1, 0, 0, 0] = math.nan
    ra, rb = mk.max_fuse_many([a_bad, b], backend=backend)
    assert torch.isnan(ra[1, :, 0, 0]).all() and torch.isfinite(ra[0]).all()
    assert torch.equal(rb, mk.max_fuse_many([b], backend=backend)[0])
