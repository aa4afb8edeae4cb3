"""End to end: tiny diffusers pipelines (2 denoising steps, 32 px) at both levels.

SD 1.5 / SDXL ControlNet and SD adapter pipelines run with their tiny CLIP text encoders and
an in-memory tokenizer; the SD3 and Flux ControlNet pipelines run on precomputed prompt
embeddings (no text encoders), everything else (transformer, ControlNets, VAE, scheduler) real.
"""

from __future__ import annotations

import re

import pytest
import tiny_models as tm
import torch
from tiny_models import single_thread_fixture

import maxfusion_hooks as mh

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning"),  # diffusers' own use
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # Euler
]
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)

TORCH = dict(backend="torch")
LEVELS = ["residual", "block"]


def _final(point: str) -> bool:
    """Whether a record is of a final merge (residual names) rather than a fusion inside."""
    return re.fullmatch(r"(down|feature|block|single)\.\d+|mid", point) is not None


def _latents(pipe, conds, **kw):
    size = conds[0].shape[-1]
    out = pipe("a red cat", image=conds, num_inference_steps=2, height=size, width=size,
               output_type="latent", generator=torch.Generator().manual_seed(0), **kw)
    return out.images


def _strip_fractions(record, n):
    """Per strip k, the fraction of its sites won by net k (all images of the batch)."""
    w = record.winner
    return [float((w[:, m] == k).float().mean())
            for k, m in enumerate(tm.strip_masks(n, w.shape[-2:]))]


@pytest.fixture(scope="module")
def sd_pipes():
    return {n: tm.sd_controlnet_pipeline(n) for n in (2, 3)}


# --------------------------------------------------------------------------- SD ControlNet


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n", [2, 3])
def test_sd_controlnet_pipeline(sd_pipes, n, level):
    from diffusers import MultiControlNetModel

    pipe = sd_pipes[n]
    conds = tm.strip_conditions(n, 32 if n == 2 else 48)  # strips of >= 4 columns at 1/4 size
    before = _latents(pipe, conds)
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        assert isinstance(pipe.controlnet, MultiControlNetModel)  # the pipeline's own check
        fused = _latents(pipe, conds)
    after = _latents(pipe, conds)
    assert torch.equal(before, after)  # removed: bitwise as before
    assert "forward" not in pipe.controlnet.__dict__
    assert torch.isfinite(fused).all() and not torch.allclose(fused, before)
    assert h.steps == 2 and {r.step for r in h.records} == {0, 1}
    # conditions that conflict by strips: each strip follows its own condition's net. At
    # residual level in every residual; at block level in every hidden state fused inside
    # the nets (the final merges compare different nets' zero convs applied to already fused
    # streams, so their winner maps are not a test of the conditions)
    checked = [r for r in h.records if level == "residual" or not _final(r.point)]
    assert len(checked) == (10 if level == "residual" else 10)
    for r in checked:
        fr = _strip_fractions(r, n)
        assert min(fr) >= 0.8, f"step {r.step}, {r.point}: strips won by their net {fr}"


