"""max_fuse against the float64 reference: both backends (the Triton kernels, interpreted on
CPU, compiled on CUDA; and the torch path), every option, layout and dtype."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, check_fusion, make_features

import maxfusion_kernels as mk
from maxfusion_kernels import reference

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, shape, channel_dim): small enough for the interpreter, each covering one addressing case
LAYOUTS = [
    ("nchw", (2, 6, 5, 7), 1),  # UNet feature map; sites contiguous, 35 sites (not a power of 2)
    ("tokens", (2, 24, 10), -1),  # DiT tokens [B, L, C]; channels contiguous
    ("video", (1, 5, 3, 4, 5), 1),  # [B, C, T, H, W]: three site dims collapse into one run
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("preset", ["paper", "reference"])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_matches_reference(backend, n, layout, dtype, preset, unmerge, device):
    _, shape, cd = layout
    feats = make_features(shape, n, dtype=dtype, channel_dim=cd, seed=n, device=device)
    excluded = check_fusion(feats, backend=backend, preset=preset, unmerge=unmerge,
                            channel_dim=cd)
    print(f"near-tie sites excluded: {excluded}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        # each choice on its own, away from its preset (the authors' code made batch-independent)
        dict(correlation="pearson", saliency="variance", normalize="sample"),
        dict(correlation="cosine", saliency="std", normalize="batch"),
        dict(preset="reference", correlation="cosine"),
        # thresholds at the ends: -1 averages nearly everything, 1 never averages
        dict(threshold=-1.0),
        dict(threshold=1.0, unmerge=True),
        dict(threshold=0.0, preset="reference"),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_options(backend, options, device):
    feats = make_features((2, 8, 6, 6), 3, seed=7, device=device)
    check_fusion(feats, backend=backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize(
    "weights",
    [
        (0.5, 2.0, 1.0),  # positive weights: decisions unchanged, values scaled
        (1.0, 0.0, 1.0),  # a weight of 0 removes input 1
        (0.0, 0.0, 3.0),  # one input left: the output is that input, scaled
        (0.0, 0.0, 0.0),  # nothing left: zeros
    ],
    ids=str,
)
def test_weights(backend, unmerge, weights, device):
    feats = make_features((2, 8, 5, 5), 3, seed=11, device=device)
    if any(weights):  # with every weight 0 every site is an exact tie (checked below instead)
        check_fusion(feats, backend=backend, weights=weights, unmerge=unmerge)
    out = mk.max_fuse(feats, weights=weights, unmerge=unmerge, backend=backend)
    outs = out if unmerge else [out]
    for k, o in enumerate(outs):
        assert torch.isfinite(o).all()
        if unmerge and weights[k] == 0:
            assert (o == 0).all(), "a removed input's unmerge stream must be zero"
    if weights == (0.0, 0.0, 3.0) and not unmerge:
        assert_close(out, 3.0 * feats[2].double(), torch.float32)
    if weights == (0.0, 0.0, 0.0):
        assert all((o == 0).all() for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_zero_equals_dropping_the_input(backend, device):
    feats = make_features((2, 8, 5, 5), 3, seed=5, device=device)
    with_zero = mk.max_fuse(feats, weights=[1.0, 0.0, 1.0], backend=backend)
    dropped = mk.max_fuse([feats[0], feats[2]], backend=backend)
    assert_close(with_zero, dropped.double(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["paper", "reference"])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_degenerate_inputs_are_finite(backend, preset, unmerge, device):
    """All-zero inputs (a ControlNet with scale 0 or untrained zero convolutions) and vectors
    that are constant over the channels have zero variance and zero norms: no NaN anywhere."""
    shape = (2, 6, 4, 4)
    zero = torch.zeros(shape, device=device)
    const = torch.ones(shape, device=device) * torch.arange(16, device=device).view(1, 1, 4, 4)
    mixed = make_features(shape, 1, seed=3, device=device)[0]
    mixed[:, :, :2] = 2.5  # constant over the channels in half of the sites
    for feats in ([zero, zero], [zero, mixed], [const, mixed], [mixed, const, zero]):
        out, info = mk.max_fuse(feats, preset=preset, unmerge=unmerge, return_info=True,
                                backend=backend)
        ref, info_ref = reference.max_fuse(feats, preset=preset, unmerge=unmerge,
                                           return_info=True)
        outs, refs = (out, ref) if unmerge else ([out], [ref])
        for o, r in zip(outs, refs):
            assert torch.isfinite(o).all()
            assert_close(o, r, torch.float32)
        assert torch.equal(info.winner.cpu(), info_ref.winner.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_second_input_keeps_the_first(backend, device):
    f = make_features((2, 8, 6, 6), 1, seed=2, device=device)[0]
    out = mk.max_fuse([f, torch.zeros_like(f)], backend=backend)
    assert torch.equal(out, f)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 4])
def test_identical_inputs_are_the_identity(backend, n, device):
    # fusing copies of one feature map: every pair correlates with 1, the average is exact
    f = make_features((2, 16, 5, 6), 1, dtype=torch.float16, seed=4, device=device)[0]
    assert torch.equal(mk.max_fuse([f] * n, backend=backend), f)
    for g in mk.max_fuse([f] * n, unmerge=True, backend=backend):
        assert torch.equal(g, f)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    ["channels_last", "strided_view", "transposed_tokens", "mixed_layouts", "three_runs"],
)
def test_non_contiguous_inputs(backend, case, device):
    """Inputs read in place whatever their strides; the result has the input's layout."""
    base = make_features((2, 6, 8, 10), 3, seed=9, device=device)
    if case == "channels_last":  # NHWC memory, the channel stride is 1
        feats = [f.contiguous(memory_format=torch.channels_last) for f in base]
    elif case == "strided_view":  # every other column: two site runs
        feats = [f[:, :, :, ::2] for f in base]
    elif case == "transposed_tokens":  # [B, L, C] view of a [B, C, L] tensor
        feats = [f.flatten(2).transpose(1, 2) for f in base]
    elif case == "mixed_layouts":  # one input in another memory format is copied to match
        feats = [base[0], base[1].contiguous(memory_format=torch.channels_last), base[2]]
    else:  # three scattered site runs: read through a contiguous copy
        feats = [f[:, :, ::2, ::3][:, :, :, :3] for f in base]
    cd = -1 if case == "transposed_tokens" else 1
    check_fusion(feats, backend=backend, channel_dim=cd)
    out = mk.max_fuse(feats, channel_dim=cd, backend=backend)
    if case == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_channels_and_single_site(backend, device):
    # the smallest legal problem sizes: C = 2 (unbiased variance), one site per sample ([B, C])
    feats = make_features((3, 2, 4), 2, seed=1, device=device)
    check_fusion(feats, backend=backend, max_excluded=0.25)
    flat = make_features((4, 9), 3, seed=2, device=device)
    check_fusion(flat, backend=backend, preset="reference", max_excluded=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)])
