"""Block level on diffusers control models, called through their combiners.

The lockstep written out by hand calls the models' own submodules (no forward code is copied
into the library; the test only chains the few modules before the first fusions) and fuses with
the float64 reference. The models run in float64 so the comparison is tight.
"""

from __future__ import annotations

import copy
import re

import pytest
import tiny_models as tm
import torch
from tiny_models import single_thread_fixture

import maxfusion_hooks as mh
from maxfusion_kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")  # diffusers'
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)

TORCH = dict(backend="torch")
F64 = dict(rtol=1e-9, atol=1e-9)


def _double(d: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in d.items()}


def _unmerge(feats, **opts):
    return reference.max_fuse(feats, unmerge=True, **opts)


# ---------------------------------------------------------------------------- ControlNet


def test_controlnet_block_level_by_hand():
    """The first residual of a ControlNet is conv_in + condition embedding: at block level it
    is the fused stream (the in-place input point), through each net's first zero conv."""
    from diffusers import MultiControlNetModel

    nets = [tm.tiny_controlnet(70 + k).double() for k in range(2)]
    multi = MultiControlNetModel(nets)
    conds = [c.double() for c in tm.strip_conditions(2, 32, batch=2)]
    inp = _double(tm.unet_inputs())
    scales = [1.0, 0.7]
    with torch.no_grad():
        with mh.apply(multi, level="block", record=True, **TORCH) as h:
            down, mid = multi(**inp, controlnet_cond=conds, conditioning_scale=scales,
                              return_dict=False)
        emb = [n.conv_in(inp["sample"]) + n.controlnet_cond_embedding(c)
               for n, c in zip(nets, conds)]
        g = _unmerge(emb)
        first = [n.controlnet_down_blocks[0](gi) * s for n, gi, s in zip(nets, g, scales)]
    torch.testing.assert_close(down[0], reference.max_fuse(first), **F64)
    points = [r.point for r in h.records]
    assert points == ["down_blocks.0:input", "down_blocks.0[0]", "down_blocks.0[1][0]",
                      "down_blocks.1[0]", "mid_block", "down.0", "down.1", "down.2", "down.3",
                      "mid"]
    # the fused input: each half of the image is won by its own condition's net
    w = h.records[0].winner
    left, right = tm.strip_masks(2, w.shape[-2:])
    assert float((w[:, left] == 0).float().mean()) >= 0.8
    assert float((w[:, right] == 1).float().mean()) >= 0.8


