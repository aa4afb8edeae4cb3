"""Tiny diffusers models and pipelines built from config with random weights (no downloads).

Every builder is deterministic in its ``seed``; every forward takes milliseconds on a CPU. The
SD 1.5-style builders the demo also uses (tokenizer, text encoder, UNet, ControlNet, VAE, the
ControlNet pipeline) and :func:`make_condition_driven` live in the package,
``maxfusion_hooks.cli.demo.offline_models``, and are re-exported here; this file adds the other
families (ControlNet-Union, T2I-Adapter, SDXL, SD3, Flux), inputs, conditions and a raw model.

A ControlNet built from config ignores its condition (diffusers zero-initialises the last
convolution of its conditioning embedding and its zero convolutions), so
:func:`make_condition_driven` gives a model He-normal weights with a gain of about 3 and zero
biases in its condition embedding and non-zero random "zero convolutions": then its features
follow the condition, and conditions that conflict by halves of the image are each won by their
own model at most sites.
"""

from __future__ import annotations

import torch
from torch import nn

# the SD 1.5-style builders and make_condition_driven live in the package (the demo uses them)
from maxfusion_hooks.cli.demo.offline_models import (  # noqa: F401  (re-exported for the tests)
    CROSS_DIM,
    make_condition_driven,
    sd_controlnet_pipeline,
    tiny_controlnet,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
    unet_config,
)

# --------------------------------------------------------------------------------------------
# SD 1.5 / SDXL-style pieces not used by the demo
# --------------------------------------------------------------------------------------------


def tiny_union_controlnet(seed: int = 0, *, driven: bool = True):
    """A ControlNet-Union (SDXL-style, 2 control types) matching :func:`tiny_unet`."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    net = ControlNetUnionModel(
        conditioning_embedding_out_channels=(8, 16), num_control_type=2, num_trans_channel=8,
        num_trans_head=2, num_trans_layer=1, num_proj_channel=8, addition_time_embed_dim=8,
        **unet_config(False),
    ).eval()
    return make_condition_driven(net, seed + 1000) if driven else net


def unet_inputs(batch: int = 2, latent: int = 16, seed: int = 0, sdxl: bool = False) -> dict:
    """Keyword inputs of a (tiny) ControlNet besides its condition and scale."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        sample=torch.randn(batch, 4, latent, latent, generator=g), timestep=torch.tensor(10),
        encoder_hidden_states=torch.randn(batch, 7, 2 * CROSS_DIM if sdxl else CROSS_DIM,
                                          generator=g),
    )
    if sdxl:
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, CROSS_DIM, generator=g),
                                       time_ids=torch.rand(batch, 6, generator=g) * 64)
    return kw