def test_control_guidance_end_skips_a_net(sd_pipes):
    pipe = sd_pipes[2]
    conds = tm.strip_conditions(2, 32)
    calls = []
    hook = pipe.controlnet.nets[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for level in LEVELS:
            calls.clear()
            with mh.apply(pipe, level=level, record=True, **TORCH) as h:
                _latents(pipe, conds, control_guidance_end=[1.0, 0.5])
            assert calls == [1]  # step 0 only: at step 1 its scale is 0 and it does not run
            assert {r.step for r in h.records} == {0}  # one net left at step 1: no fusion
    finally:
        hook.remove()


def test_default_backend_in_a_pipeline(sd_pipes):
    """The default backend (Triton kernels, interpreted on CPU here) agrees with torch."""
    pipe = sd_pipes[2]
    conds = tm.strip_conditions(2, 32)
    for level in LEVELS:
        with mh.apply(pipe, level=level, record=True) as h:
            a = _latents(pipe, conds)
        with mh.apply(pipe, level=level, record=True, **TORCH) as h2:
            b = _latents(pipe, conds)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for ra, rb in zip(h.records, h2.records):
            assert ra.point == rb.point
            assert float((ra.winner != rb.winner).float().mean()) <= 0.01


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint_use_the_same_combiner(sd_pipes, kind):
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
    )

    base = sd_pipes[2]
    cls = {"img2img": StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": StableDiffusionControlNetInpaintPipeline}[kind]
    pipe = cls(**base.components)
    pipe.set_progress_bar_config(disable=True)
    conds = tm.strip_conditions(2, 32)
    extra = dict(image=torch.rand(1, 3, 32, 32), control_image=conds, strength=0.9)
    if kind == "inpaint":
        extra["mask_image"] = torch.ones(1, 1, 32, 32)

    def run():
        return pipe("a red cat", num_inference_steps=2, height=32, width=32,
                    output_type="latent", generator=torch.Generator().manual_seed(0),
                    **extra).images

    before = run()
    for level in LEVELS:
        with mh.apply(pipe, level=level, record=True, **TORCH) as h:
            fused = run()
        assert h.records and not torch.allclose(fused, before)
    assert torch.equal(run(), before)


def test_fault_inside_one_controlnet_mid_forward(sd_pipes):
    pipe = sd_pipes[2]
    conds = tm.strip_conditions(2, 32)
    before = _latents(pipe, conds)
    fail = {"armed": True}

    def explode(module, args, kwargs):
        if fail["armed"]:
            fail["armed"] = False
            raise RuntimeError("controlnet 1 failed in its mid block")

    hook = pipe.controlnet.nets[1].mid_block.register_forward_pre_hook(explode,
                                                                       with_kwargs=True)
    try:
        with mh.apply(pipe, level="block", **TORCH) as h:
            with pytest.raises(RuntimeError, match="mid block"):
                _latents(pipe, conds)
            assert h._lockstep._slots == {}
            # the patch is whole: the next call works and equals a clean call
            again = _latents(pipe, conds)
            clean = _latents(pipe, conds)
            assert torch.equal(again, clean) and not torch.allclose(again, before)
    finally:
        hook.remove()
    assert torch.equal(_latents(pipe, conds), before)
    assert all(not m._forward_hooks for net in pipe.controlnet.nets for m in net.modules())


def test_apply_twice_on_a_pipeline(sd_pipes):
    pipe = sd_pipes[2]
    with mh.apply(pipe, **TORCH):
        with pytest.raises(mh.AlreadyAppliedError):
            mh.apply(pipe, level="block")
        with pytest.raises(mh.AlreadyAppliedError):
            mh.apply(pipe.controlnet)
    h = mh.apply(pipe.controlnet, level="block")
    h.remove()
    h.remove()


def test_a_pipeline_with_one_controlnet_is_refused():
    pipe = tm.sd_controlnet_pipeline(nets=tm.tiny_controlnet(5))
    with pytest.raises(TypeError, match="no multi-condition combiner"):
        mh.apply(pipe)


# ------------------------------------------------------------------------ other families


@pytest.mark.parametrize("level", LEVELS)
def test_sdxl_controlnet_pipeline(level):
    pipe = tm.sdxl_controlnet_pipeline(2)
    conds = tm.strip_conditions(2, 32)
    before = _latents(pipe, conds)
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        fused = _latents(pipe, conds)
    assert torch.equal(_latents(pipe, conds), before)
    assert torch.isfinite(fused).all() and not torch.allclose(fused, before)
    assert h.steps == 2 and "mid" in [r.point for r in h.records]
    for r in h.records:
        if level == "residual" or not _final(r.point):
            assert min(_strip_fractions(r, 2)) >= 0.8, r.point


@pytest.mark.parametrize("level", LEVELS)
def test_sd_adapter_pipeline(level):
    pipe = tm.sd_adapter_pipeline(2)
    conds = tm.strip_conditions(2, 32)
    kw = dict(adapter_conditioning_scale=[1.0, 0.8])
    before = _latents(pipe, conds, **kw)
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        fused = _latents(pipe, conds, **kw)
    assert torch.equal(_latents(pipe, conds, **kw), before)
    assert torch.isfinite(fused).all() and not torch.allclose(fused, before)
    assert h.steps == 1  # the adapters run once per pipeline call, not per step
    assert [r.point for r in h.records][-2:] == ["feature.0", "feature.1"]
    for r in h.records:
        assert min(_strip_fractions(r, 2)) >= 0.8, r.point


@pytest.mark.parametrize("level", LEVELS)
def test_sd3_controlnet_pipeline(level):
    pipe = tm.sd3_controlnet_pipeline(2)
    conds = tm.strip_conditions(2, 32)

    def run():
        torch.manual_seed(0)  # the pipeline VAE-encodes the control image with the global RNG
        return pipe(control_image=conds, controlnet_conditioning_scale=[1.0, 0.7],
                    num_inference_steps=2, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0),
                    **tm.sd3_prompt_kwargs()).images

    before = run()
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        fused = run()
    assert torch.equal(run(), before)
    assert torch.isfinite(fused).all() and not torch.allclose(fused, before)
    assert h.steps == 2 and h.records[0].winner.shape == (2, 64)  # CFG batch, 8 x 8 tokens


@pytest.mark.parametrize("level", LEVELS)
def test_flux_controlnet_pipeline(level):
    pipe = tm.flux_controlnet_pipeline(2)
    conds = tm.strip_conditions(2, 32)

    def run():
        torch.manual_seed(0)  # the pipeline VAE-encodes the control image with the global RNG
        return pipe(control_image=conds, controlnet_conditioning_scale=[1.0, 0.7],
                    num_inference_steps=2, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0),
                    **tm.flux_prompt_kwargs()).images

    before = run()
    with mh.apply(pipe, level=level, record=True, **TORCH) as h:
        fused = run()
    assert torch.equal(run(), before)
    assert torch.isfinite(fused).all() and not torch.allclose(fused, before)
    assert h.steps == 2 and {r.point for r in h.records} >= {"block.0", "single.0"}
