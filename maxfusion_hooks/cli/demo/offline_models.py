"""Small diffusers models built from config with random weights: nothing is downloaded.

Used by ``maxfusion demo`` (its offline default) and by the test suite (``tests/tiny_models.py``
imports these builders). Every builder is deterministic in its ``seed``; every forward takes
milliseconds on a CPU. Importing this module imports neither diffusers nor transformers: each
builder imports what it needs.

How the offline models are made:

* a Stable Diffusion 1.5-style UNet, VAE and CLIP text encoder, scaled down (channels 8 / 16, two
  levels, one layer per block, VAE scale factor 2), with diffusers' and transformers' default
  random initialisation, and a CLIP tokenizer with a byte-level vocabulary built in memory;
* ControlNets of the same layout whose **conditioning embedding is driven by the condition**:
  a ControlNet built from config ignores its condition (diffusers zero-initialises the last
  convolution of its conditioning embedding and its zero convolutions), so
  :func:`make_condition_driven` gives the conditioning embedding He-normal weights with a gain
  of about 3 and zero biases (an all-zero condition embeds to exactly zero) and gives the
  "zero convolutions" non-zero random weights. Then each net's features follow its condition,
  and conditions that conflict by halves of the image are each won by their own net at most
  sites.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "CROSS_DIM",
    "make_condition_driven",
    "sd_controlnet_pipeline",
    "tiny_controlnet",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "tiny_unet",
    "tiny_vae",
    "unet_config",
]

CROSS_DIM = 32  # width of the tiny text encoder = the UNet's cross-attention dim (SD 1.5-style)

# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def _kaiming_(module: nn.Module, gain: float, generator: torch.Generator) -> None:
    """He-normal weights (std = gain / sqrt(fan_in)) and zero biases for every conv / linear."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * gain
                               / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.zero_()


def _random_(module: nn.Module, generator: torch.Generator, std: float = 0.5) -> None:
    """Non-zero random weights and biases (for the zero convolutions / zero linears)."""
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def make_condition_driven(model: nn.Module, seed: int = 0, gain: float = 3.0) -> nn.Module:
    """Make a small random control model's features follow its condition (in place; returns it).

    ControlNet / ControlNet-Union: ``controlnet_cond_embedding`` gets He-normal weights with
    ``gain`` and zero biases (so an all-zero condition embeds to exactly zero), and the zero
    convolutions get random weights. SD3 / Flux / QwenImage / HunyuanDiT ControlNets: the same
    for the condition input embedder (``pos_embed_input`` / ``controlnet_x_embedder`` /
    ``input_block``) and the zero linears.
    T2I-Adapter: every conv of the adapter gets He-normal weights and zero biases.
    """
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "controlnet_cond_embedding"):
        _kaiming_(model.controlnet_cond_embedding, gain, g)
        _random_(model.controlnet_down_blocks, g)
        _random_(model.controlnet_mid_block, g)
    elif hasattr(model, "pos_embed_input"):  # SD3
        _kaiming_(model.pos_embed_input, gain, g)
        _random_(model.controlnet_blocks, g)
    elif hasattr(model, "controlnet_single_blocks"):  # Flux
        _kaiming_(model.controlnet_x_embedder, gain, g)
        _random_(model.controlnet_blocks, g)
        _random_(model.controlnet_single_blocks, g)
    elif hasattr(model, "controlnet_x_embedder"):  # QwenImage
        _kaiming_(model.controlnet_x_embedder, gain, g)
        _random_(model.controlnet_blocks, g)
    elif hasattr(model, "input_block") and hasattr(model, "controlnet_blocks"):  # HunyuanDiT
        # the condition is patch-embedded by the net's (shared) pos_embed, then input_block
        _kaiming_(model.input_block, gain, g)
        _random_(model.controlnet_blocks, g)
    elif hasattr(model, "adapter"):  # T2I-Adapter
        _kaiming_(model.adapter, gain, g)
    else:
        raise TypeError(f"no conditioning embedding known for {type(model).__name__}")
    return model


# --------------------------------------------------------------------------------------------
# SD 1.5-style pieces
# --------------------------------------------------------------------------------------------


def tiny_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer with a byte-level vocabulary and no merges, built in memory."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_text_encoder(seed: int = 0, *, with_projection: bool = False, hidden: int = CROSS_DIM):
    """A 2-layer CLIP text encoder of width ``hidden`` (vocabulary of :func:`tiny_tokenizer`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=600,
        projection_dim=hidden,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def unet_config(sdxl: bool = False) -> dict:
    """The config shared by :func:`tiny_unet` and :func:`tiny_controlnet` (two levels,
    channels 8 / 16, one layer per block; SDXL-style text-time embedding with ``sdxl``)."""
    kw = dict(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=CROSS_DIM if not sdxl else 2 * CROSS_DIM, norm_num_groups=4,
        attention_head_dim=2,
    )
    if sdxl:
        kw.update(
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=CROSS_DIM + 6 * 8, use_linear_projection=True,
        )
    return kw


def tiny_unet(seed: int = 0, *, sdxl: bool = False):
    """A ``UNet2DConditionModel`` of :func:`unet_config` (diffusers' random initialisation)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, out_channels=4, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **unet_config(sdxl),
    ).eval()


def tiny_controlnet(seed: int = 0, *, sdxl: bool = False, driven: bool = True,
                    global_pool: bool = False):
    """A ControlNet matching :func:`tiny_unet`: 4 down residuals + mid, channels 8 / 16.

    ``driven``: apply :func:`make_condition_driven` (seed ``seed + 1000``), so the net's
    features follow its condition.
    """
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel(
        conditioning_embedding_out_channels=(8, 16), global_pool_conditions=global_pool,
        **unet_config(sdxl),
    ).eval()
    return make_condition_driven(net, seed + 1000) if driven else net


def tiny_vae(seed: int = 0, latent_channels: int = 4, **config):
    """A 2-level VAE: scale factor 2 (a 32 px image has a 16 x 16 latent)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **config,
    ).eval()


def sd_controlnet_pipeline(n: int = 2, seed: int = 0, *, global_pool: bool = False,
                           nets=None, progress: bool = False):
    """``StableDiffusionControlNetPipeline`` with ``n`` tiny condition-driven ControlNets
    (seeds ``seed + 1`` ..), or with ``nets`` (a list, or a single net); DDIM scheduler, no
    safety checker. ``progress``: keep diffusers' progress bar on the denoising loop."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    nets = nets if nets is not None else [
        tiny_controlnet(seed + 1 + k, global_pool=global_pool) for k in range(n)
    ]
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(seed), controlnet=nets, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=not progress)
    return pipe
