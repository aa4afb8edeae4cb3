"""Regional masks in the hook layer: ``apply(..., masks=[...])`` and ``handle.set_masks``.

One file (over 400 lines) because every test of masks in the hook layer shares the same tiny
models and mask builders, one section per pipeline family.

Image-space masks (PIL, numpy, tensors) are resized to every fusion's grid with an area
average (the token grid for SD3 / Flux), tiled over the batch (classifier-free guidance), cached
per grid. End to end with tiny pipelines at both levels: conditions that overlap everywhere,
restricted by masks to regions, are won by their own net exactly in their region; combiner
level against the float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import single_thread_fixture
from utils import assert_close

import maxfusion_hooks as mh
from maxfusion_hooks._masks import RegionMasks, image_mask, token_grid
from maxfusion_kernels import reference

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)

TORCH = dict(backend="torch")
LEVELS = ["residual", "block"]


def halves(h: int, w: int) -> list[torch.Tensor]:
    """Two complementary hard masks: the left and the right half of an h x w image."""
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1.0
    return [left, 1.0 - left]


def region_map(record_winner: torch.Tensor, grid=None) -> torch.Tensor:
    """The expected winner for left / right halves: 0 in the left half of the grid, else 1."""
    w = record_winner if grid is None else record_winner.reshape(-1, *grid)
    cols = torch.arange(w.shape[-1])
    return (cols >= w.shape[-1] // 2).long().expand_as(w)


def full_conditions(n: int, h: int, w: int, batch: int = 1) -> list[torch.Tensor]:
    """Conditions that overlap everywhere: random images over the whole frame."""
    g = torch.Generator().manual_seed(3)
    return [torch.rand(batch, 3, h, w, generator=g) for _ in range(n)]


# ------------------------------------------------------------------ image-space masks


def test_image_masks_of_every_kind():
    a = np.zeros((6, 8), dtype=np.uint8)
    a[:, 4:] = 255
    want = torch.from_numpy(a).float()[None] / 255
    for obj in (Image.fromarray(a, "L"), Image.fromarray(a, "L").convert("1"),
                Image.fromarray(a, "L").convert("RGB"), a, a > 0, a.astype(np.float32) / 255,
                torch.from_numpy(a), torch.from_numpy(a > 0), want[0].double(), want,
                want[:, None], Image.fromarray(a.astype(np.float32) / 255, "F")):
        m = image_mask(obj, "masks[0]")
        assert m.dtype == torch.float32 and torch.equal(m, want), type(obj)
    grey = image_mask(Image.fromarray(np.full((2, 3), 51, np.uint8), "L"), "m")
    assert torch.allclose(grey, torch.full((1, 2, 3), 0.2))
    assert image_mask(torch.rand(3, 5, 7), "m").shape == (3, 5, 7)


@pytest.mark.parametrize("obj, exc, fragment", [
    ("left.png", TypeError, r"masks\[1\] must be a PIL image, a numpy array or a tensor"),
    (torch.ones(4, 4, dtype=torch.int32), TypeError, r"masks\[1\] has dtype torch.int32"),
    (np.ones((4, 4), dtype=np.int16), TypeError, r"masks\[1\] has dtype torch.int16"),
    (torch.full((4, 4), 1.5), ValueError, r"masks\[1\] must have values in \[0, 1\]"),
    (torch.full((4, 4), float("nan")), ValueError, r"values in \[0, 1\]"),
    (torch.ones(2, 3, 4, 4), ValueError, r"\[H, W\], \[B, H, W\] or \[B, 1, H, W\]"),
    (torch.ones(0, 4), ValueError, "empty"),
])
def test_bad_masks_are_refused_at_apply_and_set_masks(obj, exc, fragment):
    models = [tm.TwoStage(seed=1), tm.TwoStage(seed=2)]
    with pytest.raises(exc, match=fragment):
        mh.apply(models, masks=[None, obj])
    assert not any(m._forward_hooks for m in models[0].modules())  # nothing patched
    with mh.apply(models, masks=[torch.ones(4, 4), None]) as h:
        with pytest.raises(exc, match=fragment):
            h.set_masks([None, obj])
        assert torch.equal(h.masks[0], torch.ones(1, 4, 4)) and h.masks[1] is None  # unchanged


def test_mask_count_is_checked():
    models = [tm.TwoStage(seed=1), tm.TwoStage(seed=2)]
    with pytest.raises(ValueError, match="masks has 3 entries for 2 control models"):
        mh.apply(models, masks=[None] * 3)
    with pytest.raises(TypeError, match="one mask"):
        mh.apply(models, masks=torch.ones(2, 4, 4))


def test_resizing_is_an_area_average_and_cached():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(1, 30, 20, generator=g)  # non-integer ratios to a 7 x 5 grid
    region = RegionMasks([m, None])
    feats = [torch.randn(2, 4, 7, 5)] * 2
    (r, none) = region.for_features(feats, 1, [0, 1])
    assert none is None and r.shape == (1, 7, 5)
    assert torch.equal(r, F.adaptive_avg_pool2d(m[:, None], (7, 5))[:, 0])
    assert region.for_features(feats, 1, [0, 1])[0] is r and region.resizes == 1  # cached
    # a hard edge halfway through a cell stays soft: 0.5 there
    edge = torch.zeros(1, 8, 8)
    edge[..., :5] = 1.0
    (e,) = RegionMasks([edge]).for_features([torch.randn(1, 3, 4, 4)] * 2, 1, [0])
    assert torch.equal(e[0, :, 2], torch.full((4,), 0.5)) and (e[0, :, :2] == 1).all()
    # hard: 1 wherever the area average is > 0
    (hard,) = RegionMasks([edge]).for_features([torch.randn(1, 3, 4, 4)] * 2, 1, [0],
                                                 hard=True)
    assert torch.equal(hard[0, :, :3], torch.ones(4, 3)) and (hard[0, :, 3] == 0).all()
    # tokens [B, L, C]: the grid given, or the factorisation closest to the mask's aspect
    tok = [torch.randn(2, 96, 4)] * 2
    (t,) = RegionMasks([torch.rand(1, 32, 48)]).for_features(tok, -1, [0], grid=(8, 12))
    assert t.shape == (1, 96)
    assert token_grid(96, 32, 48) == (8, 12) and token_grid(96, 48, 32) == (12, 8)
    assert token_grid(64, 10, 10) == (8, 8) and token_grid(7, 1, 1) == (1, 7)
    # one site per sample: the mean of the mask; video maps: broadcast over the frames
    (one,) = RegionMasks([edge]).for_features([torch.randn(3, 4, 1, 1)] * 2, 1, [0])
    assert one.shape == (1, 1, 1) and float(one) == pytest.approx(5 / 8)
    (vid,) = RegionMasks([edge]).for_features([torch.randn(2, 4, 3, 4, 4)] * 2, 1, [0])
    assert vid.shape == (1, 1, 4, 4)


def test_batch_of_masks_is_tiled_over_the_batch():
    masks = torch.stack(halves(8, 8))  # [2, 8, 8]: one mask per image
    region = RegionMasks([masks, None])
    (r, _) = region.for_features([torch.randn(4, 3, 4, 4)] * 2, 1, [0, 1])
    assert r.shape == (4, 4, 4)
    assert torch.equal(r[0], r[2]) and torch.equal(r[1], r[3]) and not torch.equal(r[0], r[1])
    with pytest.raises(ValueError, match=r"masks\[0\] holds 2 masks .* batch of 3"):
        region.for_features([torch.randn(3, 3, 4, 4)] * 2, 1, [0, 1])


# --------------------------------------------------------------------- combiner level


def _multi(n=2):
    from diffusers import MultiControlNetModel

    return MultiControlNetModel([tm.tiny_controlnet(10 + k) for k in range(n)])


def test_controlnet_residuals_equal_the_reference_with_resized_masks():
    """Each residual is the float64 reference merge of the nets' own residuals with the
    masks resized by area average (soft masks, a per-image batch tiled over a batch of 4)."""
    multi = _multi(2)
    conds = full_conditions(2, 32, 32, batch=4)
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(2, 32, 32, generator=g), torch.rand(32, 32, generator=g)]
    inputs = tm.unet_inputs(batch=4)
    own = [net(**inputs, controlnet_cond=c, conditioning_scale=1.0, return_dict=False)
           for net, c in zip(multi.nets, conds)]
    with mh.apply(multi, masks=masks, record=True, **TORCH) as h:
        down, mid = multi(**inputs, controlnet_cond=conds, conditioning_scale=[1.0, 1.0],
                          return_dict=False)
    fused = list(down) + [mid]
    groups = [list(gr) for gr in zip(*[list(d) + [m] for d, m in own])]
    for k, (out, grp) in enumerate(zip(fused, groups)):
        hw = grp[0].shape[-2:]
        m0 = F.adaptive_avg_pool2d(masks[0][:, None], hw)[:, 0].repeat(2, 1, 1)
        m1 = F.adaptive_avg_pool2d(masks[1][None, None], hw)[:, 0]
        ref, info = reference.max_fuse(grp, masks=[m0, m1], return_info=True)
        assert_close(out, ref, torch.float32, what=f"residual {k}")
        assert torch.equal(h.records[k].winner, info.winner)


def test_one_net_left_is_weighted_by_its_mask():
    """control_guidance_end: with one net left at a step its residuals come back times its
    mask (what the fusion of that net alone gives)."""
    multi = _multi(2)
    conds = full_conditions(2, 32, 32, batch=2)
    masks = halves(32, 32)
    own = multi.nets[0](**tm.unet_inputs(), controlnet_cond=conds[0], conditioning_scale=0.5,
                        return_dict=False)
    with mh.apply(multi, masks=masks, **TORCH):
        down, mid = multi(**tm.unet_inputs(), controlnet_cond=conds,
                          conditioning_scale=[0.5, 0.0], return_dict=False)
    for got, want in zip(list(down) + [mid], list(own[0]) + [own[1]]):
        m = F.adaptive_avg_pool2d(masks[0][None, None], want.shape[-2:])
        assert torch.equal(got, want * m)


def test_global_pool_mean_with_masks():
    """One-site residuals are averaged over the nets present in each sample; a mask of 0 in a
    sample leaves the other net alone there."""
    a, b = torch.randn(2, 6, 1, 1), torch.randn(2, 6, 1, 1)
    m0 = torch.tensor([0.0, 1.0])  # [B] masks at the one site: net 0 is absent in sample 0
    settings = mh.FusionSettings(options=(("backend", "torch"),))
    (out,) = mh.fuse_residual_groups([[a, b]], settings=settings, masks=[[m0, None]])
    assert torch.equal(out[0], b[0]) and torch.allclose(out[1], (a[1] + b[1]) / 2)


# ------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def sd_pipe():
    return tm.sd_controlnet_pipeline(2)


def _latents(pipe, conds, h, w, **kw):
    return pipe("a red cat", image=conds, num_inference_steps=2, height=h, width=w,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("hw", [(32, 32), (32, 48)], ids=["square", "non-square"])
def test_sd_pipeline_regions_are_won_by_their_net(sd_pipe, level, hw):
    """Conditions over the whole image, masks on the two halves: every fusion (both halves of
    classifier-free guidance, every grid) is won by each net exactly in its half."""
    h, w = hw
    conds = full_conditions(2, h, w)
    before = _latents(sd_pipe, conds, h, w)
    with mh.apply(sd_pipe, level=level, record=True, masks=halves(h, w), **TORCH) as hd:
        fused = _latents(sd_pipe, conds, h, w)
    assert torch.equal(_latents(sd_pipe, conds, h, w), before)  # removed: as before
    assert torch.isfinite(fused).all()
    assert len(hd.records) == (10 if level == "residual" else 20)
    for r in hd.records:
        assert r.winner.shape[0] == 2  # both halves of classifier-free guidance
        assert r.winner.shape[-2] * w == r.winner.shape[-1] * h  # the image's aspect
        assert torch.equal(r.winner, region_map(r.winner)), (r.step, r.point)


def test_sd_pipeline_per_image_masks_follow_each_image(sd_pipe):
    """Two images per prompt with their own masks ([2, H, W]): the residual batch of 4
    (unconditional and conditional halves) gets [m_0, m_1, m_0, m_1]."""
    conds = full_conditions(2, 32, 32)
    left, right = halves(32, 32)
    masks = [torch.stack([left, right]), torch.stack([right, left])]
    with mh.apply(sd_pipe, record=True, masks=masks, **TORCH) as hd:
        _latents(sd_pipe, conds, 32, 32, num_images_per_prompt=2)
    for r in hd.records:
        want = region_map(r.winner[0])
        assert torch.equal(r.winner, torch.stack([want, 1 - want, want, 1 - want]))


def test_set_masks_between_calls_without_reapplying(sd_pipe):
    conds = full_conditions(2, 32, 32)
    masks = [Image.fromarray((m.numpy() * 255).astype(np.uint8), "L")
             for m in halves(32, 32)]
    with mh.apply(sd_pipe, masks=masks, **TORCH) as h:
        masked = _latents(sd_pipe, conds, 32, 32)
    with mh.apply(sd_pipe, **TORCH) as h:
        plain = _latents(sd_pipe, conds, 32, 32)
        assert h.masks is None and h.mask_resizes == 0
        h.set_masks(masks)
        assert torch.equal(_latents(sd_pipe, conds, 32, 32), masked)
        resized = h.mask_resizes
        assert resized == 4  # 2 nets x 2 grids (16 x 16, 8 x 8), not per step or residual
        _latents(sd_pipe, conds, 32, 32)
        assert h.mask_resizes == resized  # cached across calls
        h.set_masks([None, masks[1]])
        assert len(h.masks) == 2 and h.masks[0] is None
        h.set_masks(None)
        assert torch.equal(_latents(sd_pipe, conds, 32, 32), plain)
    assert not torch.equal(masked, plain)


def test_block_level_masks_only_remove_inside_the_nets(sd_pipe):
    """Inside the nets a mask removes where it is 0 and does not weigh: a soft mask that is
    nowhere 0 leaves every fusion inside the nets as without masks (at the first step; the
    next ones start from other latents); it weighs the final merge."""
    conds = full_conditions(2, 32, 32)
    soft = [torch.full((32, 32), 0.5), None]
    with mh.apply(sd_pipe, level="block", record=True, **TORCH) as h0:
        plain = _latents(sd_pipe, conds, 32, 32)
    with mh.apply(sd_pipe, level="block", record=True, masks=soft, **TORCH) as h1:
        masked = _latents(sd_pipe, conds, 32, 32)
    inside = [(a, b) for a, b in zip(h0.records, h1.records)
              if a.step == 0 and ("_block" in a.point)]
    assert len(inside) == 5
    assert all(a.point == b.point and torch.equal(a.winner, b.winner) for a, b in inside)
    assert not torch.equal(plain, masked)


@pytest.mark.parametrize("level", LEVELS)
def test_sdxl_pipeline_with_masks(level):
    pipe = tm.sdxl_controlnet_pipeline(2)
    conds = full_conditions(2, 32, 48)
    with mh.apply(pipe, level=level, record=True, masks=halves(32, 48), **TORCH) as hd:
        fused = _latents(pipe, conds, 32, 48)
    assert torch.isfinite(fused).all() and hd.records
    for r in hd.records:
        assert torch.equal(r.winner, region_map(r.winner)), r.point


@pytest.mark.parametrize("level", LEVELS)
def test_adapter_pipeline_with_masks(level):
    pipe = tm.sd_adapter_pipeline(2)
    conds = full_conditions(2, 32, 48)
    with mh.apply(pipe, level=level, record=True, masks=halves(32, 48), **TORCH) as hd:
        _latents(pipe, conds, 32, 48, adapter_conditioning_scale=[1.0, 0.8])
    assert [r.point for r in hd.records][-2:] == ["feature.0", "feature.1"]
    for r in hd.records:
        assert torch.equal(r.winner, region_map(r.winner)), r.point


def _dit_run(pipe, conds, h, w, kwargs):
    torch.manual_seed(0)  # the pipeline VAE-encodes the control image with the global RNG
    return pipe(control_image=conds, controlnet_conditioning_scale=[1.0, 0.7],
                num_inference_steps=2, height=h, width=w, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("level", LEVELS)
def test_dit_pipelines_use_the_token_grid(family, level):
    """SD3 and Flux: the masks go to the token grid of the call (SD3: latents / patch size,
    Flux: the packed 2 x 2 patches, from img_ids), here 8 x 12 tokens for 32 x 48 px."""
    if family == "sd3":
        pipe, kwargs = tm.sd3_controlnet_pipeline(2), tm.sd3_prompt_kwargs()
    else:
        pipe, kwargs = tm.flux_controlnet_pipeline(2), tm.flux_prompt_kwargs()
    conds = full_conditions(2, 32, 48)
    with mh.apply(pipe, level=level, record=True, masks=halves(32, 48), **TORCH) as hd:
        fused = _dit_run(pipe, conds, 32, 48, kwargs)
    assert torch.isfinite(fused).all() and hd.records
    for r in hd.records:
        # SD3: both halves of classifier-free guidance; Flux (guidance-distilled): one
        assert r.winner.shape == (2 if family == "sd3" else 1, 96), r.point
        assert torch.equal(r.winner.reshape(-1, 8, 12), region_map(r.winner, (8, 12))), r.point


def test_flux_union_net_masks_per_condition():
    """One Flux ControlNet-Union run once per condition: one mask per condition."""
    from diffusers import FluxMultiControlNetModel

    multi = FluxMultiControlNetModel([tm.tiny_flux_controlnet(50)])
    conds = [torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(k))
             for k in range(2)]
    modes = [torch.tensor([-1] * 2)] * 2
    with mh.apply(multi, record=True, masks=halves(16, 16), **TORCH) as h:
        multi(**tm.flux_inputs(), controlnet_cond=conds, controlnet_mode=modes,
              conditioning_scale=[1.0, 0.9], return_dict=False)
        for r in h.records:  # 8 x 8 tokens (img_ids)
            assert torch.equal(r.winner.reshape(2, 8, 8), region_map(r.winner, (8, 8)))
        h.set_masks([None] * 3)
        with pytest.raises(ValueError, match="masks has 3 entries but this call runs 2"):
            multi(**tm.flux_inputs(), controlnet_cond=conds, controlnet_mode=modes,
                  conditioning_scale=[1.0, 0.9], return_dict=False)


@pytest.mark.parametrize("level", LEVELS)
def test_raw_models_with_masks(level):
    models = [tm.TwoStage(seed=1), tm.TwoStage(seed=2)]
    xs = [(torch.randn(2, 3, 12, 18),), (torch.randn(2, 3, 12, 18),)]
    points = ["stage1", "stage2"] if level == "block" else None
    with mh.apply(models, level=level, points=points, record=True, masks=halves(24, 36),
                  **TORCH) as h:
        out = h.run(xs)
    assert out.shape == (2, 8, 12, 18)
    for r in h.records:
        assert torch.equal(r.winner, region_map(r.winner)), r.point
    # a mask batch that does not divide the batch is named at run time
    with mh.apply(models, level=level, points=points, masks=[torch.ones(3, 4, 4), None],
                  **TORCH) as h:
        with pytest.raises((ValueError, mh.LockstepError), match=r"masks\[0\] holds 3 masks"):
            h.run(xs)


def test_token_grid_of_a_call():
    """The handlers read the token grid from the call: SD3 from the latents and the patch
    size, Flux from img_ids (its packed 2 x 2 patches), once per img_ids tensor."""
    from diffusers import FluxMultiControlNetModel, SD3MultiControlNetModel

    from maxfusion_hooks.handlers import find_combiner

    sd3 = SD3MultiControlNetModel([tm.tiny_sd3_controlnet(1)])
    assert find_combiner(sd3).token_grid(sd3, {"hidden_states": torch.zeros(1, 4, 16, 24)}) \
        == (8, 12)
    assert find_combiner(sd3).token_grid(sd3, {"hidden_states": torch.zeros(1, 96, 8)}) is None
    flux = FluxMultiControlNetModel([tm.tiny_flux_controlnet(1)])
    ids = torch.zeros(6, 5, 3)
    ids[..., 1] = torch.arange(6)[:, None]
    ids[..., 2] = torch.arange(5)[None, :]
    ids = ids.reshape(30, 3)
    assert find_combiner(flux).token_grid(flux, {"img_ids": ids}) == (6, 5)
    assert find_combiner(flux).token_grid(flux, {"img_ids": None}) is None


@pytest.mark.parametrize("level", LEVELS)
def test_controlnet_union_with_masks(level):
    from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel

    nets = [tm.tiny_union_controlnet(30 + k) for k in range(2)]
    multi = MultiControlNetUnionModel(nets)
    conds = full_conditions(2, 32, 48, batch=2)
    inputs = tm.unet_inputs()
    inputs["sample"] = torch.randn(2, 4, 16, 24)
    ctype = [torch.tensor([[1, 0]] * 2), torch.tensor([[0, 1]] * 2)]
    args = dict(**inputs, controlnet_cond=[[conds[0]], [conds[1]]], control_type=ctype,
                control_type_idx=[[0], [1]], conditioning_scale=[1.0, 0.7])
    with mh.apply(multi, level=level, record=True, masks=halves(32, 48), **TORCH) as h:
        down, mid = multi(**args)
    assert mid.shape[-2:] == (8, 12) and len(h.records) == (5 if level == "residual" else 10)
    for r in h.records:
        assert torch.equal(r.winner, region_map(r.winner)), r.point
