"""Diffusers' context parallelism and the ControlNet residuals (diffusers 0.42).

``transformer.enable_parallelism(config=ContextParallelConfig(...))`` splits the transformer's
tokens over the ranks of a device mesh: its ``_cp_plan`` cuts ``hidden_states`` (and the text
tokens and position ids) along the token dim on entry, and gathers the output. Nothing shards
the ControlNets (they have no plan, and no pipeline-level ``enable_parallelism`` exists), so
every rank computes their residuals in full, identical on every rank. The Flux transformer's
plan does not cut ``controlnet_block_samples`` / ``controlnet_single_block_samples``, so
``FluxControlNetPipeline`` under context parallelism fails with a shape mismatch out of the
box (``[B, S/P, C] + [B, S, C]``).

The QwenImage transformer's plan (diffusers 0.42) likewise splits ``hidden_states`` at its
first block and not ``controlnet_block_samples``.

With a handle made on such a pipeline, the Flux (or QwenImage) combiner fuses the full (replicated)
residuals on every rank, which needs no collective, and returns each rank's slice of every fused
residual, cut exactly as the transformer's plan cuts ``hidden_states``: ``chunk`` over the flattened
ring x ulysses mesh, or ``tensor_split`` with ``ulysses_anything`` / ``ring_anything``. The
transformer's default plan then works unchanged. When the transformer's plan already splits the
residuals itself (a user-extended plan), nothing is sliced.

Only private attributes of diffusers are read here (``_parallel_config``,
``context_parallel_config._flattened_mesh``, the hook registry), each with a fallback.
"""

from __future__ import annotations

from typing import Any

import torch

RESIDUAL_ARGS = ("controlnet_block_samples", "controlnet_single_block_samples")


def cp_config(transformer: Any):
    """The transformer's ``ContextParallelConfig`` once set up, or ``None``."""
    pc = getattr(transformer, "_parallel_config", None)
    cpc = getattr(pc, "context_parallel_config", None)
    if cpc is None or getattr(cpc, "_flattened_mesh", None) is None:
        return None
    return cpc


def plan_splits_residuals(transformer: Any) -> bool:
    """Whether the transformer's context-parallel split hooks cut the ControlNet residuals
    themselves (a plan extended with ``controlnet_block_samples``)."""
    registry = getattr(transformer, "_diffusers_hook", None)
    hooks = getattr(registry, "hooks", None)
    if not isinstance(hooks, dict):
        return False
    for hook in hooks.values():
        meta = getattr(hook, "metadata", None)
        if isinstance(meta, dict) and any(k in meta for k in RESIDUAL_ARGS):
            return True
    return False


def local_tokens(t: torch.Tensor | None, cpc, dim: int = 1) -> torch.Tensor | None:
    """This rank's share of ``t`` along ``dim``, as diffusers' split hooks cut
    ``hidden_states`` (a copy, so the full tensor can be freed)."""
    if t is None:
        return None
    import torch.distributed as dist

    mesh = cpc._flattened_mesh
    size = mesh.size()
    rank = dist.get_rank(mesh.get_group())
    if getattr(cpc, "ulysses_anything", False) or getattr(cpc, "ring_anything", False):
        if t.shape[dim] < size:
            raise ValueError(f"a fused residual of {t.shape[dim]} tokens cannot be split over "
                             f"{size} context-parallel ranks")
        part = t.tensor_split(size, dim=dim)[rank]
    else:
        if t.shape[dim] % size:
            raise ValueError(
                f"a fused residual of {t.shape[dim]} tokens is not divisible by the {size} "
                "context-parallel ranks (diffusers' split needs that too; use "
                "ulysses_anything=True for other lengths)")
        part = t.chunk(size, dim=dim)[rank]
    return part.clone(memory_format=torch.contiguous_format)


def shard_flux_output(out, cpc):
    """A ``FluxMultiControlNetModel`` output ``(blocks, singles)`` cut to this rank's tokens."""
    blocks, singles = out
    cut = (lambda ts: None if ts is None else [local_tokens(t, cpc) for t in ts])
    return cut(blocks), cut(singles)
