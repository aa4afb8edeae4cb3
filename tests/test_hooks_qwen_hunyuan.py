"""QwenImage and HunyuanDiT ControlNets: both combiners at both levels, with masks, and their
pipelines end to end (tiny random models built from config, 2 denoising steps).

One file (over 400 lines) because both families share the combiner fixtures, the token-grid masks
and the float64 checks.

``QwenImageMultiControlNetModel`` in diffusers 0.42 runs one ControlNet-Union once per
condition and sums, and raises "only supports a single controlnet-union now" for several
ControlNets; with MaxFusion applied it fuses the conditions of the union net, or runs several
nets on their conditions and fuses them; after ``remove()`` it is exactly diffusers' again, error
included. ``HunyuanDiT2DMultiControlNetModel`` sums several ControlNets.

The QwenImage pipelines run with a tiny Qwen2.5-VL text encoder and a byte-level Qwen2
tokenizer built in memory (prompts as strings); the HunyuanDiT pipeline on precomputed prompt
embeddings (its BERT / T5 encoders are not built).
"""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from tiny_models import single_thread_fixture

import maxfusion_hooks as mh
from maxfusion_hooks.handlers import find_combiner, find_family
from maxfusion_kernels import reference

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)

TORCH = dict(backend="torch")
LEVELS = ["residual", "block"]
F64 = dict(rtol=1e-9, atol=1e-9)
CD = dict(channel_dim=-1)
REFUSED = "only supports a single controlnet-union now"


def _double(d: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in d.items()}


def _strip_fractions(winner, n, grid=(8, 8)):
    """Per vertical strip k of the token grid, the fraction of its tokens won by net k."""
    w = winner.reshape(winner.shape[0], *grid)
    return [float((w[:, m] == k).float().mean()) for k, m in enumerate(tm.strip_masks(n, grid))]


def _halves(h, w):
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1.0
    return [left, 1.0 - left]