def tiny_adapter(seed: int = 0, *, sdxl: bool = False, driven: bool = True):
    """A full T2I-Adapter matching :func:`tiny_unet` (2 feature maps, 8 and 16 channels)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    ad = T2IAdapter(
        in_channels=3, channels=(8, 16), num_res_blocks=1, downscale_factor=2,
        adapter_type="full_adapter",
    ).eval()
    return make_condition_driven(ad, seed + 1000) if driven else ad


def sdxl_controlnet_pipeline(n: int = 2, seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    pipe = StableDiffusionXLControlNetPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed),
        text_encoder_2=tiny_text_encoder(seed + 1, with_projection=True),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=tiny_unet(seed, sdxl=True),
        controlnet=[tiny_controlnet(seed + 1 + k, sdxl=True) for k in range(n)],
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear"),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_adapter_pipeline(n: int = 2, seed: int = 0):
    from diffusers import DDIMScheduler, StableDiffusionAdapterPipeline

    pipe = StableDiffusionAdapterPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(seed), adapter=[tiny_adapter(seed + 1 + k) for k in range(n)],
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# SD3 and Flux (the pipelines run on precomputed prompt embeddings: no text encoders)
# --------------------------------------------------------------------------------------------

SD3_DIMS = dict(joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32)


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, out_channels=4, pos_embed_max_size=32, **SD3_DIMS,
    ).eval()


def tiny_sd3_controlnet(seed: int = 0, *, driven: bool = True):
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    net = SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, out_channels=4, pos_embed_max_size=32, **SD3_DIMS,
    ).eval()
    return make_condition_driven(net, seed + 1000) if driven else net


def sd3_controlnet_pipeline(n: int = 2, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetPipeline

    pipe = StableDiffusion3ControlNetPipeline(
        transformer=tiny_sd3_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(seed), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        controlnet=[tiny_sd3_controlnet(seed + 1 + k) for k in range(n)],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_prompt_kwargs(batch: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch, 7, 32, generator=g),
        negative_prompt_embeds=torch.randn(batch, 7, 32, generator=g),
        pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
        negative_pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
    )


FLUX_DIMS = dict(attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=32, axes_dims_rope=[2, 2, 4])


def _flux_dims(heads: int) -> dict:
    # Ulysses context parallelism over P ranks needs a multiple of P attention heads
    # (tests/test_hooks_distributed.py runs 4 ranks with heads=4)
    return {**FLUX_DIMS, "num_attention_heads": heads}


def tiny_flux_transformer(seed: int = 0, *, heads: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, **_flux_dims(heads)
    ).eval()


def tiny_flux_controlnet(seed: int = 0, *, driven: bool = True, heads: int = 2):
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    net = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, **_flux_dims(heads)
    ).eval()
    return make_condition_driven(net, seed + 1000) if driven else net


def flux_controlnet_pipeline(n: int = 2, seed: int = 0, *, heads: int = 2):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(seed, latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=tiny_flux_transformer(seed, heads=heads),
        controlnet=[tiny_flux_controlnet(seed + 1 + k, heads=heads) for k in range(n)],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_prompt_kwargs(batch: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 7, 32, generator=g),
                pooled_prompt_embeds=torch.randn(batch, 32, generator=g))


def sd3_inputs(batch=2, seed=0):
    """Keyword inputs of a tiny SD3 ControlNet besides its condition and scale."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g),
                encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
                timestep=torch.tensor([500.0] * batch))