@pytest.mark.parametrize("n", [2, 3])
def test_controlnet_copies_are_the_identity(n):
    from diffusers import MultiControlNetModel

    net = tm.tiny_controlnet(71)
    multi = MultiControlNetModel([net] + [copy.deepcopy(net) for _ in range(n - 1)])
    cond = tm.strip_conditions(1, 32, batch=2)[0]
    with torch.no_grad():
        alone = net(**tm.unet_inputs(), controlnet_cond=cond, conditioning_scale=0.8,
                    return_dict=False)
        with mh.apply(multi, level="block", **TORCH):
            down, mid = multi(**tm.unet_inputs(), controlnet_cond=[cond] * n,
                              conditioning_scale=[0.8] * n, return_dict=False)
    for a, b in zip(list(down) + [mid], list(alone[0]) + [alone[1]]):
        if n == 2:
            assert torch.equal(a, b)
        else:  # float32 (f + f + f) / 3 is within an ulp of f, at every fusion point
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_same_instance_twice_runs_in_lockstep_with_itself():
    """One net listed twice (the hooks are shared; the greenlet tells the streams apart)."""
    from diffusers import MultiControlNetModel

    net = tm.tiny_controlnet(72)
    multi = MultiControlNetModel([net, net])
    conds = tm.strip_conditions(2, 32, batch=2)
    twin = MultiControlNetModel([net, copy.deepcopy(net)])
    with torch.no_grad():
        with mh.apply(multi, level="block", **TORCH):
            a = multi(**tm.unet_inputs(), controlnet_cond=conds, conditioning_scale=[1.0, 1.0],
                      return_dict=False)
        with mh.apply(twin, level="block", **TORCH):
            b = twin(**tm.unet_inputs(), controlnet_cond=conds, conditioning_scale=[1.0, 1.0],
                     return_dict=False)
    assert torch.equal(a[1], b[1]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_block_level_skips_nets_of_scale_zero():
    from diffusers import MultiControlNetModel

    nets = [tm.tiny_controlnet(73 + k) for k in range(3)]
    multi = MultiControlNetModel(nets)
    pair = MultiControlNetModel([nets[0], nets[2]])
    conds = tm.strip_conditions(3, 32, batch=2)
    calls = []
    hooks = [n.mid_block.register_forward_hook(lambda *a, k=k: calls.append(k))
             for k, n in enumerate(nets)]
    try:
        with torch.no_grad():
            with mh.apply(multi, level="block", record=True, **TORCH) as h:
                a = multi(**tm.unet_inputs(), controlnet_cond=conds,
                          conditioning_scale=[1.0, 0.0, 0.5], return_dict=False)
            with mh.apply(pair, level="block", **TORCH):
                b = pair(**tm.unet_inputs(), controlnet_cond=[conds[0], conds[2]],
                         conditioning_scale=[1.0, 0.5], return_dict=False)
    finally:
        for hk in hooks:
            hk.remove()
    assert sorted(calls) == [0, 0, 2, 2]
    assert torch.equal(a[1], b[1])
    assert all(set(r.winner.unique().tolist()) <= {0, 2} for r in h.records)


def test_block_level_refuses_different_architectures():
    from diffusers import ControlNetModel, MultiControlNetModel

    other = ControlNetModel(
        block_out_channels=(8, 32), layers_per_block=1, in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        norm_num_groups=4, attention_head_dim=2, conditioning_embedding_out_channels=(8, 16),
    )
    multi = MultiControlNetModel([tm.tiny_controlnet(74), other])
    with pytest.raises(ValueError, match="identical architecture"):
        mh.apply(multi, level="block")
    assert "forward" not in multi.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks
               for net in multi.nets for m in net.modules())
    # a global-pool ControlNet differs from a plain one only in its config
    pooled = MultiControlNetModel([tm.tiny_controlnet(74), tm.tiny_controlnet(75,
                                                                              global_pool=True)])
    with pytest.raises(ValueError, match="config"):
        mh.apply(pooled, level="block")
    mh.apply(pooled, level="residual").remove()  # residual level does not need it


def test_controlnet_union_block_level():
    from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel

    net = tm.tiny_union_controlnet(76)
    multi = MultiControlNetUnionModel([net, copy.deepcopy(net)])
    other = MultiControlNetUnionModel([net, tm.tiny_union_controlnet(77)])
    cond = tm.strip_conditions(1, 32, batch=2)[0]
    ctype = torch.tensor([[1, 0]] * 2)
    args = dict(**tm.unet_inputs(), controlnet_cond=[[cond], [cond]], control_type=[ctype] * 2,
                control_type_idx=[[0], [0]], conditioning_scale=[1.0, 1.0], return_dict=False)
    with torch.no_grad():
        alone = net(**tm.unet_inputs(), controlnet_cond=[cond], control_type=ctype,
                    control_type_idx=[0], conditioning_scale=1.0, from_multi=True,
                    return_dict=False)
        with mh.apply(multi, level="block", **TORCH):
            down, mid = multi(**args)
        with mh.apply(other, level="block", record=True, **TORCH) as h:
            other(**args)
    assert torch.equal(mid, alone[1])
    assert all(torch.equal(a, b) for a, b in zip(down, alone[0]))
    assert "down_blocks.0:input" in [r.point for r in h.records]


# ------------------------------------------------------------------------------ adapters


def test_adapter_block_level_by_hand():
    """T2I-Adapter: unmerge after conv_in and every body block; the features it emits are the
    body outputs, so the final merge is of the features that entered those fusions."""
    from diffusers import MultiAdapter

    adapters = [tm.tiny_adapter(80 + k).double() for k in range(2)]
    multi = MultiAdapter(adapters)
    conds = [c.double() for c in tm.strip_conditions(2, 32, batch=2)]
    w = [1.0, 0.5]
    with torch.no_grad():
        with mh.apply(multi, level="block", record=True, **TORCH) as h:
            feats = multi(conds, w)
        inner = [a.adapter for a in adapters]
        x = _unmerge([m.conv_in(m.unshuffle(c)) for m, c in zip(inner, conds)])
        expected = []
        for k in range(len(inner[0].body)):
            b = [m.body[k](xi) for m, xi in zip(inner, x)]
            expected.append(reference.max_fuse(b, weights=w))
            x = _unmerge(b)
    assert len(feats) == len(expected) == 2
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e, **F64)
    assert [r.point for r in h.records] == ["adapter.conv_in", "adapter.body.0",
                                            "adapter.body.1", "feature.0", "feature.1"]