def _region(winner, grid):
    """0 on the left half of the token grid, 1 on the right."""
    w = winner.reshape(-1, *grid)
    return (torch.arange(grid[1]) >= grid[1] // 2).long().expand_as(w)


def _no_patches(combiner):
    return "forward" not in combiner.__dict__ and all(
        not m._forward_hooks and not m._forward_pre_hooks
        for net in combiner.nets for m in net.modules())


def _qwen_multi(nets):
    from diffusers import QwenImageMultiControlNetModel

    return QwenImageMultiControlNetModel(nets)


def _hunyuan_multi(nets):
    from diffusers import HunyuanDiT2DMultiControlNetModel

    return HunyuanDiT2DMultiControlNetModel(nets)


def _qwen_call(multi, conds, scales, inputs=None):
    return multi(**(inputs or tm.qwen_inputs()), controlnet_cond=conds,
                 conditioning_scale=scales, return_dict=False)


def _hunyuan_call(multi, conds, scales, inputs=None):
    return multi(**(inputs or tm.hunyuan_inputs()), controlnet_cond=conds,
                 conditioning_scale=scales, return_dict=False)[0]


# ------------------------------------------------------------------ QwenImage combiner


@pytest.mark.parametrize("level", LEVELS)
def test_several_qwen_controlnets_refused_by_diffusers_fused_by_maxfusion(level):
    multi = _qwen_multi([tm.tiny_qwen_controlnet(20 + k) for k in range(2)])
    conds = tm.token_strip_conditions(2)
    with torch.no_grad():
        with pytest.raises(ValueError, match=REFUSED):
            _qwen_call(multi, conds, [1.0, 0.7])
        with mh.apply(multi, level=level, record=True, **TORCH) as h:
            out = _qwen_call(multi, conds, [1.0, 0.7])
        assert _no_patches(multi)
        with pytest.raises(ValueError, match=REFUSED):  # removed: diffusers' own error again
            _qwen_call(multi, conds, [1.0, 0.7])
    assert isinstance(out, list) and len(out) == 2
    assert all(t.shape == (2, 64, 16) and torch.isfinite(t).all() for t in out)
    # conditions on their own strips of tokens: every residual (residual level) and the
    # first fusions inside the nets (block level) are won by each condition's net
    first = {"residual": ["block.0", "block.1"],
             "block": ["transformer_blocks.0:input", "transformer_blocks.0[1]"]}[level]
    by_point = {r.point: r for r in h.records}
    for p in first:
        fr = _strip_fractions(by_point[p].winner, 2)
        assert min(fr) >= 0.9, (p, fr)


def test_qwen_residuals_equal_the_reference():
    nets = [tm.tiny_qwen_controlnet(22 + k).double() for k in range(2)]
    multi = _qwen_multi(nets)
    conds = [c.double() for c in tm.token_strip_conditions(2)]
    inp = _double(tm.qwen_inputs())
    scales = [1.0, 0.6]
    with torch.no_grad():
        own = [net(**inp, controlnet_cond=c, conditioning_scale=s, return_dict=False)
               for net, c, s in zip(nets, conds, scales)]
        with mh.apply(multi, record=True, **TORCH) as h:
            out = _qwen_call(multi, conds, scales, inp)
    for k, t in enumerate(out):
        ref, info = reference.max_fuse([o[k] for o in own], return_info=True, **CD)
        torch.testing.assert_close(t, ref, **F64)
        assert torch.equal(h.records[k].winner, info.winner)
    assert [r.point for r in h.records] == ["block.0", "block.1"]


@pytest.mark.parametrize("n", [2, 3])
def test_one_qwen_union_net_on_n_conditions(n):
    """diffusers' path: one net run once per condition. Diffusers sums; MaxFusion fuses the
    conditions' residuals (the float64 reference); removed, the sum again, bitwise."""
    net = tm.tiny_qwen_controlnet(24).double()
    multi = _qwen_multi([net])
    conds = [c.double() for c in tm.token_strip_conditions(n)]
    inp = _double(tm.qwen_inputs())
    scales = [1.0, 0.8, 0.5][:n]
    with torch.no_grad():
        own = [net(**inp, controlnet_cond=c, conditioning_scale=s, return_dict=False)
               for c, s in zip(conds, scales)]
        summed = _qwen_call(multi, conds, scales, inp)
        with mh.apply(multi, record=True, **TORCH) as h:
            fused = _qwen_call(multi, conds, scales, inp)
        after = _qwen_call(multi, conds, scales, inp)
    for k in range(2):
        torch.testing.assert_close(summed[k], sum(o[k] for o in own), **F64)  # diffusers
        torch.testing.assert_close(fused[k], reference.max_fuse([o[k] for o in own], **CD),
                                   **F64)
        assert torch.equal(after[k], summed[k])
    assert set(h.records[0].winner.unique().tolist()) <= set(range(n))
    assert _no_patches(multi)


def test_qwen_union_net_at_block_level_copies_are_the_identity():
    """The same instance run once per condition, in lockstep with itself: on one condition
    twice it is the net alone (bitwise, N = 2)."""
    net = tm.tiny_qwen_controlnet(25)
    multi = _qwen_multi([net])
    cond = tm.token_strip_conditions(1)[0]
    with torch.no_grad():
        alone = net(**tm.qwen_inputs(), controlnet_cond=cond, conditioning_scale=0.9,
                    return_dict=False)
        with mh.apply(multi, level="block", record=True, **TORCH) as h:
            same = _qwen_call(multi, [cond, cond], [0.9, 0.9])
            other = _qwen_call(multi, tm.token_strip_conditions(2), [0.9, 0.9])
    assert all(torch.equal(a, b) for a, b in zip(same, alone))
    assert not torch.allclose(other[0], alone[0])
    assert h.records[0].point == "transformer_blocks.0:input"


def test_qwen_scale_zero_skips_a_condition():
    net = tm.tiny_qwen_controlnet(26)
    multi = _qwen_multi([net])
    conds = tm.token_strip_conditions(2)
    calls = []
    hook = net.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            alone = net(**tm.qwen_inputs(), controlnet_cond=conds[0], conditioning_scale=0.7,
                        return_dict=False)
            calls.clear()
            for level in LEVELS:
                with mh.apply(multi, level=level, record=True, **TORCH) as h:
                    out = _qwen_call(multi, conds, [0.7, 0.0])
                assert all(torch.equal(a, b) for a, b in zip(out, alone)), level
                assert h.records == []  # one condition left: nothing to fuse
    finally:
        hook.remove()
    assert calls == [1, 1]  # one forward per call: the condition of scale 0 does not run


def test_qwen_counts_are_checked():
    multi = _qwen_multi([tm.tiny_qwen_controlnet(27 + k, driven=False) for k in range(2)])
    conds = tm.token_strip_conditions(3)
    with mh.apply(multi, **TORCH):
        with pytest.raises(ValueError, match="has 2 ControlNets but got 3 conditions"):
            _qwen_call(multi, conds, [1.0] * 3)
        with pytest.raises(ValueError, match="got 3 conditioning scales for 2 conditions"):
            _qwen_call(multi, conds[:2], [1.0] * 3)


# ------------------------------------------------------------------ HunyuanDiT combiner


@pytest.mark.parametrize("level", LEVELS)
def test_hunyuan_combiner(level):
    nets = [tm.tiny_hunyuan_controlnet(30 + k) for k in range(2)]
    multi = _hunyuan_multi(nets)
    conds = tm.sd3_latent_conditions(2)  # latent-space conditions on vertical strips
    with torch.no_grad():
        summed = multi(**tm.hunyuan_inputs(), controlnet_cond=conds,
                       conditioning_scale=[1.0, 0.7], return_dict=False)
        with mh.apply(multi, level=level, record=True, **TORCH) as h:
            out = multi(**tm.hunyuan_inputs(), controlnet_cond=conds,
                        conditioning_scale=[1.0, 0.7], return_dict=False)
        after = multi(**tm.hunyuan_inputs(), controlnet_cond=conds,
                      conditioning_scale=[1.0, 0.7], return_dict=False)
    assert _no_patches(multi)
    assert isinstance(out, tuple) and len(out) == 1 and len(out[0]) == 2  # diffusers' layout
    assert all(torch.equal(a, b) for a, b in zip(after[0], summed[0]))
    assert not torch.allclose(out[0][0], summed[0][0])
    first = {"residual": ["block.0", "block.1"], "block": ["blocks.0:input", "blocks.0"]}[level]
    by_point = {r.point: r for r in h.records}
    for p in first:
        fr = _strip_fractions(by_point[p].winner, 2)
        assert min(fr) >= 0.9, (p, fr)


def test_hunyuan_residuals_equal_the_reference():
    nets = [tm.tiny_hunyuan_controlnet(32 + k).double() for k in range(2)]
    multi = _hunyuan_multi(nets)
    conds = [c.double() for c in tm.sd3_latent_conditions(2)]
    inp = _double(tm.hunyuan_inputs())
    scales = [0.9, 1.0]
    with torch.no_grad():
        own = [net(**inp, controlnet_cond=c, conditioning_scale=s, return_dict=False)[0]
               for net, c, s in zip(nets, conds, scales)]
        with mh.apply(multi, record=True, **TORCH) as h:
            out = _hunyuan_call(multi, conds, scales, inp)
    for k, t in enumerate(out):
        ref, info = reference.max_fuse([o[k] for o in own], return_info=True, **CD)
        torch.testing.assert_close(t, ref, **F64)
        assert torch.equal(h.records[k].winner, info.winner)


def test_hunyuan_copies_are_the_identity_and_counts_are_checked():
    net = tm.tiny_hunyuan_controlnet(34)
    multi = _hunyuan_multi([net, copy.deepcopy(net)])
    cond = tm.sd3_latent_conditions(1)[0]
    with torch.no_grad():
        alone = net(**tm.hunyuan_inputs(), controlnet_cond=cond, conditioning_scale=1.0,
                    return_dict=False)[0]
        with mh.apply(multi, level="block", **TORCH):
            same = _hunyuan_call(multi, [cond, cond], [1.0, 1.0])
            with pytest.raises(ValueError, match="has 2 ControlNets but got 1 conditions"):
                _hunyuan_call(multi, [cond], [1.0])
            # a single number is every net's scale (diffusers' combiner needs a list)
            single = _hunyuan_call(multi, [cond, cond], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(same, alone))
    assert all(torch.equal(a, b) for a, b in zip(single, alone))


# ------------------------------------------------------------- block level, by hand


def _family_case(family):
    """Nets (float64), their combiner, conditions, inputs, the embedding that enters the first
    block (computed from the nets' own submodules), the call, the first block list and the
    position of the image tokens in a block's output."""
    if family == "qwen":
        nets = [tm.tiny_qwen_controlnet(40 + k).double() for k in range(2)]
        conds = [c.double() for c in tm.token_strip_conditions(2)]
        inp = _double(tm.qwen_inputs())
        emb = [n.img_in(inp["hidden_states"]) + n.controlnet_x_embedder(c)
               for n, c in zip(nets, conds)]
        return (nets, _qwen_multi(nets), conds, inp, emb, _qwen_call,
                lambda n: n.transformer_blocks, 1, "transformer_blocks")
    nets = [tm.tiny_hunyuan_controlnet(42 + k).double() for k in range(2)]
    conds = [c.double() for c in tm.sd3_latent_conditions(2)]
    inp = _double(tm.hunyuan_inputs())
    emb = [n.pos_embed(inp["hidden_states"]) + n.input_block(n.pos_embed(c))
           for n, c in zip(nets, conds)]
    return (nets, _hunyuan_multi(nets), conds, inp, emb, _hunyuan_call, lambda n: n.blocks,
            None, "blocks")


@pytest.mark.parametrize("family", ["qwen", "hunyuan"])
def test_block_level_by_hand(family):
    """The first block gets the unmerge of the embeddings; every block's image tokens are
    fused; each residual is the merge of the nets' zero linears applied to their fused
    streams, times their scales."""
    nets, multi, conds, inp, emb, call, blocks, leaf, prefix = _family_case(family)
    scales = [1.0, 0.6]
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[tuple[int, int], torch.Tensor] = {}
    with torch.no_grad():
        with mh.apply(multi, level="block", record=True, **TORCH) as h:
            # registered after apply's hooks: they see the fused streams
            hooks = []
            for i, n in enumerate(nets):
                def pre(m, args, kwargs, i=i):
                    seen_in[i] = kwargs["hidden_states"] if "hidden_states" in kwargs \
                        else args[0]
                hooks.append(blocks(n)[0].register_forward_pre_hook(pre, with_kwargs=True))
                for k, b in enumerate(blocks(n)):
                    def post(m, args, out, i=i, k=k):
                        seen_out[(i, k)] = out if leaf is None else out[leaf]
                    hooks.append(b.register_forward_hook(post))
            out = call(multi, conds, scales, inp)
            for hk in hooks:
                hk.remove()
        g = reference.max_fuse(emb, unmerge=True, **CD)
        for i in range(2):
            torch.testing.assert_close(seen_in[i], g[i], **F64)
        for k, t in enumerate(out):
            res = [n.controlnet_blocks[k](seen_out[(i, k)]) * s
                   for i, (n, s) in enumerate(zip(nets, scales))]
            torch.testing.assert_close(t, reference.max_fuse(res, **CD), **F64)
    n_blocks = len(blocks(nets[0]))
    inner = [f"{prefix}.0:input"] + [f"{prefix}.{k}" + ("" if leaf is None else f"[{leaf}]")
                                     for k in range(n_blocks)]
    assert [r.point for r in h.records] == inner + [f"block.{k}" for k in range(n_blocks)]
    assert all(r.winner.shape == (2, 64) for r in h.records)  # one winner per image token
    assert _no_patches(multi)


def test_families_and_token_grids():
    from maxfusion_hooks.handlers import HunyuanDiTMultiControlNet, QwenImageMultiControlNet

    q = tm.tiny_qwen_controlnet(1, driven=False)
    hy = tm.tiny_hunyuan_controlnet(1, driven=False)
    assert find_family(q).channel_dim == -1 and find_family(hy).channel_dim == -1
    qm, hm = _qwen_multi([q]), _hunyuan_multi([hy])
    assert isinstance(find_combiner(qm), QwenImageMultiControlNet)
    assert isinstance(find_combiner(hm), HunyuanDiTMultiControlNet)
    # QwenImage: the packed grid of img_shapes (one (frames, h, w) per sample, or a list)
    assert find_combiner(qm).token_grid(qm, {"img_shapes": [(1, 8, 12)] * 2}) == (8, 12)
    assert find_combiner(qm).token_grid(qm, {"img_shapes": [[(1, 6, 5), (1, 6, 5)]]}) == (6, 5)
    assert find_combiner(qm).token_grid(qm, {"img_shapes": None}) is None
    # HunyuanDiT: the latents over the patch size
    x = torch.zeros(1, 4, 16, 24)
    assert find_combiner(hm).token_grid(hm, {"hidden_states": x}) == (8, 12)
    # one net alone is still refused (nothing to fuse with)
    with pytest.raises(TypeError, match="single model has nothing to fuse with"):
        mh.apply(q)


@pytest.mark.parametrize("level", LEVELS)
def test_combiners_with_masks(level):
    """Conditions over every token; masks on the two halves of a non-square image: each half
    is won by its own net at every fusion (the token grid of the call: 8 x 12)."""
    g = torch.Generator().manual_seed(5)
    qinp = tm.qwen_inputs()
    qinp.update(hidden_states=torch.randn(2, 96, 16, generator=g), img_shapes=[(1, 8, 12)] * 2)
    qconds = [torch.randn(2, 96, 16, generator=g) for _ in range(2)]
    hinp = tm.hunyuan_inputs()
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    hinp.update(hidden_states=torch.randn(2, 4, 16, 24, generator=g),
                image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (8, 12)), (8, 12),
                                                         output_type="pt"))
    hconds = [torch.randn(2, 4, 16, 24, generator=g) for _ in range(2)]
    cases = [(_qwen_multi([tm.tiny_qwen_controlnet(50 + k) for k in range(2)]), _qwen_call,
              qconds, qinp),
             (_qwen_multi([tm.tiny_qwen_controlnet(52)]), _qwen_call, qconds, qinp),  # union
             (_hunyuan_multi([tm.tiny_hunyuan_controlnet(53 + k) for k in range(2)]),
              _hunyuan_call, hconds, hinp)]
    for multi, call, conds, inp in cases:
        with torch.no_grad(), mh.apply(multi, level=level, record=True, masks=_halves(32, 48),
                                       **TORCH) as h:
            out = call(multi, conds, [1.0, 0.8], inp)
        assert all(torch.isfinite(t).all() for t in out)
        assert len(h.records) == (2 if level == "residual" else 5)
        for r in h.records:
            assert r.winner.shape == (2, 96), r.point
            assert torch.equal(r.winner.reshape(2, 8, 12), _region(r.winner, (8, 12))), r.point