def sd3_latent_conditions(n, batch=2, seed=1):
    """``n`` latent-space conditions ``[batch, 4, 16, 16]`` that conflict by vertical strips."""
    g = torch.Generator().manual_seed(seed)
    conds = []
    for k in range(n):  # latent-space conditions, one strip each
        c = torch.zeros(batch, 4, 16, 16)
        c[..., k * 16 // n:(k + 1) * 16 // n] = torch.randn(batch, 4, 16, 16 // n, generator=g)
        conds.append(c)
    return conds


def flux_inputs(batch=2, seed=0):
    """Keyword inputs of a tiny Flux ControlNet (8 x 8 packed tokens of 16 channels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(64, 1), ids.reshape(64, 2).float()], 1)
    return dict(hidden_states=torch.randn(batch, 64, 16, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g),
                encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
                timestep=torch.tensor([0.5] * batch), img_ids=img_ids,
                txt_ids=torch.zeros(7, 3))


def flux_token_conditions(n, batch=2, seed=1):
    """``n`` packed conditions ``[batch, 64, 16]``, each on its own rows of tokens."""
    g = torch.Generator().manual_seed(seed)
    conds = []
    for k in range(n):  # packed tokens [B, 64, 16], each condition on its own rows of tokens
        c = torch.zeros(batch, 64, 16)
        c[:, k * 64 // n:(k + 1) * 64 // n] = torch.randn(batch, 64 // n, 16, generator=g)
        conds.append(c)
    return conds


# --------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------


def strip_conditions(n: int, size: int = 32, batch: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """``n`` condition images ``[batch, 3, size, size]`` in [0, 1] that conflict by vertical
    strips: condition k is a random pattern in strip k of ``n`` (halves for n = 2) and zero
    elsewhere, so each strip should follow its own condition's model."""
    g = torch.Generator().manual_seed(seed)
    conds = []
    for k in range(n):
        img = torch.zeros(batch, 3, size, size)
        lo, hi = k * size // n, (k + 1) * size // n
        img[..., lo:hi] = torch.rand(batch, 3, size, hi - lo, generator=g)
        conds.append(img)
    return conds


def strip_masks(n: int, shape_hw: tuple[int, int], margin: int = 0) -> list[torch.Tensor]:
    """Bool ``[H, W]`` masks of the ``n`` vertical strips of a feature map, each shrunk by
    ``margin`` columns on the sides that border another strip."""
    h, w = shape_hw
    masks = []
    for k in range(n):
        lo, hi = k * w // n, (k + 1) * w // n
        lo = lo + margin if k > 0 else lo
        hi = hi - margin if k < n - 1 else hi
        m = torch.zeros(h, w, dtype=torch.bool)
        m[:, lo:max(hi, lo)] = True
        masks.append(m)
    return masks


# --------------------------------------------------------------------------------------------
# raw PyTorch
# --------------------------------------------------------------------------------------------


class TwoStage(nn.Module):
    """A raw two-stage control model: ``head(stage2(stage1(x)))`` (``head`` optional).

    ``skip_stage1`` (a runtime attribute, not part of the architecture) makes a model skip its
    first stage, so that models of one architecture reach different fusion points; ``no_grad``
    runs stage 1 under ``torch.no_grad()``; ``seen_modes`` collects the grad / inference /
    autocast modes stage 2 runs under.
    """

    def __init__(self, cin: int = 3, c: int = 8, seed: int = 0, head: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.stage1 = nn.Sequential(nn.Conv2d(cin, c, 3, padding=1), nn.SiLU(),
                                    nn.Conv2d(c, c, 3, padding=1))
        self.stage2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
                                    nn.Conv2d(c, c, 3, padding=1))
        self.head = nn.Conv2d(c, c, 1) if head else None
        self.skip_stage1 = False
        self.no_grad = False
        self.seen_modes: list[tuple] = []
        self.stage2.register_forward_pre_hook(self._see)

    def _see(self, module, args):
        self.seen_modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                                torch.is_autocast_enabled("cpu")))

    def forward(self, x):
        if self.skip_stage1:
            h = torch.cat([x, x[:, :1].expand(-1, self.stage2[0].in_channels - x.shape[1],
                                                  -1, -1)], 1)
        elif self.no_grad:
            with torch.no_grad():
                h = self.stage1(x)
        else:
            h = self.stage1(x)
        h = self.stage2(h)
        return self.head(h) if self.head is not None else h


def single_thread_fixture():
    """A module-scoped autouse fixture body: one intra-op thread (the tiny models run fastest
    that way and do not fight other processes for the cores); restores the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ============================================================================================
# issue 17, pipelines of the supported combiners: AnimateDiff ControlNet, PAG ControlNet
# (SD, SDXL), SD / SDXL img2img and inpaint, SDXL ControlNet-Union inpaint
# ============================================================================================


def tiny_motion_adapter(seed: int = 0):
    """A ``MotionAdapter`` matching :func:`tiny_unet` (one motion layer per block, 2 heads)."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    return MotionAdapter(
        block_out_channels=(8, 16), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=4, motion_max_seq_length=8,
    ).eval()


