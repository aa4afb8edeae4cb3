"""The registered backward of max_fuse / max_fuse_many (docs/algorithm.md, "The gradient"):
gradcheck in float64 on both backends at inputs away from ties, equality with autograd through
the float64 reference with the decisions fixed, opcheck with gradients, torch.compile, the
zero-variance and non-finite cases, and that a call nobody differentiates is unchanged.

One file (over 400 lines) because every case compares the same registered backward with the same
fixed-decision reference.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

import maxfusion_kernels as mk
from maxfusion_kernels import reference

BACKENDS = ["torch", "triton"]
MARGIN = 0.05  # decisions at least this far from a tie (correlation; relative saliency)


def _tie_free(feats, threshold, channel_dim, masks=None, weights=None, preset="paper"):
    """True when no decision is within MARGIN of a tie, at least one site has a group of two
    or more and at least one present input is outside the group somewhere (so merge's mean
    and unmerge's rescaled streams are both exercised)."""
    opts = dict(threshold=threshold, channel_dim=channel_dim, weights=weights, preset=preset)
    _, info = reference.max_fuse(feats, masks=masks, return_info=True, **opts)
    st = reference.site_statistics(feats, masks=masks, **opts)
    n = len(feats)
    w = info.winner
    a = st.saliency
    idx = torch.arange(n).view(n, *[1] * w.dim())
    a_w = torch.gather(a, 0, w[None])[0]
    runner = torch.where(idx == w, -torch.inf, a).max(dim=0).values
    if not bool((a_w - runner > MARGIN * a_w.abs()).all()):
        return False
    corr_w = torch.gather(st.corr, 1, w.expand(n, *w.shape)[:, None])[:, 0]
    near = ((corr_w - threshold).abs() < MARGIN) & (idx != w) & st.present
    if bool(near.any()):
        return False
    size = info.members.sum(dim=0)
    outside = st.present & ~info.members
    return bool((size >= 2).any()) and bool(outside.any())


def _case(n, layout, seed0=0, grad_mask=False, zero_mask=False, weights=None,
          preset="paper", threshold=0.3, dtype=torch.float64):
    """Features (and masks) away from ties: the first seed from ``seed0`` that is."""
    shape, cd = ((2, 4, 2, 2), 1) if layout == "maps" else ((2, 3, 4), -1)
    sites = (2, 2) if layout == "maps" else (3,)
    for seed in range(seed0, seed0 + 500):
        g = torch.Generator().manual_seed(seed)
        feats = [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + i)
                 for i in range(n)]
        masks = None
        if grad_mask or zero_mask:
            masks = [None] * n
            if grad_mask:  # soft values away from 0 and 1, so a perturbation stays in [0, 1]
                masks[0] = 0.3 + 0.6 * torch.rand((2, *sites), generator=g, dtype=torch.float64)
            if zero_mask:  # input 1 removed at some sites (a constant mask)
                m = (torch.rand((1, *sites), generator=g) > 0.4).double()
                masks[1] = m
        if _tie_free(feats, threshold, cd, masks, weights, preset):
            return feats, masks, cd
    raise AssertionError("no tie-free case found")