# ------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def qwen_pipes():
    return {n: tm.qwen_controlnet_pipeline(n) for n in (1, 2)}


def _qwen_run(pipe, conds, h=32, w=32, **kw):
    return pipe("a red cat", negative_prompt="blurry", true_cfg_scale=2.0, control_image=conds,
                controlnet_conditioning_scale=[1.0, 0.7], num_inference_steps=2, height=h,
                width=w, output_type="latent", generator=torch.Generator().manual_seed(0),
                **kw).images


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n", [1, 2], ids=["one-union-net", "two-nets"])
def test_qwen_controlnet_pipeline(qwen_pipes, n, level):
    """One union net on two conditions (diffusers sums) or two ControlNets (diffusers
    refuses); fused with MaxFusion; removed: as before, bitwise or the same error."""
    pipe = qwen_pipes[n]
    conds = tm.strip_conditions(2, 32)
    if n == 1:
        before = _qwen_run(pipe, conds)
    else:
        with pytest.raises(ValueError, match=REFUSED):
            _qwen_run(pipe, conds)
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        fused = _qwen_run(pipe, conds)
    if n == 1:
        assert torch.equal(_qwen_run(pipe, conds), before)
        assert not torch.allclose(fused, before)
    else:
        with pytest.raises(ValueError, match=REFUSED):
            _qwen_run(pipe, conds)
    assert _no_patches(pipe.controlnet)
    assert fused.shape == (1, 64, 16) and torch.isfinite(fused).all()
    # the ControlNets run once per step on the conditional prompt (true CFG reuses them)
    assert h.steps == 2 and {r.step for r in h.records} == {0, 1}
    assert all(r.winner.shape == (1, 64) for r in h.records)
    assert {"block.0", "block.1"} <= {r.point for r in h.records}


