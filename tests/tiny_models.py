"""Tiny diffusers models and pipelines built from config with random weights (no downloads).

One file (over 400 lines) because the tests import every builder from one module and the builders
share private parts (``_sdxl_parts``, ``_euler``).

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


# ============================================================================================
# QwenImage and HunyuanDiT ControlNets (issue 17). QwenImage runs with a tiny Qwen2.5-VL text
# encoder and a byte-level Qwen2 tokenizer built in memory; HunyuanDiT on precomputed prompt
# embeddings (its BERT / T5 text encoders are not built).
# ============================================================================================

QWEN_DIMS = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
QWEN_INPAINT_EXTRA = 4  # packed (latent + mask) channels: (4 + 1) * 4 = 16 + 4


def tiny_qwen_transformer(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**QWEN_DIMS).eval()


def tiny_qwen_controlnet(seed: int = 0, *, driven: bool = True, inpaint: bool = False):
    """A QwenImage ControlNet (2 blocks, 16-dim tokens) matching :func:`tiny_qwen_transformer`;
    ``inpaint``: it takes the packed masked-image latents and mask of the inpaint pipeline."""
    from diffusers import QwenImageControlNetModel

    torch.manual_seed(seed)
    net = QwenImageControlNetModel(
        **QWEN_DIMS, extra_condition_channels=QWEN_INPAINT_EXTRA if inpaint else 0).eval()
    return make_condition_driven(net, seed + 1000) if driven else net


def tiny_qwen_vae(seed: int = 0):
    """A 2-level QwenImage VAE (4 latent channels): scale factor 2, 32 px -> 8 x 8 tokens."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False], latents_mean=[0.0] * 4,
                                  latents_std=[1.0] * 4).eval()


QWEN_VOCAB = 300


def tiny_qwen_tokenizer():
    """A Qwen2 tokenizer with a byte-level vocabulary, no merges and the chat-template tokens,
    built in memory."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab: dict[str, int] = {}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    assert len(tok) <= QWEN_VOCAB
    return tok


def tiny_qwen_text_encoder(seed: int = 0):
    """A 1-layer Qwen2.5-VL (text width 16 = the transformer's joint_attention_dim)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    ids = dict(bos_token_id=None, eos_token_id=256, pad_token_id=256)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=QWEN_VOCAB,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         max_position_embeddings=1024, **ids),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=16, fullatt_block_indexes=[0], patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1, in_chans=3),
        vocab_size=QWEN_VOCAB, **ids)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen_controlnet_pipeline(n: int = 2, seed: int = 0, *, nets=None, inpaint: bool = False):
    """``QwenImageControlNetPipeline`` (``inpaint``: ``QwenImageControlNetInpaintPipeline``)
    with a ``QwenImageMultiControlNetModel`` of ``n`` tiny condition-driven ControlNets (seeds
    ``seed + 1`` ..; ``n=1``: one net, a ControlNet-Union run once per condition), or of
    ``nets``."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImageControlNetInpaintPipeline,
        QwenImageControlNetPipeline,
        QwenImageMultiControlNetModel,
    )

    nets = nets if nets is not None else [
        tiny_qwen_controlnet(seed + 1 + k, inpaint=inpaint) for k in range(n)]
    cls = QwenImageControlNetInpaintPipeline if inpaint else QwenImageControlNetPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_qwen_vae(seed),
               text_encoder=tiny_qwen_text_encoder(seed), tokenizer=tiny_qwen_tokenizer(),
               transformer=tiny_qwen_transformer(seed),
               controlnet=QwenImageMultiControlNetModel(nets))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_inputs(batch: int = 2, seed: int = 0) -> dict:
    """Keyword inputs of a tiny QwenImage ControlNet (8 x 8 packed tokens of 16 channels)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 64, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                encoder_hidden_states_mask=None, timestep=torch.tensor([0.5] * batch),
                img_shapes=[(1, 8, 8)] * batch)