# N = 2: masks (one soft and differentiated, one removing input 1 at some sites); N = 3:
# weights with a removed input; N = 4: weights and a differentiated mask. Tokens use the
# `reference` preset (Pearson, variance, batch normaliser).
VARIANTS = {
    2: dict(grad_mask=True, zero_mask=True),
    3: dict(weights=(0.5, 0.0, 1.5)),
    4: dict(weights=(1.0, 2.0, 0.5, 1.0), grad_mask=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("layout", ["maps", "tokens"])
def test_gradcheck(backend, unmerge, n, layout):
    var = dict(VARIANTS[n])
    preset = "reference" if layout == "tokens" else "paper"
    feats, masks, cd = _case(n, layout, preset=preset, **var)
    weights = var.get("weights")
    inputs = [f.clone().requires_grad_() for f in feats]
    mask_in = []
    if masks is not None and masks[0] is not None:
        mask_in = [masks[0].clone().requires_grad_()]

    def fn(*args):
        fs = list(args[:n])
        ms = None
        if masks is not None:
            ms = list(masks)
            if mask_in:
                ms[0] = args[n]
        return mk.max_fuse(fs, unmerge=unmerge, threshold=0.3, preset=preset, weights=weights,
                           masks=ms, channel_dim=cd, backend=backend)

    out = fn(*inputs, *mask_in)
    first = out[0] if unmerge else out
    assert first.grad_fn is not None
    if backend == "torch":
        assert torch.autograd.gradcheck(fn, (*inputs, *mask_in), eps=1e-6, atol=1e-7, rtol=1e-6)
    elif not unmerge and masks is None:  # the kernels carry the mean in float64 here
        assert torch.autograd.gradcheck(fn, (*inputs, *mask_in), eps=1e-6, atol=1e-7,
                                        rtol=1e-6, fast_mode=True)
    else:
        # the kernels compute the unmerge factor s_i / s_w in float32, and read masks as
        # float32, for float64 inputs too: a finite difference of 1e-6 would see their
        # rounding; one of 1e-3 sees the slope
        assert torch.autograd.gradcheck(fn, (*inputs, *mask_in), eps=1e-3, atol=2e-3,
                                        rtol=2e-3, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp32", "fp16", "bf16", "fp64"])
def test_equals_reference_with_fixed_decisions(backend, unmerge, dtype):
    """The gradient equals autograd through the float64 reference given the call's own
    decisions (features, and a differentiated mask)."""
    n = 3
    weights = (1.0, 0.5, 2.0)
    g = torch.Generator().manual_seed(7)
    shape = (2, 8, 3, 4)
    feats = [(torch.randn(shape, generator=g) * (1 + i)).to(dtype).requires_grad_()
             for i in range(n)]
    mask = (0.2 + 0.8 * torch.rand((2, 3, 4), generator=g)).to(dtype)
    mask[0, 0, 0] = 0.0  # input 2 removed at one site
    mask.requires_grad_()
    masks = [None, None, mask]
    res, info = mk.max_fuse(feats, unmerge=unmerge, threshold=0.2, weights=weights,
                            masks=masks, return_info=True, backend=backend)
    outs = res if unmerge else [res]
    gouts = [torch.randn(shape, generator=g).to(dtype) for _ in outs]
    ours = torch.autograd.grad(outs, [*feats, mask], gouts)

    ref_in = [f.detach().double().requires_grad_() for f in feats]
    ref_mask = mask.detach().double().requires_grad_()
    ref = reference.fuse_with_decisions(ref_in, info.winner, info.members, unmerge=unmerge,
                                        weights=weights, masks=[None, None, ref_mask])
    ref_outs = ref if unmerge else [ref]
    expected = torch.autograd.grad(ref_outs, [*ref_in, ref_mask], [t.double() for t in gouts])
    for i, (a, e) in enumerate(zip(ours, expected)):
        assert a.dtype == dtype
        # the expected gradient rounded once to the dtype, as ours is
        tol_dtype = torch.float32 if dtype == torch.float64 else dtype
        assert_close(a, e.to(dtype).double() if dtype != torch.float64 else e, tol_dtype,
                     what=f"grad {i}")
        assert bool((a[0] if i < n else a).isfinite().all())


def test_backends_agree():
    """The same decisions give the same gradient on both backends (same formula)."""
    feats, masks, cd = _case(3, "maps", weights=(1.0, 1.0, 0.7))
    grads = []
    for backend in BACKENDS:
        ins = [f.clone().requires_grad_() for f in feats]
        out = mk.max_fuse(ins, unmerge=True, threshold=0.3, weights=(1.0, 1.0, 0.7),
                          backend=backend)
        torch.autograd.backward(out, [torch.ones_like(o) * (k + 1) for k, o in enumerate(out)])
        grads.append([f.grad for f in ins])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_max_fuse_many_equals_max_fuse(backend, unmerge):
    """Per group, max_fuse_many's gradient is max_fuse's (groups of different shapes, a
    mask on one group)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 4, 2, 3), (1, 6, 3, 2)]
    groups = [[torch.randn(s, generator=g, dtype=torch.float32) for _ in range(2)]
              for s in shapes]
    mask = (0.3 + 0.7 * torch.rand((1, 3, 2), generator=g)).requires_grad_()
    masks = [None, [mask, None]]
    gin = [[f.clone().requires_grad_() for f in grp] for grp in groups]
    res = mk.max_fuse_many(gin, unmerge=unmerge, threshold=0.2, masks=masks, backend=backend)
    flat_out = [o for r in res for o in (r if unmerge else [r])]
    weights = [torch.randn(o.shape, generator=g) for o in flat_out]
    loss = sum((o * w).sum() for o, w in zip(flat_out, weights))
    loss.backward()
    k = 0
    mask2 = mask.detach().clone().requires_grad_()
    for j, grp in enumerate(groups):
        ins = [f.clone().requires_grad_() for f in grp]
        ms = None if masks[j] is None else [mask2, None]
        out = mk.max_fuse(ins, unmerge=unmerge, threshold=0.2, masks=ms, backend=backend)
        outs = out if unmerge else [out]
        loss = sum((o * weights[k + i]).sum() for i, o in enumerate(outs))
        k += len(outs)
        loss.backward()
        for a, b in zip(gin[j], ins):
            # a call with a mask requiring grad takes the torch formula for every group;
            # group 0 alone takes the Triton kernels: equal to float32 rounding
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mask.grad, mask2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
# the interpreter computes with numpy, which warns at the NaN fed in (a compiled kernel does not)
@pytest.mark.filterwarnings(
    "ignore:invalid value encountered in:RuntimeWarning:triton.runtime.interpreter")
def test_zero_variance_and_nonfinite(backend, unmerge):
    """A flat winner (s_w = 0), a flat loser (s_i = 0), an all-zero input, a removed input
    with inf, and a site with a NaN: every gradient finite, 0 at the NaN site, and the
    reference's elsewhere."""
    g = torch.Generator().manual_seed(11)
    shape = (1, 4, 2, 3)
    f = [torch.randn(shape, generator=g) * s for s in (1.0, 0.5, 2.0)]
    f[0][0, :, 0, 0] = 3.0  # flat vectors: std 0 but a large mean
    f[1][0, :, 0, 1] = 0.7
    f[2][0, :, 0, 2] = 0.0  # all zero
    f[1][0, 2, 1, 0] = float("nan")  # poisons site (1, 0)
    mask = torch.ones((1, 2, 3))
    mask[0, 1, 1] = 0.0  # input 2 removed at site (1, 1), where it holds an inf
    f[2][0, 1, 1, 1] = float("inf")
    ins = [t.clone().requires_grad_() for t in f]
    res, info = mk.max_fuse(ins, unmerge=unmerge, threshold=0.2, masks=[None, None, mask],
                            return_info=True, backend=backend)
    outs = res if unmerge else [res]
    gouts = [torch.randn(shape, generator=g) for _ in outs]
    grads = torch.autograd.grad(outs, ins, gouts)
    for gr in grads:
        assert bool(gr.isfinite().all())
        assert bool((gr[0, :, 1, 0] == 0).all())  # the NaN site
    assert bool((grads[2][0, :, 1, 1] == 0).all())  # removed there
    ref_in = [t.detach().double().requires_grad_() for t in f]
    ref = reference.fuse_with_decisions(ref_in, info.winner, info.members, unmerge=unmerge,
                                        masks=[None, None, mask.double()])
    ref_outs = ref if unmerge else [ref]
    expected = torch.autograd.grad(ref_outs, ref_in, [t.double() for t in gouts])
    keep = torch.ones((1, 1, 2, 3), dtype=torch.bool)
    keep[0, 0, 1, 0] = False
    for i, (a, e) in enumerate(zip(grads, expected)):
        e = torch.where(keep, e, 0.0)
        if i == 2:
            e = e.clone()
            e[0, :, 1, 1] = 0.0
        assert_close(a, e, torch.float32, what=f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_no_grad_forward_unchanged(backend, unmerge):
    """Nobody differentiates: no graph, nothing saved, and the output is bitwise the one of a
    differentiated call (which saves exactly the inputs, by reference, and the decisions)."""
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn((2, 4, 3, 3), generator=g) for _ in range(3)]
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain = mk.max_fuse(feats, unmerge=unmerge, threshold=0.3, backend=backend)
        ins = [f.clone().requires_grad_() for f in feats]
        with torch.no_grad():
            nograd = mk.max_fuse(ins, unmerge=unmerge, threshold=0.3, backend=backend)
        assert packed == []
        diff = mk.max_fuse(ins, unmerge=unmerge, threshold=0.3, backend=backend)
    plain_l = plain if unmerge else [plain]
    for a, b, c in zip(plain_l, nograd if unmerge else [nograd], diff if unmerge else [diff]):
        assert a.grad_fn is None and b.grad_fn is None
        assert c.grad_fn is not None and "maxfusion_max_fuse" in c.grad_fn.name()
        assert torch.equal(a, b) and torch.equal(a, c)
    # saved: the three inputs themselves (same storage), the winners and the members
    assert len(packed) == 5
    assert all(p.data_ptr() == f.data_ptr() for p, f in zip(packed[:3], ins))
    assert packed[3].dtype == torch.int64 and packed[3].numel() == 2 * 9
    assert packed[4].dtype == torch.bool and packed[4].numel() == 3 * 2 * 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_called_without_info_recomputes_decisions(backend):
    """``torch.ops.maxfusion.max_fuse`` called directly with ``return_info=False`` saves no
    decisions; its backward recomputes them and gives the same gradient."""
    feats, _, _ = _case(3, "maps", weights=None)
    feats = [f.float() for f in feats]
    use_triton = backend == "triton"
    grads = []
    for info in (False, True):
        ins = [f.clone().requires_grad_() for f in feats]
        outs, _, _ = torch.ops.maxfusion.max_fuse(ins, 0.3, True, False, False, False,
                                                  [1.0] * 3, 1, info, use_triton, [], "")
        torch.autograd.backward(outs, [torch.full_like(o, k + 1.0) for k, o in enumerate(outs)])
        grads.append([f.grad for f in ins])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_opcheck_with_gradients(use_triton, unmerge):
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn((1, 4, 2, 3), generator=g).requires_grad_() for _ in range(3)]
    mask = (0.3 + 0.7 * torch.rand((1, 2, 3), generator=g)).requires_grad_()
    torch.library.opcheck(
        torch.ops.maxfusion.max_fuse.default,
        (feats, 0.3, unmerge, False, False, False, [1.0, 0.5, 1.0], 1, True, use_triton,
         [None, mask, None], ""),
    )
    groups = [f.detach().clone().requires_grad_() for f in feats[:2]]
    groups += [torch.randn((2, 3, 4), generator=g).requires_grad_() for _ in range(2)]
    torch.library.opcheck(
        torch.ops.maxfusion.max_fuse_many.default,
        (groups, 2, 0.3, unmerge, False, False, False, [1.0, 1.0], 1, True, use_triton, [],
         ""),
    )


@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_compile_fullgraph_backward(unmerge):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    feats = [torch.randn((2, 4, 3, 3), generator=g) for _ in range(3)]
    mask = 0.3 + 0.7 * torch.rand((2, 3, 3), generator=g)
    w = torch.randn((2, 4, 3, 3), generator=g)

    def loss_of(a, b, c, m):
        out = mk.max_fuse([a, b, c], unmerge=unmerge, threshold=0.3, masks=[m, None, None],
                          backend="torch")
        outs = out if unmerge else [out]
        return sum(((o * w) ** 2).sum() for o in outs)

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss_of, compiled):
        ins = [f.clone().requires_grad_() for f in feats]
        m = mask.clone().requires_grad_()
        fn(*ins, m).backward()
        grads.append([*(f.grad for f in ins), m.grad])
    for a, b in zip(*grads):
        assert a is not None and bool(a.abs().sum() > 0)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- the Triton backward


def _kernel_case(n, shape, cd, unmerge, seed=0, dtype=torch.float32, masks=False, nan=False,
                 weights=None):
    from maxfusion_kernels.options import check_masks, resolve_options

    g = torch.Generator().manual_seed(seed)
    feats = [(torch.randn(shape, generator=g) * (1 + i)).to(dtype) for i in range(n)]
    if nan:
        feats[1].reshape(-1)[5] = float("nan")
    ms = None
    if masks:
        sites = [s for d, s in enumerate(shape) if d not in (0, cd % len(shape))]
        m = torch.rand((1, *sites), generator=g)
        m.reshape(-1)[:2] = 0.0
        ms = [None] * n
        ms[n - 1] = m
    opt = resolve_options(feats, unmerge=unmerge, threshold=0.2, channel_dim=cd,
                          weights=weights)
    _, info = mk.max_fuse(feats, unmerge=unmerge, threshold=0.2, channel_dim=cd,
                          weights=weights, masks=ms, return_info=True, backend="triton")
    grads = [torch.randn(shape, generator=g).to(dtype) for _ in range(n if unmerge else 1)]
    checked = None if ms is None else check_masks(ms, feats, opt.channel_dim)
    return feats, grads, info, opt, checked


# C = 400 fp32: two channel chunks per site (pass structure of the forward); tokens and maps
KERNEL_CASES = {
    "maps-n2": (2, (2, 6, 3, 5), 1, {}),
    "tokens-n3-weights": (3, (2, 7, 5), -1, dict(weights=(1.0, 0.0, 2.0))),
    "tokens-2chunks": (2, (1, 3, 400), -1, {}),
    "maps-2chunks-masks": (3, (1, 400, 2, 2), 1, dict(masks=True)),
    "maps-n4-nan": (4, (1, 5, 2, 3), 1, dict(nan=True)),
}


@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_triton_backward_equals_torch_backward(case, unmerge):
    from maxfusion_kernels.ops.autograd import group_backward
    from maxfusion_kernels.ops.backward import triton_backward

    n, shape, cd, kw = KERNEL_CASES[case]
    feats, grads, info, opt, ms = _kernel_case(n, shape, cd, unmerge, **kw)
    w, m = info.winner.reshape(-1), info.members.reshape(-1)
    expected, _ = group_backward(feats, grads, w, m, opt, ms, [False] * n)
    got = triton_backward([feats], [grads], w, m, opt, None if ms is None else [ms])[0]
    for a, e in zip(got, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert bool(a.isfinite().all())
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("unmerge", [False, True], ids=["merge", "unmerge"])
def test_triton_backward_strided_and_many(unmerge):
    """Groups of different shapes in one launch pair, a strided (generic layout) input view,
    fp16, and output gradients with other strides (expanded, transposed)."""
    from maxfusion_kernels.ops.autograd import group_backward
    from maxfusion_kernels.ops.backward import triton_backward

    g = torch.Generator().manual_seed(4)
    big = [torch.randn((2, 6, 5, 8), generator=g).half() for _ in range(2)]
    grp0 = [b[:, :, 1:4, ::2] for b in big]  # strided sites: the generic layout
    grp1 = [torch.randn((1, 3, 9), generator=g).half() for _ in range(2)]
    groups = [grp0, grp1]
    res, infos = mk.max_fuse_many(groups, unmerge=unmerge, threshold=0.2, return_info=True,
                                  backend="triton")
    n_out = 2 if unmerge else 1
    grads = [[torch.randn(grp[0].shape, generator=g).half() for _ in range(n_out)]
             for grp in groups]
    grads[1][0] = torch.ones(()).half().expand(grp1[0].shape)  # stride 0 (a .sum())
    from maxfusion_kernels.options import resolve_options

    winners = torch.cat([i.winner.reshape(-1) for i in infos])
    members = torch.cat([i.members.reshape(-1) for i in infos])
    opt = resolve_options(grp0, unmerge=unmerge, threshold=0.2)
    got = triton_backward(groups, grads, winners, members, opt)
    for k, grp in enumerate(groups):
        o = resolve_options(grp, unmerge=unmerge, threshold=0.2, channel_dim=1)
        exp, _ = group_backward(grp, grads[k], infos[k].winner.reshape(-1),
                                infos[k].members.reshape(-1), o, None, [False, False])
        for a, e in zip(got[k], exp):
            torch.testing.assert_close(a.float(), e.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("order", ["reverse", ("shuffle", 3)], ids=["reverse", "shuffle"])
def test_triton_backward_program_order(order):
    """Bitwise the same whatever order the programs run in, with garbage in every buffer it
    allocates (a read of unwritten memory would show)."""
    from program_order import garbage_buffers, walk_grid

    from maxfusion_kernels.ops.backward import triton_backward

    feats, grads, info, opt, ms = _kernel_case(3, (1, 400, 2, 2), 1, True, masks=True)
    w, m = info.winner.reshape(-1), info.members.reshape(-1)
    plain = triton_backward([feats], [grads], w, m, opt, [ms])[0]
    with walk_grid(order), garbage_buffers(seed=1):
        walked = triton_backward([feats], [grads], w, m, opt, [ms])[0]
    for a, b in zip(plain, walked):
        assert torch.equal(a, b)


def test_autograd_uses_the_triton_backward(monkeypatch):
    """A differentiated fp32 call on the Triton backend runs the backward kernels (and gives
    the torch formula's gradient)."""
    import maxfusion_kernels.ops.autograd as AG

    calls = []
    real = AG.triton_backward

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(AG, "triton_backward", spy)
    g = torch.Generator().manual_seed(8)
    feats = [torch.randn((1, 4, 3, 3), generator=g) for _ in range(2)]
    grads = []
    for backend in BACKENDS:
        ins = [f.clone().requires_grad_() for f in feats]
        out = mk.max_fuse(ins, unmerge=True, threshold=0.2, backend=backend)
        torch.autograd.backward(out, [torch.full_like(o, k + 1.0) for k, o in enumerate(out)])
        grads.append([f.grad for f in ins])
    assert len(calls) == 1
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