def test_qwen_pipeline_with_prompt_embeds_equals_the_text_encoder_path(qwen_pipes):
    """The tokenizer / text-encoder path and precomputed embeddings give the same latents
    (so the fused pipeline is tested with the text encoder in the loop)."""
    pipe = qwen_pipes[2]
    conds = tm.strip_conditions(2, 32)
    embeds, mask = pipe.encode_prompt("a red cat", device=torch.device("cpu"))
    neg, neg_mask = pipe.encode_prompt("blurry", device=torch.device("cpu"))
    with mh.apply(pipe, **TORCH):
        a = _qwen_run(pipe, conds)
        b = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                 negative_prompt_embeds_mask=neg_mask, true_cfg_scale=2.0, control_image=conds,
                 controlnet_conditioning_scale=[1.0, 0.7], num_inference_steps=2, height=32,
                 width=32, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    assert embeds.shape[0] == 1 and embeds.shape[-1] == 16
    assert torch.equal(a, b)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n", [1, 2], ids=["one-union-net", "two-nets"])
def test_qwen_controlnet_inpaint_pipeline(n, level):
    """QwenImageControlNetInpaintPipeline prepares the (masked image, mask) condition for a
    single ControlNet only; with a combiner, the conditions are given prepared and stacked
    ([N, B, tokens, C], one per condition: the combiner iterates over the first dim)."""
    pipe = tm.qwen_controlnet_pipeline(n, inpaint=True)
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(1, 3, 32, 32, generator=g) for _ in range(2)]
    masks = _halves(32, 32)
    torch.manual_seed(0)  # prepare_image_with_mask samples the VAE with the global RNG
    conds = torch.stack([pipe.prepare_image_with_mask(
        image=img, mask=m[None, None], width=32, height=32, batch_size=1,
        num_images_per_prompt=1, device=torch.device("cpu"), dtype=torch.float32)
        for img, m in zip(images, masks)])
    assert conds.shape == (2, 1, 64, 20)

    def run():
        return pipe("a red cat", control_image=conds, controlnet_conditioning_scale=[1.0, 0.8],
                    num_inference_steps=2, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    if n == 1:
        before = run()
    else:
        with pytest.raises(ValueError, match=REFUSED):
            run()
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        fused = run()
    if n == 1:
        assert torch.equal(run(), before) and not torch.allclose(fused, before)
    else:
        with pytest.raises(ValueError, match=REFUSED):
            run()
    assert fused.shape == (1, 64, 16) and torch.isfinite(fused).all()
    assert h.steps == 2 and all(r.winner.shape == (1, 64) for r in h.records)


def test_qwen_pipeline_with_one_controlnet_is_refused():
    from diffusers import QwenImageControlNetPipeline

    base = tm.qwen_controlnet_pipeline(1)
    pipe = QwenImageControlNetPipeline(**{**base.components,
                                          "controlnet": base.controlnet.nets[0]})
    with pytest.raises(TypeError, match="no multi-condition combiner"):
        mh.apply(pipe)


@pytest.mark.parametrize("level", LEVELS)
def test_qwen_pipeline_with_masks(qwen_pipes, level):
    """Non-square (32 x 48 px: 8 x 12 packed tokens): each half won by its net exactly, for
    two nets and for one union net (one mask per condition)."""
    conds = [torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(k))
             for k in range(2)]
    for n in (1, 2):
        pipe = qwen_pipes[n]
        with mh.apply(pipe, level=level, record=True, masks=_halves(32, 48), **TORCH) as h:
            fused = _qwen_run(pipe, conds, 32, 48)
        assert torch.isfinite(fused).all() and h.records
        for r in h.records:
            assert r.winner.shape == (1, 96), r.point
            assert torch.equal(r.winner.reshape(1, 8, 12), _region(r.winner, (8, 12))), r.point


