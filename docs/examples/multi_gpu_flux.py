"""MaxFusion with a Flux transformer split across devices (diffusers' context parallelism).

    torchrun --nproc-per-node 2 docs/examples/multi_gpu_flux.py

One process per GPU (NCCL), or per CPU process with gloo where there is no GPU (the output
quoted in docs/integration.md was made that way). Offline: a tiny Flux transformer and two
tiny ControlNets with random weights; for real models, load them with ``from_pretrained``
where ``tiny_flux_pipeline`` builds them.

Part 1: ``FluxControlNetPipeline`` with two ControlNets, MaxFusion at residual level, and the
transformer under Ulysses context parallelism. Diffusers runs the ControlNets in full on every
rank; the hook fuses their residuals (no collective: they are the same on every rank) and
hands each rank its share of the tokens, which the transformer's plan expects. The result is
compared with the same pipeline run before parallelism was enabled (what one device gives).

Part 2: the kernels with sharded sites. Each rank holds a share of every residual's tokens;
``max_fuse_many(..., process_group=...)`` sums the normalisers over the ranks with one
all-reduce, and each rank's result is its slice of the unsharded fusion.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

import maxfusion_hooks as mh
from maxfusion_kernels import max_fuse_many

FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=[2, 2, 4])


def tiny_flux_pipeline(device):
    """FluxControlNetPipeline(transformer, [controlnet_a, controlnet_b]) with random weights;
    with real models: FluxControlNetPipeline.from_pretrained(base, controlnet=[a, b])."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxControlNetPipeline,
        FluxTransformer2DModel,
    )

    from maxfusion_hooks.cli.demo.offline_models import make_condition_driven, tiny_vae

    torch.manual_seed(0)  # the same weights on every rank
    transformer = FluxTransformer2DModel(**FLUX).eval()
    nets = []
    for k in range(2):
        torch.manual_seed(1 + k)
        nets.append(make_condition_driven(FluxControlNetModel(**FLUX).eval(), 1001 + k))
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer, controlnet=nets,
        vae=tiny_vae(0, latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def conditions(device, size=32):
    """Two condition images that conflict by halves: each drawn in its own half only."""
    g = torch.Generator().manual_seed(0)
    left, right = torch.zeros(2, 1, 3, size, size)
    left[..., : size // 2] = torch.rand(1, 3, size, size // 2, generator=g)
    right[..., size // 2:] = torch.rand(1, 3, size, size // 2, generator=g)
    return [left.to(device), right.to(device)]


def main():
    warnings.filterwarnings("ignore")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # diffusers 0.42's enable_parallelism computes rank % torch.accelerator.device_count(),
        # which is 0 on a CPU-only torch: pretend there is one device (this process only)
        torch.accelerator.device_count = lambda: 1
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    # ---- part 1: a Flux ControlNet pipeline under context parallelism ----
    from diffusers import ContextParallelConfig

    pipe = tiny_flux_pipeline(device)
    g = torch.Generator().manual_seed(0)
    prompt = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g).to(device),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(device))

    def generate():
        return pipe(control_image=conditions(device), controlnet_conditioning_scale=[1.0, 0.8],
                    num_inference_steps=4, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **prompt).images

    with mh.apply(pipe, level="residual", record=True) as h:
        one_device = generate()  # before parallelism: what one device gives
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    say(f"part 1: FluxControlNetPipeline, {world} ranks ({backend}), Ulysses context "
        f"parallelism, MaxFusion at residual level")
    try:  # diffusers alone (the sum of the residuals): its plan does not split them
        generate()
    except RuntimeError as e:
        say(f"  without maxfusion_hooks, diffusers raises: {e}")
    with mh.apply(pipe, level="residual", record=True) as h:
        split = generate()
    tokens = h.records[0].winner.shape[-1]
    say(f"  with it: {len(h.records)} fusions (2 residuals x 4 steps) of the ControlNets' full "
        f"residuals ({tokens} image tokens, the same on every rank); each rank's transformer "
        f"gets {tokens // world} of them")
    diff = (split - one_device).abs().max().item()
    worst = torch.tensor([diff], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    say(f"  latents {tuple(split.shape)}: max |context parallel - one device| over the ranks "
        f"= {worst.item():.2e}")

    # ---- part 2: sharded residuals, the normalisers summed over the ranks ----
    torch.manual_seed(0)  # the same full residuals on every rank, then each keeps its share
    shapes = [(2, 1024, 128)] * 5  # 5 token residuals [B, L, C] (Flux: [B, 4096, 3072])
    full = [[torch.randn(s) * (1 + i) for i in range(2)] for s in shapes]
    bounds = torch.linspace(0, 1024, world + 1).long().tolist()
    lo, hi = bounds[rank], bounds[rank + 1]
    mine = [[t[:, lo:hi].to(device) for t in grp] for grp in full]
    local = max_fuse_many(mine, channel_dim=-1, process_group=dist.group.WORLD)
    whole = max_fuse_many([[t.to(device) for t in grp] for grp in full], channel_dim=-1)
    err = max((a - b[:, lo:hi]).abs().max().item() for a, b in zip(local, whole))
    worst = torch.tensor([err], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    n, b = 2, shapes[0][0]
    say(f"part 2: max_fuse_many of {len(shapes)} residuals {list(shapes[0])}, tokens split "
        f"{[bounds[r + 1] - bounds[r] for r in range(world)]} over the ranks")
    say(f"  one all-reduce per call: {4 * n * b * len(shapes)} bytes (4 B x N={n} x B={b} x "
        f"{len(shapes)} groups); max |sharded - slice of unsharded| over the ranks = "
        f"{worst.item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
