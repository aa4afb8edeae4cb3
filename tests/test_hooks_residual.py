"""Residual level on the diffusers combiners, called directly with tiny models.

Every fused residual is compared with the float64 reference fusion of the nets' own residuals
(sites within a stated margin of a tie excluded, as in the kernel tests).
"""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from tiny_models import single_thread_fixture
from utils import assert_close, tie_sites

import maxfusion_hooks as mh
from maxfusion_kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")  # diffusers'
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)

TORCH = dict(backend="torch")


def check_merged(fused, group, *, winner=None, what="", **opts):
    """``fused`` is the reference merge of ``group`` (and ``winner`` its winner) at non-ties."""
    cd = opts.get("channel_dim", 1) % group[0].dim()
    ref, info = reference.max_fuse(group, return_info=True, **opts)
    ties = tie_sites(group, info, **opts)
    assert float(ties.float().mean()) <= 0.05, f"{what}: degenerate input, too many near-ties"
    assert_close(fused, ref, fused.dtype, mask=(~ties).unsqueeze(cd), what=what)
    if winner is not None:
        assert torch.equal(winner[~ties], info.winner[~ties]), f"{what}: winner differs"


def count_calls(nets):
    calls = [0] * len(nets)
    handles = []
    for k, net in enumerate(nets):
        def pre(module, args, kwargs, k=k):
            calls[k] += 1
        handles.append(net.register_forward_pre_hook(pre, with_kwargs=True))
    return calls, handles


# ---------------------------------------------------------------------------- ControlNet


@pytest.fixture(scope="module")
def controlnets():
    return [tm.tiny_controlnet(10 + k) for k in range(3)]


def _multi(nets):
    from diffusers import MultiControlNetModel

    return MultiControlNetModel(nets)


def _cn_call(multi, conds, scales, **extra):
    return multi(**tm.unet_inputs(), controlnet_cond=conds, conditioning_scale=scales,
                 return_dict=False, **extra)


@pytest.mark.parametrize("n", [2, 3])
def test_multicontrolnet_merges_residual_by_residual(controlnets, n):
    nets = controlnets[:n]
    multi = _multi(nets)
    conds = tm.strip_conditions(n, 32, batch=2)
    scales = [1.0, 0.6, 1.3][:n]
    summed = _cn_call(multi, conds, scales)
    own = [net(**tm.unet_inputs(), controlnet_cond=c, conditioning_scale=s, return_dict=False)
           for net, c, s in zip(nets, conds, scales)]
    with mh.apply(multi, record=True, **TORCH) as h:
        down, mid = _cn_call(multi, conds, scales)
    assert isinstance(multi, type(multi)) and "forward" not in multi.__dict__
    fused = list(down) + [mid]
    groups = [list(g) for g in zip(*[list(d) + [m] for d, m in own])]
    assert len(fused) == len(groups) == 5 and [r.point for r in h.records] == [
        "down.0", "down.1", "down.2", "down.3", "mid"]
    for k, (f, g, r) in enumerate(zip(fused, groups, h.records)):
        # the nets applied their scales: the residuals arrive scaled, no weights on top
        check_merged(f, g, winner=r.winner, what=f"residual {k}")
    # the fusion is not the sum diffusers computes
    assert not torch.allclose(mid, summed[1])