@pytest.fixture(scope="module")
def hunyuan_pipe():
    return tm.hunyuan_controlnet_pipeline(2)


def _hunyuan_run(pipe, conds, h=128, w=128):
    torch.manual_seed(0)  # the pipeline VAE-encodes the control images with the global RNG
    return pipe(control_image=conds, controlnet_conditioning_scale=[1.0, 0.7],
                num_inference_steps=2, height=h, width=w, output_type="latent",
                use_resolution_binning=False, generator=torch.Generator().manual_seed(0),
                **tm.hunyuan_prompt_kwargs()).images


@pytest.mark.parametrize("level", LEVELS)
def test_hunyuan_controlnet_pipeline(hunyuan_pipe, level):
    pipe = hunyuan_pipe
    conds = tm.strip_conditions(2, 128)
    before = _hunyuan_run(pipe, conds)
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        fused = _hunyuan_run(pipe, conds)
    assert torch.equal(_hunyuan_run(pipe, conds), before)
    assert _no_patches(pipe.controlnet)
    assert fused.shape == (1, 4, 16, 16) and torch.isfinite(fused).all()
    # the latents are clipped to [-1, 1] by DDPM: compare the model's output through them
    assert not torch.equal(fused, before)
    assert h.steps == 2 and {r.step for r in h.records} == {0, 1}
    # classifier-free guidance: both halves in the batch; 8 x 8 tokens of 16 x 16 latents
    assert all(r.winner.shape == (2, 64) for r in h.records)
    assert {"block.0", "block.1"} <= {r.point for r in h.records}


