"""One short handler per model family, found by type in two small registries.

One file (over 400 lines) because every family's handlers are short and read best beside the two
registries that dispatch them.

* Combiner handlers (``MultiControlNetModel``, ``MultiControlNetUnionModel``,
  ``SD3MultiControlNetModel``, ``FluxMultiControlNetModel``, ``QwenImageMultiControlNetModel``,
  ``HunyuanDiT2DMultiControlNetModel``, ``MultiAdapter``): how the
  combiner calls each of its nets (``jobs``), how a net's output splits into residuals
  (``flatten``) and how fused residuals become the combiner's output (``pack``). The patched
  combiner forward that uses them is generic (``_api.MaxFusionHandle``).
* Model families (``ControlNetModel`` / ``ControlNetUnionModel``, ``T2IAdapter``,
  ``SD3ControlNetModel``, ``FluxControlNetModel``, ``QwenImageControlNetModel``,
  ``HunyuanDiT2DControlNetModel``): their block-level fusion points and the dimension of their
  channels.

Classes are matched by name along the instance's MRO, restricted to classes defined in
diffusers, so nothing here imports diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ._lockstep import FusionPoint


def is_diffusers_instance(obj: Any, class_name: str) -> bool:
    """``isinstance(obj, diffusers.<class_name>)`` without importing diffusers."""
    return any(
        c.__name__ == class_name and c.__module__.split(".")[0] == "diffusers"
        for c in type(obj).__mro__
    )


# --------------------------------------------------------------------------------------------
# model families: block-level fusion points
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    name: str
    class_names: tuple[str, ...]
    channel_dim: int
    points: Callable[[nn.Module], list[FusionPoint]]


def _controlnet_points(net) -> list[FusionPoint]:
    # conv_in + condition embedding: the input of the first down block, fused in place because
    # the same tensor is also the ControlNet's first residual
    pts = [FusionPoint("down_blocks.0", on="input", leaf="hidden_states", inplace=True,
                       emits=False)]
    pts += [FusionPoint(f"down_blocks.{k}", emits=False) for k in range(len(net.down_blocks))]
    if getattr(net, "mid_block", None) is not None:
        pts.append(FusionPoint("mid_block", emits=False))
    return pts


def _adapter_points(net) -> list[FusionPoint]:
    pts = []
    if hasattr(net.adapter, "conv_in"):
        pts.append(FusionPoint("adapter.conv_in", emits=False))
    # the body outputs are also the adapter's features: their final merge uses the features
    # that entered these fusions (emits=True)
    pts += [FusionPoint(f"adapter.body.{k}") for k in range(len(net.adapter.body))]
    return pts


def _token_block_points(blocks: list[str], leaf) -> list[FusionPoint]:
    """The transformer families: the image tokens entering the first block (in place of its
    ``hidden_states`` argument, however it is passed), then every block's output (element
    ``leaf`` where a block returns a tuple, the whole output where ``leaf`` is None)."""
    if not blocks:
        return []
    pts = [FusionPoint(blocks[0], on="input", leaf="hidden_states", emits=False)]
    pts += [FusionPoint(b, leaf=leaf, emits=False) for b in blocks]
    return pts


def _sd3_points(net) -> list[FusionPoint]:
    # a block returns (text tokens, image tokens) where the net has a context embedder
    leaf = 1 if getattr(net, "context_embedder", None) is not None else None
    return _token_block_points(
        [f"transformer_blocks.{k}" for k in range(len(net.transformer_blocks))], leaf)


def _flux_points(net) -> list[FusionPoint]:
    # both kinds of block return (text tokens, image tokens): fuse the image tokens
    blocks = [f"transformer_blocks.{k}" for k in range(len(net.transformer_blocks))]
    blocks += [f"single_transformer_blocks.{k}" for k in range(len(net.single_transformer_blocks))]
    return _token_block_points(blocks, 1)


def _qwen_points(net) -> list[FusionPoint]:
    # image tokens img_in(latents) + controlnet_x_embedder(condition) enter the first block;
    # every block returns (text tokens, image tokens)
    return _token_block_points(
        [f"transformer_blocks.{k}" for k in range(len(net.transformer_blocks))], 1)


def _hunyuan_points(net) -> list[FusionPoint]:
    # patch tokens + input_block(patch tokens of the condition) enter the first block (passed
    # positionally); every block returns the image tokens alone
    return _token_block_points([f"blocks.{k}" for k in range(len(net.blocks))], None)


MODEL_FAMILIES: list[ModelFamily] = [
    ModelFamily("controlnet", ("ControlNetModel", "ControlNetUnionModel"), 1, _controlnet_points),
    ModelFamily("t2i_adapter", ("T2IAdapter",), 1, _adapter_points),
    ModelFamily("sd3_controlnet", ("SD3ControlNetModel",), -1, _sd3_points),
    ModelFamily("flux_controlnet", ("FluxControlNetModel",), -1, _flux_points),
    ModelFamily("qwenimage_controlnet", ("QwenImageControlNetModel",), -1, _qwen_points),
    ModelFamily("hunyuandit_controlnet", ("HunyuanDiT2DControlNetModel",), -1,
                _hunyuan_points),
]


def find_family(model: nn.Module) -> ModelFamily | None:
    for fam in MODEL_FAMILIES:
        if any(is_diffusers_instance(model, n) for n in fam.class_names):
            return fam
    return None


# img_ids tensors of Flux calls -> (version, token grid)
_GRIDS: WeakIdKeyDictionary = WeakIdKeyDictionary()

# --------------------------------------------------------------------------------------------
# combiners: residual level (and the frame of block level)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One net's forward inside one combiner call."""

    index: int  # the net's (or condition's) index in the combiner
    net: nn.Module
    scale: float  # 0: the net is not run
    call: Callable[[], Any]