def test_a_single_scale_applies_to_every_net(controlnets):
    multi = _multi(controlnets[:2])
    conds = tm.strip_conditions(2, 32, batch=2)
    with mh.apply(multi, **TORCH):
        a = _cn_call(multi, conds, 0.8)
        b = _cn_call(multi, conds, [0.8, 0.8])
    assert torch.equal(a[1], b[1]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_scales_are_decision_free_and_weight_the_output(controlnets):
    nets = controlnets[:2]
    multi = _multi(nets)
    conds = tm.strip_conditions(2, 32, batch=2)
    unscaled = [net(**tm.unet_inputs(), controlnet_cond=c, return_dict=False)[1]
                for net, c in zip(nets, conds)]
    with mh.apply(multi, record=True, **TORCH) as h:
        _, mid_1 = _cn_call(multi, conds, [1.0, 1.0])
        _, mid_s = _cn_call(multi, conds, [2.0, 0.5])
    w1, ws = h.records[4].winner, h.records[9].winner
    assert h.records[9].step == 1 and h.records[9].point == "mid"
    assert float((w1 != ws).float().mean()) < 0.01  # scale-free decisions (rounding aside)
    # a scale is the weight of max_fuse
    check_merged(mid_s, unscaled, weights=[2.0, 0.5], what="mid, scaled")
    assert not torch.allclose(mid_1, mid_s)


def test_scale_zero_removes_a_net_without_running_it(controlnets):
    multi = _multi(controlnets)
    conds = tm.strip_conditions(3, 32, batch=2)
    calls, hooks = count_calls(controlnets)
    try:
        with mh.apply(multi, record=True, **TORCH) as h:
            down, mid = _cn_call(multi, conds, [0.8, 0.0, 1.0])
        assert calls == [1, 0, 1]
        assert all(set(r.winner.unique().tolist()) <= {0, 2} for r in h.records)
        assert any(2 in r.winner.unique().tolist() for r in h.records)
        pair = _multi([controlnets[0], controlnets[2]])
        with mh.apply(pair, **TORCH):
            down2, mid2 = _cn_call(pair, [conds[0], conds[2]], [0.8, 1.0])
        assert torch.equal(mid, mid2) and all(torch.equal(a, b) for a, b in zip(down, down2))
        # a single net left: its residuals as they are (what the sum with zeros gives)
        calls[:] = [0, 0, 0]
        with mh.apply(multi, **TORCH):
            down1, mid1 = _cn_call(multi, conds, [0.0, 0.7, 0.0])
        assert calls == [0, 1, 0]
        ref = controlnets[1](**tm.unet_inputs(), controlnet_cond=conds[1],
                             conditioning_scale=0.7, return_dict=False)
        assert torch.equal(mid1, ref[1])
        # every scale 0: one net runs at scale 0 for zeros, like diffusers' sum of zeros
        calls[:] = [0, 0, 0]
        with mh.apply(multi, **TORCH):
            down0, mid0 = _cn_call(multi, conds, [0.0, 0.0, 0.0])
        assert calls == [1, 0, 0]
        zeros = _cn_call(multi, conds, [0.0, 0.0, 0.0])
        assert torch.equal(mid0, zeros[1]) and not mid0.any()
    finally:
        for hk in hooks:
            hk.remove()


@pytest.mark.parametrize("n", [2, 3])
def test_copies_of_one_net_give_its_residuals(controlnets, n):
    net = controlnets[0]
    multi = _multi([net] + [copy.deepcopy(net) for _ in range(n - 1)])
    cond = tm.strip_conditions(1, 32, batch=2)[0]
    alone = net(**tm.unet_inputs(), controlnet_cond=cond, conditioning_scale=0.9,
                return_dict=False)
    with mh.apply(multi, **TORCH):
        down, mid = _cn_call(multi, [cond] * n, [0.9] * n)
    for a, b in zip(list(down) + [mid], list(alone[0]) + [alone[1]]):
        if n == 2:
            assert torch.equal(a, b)  # (f + f) / 2 is exact
        else:
            # float32 (f + f + f) / 3 is within an ulp of f (see docs/integration.md)
            torch.testing.assert_close(a, b, rtol=3e-7, atol=1e-7)


def test_global_pool_residuals_are_averaged(controlnets):
    nets = [tm.tiny_controlnet(20 + k, global_pool=True) for k in range(2)]
    multi = _multi(nets)
    conds = tm.strip_conditions(2, 32, batch=2)
    own = [net(**tm.unet_inputs(), controlnet_cond=c, conditioning_scale=s, return_dict=False)
           for net, c, s in zip(nets, conds, [1.0, 0.5])]
    assert own[0][1].shape == (2, 16, 1, 1)
    with mh.apply(multi, record=True, **TORCH) as h:
        down, mid = _cn_call(multi, conds, [1.0, 0.5])
    assert h.records == []  # nothing to decide: no winner map
    torch.testing.assert_close(mid, (own[0][1] + own[1][1]) / 2, rtol=1e-6, atol=1e-7)
    for k, d in enumerate(down):
        torch.testing.assert_close(d, (own[0][0][k] + own[1][0][k]) / 2, rtol=1e-6, atol=1e-7)
    # the mean does not depend on the order of the nets; "fuse" lets max_fuse decide
    swapped = _multi(nets[::-1])
    with mh.apply(swapped, **TORCH):
        _, mid_sw = _cn_call(swapped, conds[::-1], [0.5, 1.0])
    assert torch.equal(mid_sw, mid)
    with mh.apply(multi, global_pool="fuse", **TORCH):
        _, mid_f = _cn_call(multi, conds, [1.0, 0.5])
    # every normalised saliency is exactly 1: net 0 wins unless the vectors correlate
    ref = reference.max_fuse([own[0][1], own[1][1]])
    assert_close(mid_f, ref, torch.float32, what="global pool, fuse")


def test_default_backend_on_controlnet_residuals(controlnets):
    """The default backend (the Triton kernels, interpreted on CPU in the test suite)."""
    multi = _multi(controlnets[:2])
    conds = tm.strip_conditions(2, 32, batch=2)
    with mh.apply(multi, record=True) as h:
        down, mid = _cn_call(multi, conds, [1.0, 1.0])
    own = [net(**tm.unet_inputs(), controlnet_cond=c, return_dict=False)
           for net, c in zip(controlnets[:2], conds)]
    check_merged(mid, [own[0][1], own[1][1]], winner=h.records[-1].winner, what="mid")
    check_merged(down[0], [own[0][0][0], own[1][0][0]], winner=h.records[0].winner,
                 what="down.0")


# ------------------------------------------------------------------------ ControlNet-Union


def test_multicontrolnet_union():
    from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel

    nets = [tm.tiny_union_controlnet(30 + k) for k in range(2)]
    multi = MultiControlNetUnionModel(nets)
    conds = tm.strip_conditions(2, 32, batch=2)
    ctype = [torch.tensor([[1, 0]] * 2), torch.tensor([[0, 1]] * 2)]
    args = dict(**tm.unet_inputs(), controlnet_cond=[[conds[0]], [conds[1]]],
                control_type=ctype, control_type_idx=[[0], [1]])
    own = [net(**tm.unet_inputs(), controlnet_cond=[c], control_type=t, control_type_idx=[i],
               conditioning_scale=s, from_multi=True, return_dict=False)
           for net, c, t, i, s in zip(nets, conds, ctype, [0, 1], [1.0, 0.7])]
    with mh.apply(multi, record=True, **TORCH) as h:
        down, mid = multi(**args, conditioning_scale=[1.0, 0.7])
        assert multi(**args, conditioning_scale=[0.0, 0.0]) == (None, None)
    check_merged(mid, [own[0][1], own[1][1]], winner=h.records[-1].winner, what="mid")
    check_merged(down[2], [own[0][0][2], own[1][0][2]], winner=h.records[2].winner,
                 what="down.2")


# ------------------------------------------------------------------------------------ SD3


def test_sd3_multicontrolnet():
    from diffusers import SD3MultiControlNetModel

    nets = [tm.tiny_sd3_controlnet(40 + k) for k in range(2)]
    multi = SD3MultiControlNetModel(nets)
    conds = tm.sd3_latent_conditions(2)
    own = [net(**tm.sd3_inputs(), controlnet_cond=c, conditioning_scale=s, return_dict=False)[0]
           for net, c, s in zip(nets, conds, [1.0, 0.8])]
    with mh.apply(multi, record=True, **TORCH) as h:
        out = multi(**tm.sd3_inputs(), controlnet_cond=conds, conditioning_scale=[1.0, 0.8],
                    return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and len(out[0]) == 2
    assert out[0][0].shape == (2, 64, 32)  # [B, tokens, C]: channels last
    assert [r.point for r in h.records] == ["block.0", "block.1"]
    assert h.records[0].winner.shape == (2, 64)
    for k in range(2):
        check_merged(out[0][k], [own[0][k], own[1][k]], winner=h.records[k].winner,
                     channel_dim=-1, what=f"block {k}")


# ----------------------------------------------------------------------------------- Flux


@pytest.mark.parametrize("one_union_net", [False, True])
def test_flux_multicontrolnet(one_union_net):
    from diffusers import FluxMultiControlNetModel

    nets = [tm.tiny_flux_controlnet(50 + k) for k in range(1 if one_union_net else 2)]
    multi = FluxMultiControlNetModel(nets)
    conds = tm.flux_token_conditions(2)
    modes = [torch.tensor([-1] * 2)] * 2
    per_net = nets if not one_union_net else nets * 2
    own = [net(**tm.flux_inputs(), controlnet_cond=c, controlnet_mode=m[:, None],
               conditioning_scale=s, return_dict=False)
           for net, c, m, s in zip(per_net, conds, modes, [1.0, 0.9])]
    calls, hooks = count_calls(nets)
    try:
        with mh.apply(multi, record=True, **TORCH) as h:
            blocks, singles = multi(**tm.flux_inputs(), controlnet_cond=conds,
                                    controlnet_mode=modes, conditioning_scale=[1.0, 0.9],
                                    return_dict=False)
    finally:
        for hk in hooks:
            hk.remove()
    assert sum(calls) == 2  # the single union net runs once per condition
    assert [r.point for r in h.records] == ["block.0", "single.0"]
    check_merged(blocks[0], [own[0][0][0], own[1][0][0]], winner=h.records[0].winner,
                 channel_dim=-1, what="block.0")
    check_merged(singles[0], [own[0][1][0], own[1][1][0]], winner=h.records[1].winner,
                 channel_dim=-1, what="single.0")


# ------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("weights", [[1.0, 0.5], None, 0.8])
def test_multiadapter_weights(weights):
    from diffusers import MultiAdapter

    adapters = [tm.tiny_adapter(60 + k) for k in range(2)]
    multi = MultiAdapter(adapters)
    conds = tm.strip_conditions(2, 32, batch=2)
    feats = [ad(c) for ad, c in zip(adapters, conds)]
    w = [1.0, 1.0] if weights is None else (
        [weights] * 2 if isinstance(weights, float) else weights)
    with mh.apply(multi, record=True, **TORCH) as h:
        out = multi(conds, weights)
    assert isinstance(out, list) and len(out) == 2
    assert [r.point for r in h.records] == ["feature.0", "feature.1"]
    for k in range(2):
        check_merged(out[k], [feats[0][k], feats[1][k]], weights=w, winner=h.records[k].winner,
                     what=f"feature {k}")


def test_multiadapter_zero_weight_skips_the_adapter():
    from diffusers import MultiAdapter

    adapters = [tm.tiny_adapter(60 + k) for k in range(3)]
    multi = MultiAdapter(adapters)
    left, right = tm.strip_conditions(2, 32, batch=1)
    conds = [left, torch.rand(1, 3, 32, 32), right]
    calls, hooks = count_calls(adapters)
    try:
        with mh.apply(multi, **TORCH):
            out = multi(conds, [0.5, 0.0, 1.0])
            zeros = multi(conds, [0.0, 0.0, 0.0])
    finally:
        for hk in hooks:
            hk.remove()
    assert calls == [2, 0, 1]
    feats = [adapters[0](conds[0]), adapters[2](conds[2])]
    for k in range(2):
        check_merged(out[k], [feats[0][k], feats[1][k]], weights=[0.5, 1.0], what=f"f{k}")
        assert zeros[k].shape == feats[0][k].shape and not zeros[k].any()