@pytest.mark.parametrize("level", LEVELS)
def test_hunyuan_pipeline_with_masks(hunyuan_pipe, level):
    conds = [torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(k))
             for k in range(2)]
    with mh.apply(hunyuan_pipe, level=level, record=True, masks=_halves(128, 192),
                  **TORCH) as h:
        fused = _hunyuan_run(hunyuan_pipe, conds, 128, 192)
    assert torch.isfinite(fused).all()
    assert len(h.records) == 2 * (2 if level == "residual" else 5)
    for r in h.records:
        assert r.winner.shape == (2, 96), r.point
        assert torch.equal(r.winner.reshape(2, 8, 12), _region(r.winner, (8, 12))), r.point


# ------------------------------------------------ QwenImage under context parallelism


def _qwen_cp_worker(rank, world, level):
    """The tiny QwenImage ControlNet pipeline (two nets) with MaxFusion: one process vs
    diffusers' Ulysses context parallelism of its transformer over ``world`` ranks."""
    import warnings

    warnings.filterwarnings("ignore", message=".*enable_parallelism.*experimental")
    torch.accelerator.device_count = lambda: 1  # diffusers 0.42 divides by it (0 on CPU)
    from diffusers import ContextParallelConfig

    g = torch.Generator().manual_seed(0)
    # 8 text tokens: split over the ranks with the image tokens (divisible by 2)
    embeds = dict(prompt_embeds=torch.randn(1, 8, 16, generator=g))
    conds = tm.strip_conditions(2, 32)

    def call(pipe):
        return pipe(control_image=conds, controlnet_conditioning_scale=[1.0, 0.7],
                    num_inference_steps=2, height=32, width=32, output_type="latent",
                    true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0),
                    **embeds).images

    pipe = tm.qwen_controlnet_pipeline(2)
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        ref = call(pipe)  # one process
        n_ref = len(h.records)
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        out = call(pipe)  # every fused residual cut to this rank's tokens
        n = len(h.records) - n_ref
    try:
        call(pipe)
        alone = "ran"
    except ValueError as e:  # removed: diffusers' combiner refuses two nets again
        alone = str(e)
    # the premise: diffusers alone (one union net, which it accepts) under context
    # parallelism adds full-length residuals to the transformer's share of the tokens
    union = tm.qwen_controlnet_pipeline(1)
    union.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    try:
        call(union)
        union_alone = "ran"
    except RuntimeError as e:
        union_alone = str(e)
    report = {"maxdiff": float((out - ref).abs().max()), "records": (n_ref, n),
              "alone": alone, "union_alone": union_alone}
    report.update(_sharded_qwen_controlnets(rank, world))
    return report