def test_adapter_copies_are_the_identity():
    from diffusers import MultiAdapter

    ad = tm.tiny_adapter(81)
    multi = MultiAdapter([ad, copy.deepcopy(ad)])
    cond = tm.strip_conditions(1, 32, batch=1)[0]
    with torch.no_grad():
        alone = ad(cond)
        with mh.apply(multi, level="block", **TORCH):
            feats = multi([cond, cond], [1.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(feats, alone))


# ------------------------------------------------------------------------------------ SD3


def test_sd3_block_level_by_hand():
    from diffusers import SD3MultiControlNetModel

    nets = [tm.tiny_sd3_controlnet(90 + k).double() for k in range(2)]
    multi = SD3MultiControlNetModel(nets)
    conds = [c.double() for c in tm.sd3_latent_conditions(2)]
    inp = _double(tm.sd3_inputs())
    scales = [1.0, 0.6]
    cd = dict(channel_dim=-1)
    with torch.no_grad():
        with mh.apply(multi, level="block", record=True, **TORCH) as h:
            (blocks,) = multi(**inp, controlnet_cond=conds, conditioning_scale=scales,
                              return_dict=False)
        # embed (the modules the forward chains before its first transformer block)
        emb = [n.pos_embed(inp["hidden_states"]) + n.pos_embed_input(c)
               for n, c in zip(nets, conds)]
        temb = [n.time_text_embed(inp["timestep"], inp["pooled_projections"]) for n in nets]
        ctx = [n.context_embedder(inp["encoder_hidden_states"]) for n in nets]
        g = _unmerge(emb, **cd)
        h0 = [n.transformer_blocks[0](hidden_states=gi, encoder_hidden_states=c, temb=t)[1]
              for n, gi, c, t in zip(nets, g, ctx, temb)]
        g0 = _unmerge(h0, **cd)
        r0 = [n.controlnet_blocks[0](gi) * s for n, gi, s in zip(nets, g0, scales)]
    torch.testing.assert_close(blocks[0], reference.max_fuse(r0, **cd), **F64)
    assert [r.point for r in h.records] == [
        "transformer_blocks.0:input", "transformer_blocks.0[1]", "transformer_blocks.1[1]",
        "block.0", "block.1"]


def test_sd3_copies_are_the_identity():
    from diffusers import SD3MultiControlNetModel

    net = tm.tiny_sd3_controlnet(91)
    multi = SD3MultiControlNetModel([net, copy.deepcopy(net)])
    cond = tm.sd3_latent_conditions(1)[0]
    with torch.no_grad():
        alone = net(**tm.sd3_inputs(), controlnet_cond=cond, return_dict=False)[0]
        with mh.apply(multi, level="block", **TORCH):
            (blocks,) = multi(**tm.sd3_inputs(), controlnet_cond=[cond, cond],
                              conditioning_scale=[1.0, 1.0], return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(blocks, alone))


# ----------------------------------------------------------------------------------- Flux


def test_flux_block_level():
    from diffusers import FluxMultiControlNetModel

    net = tm.tiny_flux_controlnet(95)
    twins = FluxMultiControlNetModel([net, copy.deepcopy(net)])
    pair = FluxMultiControlNetModel([net, tm.tiny_flux_controlnet(96)])
    conds = tm.flux_token_conditions(2)
    modes = [torch.tensor([-1] * 2)] * 2
    with torch.no_grad():
        alone = net(**tm.flux_inputs(), controlnet_cond=conds[0], controlnet_mode=modes[0][:, None],
                    return_dict=False)
        with mh.apply(twins, level="block", **TORCH):
            same = twins(**tm.flux_inputs(), controlnet_cond=[conds[0]] * 2,
                         controlnet_mode=modes, conditioning_scale=[1.0, 1.0], return_dict=False)
        with mh.apply(pair, level="block", record=True, **TORCH) as h:
            block = pair(**tm.flux_inputs(), controlnet_cond=conds, controlnet_mode=modes,
                         conditioning_scale=[1.0, 1.0], return_dict=False)
        with mh.apply(pair, level="residual", **TORCH):
            resid = pair(**tm.flux_inputs(), controlnet_cond=conds, controlnet_mode=modes,
                         conditioning_scale=[1.0, 1.0], return_dict=False)
    assert torch.equal(same[0][0], alone[0][0]) and torch.equal(same[1][0], alone[1][0])
    # one ControlNet(-Union) run once per condition: the same instance in lockstep with itself
    single = FluxMultiControlNetModel([net])
    with torch.no_grad(), mh.apply(single, level="block", **TORCH):
        once = single(**tm.flux_inputs(), controlnet_cond=[conds[0]] * 2, controlnet_mode=modes,
                      conditioning_scale=[1.0, 1.0], return_dict=False)
    assert torch.equal(once[0][0], alone[0][0]) and torch.equal(once[1][0], alone[1][0])
    assert [r.point for r in h.records] == [
        "transformer_blocks.0:input", "transformer_blocks.0[1]",
        "single_transformer_blocks.0[1]", "block.0", "single.0"]
    assert h.records[0].winner.shape == (2, 64)  # one winner per image token
    # the lockstep changes the streams after the first fusion: block != residual level
    assert not torch.allclose(block[1][0], resid[1][0])


# ------------------------------------------------------------------------ lists of models


def test_a_list_of_controlnets_equals_the_combiner():
    """apply() on a list of diffusers models finds the family's fusion points by itself."""
    from diffusers import MultiControlNetModel

    nets = [tm.tiny_controlnet(100 + k) for k in range(2)]
    multi = MultiControlNetModel(nets)
    conds = tm.strip_conditions(2, 32, batch=2)
    with torch.no_grad():
        with mh.apply(multi, level="block", record=True, **TORCH) as h1:
            down, mid = multi(**tm.unet_inputs(), controlnet_cond=conds,
                              conditioning_scale=[1.0, 1.0], return_dict=False)
        with mh.apply(nets, level="block", record=True, **TORCH) as h2:
            out = h2.run([(), ()], [dict(**tm.unet_inputs(), controlnet_cond=c,
                                         return_dict=False) for c in conds])
    assert torch.equal(out[1], mid) and all(torch.equal(a, b) for a, b in zip(out[0], down))
    inner = [r.point for r in h1.records if not re.fullmatch(r"down\.\d+|mid", r.point)]
    assert inner == [r.point for r in h2.records][: len(inner)]
    assert [r.point for r in h2.records][len(inner):] == [f"out[0][{k}]" for k in range(4)] + [
        "out[1]"]


def test_combiner_family_fixes_the_channel_dim():
    from diffusers import SD3MultiControlNetModel

    multi = SD3MultiControlNetModel([tm.tiny_sd3_controlnet(0, driven=False)] * 2)
    with pytest.raises(ValueError, match="channels at dim -1"):
        mh.apply(multi, channel_dim=1)
    mh.apply(multi, channel_dim=-1).remove()


@pytest.mark.parametrize("adapter_type,channels", [("full_adapter_xl", (8, 16, 16, 16)),
                                                   ("light_adapter", (8, 16))])
def test_other_adapter_types_at_block_level(adapter_type, channels):
    from diffusers import MultiAdapter, T2IAdapter

    torch.manual_seed(0)
    ad = tm.make_condition_driven(T2IAdapter(in_channels=3, channels=channels,
                                             num_res_blocks=1, downscale_factor=2,
                                             adapter_type=adapter_type).eval())
    other = copy.deepcopy(ad)
    tm.make_condition_driven(other, seed=5)
    cond = tm.strip_conditions(1, 32, batch=1)[0]
    with torch.no_grad():
        alone = ad(cond)
        with mh.apply(MultiAdapter([ad, copy.deepcopy(ad)]), level="block", **TORCH) as h:
            same = h._combiner([cond, cond], [1.0, 1.0])
        pair = MultiAdapter([ad, other])
        with mh.apply(pair, level="block", record=True, **TORCH) as h:
            fused = pair(tm.strip_conditions(2, 32, batch=1), [1.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(same, alone))
    assert len(fused) == len(alone)
    n_inner = len(ad.adapter.body) + hasattr(ad.adapter, "conv_in")
    assert len(h.records) == n_inner + len(alone)