def test_empty_tensors(backend, shape, device):
    feats = [torch.randn(shape, device=device) for _ in range(2)]
    out, info = mk.max_fuse(feats, return_info=True, backend=backend)
    assert out.shape == shape and out.dtype == feats[0].dtype
    assert info.winner.shape == (shape[0], *shape[2:])
    assert info.members.shape == (2, shape[0], *shape[2:])
    outs = mk.max_fuse(feats, unmerge=True, backend=backend)
    assert [o.shape for o in outs] == [shape, shape]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["sample", "batch"])
def test_sample_normalizer_is_batch_independent(backend, normalize, device):
    feats = make_features((3, 8, 5, 5), 2, seed=6, device=device)
    whole = mk.max_fuse(feats, normalize=normalize, backend=backend)
    alone = torch.cat([mk.max_fuse([f[b:b + 1] for f in feats], normalize=normalize,
                                   backend=backend) for b in range(3)])
    if normalize == "sample":
        assert_close(whole, alone.double(), torch.float32)
    else:  # pooling over the batch changes the winners somewhere in this input
        assert not torch.allclose(whole, alone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_are_bitwise_equal(backend, device):
    feats = make_features((2, 12, 7, 7), 3, dtype=torch.float16, seed=8, device=device)
    first = mk.max_fuse(feats, unmerge=True, backend=backend)
    for _ in range(2):
        again = mk.max_fuse(feats, unmerge=True, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_backends_agree_on_decisions(device):
    feats = make_features((2, 16, 8, 8), 4, seed=12, device=device)
    _, a = mk.max_fuse(feats, return_info=True, backend="triton")
    _, b = mk.max_fuse(feats, return_info=True, backend="torch")
    assert torch.equal(a.winner, b.winner) and torch.equal(a.members, b.members)
    assert a.winner.unique().numel() > 1, "input should let more than one model win"