def _sharded_qwen_controlnets(rank, world):
    """QwenImage ControlNets sharded by a context-parallel plan of their own (the
    transformer's split of image and text tokens at the first block and of the rotary
    embedding): their residuals are this rank's share of the tokens, fused with
    ``process_group``, at both levels, against this rank's slice of one process's fusion."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ContextParallelInput

    nets = [tm.tiny_qwen_controlnet(60 + k) for k in range(2)]
    multi = _qwen_multi(nets)
    inp = tm.qwen_inputs()
    inp["encoder_hidden_states"] = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(9))
    # conditions on horizontal strips: rank 0's tokens hold one, rank 1's the other, so each
    # rank's own normalisers differ from the whole sequence's
    conds = [c.reshape(2, 8, 8, 16).transpose(1, 2).reshape(2, 64, 16)
             for c in tm.token_strip_conditions(2)]

    def fuse(level, **kw):
        with torch.no_grad(), mh.apply(multi, level=level, record=True, **TORCH, **kw) as h:
            return _qwen_call(multi, conds, [1.0, 0.7], inp), {
                r.point: tuple(r.winner.shape) for r in h.records}

    refs = {lv: fuse(lv)[0] for lv in LEVELS}  # one process, before any parallelism
    tokens = lambda: ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    rope = lambda: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    plan = {"transformer_blocks.0": {"hidden_states": tokens(), "encoder_hidden_states": tokens()},
            "pos_embed": {0: rope(), 1: rope()}}
    for net in nets:
        net.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=plan)
    group = nets[0]._parallel_config.context_parallel_config._flattened_mesh.get_group()
    out = {}
    for lv in LEVELS:
        mine = [t.chunk(world, 1)[rank] for t in refs[lv]]
        sharded, n_rec = fuse(lv, process_group=group)
        alone, _ = fuse(lv)  # each rank's share fused with its own normalisers
        out[lv] = {"shape": tuple(sharded[0].shape), "records": n_rec,
                   "maxdiff": max(float((a - b).abs().max()) for a, b in zip(sharded, mine)),
                   "scale": max(float(t.abs().max()) for t in mine),
                   "alone_maxdiff": max(float((a - b).abs().max())
                                        for a, b in zip(alone, mine))}
    return {"sharded": out}


@pytest.mark.parametrize("level", ["block"])  # the same slicing as residual level, after it
def test_qwen_pipeline_under_context_parallelism(level):
    """The pipeline under diffusers' context parallelism (replicated residuals, cut to each
    rank's tokens by the combiner), and sharded ControlNets with ``process_group`` (both
    levels), in one 2-rank run."""
    import importlib.util

    if importlib.util.find_spec("diffusers.models._modeling_parallel") is None:
        pytest.skip("this diffusers has no context parallelism")
    from dist_harness import run_ranks

    reports = run_ranks(_qwen_cp_worker, 2, level, timeout=55)
    for r in reports:
        assert r["maxdiff"] < 1e-5, r  # Ulysses attention: rounding only
        assert r["records"][0] == r["records"][1] > 0, r
        assert REFUSED in r["alone"], r
        assert "must match the size" in r["union_alone"], r
        for lv, sh in r["sharded"].items():
            assert sh["shape"] == (2, 32, 16), (lv, sh)
            # every fusion sees this rank's 32 of the 64 image tokens, except block level's
            # first one: the input of transformer_blocks.0 is hooked before diffusers' split
            # of that module's input, so every rank fuses the whole (identical) sequence there
            want = {p: (2, 64 if p.endswith(":input") else 32) for p in sh["records"]}
            assert sh["records"] == want and len(want) == (2 if lv == "residual" else 5), sh
            assert sh["maxdiff"] < 1e-6 * max(1.0, sh["scale"]), (lv, sh)  # measured 1e-6
    # the premise: fused with each rank's own normalisers, the residuals differ
    assert max(sh["alone_maxdiff"] for r in reports for sh in r["sharded"].values()) > 1e-3
