"""Regional masks in the kernels (docs/spec.md, masks): per-site weights applied with the
weights, ``f_i(p) <- alpha_i * m_i(p) * f_i(p)``; a 0 removes input i at site p.

Against the float64 reference on both backends, N = 2, 3, 4, soft and hard masks; exact
properties (no-op masks, a 0 equals a weight or a zeroed input, disjoint regions, sites removed
for every input); validation; the once-per-version value check.
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import assert_close, check_fusion, make_features, make_masks

import maxfusion_kernels as mk
from maxfusion_kernels import options as mk_options
from maxfusion_kernels import reference

BACKENDS = ["triton", "torch"]

def _outs(result, unmerge):
    return list(result) if unmerge else [result]


# ------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("kind", ["soft", "hard", "mixed"])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_masks_match_reference(backend, n, kind, unmerge, device):
    # 6 x 7 sites: a non-square map; batch 2 with per-sample masks
    feats = make_features((2, 8, 6, 7), n, seed=n, device=device)
    masks = make_masks((2, 8, 6, 7), n, kind=kind, seed=10 + n, device=device)
    check_fusion(feats, backend=backend, masks=masks, unmerge=unmerge)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["paper", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masks_with_weights_presets_and_dtypes(backend, preset, dtype, device):
    feats = make_features((2, 12, 5, 5), 3, dtype=dtype, seed=4, device=device)
    masks = make_masks((2, 12, 5, 5), 3, kind="mixed", seed=5, batch_one=True, device=device)
    masks[1] = None  # None = 1 everywhere
    for weights in ([1.0, 0.5, 2.0], [1.0, 1.0, 0.0]):  # input 1 (no mask) is always there
        check_fusion(feats, backend=backend, masks=masks, weights=weights, preset=preset,
                     unmerge=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["[B, L]", "[B, L, 1]", "[1, L]", "[L]"])
def test_token_masks_match_reference(backend, form, device):
    # DiT tokens [B, L, C] with the channels last
    feats = make_features((2, 10, 16), 3, channel_dim=-1, seed=7, device=device)
    masks = make_masks((2, 10, 16), 3, kind="mixed", channel_dim=-1, seed=8,
                       batch_one=form in ("[1, L]", "[L]"), device=device)
    shaped = {"[B, L]": masks, "[B, L, 1]": [m[..., None] for m in masks],
              "[1, L]": masks, "[L]": [m[0] for m in masks]}[form]
    check_fusion(feats, backend=backend, masks=shaped, channel_dim=-1, unmerge=True)


# --------------------------------------------------------------------------- exact rules


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_masks_none_or_one_are_bitwise_no_masks(backend, unmerge, device):
    feats = make_features((2, 8, 5, 6), 3, seed=1, device=device)
    plain, info = mk.max_fuse(feats, unmerge=unmerge, return_info=True, backend=backend)
    none = mk.max_fuse(feats, unmerge=unmerge, masks=[None] * 3, backend=backend)
    for a, b in zip(_outs(none, unmerge), _outs(plain, unmerge)):
        assert torch.equal(a, b)  # all None: the unmasked call itself
    ref, ref_info = mk.max_fuse(feats, unmerge=unmerge, return_info=True,
                                backend=backend)
    ones = torch.ones(1, 1, 5, 6, device=device)
    for masks in ([ones] * 3, [ones[0], None, torch.ones(2, 5, 6, device=device)]):
        got, got_info = mk.max_fuse(feats, unmerge=unmerge, masks=masks, return_info=True,
                                    backend=backend)
        for a, b in zip(_outs(got, unmerge), _outs(ref, unmerge)):
            assert torch.equal(a, b), "a mask of ones must multiply by exactly 1"
        assert torch.equal(got_info.winner, ref_info.winner)
        assert torch.equal(got_info.members, ref_info.members)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_a_mask_of_zeros_equals_a_weight_of_zero(backend, unmerge, device):
    feats = make_features((2, 8, 5, 5), 3, seed=2, device=device)
    zeros = torch.zeros(1, 5, 5, device=device)
    got, info = mk.max_fuse(feats, masks=[None, zeros, None], unmerge=unmerge,
                            return_info=True, backend=backend)
    want, want_info = mk.max_fuse(feats, weights=[1.0, 0.0, 1.0], unmerge=unmerge,
                                  return_info=True, backend=backend)
    for a, b in zip(_outs(got, unmerge), _outs(want, unmerge)):
        assert torch.equal(a, b)
    assert torch.equal(info.winner, want_info.winner)
    assert torch.equal(info.members, want_info.members)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_constant_mask_equals_that_weight(backend, device):
    """A mask constant over the sites is a weight: ``(f * 1) * c`` is ``f * c`` exactly."""
    feats = make_features((2, 8, 5, 5), 3, seed=3, device=device)
    c = [torch.full((1, 5, 5), v, device=device) for v in (0.5, 1.0, 0.25)]
    got = mk.max_fuse(feats, masks=c, unmerge=True, backend=backend)
    want = mk.max_fuse(feats, weights=[0.5, 1.0, 0.25], unmerge=True,
                       backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize("threshold", [0.7, 0.0])
# expected: the Triton interpreter (numpy) warns on the inf and NaN this test feeds in
@pytest.mark.filterwarnings(
    "ignore:invalid value encountered in:RuntimeWarning:triton.runtime.interpreter")
def test_mask_zero_at_sites_equals_a_zeroed_input_there(backend, unmerge, threshold, device):
    """Input 1 masked to 0 in a region P equals input 1 zeroed in P (even where it held inf or
    NaN), without masks, exactly: the statistics are the same everywhere (t_1 = 0 in P, so
    T_1 is the same), and in P the zeroed input has saliency 0 and correlation 0, so with a
    threshold >= 0 it neither wins (another input has saliency > 0 there) nor joins a group,
    and its unmerge stream there is (0 / s_w) * f_w = 0."""
    feats = make_features((2, 8, 6, 6), 3, seed=4, device=device)
    region = torch.zeros(2, 6, 6, dtype=torch.bool, device=device)
    region[:, 1:4, 2:5] = True
    region[1, 5, 0] = True
    mask = (~region).float()
    broken = feats[1].clone()
    broken[0, 3, 1, 2] = math.inf  # in P: zeroed by the mask
    broken[1, :, 5, 0] = math.nan
    zeroed = feats[1].masked_fill(region[:, None], 0.0)
    got, info = mk.max_fuse([feats[0], broken, feats[2]], masks=[None, mask, None],
                            unmerge=unmerge, threshold=threshold, return_info=True,
                            backend=backend)
    want, want_info = mk.max_fuse([feats[0], zeroed, feats[2]], unmerge=unmerge,
                                  threshold=threshold, return_info=True,
                                  backend=backend)
    for a, b in zip(_outs(got, unmerge), _outs(want, unmerge)):
        assert torch.equal(a, b)
    assert torch.equal(info.winner, want_info.winner)
    assert torch.equal(info.members, want_info.members)
    assert not info.members[1][region].any() and (info.winner[region] != 1).all()
    if unmerge:
        assert (got[1].permute(0, 2, 3, 1)[region] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_zero_at_sites_equals_dropping_the_input_there(backend, device):
    """Where input 1 is masked to 0, the fusion is that of the other inputs alone (their
    normalisers do not depend on input 1)."""
    feats = make_features((2, 8, 6, 6), 3, seed=5, device=device)
    mask = torch.ones(2, 6, 6, device=device)
    mask[:, :, :3] = 0.0
    got, info = mk.max_fuse(feats, masks=[None, mask, None], return_info=True, backend=backend)
    want, want_info = mk.max_fuse([feats[0], feats[2]], return_info=True, backend=backend)
    region = (mask == 0)
    assert_close(got.permute(0, 2, 3, 1)[region], want.permute(0, 2, 3, 1)[region].double(),
                 torch.float32)
    assert torch.equal(info.winner[region], torch.tensor([0, 2], device=device)[
        want_info.winner[region]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_disjoint_hard_masks_give_the_regions(backend, n, unmerge, dtype, device):
    """Masks that split the sites into N regions: at each site one input is present, so it
    wins there and is the group, the merged output is exactly its vector, and its unmerge
    stream is that vector while every other stream is 0."""
    shape = (2, 8, 7, 9)
    feats = make_features(shape, n, dtype=dtype, seed=n, device=device)
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, n, (2, 7, 9), generator=g).to(device)
    masks = [(labels == i).float() for i in range(n)]
    got, info = mk.max_fuse(feats, masks=masks, unmerge=unmerge, return_info=True,
                            backend=backend)
    assert torch.equal(info.winner, labels)
    assert torch.equal(info.members, torch.stack(masks).bool())
    x = torch.stack(feats)  # [N, B, C, H, W]
    own = torch.gather(x, 0, labels[None, :, None].expand(1, *shape))[0]
    if not unmerge:
        assert torch.equal(got, own)
    else:
        for i, g_i in enumerate(got):
            inside = (labels == i)[:, None].expand(shape)
            assert torch.equal(g_i[inside], own[inside])
            assert (g_i[~inside] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_site_removed_for_every_input(backend, unmerge, device):
    """The convention where every input is removed at a site: winner 0, no member, merged
    output 0, every unmerge stream 0 (NaN or inf there change nothing)."""
    feats = make_features((2, 8, 5, 5), 3, seed=6, device=device)
    feats[2][0, :, 0, 0] = math.nan
    dead = torch.zeros(2, 5, 5, dtype=torch.bool, device=device)
    dead[0, 0, :] = True
    dead[1, 2:4, 3] = True
    masks = [(~dead).float(), (~dead).float() * 0.5, (~dead).float()]
    got, info = mk.max_fuse(feats, masks=masks, unmerge=unmerge, return_info=True,
                            backend=backend)
    assert (info.winner[dead] == 0).all()
    assert not info.members[:, dead].any()
    assert info.members[:, ~dead].any(dim=0).all()  # elsewhere the winner is a member
    for o in _outs(got, unmerge):
        assert (o.permute(0, 2, 3, 1)[dead] == 0).all() and torch.isfinite(o).all()
    ref, ref_info = reference.max_fuse(feats, masks=masks, unmerge=unmerge, return_info=True)
    assert torch.equal(ref_info.winner[dead].cpu(), info.winner[dead].cpu())
    assert not ref_info.members[:, dead].any()
    for o in _outs(ref, unmerge):
        assert (o.permute(0, 2, 3, 1)[dead] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_every_weight_zero_has_no_member(backend, device):
    feats = make_features((2, 8, 4, 4), 2, seed=7, device=device)
    if backend == "reference":
        _, info = reference.max_fuse(feats, weights=[0.0, 0.0], return_info=True)
    else:
        _, info = mk.max_fuse(feats, weights=[0.0, 0.0], return_info=True, backend=backend)
    assert (info.winner == 0).all() and not info.members.any()


# --------------------------------------------------------------------- shapes and groups


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_forms_equal_the_full_mask(backend, device):
    """Every accepted form of one mask gives the result of the full ``[B, *sites]`` mask, for
    NCHW maps, channels-last maps and video ``[B, C, T, H, W]``."""
    feats = make_features((2, 6, 4, 5), 2, seed=8, device=device)
    row = torch.rand(5, generator=torch.Generator().manual_seed(1)).to(device)
    full = row.expand(2, 4, 5)
    want = mk.max_fuse(feats, masks=[full, None], unmerge=True, backend=backend)
    for form in (row, row.expand(4, 5), row.expand(1, 4, 5), row.expand(1, 1, 4, 5),
                 row.expand(2, 1, 4, 5), row.view(1, 1, 1, 5), row.expand(2, 4, 5).clone()):
        got = mk.max_fuse(feats, masks=[form, None], unmerge=True, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), tuple(form.shape)
    cl = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    got = mk.max_fuse(cl, masks=[full, None], unmerge=True, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    video = make_features((1, 6, 3, 4, 5), 2, seed=9, device=device)
    vmask = torch.rand(1, 1, 1, 4, 5, generator=torch.Generator().manual_seed(2)).to(device)
    check_fusion(video, backend=backend, masks=[vmask, 1 - vmask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_fuse_many_masks_per_group(backend, device):
    a = make_features((2, 8, 6, 6), 3, seed=10, device=device)
    b = make_features((2, 16, 3, 3), 3, seed=11, device=device)
    t = make_features((2, 9, 16), 3, seed=12, channel_dim=-1, device=device)
    ma = make_masks((2, 8, 6, 6), 3, kind="mixed", seed=13, device=device)
    mb = [None, torch.zeros(1, 3, 3, device=device), None]
    results, infos = mk.max_fuse_many([a, b, a], masks=[ma, mb, None], weights=[1.0, 0.5, 2.0],
                                      unmerge=True, return_info=True, backend=backend)
    for grp, ms, res, info in zip([a, b, a], [ma, mb, None], results, infos):
        want, want_info = mk.max_fuse(grp, masks=ms, weights=[1.0, 0.5, 2.0], unmerge=True,
                                      return_info=True, backend=backend)
        for x, y in zip(res, want):
            assert_close(x, y.double(), torch.float32)
        assert torch.equal(info.winner, want_info.winner)
    # tokens, channels last: masks [B, L]
    mt = make_masks((2, 9, 16), 3, kind="hard", channel_dim=-1, seed=14, device=device)
    (res,), (info,) = mk.max_fuse_many([t], masks=[mt], channel_dim=-1, return_info=True,
                                       backend=backend)
    ref, ref_info = reference.max_fuse(t, masks=mt, channel_dim=-1, return_info=True)
    assert_close(res, ref, torch.float32)
    assert torch.equal(info.winner.cpu(), ref_info.winner.cpu())


def test_compile_fullgraph_with_masks():
    feats = make_features((2, 8, 4, 4), 2, seed=15)
    masks = make_masks((2, 8, 4, 4), 2, kind="mixed", seed=16)

    def fused(f0, f1, m0, m1):
        return mk.max_fuse([f0, f1], masks=[m0, m1], backend="torch") * 2.0

    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*feats, *masks), fused(*feats, *masks))


# ---------------------------------------------------------------------------- validation

ENTRY_POINTS = [
    pytest.param(lambda f, **kw: mk.max_fuse(f, backend="torch", **kw), id="torch"),
    pytest.param(lambda f, **kw: mk.max_fuse(f, backend="triton", **kw), id="triton"),
    pytest.param(reference.max_fuse, id="reference"),
    pytest.param(lambda f, masks, **kw: mk.max_fuse_many([f], masks=[masks], **kw)[0],
                 id="many"),
]


def _pair():
    return [torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)]


def _m(*shape, fill=0.5, dtype=torch.float32):
    return torch.full(shape, fill, dtype=dtype)


BAD_MASKS = [
    # (name, masks, exception, message fragment)
    ("a tensor, not a list", _m(2, 3, 5), TypeError, "list or tuple"),
    ("too few entries", [_m(3, 5)], ValueError, "has 1 entries but there are 2"),
    ("not a tensor", [None, [[0.5]]], TypeError, r"\[1\] must be a tensor or None"),
    ("integer dtype", [torch.ones(3, 5, dtype=torch.int64), None], TypeError,
     r"\[0\] must have a floating dtype.*int64"),
    ("uint8 dtype", [None, torch.ones(3, 5, dtype=torch.uint8)], TypeError, r"/ 255"),
    ("bool dtype", [torch.ones(3, 5, dtype=torch.bool), None], TypeError, r"\.float\(\)"),
    ("complex dtype", [torch.ones(3, 5, dtype=torch.complex64), None], TypeError,
     "complex64"),
    ("another device", [None, torch.empty(3, 5, device="meta")], ValueError,
     r"\[1\] is on meta but the features are on cpu"),
    ("wrong site size", [_m(3, 4), None], ValueError, r"\(3, 4\), which does not broadcast"),
    ("wrong batch", [_m(3, 3, 5), None], ValueError, "does not broadcast"),
    ("channel dim not 1", [_m(2, 4, 3, 5), None], ValueError, "size 1 at the channel dim 1"),
    ("too many dims", [_m(1, 2, 1, 3, 5), None], ValueError, "more dims"),
    ("value above 1", [_m(3, 5, fill=1.5), None], ValueError,
     r"\[0\] must have values in \[0, 1\].*max 1.5"),
    ("negative value", [None, _m(3, 5, fill=-0.25)], ValueError, r"\[1\].*min -0.25"),
    ("NaN", [_m(3, 5, fill=math.nan), None], ValueError, "NaN"),
    ("inf", [_m(3, 5, fill=math.inf), None], ValueError, "max inf"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", BAD_MASKS, ids=[c[0] for c in BAD_MASKS])
def test_bad_masks_are_named(entry, case):
    _, masks, exc, fragment = case
    with pytest.raises(exc, match=fragment):
        entry(_pair(), masks=masks)


def test_max_fuse_many_mask_errors_name_the_group():
    groups = [_pair(), _pair()]
    with pytest.raises(ValueError, match="masks has 1 entries but there are 2 groups"):
        mk.max_fuse_many(groups, masks=[None])
    with pytest.raises(TypeError, match="one entry per group"):
        mk.max_fuse_many(groups, masks=_m(2, 3, 5))
    with pytest.raises(ValueError, match=r"masks\[1\]\[0\] must have values in \[0, 1\]"):
        mk.max_fuse_many(groups, masks=[None, [_m(3, 5, fill=2.0), None]])
    with pytest.raises(ValueError, match=r"masks\[0\] has 3 entries but there are 2"):
        mk.max_fuse_many(groups, masks=[[None] * 3, None])


def test_values_are_checked_once_per_version(monkeypatch):
    feats = _pair()
    mask = _m(3, 5)
    checks = []
    real_all = torch.Tensor.all

    def counting_all(self, *a, **kw):  # the value check's one reduction
        checks.append(1)
        return real_all(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "all", counting_all)
    for _ in range(3):
        mk.max_fuse(feats, masks=[mask, None], backend="torch")
    assert len(checks) == 1, "a mask is checked once per version, not at every call"
    mask.fill_(2.0)  # an in-place change bumps the version: checked again, and refused
    with pytest.raises(ValueError, match="max 2"):
        mk.max_fuse(feats, masks=[mask, None], backend="torch")
    assert len(checks) == 2
    mask.fill_(1.0)  # fixed in place: checked once more, then remembered again
    for _ in range(2):
        mk.max_fuse(feats, masks=[mask, None], backend="torch")
    assert len(checks) == 3 and mk_options._CHECKED_MASKS[mask] == mask._version


def test_inference_tensors_are_checked_at_every_call():
    feats = _pair()
    with torch.inference_mode():
        mask = _m(3, 5)
        mk.max_fuse(feats, masks=[mask, None], backend="torch")
        mask.fill_(3.0)  # no version counter on an inference tensor: still caught
        with pytest.raises(ValueError, match="max 3"):
            mk.max_fuse(feats, masks=[mask, None], backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_call_with_masks_and_an_empty_group(backend, device):
    """The second call of a signature takes the cached plan: its masks (next to a group with no
    sample, and groups of different dims) give what the first call gave."""
    grp = make_features((2, 8, 4, 4), 2, seed=3, device=device)
    tok = make_features((2, 6, 8), 2, seed=4, device=device)  # 3-D: [B, C, L]
    empty = [torch.randn(0, 8, 4, 4, device=device) for _ in range(2)]
    masks = [[torch.rand(4, 4, device=device), None], [torch.rand(4, 4, device=device), None],
             [None, torch.rand(2, 8, device=device)]]
    first = mk.max_fuse_many([grp, empty, tok], masks=masks, channel_dim=1, backend=backend)
    again = mk.max_fuse_many([grp, empty, tok], masks=masks, channel_dim=1, backend=backend)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert first[1].shape == (0, 8, 4, 4)