HUNYUAN_DIMS = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                    sample_size=8, hidden_size=16, cross_attention_dim=16,
                    cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=4,
                    text_len_t5=6, mlp_ratio=2.0)
HUNYUAN_LAYERS = 6  # the ControlNets have 6 // 2 - 1 = 2 blocks (and residuals)


def tiny_hunyuan_transformer(seed: int = 0):
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(seed)
    return HunyuanDiT2DModel(num_layers=HUNYUAN_LAYERS, **HUNYUAN_DIMS).eval()


def tiny_hunyuan_controlnet(seed: int = 0, *, driven: bool = True):
    from diffusers import HunyuanDiT2DControlNetModel

    torch.manual_seed(seed)
    net = HunyuanDiT2DControlNetModel(transformer_num_layers=HUNYUAN_LAYERS,
                                      **HUNYUAN_DIMS).eval()
    return make_condition_driven(net, seed + 1000) if driven else net


def tiny_vae8(seed: int = 0):
    """A 4-level VAE of scale factor 8 (HunyuanDiT's pipeline assumes 8): 128 px -> 16 x 16."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(4, 4, 4, 4), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=2, sample_size=128,
    ).eval()


def hunyuan_controlnet_pipeline(n: int = 2, seed: int = 0):
    from diffusers import DDPMScheduler, HunyuanDiTControlNetPipeline

    pipe = HunyuanDiTControlNetPipeline(
        vae=tiny_vae8(seed), text_encoder=None, tokenizer=None,
        transformer=tiny_hunyuan_transformer(seed), scheduler=DDPMScheduler(),
        safety_checker=None, feature_extractor=None,
        controlnet=[tiny_hunyuan_controlnet(seed + 1 + k) for k in range(n)],
        text_encoder_2=None, tokenizer_2=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_prompt_kwargs(batch: int = 1, seed: int = 0) -> dict:
    """Precomputed prompt embeddings (BERT-like 4 tokens, T5-like 6 tokens, width 16) with
    their masks, and the negative ones for classifier-free guidance."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    for neg in ("", "negative_"):
        for suffix, n in (("", 4), ("_2", 6)):
            kw[f"{neg}prompt_embeds{suffix}"] = torch.randn(batch, n, 16, generator=g)
            kw[f"{neg}prompt_attention_mask{suffix}"] = torch.ones(batch, n, dtype=torch.long)
    return kw


def hunyuan_inputs(batch: int = 2, seed: int = 0) -> dict:
    """Keyword inputs of a tiny HunyuanDiT ControlNet besides its condition and scale (16 x 16
    latents: 8 x 8 tokens)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = torch.Generator().manual_seed(seed)
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (8, 8)), (8, 8), output_type="pt")
    return dict(hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
                timestep=torch.tensor([500.0] * batch),
                encoder_hidden_states=torch.randn(batch, 4, 16, generator=g),
                text_embedding_mask=torch.ones(batch, 4, dtype=torch.long),
                encoder_hidden_states_t5=torch.randn(batch, 6, 16, generator=g),
                text_embedding_mask_t5=torch.ones(batch, 6, dtype=torch.long),
                image_meta_size=torch.tensor([[64.0, 64, 64, 64, 0, 0]] * batch),
                style=torch.zeros(batch, dtype=torch.long), image_rotary_emb=rope)


def token_strip_conditions(n: int, batch: int = 2, channels: int = 16, grid=(8, 8),
                           seed: int = 1) -> list[torch.Tensor]:
    """``n`` packed conditions ``[batch, h * w, channels]``, condition k nonzero on the tokens
    of vertical strip k of the ``grid`` only."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    conds = []
    for k in range(n):
        c = torch.zeros(batch, h, w, channels)
        lo, hi = k * w // n, (k + 1) * w // n
        c[:, :, lo:hi] = torch.randn(batch, h, hi - lo, channels, generator=g)
        conds.append(c.reshape(batch, h * w, channels))
    return conds

# ============================================================================================
# end of the QwenImage / HunyuanDiT section
# ============================================================================================