def animatediff_controlnet_pipeline(n: int = 2, seed: int = 0):
    """``AnimateDiffControlNetPipeline``: :func:`tiny_unet` made a ``UNetMotionModel`` with
    :func:`tiny_motion_adapter`, ``n`` condition-driven ControlNets (frames in the batch)."""
    from diffusers import AnimateDiffControlNetPipeline, DDIMScheduler

    pipe = AnimateDiffControlNetPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(seed), motion_adapter=tiny_motion_adapter(seed),
        controlnet=[tiny_controlnet(seed + 1 + k) for k in range(n)],
        scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_inpaint_unet(seed: int = 0, *, sdxl: bool = False):
    """:func:`tiny_unet` with 9 input channels (latents, mask, masked-image latents): what the
    inpaint pipelines run on an inpainting checkpoint."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = {**unet_config(sdxl), "in_channels": 9}
    return UNet2DConditionModel(
        sample_size=16, out_channels=4, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **cfg,
    ).eval()


def _sd_parts(seed: int) -> dict:
    return dict(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed),
                tokenizer=tiny_tokenizer(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def _sdxl_parts(seed: int) -> dict:
    return dict(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed),
                text_encoder_2=tiny_text_encoder(seed + 1, with_projection=True),
                tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer())


def _euler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")


def sd_controlnet_variant(kind: str, n: int = 2, seed: int = 0):
    """An SD 1.5-style ControlNet pipeline with ``n`` condition-driven ControlNets: ``kind``
    ``"img2img"``, ``"inpaint"`` (a 9-channel inpainting UNet) or ``"pag"`` (PAG on the mid
    block's attention)."""
    import diffusers as d

    nets = [tiny_controlnet(seed + 1 + k) for k in range(n)]
    parts = dict(**_sd_parts(seed), controlnet=nets, scheduler=d.DDIMScheduler())
    if kind == "img2img":
        pipe = d.StableDiffusionControlNetImg2ImgPipeline(unet=tiny_unet(seed), **parts)
    elif kind == "inpaint":
        pipe = d.StableDiffusionControlNetInpaintPipeline(unet=tiny_inpaint_unet(seed), **parts)
    elif kind == "pag":
        pipe = d.StableDiffusionControlNetPAGPipeline(unet=tiny_unet(seed), **parts,
                                                      pag_applied_layers=["mid"])
    else:
        raise ValueError(f"kind must be img2img, inpaint or pag, got {kind!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_controlnet_variant(kind: str, n: int = 2, seed: int = 0):
    """An SDXL-style ControlNet pipeline with ``n`` condition-driven ControlNets: ``kind``
    ``"img2img"``, ``"inpaint"`` (a 9-channel inpainting UNet) or ``"pag"``."""
    import diffusers as d

    nets = [tiny_controlnet(seed + 1 + k, sdxl=True) for k in range(n)]
    parts = dict(**_sdxl_parts(seed), controlnet=nets, scheduler=_euler())
    if kind == "img2img":
        pipe = d.StableDiffusionXLControlNetImg2ImgPipeline(unet=tiny_unet(seed, sdxl=True),
                                                            **parts)
    elif kind == "inpaint":
        pipe = d.StableDiffusionXLControlNetInpaintPipeline(
            unet=tiny_inpaint_unet(seed, sdxl=True), **parts)
    elif kind == "pag":
        pipe = d.StableDiffusionXLControlNetPAGPipeline(unet=tiny_unet(seed, sdxl=True), **parts,
                                                        pag_applied_layers=["mid"])
    else:
        raise ValueError(f"kind must be img2img, inpaint or pag, got {kind!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_union_controlnet_xl(seed: int = 0, *, driven: bool = True):
    """A ControlNet-Union (2 control types) matching the SDXL :func:`tiny_unet` (text-time
    embedding), for the SDXL ControlNet-Union pipelines."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    net = ControlNetUnionModel(
        conditioning_embedding_out_channels=(8, 16), num_control_type=2, num_trans_channel=8,
        num_trans_head=2, num_trans_layer=1, num_proj_channel=8, **unet_config(True),
    ).eval()
    return make_condition_driven(net, seed + 1000) if driven else net


def sdxl_union_inpaint_pipeline(n: int = 2, seed: int = 0):
    """``StableDiffusionXLControlNetUnionInpaintPipeline`` with ``n`` ControlNet-Union nets
    (``MultiControlNetUnionModel``); the pipeline takes a 4-channel UNet only (diffusers 0.42
    raises for 9: the Union nets do the inpainting, as ControlNet-Union ProMax)."""
    from diffusers import StableDiffusionXLControlNetUnionInpaintPipeline

    pipe = StableDiffusionXLControlNetUnionInpaintPipeline(
        **_sdxl_parts(seed), unet=tiny_unet(seed, sdxl=True),
        controlnet=[tiny_union_controlnet_xl(seed + 1 + k) for k in range(n)],
        scheduler=_euler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