def _common(a: dict, per_net: Sequence[str]) -> dict:
    return {k: v for k, v in a.items() if k not in per_net and k != "return_dict"}


def _scales(value, n: int) -> list:
    """A per-net list of conditioning scales (a single number applies to every net)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class CombinerHandler:
    """Base: a diffusers multi-condition combiner whose nets apply their own scales."""

    class_name: str = ""
    nets_attr: str = "nets"
    channel_dim: int = 1
    scales_are_weights: bool = False  # True: the fusion applies the scales (MultiAdapter)

    def nets(self, combiner) -> list[nn.Module]:
        return list(getattr(combiner, self.nets_attr))

    def jobs(self, combiner, a: dict) -> list[Job]:
        raise NotImplementedError

    def flatten(self, out) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def pack(self, fused: list, template) -> Any:
        raise NotImplementedError

    def nothing(self, jobs: list[Job]) -> Any:
        """The output when every scale is 0: one net runs at scale 0 for zeros of the right
        shapes (what diffusers' sum gives)."""
        return jobs[0].call()

    def token_grid(self, combiner, a: dict) -> tuple[int, int] | None:
        """``(h, w)`` of the image-token grid of this call, for nets whose features are tokens
        ``[B, h * w, C]`` (regional masks are resized to it); ``None`` for feature maps."""
        return None

    # diffusers' context parallelism of the pipeline's transformer cuts its image tokens but
    # not these residuals: the combiner then returns each rank's share (``_parallel``)
    shards_for_context_parallel: bool = False

    def shard(self, out, cpc) -> Any:
        """The combiner's output cut to this rank's tokens (``shards_for_context_parallel``)."""
        raise NotImplementedError


class MultiControlNet(CombinerHandler):
    """``MultiControlNetModel`` (SD1.5 / SDXL ControlNet pipelines: txt2img, img2img, inpaint)."""

    class_name = "MultiControlNetModel"
    per_net = ("controlnet_cond", "conditioning_scale")

    def jobs(self, c, a):
        common = _common(a, self.per_net)
        return [
            Job(i, net, float(s), partial(net, **common, controlnet_cond=img,
                                          conditioning_scale=s, return_dict=False))
            for i, (img, s, net) in enumerate(zip(
                a["controlnet_cond"], _scales(a["conditioning_scale"], len(c.nets)), c.nets))
        ]

    def flatten(self, out):
        down, mid = out
        return [(f"down.{k}", d) for k, d in enumerate(down)] + [("mid", mid)]

    def pack(self, fused, template):
        return list(fused[:-1]), fused[-1]


class MultiControlNetUnion(MultiControlNet):
    """``MultiControlNetUnionModel`` (ControlNet-Union SDXL pipelines)."""

    class_name = "MultiControlNetUnionModel"
    per_net = ("controlnet_cond", "control_type", "control_type_idx", "conditioning_scale")

    def jobs(self, c, a):
        common = _common(a, self.per_net)
        return [
            Job(i, net, float(s), partial(net, **common, controlnet_cond=img, control_type=ct,
                                          control_type_idx=cti, conditioning_scale=s,
                                          from_multi=True, return_dict=False))
            for i, (img, ct, cti, s, net) in enumerate(zip(
                a["controlnet_cond"], a["control_type"], a["control_type_idx"],
                _scales(a["conditioning_scale"], len(c.nets)), c.nets))
        ]

    def nothing(self, jobs):
        return None, None  # diffusers skips nets of scale 0 and returns (None, None)


class SD3MultiControlNet(CombinerHandler):
    """``SD3MultiControlNetModel``: token residuals ``[B, L, C]``, one per transformer block."""

    class_name = "SD3MultiControlNetModel"
    channel_dim = -1
    per_net = ("controlnet_cond", "conditioning_scale")

    def jobs(self, c, a):
        common = _common(a, self.per_net)
        return [
            Job(i, net, float(s), partial(net, **common, controlnet_cond=img,
                                          conditioning_scale=s, return_dict=False))
            for i, (img, s, net) in enumerate(zip(
                a["controlnet_cond"], _scales(a["conditioning_scale"], len(c.nets)), c.nets))
        ]

    def flatten(self, out):
        return [(f"block.{k}", t) for k, t in enumerate(out[0])]

    def pack(self, fused, template):
        return (tuple(fused),)

    def nothing(self, jobs):
        return (tuple(jobs[0].call()[0]),)

    def token_grid(self, c, a):
        # the latents [B, C, H, W] enter the nets unpatched: patch_size x patch_size patches
        x = a.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return None  # already tokens (SD3.5 large ControlNets): grid from the token count
        p = int(getattr(c.nets[0].config, "patch_size", 1))
        return x.shape[-2] // p, x.shape[-1] // p


class FluxMultiControlNet(CombinerHandler):
    """``FluxMultiControlNetModel``: several ControlNets, or one ControlNet-Union run once per
    condition (then the "nets" are the conditions)."""

    class_name = "FluxMultiControlNetModel"
    channel_dim = -1
    per_net = ("controlnet_cond", "controlnet_mode", "conditioning_scale")

    def jobs(self, c, a):
        common = _common(a, self.per_net)
        conds = a["controlnet_cond"]
        nets = list(c.nets) if len(c.nets) > 1 else [c.nets[0]] * len(conds)
        return [
            Job(i, net, float(s), partial(net, **common, controlnet_cond=img,
                                          controlnet_mode=None if m is None else m[:, None],
                                          conditioning_scale=s, return_dict=False))
            for i, (img, m, s, net) in enumerate(zip(
                conds, _scales(a["controlnet_mode"], len(conds)),
                _scales(a["conditioning_scale"], len(conds)), nets))
        ]

    def flatten(self, out):
        blocks, singles = out
        return ([(f"block.{k}", t) for k, t in enumerate(blocks or [])]
                + [(f"single.{k}", t) for k, t in enumerate(singles or [])])

    def token_grid(self, c, a):
        # the pipeline packs 2 x 2 latent patches into one token and gives each token its
        # (0, row, col) in img_ids: the grid is (max row + 1, max col + 1). Reading it is a
        # host sync, made once per img_ids tensor (the pipelines make one per call)
        ids = a.get("img_ids")
        if not isinstance(ids, torch.Tensor) or ids.shape[-1] < 3:
            return None
        found = _GRIDS.get(ids)
        if found is None or found[0] != ids._version:
            flat = ids.reshape(-1, ids.shape[-1])
            grid = (int(flat[:, 1].max()) + 1, int(flat[:, 2].max()) + 1)
            if ids.is_inference():
                return grid
            found = (ids._version, grid)
            _GRIDS[ids] = found
        return found[1]

    shards_for_context_parallel = True

    def shard(self, out, cpc):
        from ._parallel import shard_flux_output

        return shard_flux_output(out, cpc)

    def pack(self, fused, template):
        nb = len(template[0]) if template[0] is not None else 0
        blocks = list(fused[:nb]) if template[0] is not None else None
        singles = list(fused[nb:]) if template[1] is not None else None
        return blocks, singles


def _count_check(combiner_name: str, n_nets: int, conds, scales) -> None:
    n_conds = len(conds)
    if n_nets > 1 and n_conds != n_nets:
        raise ValueError(f"{combiner_name} has {n_nets} ControlNets but got {n_conds} "
                         "conditions (controlnet_cond): give one per ControlNet")
    if len(scales) != n_conds:
        raise ValueError(f"{combiner_name} got {len(scales)} conditioning scales for {n_conds} "
                         "conditions: give one per condition (or a single number)")


def _image_shape_grid(img_shapes) -> tuple[int, int] | None:
    """The token grid ``(h, w)`` of QwenImage's ``img_shapes``: one ``(frames, h, w)`` per
    sample (or a list of them per sample, the first being the generated image)."""
    try:
        s = img_shapes[0]
        if isinstance(s, list):
            s = s[0]
        frames, h, w = (int(x) for x in s)
    except (TypeError, ValueError, IndexError):
        return None
    return (h, w) if frames == 1 else None


class QwenImageMultiControlNet(CombinerHandler):
    """``QwenImageMultiControlNetModel``: one ControlNet-Union run once per condition (what
    diffusers 0.42 does, summing), or several ControlNets, one condition each (which diffusers
    refuses: "only supports a single controlnet-union now"). Token residuals ``[B, L, C]``,
    one per transformer block."""

    class_name = "QwenImageMultiControlNetModel"
    channel_dim = -1
    per_net = ("controlnet_cond", "conditioning_scale")
    shards_for_context_parallel = True

    def jobs(self, c, a):
        common = _common(a, self.per_net)
        conds = list(a["controlnet_cond"])  # a list, or a tensor of stacked conditions
        scales = _scales(a["conditioning_scale"], len(conds))
        _count_check(type(c).__name__, len(c.nets), conds, scales)
        nets = list(c.nets) if len(c.nets) > 1 else [c.nets[0]] * len(conds)
        return [
            Job(i, net, float(s), partial(net, **common, controlnet_cond=img,
                                          conditioning_scale=s, return_dict=False))
            for i, (img, s, net) in enumerate(zip(conds, scales, nets))
        ]

    def flatten(self, out):
        return [(f"block.{k}", t) for k, t in enumerate(out or [])]

    def pack(self, fused, template):
        return None if template is None else list(fused)

    def token_grid(self, c, a):
        # the pipelines pack 2 x 2 latent patches per token and pass the packed grid
        return _image_shape_grid(a.get("img_shapes"))

    def shard(self, out, cpc):
        from ._parallel import local_tokens

        return None if out is None else [local_tokens(t, cpc) for t in out]


class HunyuanDiTMultiControlNet(CombinerHandler):
    """``HunyuanDiT2DMultiControlNetModel``: several HunyuanDiT ControlNets, one condition
    each; the output is ``(list of token residuals [B, L, C],)``, one per block."""

    class_name = "HunyuanDiT2DMultiControlNetModel"
    channel_dim = -1
    per_net = ("controlnet_cond", "conditioning_scale")

    def jobs(self, c, a):
        common = _common(a, self.per_net)
        conds = list(a["controlnet_cond"])
        scales = _scales(a["conditioning_scale"], len(conds))
        _count_check(type(c).__name__, len(c.nets), conds, scales)
        nets = list(c.nets) if len(c.nets) > 1 else [c.nets[0]] * len(conds)
        return [
            Job(i, net, float(s), partial(net, **common, controlnet_cond=img,
                                          conditioning_scale=s, return_dict=False))
            for i, (img, s, net) in enumerate(zip(conds, scales, nets))
        ]

    def flatten(self, out):
        return [(f"block.{k}", t) for k, t in enumerate(out[0])]

    def pack(self, fused, template):
        return (list(fused),)

    def token_grid(self, c, a):
        x = a.get("hidden_states")  # the latents [B, C, H, W], patchified by the nets
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return None
        p = int(getattr(c.nets[0].config, "patch_size", 1) or 1)
        return x.shape[-2] // p, x.shape[-1] // p


class MultiAdapterHandler(CombinerHandler):
    """``MultiAdapter`` (SD / SDXL adapter pipelines). The adapters do not scale their outputs:
    ``adapter_weights`` are the fusion's weights. ``None`` means 1 for every adapter (diffusers
    averages with 1/N; a fusion needs no such normalisation)."""

    class_name = "MultiAdapter"
    nets_attr = "adapters"
    scales_are_weights = True

    def jobs(self, c, a):
        xs = a["xs"]
        n = len(c.adapters)
        w = a.get("adapter_weights")
        if w is None:
            weights = [1.0] * n
        elif isinstance(w, (int, float)):
            weights = [float(w)] * n
        else:
            weights = [float(x) for x in w]
        return [Job(i, ad, weights[i], partial(ad, x))
                for i, (x, ad) in enumerate(zip(xs, c.adapters))]

    def flatten(self, out):
        return [(f"feature.{k}", t) for k, t in enumerate(out)]

    def pack(self, fused, template):
        return list(fused)

    def nothing(self, jobs):
        return [t * 0.0 for t in jobs[0].call()]


COMBINERS: list[CombinerHandler] = [
    MultiControlNet(),
    MultiControlNetUnion(),
    SD3MultiControlNet(),
    FluxMultiControlNet(),
    QwenImageMultiControlNet(),
    HunyuanDiTMultiControlNet(),
    MultiAdapterHandler(),
]


def find_combiner(obj: Any) -> CombinerHandler | None:
    # the most derived match wins (MultiControlNetUnion is listed after MultiControlNet)
    for h in reversed(COMBINERS):
        if is_diffusers_instance(obj, h.class_name):
            return h
    return None
